//! One server-backed suite for every networked backend: conformance,
//! outage, timeout, restart, late writes and hostile URLs.
//!
//! A backend's test file implements [`TestServer`] (how to start its server,
//! the URL of a storage on it, its bad URLs) and lists the cases it runs with
//! [`server_tests!`], which makes one `#[tokio::test]` per case, named after
//! it: a failure names the backend (the test binary) and the case. What only
//! one backend has stays in its own file.

#![allow(dead_code, unused_macros, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metadatacache::{DownloadRequest, Error, ErrorKind, Result, Storage, UploadRequest};

use super::servers::Server;
use super::{GUARD, eventually, must_finish};

mod combined;
mod counters;
mod watch;
// Each test binary runs only some of the cases.
#[allow(unused_imports)]
pub use combined::combined_writes_count_exactly;
#[allow(unused_imports)]
pub use counters::{
    counter_counts_exactly, counter_survives_restart, late_landing_writes,
    lost_replies_are_resolved_by_write_token,
};
#[allow(unused_imports)]
pub use watch::{
    watch_reports_changes_of_another_handle, watch_survives_restart,
    watched_counter_counts_exactly, watched_history_across_restart,
    watched_stores_serve_from_memory,
};

/// The document the outage and timeout cases write.
const DOC: &str = "doc.json";

/// A networked backend's test server, as the generic cases use it. Key
/// spaces (`space`) are short lowercase words; each names a part of the
/// server of its own: an etcd prefix, a PostgreSQL table, an S3 bucket.
pub trait TestServer {
    /// The backend's name, as `Storage::backend` and `Error::backend` give it.
    const BACKEND: &'static str;
    /// Whether opening a storage already talks to the server (else its
    /// first call does).
    const CONNECTS_ON_OPEN: bool;
    /// A refused URL carrying the password `hunter2`, which messages show
    /// as `***`.
    const SECRET_URL: &'static str;
    /// URLs only this backend refuses; [`bad_urls_name_the_url_without_secrets`]
    /// adds what every backend refuses (bad ports, timeouts, parameters).
    const BAD_URLS: &'static [&'static str] = &[];
    /// Key spaces only this backend refuses.
    const BAD_SPACES: &'static [&'static str] = &[];
    /// Query parameters (`key=value`) only this backend refuses.
    const BAD_PARAMS: &'static [&'static str] = &[];

    /// Starts a fresh server; `None` when it is missing and the user allowed
    /// skipping (see `servers::missing`).
    fn launch() -> Option<Server>;

    /// The URL of a storage in `space`, one level below the root where the
    /// backend has prefixes, on the server at `addr` (any `host:port`).
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String;

    /// The URL of a storage at the root of `space` (etcd: of the server).
    fn root_url(addr: &str, space: &str) -> String;

    /// Makes `space` usable: nothing, or S3's bucket (again after a restart
    /// that lost it).
    fn prepare(_server: &Server, _space: &str) {}

    /// The backend's own constructor, as a user calls it.
    fn from_url(url: &str) -> impl Future<Output = Result<Arc<dyn Storage>>> + Send;

    /// How the tests open a storage on their server: the constructor, unless
    /// the backend needs more (S3: credentials given in code).
    fn open_url(url: &str) -> impl Future<Output = Result<Arc<dyn Storage>>> + Send {
        Self::from_url(url)
    }

    /// The storage in `space` on `server`, prepared and opened.
    fn open(
        server: &Server,
        space: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Arc<dyn Storage>> + Send {
        Self::prepare(server, space);
        let url = Self::url(server.addr(), space, timeout);
        async move {
            Self::open_url(&url)
                .await
                .unwrap_or_else(|e| panic!("open {url}: {e}"))
        }
    }

    /// The kind of the error `res` must hold, checking that the error names
    /// the backend.
    fn kind<T: Debug>(res: Result<T>) -> ErrorKind {
        match res {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => {
                assert_eq!(e.backend(), Some(Self::BACKEND), "{e}");
                e.kind()
            }
        }
    }
}

/// `&timeout_ms=N` (with `sep` first), or nothing for the default.
pub fn timeout_query(sep: &str, timeout: Option<Duration>) -> String {
    timeout.map_or_else(String::new, |t| {
        format!("{sep}timeout_ms={}", t.as_millis())
    })
}

/// One `#[tokio::test]` per generic case for the backend `$backend`, named
/// after the case. Cases after `served:` get a fresh server of their own;
/// cases after `offline:` need none.
macro_rules! server_tests {
    ($backend:ty; served: $($case:ident),* ; offline: $($free:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                use $crate::common::suite::TestServer as _;
                if let Some(mut server) = <$backend>::launch() {
                    $crate::common::suite::$case::<$backend>(&mut server).await;
                }
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $free() {
                $crate::common::suite::$free::<$backend>().await;
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use server_tests;

/// Stops the server from a test's async thread.
fn stop(server: &mut Server) {
    tokio::task::block_in_place(|| server.stop());
}

/// Starts the server again (same port, same data) from a test's async thread.
fn start(server: &mut Server) {
    tokio::task::block_in_place(|| server.start());
}

// --------------------------------------------------------------- the cases

/// The shared conformance suite below a prefix, then at the root of a key
/// space of its own. Returns the root storage, for a backend's own checks.
pub async fn conformance<S: TestServer>(server: &mut Server) -> Arc<dyn Storage> {
    let storage = S::open(server, "conformance", None).await;
    assert_eq!(storage.backend(), S::BACKEND);
    metadatacache::conformance::run_all(storage, "suite").await;
    S::prepare(server, "root");
    let root = S::open_url(&S::root_url(server.addr(), "root"))
        .await
        .unwrap();
    assert_eq!(root.backend(), S::BACKEND);
    metadatacache::conformance::run_all(Arc::clone(&root), "").await;
    root
}

/// Every kind of call on `storage` answers `Unavailable`, naming the
/// backend and the document, each within [`GUARD`] (a hang detector).
/// Returns how long the first call, a plain upload, took.
async fn every_call_is_unavailable<S: TestServer>(
    storage: &dyn Storage,
    etag: &str,
    when: &str,
) -> Duration {
    type Call<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;
    let if_match = UploadRequest {
        if_match: Some(etag.to_owned()),
        ..UploadRequest::new(DOC, "2")
    };
    let create = UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new(DOC, "2")
    };
    fn call<'a, T>(f: impl Future<Output = Result<T>> + Send + 'a) -> Call<'a> {
        Box::pin(async { f.await.map(drop) })
    }
    let calls = [
        ("upload", call(storage.simple_upload(DOC, "2".into()))),
        ("conditional upload", call(storage.upload(if_match))),
        ("create", call(storage.upload(create))),
        (
            "download",
            call(storage.download(DownloadRequest::new(DOC))),
        ),
        ("stat", call(storage.stat(DOC))),
        ("delete", call(storage.delete(DOC))),
        ("list", call(storage.list_dir(""))),
    ];
    let mut first = None;
    for (what, call) in calls {
        let (res, took) = must_finish(&format!("{what} {when}"), GUARD, call).await;
        let e = res.unwrap_err();
        eprintln!("{what} {when}: failed after {took:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{what} {when}: {e}");
        assert_eq!(e.backend(), Some(S::BACKEND), "{what} {when}: {e}");
        if what != "list" {
            assert_eq!(e.path(), Some(DOC), "{what} {when}: {e}");
        }
        first.get_or_insert(took);
    }
    first.unwrap()
}

/// The server stops: every call answers `Unavailable` within the hang
/// guard, twice over. It starts again: the same storage object works again,
/// and (where the server keeps its data) the document is still the one
/// written before the outage.
pub async fn outage_then_recovery<S: TestServer>(server: &mut Server) {
    let s = S::open(server, "outage", Some(Duration::from_secs(1))).await;
    let v1 = s.simple_upload(DOC, "1".into()).await.unwrap();

    stop(server);
    for round in 0..2 {
        every_call_is_unavailable::<S>(&*s, &v1.etag, &format!("during the outage ({round})"))
            .await;
    }

    start(server);
    let keeps_data = server.keeps_data();
    // S3: moto lost its bucket with everything else.
    S::prepare(server, "outage");
    let (v, failed) = eventually("write after the restart", || async {
        if keeps_data {
            // Only the version written before the outage matches.
            let cas = UploadRequest {
                if_match: Some(v1.etag.clone()),
                ..UploadRequest::new(DOC, "3")
            };
            s.upload(cas).await
        } else {
            s.simple_upload(DOC, "3".into()).await
        }
    })
    .await;
    eprintln!("the same storage wrote again after {failed} failed attempts");
    let got = s.download(DownloadRequest::new(DOC)).await.unwrap();
    assert_eq!((got.content.as_ref(), got.etag), (b"3".as_ref(), v.etag));
}

/// Nothing listening: `Unavailable`. A server that accepts connections and
/// never says a word: every call `Unavailable`, ended by the timeout (timers
/// never fire early), never a hang.
pub async fn silent_server_is_unavailable<S: TestServer>() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let url = S::url(&closed, "hang", Some(TIMEOUT));
    let (res, took) = must_finish("open and write with nothing listening", GUARD, async {
        S::open_url(&url)
            .await?
            .simple_upload(DOC, "1".into())
            .await
    })
    .await;
    eprintln!("nothing listening: failed after {took:?}");
    assert_eq!(S::kind(res), ErrorKind::Unavailable);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap().to_string();
    // Accepts and holds every connection until the test ends.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let url = S::url(&silent, "hang", Some(TIMEOUT));
    let (opened, took) = must_finish("open on a silent server", GUARD, S::open_url(&url)).await;
    match opened {
        Err(e) => {
            eprintln!("silent server: open failed after {took:?}: {e}");
            assert!(S::CONNECTS_ON_OPEN, "open failed: {e}");
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert_eq!(e.backend(), Some(S::BACKEND), "{e}");
            assert!(took >= TIMEOUT, "{took:?}");
        }
        Ok(s) => {
            assert!(!S::CONNECTS_ON_OPEN, "opened on a silent server");
            for round in 0..2 {
                let when = format!("on a silent server ({round})");
                let took = every_call_is_unavailable::<S>(&*s, "\"v\"", &when).await;
                assert!(took >= TIMEOUT, "{took:?}");
            }
        }
    }
}

/// `url` with the query parameter `param` (`key=value`) added.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// Every bad URL is `InvalidInput` naming the backend and the URL, from
/// the backend's constructor and from `metadatacache::open`: the backend's
/// own, its bad key spaces, and its good URL with a port that is no number,
/// a timeout that is not a positive number of milliseconds, or a parameter
/// nobody knows. A password shows in neither the message nor `Debug`.
pub async fn bad_urls_name_the_url_without_secrets<S: TestServer>() {
    async fn refused<S: TestServer>(url: &str) -> [Error; 2] {
        let (own, open) = (S::from_url(url).await, metadatacache::open(url).await);
        [own.err(), open.err()].map(|e| e.unwrap_or_else(|| panic!("{url} was accepted")))
    }
    let addr = "127.0.0.1:1";
    let mut bad: Vec<String> = S::BAD_URLS.iter().map(|u| (*u).to_owned()).collect();
    bad.push(S::url("127.0.0.1:notaport", "x", None));
    bad.extend(S::BAD_SPACES.iter().map(|space| S::url(addr, space, None)));
    let timeouts = [
        "timeout_ms=zero",
        "timeout_ms=0",
        "timeout_ms=-5",
        "timeout_ms=soon",
    ];
    let params = timeouts.iter().chain(&["unknown=1"]).chain(S::BAD_PARAMS);
    bad.extend(params.map(|p| with_param(&S::url(addr, "x", None), p)));
    for url in &bad {
        for e in refused::<S>(url).await {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}: {e}");
            assert_eq!(e.backend(), Some(S::BACKEND), "{url}: {e}");
            assert!(e.to_string().contains(url.as_str()), "{url}: {e}");
        }
    }
    let shown = S::SECRET_URL.replace("hunter2", "***");
    for e in refused::<S>(S::SECRET_URL).await {
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        assert!(e.to_string().contains(&shown), "{e}");
    }
}

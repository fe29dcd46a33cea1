//! The etcd backend against a real etcd server (a missing `etcd` fails the
//! tests, naming what to install, unless `MDCACHE_SKIP_SERVERS=1`): the
//! shared suite of `common::suite`, and what only etcd has: its key layout,
//! authentication, and a transaction stalled in the network.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::eventually;
use common::servers::{self, Server};
use common::suite::{self, TestServer};
use metadatacache::{
    DownloadRequest, ErrorKind, EtcdStorage, Options, Result, RetryPolicy, Storage, Store,
    UploadRequest,
};

struct Etcd;

impl TestServer for Etcd {
    const BACKEND: &'static str = "etcd";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "etcd://u:hunter2@h:1/x?password=hunter2&bogus=1";
    // No host; no etcds:// scheme (TLS is `?cacert=`); a client
    // certificate without TLS.
    const BAD_URLS: &'static [&'static str] = &[
        "etcd://",
        "etcds://127.0.0.1:2379/x",
        "etcd://127.0.0.1:2379/x?cert=c.pem&key=k.pem",
    ];
    const BAD_SPACES: &'static [&'static str] = &["../x", "a//b"];

    fn launch() -> Option<Server> {
        servers::etcd()
    }

    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        format!(
            "etcd://{addr}/{space}{}",
            suite::timeout_query("?", timeout)
        )
    }

    fn root_url(addr: &str, _space: &str) -> String {
        format!("etcd://{addr}")
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(EtcdStorage::from_url(url).await?))
    }
}

suite::server_tests!(Etcd;
    served: outage_then_recovery, counter_counts_exactly, counter_survives_restart,
        late_landing_writes, lost_replies_are_resolved_by_write_token,
        combined_writes_count_exactly,
        watch_reports_changes_of_another_handle, watched_stores_serve_from_memory,
        watch_survives_restart, watched_history_across_restart, watched_counter_counts_exactly;
    offline: silent_server_is_unavailable);

async fn connect(url: &str) -> Arc<dyn Storage> {
    Etcd::from_url(url).await.unwrap()
}

/// A raw etcd client, to look at the keys the backend writes.
async fn raw(addr: &str) -> etcd_client::Client {
    etcd_client::Client::connect([format!("http://{addr}")], None)
        .await
        .unwrap()
}

/// The suite, and at the root the internal metadata keys never show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let Some(mut server) = Etcd::launch() else {
        return;
    };
    suite::conformance::<Etcd>(&mut server).await;
    let storage = connect(&format!("etcd://{}/", server.addr())).await;
    let root = storage.read_dir("").await.unwrap();
    assert!(root.iter().all(|p| !p.starts_with(".mdcache")), "{root:?}");
    assert!(root.contains(&"list".to_owned()), "{root:?}");
    storage.init("").await.unwrap();
    let info = storage.stat("").await.unwrap();
    assert!(info.is_dir());
}

/// The suite's, and a password in the URL stays out of `Debug`.
#[tokio::test]
async fn bad_urls_name_the_url_without_secrets() {
    suite::bad_urls_name_the_url_without_secrets::<Etcd>().await;
    let s = EtcdStorage::from_url("etcd://u:hunter2@127.0.0.1:1/x")
        .await
        .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    assert_eq!(s.prefix(), "x");
}

#[tokio::test]
async fn documents_are_plain_values_under_the_prefix() {
    let Some(server) = Etcd::launch() else {
        return;
    };
    let storage = connect(&format!("etcd://{}/app/v1", server.addr())).await;
    let v1 = storage
        .simple_upload("users/alice.json", "{\"a\":1}".into())
        .await
        .unwrap();
    let mut raw = raw(server.addr()).await;
    let got = raw.get("app/v1/users/alice.json", None).await.unwrap();
    let kv = &got.kvs()[0];
    assert_eq!(kv.value(), b"{\"a\":1}");
    assert_eq!(kv.mod_revision().to_string(), v1.etag);
    let meta = raw
        .get("app/v1/.mdcache-meta/users/alice.json", None)
        .await
        .unwrap();
    assert_eq!(
        meta.kvs().len(),
        1,
        "metadata key written with the document"
    );

    // A document written by another tool: no mtime, still usable.
    raw.put("app/v1/users/bob.json", "{}", None).await.unwrap();
    let bob = storage
        .download(DownloadRequest::new("users/bob.json"))
        .await
        .unwrap();
    assert_eq!(bob.content, "{}");
    let listed = storage.list_dir("users").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].mtime.is_some() && listed[1].mtime.is_none());
    storage
        .upload(UploadRequest {
            if_match: Some(bob.etag.clone()),
            if_unmodified_since: Some(std::time::SystemTime::now()),
            ..UploadRequest::new("users/bob.json", "{\"b\":1}")
        })
        .await
        .unwrap();

    // Reserved names and etags this backend never hands out.
    for bad in [".mdcache-meta/x", ".mdcache-meta"] {
        let e = storage.simple_upload(bad, "x".into()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
    }
    let e = storage
        .upload(UploadRequest {
            if_match: Some("not-a-revision".into()),
            ..UploadRequest::new("users/alice.json", "x")
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PreconditionFailed);

    // A document cannot sit below a document, nor where a directory is.
    let e = storage
        .simple_upload("users/alice.json/x", "x".into())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = storage
        .simple_upload("users", "x".into())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = storage
        .make_dir_if_not_exist("users/alice.json/sub")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // Deleting removes the metadata key too.
    storage.delete("users/alice.json").await.unwrap();
    let meta = raw
        .get("app/v1/.mdcache-meta/users/alice.json", None)
        .await
        .unwrap();
    assert!(meta.kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_signs_in_again_after_a_restart() {
    let Some(mut server) = Etcd::launch() else {
        return;
    };
    let mut raw = raw(server.addr()).await;
    raw.user_add("root", "s3cret", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let addr = server.addr().to_owned();
    let storage = connect(&format!("etcd://root:s3cret@{addr}/auth?timeout_ms=1000")).await;
    storage.simple_upload("doc", "1".into()).await.unwrap();

    let wrong = connect(&format!("etcd://{addr}/auth?user=root&password=nope")).await;
    let e = wrong.simple_download("doc").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.to_string().contains("nope"), "{e}");
    let anonymous = connect(&format!("etcd://{addr}/auth")).await;
    let e = anonymous.simple_download("doc").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    // A restart forgets every token; the storage signs in again by itself.
    server.stop();
    server.start();
    let (_, failed) = eventually("write after the restart", || {
        storage.simple_upload("doc", "2".into())
    })
    .await;
    eprintln!("signed in again after {failed} failed attempts");
    assert_eq!(storage.simple_download("doc").await.unwrap(), "2");
}

/// A document whose every write carries a marker the proxy can spot.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Marked {
    marker: String,
    ids: Vec<u64>,
}

/// A real network's late commit: a loopback proxy holds a transaction's
/// request past the client's timeout and lets it through just ahead of the
/// client's next write (the store's resend, or — without fencing — the
/// re-run of its update). Every update must land at most once, and exactly
/// once when it answered `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stalled_past_the_timeout_lands_once() {
    use common::proxy::Proxy;
    const MARKER: &str = "stall-this-write";
    let Some(server) = Etcd::launch() else {
        return;
    };
    let proxy = Proxy::start(server.addr()).await;
    let url = format!("etcd://{}/stalled?timeout_ms=500", proxy.addr());
    let direct = connect(&format!("etcd://{}/stalled", server.addr())).await;
    let store: Store<String, Marked> = Store::new(
        Options::new(connect(&url).await, |k: &String| format!("{k}.json"))
            .init(|| Marked {
                marker: MARKER.into(),
                ids: Vec::new(),
            })
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
    );
    store
        .update("doc".into(), true, |d| Ok((d, true)))
        .await
        .unwrap();
    let (mut ok, mut unavailable) = (Vec::new(), Vec::new());
    for id in 0..10u64 {
        // The first write of each update is held past the timeout.
        proxy.stall_writes(MARKER.as_bytes(), 1, Duration::from_secs(20));
        let res = store
            .update("doc".into(), false, |mut d| {
                d.ids.push(id);
                Ok((d, true))
            })
            .await;
        match res {
            Ok(()) => ok.push(id),
            Err(e) if e.kind() == ErrorKind::Unavailable => unavailable.push(id),
            Err(e) => panic!("update {id}: {e}"),
        }
    }
    let counts = proxy.counts();
    let stored: Marked =
        serde_json::from_slice(&direct.simple_download("doc.json").await.unwrap()).unwrap();
    eprintln!(
        "stalled writes: {counts:?}; ok {} unavailable {:?}; stored {:?}; stats {:?}",
        ok.len(),
        unavailable,
        stored.ids,
        store.stats()
    );
    assert_eq!(
        counts.stalls, 10,
        "every update's first write was stalled: {counts:?}"
    );
    let mut seen = std::collections::HashSet::new();
    for id in &stored.ids {
        assert!(
            seen.insert(*id),
            "update {id} was applied twice: {:?}",
            stored.ids
        );
        assert!(
            ok.contains(id) || unavailable.contains(id),
            "{id} failed yet landed"
        );
    }
    for id in &ok {
        assert!(seen.contains(id), "update {id} answered Ok but is missing");
    }
}

/// With only a user in the URL, the password comes from `ETCDCTL_PASSWORD`
/// (etcdctl's variable) and shows in no message. The variable is set for a
/// child process (this test binary, running only
/// [`password_from_the_environment_child`]): changing the environment of
/// the running, multi-threaded test process would be unsound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_the_environment() {
    let Some(server) = Etcd::launch() else {
        return;
    };
    let mut raw = raw(server.addr()).await;
    raw.user_add("root", "s3cret", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();
    let url = format!("etcd://root@{}/auth?timeout_ms=2000", server.addr());
    for (password, expect) in [("s3cret", "ok"), ("not-the-password-42", "denied")] {
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "password_from_the_environment_child",
                    "--nocapture",
                ])
                .env("ETCDCTL_PASSWORD", password)
                .env("MDCACHE_TEST_ETCD_URL", &url)
                .env("MDCACHE_TEST_EXPECT", expect)
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{expect}: {stdout}\n{stderr}");
        // The child ran the test, not nothing.
        assert!(stdout.contains("1 passed"), "{expect}: {stdout}");
    }
}

/// The child of [`password_from_the_environment`]; does nothing when run
/// by itself.
#[tokio::test]
async fn password_from_the_environment_child() {
    let (Ok(url), Ok(expect)) = (
        std::env::var("MDCACHE_TEST_ETCD_URL"),
        std::env::var("MDCACHE_TEST_EXPECT"),
    ) else {
        return;
    };
    let password = std::env::var("ETCDCTL_PASSWORD").unwrap();
    let storage = connect(&url).await;
    let res = storage.simple_upload("doc", "1".into()).await;
    if expect == "ok" {
        res.unwrap();
    } else {
        let e = res.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(!e.to_string().contains(&password), "{e}");
    }
    assert!(!format!("{storage:?}").contains(&password));
}

/// A directory larger than a page, with subtrees larger than a page around
/// its documents, is listed whole, once per entry, in order, with the
/// metadata of the documents that have some; keys that are no path are
/// left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_directories_are_listed_page_by_page() {
    let Some(server) = Etcd::launch() else {
        return;
    };
    let raw = raw(server.addr()).await;
    let mut keys: Vec<String> = (0..1100).map(|i| format!("big/f{i:04}.json")).collect();
    keys.extend((0..1200).map(|i| format!("big/a-dir/x{i:04}.json")));
    keys.extend((0..600).map(|i| format!("big/z-dir/deeper/y{i:04}.json")));
    keys.push("big/g-dir/one.json".to_owned());
    keys.push("big/bad//x".to_owned());
    let mut puts = tokio::task::JoinSet::new();
    for chunk in keys.chunks(100) {
        let (mut raw, chunk) = (raw.clone(), chunk.to_vec());
        puts.spawn(async move {
            for key in chunk {
                raw.put(format!("app/{key}"), "{}", None).await.unwrap();
            }
        });
    }
    puts.join_all().await;
    let storage = connect(&format!("etcd://{}/app", server.addr())).await;
    // Some documents (at page edges) written through the backend, with an mtime.
    for i in [0, 499, 500, 1000, 1099] {
        storage
            .simple_upload(&format!("big/f{i:04}.json"), "{\"n\":1}".into())
            .await
            .unwrap();
    }

    let listed = storage.list_dir("big").await.unwrap();
    let mut want: Vec<String> = (0..1100).map(|i| format!("big/f{i:04}.json")).collect();
    want.extend(["big/a-dir", "big/g-dir", "big/z-dir"].map(str::to_owned));
    want.sort();
    let paths: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, want);
    for f in &listed {
        let written = ["0000", "0499", "0500", "1000", "1099"]
            .iter()
            .any(|i| f.path == format!("big/f{i}.json"));
        assert_eq!(f.is_dir(), f.path.ends_with("-dir"), "{}", f.path);
        if f.is_dir() {
            continue;
        }
        assert_eq!(f.mtime.is_some(), written, "{}", f.path);
        if written {
            assert_eq!(f.size, 7, "{}", f.path);
        }
    }
    let a = storage.list_dir("big/a-dir").await.unwrap();
    assert_eq!(a.len(), 1200);
    let root = storage.read_dir("").await.unwrap();
    assert_eq!(root, ["big"]);
}

/// Waits until `proxy` holds the request it was told to stall (`what`);
/// fails the test if none comes within the hang guard.
async fn until_stalled(proxy: &common::proxy::Proxy, what: &str) {
    let asked = async {
        while proxy.counts().stalls == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    common::must_finish(&format!("waiting for {what}"), common::GUARD, asked).await;
}

/// A listing reads every page at the revision of its first, so that it is
/// one snapshot; when that revision is compacted away between two pages,
/// the listing starts again at a new revision and still returns every
/// entry once. A loopback proxy holds the second page's request (it names
/// the last key of the first page) while the history is compacted past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_compacted_between_pages_starts_again() {
    use common::proxy::Proxy;
    let Some(server) = Etcd::launch() else {
        return;
    };
    let mut raw = raw(server.addr()).await;
    let mut puts = tokio::task::JoinSet::new();
    for chunk in 0..11 {
        let mut raw = raw.clone();
        puts.spawn(async move {
            for i in chunk * 100..(chunk + 1) * 100 {
                raw.put(format!("app/cmp/f{i:04}.json"), "{}", None)
                    .await
                    .unwrap();
            }
        });
    }
    puts.join_all().await;
    let proxy = Proxy::start(server.addr()).await;
    let storage = connect(&format!("etcd://{}/app", proxy.addr())).await;
    // The first page holds f0000..f0499; the second starts after f0499.
    proxy.stall_writes(b"f0499.json", 1, Duration::from_secs(2));
    let listing = tokio::spawn({
        let storage = Arc::clone(&storage);
        async move { storage.list_dir("cmp").await }
    });
    until_stalled(&proxy, "the second page").await;
    let rev = raw.put("app/elsewhere", "{}", None).await.unwrap();
    let rev = rev.header().unwrap().revision();
    raw.compact(rev, None).await.unwrap();
    let listed = listing.await.unwrap().unwrap();
    let want: Vec<String> = (0..1100).map(|i| format!("cmp/f{i:04}.json")).collect();
    let paths: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, want);
    assert_eq!(proxy.counts().stalls, 1, "{:?}", proxy.counts());
}

/// A watch starts from the revision after the one read when it is opened;
/// when that revision is compacted away before the server takes the watch,
/// the server cancels it: the stream reports a gap naming the compaction,
/// opens a new watch, is in sync again, and reports the changes after. A
/// loopback proxy holds the watch's request (the range end of `app/w`,
/// then the start revision, which only a watch request carries) while two
/// writes land and the history is compacted past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_compacted_before_it_starts_reports_a_gap() {
    use common::proxy::Proxy;
    use common::watching::{changed, next_change, until_change};
    use metadatacache::Change;
    let Some(server) = Etcd::launch() else {
        return;
    };
    let mut raw = raw(server.addr()).await;
    let proxy = Proxy::start(server.addr()).await;
    let storage = connect(&format!("etcd://{}/app", proxy.addr())).await;
    proxy.stall_writes(b"\x12\x05app/x\x18", 1, Duration::from_secs(1));
    let watching = tokio::spawn({
        let storage = Arc::clone(&storage);
        async move { storage.watch("w").await }
    });
    until_stalled(&proxy, "the watch").await;
    raw.put("app/w/a.json", "1", None).await.unwrap();
    let rev = raw.put("app/w/a.json", "2", None).await.unwrap();
    raw.compact(rev.header().unwrap().revision(), None)
        .await
        .unwrap();
    let mut stream = watching.await.unwrap().unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    match next_change(&mut stream).await {
        Change::Gap { reason } => assert!(reason.contains("compacted"), "{reason}"),
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let v = storage.simple_upload("w/b.json", "3".into()).await.unwrap();
    until_change(&mut stream, &changed("w/b.json", Some(&v.etag))).await;
    assert_eq!(proxy.counts().stalls, 1, "{:?}", proxy.counts());
}

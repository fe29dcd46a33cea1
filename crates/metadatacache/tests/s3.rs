//! The S3 backend (`object_store`) against a real S3-compatible server (moto):
//! the conformance suite, S3 specifics, URL errors, an outage, and replicas
//! racing on one counter.
//!
//! moto keeps its state in memory, so a stopped moto loses every object: the
//! outage test only checks that calls fail fast with `Unavailable` while it
//! is down and that the same storage works again after the restart. The
//! counter-under-outage test of the other backends is therefore not run here
//! (the counter would restart from nothing); a plain concurrency counter test
//! takes its place.

#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use metadatacache::{
    DownloadRequest, Error, ErrorKind, ObjectStoreStorage, Options, RetryPolicy, S3Config, Storage,
    Store, UploadRequest,
};
use support::{must_finish, servers};

/// The hang detector of calls that should end within their timeout: many
/// times any timeout used here.
const GUARD: Duration = Duration::from_secs(60);

/// The storage at `url`, with credentials given in code (moto accepts any;
/// the client needs some to sign requests). The process environment is
/// never changed: tests run on threads.
async fn from_url(url: &str) -> Result<ObjectStoreStorage, Error> {
    let config = S3Config::from_url(url)?.credentials("test", "test-secret-key");
    ObjectStoreStorage::new(config).await
}

fn url(addr: &str, bucket_and_prefix: &str, extra: &str) -> String {
    format!(
        "s3://{bucket_and_prefix}?endpoint=http://{addr}&allow_http=true&region=us-east-1{extra}"
    )
}

async fn open(addr: &str, bucket_and_prefix: &str, extra: &str) -> ObjectStoreStorage {
    from_url(&url(addr, bucket_and_prefix, extra))
        .await
        .unwrap()
}

fn kind<T: std::fmt::Debug>(res: Result<T, Error>) -> ErrorKind {
    match res {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert_eq!(e.backend(), Some("s3"), "{e}");
            e.kind()
        }
    }
}

// ---------------------------------------------------------------- semantics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_passes_the_conformance_suite() {
    let Some(server) = servers::moto() else {
        return;
    };
    servers::create_bucket(server.addr(), "conformance");
    servers::create_bucket(server.addr(), "conformance-root");
    let storage = open(server.addr(), "conformance/some/prefix", "").await;
    metadatacache::conformance::run_all(Arc::new(storage), "suite").await;
    // With no prefix, at the bucket's root. (The generic opener reads the
    // credentials from the environment; the CLI tests run it that way.)
    let storage = open(server.addr(), "conformance-root", "").await;
    assert_eq!(storage.backend(), "s3");
    metadatacache::conformance::run_all(Arc::new(storage), "").await;
}

/// The same wrapper over `object_store`'s in-memory store, which also has
/// conditional puts: the backend is not tied to S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_wrapper_passes_the_suite_on_in_memory_store() {
    let inner = Arc::new(object_store::memory::InMemory::new());
    let storage =
        ObjectStoreStorage::from_store(inner, "/pre/fix/", "object-store-memory").unwrap();
    assert_eq!(storage.prefix(), "pre/fix");
    assert_eq!(storage.backend(), "object-store-memory");
    metadatacache::conformance::run_all(Arc::new(storage), "suite").await;
    let bad = ObjectStoreStorage::from_store(
        Arc::new(object_store::memory::InMemory::new()),
        "a/../b",
        "x",
    )
    .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_etags_conditions_listing_and_errors() {
    let Some(server) = servers::moto() else {
        return;
    };
    servers::create_bucket(server.addr(), "specifics");
    let s = open(server.addr(), "specifics/app", "&timeout_ms=3000").await;
    let debug = format!("{s:?}");
    assert!(!debug.contains("test-secret-key"), "{debug}");
    assert!(debug.contains("app"), "{debug}");
    assert_eq!(s.timeout(), Duration::from_millis(3000));

    // Etags are the server's, the same from upload, download, stat and list.
    let v1 = s
        .simple_upload("d/x.json", "{\"n\":1}".into())
        .await
        .unwrap();
    let got = s.download(DownloadRequest::new("d/x.json")).await.unwrap();
    assert_eq!(got.etag, v1.etag);
    assert_eq!(
        s.stat("d/x.json").await.unwrap().etag.as_deref(),
        Some(v1.etag.as_str())
    );
    let listed = s.list_dir("d").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].etag.as_deref(), Some(v1.etag.as_str()));
    assert_eq!(listed[0].size, 7);
    println!("etag format: {}", v1.etag);

    // Conditional download: several etags are also honoured.
    let two = DownloadRequest {
        if_none_match: vec!["\"other\"".into(), v1.etag.clone()],
        ..DownloadRequest::new("d/x.json")
    };
    assert_eq!(kind(s.download(two).await), ErrorKind::NotModified);
    assert_eq!(
        kind(
            s.download(DownloadRequest::if_none_match("d/x.json", &v1.etag))
                .await
        ),
        ErrorKind::NotModified
    );

    // if_match "*": any existing version; absent → NotFound.
    let star = |p: &str| UploadRequest {
        if_match: Some("*".into()),
        ..UploadRequest::new(p, "{\"n\":2}")
    };
    let v2 = s.upload(star("d/x.json")).await.unwrap();
    assert_ne!(v2.etag, v1.etag);
    assert_eq!(
        kind(s.upload(star("d/none.json")).await),
        ErrorKind::NotFound
    );
    // if_match on a missing document creates nothing.
    let missing = UploadRequest {
        if_match: Some(v2.etag.clone()),
        ..UploadRequest::new("d/none.json", "x")
    };
    let k = kind(s.upload(missing).await);
    assert!(
        matches!(k, ErrorKind::NotFound | ErrorKind::PreconditionFailed),
        "{k:?}"
    );
    assert_eq!(kind(s.stat("d/none.json").await), ErrorKind::NotFound);
    // if_none_match with an etag on a missing document creates it.
    let create = UploadRequest {
        if_none_match: vec![v2.etag.clone()],
        ..UploadRequest::new("d/new.json", "1")
    };
    s.upload(create).await.unwrap();

    // Errors name path and backend; bad paths never reach the server.
    let e = s
        .download(DownloadRequest::new("d/nope.json"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.path(), Some("d/nope.json"));
    assert!(e.to_string().starts_with("s3: "), "{e}");
    assert_eq!(kind(s.stat("../x").await), ErrorKind::InvalidInput);
    assert_eq!(kind(s.list_dir("a//b").await), ErrorKind::InvalidInput);
    assert_eq!(kind(s.delete("/abs").await), ErrorKind::InvalidInput);
    assert_eq!(
        kind(s.make_dir_if_not_exist("a/").await),
        ErrorKind::InvalidInput
    );

    // Directories are prefixes; the key prefix never shows.
    s.make_dir_if_not_exist("empty").await.unwrap();
    assert!(s.list_dir("empty").await.unwrap().is_empty());
    s.simple_upload("d/sub/deep/y.json", "2".into())
        .await
        .unwrap();
    s.simple_upload("top.json", "3".into()).await.unwrap();
    let root: Vec<String> = s.read_dir("").await.unwrap();
    assert_eq!(root, ["d", "top.json"]);
    assert_eq!(
        s.read_dir("d").await.unwrap(),
        ["d/new.json", "d/sub", "d/x.json"]
    );
    assert!(s.stat("").await.unwrap().is_dir());
    assert!(s.stat("d/sub").await.unwrap().is_dir());
    assert_eq!(kind(s.stat("d/su").await), ErrorKind::NotFound);
    // Keys outside the prefix are invisible.
    let other = open(server.addr(), "specifics/app-other", "").await;
    other.simple_upload("z.json", "1".into()).await.unwrap();
    assert_eq!(s.read_dir("").await.unwrap(), ["d", "top.json"]);
    let whole = open(server.addr(), "specifics", "").await;
    assert_eq!(whole.read_dir("").await.unwrap(), ["app", "app-other"]);

    // Unusual but valid names round-trip.
    let odd = "d/ä ö+%20[x]#1.json";
    s.simple_upload(odd, "odd".into()).await.unwrap();
    assert_eq!(s.simple_download(odd).await.unwrap(), "odd");
    assert!(s.read_dir("d").await.unwrap().contains(&odd.to_owned()));
}

#[tokio::test]
async fn s3_bad_urls_are_invalid_input() {
    for bad in [
        "s3://",
        "s3:///no-bucket",
        "s3://bucket/p?timeout_ms=0",
        "s3://bucket/p?timeout_ms=soon",
        "s3://bucket/p?unknown=1",
        "s3://bucket/p?endpoint=not-a-url",
        "s3://bucket/p?endpoint=http://127.0.0.1:1",
        "s3://bucket/p?allow_http=perhaps",
        "s3://bucket:9000/p",
        "s3://bucket/a//b",
    ] {
        let e = ObjectStoreStorage::from_url(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        assert!(e.to_string().contains(bad), "{e} names {bad}");
        let e = metadatacache::open(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
    }
    let e = ObjectStoreStorage::from_url("s3://key:hunter2@bucket/p")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(e.to_string().contains("s3://key:***@bucket/p"), "{e}");
}

// ------------------------------------------------------------------- outage

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_is_unavailable_then_recovers() {
    let Some(mut server) = servers::moto() else {
        return;
    };
    servers::create_bucket(server.addr(), "outage");
    let s = open(server.addr(), "outage/p", "&timeout_ms=1000").await;
    let v = s.simple_upload("doc.json", "1".into()).await.unwrap();

    server.stop();
    let (up, upload_took) = must_finish(
        "upload during the outage",
        GUARD,
        s.upload(UploadRequest {
            if_match: Some(v.etag.clone()),
            ..UploadRequest::new("doc.json", "2")
        }),
    )
    .await;
    assert_eq!(kind(up), ErrorKind::Unavailable);
    let (down, download_took) = must_finish(
        "download during the outage",
        GUARD,
        s.download(DownloadRequest::new("doc.json")),
    )
    .await;
    assert_eq!(kind(down), ErrorKind::Unavailable);
    let (others, others_took) = must_finish("upload and list during the outage", GUARD, async {
        (
            s.simple_upload("doc.json", "3".into()).await,
            s.list_dir("").await,
        )
    })
    .await;
    assert_eq!(kind(others.0), ErrorKind::Unavailable);
    assert_eq!(kind(others.1), ErrorKind::Unavailable);
    println!(
        "outage: conditional upload Unavailable after {upload_took:?}, download after \
         {download_took:?}, plain upload + list after {others_took:?}"
    );

    // moto lost everything when it stopped: recreate the bucket, then the
    // same storage object works again.
    server.start();
    servers::create_bucket(server.addr(), "outage");
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        match s.simple_upload("doc.json", "4".into()).await {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                println!("after restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("storage did not recover: {e}"),
        }
    };
    let got = s.download(DownloadRequest::new("doc.json")).await.unwrap();
    assert_eq!(got.content, "4");
    assert_eq!(got.etag, v.etag);
}

/// An endpoint that accepts connections but never answers: every call,
/// including a write whose fate is unknown, is `Unavailable` within the
/// timeout, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_silent_endpoint_times_out_as_unavailable() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let s = open(&addr, "bucket/p", "&timeout_ms=500").await;
    let (res, took) = must_finish("upload to a silent endpoint", GUARD, async {
        s.simple_upload("a.json", "1".into()).await
    })
    .await;
    let e = res.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Ended by the timeout (timers never fire early), not by a refusal.
    assert!(took >= Duration::from_millis(500), "upload took {took:?}");
    println!("silent endpoint: upload Unavailable after {took:?}: {e}");
    let create = UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new("a.json", "1")
    };
    let (kinds, took) = must_finish("four calls to a silent endpoint", GUARD, async {
        [
            kind(s.upload(create).await),
            kind(s.download(DownloadRequest::new("a.json")).await),
            kind(s.stat("a.json").await),
            kind(s.delete("a.json").await),
        ]
    })
    .await;
    assert_eq!(kinds, [ErrorKind::Unavailable; 4], "after {took:?}");
    drop(silent);
}

// ------------------------------------------------------------- concurrency

/// 2 `Store` replicas × 4 tasks × 50 increments of one counter: every
/// increment lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_replicas_count_exactly() {
    let Some(server) = servers::moto() else {
        return;
    };
    servers::create_bucket(server.addr(), "counter");
    let (replicas, tasks, per_task) = (2, 4, 50);
    let mut handles = Vec::new();
    let mut stores = Vec::new();
    let started = Instant::now();
    for _ in 0..replicas {
        // Each replica opens its own storage, as separate processes would.
        let storage: Arc<dyn Storage> = Arc::new(open(server.addr(), "counter/c", "").await);
        let store: Store<String, u64> = Store::new(
            Options::new(storage, |k: &String| format!("{k}.json"))
                .init(|| 0)
                .retries(10_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20))),
        );
        for _ in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    store
                        .update("counter".to_owned(), true, |n| {
                            Ok::<_, Error>((n + 1, true))
                        })
                        .await
                        .unwrap();
                }
            }));
        }
        stores.push(store);
    }
    for h in handles {
        h.await.unwrap();
    }
    let conflicts: u64 = stores.iter().map(|s| s.stats().conflicts).sum();
    let check = open(server.addr(), "counter/c", "").await;
    let total = check.simple_download("counter.json").await.unwrap();
    println!(
        "counter: {} after {:?}, {conflicts} conflicts",
        String::from_utf8_lossy(&total),
        started.elapsed()
    );
    assert_eq!(total, (replicas * tasks * per_task).to_string());
}

//! Shared helpers of the integration tests.

pub mod certs;
pub mod counter;
pub mod durable;
pub mod files;
pub mod proxy;
pub mod servers;
pub mod suite;
pub mod watching;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metadatacache::{DownloadRequest, ErrorKind, Options, Storage, Store, UploadRequest};

/// The hang detector of calls that should end within their timeout: many
/// times any timeout the tests use.
#[allow(dead_code)]
pub const GUARD: Duration = Duration::from_secs(60);

/// Runs `fut` and returns its output and how long it took, failing the test
/// if it has not finished after `guard`. A hang detector, never a speed
/// bound: `guard` is many times what the call should take, so a slow or
/// busy machine cannot trip it; speed belongs in benchmarks.
#[allow(dead_code)]
pub async fn must_finish<T>(
    what: &str,
    guard: Duration,
    fut: impl Future<Output = T>,
) -> (T, Duration) {
    let start = Instant::now();
    match tokio::time::timeout(guard, fut).await {
        Ok(v) => (v, start.elapsed()),
        Err(_) => panic!("{what}: still running after {guard:?}: it hangs"),
    }
}

/// Retries `op` while its server comes back (every failure must be
/// `Unavailable`); returns its value and how many attempts failed first.
/// Fails the test if it is not back after [`GUARD`] (a hang detector, not a
/// speed bound).
#[allow(dead_code)]
pub async fn eventually<T, F, Fut>(what: &str, mut op: F) -> (T, usize)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = metadatacache::Result<T>>,
{
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match op().await {
            Ok(v) => return (v, failed),
            Err(e) if start.elapsed() < GUARD => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}");
                eprintln!("{what}: still failing: {e}");
                failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: not back after {GUARD:?}: {e}"),
        }
    }
}

/// A create-only write of `body` to `path`.
#[allow(dead_code)]
pub fn create(path: &str, body: &str) -> UploadRequest {
    UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new(path, body.to_owned())
    }
}

/// A compare-and-swap write of `body` to `path` over `etag`.
#[allow(dead_code)]
pub fn cas(path: &str, etag: &str, body: &str) -> UploadRequest {
    UploadRequest {
        if_match: Some(etag.to_owned()),
        ..UploadRequest::new(path, body.to_owned())
    }
}

/// Every kind of call on a storage whose bucket (Azure: container) does
/// not exist fails with `InvalidInput`, and its message names `bucket`
/// (such as `bucket "fresh"`) instead of blaming the document; so do a
/// [`Store`]'s `get` and `update` on it (a `NotFound` would read as an
/// absent document: `get` would answer `None`, `update` would create).
#[allow(dead_code)]
pub async fn assert_bucket_missing(s: Arc<dyn Storage>, bucket: &str) {
    let store: Store<String, u64> =
        Store::new(Options::new(Arc::clone(&s), |k: &String| format!("{k}.json")).init(|| 0));
    let calls = [
        ("create", s.upload(create("a.json", "1")).await.err()),
        ("update", s.upload(cas("a.json", "e", "1")).await.err()),
        (
            "download",
            s.download(DownloadRequest::new("a.json")).await.err(),
        ),
        ("list", s.list_dir("").await.err()),
        ("delete", s.delete_if_match("a.json", Some("e")).await.err()),
        ("unconditional delete", s.delete("a.json").await.err()),
        ("Store::get", store.get("a".into()).await.err()),
        (
            "Store::update",
            store
                .update("a".into(), true, |n| Ok((n + 1, true)))
                .await
                .err(),
        ),
    ];
    for (what, e) in calls {
        let e = e.unwrap_or_else(|| panic!("{what} succeeded without a bucket"));
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what}: {e}");
        let message = e.message();
        assert!(
            message.contains(&format!("{bucket} does not exist")),
            "{what}: {message}"
        );
    }
}

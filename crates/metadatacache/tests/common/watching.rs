//! Helpers of the push-invalidation tests: a storage that counts the calls
//! made through it, watched counter stores, and waiting (with a hang
//! guard, never a speed bound) for changes and values to show.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metadatacache::{
    Capabilities, Change, ChangeStream, DownloadRequest, DownloadResponse, ErrorKind, FileInfo,
    Options, Result, RetryPolicy, Storage, Store, UploadRequest, UploadResponse,
};

use super::GUARD;

/// Counts every call made through it (subscribing to changes is no call).
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn Storage>,
    calls: AtomicU64,
}

impl Counting {
    pub fn new(inner: Arc<dyn Storage>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            calls: AtomicU64::new(0),
        })
    }

    /// Calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Storage for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        self.inner.watch(prefix).await
    }
    async fn init(&self, name: &str) -> Result<()> {
        self.count();
        self.inner.init(name).await
    }
    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        self.count();
        self.inner.upload(req).await
    }
    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        self.count();
        self.inner.download(req).await
    }
    async fn delete_if_match(&self, path: &str, m: Option<&str>) -> Result<()> {
        self.count();
        self.inner.delete_if_match(path, m).await
    }
    async fn stat(&self, path: &str) -> Result<FileInfo> {
        self.count();
        self.inner.stat(path).await
    }
    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.count();
        self.inner.list_dir(path).await
    }
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        self.count();
        self.inner.make_dir_if_not_exist(path).await
    }
}

/// A counter store (`<key>.json`, an integer) that follows the storage's
/// changes.
pub fn watched_store(storage: Arc<dyn Storage>) -> Store<String, u64> {
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(|| 0)
            .watch(true)
            .retries(10_000)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20))),
    )
}

/// Increments `key` once, retrying while the server is away.
pub async fn increment(store: &Store<String, u64>, key: &str) {
    let start = Instant::now();
    loop {
        match store
            .update(key.to_owned(), true, |n| Ok((n + 1, true)))
            .await
        {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::Unavailable && start.elapsed() < GUARD => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("increment {key}: {e}"),
        }
    }
}

/// Reads `key` through `store` until it shows `want` (a read may fail
/// while the server is away).
pub async fn until_seen(store: &Store<String, u64>, key: &str, want: u64) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < GUARD {
        match store.get(key.to_owned()).await {
            Ok(v) if v.as_deref() == Some(&want) => return,
            Ok(v) => last = Some(format!("{v:?}")),
            Err(e) if e.kind() == ErrorKind::Unavailable => last = Some(e.to_string()),
            Err(e) => panic!("get {key}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{key} never showed {want} within {GUARD:?} (last: {last:?}): a stale value");
}

/// Waits until a read of `key` through `store` is served from memory (the
/// watch is in sync); returns the value read.
pub async fn until_in_sync(store: &Store<String, u64>, counting: &Counting, key: &str) -> u64 {
    let start = Instant::now();
    while start.elapsed() < GUARD {
        let before = counting.calls();
        let got = store.get(key.to_owned()).await;
        if let Ok(v) = got
            && counting.calls() == before
        {
            return v.as_deref().copied().unwrap_or(0);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the watch never got in sync within {GUARD:?}");
}

/// The next change on `stream`; fails the test if none comes within the
/// hang guard or the stream ends.
pub async fn next_change(stream: &mut ChangeStream) -> Change {
    match tokio::time::timeout(GUARD, stream.next()).await {
        Ok(Some(change)) => change,
        Ok(None) => panic!("the change stream ended"),
        Err(_) => panic!("no change reported within {GUARD:?}"),
    }
}

/// Skips changes until `want` comes; returns what was skipped.
pub async fn until_change(stream: &mut ChangeStream, want: &Change) -> Vec<Change> {
    let mut skipped = Vec::new();
    loop {
        let change = next_change(stream).await;
        if &change == want {
            return skipped;
        }
        skipped.push(change);
    }
}

/// A changed document.
pub fn changed(path: &str, etag: Option<&str>) -> Change {
    Change::Changed {
        path: path.to_owned(),
        etag: etag.map(str::to_owned),
    }
}

/// The 50th and 99th percentiles of `samples` (sorted in place).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Two watched stores, `a` on `watching` (counted) and `b` on `other`, two
/// handles of one storage: once in sync, unchanged reads and read-only
/// updates of `a` make no storage call at all, and each replica sees the
/// other's writes, with no gap.
pub async fn serve_from_memory(watching: Arc<dyn Storage>, other: Arc<dyn Storage>) {
    let counting = Counting::new(watching);
    let a = watched_store(Arc::clone(&counting) as Arc<dyn Storage>);
    let b = watched_store(other);
    increment(&b, "k").await;
    until_seen(&a, "k", 1).await;
    until_in_sync(&a, &counting, "k").await;
    let before = counting.calls();
    for _ in 0..200 {
        assert_eq!(a.get("k".into()).await.unwrap().as_deref(), Some(&1));
        a.update("k".into(), false, |n| Ok((n, false)))
            .await
            .unwrap();
    }
    assert_eq!(
        counting.calls(),
        before,
        "unchanged watched reads asked storage"
    );
    increment(&b, "k").await;
    until_seen(&a, "k", 2).await;
    increment(&a, "k").await;
    until_seen(&b, "k", 3).await;
    assert_eq!((a.stats().watch_gaps, b.stats().watch_gaps), (0, 0));
}

/// 2 tasks on each of `replicas` make 100 increments of key `n` each and
/// are awaited; the caller checks what storage and the replicas show.
pub async fn count_through(replicas: &[Store<String, u64>; 2]) {
    let mut tasks = Vec::new();
    for r in replicas {
        for _ in 0..2 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    r.update("n".into(), true, |n| Ok((n + 1, true)))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

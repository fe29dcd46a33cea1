//! Push invalidation (`Options::watch`) over the memory backend: unchanged
//! watched reads make no storage call; a change elsewhere is seen once its
//! notification arrived; a gap, or a change that raced a read, makes the
//! next read ask storage; writes stay compare-and-swap.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use metadatacache::testing::FaultyStorage;
use metadatacache::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, MemoryStorage,
    Options, RetryPolicy, Storage, Store, UploadRequest, UploadResponse,
};
use tokio::sync::Semaphore;

/// Counts downloads; can hold downloads at a gate after they read (so they
/// return what storage held before a change made meanwhile).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Storage>,
    downloads: AtomicU64,
    hold: std::sync::atomic::AtomicBool,
    gate: Semaphore,
    reading: AtomicU64,
    /// Declares no notifications, as a backend that cannot report changes.
    deaf: bool,
    /// Refuses every subscription, as a backend whose changes cannot be
    /// followed at the moment.
    refusing: bool,
    /// Subscriptions asked for.
    subscriptions: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn Storage>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            downloads: AtomicU64::new(0),
            hold: Default::default(),
            gate: Semaphore::new(0),
            reading: AtomicU64::new(0),
            deaf: false,
            refusing: false,
            subscriptions: AtomicU64::new(0),
        })
    }
    fn refusing(inner: Arc<dyn Storage>) -> Arc<Self> {
        let mut counting = Arc::into_inner(Self::new(inner)).unwrap();
        counting.refusing = true;
        Arc::new(counting)
    }
    fn deaf(inner: Arc<dyn Storage>) -> Arc<Self> {
        let mut counting = Arc::into_inner(Self::new(inner)).unwrap();
        counting.deaf = true;
        Arc::new(counting)
    }
    fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Storage for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.notifications &= !self.deaf;
        caps
    }
    async fn watch(&self, prefix: &str) -> metadatacache::Result<ChangeStream> {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        if self.refusing {
            return Err(metadatacache::Error::invalid_input(
                "changes cannot be followed here",
            ));
        }
        self.inner.watch(prefix).await
    }
    async fn init(&self, name: &str) -> metadatacache::Result<()> {
        self.inner.init(name).await
    }
    async fn upload(&self, req: UploadRequest) -> metadatacache::Result<UploadResponse> {
        self.inner.upload(req).await
    }
    async fn download(&self, req: DownloadRequest) -> metadatacache::Result<DownloadResponse> {
        self.downloads.fetch_add(1, Ordering::SeqCst);
        let res = self.inner.download(req).await;
        if self.hold.load(Ordering::SeqCst) {
            self.reading.fetch_add(1, Ordering::SeqCst);
            self.gate.acquire().await.unwrap().forget();
        }
        res
    }
    async fn delete_if_match(&self, path: &str, m: Option<&str>) -> metadatacache::Result<()> {
        self.inner.delete_if_match(path, m).await
    }
    async fn stat(&self, path: &str) -> metadatacache::Result<FileInfo> {
        self.inner.stat(path).await
    }
    async fn list_dir(&self, path: &str) -> metadatacache::Result<Vec<FileInfo>> {
        self.inner.list_dir(path).await
    }
    async fn make_dir_if_not_exist(&self, path: &str) -> metadatacache::Result<()> {
        self.inner.make_dir_if_not_exist(path).await
    }
}

fn store(storage: Arc<dyn Storage>, watch: bool) -> Store<String, u64> {
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(|| 0)
            .watch(watch)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
    )
}

/// Reads `key` through `store` until it shows `want`: a change made
/// elsewhere is seen once its notification arrived. A hang detector, not a
/// speed bound.
async fn until_seen(store: &Store<String, u64>, key: &str, want: u64) {
    for _ in 0..20_000 {
        if store.get(key.into()).await.unwrap().as_deref() == Some(&want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{key} never showed {want}");
}

/// Waits until the watch is in sync (a read is served from memory).
async fn until_in_sync(store: &Store<String, u64>, counting: &Counting, key: &str) {
    for _ in 0..20_000 {
        let before = counting.downloads();
        store.get(key.into()).await.unwrap();
        if counting.downloads() == before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("the watch never got in sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_watched_reads_make_no_storage_call() {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let counting = Counting::new(Arc::clone(&memory));
    let a = store(Arc::clone(&counting) as Arc<dyn Storage>, true);
    let b = store(Arc::clone(&memory), false);
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    until_seen(&a, "k", 1).await;
    until_in_sync(&a, &counting, "k").await;
    let before = counting.downloads();
    for _ in 0..1000 {
        assert_eq!(a.get("k".into()).await.unwrap().as_deref(), Some(&1));
        a.update("k".into(), false, |n| Ok((n, false)))
            .await
            .unwrap();
    }
    assert_eq!(
        counting.downloads(),
        before,
        "unchanged watched reads asked storage"
    );
    // A change made by another replica is seen, after its notification.
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    until_seen(&a, "k", 2).await;
    // The store's own write carries the new etag: no revalidation after it.
    a.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    until_in_sync(&a, &counting, "k").await;
    assert_eq!(a.get("k".into()).await.unwrap().as_deref(), Some(&3));
    assert_eq!(a.stats().watch_gaps, 0);
}

/// A gap in the change stream distrusts every entry until the stream is
/// whole again; it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_makes_reads_revalidate() {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let counting = Counting::new(Arc::clone(&memory));
    let faulty = Arc::new(FaultyStorage::new(
        Arc::clone(&counting) as Arc<dyn Storage>,
        1,
    ));
    let a = store(Arc::clone(&faulty) as Arc<dyn Storage>, true);
    a.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    until_in_sync(&a, &counting, "k").await;
    // Every gap: the next reads revalidate until the stream reports it is
    // in sync again, then memory serves them again.
    for round in 1..=3 {
        faulty.watch_gap();
        while a.stats().watch_gaps < round {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        until_in_sync(&a, &counting, "k").await;
    }
    assert_eq!(a.stats().watch_gaps, 3);
    // A change made while the stream was down, whose notification was
    // lost, is not missed: entries confirmed before the stream was whole
    // again are not trusted.
    let b = store(Arc::clone(&memory), false);
    faulty.watch_pause();
    while a.stats().watch_gaps < 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // While the stream is down, every read asks storage.
    let before = counting.downloads();
    for i in 1..=3 {
        a.get("k".into()).await.unwrap();
        assert_eq!(
            counting.downloads(),
            before + i,
            "a read trusted a broken stream"
        );
    }
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    while faulty.faults().watch_dropped == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    faulty.watch_resume();
    until_seen(&a, "k", 2).await;
}

/// A read that began before a change and finished after its notification
/// holds the old value: it must not be trusted, or the old value would be
/// served from memory forever (no later notification would come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_raced_a_change_is_not_trusted() {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let counting = Counting::new(Arc::clone(&memory));
    let a = store(Arc::clone(&counting) as Arc<dyn Storage>, true);
    let b = store(Arc::clone(&memory), false);
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    until_seen(&a, "k", 1).await;
    // Drop the entry, then hold the next download after it read "1".
    a.clear_cache();
    counting.hold.store(true, Ordering::SeqCst);
    let reader = {
        let a = a.clone();
        tokio::spawn(async move { a.get("k".into()).await.unwrap() })
    };
    while counting.reading.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The change lands, and its notification is processed, while the read
    // is still on its way back.
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    counting.hold.store(false, Ordering::SeqCst);
    counting.gate.add_permits(1);
    assert_eq!(reader.await.unwrap().as_deref(), Some(&1), "the held read");
    // The next read must ask storage and see the change.
    let before = counting.downloads();
    assert_eq!(a.get("k".into()).await.unwrap().as_deref(), Some(&2));
    assert_eq!(
        counting.downloads(),
        before + 1,
        "the raced entry was trusted"
    );
}

/// Watched stores stay compare-and-swap: 2 replicas × 2 tasks × 100
/// increments end at exactly 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_replicas_lose_no_increment() {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let replicas = [
        store(Arc::clone(&memory), true),
        store(Arc::clone(&memory), true),
    ];
    let mut tasks = Vec::new();
    for r in &replicas {
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
    let n: u64 = serde_json::from_slice(&memory.simple_download("n.json").await.unwrap()).unwrap();
    assert_eq!(n, 400);
}

/// A backend that cannot notify: watch(true) still works, by revalidating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_reads_revalidate() {
    let counting = Counting::deaf(Arc::new(MemoryStorage::new()));
    assert!(!counting.capabilities().notifications);
    let a = store(Arc::clone(&counting) as Arc<dyn Storage>, true);
    a.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    let before = counting.downloads();
    for i in 1..=10 {
        a.get("k".into()).await.unwrap();
        assert_eq!(counting.downloads(), before + i);
    }
}

/// A store used from one runtime, then another (a blocking wrapper that
/// makes a runtime per call): the task that followed the changes ended
/// with the first runtime, so the store must stop trusting its cache, and
/// follow the changes again from the next runtime.
#[test]
fn a_watch_whose_runtime_ended_is_not_trusted() {
    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let counting = Counting::new(Arc::clone(&memory));
    let a = store(Arc::clone(&counting) as Arc<dyn Storage>, true);
    let b = store(Arc::clone(&memory), false);
    let runtime = || tokio::runtime::Runtime::new().unwrap();
    runtime().block_on(async {
        b.update("k".into(), true, |n| Ok((n + 1, true)))
            .await
            .unwrap();
        until_seen(&a, "k", 1).await;
        until_in_sync(&a, &counting, "k").await;
    });
    // The first runtime is gone; another replica changes the key.
    runtime().block_on(async {
        b.update("k".into(), true, |n| Ok((n + 1, true)))
            .await
            .unwrap();
        assert_eq!(
            a.get("k".into()).await.unwrap().as_deref(),
            Some(&2),
            "a stale value was served after the watch's runtime ended"
        );
        // And it follows again: unchanged reads come from memory.
        until_in_sync(&a, &counting, "k").await;
        b.update("k".into(), true, |n| Ok((n + 1, true)))
            .await
            .unwrap();
        until_seen(&a, "k", 3).await;
    });
}

/// A refusal that lasts (bad credentials, a bucket that cannot be watched)
/// is asked again less and less often, not every 200 ms forever; reads
/// stay correct meanwhile. Virtual time: two minutes pass at once.
#[tokio::test(start_paused = true)]
async fn a_lasting_refusal_to_subscribe_backs_off() {
    let storage = Counting::refusing(Arc::new(MemoryStorage::new()));
    let s = store(Arc::clone(&storage) as Arc<dyn Storage>, true);
    s.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.get("k".into()).await.unwrap().as_deref(), Some(&1));
    }
    let asked = storage.subscriptions.load(Ordering::SeqCst);
    // 200 ms doubling up to 30 s: 11 in two minutes (every 200 ms: 600).
    assert!(
        (2..=16).contains(&asked),
        "{asked} subscriptions in two minutes"
    );
}

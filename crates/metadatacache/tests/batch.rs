//! Group commit: updates queued on one key share one compare-and-swap.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metadatacache::testing::FaultyStorage;
use metadatacache::{Error, ErrorKind, MemoryStorage, Options, RetryPolicy, Storage, Store};

type Doc = BTreeMap<String, u64>;

fn slow_memory(inner: &Arc<dyn Storage>, seed: u64) -> Arc<dyn Storage> {
    Arc::new(FaultyStorage::new(Arc::clone(inner), seed).latency(Duration::from_millis(1)))
}

fn store(storage: Arc<dyn Storage>, batching: bool) -> Store<String, Doc> {
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(Doc::new)
            .batching(batching)
            .retries(1000),
    )
}

async fn stored(storage: &Arc<dyn Storage>, key: &str) -> Doc {
    serde_json::from_slice(
        &storage
            .simple_download(&format!("{key}.json"))
            .await
            .unwrap(),
    )
    .unwrap()
}

async fn hundred_updates(store: &Store<String, Doc>) {
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .update("hot".into(), true, |mut d| {
                        d.insert(format!("e{i:03}"), i);
                        Ok((d, true))
                    })
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_queued_updates_make_few_uploads_and_keep_every_effect() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = store(slow_memory(&inner, 1), true);
    hundred_updates(&s).await;
    assert_eq!(stored(&inner, "hot").await.len(), 100);
    let uploads = s.stats().uploads;
    assert!(uploads <= 10, "{uploads} uploads for 100 updates");
    assert_eq!(s.locked_keys(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_batching_every_update_uploads() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = store(slow_memory(&inner, 1), false);
    hundred_updates(&s).await;
    assert_eq!(stored(&inner, "hot").await.len(), 100);
    assert_eq!(s.stats().uploads, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_f_is_left_out_without_sinking_the_others() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = store(slow_memory(&inner, 2), true);
    let tasks: Vec<_> = (0..40u64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seen = 0;
                let res = s
                    .update("k".into(), true, |mut d| {
                        seen = d.len();
                        if i % 4 == 0 {
                            d.insert("poison".into(), i);
                            return Err(Error::invalid_input(format!("rejected {i}")));
                        }
                        d.insert(format!("e{i:02}"), i);
                        Ok((d, true))
                    })
                    .await;
                (i, res, seen)
            })
        })
        .collect();
    for t in tasks {
        let (i, res, _) = t.await.unwrap();
        if i % 4 == 0 {
            let e = res.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert_eq!(
                e.to_string(),
                format!("rejected {i}"),
                "the error comes back unchanged"
            );
        } else {
            res.unwrap();
        }
    }
    let doc = stored(&inner, "k").await;
    assert_eq!(doc.len(), 30);
    assert!(!doc.contains_key("poison"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_rerun_the_whole_batch_on_the_fresh_value() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    // Two replicas, one of them also seeing spurious conflicts.
    let faulty = Arc::new(
        FaultyStorage::new(Arc::clone(&inner), 3)
            .latency(Duration::from_millis(1))
            .conflicts(0.3),
    );
    let a = store(Arc::clone(&faulty) as Arc<dyn Storage>, true);
    let b = store(slow_memory(&inner, 4), true);
    // Waves until a's batches met an injected conflict and were re-run:
    // batches (and optimistic writes) keep the number of uploads small.
    let mut waves = 0;
    while waves < 20 && (faulty.faults().conflicts == 0 || a.stats().retries == 0) {
        let mut tasks = Vec::new();
        for (r, s) in [a.clone(), b.clone()].into_iter().enumerate() {
            for i in 0..60 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    for round in 0..3 {
                        s.update("k".into(), true, |mut d| {
                            *d.entry(format!("w{waves}-r{r}-{i}-{round}")).or_default() += 1;
                            Ok((d, true))
                        })
                        .await?;
                    }
                    Ok::<_, Error>(())
                }));
            }
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        waves += 1;
    }
    let doc = stored(&inner, "k").await;
    assert_eq!(doc.len(), 360 * waves, "every effect is there");
    assert!(doc.values().all(|&n| n == 1), "and only once");
    assert!(faulty.faults().conflicts > 0);
    assert!(a.stats().conflicts >= faulty.faults().conflicts);
    assert!(a.stats().retries > 0, "conflicting batches were re-run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_members_see_committed_data() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = store(slow_memory(&inner, 5), true);
    s.update("k".into(), true, |mut d| {
        d.insert("base".into(), 1);
        Ok((d, true))
    })
    .await
    .unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut saw_base = false;
                s.update("k".into(), false, |mut d| {
                    saw_base = d.contains_key("base");
                    let write = i % 2 == 0;
                    if write {
                        d.insert(format!("w{i}"), 1);
                    }
                    Ok((d, write))
                })
                .await
                .unwrap();
                saw_base
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(stored(&inner, "k").await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_neither_block_nor_leak() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s = store(
        Arc::new(FaultyStorage::new(Arc::clone(&inner), 6).latency(Duration::from_millis(3))),
        true,
    );
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.update("k".into(), true, |mut d| {
                    d.insert(format!("e{i:02}"), 1);
                    Ok((d, true))
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for t in tasks.iter().step_by(3) {
        t.abort();
    }
    let mut ok = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(())) => ok.push(i),
            Ok(Err(e)) => assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}"),
            Err(join) => assert!(join.is_cancelled()),
        }
    }
    let doc = stored(&inner, "k").await;
    for i in &ok {
        assert!(
            doc.contains_key(&format!("e{i:02}")),
            "acknowledged e{i:02} lost"
        );
    }
    assert_eq!(s.locked_keys(), 0, "no lock-table entry left behind");
    // And the key still works.
    s.update("k".into(), false, |d| Ok((d, false)))
        .await
        .unwrap();
}

/// 4 tasks × `per_task` counter increments through a store over `inner`
/// with 20 % of uploads applied but answered `Unavailable`; returns
/// (acknowledged, unavailable, final count, injected).
async fn ambiguous_run(inner: Arc<dyn Storage>, per_task: usize) -> (u64, u64, u64, u64) {
    let faulty = Arc::new(
        FaultyStorage::new(Arc::clone(&inner), 9)
            .ambiguous(0.2)
            .latency(Duration::from_micros(200)),
    );
    let s: Store<String, u64> = Store::new(
        Options::new(Arc::clone(&faulty) as Arc<dyn Storage>, |k: &String| {
            format!("{k}.json")
        })
        .init(|| 0)
        .retries(10_000)
        .retry_policy(RetryPolicy::immediate()),
    );
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                let (mut ok, mut maybe) = (0u64, 0u64);
                for _ in 0..per_task {
                    match s.update("n".into(), true, |n| Ok((n + 1, true))).await {
                        Ok(()) => ok += 1,
                        Err(e) if e.kind() == ErrorKind::Unavailable => maybe += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                (ok, maybe)
            })
        })
        .collect();
    let (mut ok, mut maybe) = (0, 0);
    for t in tasks {
        let (o, m) = t.await.unwrap();
        ok += o;
        maybe += m;
    }
    let n: u64 = serde_json::from_slice(&inner.simple_download("n.json").await.unwrap()).unwrap();
    (ok, maybe, n, faulty.faults().ambiguous)
}

/// Memory stores write tokens: every lost reply is resolved, so the count
/// is exactly the number of increments reported successful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_are_resolved_exactly_with_write_tokens() {
    let (ok, maybe, n, injected) = ambiguous_run(Arc::new(MemoryStorage::new()), 500).await;
    assert!(injected > 50, "{injected} lost replies injected");
    assert_eq!(maybe, 0, "every lost reply was resolved");
    assert_eq!(ok, 2000);
    assert_eq!(n, ok, "exactly once: final {n}, ok {ok}");
}

/// Without write tokens (disk: content etags) a lost reply stays
/// `Unavailable`, and is applied at most once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_without_tokens_are_unavailable_and_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let disk: Arc<dyn Storage> = Arc::new(metadatacache::DiskStorage::open(dir.path()).unwrap());
    let (ok, maybe, n, _) = ambiguous_run(disk, 50).await;
    assert!(maybe > 0);
    assert!(
        n >= ok && n <= ok + maybe,
        "final {n}, ok {ok}, maybe {maybe}"
    );
}

/// Memory storage whose uploads wait at a gate: the test decides when they
/// proceed, and whether the next ones are refused (not applied).
#[derive(Debug)]
struct Gate {
    inner: MemoryStorage,
    open: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    fail_next: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Lets every upload through from now on.
    fn open(&self) {
        self.open
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
    }
}

#[async_trait::async_trait]
impl Storage for Gate {
    fn backend(&self) -> &'static str {
        "gate"
    }
    fn capabilities(&self) -> metadatacache::Capabilities {
        self.inner.capabilities()
    }
    async fn init(&self, name: &str) -> metadatacache::Result<()> {
        self.inner.init(name).await
    }
    async fn upload(
        &self,
        req: metadatacache::UploadRequest,
    ) -> metadatacache::Result<metadatacache::UploadResponse> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_add(1, SeqCst);
        let permit = self.open.acquire().await.unwrap();
        permit.forget();
        self.waiting.fetch_sub(1, SeqCst);
        if self
            .fail_next
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::new(ErrorKind::Other, "gate: refused").with_path(req.path));
        }
        self.inner.upload(req).await
    }
    async fn download(
        &self,
        req: metadatacache::DownloadRequest,
    ) -> metadatacache::Result<metadatacache::DownloadResponse> {
        self.inner.download(req).await
    }
    async fn delete_if_match(&self, path: &str, m: Option<&str>) -> metadatacache::Result<()> {
        self.inner.delete_if_match(path, m).await
    }
    async fn stat(&self, path: &str) -> metadatacache::Result<metadatacache::FileInfo> {
        self.inner.stat(path).await
    }
    async fn list_dir(&self, path: &str) -> metadatacache::Result<Vec<metadatacache::FileInfo>> {
        self.inner.list_dir(path).await
    }
    async fn make_dir_if_not_exist(&self, path: &str) -> metadatacache::Result<()> {
        self.inner.make_dir_if_not_exist(path).await
    }
}

/// Waits until `n` tasks hold or wait for `key`'s lock.
async fn until_users<V>(store: &Store<String, V>, n: usize)
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    while store.lock_users(&"k".to_string()) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Never a speed bound: only detects a task that waits for something that
/// will not happen before the test lets it.
const HANG: Duration = Duration::from_secs(20);

/// A store over a [`Gate`], with batches that revalidate first (no
/// optimistic writes).
fn gated() -> (Arc<Gate>, Store<String, Doc>) {
    gated_with(false)
}

fn gated_with(optimistic: bool) -> (Arc<Gate>, Store<String, Doc>) {
    let gate = Arc::new(Gate {
        inner: MemoryStorage::new(),
        open: tokio::sync::Semaphore::new(0),
        waiting: Default::default(),
        fail_next: Default::default(),
    });
    let store = Store::new(
        Options::new(Arc::clone(&gate) as Arc<dyn Storage>, |k: &String| {
            format!("{k}.json")
        })
        .init(Doc::new)
        .retries(1000)
        .optimistic_writes(optimistic),
    );
    (gate, store)
}

type Joined<T> = tokio::task::JoinHandle<Result<T, Error>>;

/// Over a gated store (optimistic writes on or off), with the document in
/// place: a writer (adding "x") and then a read-only reader (recording
/// whether each value it is handed has "x") queue behind a held lock; the
/// next upload is set to be refused and the lock released. The gate is
/// closed: the batch's write waits at it.
async fn writer_then_reader(optimistic: bool) -> (Arc<Gate>, Joined<()>, Joined<Vec<bool>>) {
    let (gate, s) = gated_with(optimistic);
    gate.open.add_permits(1);
    s.update("k".into(), true, |d| Ok((d, true))).await.unwrap();
    let g = s.lock("k".into()).await;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            s.update("k".into(), true, |mut d| {
                d.insert("x".into(), 1);
                Ok((d, true))
            })
            .await
        })
    };
    until_users(&s, 2).await;
    let reader = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut saw_x = Vec::new();
            s.update("k".into(), false, |d| {
                saw_x.push(d.contains_key("x"));
                Ok((d, false))
            })
            .await
            .map(|()| saw_x)
        })
    };
    until_users(&s, 3).await;
    gate.fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
    drop(g);
    (gate, writer, reader)
}

/// A read-only update queued behind a writer returns `Ok` at once — while
/// the batch's write is still in flight, and although that write is then
/// refused — having read the committed value, not the writer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_member_returns_ok_without_waiting_for_the_write() {
    let (gate, writer, reader) = writer_then_reader(false).await;
    let read = tokio::time::timeout(HANG, reader)
        .await
        .expect("the reader waited for the writer's write")
        .unwrap();
    assert_eq!(
        read.unwrap().last().copied(),
        Some(false),
        "the reader saw an uncommitted value"
    );
    // The gate is still closed: the write cannot have finished.
    while gate.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.open();
    let e = writer.await.unwrap().unwrap_err();
    assert_eq!(e.message(), "gate: refused");
}

/// In a batch written from the cached version (optimistic), a read-only
/// member's decision on that version stands only once the write lands, so
/// it waits for the write; when the write is refused it decides again on
/// what storage holds, and never gets the writer's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_member_of_an_optimistic_batch_waits_for_its_write() {
    let (gate, writer, reader) = writer_then_reader(true).await;
    while gate.waiting() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !reader.is_finished(),
        "the reader returned before the write that confirms its value"
    );
    gate.open();
    let e = writer.await.unwrap().unwrap_err();
    assert_eq!(e.message(), "gate: refused");
    let saw_x = tokio::time::timeout(HANG, reader)
        .await
        .expect("the reader hung")
        .unwrap()
        .unwrap();
    // The writer's value, the cached one (provisional); then leading on its
    // own, the cached one again and, confirmed by a revalidation, the
    // stored one.
    assert_eq!(saw_x, [true, false, false, false]);
}

/// A read-only leader returns at once too: the writers queued behind it
/// lead their own batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_leader_does_not_wait_for_the_writers_behind_it() {
    let (gate, s) = gated();
    gate.open.add_permits(1);
    s.update("k".into(), true, |d| Ok((d, true))).await.unwrap();
    let g = s.lock("k".into()).await;
    let reader = {
        let s = s.clone();
        tokio::spawn(async move { s.update("k".into(), false, |d| Ok((d, false))).await })
    };
    until_users(&s, 2).await;
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.update("k".into(), false, move |mut d| {
                    d.insert(format!("w{i}"), i);
                    Ok((d, true))
                })
                .await
            })
        })
        .collect();
    until_users(&s, 5).await;
    drop(g);
    tokio::time::timeout(HANG, reader)
        .await
        .expect("the read-only leader waited for the writers")
        .unwrap()
        .unwrap();
    gate.open();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(stored(&(gate as Arc<dyn Storage>), "k").await.len(), 3);
}

/// An `f` that fails on a value an earlier member changed (not committed
/// yet) runs again on the committed value: its error must come from
/// committed state. Here the earlier member's write fails, so "x exists"
/// would have been a lie; the update runs on and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_on_an_uncommitted_value_is_decided_again_on_the_committed_one() {
    let (gate, s) = gated();
    gate.open.add_permits(1);
    s.update("k".into(), true, |d| Ok((d, true))).await.unwrap();
    let g = s.lock("k".into()).await;
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            s.update("k".into(), true, |mut d| {
                d.insert("x".into(), 1);
                Ok((d, true))
            })
            .await
        })
    };
    until_users(&s, 2).await;
    let checker = {
        let s = s.clone();
        tokio::spawn(async move {
            s.update("k".into(), true, |mut d| {
                if d.contains_key("x") {
                    return Err(Error::new(ErrorKind::Other, "x exists"));
                }
                d.insert("y".into(), 1);
                Ok((d, true))
            })
            .await
        })
    };
    until_users(&s, 3).await;
    gate.fail_next.store(1, std::sync::atomic::Ordering::SeqCst);
    drop(g);
    gate.open();
    assert_eq!(
        writer.await.unwrap().unwrap_err().message(),
        "gate: refused"
    );
    checker
        .await
        .unwrap()
        .expect("the error came from a value that was never committed");
    let doc = stored(&(gate as Arc<dyn Storage>), "k").await;
    assert_eq!(doc, Doc::from([("y".into(), 1)]));
}

/// A value that refuses to encode when it holds a negative number.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Bag(BTreeMap<String, i64>);

impl serde::Serialize for Bag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.values().any(|v| *v < 0) {
            return Err(serde::ser::Error::custom("negative values do not encode"));
        }
        self.0.serialize(s)
    }
}

/// In one batch, a member whose `f` fails and a member whose value cannot
/// be encoded get their own errors; every other member's update lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_error_never_fails_another() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let s: Store<String, Bag> = Store::new(
        Options::new(Arc::clone(&inner), |k: &String| format!("{k}.json"))
            .init(Bag::default)
            .retries(1000),
    );
    let g = s.lock("k".into()).await;
    let mut tasks = Vec::new();
    for (i, action) in ["a", "fail", "b", "bad", "c"].into_iter().enumerate() {
        let store = s.clone();
        tasks.push(tokio::spawn(async move {
            store
                .update("k".into(), true, move |mut bag| match action {
                    "fail" => Err(Error::new(ErrorKind::Other, "mine")),
                    "bad" => {
                        bag.0.insert("bad".into(), -1);
                        Ok((bag, true))
                    }
                    name => {
                        bag.0.insert(name.into(), 1);
                        Ok((bag, true))
                    }
                })
                .await
        }));
        until_users(&s, i + 2).await;
    }
    drop(g);
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(
        results[0].is_ok() && results[2].is_ok() && results[4].is_ok(),
        "{results:?}"
    );
    let e = results[1].as_ref().unwrap_err();
    assert_eq!((e.kind(), e.message()), (ErrorKind::Other, "mine"));
    assert_eq!(results[3].as_ref().unwrap_err().kind(), ErrorKind::Codec);
    let bag: BTreeMap<String, i64> =
        serde_json::from_slice(&inner.simple_download("k.json").await.unwrap()).unwrap();
    assert_eq!(bag.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(s.locked_keys(), 0);
}

/// A member cancelled while the batch's value is on its way to it (the
/// members hand it on to each other) drops the value with it: the leader
/// runs its own update again, alone, and the members after the cancelled
/// one queue again. Every update not cancelled lands exactly once, the
/// cancelled one not at all. On one thread the order is fixed: the
/// leader's `f` wakes the task that cancels the first member, just before
/// the leader hands that member the value.
#[tokio::test(flavor = "current_thread")]
async fn a_member_cancelled_with_the_batch_in_hand_loses_nothing() {
    let (gate, s) = gated();
    gate.open.add_permits(1000);
    s.update("k".into(), true, |d| Ok((d, true))).await.unwrap();
    let add =
        |s: &Store<String, Doc>, name: &'static str, wake: Option<Arc<tokio::sync::Notify>>| {
            let s = s.clone();
            tokio::spawn(async move {
                s.update("k".into(), false, move |mut d| {
                    if let Some(wake) = &wake {
                        wake.notify_one();
                    }
                    *d.entry(name.into()).or_default() += 1;
                    Ok((d, true))
                })
                .await
            })
        };
    let g = s.lock("k".into()).await;
    let cancel = Arc::new(tokio::sync::Notify::new());
    let leader = add(&s, "leader", Some(Arc::clone(&cancel)));
    until_users(&s, 2).await;
    let victim = add(&s, "victim", None);
    until_users(&s, 3).await;
    let other = add(&s, "other", None);
    until_users(&s, 4).await;
    let killer = {
        let victim = victim.abort_handle();
        tokio::spawn(async move {
            cancel.notified().await;
            victim.abort();
        })
    };
    drop(g);
    tokio::time::timeout(HANG, leader)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(HANG, other)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    killer.await.unwrap();
    assert!(victim.await.unwrap_err().is_cancelled());
    let doc = stored(&(Arc::clone(&gate) as Arc<dyn Storage>), "k").await;
    assert_eq!(
        doc,
        Doc::from([("leader".into(), 1), ("other".into(), 1)]),
        "{:?}",
        s.stats()
    );
}

/// Every write conflicts: an update queued behind a leader gives up with
/// it, after at most `retries` runs of its `f`, instead of starting its
/// count again behind the next leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_updates_give_up_within_their_attempts() {
    let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let faulty: Arc<dyn Storage> = Arc::new(
        FaultyStorage::new(inner, 3)
            .conflicts(1.0)
            .latency(Duration::from_millis(1)),
    );
    let s: Store<String, Doc> = Store::new(
        Options::new(faulty, |k: &String| format!("{k}.json"))
            .init(Doc::new)
            .retries(3)
            .retry_policy(RetryPolicy::immediate()),
    );
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut runs = 0;
                let res = s
                    .update("hot".into(), true, |mut d| {
                        runs += 1;
                        d.insert(format!("e{i}"), i);
                        Ok((d, true))
                    })
                    .await;
                (runs, res)
            })
        })
        .collect();
    for t in tasks {
        let (runs, res) = t.await.unwrap();
        let e = res.expect_err("a write went through a storage that refuses all");
        assert!(e.is_conflict() && e.to_string().contains("gave up"), "{e}");
        assert!(runs <= 3, "f ran {runs} times with retries(3): {e}");
    }
    assert!(s.stats().give_ups >= 1);
}

//! Schedule exploration with shuttle of the code that ships: the real
//! `metadatacache::Store` (lock table, group commit, etag compare-and-swap,
//! lost-reply settling) runs under shuttle's executor, and shuttle's random
//! and PCT schedulers pick the interleavings. No model, no library change.
//!
//! Why it can run here: the store's only synchronisation is tokio's `sync`
//! primitives (`Mutex`, `mpsc`, `oneshot`; `select!` with `biased`), which
//! need no runtime (they only use wakers), and `std::sync::Mutex` sections
//! that never span an await. The two things that do need tokio's runtime
//! are avoided: `tokio::time::sleep` (the store sleeps only for a nonzero
//! backoff; these stores use `RetryPolicy::immediate()`) and `tokio::spawn`
//! (only in `FaultyStorage`; [`Sched`] replaces it here).
//!
//! [`Sched`] is a test `Storage` over a `MemoryStorage`, declaring its
//! capabilities (unique etags, write tokens: the store settles a lost reply
//! by resending the same write). It yields to shuttle before and after each
//! call, so a storage round trip is where other tasks run and where a
//! cancelled caller may stop. It injects faults drawn from shuttle's RNG (so
//! they replay with the schedule): a spurious `Aborted` conflict; a lost
//! reply (applied, answered `Unavailable`); a delayed apply (answered
//! `Unavailable` at once, applied later by a spawned shuttle task, racing
//! the store's resend); or every upload refused, unapplied, `Unavailable`.
//!
//! Checked on every schedule, with a document that records *which* updates
//! were applied and how often: the promise of an `update` result (`Ok` =
//! exactly once, `Unavailable` or cancelled = at most once, other errors =
//! never); a read that starts after an `Ok` sees it, on any replica; with
//! one store and no late writes, every lost reply settled into `Ok`;
//! group-commit outcomes (read-only and failing members decide on committed
//! data, members that changed the value share the write's outcome, no one
//! gets another member's error); updates cancelled while queued, leading or
//! writing; `remove` racing creating updates on two stores; an empty lock
//! table at the end.
//!
//! Limits. Shuttle switches tasks only at yield points *between* polls: the
//! real code has none inside a poll (tokio's and std's primitives are not
//! shuttle's), so races that need another thread to act in the middle of
//! one poll are out of reach. The one such race src/batch.rs guards against
//! (a leader sends a waiter's `Done` and unlocks between the waiter's poll
//! of its channel and of the lock; hence the `try_recv` after winning the
//! lock) cannot happen here, and removing that guard is not caught. Not
//! explored either: backoff and deadlines (real time), `max_staleness`,
//! capacity, codec failures, `watch`, several keys, other backends.
//! `Instant::now()` is real time: coalescing follows the order shuttle runs
//! tasks in, but a failing schedule may replay differently if two readings
//! tie.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use metadatacache::{
    Capabilities, DownloadRequest, DownloadResponse, Error, ErrorKind, FileInfo, MemoryStorage,
    Options, Result, RetryPolicy, Storage, Store, UploadRequest, UploadResponse,
};
use shuttle::future::{JoinHandle, block_on, spawn, yield_now};
use shuttle::rand::{Rng, thread_rng};

/// Schedules per scheduler, and the PCT depth.
const RANDOM_ITERATIONS: usize = 500;
const PCT_ITERATIONS: usize = 500;
const PCT_DEPTH: usize = 3;

const KEY: &str = "k";

fn explore(scenario: impl Fn() + Send + Sync + 'static) {
    let scenario = Arc::new(scenario);
    let again = Arc::clone(&scenario);
    shuttle::check_random(move || scenario(), RANDOM_ITERATIONS);
    shuttle::check_pct(move || again(), PCT_ITERATIONS, PCT_DEPTH);
}

fn chance(percent: u32) -> bool {
    percent > 0 && thread_rng().gen_range(0..100) < percent
}

// ---------------------------------------------------------------------------
// The storage: MemoryStorage with shuttle yield points and faults

/// Percent of uploads hit by each fault (conflicts also hit deletes).
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    conflict: u32,
    lost: u32,
    delayed: u32,
}

const fn faults(conflict: u32, lost: u32, delayed: u32) -> Faults {
    Faults {
        conflict,
        lost,
        delayed,
    }
}

#[derive(Debug, Default)]
struct Log {
    /// Writes that will land later.
    late: Mutex<Vec<JoinHandle<()>>>,
    /// Every content that landed, in order.
    versions: Mutex<Vec<Bytes>>,
    /// What each successful delete removed.
    deleted: Mutex<Vec<Bytes>>,
}

#[derive(Debug)]
struct Sched {
    inner: MemoryStorage,
    faults: Faults,
    /// Every upload answers `Unavailable` without being applied.
    refuse_writes: AtomicBool,
    log: Arc<Log>,
}

impl Sched {
    fn new(faults: Faults) -> Arc<Self> {
        Arc::new(Sched {
            inner: MemoryStorage::new(),
            faults,
            refuse_writes: AtomicBool::new(false),
            log: Arc::default(),
        })
    }

    /// Waits until every delayed write has landed or been refused.
    async fn drain_late(&self) {
        loop {
            let late: Vec<_> = std::mem::take(&mut *self.log.late.lock().unwrap());
            if late.is_empty() {
                return;
            }
            for t in late {
                t.await.unwrap();
            }
        }
    }

    /// The stored document, decoded.
    async fn stored<V: serde::de::DeserializeOwned>(&self) -> Option<V> {
        let path = format!("{KEY}.json");
        let d = self.inner.download(DownloadRequest::new(path)).await.ok()?;
        Some(serde_json::from_slice(&d.content).unwrap())
    }
}

async fn apply(inner: &MemoryStorage, log: &Log, req: UploadRequest) -> Result<UploadResponse> {
    let content = req.content.clone();
    let res = inner.upload(req).await;
    if res.is_ok() {
        log.versions.lock().unwrap().push(content);
    }
    res
}

#[async_trait]
impl Storage for Sched {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn init(&self, name: &str) -> Result<()> {
        self.inner.init(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        yield_now().await;
        let res = if self.refuse_writes.load(Ordering::SeqCst) {
            Err(Error::new(ErrorKind::Unavailable, "refused, not applied"))
        } else if chance(self.faults.conflict) {
            Err(Error::new(ErrorKind::Aborted, "spurious conflict"))
        } else if chance(self.faults.delayed) {
            let (inner, log) = (self.inner.clone(), Arc::clone(&self.log));
            let yields = thread_rng().gen_range(0..8);
            let late = spawn(async move {
                for _ in 0..yields {
                    yield_now().await;
                }
                let _ = apply(&inner, &log, req).await;
            });
            self.log.late.lock().unwrap().push(late);
            Err(Error::new(
                ErrorKind::Unavailable,
                "timed out; still on its way",
            ))
        } else if chance(self.faults.lost) {
            let _ = apply(&self.inner, &self.log, req).await;
            Err(Error::new(ErrorKind::Unavailable, "reply lost"))
        } else {
            apply(&self.inner, &self.log, req).await
        };
        yield_now().await;
        res
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        yield_now().await;
        let res = self.inner.download(req).await;
        yield_now().await;
        res
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        yield_now().await;
        let res = if chance(self.faults.conflict) {
            Err(Error::new(ErrorKind::Aborted, "spurious conflict"))
        } else {
            // No await in between: atomic at shuttle's granularity.
            let before = self.inner.download(DownloadRequest::new(path)).await;
            let res = self.inner.delete_if_match(path, if_match).await;
            if res.is_ok() {
                self.log
                    .deleted
                    .lock()
                    .unwrap()
                    .push(before.unwrap().content);
            }
            res
        };
        yield_now().await;
        res
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        self.inner.stat(path).await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.inner.list_dir(path).await
    }

    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        self.inner.make_dir_if_not_exist(path).await
    }
}

fn store<V>(storage: &Arc<Sched>, batching: bool, init: fn() -> V) -> Store<String, V>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let storage: Arc<dyn Storage> = Arc::clone(storage) as _;
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(init)
            .retry_policy(RetryPolicy::immediate())
            .batching(batching),
    )
}

/// Runs `fut`, or drops it half-way when a task woken at a moment the
/// scheduler picks says so (like a timeout or a cancelled request).
async fn cancellable<T>(fut: impl Future<Output = T>) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let yields = thread_rng().gen_range(0..10);
    // Detached: it ends on its own.
    drop(spawn(async move {
        for _ in 0..yields {
            yield_now().await;
        }
        let _ = tx.send(());
    }));
    tokio::select! {
        biased;
        res = fut => Some(res),
        _ = rx => None,
    }
}

// ---------------------------------------------------------------------------
// Counters: which updates were applied, and how often

/// Update id → how many times it was applied.
type Counts = BTreeMap<u32, u32>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Unavailable,
    Cancelled,
    Failed(ErrorKind),
}

fn outcome(res: Option<Result<()>>) -> Outcome {
    match res {
        None => Outcome::Cancelled,
        Some(Ok(())) => Outcome::Ok,
        Some(Err(e)) if e.kind() == ErrorKind::Unavailable => Outcome::Unavailable,
        Some(Err(e)) => Outcome::Failed(e.kind()),
    }
}

/// The promise of an `update` result: `Ok` = applied exactly once,
/// `Unavailable` or cancelled = at most once, any other error = never.
fn check_promise(stored: &Counts, outcomes: &BTreeMap<u32, Outcome>) {
    for (id, &n) in stored {
        assert_eq!(n, 1, "update {id} applied {n} times");
        let o = outcomes[id];
        assert!(
            matches!(o, Outcome::Ok | Outcome::Unavailable | Outcome::Cancelled),
            "update {id} applied but answered {o:?}"
        );
    }
    for (id, o) in outcomes {
        if *o == Outcome::Ok {
            assert!(
                stored.contains_key(id),
                "update {id} answered Ok, not applied"
            );
        }
    }
    let count = |want: fn(&Outcome) -> bool| outcomes.values().filter(|o| want(o)).count();
    let ok = count(|o| *o == Outcome::Ok);
    let maybe = count(|o| matches!(o, Outcome::Unavailable | Outcome::Cancelled));
    assert!(ok <= stored.len() && stored.len() <= ok + maybe);
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    batching: bool,
    faults: Faults,
    /// Stores (replicas) sharing the storage; tasks are spread over them.
    stores: usize,
    /// Each update may be dropped half-way.
    cancel: bool,
}

const TASKS: u32 = 3;
const PER_TASK: u32 = 2;

/// `TASKS` tasks × `PER_TASK` increments, each of its own id.
fn counter(c: Counter) {
    // One store holds the key's lock while it settles a lost reply, so
    // nothing can move the etag between its write and its resend or
    // read-back: without late writes or cancellation, every update must
    // answer Ok.
    let all_ok = c.stores == 1 && c.faults.delayed == 0 && !c.cancel;
    block_on(async move {
        let storage = Sched::new(c.faults);
        let stores: Vec<_> = (0..c.stores)
            .map(|_| store(&storage, c.batching, Counts::new))
            .collect();
        // Task t updates through store t and reads through store t + 1.
        let stores: Vec<_> = (0..=TASKS as usize)
            .map(|t| stores[t % c.stores].clone())
            .collect();
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (s, reader) = (stores[t as usize].clone(), stores[t as usize + 1].clone());
                spawn(async move {
                    let mut out = Vec::new();
                    for i in 0..PER_TASK {
                        let id = t * PER_TASK + i;
                        let update = s.update(KEY.into(), true, move |mut m: Counts| {
                            *m.entry(id).or_default() += 1;
                            Ok((m, true))
                        });
                        let res = if c.cancel && chance(50) {
                            cancellable(update).await
                        } else {
                            Some(update.await)
                        };
                        let o = outcome(res);
                        out.push((id, o));
                        if o == Outcome::Ok {
                            // A read that starts after the Ok sees it, on
                            // any replica, whatever it coalesces with.
                            let seen = if chance(50) {
                                let m = reader.get(KEY.into()).await.unwrap().unwrap();
                                m.contains_key(&id)
                            } else {
                                let mut seen = false;
                                let f = |m: Counts| {
                                    seen = m.contains_key(&id);
                                    Ok((m, false))
                                };
                                reader.update(KEY.into(), false, f).await.unwrap();
                                seen
                            };
                            assert!(seen, "a read after update {id} returned Ok missed it");
                        }
                    }
                    out
                })
            })
            .collect();
        let mut outcomes = BTreeMap::new();
        for t in tasks {
            outcomes.extend(t.await.unwrap());
        }
        storage.drain_late().await;
        let stored: Counts = storage.stored().await.unwrap_or_default();
        check_promise(&stored, &outcomes);
        for s in &stores {
            assert_eq!(s.locked_keys(), 0, "lock-table entry left behind");
        }
        if all_ok {
            assert!(outcomes.values().all(|o| *o == Outcome::Ok), "{outcomes:?}");
            assert_eq!(stored.len() as u32, TASKS * PER_TASK);
            for s in &stores {
                let st = s.stats();
                assert_eq!(st.lost_replies, st.lost_replies_settled, "{st:?}");
            }
        }
        // The key still works after whatever happened.
        let s = &stores[0];
        s.update(KEY.into(), true, |m| Ok((m, false)))
            .await
            .unwrap();
        assert_eq!(s.locked_keys(), 0);
    });
}

/// Explores `c` with batching on and off.
fn counters(faults: Faults, stores: usize, cancel: bool) {
    for batching in [true, false] {
        let c = Counter {
            batching,
            faults,
            stores,
            cancel,
        };
        explore(move || counter(c));
    }
}

/// (1) Increments with spurious conflicts: every one is `Ok`, applied once.
#[test]
fn increments_with_conflicts() {
    counters(faults(30, 0, 0), 1, false);
}

/// (2a) Lost replies (applied, answered `Unavailable`) with one store: each
/// is settled into `Ok`, exactly once.
#[test]
fn lost_replies_are_all_settled_by_one_store() {
    counters(faults(10, 30, 0), 1, false);
}

/// (2b) Lost replies, delayed applies and conflicts on two stores sharing
/// the storage: a write may land after its `Unavailable`, and another
/// replica may write between a lost write and its read-back, so only the
/// promise holds: `ok ≤ final ≤ ok + unavailable`, each update at most once.
#[test]
fn lost_and_late_writes_keep_the_promise() {
    counters(faults(10, 20, 20), 2, false);
}

/// (4) Updates dropped at a scheduler-chosen moment (queued, leading a batch,
/// writing, settling a lost reply): no lock-table entry is left behind, no
/// update is applied twice, `Ok` ones exactly once.
#[test]
fn cancelled_updates_leave_no_trace() {
    counters(faults(10, 20, 0), 1, true);
}

// ---------------------------------------------------------------------------
// (3) Group-commit outcomes

type Set = BTreeSet<String>;

/// The closure of group-commit member `who`: `w` adds "w"; `r` reads only
/// (and records what it saw); `f` always fails; the others add "x" unless it
/// is there, and fail with "exists" if it is. An error names its member.
fn member(
    who: &'static str,
    seen: Arc<Mutex<Option<Set>>>,
) -> impl FnMut(Set) -> Result<(Set, bool)> {
    let own = move |kind| Err(Error::new(kind, format!("{who}: own error")));
    move |mut v: Set| match who {
        "w" => {
            v.insert("w".into());
            Ok((v, true))
        }
        "r" => {
            *seen.lock().unwrap() = Some(v.clone());
            Ok((v, false))
        }
        "f" => own(ErrorKind::PermissionDenied),
        _ if v.contains("x") => own(ErrorKind::InvalidInput),
        _ => {
            v.insert("x".into());
            Ok((v, true))
        }
    }
}

/// One task holds the key's lock while five updates queue behind it
/// (`w`, `r`, `a1`, `a2`, `f`), then lets go; `b` on a second store adds
/// "x" too, racing the batches. Uploads meet 30 % spurious conflicts, or
/// with `refuse` all answer `Unavailable` and nothing is ever written.
fn group_commit(refuse: bool) {
    block_on(async move {
        let storage = Sched::new(faults(30, 0, 0));
        let s = store(&storage, true, Set::new);
        let s2 = store(&storage, true, Set::new);
        s.update(KEY.into(), true, |mut v: Set| {
            v.insert("init".into());
            Ok((v, true))
        })
        .await
        .unwrap();
        storage.refuse_writes.store(refuse, Ordering::SeqCst);
        let seen_by_r = Arc::new(Mutex::new(None));
        let run = |s: &Store<String, Set>, who| {
            let (s, f) = (s.clone(), member(who, Arc::clone(&seen_by_r)));
            spawn(async move { (who, s.update(KEY.into(), false, f).await) })
        };
        let holder = s.lock(KEY.into()).await;
        let members = ["w", "r", "a1", "a2", "f"];
        let mut tasks: Vec<_> = members.into_iter().map(|who| run(&s, who)).collect();
        while s.lock_users(&KEY.to_string()) < 1 + members.len() {
            yield_now().await;
        }
        drop(holder);
        tasks.push(run(&s2, "b"));
        let mut res = BTreeMap::new();
        for t in tasks {
            let (who, r) = t.await.unwrap();
            res.insert(who, r);
        }
        let stored: Set = storage.stored().await.unwrap();
        let versions: Vec<Set> = (storage.log.versions.lock().unwrap().iter())
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();

        // No member gets another member's error.
        for (who, r) in &res {
            if let Err(e) = r
                && e.message().ends_with(": own error")
            {
                assert_eq!(e.message(), format!("{who}: own error"));
            }
        }
        let kind = |who: &str| res[who].as_ref().err().map(Error::kind);
        assert_eq!(kind("f"), Some(ErrorKind::PermissionDenied));
        // A read-only member returns Ok, also when the batch's write fails,
        // and decided on a value that storage held.
        assert!(res["r"].is_ok(), "{:?}", res["r"]);
        let seen = seen_by_r.lock().unwrap().clone().unwrap();
        assert!(
            versions.contains(&seen),
            "r decided on {seen:?}, never stored"
        );
        // A member that changed the value shares the write's outcome.
        let want = if refuse {
            Some(ErrorKind::Unavailable)
        } else {
            None
        };
        assert_eq!(kind("w"), want, "{:?}", res["w"]);
        // "exists" only when "x" was committed; exactly one adder adds it.
        let adders = ["a1", "a2", "b"].map(kind);
        let exists = adders
            .iter()
            .filter(|k| **k == Some(ErrorKind::InvalidInput));
        if refuse {
            assert_eq!(adders, [Some(ErrorKind::Unavailable); 3], "{res:?}");
            assert_eq!(stored, Set::from(["init".into()]));
        } else {
            assert_eq!(exists.count(), 2, "{res:?}");
            assert!(adders.contains(&None), "{res:?}");
            assert_eq!(stored, Set::from(["init", "w", "x"].map(String::from)));
        }
        assert_eq!(s.locked_keys() + s2.locked_keys(), 0);
    });
}

#[test]
fn group_commit_outcomes() {
    explore(|| group_commit(false));
}

#[test]
fn group_commit_outcomes_when_the_write_fails() {
    explore(|| group_commit(true));
}

// ---------------------------------------------------------------------------
// (5) remove racing creating updates

/// Two stores on one storage: three tasks each add their id with
/// `create_if_not_found`, a fourth removes the key twice; uploads meet
/// conflicts, lost replies and delayed applies. Each id is applied at most
/// once over the final document and the documents removes deleted, an `Ok`
/// one exactly once; `remove` says `true` once per document it deleted.
fn remove_race(batching: bool) {
    block_on(async move {
        let storage = Sched::new(faults(20, 20, 10));
        let a = store(&storage, batching, Counts::new);
        let b = store(&storage, batching, Counts::new);
        let updaters: Vec<_> = [&a, &a, &b]
            .into_iter()
            .zip(0u32..)
            .map(|(s, id)| {
                let s = s.clone();
                spawn(async move {
                    let res = s.update(KEY.into(), true, move |mut m: Counts| {
                        *m.entry(id).or_default() += 1;
                        Ok((m, true))
                    });
                    (id, outcome(Some(res.await)))
                })
            })
            .collect();
        let remover = {
            let b = b.clone();
            spawn(async move {
                let first = b.remove(KEY.into()).await.unwrap();
                let second = b.remove(KEY.into()).await.unwrap();
                usize::from(first) + usize::from(second)
            })
        };
        let mut outcomes = BTreeMap::new();
        for u in updaters {
            let (id, o) = u.await.unwrap();
            outcomes.insert(id, o);
        }
        let removed = remover.await.unwrap();
        storage.drain_late().await;
        let deleted: Vec<Counts> = (storage.log.deleted.lock().unwrap().iter())
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(removed, deleted.len(), "remove's answers vs deletes");
        let stored: Counts = storage.stored().await.unwrap_or_default();
        let mut everywhere = Counts::new();
        for doc in deleted.iter().chain([&stored]) {
            for (id, n) in doc {
                *everywhere.entry(*id).or_default() += n;
            }
        }
        check_promise(&everywhere, &outcomes);
        assert_eq!(a.locked_keys() + b.locked_keys(), 0);
        // Both caches agree with storage again.
        for s in [&a, &b] {
            let v = s.get(KEY.into()).await.unwrap();
            assert_eq!(v.as_deref(), storage.stored::<Counts>().await.as_ref());
        }
    });
}

#[test]
fn remove_racing_creating_updates() {
    for batching in [true, false] {
        explore(move || remove_race(batching));
    }
}

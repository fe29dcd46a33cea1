//! The counter cases of the suite: replicas racing on one counter, with
//! the server taken away mid-run, with writes that land late, and with
//! replies that are lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metadatacache::testing::FaultyStorage;
use metadatacache::{Error, ErrorKind, Options, RetryPolicy, Storage, Store};

use super::{TestServer, start, stop};
use crate::common::counter::{Faults, delayed_counter};
use crate::common::eventually;
use crate::common::servers::Server;

/// The counter of the tests: `counter.json`, an integer.
fn counter_store(storage: Arc<dyn Storage>) -> Store<String, u64> {
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(|| 0)
            .retries(10_000)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20))),
    )
}

/// Reads the counter of [`counter_store`], retrying while the server comes
/// back.
async fn read_counter(storage: &dyn Storage) -> u64 {
    let (bytes, _) = eventually("read the counter", || {
        storage.simple_download("counter.json")
    })
    .await;
    serde_json::from_slice(&bytes).unwrap()
}

/// 2 replicas (each with a storage of its own, as separate processes would
/// have) × 4 tasks × 50 increments of one counter: every increment lands
/// exactly once.
pub async fn counter_counts_exactly<S: TestServer>(server: &mut Server) {
    let (replicas, tasks, per_task) = (2, 4, 50);
    let mut handles = Vec::new();
    let mut stores = Vec::new();
    let started = Instant::now();
    for _ in 0..replicas {
        let store = counter_store(S::open(server, "race", None).await);
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
    let check = S::open(server, "race", None).await;
    let total = check.simple_download("counter.json").await.unwrap();
    eprintln!(
        "counter: {} after {:?}, {conflicts} conflicts",
        String::from_utf8_lossy(&total),
        started.elapsed()
    );
    assert_eq!(total, (replicas * tasks * per_task).to_string());
}

/// The counter of [`counter_counts_exactly`] with the server stopped for
/// 2 s mid-run. The tasks keep updating until 100 more updates were
/// acknowledged after the restart, so the outage hits them however fast
/// the server is. The stores must feel it (an update answered
/// `Unavailable`, or a read or write of theirs failed and was retried: a
/// write that was never sent is resent, not reported). Every update
/// answers `Ok` or `Unavailable`, and the final count lies between the
/// `Ok`s and the `Ok`s plus the `Unavailable`s: nothing lost, nothing
/// applied twice.
pub async fn counter_survives_restart<S: TestServer>(server: &mut Server) {
    const REPLICAS: usize = 2;
    const TASKS: usize = 4;
    assert!(server.keeps_data(), "a restart loses the counter");
    let acked = Arc::new(AtomicU64::new(0));
    let maybe = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..REPLICAS {
        let store = counter_store(S::open(server, "counter", Some(Duration::from_secs(1))).await);
        stores.push(store.clone());
        for _ in 0..TASKS {
            let (store, acked, maybe) = (store.clone(), Arc::clone(&acked), Arc::clone(&maybe));
            let (attempts, done) = (Arc::clone(&attempts), Arc::clone(&done));
            handles.push(tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    match store
                        .update("counter".to_owned(), true, |n| {
                            Ok::<_, Error>((n + 1, true))
                        })
                        .await
                    {
                        Ok(()) => acked.fetch_add(1, Ordering::SeqCst),
                        Err(e) if e.kind() == ErrorKind::Unavailable => {
                            // Back off so that the outage is not a busy loop.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            maybe.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(e) => panic!("update: {e}"),
                    };
                }
            }));
        }
    }
    let wait_for = |n: u64| {
        let acked = Arc::clone(&acked);
        async move {
            while acked.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Let the run get going, then take the server away for ~2 s.
    wait_for(100).await;
    let at_stop = acked.load(Ordering::SeqCst);
    stop(server);
    tokio::time::sleep(Duration::from_secs(2)).await;
    start(server);
    let at_start = acked.load(Ordering::SeqCst);
    wait_for(at_start + 100).await;
    done.store(true, Ordering::SeqCst);
    for h in handles {
        h.await.unwrap();
    }
    let total = read_counter(&*S::open(server, "counter", None).await).await;
    let (acked, maybe) = (acked.load(Ordering::SeqCst), maybe.load(Ordering::SeqCst));
    let felt: u64 = stores
        .iter()
        .map(|s| s.stats())
        .map(|s| s.read_retries + s.lost_replies)
        .sum();
    eprintln!(
        "counter: stopped after {at_stop} acks, restarted after {at_start}; \
         acknowledged {acked}, maybe {maybe}, retried reads and writes {felt}, final {total}"
    );
    assert_eq!(acked + maybe, attempts.load(Ordering::SeqCst));
    assert!(maybe + felt > 0, "the stores did not notice the outage");
    assert!(
        total >= acked,
        "lost updates: final {total} < acknowledged {acked}"
    );
    assert!(
        total <= acked + maybe,
        "applied twice: final {total} > acknowledged {acked} + maybe {maybe}"
    );
}

/// Writes that time out and still land later (`delayed_apply`) are never
/// applied twice: 1, 2 and 4 stores on one key space (the checks are
/// [`delayed_counter`]'s).
pub async fn late_landing_writes<S: TestServer>(server: &mut Server) {
    let storage = S::open(server, "late", None).await;
    for (stores, tasks) in [(1, 4), (2, 2), (4, 2)] {
        let path = format!("n-{stores}.json");
        let run = delayed_counter(
            Arc::clone(&storage),
            &path,
            stores,
            tasks,
            50,
            Faults::default(),
        )
        .await;
        eprintln!("{}, {stores} stores: {run:?}", S::BACKEND);
    }
}

/// On a backend with write tokens and unique etags, a write whose reply is
/// lost is looked up by its token: 4 tasks × 100 increments with 20 % lost
/// replies end at exactly the number acknowledged, and none stays
/// `Unavailable`.
pub async fn lost_replies_are_resolved_by_write_token<S: TestServer>(server: &mut Server) {
    let inner = S::open(server, "tokens", None).await;
    let caps = inner.capabilities();
    assert!(caps.write_tokens && caps.unique_etags, "{caps:?}");
    let faulty = Arc::new(FaultyStorage::new(Arc::clone(&inner), 5).ambiguous(0.2));
    let store: Store<String, u64> = Store::new(
        Options::new(Arc::clone(&faulty) as Arc<dyn Storage>, |k: &String| {
            format!("{k}.json")
        })
        .init(|| 0)
        .retries(10_000)
        .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
    );
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ok = 0u64;
                for _ in 0..100 {
                    store
                        .update("n".into(), true, |n| Ok((n + 1, true)))
                        .await
                        .unwrap();
                    ok += 1;
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    let n: u64 = serde_json::from_slice(&inner.simple_download("n.json").await.unwrap()).unwrap();
    assert!(faulty.faults().ambiguous > 10, "{:?}", faulty.faults());
    assert_eq!((ok, n), (400, 400));
}

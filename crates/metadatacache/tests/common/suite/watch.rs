//! The push-invalidation cases (`Options::watch`): a backend's change
//! stream against its real server, replicas as separate storage handles
//! (as separate processes would have), and the server restarted under
//! watched stores.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metadatacache::testing::history::{Initial, RecordingStorage, check};
use metadatacache::{Change, ErrorKind, Storage};

use super::{TestServer, start, stop};
use crate::common::servers::Server;
use crate::common::watching::{
    Counting, changed, count_through, increment, next_change, percentiles, serve_from_memory,
    until_change, until_in_sync, until_seen, watched_store,
};
use crate::common::{GUARD, eventually};

/// (a) A change made through another storage handle is reported on the
/// first handle's stream, with its path and new etag (none for a delete);
/// a stream below a prefix reports only what lies there. Prints how long
/// notifications took to arrive after the write returned.
pub async fn watch_reports_changes_of_another_handle<S: TestServer>(server: &mut Server) {
    let a = S::open(server, "watch", None).await;
    let b = S::open(server, "watch", None).await;
    assert!(a.capabilities().notifications);
    let mut all = a.watch("").await.unwrap();
    let mut below = a.watch("w").await.unwrap();
    assert_eq!(next_change(&mut all).await, Change::InSync);
    assert_eq!(next_change(&mut below).await, Change::InSync);

    let v1 = b.simple_upload("w/doc.json", "1".into()).await.unwrap();
    let v2 = b.simple_upload("w/doc.json", "2".into()).await.unwrap();
    let other = b.simple_upload("other.json", "x".into()).await.unwrap();
    b.delete("w/doc.json").await.unwrap();
    let want = [
        changed("w/doc.json", Some(&v1.etag)),
        changed("w/doc.json", Some(&v2.etag)),
        changed("other.json", Some(&other.etag)),
        changed("w/doc.json", None),
    ];
    for w in &want {
        assert_eq!(&next_change(&mut all).await, w);
    }
    for w in want.iter().filter(|c| c != &&want[2]) {
        assert_eq!(&next_change(&mut below).await, w, "the stream below \"w\"");
    }

    // How long after the write returned its notification arrived (not
    // asserted: a busy machine may be slow).
    let arrivals = tokio::spawn(async move {
        let mut at = HashMap::new();
        while at.len() < 100 {
            if let Change::Changed { etag: Some(e), .. } = next_change(&mut all).await {
                at.insert(e, Instant::now());
            }
        }
        at
    });
    let mut returned = Vec::new();
    for i in 0..100 {
        let v = b.simple_upload("lat.json", i.to_string().into()).await;
        returned.push((v.unwrap().etag, Instant::now()));
    }
    let arrived = tokio::time::timeout(GUARD, arrivals)
        .await
        .unwrap()
        .unwrap();
    let mut delays: Vec<Duration> = returned
        .iter()
        .map(|(etag, t)| arrived[etag].saturating_duration_since(*t))
        .collect();
    let (p50, p99) = percentiles(&mut delays);
    eprintln!(
        "{}: notification after the write returned: p50 {p50:?}, p99 {p99:?}",
        S::BACKEND
    );
}

/// (b) Two watched stores on two storage handles: once in sync, unchanged
/// reads and read-only updates make no storage call at all, and a write on
/// one replica is seen by the other.
pub async fn watched_stores_serve_from_memory<S: TestServer>(server: &mut Server) {
    serve_from_memory(
        S::open(server, "memo", None).await,
        S::open(server, "memo", None).await,
    )
    .await;
}

/// (c) The server stops and starts again under a change stream and two
/// watched stores: the stream reports a gap, then that it is in sync, then
/// changes again; a write made by replica B as soon as the server is back
/// (while A may still be reconnecting) is read by A; and A serves from
/// memory again once in sync.
pub async fn watch_survives_restart<S: TestServer>(server: &mut Server) {
    let timeout = Some(Duration::from_secs(1));
    let raw = S::open(server, "restart", timeout).await;
    let mut stream = raw.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let counting = Counting::new(S::open(server, "restart", timeout).await);
    let a = watched_store(Arc::clone(&counting) as Arc<dyn Storage>);
    let b = watched_store(S::open(server, "restart", timeout).await);
    increment(&b, "k").await;
    until_seen(&a, "k", 1).await;
    until_in_sync(&a, &counting, "k").await;

    stop(server);
    let skipped = until_gap(&mut stream).await;
    assert!(
        skipped.iter().all(|c| matches!(c, Change::Changed { .. })),
        "{skipped:?}"
    );
    let started = Instant::now();
    while a.stats().watch_gaps == 0 {
        assert!(started.elapsed() < GUARD, "the store saw no gap");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start(server);
    increment(&b, "k").await;
    let after_gap = until_change(&mut stream, &Change::InSync).await;
    assert!(
        after_gap.iter().all(|c| !matches!(c, Change::InSync)),
        "{after_gap:?}"
    );
    until_seen(&a, "k", 2).await;
    assert_eq!(until_in_sync(&a, &counting, "k").await, 2);
    // The stream reports changes again.
    let v = eventually("write after the restart", || {
        raw.simple_upload("after.json", "x".into())
    })
    .await
    .0;
    until_change(&mut stream, &changed("after.json", Some(&v.etag))).await;
    eprintln!(
        "{}: gaps seen by the stores: a {}, b {}",
        S::BACKEND,
        a.stats().watch_gaps,
        b.stats().watch_gaps
    );
}

/// Skips changes until a gap; returns what came before it.
async fn until_gap(stream: &mut metadatacache::ChangeStream) -> Vec<Change> {
    let mut skipped = Vec::new();
    loop {
        match next_change(stream).await {
            Change::Gap { reason } => {
                eprintln!("gap: {reason}");
                return skipped;
            }
            other => skipped.push(other),
        }
    }
}

/// Counter documents: each write adds at least one to its predecessor.
fn counter_follows(prev: Option<&str>, new: &str) -> bool {
    let n = |s: &str| s.trim().parse::<u64>().ok();
    match (prev, n(new)) {
        (None, Some(v)) => v >= 1,
        (Some(p), Some(v)) => n(p).is_some_and(|p| v > p),
        _ => false,
    }
}

/// (c) A short counter through watched stores (2 replicas × 2 tasks, each
/// store recording its storage calls) with the server restarted mid-run:
/// the recorded history has no violation (no lost update, no stale or
/// invented read), and afterwards every replica reads the final value.
pub async fn watched_history_across_restart<S: TestServer>(server: &mut Server) {
    const PER_TASK: usize = 40;
    let mut recorders = Vec::new();
    let mut stores = Vec::new();
    let mut tasks = Vec::new();
    let restarted = Arc::new(AtomicBool::new(false));
    for _ in 0..2 {
        let storage = S::open(server, "history", Some(Duration::from_secs(1))).await;
        let recorder = Arc::new(RecordingStorage::new(storage));
        recorders.push(Arc::clone(&recorder));
        let store = watched_store(recorder as Arc<dyn Storage>);
        stores.push(store.clone());
        for t in 0..2 {
            let (store, restarted) = (store.clone(), Arc::clone(&restarted));
            tasks.push(tokio::spawn(async move {
                let mut done = 0;
                // Half the increments before the restart, half after.
                while done < PER_TASK {
                    if done == PER_TASK / 2 && !restarted.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    match store.update("c".into(), true, |n| Ok((n + 1, true))).await {
                        Ok(()) => done += 1,
                        Err(e) if e.kind() == ErrorKind::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("update: {e}"),
                    }
                    if (done + t) % 3 == 0 {
                        let _ = store.get("c".into()).await;
                    }
                }
            }));
        }
    }
    // Restart while the tasks are still at it.
    let started = Instant::now();
    while stores.iter().map(|s| s.stats().uploads).sum::<u64>() < 20 {
        assert!(started.elapsed() < GUARD, "the counter does not move");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(server);
    tokio::time::sleep(Duration::from_millis(500)).await;
    start(server);
    restarted.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(GUARD * 2, t).await.unwrap().unwrap();
    }
    let events: Vec<_> = recorders.iter().flat_map(|r| r.events()).collect();
    let report = check(&events, &Initial::new(), counter_follows);
    let check_storage = S::open(server, "history", None).await;
    let total: u64 =
        serde_json::from_slice(&check_storage.simple_download("c.json").await.unwrap()).unwrap();
    eprintln!(
        "{}: final {total}; {} writes, {} reads, {} unknown; gaps {:?}",
        S::BACKEND,
        report.writes,
        report.reads,
        report.unknown_writes,
        stores
            .iter()
            .map(|s| s.stats().watch_gaps)
            .collect::<Vec<_>>()
    );
    assert_eq!(report.violations, Vec::<String>::new());
    assert!(total >= 4 * PER_TASK as u64, "final {total}");
    for store in &stores {
        until_seen(store, "c", total).await;
        assert!(store.stats().watch_gaps >= 1, "{:?}", store.stats());
    }
}

/// (d) Watched stores stay compare-and-swap: 2 replicas × 2 tasks × 100
/// increments end at exactly 400.
pub async fn watched_counter_counts_exactly<S: TestServer>(server: &mut Server) {
    let replicas = [
        watched_store(S::open(server, "watchrace", None).await),
        watched_store(S::open(server, "watchrace", None).await),
    ];
    count_through(&replicas).await;
    let check = S::open(server, "watchrace", None).await;
    let n = check.simple_download("n.json").await.unwrap();
    assert_eq!(n, "400");
    for r in &replicas {
        until_seen(r, "n", 400).await;
    }
}

//! The history checker: clean on correct storages, loud on a lying one.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use metadatacache::testing::FaultyStorage;
use metadatacache::testing::history::{Initial, RecordingStorage, check};
use metadatacache::{DiskStorage, MemoryStorage, Options, RetryPolicy, Storage, Store};

/// Counter documents: each write adds at least one to its predecessor (one
/// write may carry a batch of increments).
fn counter_follows(prev: Option<&str>, new: &str) -> bool {
    let n = |s: &str| s.trim().parse::<u64>().ok();
    match (prev, n(new)) {
        (None, Some(v)) => v >= 1,
        (Some(p), Some(v)) => n(p).is_some_and(|p| v > p),
        _ => false,
    }
}

/// `replicas` stores, each with its own recorder over `storage`, `tasks`
/// tasks each, incrementing `keys` counters; returns the merged history.
async fn run(
    storage: Arc<dyn Storage>,
    replicas: usize,
    tasks: usize,
    keys: usize,
    per_task: usize,
) -> Vec<metadatacache::testing::history::Event> {
    let mut recorders = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..replicas {
        let rec = Arc::new(RecordingStorage::new(Arc::clone(&storage)));
        recorders.push(Arc::clone(&rec));
        let store: Store<usize, u64> = Store::new(
            Options::new(rec as Arc<dyn Storage>, |k: &usize| format!("c/{k}"))
                .init(|| 0)
                .retries(10_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
        );
        for t in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(t as u64);
                for _ in 0..per_task {
                    let k = rng.usize(..keys);
                    store.update(k, true, |n| Ok((n + 1, true))).await.unwrap();
                    if rng.bool() {
                        store.get(k).await.unwrap();
                    }
                }
            }));
        }
    }
    for h in handles {
        h.await.unwrap();
    }
    recorders.iter().flat_map(|r| r.events()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_history_has_no_violations() {
    let events = run(Arc::new(MemoryStorage::new()), 3, 3, 3, 100).await;
    let report = check(&events, &Initial::new(), counter_follows);
    assert_eq!(report.violations, Vec::<String>::new());
    assert!(report.writes > 0 && report.reads > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_history_has_no_violations() {
    let dir = tempfile::tempdir().unwrap();
    let disk: Arc<dyn Storage> = Arc::new(DiskStorage::open(dir.path()).unwrap());
    let events = run(disk, 3, 3, 2, 60).await;
    let report = check(&events, &Initial::new(), counter_follows);
    assert_eq!(report.violations, Vec::<String>::new());
    assert!(report.writes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_with_non_atomic_if_match_is_caught() {
    let racy: Arc<dyn Storage> =
        Arc::new(FaultyStorage::new(Arc::new(MemoryStorage::new()), 1).racy_cas(true));
    let events = run(racy, 3, 3, 1, 60).await;
    let report = check(&events, &Initial::new(), counter_follows);
    assert!(
        report.violations.iter().any(|v| v.contains("lost update")),
        "{:?}",
        report.violations
    );
}

#[test]
fn a_stale_read_is_caught() {
    use metadatacache::testing::history::Event;
    let ev = |op: &str, pre: Option<&str>, etag: &str, outcome: &str, t0, t1| Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: Some(etag.into()),
        value: None,
        outcome: outcome.into(),
        t0,
        t1,
    };
    let events = vec![
        ev("w", None, "e1", "ok", 0, 10),
        ev("w", Some("e1"), "e2", "ok", 20, 30),
        // Began after e2 was acknowledged, yet saw e1.
        ev("r", None, "e1", "ok", 40, 50),
    ];
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    assert!(report.violations[0].contains("stale read"));
}

/// Two writes whose outcome was unknown both landed on one key: the chain
/// has two gaps, each explained by one of them, and the walk resumes past
/// each (a write already on the chain is not a place to resume from).
#[test]
fn two_landed_unknown_writes_are_two_gaps() {
    use metadatacache::testing::history::Event;
    let ev = |op: &str, pre: Option<&str>, etag: Option<&str>, outcome: &str, t0| Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: etag.map(Into::into),
        value: None,
        outcome: outcome.into(),
        t0,
        t1: t0 + 10,
    };
    let events = vec![
        ev("w", None, Some("e1"), "ok", 0),
        // Landed as e2, but the reply was lost.
        ev("w", Some("e1"), None, "unavailable", 20),
        ev("w", Some("e2"), Some("e3"), "ok", 40),
        // Landed as e4, reply lost.
        ev("w", Some("e3"), None, "unavailable", 60),
        ev("w", Some("e4"), Some("e5"), "ok", 80),
        ev("r", None, Some("e5"), "ok", 100),
    ];
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations, Vec::<String>::new());
}

/// A storage that hands out a version twice (a cycle in the chain) is
/// reported, also when reads saw that version (the checker once panicked
/// there).
#[test]
fn a_repeated_version_is_reported() {
    use metadatacache::testing::history::Event;
    let ev = |op: &str, pre: Option<&str>, etag: &str, t0| Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: Some(etag.into()),
        value: None,
        outcome: "ok".into(),
        t0,
        t1: t0 + 10,
    };
    let events = vec![
        ev("w", None, "e1", 0),
        ev("w", Some("e1"), "e2", 20),
        ev("w", Some("e2"), "e1", 40),
        ev("r", None, "e1", 60),
    ];
    let report = check(&events, &Initial::new(), |_, _| true);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("produced twice")),
        "{:?}",
        report.violations
    );
}

/// A write whose reply was lost landed, and the store settled it by its
/// write token: a read returned the version it made before the next write
/// built on it; another one landed last and only a read saw its version.
/// Each unknown write explains one such version; a version nothing explains
/// is still caught.
#[test]
fn versions_of_landed_unknown_writes_may_be_read() {
    use metadatacache::testing::history::Event;
    let ev = |op: &str, pre: Option<&str>, etag: Option<&str>, outcome: &str, t0| Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: etag.map(Into::into),
        value: None,
        outcome: outcome.into(),
        t0,
        t1: t0 + 10,
    };
    let mut events = vec![
        ev("w", None, Some("e1"), "ok", 0),
        ev("w", Some("e1"), None, "unavailable", 20),
        // The resend finds e2 (its own write) in place.
        ev("w", Some("e1"), None, "conflict", 40),
        ev("r", None, Some("e2"), "ok", 60),
        ev("w", Some("e2"), Some("e3"), "ok", 80),
        ev("w", Some("e3"), None, "unavailable", 100),
        ev("r", None, Some("e4"), "ok", 120),
        ev("r", None, Some("e4"), "ok", 140),
    ];
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations, Vec::<String>::new());
    events.push(ev("r", None, Some("e9"), "ok", 160));
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
}

/// A write whose outcome is unknown landed: reads of the version it made
/// are no violation, the chain goes on from it (once, no cycle), and a
/// read of it after a later write completed is still stale.
#[test]
fn a_landed_unknown_write_is_a_link_of_the_chain() {
    use metadatacache::testing::history::Event;
    let ev = |op: &str, pre: Option<&str>, etag: Option<&str>, outcome: &str, t0, t1| Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: etag.map(Into::into),
        value: None,
        outcome: outcome.into(),
        t0,
        t1,
    };
    let mut events = vec![
        ev("w", None, Some("e1"), "ok", 0, 10),
        // Landed as e2, but its caller heard nothing.
        ev("w", Some("e1"), None, "unavailable", 20, 30),
        ev("r", None, Some("e2"), "ok", 40, 50),
        ev("w", Some("e2"), Some("e3"), "ok", 60, 70),
        ev("r", None, Some("e3"), "ok", 80, 90),
    ];
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations, Vec::<String>::new());
    assert_eq!((report.writes, report.unknown_writes), (2, 1));
    events.push(ev("r", None, Some("e2"), "ok", 100, 110));
    let report = check(&events, &Initial::new(), |_, _| true);
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    assert!(report.violations[0].contains("stale read"));
}

/// An event on path `p` with a value (the counter it holds).
fn event(
    op: &str,
    pre: Option<&str>,
    etag: Option<&str>,
    value: &str,
    outcome: &str,
    (t0, t1): (u128, u128),
) -> metadatacache::testing::history::Event {
    metadatacache::testing::history::Event {
        op: op.into(),
        path: "p".into(),
        pre: pre.map(Into::into),
        create: pre.is_none() && op == "w",
        etag: etag.map(Into::into),
        value: Some(value.into()),
        outcome: outcome.into(),
        t0,
        t1,
    }
}

/// A version another read returned before a read began counts as
/// committed: a later read of an older one is stale, even while the write
/// that made the newer one has not answered yet.
#[test]
fn a_read_older_than_an_earlier_read_is_stale() {
    let initial = Initial::from([("p".to_owned(), Some(("e5".to_owned(), "5".to_owned())))]);
    let events = vec![
        event("w", Some("e5"), Some("e6"), "6", "ok", (100, 300)),
        event("r", None, Some("e6"), "6", "ok", (150, 160)),
        event("r", None, Some("e5"), "5", "ok", (200, 210)),
    ];
    let report = check(&events, &initial, counter_follows);
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    assert!(report.violations[0].contains("read before the read began"));
}

/// An update applied but answered as a conflict (so its store ran it
/// again, and it landed twice), next to an unrelated write whose outcome is
/// unknown: that write cannot explain the gap, since it began from another
/// version, after the second copy had landed.
#[test]
fn an_unknown_write_explains_only_a_gap_it_can_have_made() {
    let initial = Initial::from([("p".to_owned(), Some(("e5".to_owned(), "5".to_owned())))]);
    let events = vec![
        // Applied as e6, but answered as a conflict.
        event("w", Some("e5"), None, "6", "conflict", (0, 10)),
        event("w", Some("e6"), Some("e7"), "7", "ok", (20, 30)),
        event("w", Some("e7"), None, "8", "unavailable", (40, 50)),
    ];
    let report = check(&events, &initial, counter_follows);
    assert!(
        report.violations.iter().any(|v| v.contains("gap")),
        "{:?}",
        report.violations
    );
    // The same gap, made by the unknown write itself: explained.
    let events = vec![
        event("w", Some("e5"), None, "6", "unavailable", (0, 10)),
        event("w", Some("e6"), Some("e7"), "7", "ok", (20, 30)),
    ];
    let report = check(&events, &initial, counter_follows);
    assert_eq!(report.violations, Vec::<String>::new());
}

/// A read of a version no write made is caught even when a write's
/// outcome is unknown, unless that write can have made it: begun before the
/// read ended, with the value read.
#[test]
fn an_unknown_write_explains_only_a_version_it_can_have_made() {
    let initial = Initial::from([("p".to_owned(), Some(("e5".to_owned(), "5".to_owned())))]);
    let unknown = event("w", Some("e5"), None, "6", "unavailable", (100, 110));
    for (read, explained) in [
        // Older than anything of the run.
        (event("r", None, Some("e3"), "3", "ok", (200, 210)), false),
        // Ended before the unknown write began.
        (event("r", None, Some("e6"), "6", "ok", (50, 60)), false),
        (event("r", None, Some("e6"), "6", "ok", (200, 210)), true),
    ] {
        let report = check(&[unknown.clone(), read.clone()], &initial, counter_follows);
        assert_eq!(
            report.violations.is_empty(),
            explained,
            "{read:?}: {:?}",
            report.violations
        );
    }
}

/// History files: a torn last line (its process died writing it) is
/// skipped; any other line that is no event fails the reading, since a
/// history with records missing could hide a violation.
#[test]
fn history_files_with_a_bad_line_are_refused() {
    use metadatacache::testing::history::read_events;
    let dir = tempfile::tempdir().unwrap();
    let line = serde_json::to_string(&event("r", None, Some("e1"), "1", "ok", (0, 1))).unwrap();
    let torn = dir.path().join("torn.jsonl");
    std::fs::write(&torn, format!("{line}\n{line}\n{{\"op\": \"w")).unwrap();
    assert_eq!(read_events(&[&torn]).unwrap().len(), 2);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, format!("{line}\ngarbage\n{line}\n")).unwrap();
    let e = read_events(&[&bad]).unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}

/// Events that cannot be written (a full disk) are counted, so that their
/// history is not checked as if it were whole.
#[tokio::test]
async fn records_that_cannot_be_written_are_counted() {
    let full = std::path::Path::new("/dev/full");
    let recording = RecordingStorage::to_file(Arc::new(MemoryStorage::new()), full).unwrap();
    assert_eq!(recording.lost_records(), 0);
    recording.simple_upload("a.json", "1".into()).await.unwrap();
    recording.simple_download("a.json").await.unwrap();
    assert_eq!(recording.lost_records(), 2);
}

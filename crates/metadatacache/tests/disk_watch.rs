//! Change streams of the disk backend (inotify): changes made through
//! another storage handle on the same directory, or by another process,
//! are reported; watched stores serve from memory while nothing changes
//! and see the other replica's writes; and they stay compare-and-swap.
//!
//! The cross-process test re-executes this test binary: with
//! `MDCACHE_WATCH_CHILD_DIR` set, `child_writer` is the child's body;
//! without it, `child_writer` returns at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::watching::{
    Counting, changed, count_through, increment, next_change, percentiles, serve_from_memory,
    until_change, until_in_sync, until_seen, watched_store,
};
use metadatacache::{Change, DiskStorage, Storage};

fn open(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(DiskStorage::open(dir).unwrap())
}

/// Skips changes until `want`; every change skipped must be a document
/// among `expected` (a document may be reported twice: by the scan of its
/// new directory and by its own event), never a temp or internal file.
async fn until_change_among(
    stream: &mut metadatacache::ChangeStream,
    want: &Change,
    expected: &HashSet<String>,
) {
    for c in until_change(stream, want).await {
        match &c {
            Change::Changed { path, etag: None } if expected.contains(path) => {}
            other => panic!("unexpected {other:?} before {want:?}"),
        }
    }
}

/// (a) A write through another handle on the same directory is reported
/// with its path (the etag is unknown): also into directories created by
/// the same write, however deep, where the document lands before the new
/// directory's watch is added by the event that announced it. Deletes too;
/// temp files and the `.mdcache` folder never show; a stream below a
/// prefix sees only what lies there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_another_handle_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (open(dir.path()), open(dir.path()));
    assert!(a.capabilities().notifications);
    let mut all = a.watch("").await.unwrap();
    let mut below = a.watch("n0").await.unwrap();
    assert_eq!(next_change(&mut all).await, Change::InSync);
    assert_eq!(next_change(&mut below).await, Change::InSync);
    let mut expected = HashSet::new();
    for i in 0..20 {
        let path = format!("n{i}/deep/er/doc.json");
        expected.insert(path.clone());
        b.simple_upload(&path, "1".into()).await.unwrap();
        until_change_among(&mut all, &changed(&path, None), &expected).await;
    }
    until_change_among(&mut below, &changed("n0/deep/er/doc.json", None), &expected).await;
    b.simple_upload("top.json", "1".into()).await.unwrap();
    expected.insert("top.json".to_owned());
    until_change_among(&mut all, &changed("top.json", None), &expected).await;
    b.simple_upload("top.json", "2".into()).await.unwrap();
    until_change_among(&mut all, &changed("top.json", None), &expected).await;
    b.delete("n0/deep/er/doc.json").await.unwrap();
    until_change_among(&mut all, &changed("n0/deep/er/doc.json", None), &expected).await;
    until_change_among(&mut below, &changed("n0/deep/er/doc.json", None), &expected).await;

    // How long after the write returned its notification arrived (not
    // asserted: a busy machine may be slow).
    let mut delays = Vec::new();
    for i in 0..100 {
        b.simple_upload("lat.json", i.to_string().into())
            .await
            .unwrap();
        let returned = Instant::now();
        expected.insert("lat.json".to_owned());
        until_change_among(&mut all, &changed("lat.json", None), &expected).await;
        delays.push(returned.elapsed());
    }
    let (p50, p99) = percentiles(&mut delays);
    eprintln!("disk: notification after the write returned: p50 {p50:?}, p99 {p99:?}");
}

/// Another tool creates a directory and at once renames a document into
/// it, before the new directory's watch can stand: the document is still
/// reported (the new directory is scanned once watched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_renamed_into_a_brand_new_directory_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    let storage = open(dir.path());
    let mut stream = storage.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let mut expected = HashSet::new();
    for i in 0..50 {
        let path = format!("fresh{i}/a/b/doc.json");
        expected.insert(path.clone());
        let staged = outside.path().join(format!("doc{i}"));
        std::fs::write(&staged, "1").unwrap();
        let target = dir.path().join(&path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::rename(&staged, &target).unwrap();
        until_change_among(&mut stream, &changed(&path, None), &expected).await;
    }
}

/// (b) Two watched stores on two handles of one directory: unchanged reads
/// make no storage call, and each sees the other's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_stores_serve_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    serve_from_memory(open(dir.path()), open(dir.path())).await;
}

/// (d) 2 replicas × 2 tasks × 100 increments through watched stores end
/// at exactly 400, and both replicas read 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_replicas_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = [
        watched_store(open(dir.path())),
        watched_store(open(dir.path())),
    ];
    count_through(&replicas).await;
    let n = open(dir.path()).simple_download("n.json").await.unwrap();
    assert_eq!(n, "400");
    for r in &replicas {
        until_seen(r, "n", 400).await;
    }
}

// ---------------------------------------------------------------- processes

const CHILD_DIR: &str = "MDCACHE_WATCH_CHILD_DIR";
const WRITES: u64 = 10;

/// (e) Another process writes through its own storage on the directory:
/// this process's stream reports it, and its watched store reads the
/// child's last value without being told anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_another_process_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let storage = open(dir.path());
    let mut stream = storage.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let counting = Counting::new(Arc::clone(&storage));
    let store = watched_store(Arc::clone(&counting) as Arc<dyn Storage>);
    assert_eq!(store.get("proc/k".into()).await.unwrap(), None);
    let status = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR, dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .status()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "the child failed: {status}");
    let skipped = until_change(&mut stream, &changed("proc/k.json", None)).await;
    assert!(skipped.is_empty(), "{skipped:?}");
    until_seen(&store, "proc/k", WRITES).await;
    assert_eq!(until_in_sync(&store, &counting, "proc/k").await, WRITES);
}

/// The child process's body; a no-op in a normal test run.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = watched_store(open(&PathBuf::from(dir)));
        for _ in 0..WRITES {
            increment(&store, "proc/k").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

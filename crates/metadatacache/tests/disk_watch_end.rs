//! A disk change stream that is dropped releases its inotify instance even
//! while the tree stays busy with reads (opens, which report no change, so
//! the watch is never idle). Alone in its test binary: it counts the
//! process's inotify descriptors.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use metadatacache::{DiskStorage, Storage};

/// The inotify instances this process holds.
fn inotify_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("inotify"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_ends_its_watch_while_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DiskStorage::open(dir.path()).unwrap();
    storage.simple_upload("a.json", "1".into()).await.unwrap();
    let before = inotify_fds();
    let stream = storage.watch("").await.unwrap();
    assert_eq!(
        inotify_fds(),
        before + 1,
        "the watch holds no inotify instance"
    );
    drop(stream);
    // Reads all along; a hang detector, not a speed bound.
    let start = Instant::now();
    while inotify_fds() > before {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the watch of a dropped stream is still running"
        );
        storage.simple_download("a.json").await.unwrap();
    }
}

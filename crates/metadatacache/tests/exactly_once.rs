//! The update promise when replies are lost and writes land late:
//! `Ok` = applied exactly once, `Unavailable` = at most once, anything else
//! = not applied. Memory storage here; the same counter runs against etcd,
//! PostgreSQL and S3 (`common::suite`'s `late_landing_writes`).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use common::counter::{Faults, delayed_counter};
use metadatacache::{
    Capabilities, DownloadRequest, DownloadResponse, Error, ErrorKind, FileInfo, MemoryStorage,
    Options, RetryPolicy, Storage, Store, UploadRequest, UploadResponse,
};

fn memory() -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_late_writes_are_never_applied_twice() {
    let run = delayed_counter(memory(), "n.json", 1, 4, 100, Faults::default()).await;
    // Memory's etags never repeat: every lost reply is fenced by a resend
    // and settled, so nothing stays ambiguous.
    assert!(run.settled > 0, "{run:?}");
    eprintln!("1 store: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_late_writes_are_never_applied_twice() {
    let run = delayed_counter(memory(), "n.json", 2, 4, 100, Faults::default()).await;
    eprintln!("2 stores: {run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_stores_late_writes_are_never_applied_twice() {
    let run = delayed_counter(memory(), "n.json", 4, 2, 100, Faults::default()).await;
    eprintln!("4 stores: {run:?}");
}

/// Every upload delayed: each one is resent until a copy lands or the
/// etag moves; the counter still keeps the promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_late() {
    let faults = Faults {
        p: 1.0,
        ..Faults::default()
    };
    let run = delayed_counter(memory(), "n.json", 2, 2, 30, faults).await;
    eprintln!("all late: {run:?}");
}

/// A storage whose first create lands, is removed by "another replica",
/// and whose reply is lost.
#[derive(Debug)]
struct CreateLandsThenRemoved {
    inner: MemoryStorage,
    fired: AtomicBool,
}

#[async_trait]
impl Storage for CreateLandsThenRemoved {
    fn backend(&self) -> &'static str {
        "scripted"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn init(&self, name: &str) -> metadatacache::Result<()> {
        self.inner.init(name).await
    }
    async fn upload(&self, req: UploadRequest) -> metadatacache::Result<UploadResponse> {
        let create = req.is_create_only();
        let path = req.path.clone();
        let resp = self.inner.upload(req).await?;
        if create && !self.fired.swap(true, Ordering::SeqCst) {
            self.inner.delete(&path).await?;
            return Err(Error::unavailable("reply lost").with_path(path));
        }
        Ok(resp)
    }
    async fn download(&self, req: DownloadRequest) -> metadatacache::Result<DownloadResponse> {
        self.inner.download(req).await
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

/// A create whose reply was lost, and which a remove undid meanwhile, must
/// not be created again and reported `Ok`: that would apply it twice.
#[tokio::test]
async fn a_lost_create_that_was_removed_is_not_created_again() {
    let storage = Arc::new(CreateLandsThenRemoved {
        inner: MemoryStorage::new(),
        fired: AtomicBool::new(false),
    });
    let store: Store<String, u64> = Store::new(
        Options::new(Arc::clone(&storage) as Arc<dyn Storage>, |k: &String| {
            format!("{k}.json")
        })
        .init(|| 0)
        .retry_policy(RetryPolicy::immediate()),
    );
    let mut runs = 0;
    let err = store
        .update("n".into(), true, |n| {
            runs += 1;
            Ok((n + 1, true))
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(runs, 1, "f ran again after a lost reply");
    assert_eq!(
        storage
            .inner
            .download(DownloadRequest::new("n.json"))
            .await
            .map(|d| d.content)
            .map_err(|e| e.kind()),
        Err(ErrorKind::NotFound),
        "the document was created a second time"
    );
    let stats = store.stats();
    assert_eq!((stats.lost_replies, stats.lost_replies_settled), (1, 0));
}

//! The update promise when replies are lost and writes land late:
//! `Ok` = applied exactly once, `Unavailable` = at most once, anything else
//! = not applied. Memory storage here; the same counter runs against etcd,
//! PostgreSQL and S3 (`common::suite`'s `late_landing_writes`).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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

/// What [`Scripted`] does, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// The first create lands, is removed by "another replica", and its
    /// reply is lost.
    CreateLandsThenRemoved,
    /// The first compare-and-swap update lands and is sent once more by a
    /// layer below (a client's own retry): the caller gets the second
    /// copy's refusal, by the version the first copy made.
    UpdateSentTwice,
    /// The first compare-and-swap update is lost on its way (its reply
    /// says `Unavailable`), and its first resend is turned away unprocessed
    /// (`TooEarly`).
    UpdateLostThenShed,
}

/// A memory storage that plays its [`Script`] on the writes it fits.
#[derive(Debug)]
struct Scripted {
    inner: MemoryStorage,
    script: Script,
    /// The writes that fitted the script so far.
    fitted: AtomicU32,
}

impl Scripted {
    fn new(script: Script) -> Scripted {
        Scripted {
            inner: MemoryStorage::new(),
            script,
            fitted: AtomicU32::new(0),
        }
    }

    /// A store of counters on it that runs `f` without backing off.
    fn store(self: &Arc<Self>) -> Store<String, u64> {
        Store::new(
            Options::new(Arc::clone(self) as Arc<dyn Storage>, |k: &String| {
                format!("{k}.json")
            })
            .init(|| 0)
            .retry_policy(RetryPolicy::immediate()),
        )
    }
}

/// Increments `n` twice through `store`, each update answering `Ok`; how
/// many times each one ran its `f`.
async fn increment_twice(store: &Store<String, u64>) -> [u32; 2] {
    let mut runs = [0; 2];
    for run in &mut runs {
        store
            .update("n".into(), true, |n| {
                *run += 1;
                Ok((n + 1, true))
            })
            .await
            .unwrap();
    }
    runs
}

#[async_trait]
impl Storage for Scripted {
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
        let fits = match self.script {
            Script::CreateLandsThenRemoved => req.is_create_only(),
            Script::UpdateSentTwice | Script::UpdateLostThenShed => req.if_match.is_some(),
        };
        let nth = match fits {
            true => self.fitted.fetch_add(1, Ordering::SeqCst),
            false => u32::MAX,
        };
        let path = req.path.clone();
        match (self.script, nth) {
            (Script::CreateLandsThenRemoved, 0) => {
                self.inner.upload(req).await?;
                self.inner.delete(&path).await?;
                Err(Error::unavailable("reply lost").with_path(path))
            }
            (Script::UpdateSentTwice, 0) => {
                let resp = self.inner.upload(req.clone()).await?;
                let again = self.inner.upload(req).await;
                assert!(again.is_err(), "a copy landed twice: {resp:?}");
                again
            }
            (Script::UpdateLostThenShed, 0) => {
                Err(Error::unavailable("lost on its way").with_path(path))
            }
            (Script::UpdateLostThenShed, 1) => {
                Err(Error::new(ErrorKind::TooEarly, "shedding load").with_path(path))
            }
            _ => self.inner.upload(req).await,
        }
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
    let storage = Arc::new(Scripted::new(Script::CreateLandsThenRemoved));
    let store = storage.store();
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

/// A compare-and-swap update whose copy was sent twice below the store is
/// refused by the version its first copy made: it landed, once, so `f`
/// must not run again and the update answers `Ok`.
#[tokio::test]
async fn a_write_refused_by_its_own_version_landed_once() {
    let storage = Arc::new(Scripted::new(Script::UpdateSentTwice));
    let store = storage.store();
    let runs = increment_twice(&store).await;
    assert_eq!(runs, [1, 1], "f ran again after its own write refused it");
    assert!(
        storage.fitted.load(Ordering::SeqCst) > 0,
        "the script never ran"
    );
    let stored = storage
        .inner
        .download(DownloadRequest::new("n.json"))
        .await
        .unwrap();
    assert_eq!(&stored.content[..], b"2", "applied twice, or not at all");
    assert_eq!(*store.get("n".into()).await.unwrap().unwrap(), 2);
}

/// A lost write whose resend is turned away unprocessed (load shedding)
/// is sent again: a refusal that is no precondition's says nothing of
/// where the etag is, so it does not end the resends.
#[tokio::test]
async fn a_resend_turned_away_unprocessed_is_sent_again() {
    let storage = Arc::new(Scripted::new(Script::UpdateLostThenShed));
    let store = storage.store();
    let runs = increment_twice(&store).await;
    assert_eq!(runs, [1, 1], "f ran again after a lost reply");
    assert_eq!(
        storage.fitted.load(Ordering::SeqCst),
        3,
        "write, shed, landed"
    );
    assert_eq!(*store.get("n".into()).await.unwrap().unwrap(), 2);
    let stats = store.stats();
    assert_eq!((stats.lost_replies, stats.lost_replies_settled), (1, 1));
}

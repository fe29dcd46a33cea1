//! Writes of different keys combined into one round trip
//! ([`Capabilities::combined_calls`]), with their replies lost and with
//! combined writes landing late.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use metadatacache::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, Error, ErrorKind, FileInfo,
    Options, RetryPolicy, Storage, Store, UploadRequest, UploadResponse,
};

use super::TestServer;
use crate::common::servers::Server;

/// Forwards to the backend; of the `upload_many` calls with several
/// requests, every third loses all its replies after the server applied
/// it, and every third of the rest is sent late: the caller hears
/// `Unavailable` at once and the call reaches the server up to 30 ms later.
#[derive(Debug)]
struct LossyCombined {
    inner: Arc<dyn Storage>,
    combined: AtomicU64,
    lost: AtomicU64,
    late: AtomicU64,
}

fn lost_reply(path: &str) -> Error {
    Error::new(ErrorKind::Unavailable, "injected: the reply was lost").with_path(path)
}

#[async_trait]
impl Storage for LossyCombined {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn init(&self, name: &str) -> metadatacache::Result<()> {
        self.inner.init(name).await
    }
    async fn upload(&self, req: UploadRequest) -> metadatacache::Result<UploadResponse> {
        self.inner.upload(req).await
    }
    async fn upload_many(
        &self,
        reqs: Vec<UploadRequest>,
    ) -> Vec<metadatacache::Result<UploadResponse>> {
        if reqs.len() < 2 {
            return self.inner.upload_many(reqs).await;
        }
        let n = self.combined.fetch_add(1, Ordering::SeqCst);
        let paths: Vec<String> = reqs.iter().map(|r| r.path.clone()).collect();
        match n % 9 {
            0 | 3 | 6 => {
                self.lost.fetch_add(1, Ordering::SeqCst);
                drop(self.inner.upload_many(reqs).await);
                paths.iter().map(|p| Err(lost_reply(p))).collect()
            }
            1 | 7 => {
                self.late.fetch_add(1, Ordering::SeqCst);
                let inner = Arc::clone(&self.inner);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
                    drop(inner.upload_many(reqs).await);
                });
                paths.iter().map(|p| Err(lost_reply(p))).collect()
            }
            _ => self.inner.upload_many(reqs).await,
        }
    }
    async fn download(&self, req: DownloadRequest) -> metadatacache::Result<DownloadResponse> {
        self.inner.download(req).await
    }
    async fn delete_if_match(
        &self,
        path: &str,
        if_match: Option<&str>,
    ) -> metadatacache::Result<()> {
        self.inner.delete_if_match(path, if_match).await
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
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn watch(&self, prefix: &str) -> metadatacache::Result<ChangeStream> {
        self.inner.watch(prefix).await
    }
}

/// 1, then 2 replicas × 8 tasks × 40 increments spread over 16 counters,
/// through storages that lose the replies of combined writes and send some
/// late: writes of different keys are combined, and every counter ends
/// between its acknowledged increments and those plus the ones answered
/// `Unavailable`. The counters exist before, so every write is an update:
/// with one replica (nobody else overwrites a key before its writer looks
/// for its token) none stays `Unavailable`. (A create that lands late
/// cannot be settled: it is never resent.)
pub async fn combined_writes_count_exactly<S: TestServer>(server: &mut Server) {
    for replicas in [1, 2] {
        run::<S>(server, replicas).await;
    }
}

async fn run<S: TestServer>(server: &mut Server, replicas: usize) {
    let (tasks, per_task, keys) = (8, 40, 16u64);
    let tally: Arc<Mutex<HashMap<u64, (u64, u64)>>> = Arc::default();
    let mut storages = Vec::new();
    let mut handles = Vec::new();
    for r in 0..replicas {
        let inner = S::open(server, "combined", None).await;
        if r == 0 {
            for key in 0..keys {
                let path = format!("r{replicas}-c{key}.json");
                inner.simple_upload(&path, "0".into()).await.unwrap();
            }
        }
        assert!(
            inner.capabilities().combined_calls,
            "{:?}",
            inner.capabilities()
        );
        let lossy = Arc::new(LossyCombined {
            inner,
            combined: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            late: AtomicU64::new(0),
        });
        storages.push(Arc::clone(&lossy));
        let store: Store<u64, u64> = Store::new(
            Options::new(lossy as Arc<dyn Storage>, move |k: &u64| {
                format!("r{replicas}-c{k}.json")
            })
            .init(|| 0)
            .retries(100_000)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
        );
        for t in 0..tasks {
            let (store, tally) = (store.clone(), Arc::clone(&tally));
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let key = (r * 7 + t * 3 + i) as u64 % keys;
                    let res = store
                        .update(key, true, |n| Ok::<_, Error>((n + 1, true)))
                        .await;
                    let mut tally = tally.lock().unwrap();
                    let entry = tally.entry(key).or_default();
                    match res {
                        Ok(()) => entry.0 += 1,
                        Err(e) if e.kind() == ErrorKind::Unavailable => entry.1 += 1,
                        Err(e) => panic!("key {key}: {e}"),
                    }
                }
            }));
        }
    }
    for h in handles {
        h.await.unwrap();
    }
    // Let the late writes land (or fail) before reading.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tally = tally.lock().unwrap().clone();
    let (mut ok, mut unsure) = (0, 0);
    for (key, (acked, unavailable)) in &tally {
        let bytes = storages[0]
            .inner
            .simple_download(&format!("r{replicas}-c{key}.json"))
            .await
            .unwrap();
        let n: u64 = serde_json::from_slice(&bytes).unwrap();
        assert!(
            *acked <= n && n <= acked + unavailable,
            "counter {key}: {n} after {acked} acknowledged and {unavailable} unavailable"
        );
        ok += acked;
        unsure += unavailable;
    }
    let sum = |f: fn(&LossyCombined) -> &AtomicU64| -> u64 {
        storages.iter().map(|s| f(s).load(Ordering::SeqCst)).sum()
    };
    let (combined, lost, late) = (sum(|s| &s.combined), sum(|s| &s.lost), sum(|s| &s.late));
    eprintln!(
        "{}, {replicas} replicas: combined writes {combined} ({lost} replies lost, {late} \
         late), {ok} acknowledged, {unsure} unavailable",
        S::BACKEND
    );
    assert!(
        lost > 0 && late > 0,
        "no combined write was faulted: {combined} combined"
    );
    assert_eq!(ok + unsure, (replicas * tasks * per_task) as u64);
    let caps = storages[0].capabilities();
    if replicas == 1 && caps.write_tokens && caps.unique_etags {
        assert_eq!(unsure, 0, "a lost reply stayed unsettled");
    }
}

//! The races every backend must survive: raw compare-and-swap increments,
//! increments while documents are deleted and re-created, and stores on one
//! storage.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::p;
use crate::error::{Error, ErrorKind};
use crate::storage::{DownloadRequest, Storage, UploadRequest};
use crate::store::{Options, RetryPolicy, Store};

/// `tasks` tasks each add 1 to a counter `per_task` times with raw
/// download + `if_match` upload, retrying on conflict. The counter must end
/// at `tasks × per_task`: exactly one writer wins each etag.
pub async fn race_raw_cas(storage: Arc<dyn Storage>, dir: &str, tasks: usize, per_task: usize) {
    let path = p(dir, "race-raw.json");
    storage
        .simple_upload(&path, "0".into())
        .await
        .expect("seed counter");
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let storage = Arc::clone(&storage);
        let path = path.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                cas_increment(storage.as_ref(), &path, false).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let total = storage.simple_download(&path).await.expect("download");
    assert_eq!(
        total,
        (tasks * per_task).to_string(),
        "raw CAS race lost updates"
    );
}

/// `writers` tasks each add 1 to a counter `per_writer` times with raw
/// compare-and-swap, while another task keeps reading `(etag, value)`,
/// deleting with `if_match` that etag and re-creating the same value. No
/// acknowledged increment may be lost: a delete must never remove a version
/// written after the etag it names (a read followed by an unconditional
/// delete would).
///
/// Halfway through, every writer waits until the remover has deleted at
/// least once, so a backend where writers always win the race still has its
/// delete path exercised; the waits are bounded and a remover that never
/// deletes fails the test.
pub async fn race_remove_recreate(
    storage: Arc<dyn Storage>,
    dir: &str,
    writers: usize,
    per_writer: usize,
) {
    let path = p(dir, "race-remove.json");
    storage
        .simple_upload(&path, "0".into())
        .await
        .expect("seed counter");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let remover = {
        let (storage, path, done) = (Arc::clone(&storage), path.clone(), Arc::clone(&done));
        let deleted = Arc::clone(&deleted);
        tokio::spawn(async move {
            let mut recreated = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                // An in-memory backend never suspends: without this the
                // loop would hold its worker and starve the writers.
                tokio::task::yield_now().await;
                let cur = match storage.download(DownloadRequest::new(&path)).await {
                    Ok(cur) => cur,
                    Err(e) => panic!("remover download: {e}"),
                };
                match storage.delete_if_match(&path, Some(&cur.etag)).await {
                    Ok(()) => {}
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => panic!("remover delete_if_match: {e}"),
                }
                deleted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Gone for a moment; only this task creates it.
                let create = UploadRequest {
                    if_none_match: vec!["*".into()],
                    ..UploadRequest::new(path.clone(), cur.content)
                };
                storage.upload(create).await.expect("re-create");
                recreated += 1;
            }
            recreated
        })
    };
    let mut handles = Vec::new();
    for _ in 0..writers {
        let (storage, path, deleted) = (Arc::clone(&storage), path.clone(), Arc::clone(&deleted));
        handles.push(tokio::spawn(async move {
            for i in 0..per_writer {
                if i == per_writer / 2 {
                    wait_for_a_delete(&deleted).await;
                }
                // The document may be gone for a moment between the
                // remover's delete and re-create.
                cas_increment(storage.as_ref(), &path, true).await;
            }
        }));
    }
    for h in handles {
        h.await.expect("writer");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let recreated = remover.await.expect("remover");
    assert!(recreated > 0, "the remover never got to delete");
    let total = storage.simple_download(&path).await.expect("download");
    eprintln!(
        "{}: remove race: {} acknowledged increments, final {}, {recreated} deletes and \
         re-creates",
        storage.backend(),
        writers * per_writer,
        String::from_utf8_lossy(&total)
    );
    assert_eq!(
        total,
        (writers * per_writer).to_string(),
        "a conditional delete removed acknowledged increments ({recreated} deletes)"
    );
}

/// Waits until the remover has deleted at least once; panics after a minute.
async fn wait_for_a_delete(deleted: &std::sync::atomic::AtomicU64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while deleted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the remover did not delete within a minute while the writers waited"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Adds 1 to the counter at `path` with download + `if_match` upload,
/// retrying on conflict (and, with `may_vanish`, while the document is
/// absent).
async fn cas_increment(storage: &dyn Storage, path: &str, may_vanish: bool) {
    loop {
        let cur = match storage.download(DownloadRequest::new(path)).await {
            Ok(cur) => cur,
            Err(e) if may_vanish && e.kind() == ErrorKind::NotFound => {
                tokio::task::yield_now().await;
                continue;
            }
            Err(e) => panic!("download counter: {e}"),
        };
        let n: u64 = std::str::from_utf8(&cur.content)
            .ok()
            .and_then(|t| t.parse().ok())
            .expect("counter is a number");
        let req = UploadRequest {
            if_match: Some(cur.etag),
            ..UploadRequest::new(path, (n + 1).to_string())
        };
        match storage.upload(req).await {
            Ok(_) => return,
            Err(e) if e.is_conflict() => tokio::task::yield_now().await,
            Err(e) if may_vanish && e.kind() == ErrorKind::NotFound => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("raw CAS increment: {e}"),
        }
    }
}

/// `replicas` independent [`Store`]s over one storage, `tasks` tasks each,
/// every task adding `per_task` distinct entries through `update`. All
/// entries must be there at the end.
pub async fn race_stores(
    storage: Arc<dyn Storage>,
    dir: &str,
    replicas: usize,
    tasks: usize,
    per_task: usize,
) {
    let path = p(dir, "race-store.json");
    let mut handles = Vec::new();
    for r in 0..replicas {
        let store: Store<String, Vec<String>> = Store::new(
            Options::new(Arc::clone(&storage), {
                let path = path.clone();
                move |_: &String| path.clone()
            })
            .init(Vec::new)
            .retries(10_000)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
        );
        for t in 0..tasks {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..per_task {
                    let entry = format!("{r}-{t}-{i}");
                    store
                        .update("k".to_owned(), true, |mut v| {
                            v.push(entry.clone());
                            Ok::<_, Error>((v, true))
                        })
                        .await
                        .expect("update");
                }
            }));
        }
    }
    for h in handles {
        h.await.expect("task");
    }
    let bytes = storage.simple_download(&path).await.expect("download");
    let list: Vec<String> = serde_json::from_slice(&bytes).expect("valid JSON");
    let unique: HashSet<&String> = list.iter().collect();
    assert_eq!(unique.len(), list.len(), "an update was applied twice");
    assert_eq!(
        list.len(),
        replicas * tasks * per_task,
        "store race lost updates"
    );
}

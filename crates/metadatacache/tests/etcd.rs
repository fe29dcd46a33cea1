//! The etcd backend against a real etcd server (a missing `etcd` fails the
//! tests, naming what to install, unless `MDCACHE_SKIP_SERVERS=1`).

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metadatacache::{
    DownloadRequest, Error, ErrorKind, EtcdStorage, Options, RetryPolicy, Storage, Store,
    UploadRequest,
};
use support::{must_finish, servers};

/// The hang detector of calls that should end within their timeout: many
/// times any timeout used here.
const GUARD: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> Arc<dyn Storage> {
    Arc::new(EtcdStorage::from_url(url).await.unwrap())
}

/// A raw etcd client, to look at the keys the backend writes.
async fn raw(addr: &str) -> etcd_client::Client {
    etcd_client::Client::connect([format!("http://{addr}")], None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let url = format!("etcd://{}/conformance/run?timeout_ms=5000", server.addr());
    metadatacache::conformance::run_all(connect(&url).await, "suite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite_without_a_prefix_at_the_root() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let storage = connect(&format!("etcd://{}", server.addr())).await;
    metadatacache::conformance::run_all(storage, "").await;
    // The internal metadata keys never show.
    let storage = connect(&format!("etcd://{}/", server.addr())).await;
    let root = storage.read_dir("").await.unwrap();
    assert!(root.iter().all(|p| !p.starts_with(".mdcache")), "{root:?}");
    assert!(root.contains(&"list".to_owned()), "{root:?}");
    storage.init("").await.unwrap();
    let info = storage.stat("").await.unwrap();
    assert!(info.is_dir());
}

#[tokio::test]
async fn bad_urls_are_invalid_input_naming_the_url() {
    for url in [
        "etcd://",
        "etcd://127.0.0.1:notaport/x",
        "etcd://127.0.0.1:2379/../x",
        "etcd://127.0.0.1:2379/a//b",
        "etcd://127.0.0.1:2379/x?timeout_ms=zero",
        "etcd://127.0.0.1:2379/x?unknown=1",
        "etcds://127.0.0.1:2379/x",
    ] {
        let e = EtcdStorage::from_url(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}: {e}");
        assert!(e.to_string().contains(url), "{url}: {e}");
        let e = metadatacache::open(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}: {e}");
        assert!(e.to_string().contains(url), "{url}: {e}");
    }
    // Passwords stay out of messages and Debug.
    let e = EtcdStorage::from_url("etcd://u:hunter2@h:1/x?password=hunter2&bogus=1")
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let s = EtcdStorage::from_url("etcd://u:hunter2@127.0.0.1:1/x")
        .await
        .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    assert_eq!(s.prefix(), "x");
}

#[tokio::test]
async fn documents_are_plain_values_under_the_prefix() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let storage = connect(&format!("etcd://{}/app/v1", server.addr())).await;
    let v1 = storage
        .simple_upload("users/alice.json", "{\"a\":1}".into())
        .await
        .unwrap();
    let mut raw = raw(server.addr()).await;
    let got = raw.get("app/v1/users/alice.json", None).await.unwrap();
    let kv = &got.kvs()[0];
    assert_eq!(kv.value(), b"{\"a\":1}");
    assert_eq!(kv.mod_revision().to_string(), v1.etag);
    let meta = raw
        .get("app/v1/.mdcache-meta/users/alice.json", None)
        .await
        .unwrap();
    assert_eq!(
        meta.kvs().len(),
        1,
        "metadata key written with the document"
    );

    // A document written by another tool: no mtime, still usable.
    raw.put("app/v1/users/bob.json", "{}", None).await.unwrap();
    let bob = storage
        .download(DownloadRequest::new("users/bob.json"))
        .await
        .unwrap();
    assert_eq!(bob.content, "{}");
    let listed = storage.list_dir("users").await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed[0].mtime.is_some() && listed[1].mtime.is_none());
    storage
        .upload(UploadRequest {
            if_match: Some(bob.etag.clone()),
            if_unmodified_since: Some(std::time::SystemTime::now()),
            ..UploadRequest::new("users/bob.json", "{\"b\":1}")
        })
        .await
        .unwrap();

    // Reserved names and etags this backend never hands out.
    for bad in [".mdcache-meta/x", ".mdcache-meta"] {
        let e = storage.simple_upload(bad, "x".into()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
    }
    let e = storage
        .upload(UploadRequest {
            if_match: Some("not-a-revision".into()),
            ..UploadRequest::new("users/alice.json", "x")
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PreconditionFailed);

    // A document cannot sit below a document, nor where a directory is.
    let e = storage
        .simple_upload("users/alice.json/x", "x".into())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = storage
        .simple_upload("users", "x".into())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = storage
        .make_dir_if_not_exist("users/alice.json/sub")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");

    // Deleting removes the metadata key too.
    storage.delete("users/alice.json").await.unwrap();
    let meta = raw
        .get("app/v1/.mdcache-meta/users/alice.json", None)
        .await
        .unwrap();
    assert!(meta.kvs().is_empty());
}

/// Retries `op` until it succeeds, for up to `limit`.
async fn until_ok<T, F, Fut>(limit: Duration, mut op: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = metadatacache::Result<T>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return (v, start.elapsed()),
            Err(e) if start.elapsed() < limit => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing after {limit:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_within_the_timeout_and_the_same_storage_recovers() {
    let Some(mut server) = servers::etcd() else {
        return;
    };
    let storage = connect(&format!("etcd://{}/outage?timeout_ms=1000", server.addr())).await;
    storage.simple_upload("doc", "1".into()).await.unwrap();

    server.stop();
    for round in 0..2 {
        let (res, took) = must_finish("upload during the outage", GUARD, async {
            storage.simple_upload("doc", "2".into()).await
        })
        .await;
        let e = res.unwrap_err();
        eprintln!("outage round {round}: upload failed after {took:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(e.backend(), Some("etcd"));
        assert_eq!(e.path(), Some("doc"));

        let (res, took) = must_finish(
            "download during the outage",
            GUARD,
            storage.download(DownloadRequest::new("doc")),
        )
        .await;
        let e = res.unwrap_err();
        eprintln!("outage round {round}: download failed after {took:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }

    server.start();
    let (_, took) = until_ok(Duration::from_secs(10), || {
        storage.simple_upload("doc", "3".into())
    })
    .await;
    eprintln!("upload succeeded again {took:?} after the restart");
    assert_eq!(storage.simple_download("doc").await.unwrap(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_unavailable_within_the_timeout() {
    // A listener that accepts connections and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(16) {
            held.push(conn);
        }
    });
    let storage = connect(&format!("etcd://{addr}/hang?timeout_ms=500")).await;
    for _ in 0..2 {
        let (res, took) = must_finish("upload to a silent server", GUARD, async {
            storage.simple_upload("doc", "1".into()).await
        })
        .await;
        let e = res.unwrap_err();
        eprintln!("silent server: upload failed after {took:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        // Ended by the timeout (timers never fire early), not by a refusal.
        assert!(took >= Duration::from_millis(500), "{took:?}");
        let (res, _) = must_finish("list on a silent server", GUARD, storage.list_dir("")).await;
        assert_eq!(res.unwrap_err().kind(), ErrorKind::Unavailable);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_loses_no_update_across_an_outage() {
    const REPLICAS: usize = 2;
    const TASKS: usize = 4;
    const PER_TASK: usize = 150;
    let Some(mut server) = servers::etcd() else {
        return;
    };
    let url = format!("etcd://{}/counter?timeout_ms=1000", server.addr());
    let acknowledged = Arc::new(AtomicU64::new(0));
    let maybe = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for _ in 0..REPLICAS {
        let store: Store<String, u64> = Store::new(
            Options::new(connect(&url).await, |k: &String| format!("{k}.json"))
                .init(|| 0)
                .retries(10_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20))),
        );
        for _ in 0..TASKS {
            let store = store.clone();
            let (acknowledged, maybe) = (Arc::clone(&acknowledged), Arc::clone(&maybe));
            handles.push(tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    let res = store
                        .update("counter".to_owned(), true, |n| {
                            Ok::<_, Error>((n + 1, true))
                        })
                        .await;
                    match res {
                        Ok(()) => acknowledged.fetch_add(1, Ordering::SeqCst),
                        Err(e) if e.kind() == ErrorKind::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            maybe.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(e) => panic!("update: {e}"),
                    };
                }
            }));
        }
    }

    // Let the run get going, then take the server away for ~2 s.
    let done = Arc::new(AtomicBool::new(false));
    while acknowledged.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = acknowledged.load(Ordering::SeqCst);
    server.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start();
    eprintln!("outage began after {before} acknowledged updates");
    for h in handles {
        h.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);

    let storage = connect(&url).await;
    let bytes = storage.simple_download("counter.json").await.unwrap();
    let total: u64 = serde_json::from_slice(&bytes).unwrap();
    let (ack, maybe) = (
        acknowledged.load(Ordering::SeqCst),
        maybe.load(Ordering::SeqCst),
    );
    eprintln!("counter: acknowledged {ack}, maybe {maybe}, final {total}");
    assert_eq!(ack + maybe, (REPLICAS * TASKS * PER_TASK) as u64);
    assert!(maybe > 0, "the outage produced no Unavailable");
    assert!(
        (ack..=ack + maybe).contains(&total),
        "final {total} outside [{ack}, {}]: updates lost or applied twice",
        ack + maybe
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_signs_in_again_after_a_restart() {
    let Some(mut server) = servers::etcd() else {
        return;
    };
    let mut raw = raw(server.addr()).await;
    raw.user_add("root", "s3cret", None).await.unwrap();
    raw.user_grant_role("root", "root").await.unwrap();
    raw.auth_enable().await.unwrap();

    let addr = server.addr().to_owned();
    let storage = connect(&format!("etcd://root:s3cret@{addr}/auth?timeout_ms=1000")).await;
    storage.simple_upload("doc", "1".into()).await.unwrap();

    let wrong = connect(&format!("etcd://{addr}/auth?user=root&password=nope")).await;
    let e = wrong.simple_download("doc").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.to_string().contains("nope"), "{e}");
    let anonymous = connect(&format!("etcd://{addr}/auth")).await;
    let e = anonymous.simple_download("doc").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    // A restart forgets every token; the storage signs in again by itself.
    server.stop();
    server.start();
    let (_, took) = until_ok(Duration::from_secs(10), || {
        storage.simple_upload("doc", "2".into())
    })
    .await;
    eprintln!("signed in again {took:?} after the restart");
    assert_eq!(storage.simple_download("doc").await.unwrap(), "2");
}

/// A write whose reply is lost is looked up by its write token (kept in the
/// metadata key): 4 tasks × 100 increments with 20 % lost replies end at
/// exactly the number acknowledged, and none stays `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_are_resolved_by_write_token() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let inner = connect(&format!("etcd://{}/tokens", server.addr())).await;
    assert!(inner.capabilities().write_tokens && inner.capabilities().unique_etags);
    let faulty =
        Arc::new(metadatacache::testing::FaultyStorage::new(Arc::clone(&inner), 5).ambiguous(0.2));
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

/// Writes that time out and still land later (`delayed_apply`) are never
/// applied twice: 1, 2 and 4 stores on one etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_landing_writes_keep_the_promise() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let storage = connect(&format!("etcd://{}/late", server.addr())).await;
    for (stores, tasks) in [(1, 4), (2, 2), (4, 2)] {
        let path = format!("n-{stores}.json");
        let run = support::counter::delayed_counter(
            Arc::clone(&storage),
            &path,
            stores,
            tasks,
            50,
            support::counter::Faults::default(),
        )
        .await;
        eprintln!("etcd, {stores} stores: {run:?}");
    }
}

/// A document whose every write carries a marker the proxy can spot.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Marked {
    marker: String,
    ids: Vec<u64>,
}

/// A real network's late commit: a loopback proxy holds a transaction's
/// request past the client's timeout and lets it through just ahead of the
/// client's next write (the store's resend, or — without fencing — the
/// re-run of its update). Every update must land at most once, and exactly
/// once when it answered `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_stalled_past_the_timeout_lands_once() {
    use support::proxy::Proxy;
    const MARKER: &str = "stall-this-write";
    let Some(server) = servers::etcd() else {
        return;
    };
    let proxy = Proxy::start(server.addr()).await;
    let url = format!("etcd://{}/stalled?timeout_ms=500", proxy.addr());
    let direct = connect(&format!("etcd://{}/stalled", server.addr())).await;
    let store: Store<String, Marked> = Store::new(
        Options::new(connect(&url).await, |k: &String| format!("{k}.json"))
            .init(|| Marked {
                marker: MARKER.into(),
                ids: Vec::new(),
            })
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
    );
    store
        .update("doc".into(), true, |d| Ok((d, true)))
        .await
        .unwrap();
    let (mut ok, mut unavailable) = (Vec::new(), Vec::new());
    for id in 0..10u64 {
        // The first write of each update is held past the timeout.
        proxy.stall_writes(MARKER.as_bytes(), 1, Duration::from_secs(20));
        let res = store
            .update("doc".into(), false, |mut d| {
                d.ids.push(id);
                Ok((d, true))
            })
            .await;
        match res {
            Ok(()) => ok.push(id),
            Err(e) if e.kind() == ErrorKind::Unavailable => unavailable.push(id),
            Err(e) => panic!("update {id}: {e}"),
        }
    }
    let counts = proxy.counts();
    let stored: Marked =
        serde_json::from_slice(&direct.simple_download("doc.json").await.unwrap()).unwrap();
    eprintln!(
        "stalled writes: {counts:?}; ok {} unavailable {:?}; stored {:?}; stats {:?}",
        ok.len(),
        unavailable,
        stored.ids,
        store.stats()
    );
    assert_eq!(
        counts.stalls, 10,
        "every update's first write was stalled: {counts:?}"
    );
    let mut seen = std::collections::HashSet::new();
    for id in &stored.ids {
        assert!(
            seen.insert(*id),
            "update {id} was applied twice: {:?}",
            stored.ids
        );
        assert!(
            ok.contains(id) || unavailable.contains(id),
            "{id} failed yet landed"
        );
    }
    for id in &ok {
        assert!(seen.contains(id), "update {id} answered Ok but is missing");
    }
}

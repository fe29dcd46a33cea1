//! The NATS JetStream key-value backend against a real `nats-server -js`
//! (a missing `nats-server` fails the tests, naming what to install, unless
//! `MDCACHE_SKIP_SERVERS=1`): the shared suite of `common::suite`, and what
//! only NATS has: its key encoding, buckets made on first use,
//! credentials, and change notifications across a restart.

#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use std::time::SystemTime;

use async_nats::jetstream;
use common::servers::{self, Server};
use common::suite::{self, TestServer};
use common::{GUARD, create, eventually, must_finish};
use metadatacache::{
    Change, ChangeStream, DownloadRequest, ErrorKind, FileInfo, NatsStorage, Options, Result,
    RetryPolicy, Storage, Store, UploadRequest, parent, validate_path,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

struct Nats;

impl TestServer for Nats {
    const BACKEND: &'static str = "nats";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "nats://u:hunter2@h:1/x?password=hunter2&bogus=1";
    // No server; no bucket; TLS options that go together, alone.
    const BAD_URLS: &'static [&'static str] = &[
        "nats://",
        "nats://127.0.0.1:4222",
        "tls://127.0.0.1:4222/b?tls_key=k.pem",
        "nats://127.0.0.1:4222/b/a//c",
    ];
    // Bucket names: letters, digits, '-' and '_' only.
    const BAD_SPACES: &'static [&'static str] = &["a.b", "a%20b", "*"];
    const BAD_PARAMS: &'static [&'static str] = &["creds=a.creds&nkey=b.nk", "tls_cert=c.pem"];

    fn launch() -> Option<Server> {
        servers::nats()
    }

    /// Bucket `space`, key prefix `p`.
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        format!(
            "nats://{addr}/{space}/p{}",
            suite::timeout_query("?", timeout)
        )
    }

    fn root_url(addr: &str, space: &str) -> String {
        format!("nats://{addr}/{space}")
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(NatsStorage::from_url(url).await?))
    }
}

suite::server_tests!(Nats;
    served: conformance, outage_then_recovery, counter_counts_exactly, counter_survives_restart,
        late_landing_writes, lost_replies_are_resolved_by_write_token;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

async fn connect(url: &str) -> Arc<dyn Storage> {
    Nats::from_url(url).await.unwrap()
}

/// A raw JetStream client, to look at what the backend stores and to write
/// as another NATS tool would.
async fn raw(addr: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(addr).await.unwrap())
}

/// The conditional update of a counter document in `store`.
fn counter(storage: Arc<dyn Storage>, watch: bool) -> Store<String, u64> {
    Store::new(
        Options::new(storage, |k: &String| format!("{k}.json"))
            .init(|| 0)
            .watch(watch)
            .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_created_on_first_use() {
    let Some(server) = Nats::launch() else {
        return;
    };
    let js = raw(server.addr()).await;
    assert!(js.get_stream("KV_fresh").await.is_err(), "no bucket yet");
    // Open a URL and update: it just works.
    let storage = metadatacache::open(&format!("nats://{}/fresh", server.addr()))
        .await
        .unwrap();
    let store = counter(Arc::clone(&storage), false);
    store
        .update("n".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    assert_eq!(store.get("n".into()).await.unwrap().as_deref(), Some(&1));
    let mut stream = js.get_stream("KV_fresh").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.subjects, ["$KV.fresh.>"], "a KV bucket's subjects");
    assert_eq!(config.max_messages_per_subject, 1, "history 1");
    assert!(config.allow_direct && config.allow_rollup && config.deny_delete);

    // `init` creates one too; replicas creating one bucket at once all
    // succeed.
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("nats://{}/raced", server.addr());
            tokio::spawn(async move { connect(&url).await.init("").await })
        })
        .collect();
    for r in replicas {
        r.await.unwrap().unwrap();
    }
    js.get_stream("KV_raced").await.unwrap();

    // A bucket deleted under a running storage is made anew by the next
    // write (reads in between find nothing).
    js.delete_stream("KV_fresh").await.unwrap();
    let (v, failed) = eventually("write after the bucket was deleted", || {
        storage.simple_upload("again.json", "1".into())
    })
    .await;
    eprintln!("wrote into a new bucket after {failed} failed attempts");
    assert_eq!(
        storage.simple_download("again.json").await.unwrap(),
        "1",
        "etag {}",
        v.etag
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_plain_kv_entries() {
    let Some(server) = Nats::launch() else {
        return;
    };
    let storage = connect(&format!("nats://{}/plain/app", server.addr())).await;
    let v1 = storage
        .upload(UploadRequest {
            write_token: Some("tok-1".into()),
            ..UploadRequest::new("users/alice.json", "{\"a\":1}")
        })
        .await
        .unwrap();
    let js = raw(server.addr()).await;
    let stream = js.get_stream("KV_plain").await.unwrap();
    let alice = "$KV.plain.app.users.alice=2Ejson";
    let m = stream.direct_get_last_for_subject(alice).await.unwrap();
    assert_eq!(m.payload, "{\"a\":1}", "the value is the document");
    assert_eq!(m.sequence.to_string(), v1.etag, "the etag is the revision");
    assert_eq!(
        m.headers.get("Mdcache-Write-Token").map(|v| v.as_str()),
        Some("tok-1"),
        "the write token is a header of the message"
    );

    // A value written by another tool: readable, with the server's time.
    let bob = "$KV.plain.app.users.bob=2Ejson";
    js.publish(bob, "{}".into()).await.unwrap().await.unwrap();
    let got = storage
        .download(DownloadRequest::new("users/bob.json"))
        .await
        .unwrap();
    assert_eq!(
        (got.content.as_ref(), got.write_token),
        (b"{}".as_ref(), None)
    );
    assert!(got.mtime > SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000));
    // Keys this encoding never makes are not listed, nor keys outside the
    // prefix.
    for foreign in [
        "$KV.plain.app.users.lower=2ecase",
        "$KV.plain.app.users.a=",
        "$KV.plain.other.x",
    ] {
        js.publish(foreign, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let names =
        |infos: Vec<FileInfo>| -> Vec<String> { infos.into_iter().map(|i| i.path).collect() };
    assert_eq!(
        names(storage.list_dir("users").await.unwrap()),
        ["users/alice.json", "users/bob.json"]
    );
    assert_eq!(names(storage.list_dir("").await.unwrap()), ["users"]);

    // A delete or purge by another tool reads as absent.
    for op in ["DEL", "PURGE"] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("KV-Operation", op);
        if op == "PURGE" {
            headers.insert("Nats-Rollup", "sub");
        }
        storage
            .simple_upload("users/bob.json", "{}".into())
            .await
            .unwrap();
        js.publish_with_headers(bob, headers, "".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let e = storage.simple_download("users/bob.json").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{op}: {e}");
        assert_eq!(
            storage.stat("users/bob.json").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(storage.list_dir("users").await.unwrap().len(), 1, "{op}");
        // An if-match on the deleted version: NotFound; a create: fine.
        let e = storage
            .upload(UploadRequest {
                if_match: Some(got.etag.clone()),
                ..UploadRequest::new("users/bob.json", "x")
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{op}: {e}");
    }

    // Etags this backend never hands out.
    let e = storage
        .upload(UploadRequest {
            if_match: Some("not-a-revision".into()),
            ..UploadRequest::new("users/alice.json", "x")
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");

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
    storage.make_dir_if_not_exist("users/sub").await.unwrap();

    // Larger than the server's largest message (1 MiB by default): refused
    // before sending, and the connection stays usable.
    let big = vec![b'x'; 2 << 20];
    let e = storage
        .simple_upload("big.json", big.into())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    storage
        .simple_upload("small.json", "{}".into())
        .await
        .unwrap();
}

/// The JetStream API requests the server has answered so far (consumers
/// made, streams looked up; not direct gets or publishes), this request
/// included.
async fn api_requests(client: &async_nats::Client) -> u64 {
    let reply = client.request("$JS.API.INFO", "".into()).await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    info["api"]["total"].as_u64().unwrap()
}

/// Creating a document asks whether documents lie below its path. In a
/// bucket this backend made, every document's directories carry marks, so
/// that is one read of the path's mark; only a path that once was a
/// directory is checked by scanning what lies below it (a consumer, which
/// nats-server answers by walking the stream: the cost of a create grew
/// with the bucket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_document_reads_marks_instead_of_scanning() {
    let Some(server) = Nats::launch() else {
        return;
    };
    let storage = connect(&format!("nats://{}/marked/app", server.addr())).await;
    for i in 0..50 {
        storage
            .simple_upload(&format!("many/d{i}/x.json"), "{}".into())
            .await
            .unwrap();
    }
    let client = async_nats::connect(server.addr()).await.unwrap();
    let before = api_requests(&client).await;
    for i in 0..20 {
        storage
            .upload(create(&format!("new/n{i}.json"), "{}"))
            .await
            .unwrap();
        storage
            .simple_upload(&format!("many/d{i}/y.json"), "{}".into())
            .await
            .unwrap();
    }
    let requests = api_requests(&client).await - before;
    assert!(
        requests <= 1,
        "40 first writes made {requests} JetStream API requests (scans)"
    );

    // Marks are written for every directory above, the prefix's too; the
    // places they guard are refused, at any depth.
    let root = connect(&format!("nats://{}/marked", server.addr())).await;
    for dir in ["app", "app/many", "app/many/d3"] {
        let e = root.simple_upload(dir, "x".into()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{dir}: {e}");
        assert!(root.stat(dir).await.unwrap().is_dir(), "{dir}");
    }
    // A directory emptied keeps its mark; the scan then finds nothing.
    for name in ["x.json", "y.json"] {
        storage
            .delete_if_match(&format!("many/d3/{name}"), None)
            .await
            .unwrap();
    }
    let e = storage.stat("many/d3").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    storage.simple_upload("many/d3", "{}".into()).await.unwrap();
    // Marks are neither listed nor documents.
    let names: Vec<String> = root
        .list_dir("")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.path)
        .collect();
    assert_eq!(names, ["app"]);
    // (The segment `=` is the key token `=3D`, not a mark.)
    let e = root.simple_download("app/many/=").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
}

/// A bucket that held documents before this backend first looked at it
/// (written by another tool, or before directory marks existed) has no
/// marks for them: there a create still scans, and still refuses a path
/// where documents lie below. The documents written through the backend get
/// their marks all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_filled_without_marks_is_checked_by_scanning() {
    let Some(server) = Nats::launch() else {
        return;
    };
    let js = raw(server.addr()).await;
    js.create_stream(jetstream::stream::Config {
        name: "KV_legacy".into(),
        subjects: vec!["$KV.legacy.>".into()],
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    js.publish("$KV.legacy.old.doc", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let storage = connect(&format!("nats://{}/legacy", server.addr())).await;
    let e = storage.simple_upload("old", "x".into()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(storage.stat("old").await.unwrap().is_dir());
    storage
        .simple_upload("new/doc.json", "{}".into())
        .await
        .unwrap();
    let mark = js
        .get_stream("KV_legacy")
        .await
        .unwrap()
        .direct_get_last_for_subject("$KV.legacy.new.=")
        .await;
    assert!(mark.is_ok(), "no mark for new/: {mark:?}");
    let e = storage.simple_upload("new", "x".into()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// A bucket whose stream expires documents, or drops the oldest when full,
/// removes current versions without a message a watch could hear: its
/// changes are refused to follow (a watching store then revalidates every
/// read), naming the bucket and the setting; reads and writes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_removes_silently_cannot_be_watched() {
    let Some(server) = Nats::launch() else {
        return;
    };
    let js = raw(server.addr()).await;
    let streams = [
        ("expiring", "max_age", Duration::from_secs(3600), 0),
        ("rolling", "discard old", Duration::ZERO, 1000),
    ];
    for (bucket, says, max_age, max_messages) in streams {
        js.create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            allow_direct: true,
            max_age,
            max_messages,
            discard: jetstream::stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .unwrap();
        let storage = connect(&format!("nats://{}/{bucket}", server.addr())).await;
        storage.simple_upload("a.json", "1".into()).await.unwrap();
        let e = storage.watch("").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        let text = e.to_string();
        assert!(text.contains(bucket) && text.contains(says), "{text}");
        let store = counter(Arc::clone(&storage), true);
        assert_eq!(store.get("a".into()).await.unwrap().as_deref(), Some(&1));
    }
    // The backend's own buckets can be watched.
    let storage = connect(&format!("nats://{}/plain", server.addr())).await;
    let mut stream = storage.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
}

/// Paths of any printable characters, with what NATS subjects and the key
/// escape treat specially over-represented, and some invalid ones.
fn hostile_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-z0-9_-]{1,6}",
        3 => prop::sample::select(vec![
            ".", "..", "*", ">", "=", "=2E", "$", " ", "a.b", ".hidden", "x>", "*.*", "%2e",
            "\u{202e}", "e\u{301}", "😀", "日本", "\u{feff}", "\u{2028}", "=3D=", "-", "_",
            "\\", "\0", "\n", "",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
        1 => (120usize..130).prop_map(|n| "é".repeat(n)),
    ];
    let segment = prop::collection::vec(piece, 1..4).prop_map(|p| p.concat());
    prop::collection::vec(segment, 1..4).prop_map(|s| s.join("/"))
}

/// Each hostile path is written, read back, listed in its directory and
/// stated, while a model of the storage predicts every answer: a bad path
/// is `InvalidInput`, a path below a document or above one is refused, and
/// every other write lands at its own key, leaving all others as they were
/// (a collision of two paths on one key would change another's content).
#[test]
fn hostile_paths_round_trip_through_keys() {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    let Some(server) = Nats::launch() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let storage = rt.block_on(connect(&format!("nats://{}/hostile/p", server.addr())));
    // The runner takes a `Fn`: the model and the count live in cells.
    let model: RefCell<BTreeMap<String, String>> = RefCell::new(BTreeMap::new());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 300,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let written = Cell::new(0);
    runner
        .run(&hostile_path(), |path| {
            let content = format!("{}:{path}", written.get());
            let blocked = model
                .borrow()
                .keys()
                .any(|p| path.starts_with(&format!("{p}/")) || p.starts_with(&format!("{path}/")));
            let res = rt.block_on(storage.simple_upload(&path, content.clone().into()));
            match res {
                Err(e) if validate_path(&path, false).is_err() || blocked => {
                    prop_assert_eq!(e.kind(), ErrorKind::InvalidInput, "{:?}: {}", path, e);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("{path:?}: {e}"))),
                Ok(_) => prop_assert!(
                    validate_path(&path, false).is_ok() && !blocked,
                    "{:?}",
                    path
                ),
            }
            written.set(written.get() + 1);
            model.borrow_mut().insert(path.clone(), content.clone());
            let got = rt.block_on(storage.simple_download(&path)).unwrap();
            prop_assert_eq!(got, content.as_bytes(), "{:?}", path);
            let info = rt.block_on(storage.stat(&path)).unwrap();
            prop_assert!(info.is_file() && info.path == path);
            let listed = rt.block_on(storage.read_dir(parent(&path))).unwrap();
            prop_assert!(listed.contains(&path), "{:?} not in {:?}", path, listed);
            Ok(())
        })
        .unwrap();
    // Nothing overwrote anything else.
    let model = model.into_inner();
    rt.block_on(async {
        for (path, content) in &model {
            assert_eq!(
                storage.simple_download(path).await.unwrap(),
                content.as_bytes(),
                "{path:?}"
            );
        }
        // Every document is found by walking the directories from the root.
        let mut found = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            for info in storage.list_dir(&dir).await.unwrap() {
                if info.is_dir() {
                    dirs.push(info.path);
                } else {
                    found.push(info.path);
                }
            }
        }
        found.sort();
        assert_eq!(found, model.keys().cloned().collect::<Vec<_>>());
    });
    eprintln!(
        "hostile paths: {} documents written, all distinct",
        written.get()
    );
}

/// The next change on `stream`, failing the test if none comes (a hang
/// detector, not a speed bound).
async fn next_change(stream: &mut ChangeStream) -> Change {
    must_finish("the next change", GUARD, stream.next())
        .await
        .0
        .expect("the change stream ended")
}

fn changed(path: &str, etag: Option<&str>) -> Change {
    Change::Changed {
        path: path.to_owned(),
        etag: etag.map(str::to_owned),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_changes_and_a_gap_after_a_restart() {
    let Some(mut server) = Nats::launch() else {
        return;
    };
    let url = format!("nats://{}/watched/app?timeout_ms=1000", server.addr());
    let watching = connect(&url).await;
    // Another replica writes.
    let other = connect(&url).await;
    let mut all = watching.watch("").await.unwrap();
    let mut users = watching.watch("users").await.unwrap();
    assert_eq!(next_change(&mut all).await, Change::InSync);
    assert_eq!(next_change(&mut users).await, Change::InSync);

    // Outside the storage's prefix: not reported.
    let root = connect(&format!("nats://{}/watched", server.addr())).await;
    root.simple_upload("elsewhere.json", "x".into())
        .await
        .unwrap();
    let put = other
        .simple_upload("users/a.json", "1".into())
        .await
        .unwrap();
    other
        .simple_upload("groups/g.json", "1".into())
        .await
        .unwrap();
    other.delete("users/a.json").await.unwrap();
    let a = Some(put.etag.as_str());
    assert_eq!(next_change(&mut all).await, changed("users/a.json", a));
    assert_eq!(
        next_change(&mut all).await,
        changed(
            "groups/g.json",
            next_etag(&other, "groups/g.json").await.as_deref()
        )
    );
    assert_eq!(next_change(&mut all).await, changed("users/a.json", None));
    assert_eq!(next_change(&mut users).await, changed("users/a.json", a));
    assert_eq!(next_change(&mut users).await, changed("users/a.json", None));

    // The server goes away: a gap; it comes back: in sync again, and
    // changes are reported again.
    tokio::task::block_in_place(|| server.stop());
    assert!(matches!(next_change(&mut all).await, Change::Gap { .. }));
    tokio::task::block_in_place(|| server.start());
    assert_eq!(next_change(&mut all).await, Change::InSync);
    let (put, _) = eventually("write after the restart", || {
        other.simple_upload("users/b.json", "2".into())
    })
    .await;
    assert_eq!(
        next_change(&mut all).await,
        changed("users/b.json", Some(&put.etag))
    );
    assert!(matches!(next_change(&mut users).await, Change::Gap { .. }));
    assert_eq!(next_change(&mut users).await, Change::InSync);
    assert_eq!(
        next_change(&mut users).await,
        changed("users/b.json", Some(&put.etag))
    );
}

async fn next_etag(storage: &Arc<dyn Storage>, path: &str) -> Option<String> {
    Some(storage.stat(path).await.unwrap().etag.unwrap())
}

/// A store that watches answers unchanged reads from memory, sees another
/// replica's change once notified, and after a server restart (a gap)
/// revalidates until it is in sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_store_reads_from_memory_until_notified() {
    let Some(mut server) = Nats::launch() else {
        return;
    };
    let url = format!("nats://{}/store?timeout_ms=1000", server.addr());
    let a = counter(connect(&url).await, true);
    let b = counter(connect(&url).await, false);
    let reads = |s: &Store<String, u64>| s.stats().downloads + s.stats().not_modified;
    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    let until_memory = || async {
        must_finish("reads served from memory", GUARD, async {
            loop {
                let before = reads(&a);
                let v = a.get("k".into()).await.unwrap();
                if reads(&a) == before {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .0
    };
    assert_eq!(until_memory().await.as_deref(), Some(&1));
    let before = reads(&a);
    for _ in 0..100 {
        assert_eq!(a.get("k".into()).await.unwrap().as_deref(), Some(&1));
    }
    assert_eq!(reads(&a), before, "unchanged watched reads asked storage");

    b.update("k".into(), true, |n| Ok((n + 1, true)))
        .await
        .unwrap();
    must_finish("b's change seen by a", GUARD, async {
        while a.get("k".into()).await.unwrap().as_deref() != Some(&2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    tokio::task::block_in_place(|| server.stop());
    tokio::task::block_in_place(|| server.start());
    eventually("b writes after the restart", || {
        b.update("k".into(), true, |n| Ok((n + 1, true)))
    })
    .await;
    assert_eq!(until_memory().await.as_deref(), Some(&3));
    assert!(a.stats().watch_gaps >= 1, "{:?}", a.stats());
}

/// User and password, or a token, in the URL or its query, as NATS tools
/// take them; wrong or missing credentials: `PermissionDenied` (nothing
/// was sent), and the secret shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url() {
    const T: &str = "timeout_ms=1000";
    for (args, good, wrong) in [
        (
            &["--user", "app", "--pass", "s3cret"][..],
            [
                "app:s3cret@{addr}/auth?{T}",
                "{addr}/auth?user=app&password=s3cret&{T}",
            ],
            "app:hunter2@{addr}/auth?{T}",
        ),
        (
            &["--auth", "t0ken"][..],
            ["t0ken@{addr}/auth?{T}", "{addr}/auth?token=t0ken&{T}"],
            "hunter2@{addr}/auth?{T}",
        ),
    ] {
        let Some(server) = servers::nats_with(args) else {
            return;
        };
        let url = |form: &str| {
            let form = form.replace("{addr}", server.addr()).replace("{T}", T);
            format!("nats://{form}")
        };
        for form in good {
            let storage = connect(&url(form)).await;
            storage.simple_upload("doc", "1".into()).await.unwrap();
            assert_eq!(storage.simple_download("doc").await.unwrap(), "1");
        }
        for form in [wrong, "{addr}/auth?{T}"] {
            let storage = connect(&url(form)).await;
            assert!(!format!("{storage:?}").contains("hunter2"), "{storage:?}");
            for e in [
                storage.simple_download("doc").await.unwrap_err(),
                storage.simple_upload("doc", "2".into()).await.unwrap_err(),
            ] {
                assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{form}: {e}");
                assert!(!e.to_string().contains("hunter2"), "{e}");
            }
        }
    }
}

/// A `.creds` or nkey seed file that cannot be read is refused when the
/// storage is set up, naming the file; `Debug` shows neither secret.
#[tokio::test]
async fn unreadable_credential_files_are_invalid_input() {
    for param in ["creds", "nkey"] {
        let url = format!("nats://127.0.0.1:1/b?{param}=/nonexistent/app.{param}");
        for e in [
            NatsStorage::from_url(&url).await.unwrap_err(),
            metadatacache::open(&url).await.unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            assert_eq!(e.backend(), Some("nats"), "{e}");
            assert!(e.to_string().contains("/nonexistent/app."), "{e}");
        }
    }
    let s = NatsStorage::from_url("nats://u:hunter2@127.0.0.1:1/b/p")
        .await
        .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    assert_eq!((s.bucket(), s.prefix()), ("b", "p"));
    let s = NatsStorage::from_url("nats://hunter2@127.0.0.1:1/b")
        .await
        .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
}

//! The PostgreSQL backend against a real server (started by
//! `support::servers`): the conformance suite, URL errors, outages and
//! reconnects, lost replies, timeouts, permissions and placement.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metadatacache::{
    DownloadRequest, Error, ErrorKind, Options, PostgresStorage, RetryPolicy, Storage, Store,
    UploadRequest,
};
use support::must_finish;
use support::servers::{self, Server};

/// The hang detector of calls that should end within their timeout: many
/// times any timeout used here.
const GUARD: Duration = Duration::from_secs(60);

fn url(server: &Server, query: &str) -> String {
    format!("postgres://postgres@{}/postgres{query}", server.addr())
}

async fn connect(server: &Server, query: &str) -> PostgresStorage {
    PostgresStorage::from_url(&url(server, query))
        .await
        .unwrap()
}

/// A plain driver connection, for what the storage API cannot do.
async fn admin(server: &Server) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&url(server, ""), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn kind<T: std::fmt::Debug>(res: metadatacache::Result<T>) -> ErrorKind {
    match res {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert_eq!(e.backend(), Some("postgres"), "{e}");
            e.kind()
        }
    }
}

/// Retries `op` while the storage reconnects; returns its value and how
/// many attempts failed first. Fails the test if it is not back after
/// [`GUARD`] (a hang detector, not a speed bound).
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> (T, usize)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = metadatacache::Result<T>>,
{
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match op().await {
            Ok(v) => return (v, failed),
            Err(e) if start.elapsed() < GUARD => {
                eprintln!("{what}: still failing: {e}");
                failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: not back after {GUARD:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = connect(&server, "?table=suite").await;
    assert_eq!(s.backend(), "postgres");
    metadatacache::conformance::run_all(Arc::new(s), "suite").await;
    // At the root of a table of its own, opened through the URL dispatch.
    let s = metadatacache::open(&url(&server, "?table=suite_root"))
        .await
        .unwrap();
    assert_eq!(s.backend(), "postgres");
    metadatacache::conformance::run_all(s, "").await;
}

#[tokio::test]
async fn bad_urls_are_invalid_input_naming_the_url() {
    for bad in [
        "postgres://u@127.0.0.1:1/db?table=no-dashes",
        "postgres://u@127.0.0.1:1/db?table=drop%20table",
        "postgresql://u@127.0.0.1:1/db?table=1starts_with_digit",
        "postgres://u@127.0.0.1:1/db?timeout_ms=-5",
        "postgres://u@127.0.0.1:1/db?pool_size=many",
        "postgres://u@127.0.0.1:1/db?sslmode=require",
        "postgres://u@127.0.0.1:notaport/db",
    ] {
        let e = PostgresStorage::from_url(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        assert_eq!(e.backend(), Some("postgres"), "{bad}: {e}");
        assert!(e.to_string().contains(bad), "{bad}: {e}");
        let e = metadatacache::open(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
    }
    let e = PostgresStorage::from_url("postgres://u:hunter2@127.0.0.1:1/db?table=a-b")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
}

#[tokio::test]
async fn unreachable_and_silent_servers_are_unavailable_within_the_timeout() {
    // Nothing listens on a port we just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://u@127.0.0.1:{port}/db?timeout_ms=500");
    let (res, _) = must_finish(
        "connect to a closed port",
        GUARD,
        PostgresStorage::from_url(&url),
    )
    .await;
    let e = res.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");

    // A peer that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let url = format!("postgres://u@{addr}/db?timeout_ms=500");
    let (res, took) = must_finish(
        "connect to a silent server",
        GUARD,
        PostgresStorage::from_url(&url),
    )
    .await;
    let e = res.unwrap_err();
    eprintln!("silent server: {e} after {took:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Ended by the timeout (timers never fire early), not by a refusal.
    assert!(took >= Duration::from_millis(500), "{took:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_then_the_same_storage_recovers() {
    let Some(mut server) = servers::postgres() else {
        return;
    };
    let s = connect(&server, "?table=outage&timeout_ms=1000").await;
    let v1 = s.simple_upload("doc.json", "1".into()).await.unwrap();

    tokio::task::block_in_place(|| server.stop());
    let (up, up_took) = must_finish(
        "upload during the outage",
        GUARD,
        s.upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("doc.json", "2")
        }),
    )
    .await;
    assert_eq!(kind(up), ErrorKind::Unavailable);
    let (down, down_took) = must_finish(
        "download during the outage",
        GUARD,
        s.download(DownloadRequest::new("doc.json")),
    )
    .await;
    assert_eq!(kind(down), ErrorKind::Unavailable);
    for op in ["list", "stat", "delete"] {
        let res = match op {
            "list" => s.list_dir("").await.map(drop),
            "stat" => s.stat("doc.json").await.map(drop),
            _ => s.delete("doc.json").await,
        };
        assert_eq!(kind(res), ErrorKind::Unavailable, "{op}");
    }
    eprintln!("server down: upload Unavailable after {up_took:?}, download after {down_took:?}");

    tokio::task::block_in_place(|| server.start());
    let (v2, took) = eventually("upload after restart", || {
        s.upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("doc.json", "2")
        })
    })
    .await;
    eprintln!("server back: the same storage wrote again after {took} failed attempts");
    let got = s.download(DownloadRequest::new("doc.json")).await.unwrap();
    assert_eq!((got.content.as_ref(), got.etag), (b"2".as_ref(), v2.etag));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_with_an_outage_loses_nothing() {
    let Some(mut server) = servers::postgres() else {
        return;
    };
    const TASKS: usize = 4;
    const PER_TASK: usize = 150;
    let acked = Arc::new(AtomicU64::new(0));
    let maybe = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let mut storages = Vec::new();
    for _replica in 0..2 {
        let storage: Arc<dyn Storage> =
            Arc::new(connect(&server, "?table=counter&timeout_ms=1000").await);
        storages.push(Arc::clone(&storage));
        let store: Store<String, u64> = Store::new(
            Options::new(storage, |_: &String| "counter.json".to_owned())
                .init(|| 0)
                .retries(10_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
        );
        for _ in 0..TASKS {
            let (store, acked, maybe) = (store.clone(), Arc::clone(&acked), Arc::clone(&maybe));
            handles.push(tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    match store
                        .update("c".to_owned(), true, |n| Ok::<_, Error>((n + 1, true)))
                        .await
                    {
                        Ok(()) => acked.fetch_add(1, Ordering::SeqCst),
                        Err(e) if e.kind() == ErrorKind::Unavailable => {
                            // Back off so that the outage does not use up all iterations.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            maybe.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(e) => panic!("update: {e}"),
                    };
                }
            }));
        }
    }
    while acked.load(Ordering::SeqCst) < 150 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_stop = acked.load(Ordering::SeqCst);
    tokio::task::block_in_place(|| server.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| server.start());
    for h in handles {
        h.await.unwrap();
    }
    let (bytes, _) = eventually("read the counter", || {
        storages[0].simple_download("counter.json")
    })
    .await;
    let total: u64 = serde_json::from_slice(&bytes).unwrap();
    let (acked, maybe) = (acked.load(Ordering::SeqCst), maybe.load(Ordering::SeqCst));
    eprintln!(
        "counter: stopped after {at_stop} acks; acknowledged {acked}, maybe {maybe}, final {total}"
    );
    assert_eq!(acked + maybe, (2 * TASKS * PER_TASK) as u64);
    assert!(
        total >= acked,
        "lost updates: final {total} < acknowledged {acked}"
    );
    assert!(
        total <= acked + maybe,
        "final {total} > acknowledged {acked} + maybe {maybe}"
    );
    assert!(maybe > 0, "the outage produced no Unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = connect(
        &server,
        "?table=killed&timeout_ms=2000&application_name=killme",
    )
    .await;
    let admin = admin(&server).await;
    let kill = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                WHERE application_name = 'killme'";
    for i in 0..5 {
        s.simple_upload("k.json", i.to_string().into())
            .await
            .unwrap();
        let killed = admin.query(kill, &[]).await.unwrap().len();
        assert!(killed >= 1, "no connection to kill");
        // The pooled connection is dead; the next calls must not fail for it
        // more than once, and reads not at all.
        let got = s.simple_download("k.json").await.unwrap();
        assert_eq!(got, i.to_string());
    }
    admin.query(kill, &[]).await.unwrap();
    let (_, failed) =
        eventually("write after kill", || s.simple_upload("k.json", "x".into())).await;
    assert!(
        failed <= 1,
        "a killed connection failed {failed} writes, not at most one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_sql_wildcards_list_exactly() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = connect(&server, "?table=wild").await;
    for p in [
        "a%/x.json",
        "a_/y.json",
        "ab/z.json",
        "a%b.json",
        "a_b.json",
        "a\u{e4}/deep/q.json",
        "a.json",
        "a0.json",
        "a/in.json",
    ] {
        s.simple_upload(p, "12345".into()).await.unwrap();
    }
    let names = |v: Vec<metadatacache::FileInfo>| v.into_iter().map(|i| i.path).collect::<Vec<_>>();
    assert_eq!(names(s.list_dir("a%").await.unwrap()), ["a%/x.json"]);
    assert_eq!(names(s.list_dir("a_").await.unwrap()), ["a_/y.json"]);
    assert_eq!(names(s.list_dir("a").await.unwrap()), ["a/in.json"]);
    assert_eq!(
        names(s.list_dir("a\u{e4}").await.unwrap()),
        ["a\u{e4}/deep"]
    );
    let root = s.list_dir("").await.unwrap();
    let mut sorted = names(root.clone());
    sorted.sort();
    assert_eq!(names(root.clone()), sorted, "sorted by bytes");
    assert_eq!(
        names(root.clone()),
        [
            "a", "a%", "a%b.json", "a.json", "a0.json", "a_", "a_b.json", "ab", "a\u{e4}"
        ]
    );
    let file = root.iter().find(|i| i.path == "a%b.json").unwrap();
    assert!(file.is_file() && file.size == 5 && file.mtime.is_some() && file.etag.is_some());
    assert!(root.iter().find(|i| i.path == "a_").unwrap().is_dir());
    assert!(s.stat("a\u{e4}/deep").await.unwrap().is_dir());
    assert_eq!(kind(s.stat("a\u{e4}/de").await), ErrorKind::NotFound);
    assert!(s.list_dir("a\u{e4}/de").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_and_directories_do_not_overlap() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = connect(&server, "?table=placement").await;
    s.simple_upload("d/x.json", "1".into()).await.unwrap();
    s.simple_upload("f.json", "1".into()).await.unwrap();
    assert_eq!(
        kind(s.simple_upload("d", "1".into()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(s.simple_upload("f.json/y", "1".into()).await),
        ErrorKind::InvalidInput
    );
    let create = UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new("f.json/z/w", "1")
    };
    assert_eq!(kind(s.upload(create).await), ErrorKind::InvalidInput);
    assert!(s.list_dir("f.json").await.unwrap().is_empty());
    assert!(s.stat("d").await.unwrap().is_dir());
    // Overwriting a document is not a placement problem.
    s.simple_upload("f.json", "2".into()).await.unwrap();
    s.make_dir_if_not_exist("brand/new").await.unwrap();
    assert_eq!(
        kind(s.make_dir_if_not_exist("bad//dir").await),
        ErrorKind::InvalidInput
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_tables_and_debug() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = PostgresStorage::from_url(&format!(
        "postgres://postgres:hunter2@{}/postgres?table=one",
        server.addr()
    ))
    .await
    .unwrap();
    assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
    assert!(format!("{s:?}").contains("one"), "{s:?}");
    assert_eq!(s.table(), "one");
    let v1 = s.simple_upload("e.json", "same".into()).await.unwrap();
    let v2 = s.simple_upload("e.json", "same".into()).await.unwrap();
    assert_ne!(v1.etag, v2.etag, "every write gets a new etag");
    assert_eq!(s.stat("e.json").await.unwrap().etag, Some(v2.etag.clone()));
    let d = s.download(DownloadRequest::new("e.json")).await.unwrap();
    assert_eq!(d.mtime, v2.mtime, "upload and download agree on mtime");
    // Another storage object on the same table sees it; another table does not.
    let same = connect(&server, "?table=one").await;
    assert_eq!(
        kind(
            same.download(DownloadRequest::if_none_match("e.json", &v2.etag))
                .await
        ),
        ErrorKind::NotModified
    );
    let other = connect(&server, "?table=two").await;
    assert_eq!(
        kind(other.download(DownloadRequest::new("e.json")).await),
        ErrorKind::NotFound
    );
    // An explicit mtime is stored (to the microsecond).
    let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let v3 = s
        .upload(UploadRequest {
            mtime: Some(t),
            ..UploadRequest::new("e.json", "t")
        })
        .await
        .unwrap();
    assert_eq!(v3.mtime, t);
    assert_eq!(s.stat("e.json").await.unwrap().mtime, Some(t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_create_the_table_once() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let url = url(&server, "?table=raced");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStorage::from_url(&url).await })
        })
        .collect();
    for h in handles {
        let s = h.await.unwrap().unwrap();
        s.init("ignored").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_and_privileges_are_permission_denied() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let owner = connect(&server, "?table=guarded").await;
    owner.simple_upload("g.json", "1".into()).await.unwrap();
    let admin = admin(&server).await;
    admin
        .batch_execute("CREATE ROLE locked NOLOGIN; CREATE ROLE outsider LOGIN;")
        .await
        .unwrap();
    let locked = format!("postgres://locked@{}/postgres?table=guarded", server.addr());
    let e = PostgresStorage::from_url(&locked).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let outsider = format!(
        "postgres://outsider@{}/postgres?table=guarded",
        server.addr()
    );
    match PostgresStorage::from_url(&outsider).await {
        // The table exists, so connecting may succeed; using it may not.
        Ok(s) => {
            assert_eq!(
                kind(s.simple_download("g.json").await),
                ErrorKind::PermissionDenied
            );
            assert_eq!(
                kind(s.simple_upload("g.json", "2".into()).await),
                ErrorKind::PermissionDenied
            );
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}"),
    }
    let e = PostgresStorage::from_url(&format!("postgres://postgres@{}/nosuchdb", server.addr()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stuck_past_the_timeout_or_cut_off_is_unavailable() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = connect(
        &server,
        "?table=stuck&timeout_ms=1000&application_name=stuck",
    )
    .await;
    let v1 = s.simple_upload("lock.json", "1".into()).await.unwrap();
    let admin = admin(&server).await;
    let cas = || {
        s.upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("lock.json", "2")
        })
    };

    // A row lock held elsewhere: the server is up but the statement hangs.
    admin
        .batch_execute("BEGIN; SELECT 1 FROM stuck WHERE path = 'lock.json' FOR UPDATE")
        .await
        .unwrap();
    let (res, took) = must_finish("a write blocked on a row lock", GUARD, cas()).await;
    let e = res.unwrap_err();
    eprintln!("write blocked on a lock: {e} after {took:?}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    // Ended by the timeout (timers never fire early), not by a refusal.
    assert!(took >= Duration::from_millis(900), "{took:?}");
    // The abandoned statement was cancelled, so it does not land later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin.batch_execute("ROLLBACK").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.simple_download("lock.json").await.unwrap(), "1");

    // The connection is cut while the write waits: unknown outcome.
    admin
        .batch_execute("BEGIN; SELECT 1 FROM stuck WHERE path = 'lock.json' FOR UPDATE")
        .await
        .unwrap();
    let (res, ()) = tokio::join!(cas(), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        admin
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'stuck' AND wait_event_type = 'Lock'",
            )
            .await
            .unwrap();
    });
    let e = res.unwrap_err();
    eprintln!("write cut off: {e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    admin.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(s.simple_download("lock.json").await.unwrap(), "1");
    // And the storage carries on.
    cas().await.unwrap();
    assert_eq!(s.simple_download("lock.json").await.unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_ranges_use_the_primary_key() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let _s = connect(&server, "?table=planned").await;
    let admin = admin(&server).await;
    admin
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = admin
        .query(
            "EXPLAIN SELECT path FROM planned \
             WHERE path COLLATE \"C\" >= 'a/' AND path COLLATE \"C\" < 'a0'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("planned_pkey"), "{plan}");
}

/// Writes that time out and still land later (`delayed_apply`) are never
/// applied twice: 1, 2 and 4 stores on one PostgreSQL table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_landing_writes_keep_the_promise() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let storage: Arc<dyn Storage> = Arc::new(connect(&server, "?table=late").await);
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
        eprintln!("postgres, {stores} stores: {run:?}");
    }
}

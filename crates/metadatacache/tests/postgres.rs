//! The PostgreSQL backend against a real server (started by
//! `common::servers`): the shared suite of `common::suite`, and what only
//! PostgreSQL has: SQL wildcards, placement, tables, logins and privileges,
//! killed connections and writes blocked on a row lock.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::servers::{self, Server};
use common::suite::{self, TestServer};
use common::{GUARD, create, eventually, must_finish};
use metadatacache::{DownloadRequest, ErrorKind, PostgresStorage, Result, Storage, UploadRequest};

struct Postgres;

impl TestServer for Postgres {
    const BACKEND: &'static str = "postgres";
    const CONNECTS_ON_OPEN: bool = true;
    const SECRET_URL: &'static str = "postgres://u:hunter2@127.0.0.1:1/db?table=a-b";
    // Tables are plain SQL identifiers.
    const BAD_SPACES: &'static [&'static str] =
        &["no-dashes", "drop%20table", "1starts_with_digit"];
    // verify-full needs sslrootcert; libpq's "allow" is not supported.
    const BAD_PARAMS: &'static [&'static str] =
        &["pool_size=many", "sslmode=verify-full", "sslmode=allow"];

    fn launch() -> Option<Server> {
        servers::postgres()
    }

    /// By the other scheme, `postgresql://`: the tests of this file use
    /// `postgres://`.
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        let timeout = suite::timeout_query("&", timeout);
        format!("postgresql://postgres@{addr}/postgres?table={space}{timeout}")
    }

    fn root_url(addr: &str, space: &str) -> String {
        Self::url(addr, space, None)
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(PostgresStorage::from_url(url).await?))
    }

    /// Through the URL dispatch, as the command line opens it.
    async fn open_url(url: &str) -> Result<Arc<dyn Storage>> {
        metadatacache::open(url).await
    }
}

suite::server_tests!(Postgres;
    served: conformance, outage_then_recovery, counter_counts_exactly, counter_survives_restart,
        late_landing_writes, lost_replies_are_resolved_by_write_token,
        combined_writes_count_exactly,
        watch_reports_changes_of_another_handle, watched_stores_serve_from_memory,
        watch_survives_restart, watched_history_across_restart, watched_counter_counts_exactly;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

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

fn kind<T: std::fmt::Debug>(res: Result<T>) -> ErrorKind {
    Postgres::kind(res)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_replaced() {
    let Some(server) = Postgres::launch() else {
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
    let Some(server) = Postgres::launch() else {
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
    let Some(server) = Postgres::launch() else {
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
    assert_eq!(
        kind(s.upload(create("f.json/z/w", "1")).await),
        ErrorKind::InvalidInput
    );
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
    let Some(server) = Postgres::launch() else {
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
    let Some(server) = Postgres::launch() else {
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
    // The change trigger too, once (row changes and TRUNCATE).
    let triggers = admin(&server)
        .await
        .query(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'raced'::regclass AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(triggers.len(), 2, "{triggers:?}");
}

/// NOTIFY carries less than 8000 bytes. A write whose etag does not fit is
/// reported with an unknown etag; a path that does not fit (only another
/// tool can write one: paths are at most 1024 bytes here) and a TRUNCATE
/// are reported as a gap, then in sync: never silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_too_big_for_a_notification_are_not_lost() {
    use common::watching::{changed, next_change};
    use metadatacache::Change;
    let Some(server) = Postgres::launch() else {
        return;
    };
    let s = connect(&server, "?table=bignotify").await;
    let mut stream = s.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let big_etag = UploadRequest {
        write_token: Some("t".repeat(9000)),
        ..UploadRequest::new("big-etag.json", "1")
    };
    s.upload(big_etag).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("big-etag.json", None)
    );
    let admin = admin(&server).await;
    let long_path = "p".repeat(9000);
    let by_another_tool = [
        "INSERT INTO bignotify (path, content, etag, mtime) VALUES ($1, 'x', 'e', now())",
        "DELETE FROM bignotify WHERE path = $1",
    ];
    for sql in by_another_tool {
        admin.execute(sql, &[&long_path]).await.unwrap();
        let gap = next_change(&mut stream).await;
        assert!(
            matches!(&gap, Change::Gap { reason } if reason.contains("too long")),
            "{gap:?}"
        );
        assert_eq!(next_change(&mut stream).await, Change::InSync);
    }
    admin.batch_execute("TRUNCATE bignotify").await.unwrap();
    let gap = next_change(&mut stream).await;
    assert!(
        matches!(&gap, Change::Gap { reason } if reason.contains("truncate")),
        "{gap:?}"
    );
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let v = s.simple_upload("after.json", "1".into()).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("after.json", Some(&v.etag))
    );
}

/// A role that may write the table but does not own it opens it (the
/// trigger exists, so nothing is created) and follows its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_does_not_own_the_table_can_watch() {
    use common::watching::{changed, next_change};
    use metadatacache::Change;
    let Some(server) = Postgres::launch() else {
        return;
    };
    let owner = connect(&server, "?table=shared").await;
    admin(&server)
        .await
        .batch_execute("CREATE ROLE writer LOGIN; GRANT ALL ON shared TO writer;")
        .await
        .unwrap();
    let writer = PostgresStorage::from_url(&format!(
        "postgres://writer@{}/postgres?table=shared",
        server.addr()
    ))
    .await
    .unwrap();
    let mut stream = writer.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let v = owner.simple_upload("x.json", "1".into()).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("x.json", Some(&v.etag))
    );
    let v = writer.simple_upload("y.json", "1".into()).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("y.json", Some(&v.etag))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_and_privileges_are_permission_denied() {
    let Some(server) = Postgres::launch() else {
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
    let Some(server) = Postgres::launch() else {
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
    let Some(server) = Postgres::launch() else {
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

/// Statements are prepared once per connection, and the table here grows
/// without statistics (no ANALYZE): the checks of every write (no parent
/// is a document, nothing lies below the path) must stay on the primary
/// key instead of scanning the whole table. Counted with the table's scan
/// statistics, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stay_on_the_primary_key_as_the_table_grows() {
    let Some(server) = Postgres::launch() else {
        return;
    };
    // One connection, so that its prepared statements serve every write.
    let s = connect(&server, "?table=grown&pool_size=1").await;
    for i in 0..20 {
        s.simple_upload(&format!("small/{i}.json"), "{}".into())
            .await
            .unwrap();
    }
    let admin = admin(&server).await;
    admin
        .batch_execute(
            "INSERT INTO grown (path, content, etag, mtime) \
             SELECT 'bulk/' || g || '.json', '\\x7b7d', 'e' || g, now() \
             FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    let counters = || async {
        let row = admin
            .query_one(
                "SELECT seq_scan, n_tup_ins FROM pg_stat_user_tables WHERE relname = 'grown'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    // Statistics reach other sessions within about 10 s of a write.
    let settled = |inserted: i64| async move {
        for _ in 0..300 {
            let (scans, ins) = counters().await;
            if ins >= inserted {
                return scans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the table's statistics never showed {inserted} inserts");
    };
    let before = settled(20_020).await;
    for i in 0..100 {
        s.simple_upload(&format!("more/{i}.json"), "{}".into())
            .await
            .unwrap();
    }
    let after = settled(20_120).await;
    assert!(
        after - before < 10,
        "{} whole-table scans for 100 writes",
        after - before
    );
}

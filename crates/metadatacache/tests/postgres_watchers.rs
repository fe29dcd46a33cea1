//! PostgreSQL's change trigger notifies only while a session watches the
//! table (NOTIFY serialises commits database-wide, so writers nobody
//! watches must not pay for it), against a real server:
//!
//! - a write made while nobody watches sends no notification, one made
//!   while a watch is open does, and a dead watcher's entry is cleared;
//! - a watch does not report in sync while a write that looked before it
//!   entered (and so did not notify) is uncommitted, and a write whose
//!   transaction's snapshot predates the watch's entry notifies anyway;
//! - a table with the trigger of an earlier version moves to this one when
//!   its owner opens it, and keeps it when a role that may not change it
//!   opens it;
//! - a listening connection that goes silent (the server sends nothing,
//!   the socket stays open) is noticed: a gap, then in sync again.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::servers::{self, Server};
use common::watching::{changed, next_change};
use common::{GUARD, must_finish};
use futures_util::StreamExt;
use metadatacache::{Change, DownloadRequest, PostgresStorage, Storage};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

fn url(server: &Server, user: &str, table: &str) -> String {
    format!("postgres://{user}@{}/postgres?table={table}", server.addr())
}

async fn open(server: &Server, table: &str) -> PostgresStorage {
    PostgresStorage::from_url(&url(server, "postgres", table))
        .await
        .unwrap()
}

/// A plain driver connection, whose notifications (if it listens) go to
/// the receiver.
async fn admin(server: &Server) -> (Client, mpsc::UnboundedReceiver<String>) {
    let plain = format!("postgres://postgres@{}/postgres", server.addr());
    let (client, mut conn) = tokio_postgres::connect(&plain, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    (client, rx)
}

/// The next notification of `rx`.
async fn next_payload(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    must_finish("a notification", GUARD, rx.recv())
        .await
        .0
        .expect("the listening connection ended")
}

/// How many watchers of `channel` are entered.
async fn watchers(client: &Client, channel: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM mdcache_watchers WHERE channel = $1",
            &[&channel],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_notify_only_while_someone_watches() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = open(&server, "quiet").await;
    // A session that listens without entering itself as a watcher hears
    // what the trigger sends, in commit order.
    let (spy, mut heard) = admin(&server).await;
    spy.batch_execute("LISTEN mdcache_quiet").await.unwrap();
    s.simple_upload("unwatched.json", "1".into()).await.unwrap();
    let mut stream = s.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let v = s.simple_upload("watched.json", "1".into()).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("watched.json", Some(&v.etag))
    );
    let first = next_payload(&mut heard).await;
    assert!(
        first.contains("watched.json") && !first.contains("unwatched"),
        "a write made while nobody watched was notified: {first}"
    );
    assert_eq!(watchers(&spy, "mdcache_quiet").await, 1);

    // The watch ends; its entry goes once its session has ended, when the
    // next watcher (of any table) enters.
    drop(stream);
    let other = open(&server, "other").await;
    let start = tokio::time::Instant::now();
    while watchers(&spy, "mdcache_quiet").await > 0 {
        assert!(
            start.elapsed() < GUARD,
            "a dead watcher's entry stays after {GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut stream = other.watch("").await.unwrap();
        assert_eq!(next_change(&mut stream).await, Change::InSync);
    }
    s.simple_upload("after.json", "1".into()).await.unwrap();
    let mut stream = s.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    s.simple_upload("again.json", "1".into()).await.unwrap();
    let next = next_payload(&mut heard).await;
    assert!(
        next.contains("again.json"),
        "a write made after the last watcher left was notified: {next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_waits_out_writes_that_did_not_notify() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = open(&server, "gated").await;
    s.simple_upload("x.json", "1".into()).await.unwrap();
    // A write whose trigger ran while nobody watched, not yet committed.
    let (writer, _) = admin(&server).await;
    writer
        .batch_execute("BEGIN; UPDATE gated SET content = '2', etag = 'late' WHERE path = 'x.json'")
        .await
        .unwrap();
    let watching = s.clone();
    let mut watch = tokio::spawn(async move { watching.watch("").await });
    // Not a speed bound: the watch must not be in sync before the commit,
    // however long that takes.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut watch).await;
    assert!(
        early.is_err(),
        "the watch started while a write that did not notify was uncommitted"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    let mut stream = must_finish("the watch", GUARD, watch)
        .await
        .0
        .unwrap()
        .unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    // In sync means the late write is visible, and what follows is told.
    let now = s.download(DownloadRequest::new("x.json")).await.unwrap();
    assert_eq!(now.etag, "late");
    let v = s.simple_upload("y.json", "1".into()).await.unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("y.json", Some(&v.etag))
    );
}

/// A writer whose transaction is REPEATABLE READ took its snapshot before
/// a watch entered itself, and writes after the watch is in sync: the
/// trigger's lookup of watchers reads that older snapshot, so the change
/// must be notified regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_snapshot_predates_the_watch_is_told() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s = open(&server, "strict").await;
    s.simple_upload("x.json", "1".into()).await.unwrap();
    let (writer, _) = admin(&server).await;
    writer
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM strict")
        .await
        .unwrap();
    let mut stream = s.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    writer
        .batch_execute(
            "UPDATE strict SET content = '2', etag = 'strict' WHERE path = 'x.json'; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("x.json", Some("strict"))
    );
}

/// The triggers on `table`, by name.
async fn triggers(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT tgname::text FROM pg_trigger \
             WHERE tgrelid = $1::text::regclass AND NOT tgisinternal ORDER BY tgname",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_the_earlier_trigger_move_to_this_one() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let (admin, mut heard) = admin(&server).await;
    // Tables as an earlier version left them: its trigger notifies every
    // change.
    let earlier = |table: &str, trigger: &str| {
        format!(
            "CREATE TABLE {table} (path TEXT COLLATE \"C\" PRIMARY KEY, content BYTEA NOT NULL, \
                 etag TEXT NOT NULL, mtime TIMESTAMPTZ NOT NULL); \
             CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table} \
               FOR EACH ROW EXECUTE FUNCTION mdcache_notify_v1('mdcache_{table}'); \
             CREATE TRIGGER {trigger}_truncate AFTER TRUNCATE ON {table} \
               FOR EACH STATEMENT EXECUTE FUNCTION mdcache_notify_v1('mdcache_{table}');"
        )
    };
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION mdcache_notify_v1() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify(TG_ARGV[0], 'v1'); RETURN NULL; END $$; \
             {} {} {} \
             CREATE ROLE tenant LOGIN; GRANT ALL ON kept TO tenant; LISTEN mdcache_kept;",
            earlier("moved", "mdcache_notify_v1"),
            earlier("moved_v2", "mdcache_notify_v2"),
            earlier("kept", "mdcache_notify_v1"),
        ))
        .await
        .unwrap();

    for table in ["moved", "moved_v2"] {
        let owner = open(&server, table).await;
        assert_eq!(
            triggers(&admin, table).await,
            ["mdcache_notify_v3", "mdcache_notify_v3_truncate"]
        );
        owner.simple_upload("a.json", "1".into()).await.unwrap();
    }

    // A role that may write the table but not change its triggers opens
    // it: it keeps the earlier trigger, which still notifies every write.
    let tenant = PostgresStorage::from_url(&url(&server, "tenant", "kept"))
        .await
        .unwrap();
    assert_eq!(
        triggers(&admin, "kept").await,
        ["mdcache_notify_v1", "mdcache_notify_v1_truncate"]
    );
    tenant.simple_upload("b.json", "1".into()).await.unwrap();
    assert_eq!(next_payload(&mut heard).await, "v1");
    let mut stream = tenant.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
}

/// The listening connection goes silent while a change is notified: the
/// proxy holds everything the server sends on it (a dead route, a frozen
/// middlebox), so neither the notification nor any error arrives. The
/// idle check (every 10 s) gets no answer within the timeout: the stream
/// reports a gap, reconnects and is in sync again, and later changes are
/// told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_listening_connection_is_noticed() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let writer = open(&server, "silent").await;
    let proxy = Proxy::start(server.addr()).await;
    let watcher = PostgresStorage::from_url(&format!(
        "postgres://postgres@{}/postgres?table=silent&timeout_ms=1000",
        proxy.addr()
    ))
    .await
    .unwrap();
    let mut stream = watcher.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    proxy.hold_replies();
    writer
        .simple_upload("unheard.json", "1".into())
        .await
        .unwrap();
    let gap = next_change(&mut stream).await;
    assert!(
        matches!(&gap, Change::Gap { reason } if reason.contains("did not answer")),
        "{gap:?}"
    );
    // On a new connection, which the proxy lets through.
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    let v = writer
        .simple_upload("heard.json", "1".into())
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut stream).await,
        changed("heard.json", Some(&v.etag))
    );
}

//! PostgreSQL's round trips, counted by a proxy in front of a real server
//! (one ReadyForQuery per statement): a refused create, compare-and-swap
//! update, other conditional upload or delete says why in the statement
//! that tried it — unless what
//! refused it committed while the statement waited, which a second look
//! finds — and a combined write of several documents is one statement.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::servers::{self, Server};
use common::{GUARD, cas, create, must_finish};
use metadatacache::{DownloadRequest, ErrorKind, PostgresStorage, Storage, UploadRequest};

/// Round trips to the server while `op` runs.
async fn round_trips<T>(proxy: &Proxy, op: impl Future<Output = T>) -> (u64, T) {
    let before = proxy.counts().ready_for_query;
    let out = op.await;
    (proxy.counts().ready_for_query - before, out)
}

/// A real server, a proxy in front of it, and a storage through the proxy
/// on the table and parameters of `query`, with one connection (so that
/// each statement is prepared once).
async fn through_proxy(query: &str) -> Option<(Server, Proxy, PostgresStorage)> {
    let server = servers::postgres()?;
    let proxy = Proxy::start(server.addr()).await;
    let url = format!(
        "postgres://postgres@{}/postgres?pool_size=1&table={query}",
        proxy.addr()
    );
    let storage = PostgresStorage::from_url(&url).await.unwrap();
    Some((server, proxy, storage))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_costs_no_more_round_trips_than_a_write() {
    let Some((_server, proxy, s)) = through_proxy("trips").await else {
        return;
    };
    s.simple_upload("a.json", "0".into()).await.unwrap();
    let mut etag = s
        .download(DownloadRequest::new("a.json"))
        .await
        .unwrap()
        .etag;
    // Twice each, so that every statement is prepared on the connection.
    let mut counted = Vec::new();
    for round in 0..2 {
        let (written, res) = round_trips(&proxy, s.upload(cas("a.json", &etag, "w"))).await;
        let stale = std::mem::replace(&mut etag, res.unwrap().etag);
        let (refused, res) = round_trips(&proxy, s.upload(cas("a.json", &stale, "r"))).await;
        let e = res.expect_err("a stale etag was accepted");
        assert!(e.is_conflict(), "{e}");
        let current = e.current().expect("the refusal carries no version");
        assert_eq!(current.etag, etag, "round {round}");
        assert_eq!(&current.content[..], b"w", "round {round}");
        counted.push((written, refused));
    }
    let (written, refused) = counted[1];
    assert!(
        written >= 1,
        "no round trip counted for a write: {counted:?}"
    );
    assert_eq!(
        refused, written,
        "a refused update took {refused} round trips, a write {written} ({counted:?})"
    );
    // And a refusal for a document that is gone.
    s.delete_if_match("a.json", Some(&etag)).await.unwrap();
    let (gone, res) = round_trips(&proxy, s.upload(cas("a.json", &etag, "x"))).await;
    assert!(res.is_err(), "an update of a deleted document was accepted");
    assert_eq!(
        gone, written,
        "an update of a deleted document: {gone} round trips"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_create_costs_no_more_round_trips_than_a_create() {
    let Some((_server, proxy, s)) = through_proxy("trips_create").await else {
        return;
    };
    // Twice, so that every statement is prepared on the connection.
    for round in 0..2 {
        let path = format!("c{round}.json");
        let (created, res) = round_trips(&proxy, s.upload(create(&path, "first"))).await;
        let first = res.unwrap();
        let (refused, res) = round_trips(&proxy, s.upload(create(&path, "second"))).await;
        let e = res.expect_err("a create over a document went through");
        assert!(e.is_conflict(), "{e}");
        let current = e.current().expect("the refusal carries no version");
        assert_eq!(current.etag, first.etag, "round {round}");
        assert_eq!(&current.content[..], b"first", "round {round}");
        // A parent path that is a document: no document can be created.
        let below = format!("{path}/below.json");
        let (blocked, res) = round_trips(&proxy, s.upload(create(&below, "x"))).await;
        let e = res.expect_err("a document was created below a document");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        if round == 1 {
            assert_eq!(created, 1, "a create took {created} round trips");
            assert_eq!(
                refused, created,
                "a refused create took {refused} round trips"
            );
            assert_eq!(
                blocked, created,
                "a create below a document took {blocked} round trips"
            );
        }
    }
    assert_eq!(s.simple_download("c1.json").await.unwrap(), "first");
}

/// An upload that is neither a create nor a compare-and-swap (an insert or
/// update, with `if_none_match` etags or `if_unmodified_since`) says why it
/// was refused in its one statement too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upsert_costs_no_more_round_trips_than_an_upsert() {
    let Some((_server, proxy, s)) = through_proxy("trips_upsert").await else {
        return;
    };
    // Twice, so that every statement is prepared on the connection.
    for round in 0..2 {
        let path = format!("u{round}.json");
        let (written, res) =
            round_trips(&proxy, s.upload(UploadRequest::new(&path, "first"))).await;
        let first = res.unwrap();
        let excluded = UploadRequest {
            if_none_match: vec![first.etag.clone()],
            ..UploadRequest::new(&path, "second")
        };
        let too_old = UploadRequest {
            if_unmodified_since: Some(first.mtime - Duration::from_secs(1)),
            ..UploadRequest::new(&path, "second")
        };
        let mut refused = Vec::new();
        for req in [excluded, too_old] {
            let (trips, res) = round_trips(&proxy, s.upload(req)).await;
            let e = res.expect_err("an upsert against its precondition went through");
            assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");
            let current = e.current().expect("the refusal carries no version");
            assert_eq!(current.etag, first.etag, "round {round}");
            assert_eq!(&current.content[..], b"first", "round {round}");
            refused.push(trips);
        }
        // A parent path that is a document: nothing can be written below.
        let below = UploadRequest::new(format!("{path}/below.json"), "x");
        let (blocked, res) = round_trips(&proxy, s.upload(below)).await;
        let e = res.expect_err("a document was written below a document");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        if round == 1 {
            assert_eq!(written, 1, "an upsert took {written} round trips");
            assert_eq!(
                refused,
                [written, written],
                "refused upserts took {refused:?} round trips"
            );
            assert_eq!(
                blocked, written,
                "an upsert below a document took {blocked} round trips"
            );
        }
    }
    assert_eq!(s.simple_download("u1.json").await.unwrap(), "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delete_costs_no_more_round_trips_than_a_delete() {
    let Some((_server, proxy, s)) = through_proxy("trips_delete").await else {
        return;
    };
    // Twice, so that every statement is prepared on the connection.
    for round in 0..2 {
        let path = format!("d{round}.json");
        let old = s.simple_upload(&path, "1".into()).await.unwrap();
        let new = s.simple_upload(&path, "2".into()).await.unwrap();
        let (refused, res) = round_trips(&proxy, s.delete_if_match(&path, Some(&old.etag))).await;
        let e = res.expect_err("a delete over a stale etag went through");
        assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");
        let (deleted, res) = round_trips(&proxy, s.delete_if_match(&path, Some(&new.etag))).await;
        res.unwrap();
        let (gone, res) = round_trips(&proxy, s.delete_if_match(&path, Some(&new.etag))).await;
        let e = res.expect_err("a deleted document was deleted again");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        if round == 1 {
            assert_eq!(deleted, 1, "a delete took {deleted} round trips");
            assert_eq!(
                refused, deleted,
                "a refused delete took {refused} round trips"
            );
            assert_eq!(gone, deleted, "a delete of a gone document took {gone}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combined_write_is_one_round_trip() {
    let Some((_server, proxy, s)) = through_proxy("trips_many").await else {
        return;
    };
    let paths: Vec<String> = (0..8).map(|i| format!("d{i}.json")).collect();
    for path in &paths {
        s.simple_upload(path, "0".into()).await.unwrap();
    }
    for round in 0..2 {
        let mut reqs = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let cur = s
                .download(DownloadRequest::new(path.as_str()))
                .await
                .unwrap();
            // Every other one stale: refusals ride in the same statement.
            let etag = if i % 2 == 0 { cur.etag } else { "stale".into() };
            reqs.push(cas(path, &etag, &format!("{round}")));
        }
        let (trips, results) = round_trips(&proxy, s.upload_many(reqs)).await;
        for (i, res) in results.iter().enumerate() {
            assert_eq!(res.is_ok(), i % 2 == 0, "round {round}, d{i}: {res:?}");
        }
        // The first round may prepare the statement.
        if round == 1 {
            assert_eq!(trips, 1, "a combined write of 8 took {trips} round trips");
        }
    }
}

/// Runs `op` on `path` of table `trips_race` while another transaction
/// (on `admin`) has written version `other` of the row and holds its lock
/// (replacing the row, or inserting it when `insert`), and commits that
/// transaction once `op`'s statement waits for the lock: `op`'s snapshot
/// shows the old version (or none), the row it finally meets is the new
/// one. Returns `op`'s round trips and result.
async fn behind_a_writing_transaction<T>(
    proxy: &Proxy,
    admin: &tokio_postgres::Client,
    path: &str,
    insert: bool,
    op: impl Future<Output = T>,
) -> (u64, T) {
    let write = if insert {
        format!(
            "INSERT INTO trips_race (path, content, etag, mtime) \
             VALUES ('{path}', convert_to('other', 'UTF8'), 'other-etag', now())"
        )
    } else {
        format!(
            "UPDATE trips_race SET content = convert_to('other', 'UTF8'), \
             etag = 'other-etag', mtime = now() WHERE path = '{path}'"
        )
    };
    admin
        .batch_execute(&format!("BEGIN; {write}"))
        .await
        .unwrap();
    let commit_once_blocked = async {
        loop {
            let rows = admin
                .query(
                    "SELECT 1 FROM pg_stat_activity \
                     WHERE application_name = 'race' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap();
            if !rows.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        admin.batch_execute("COMMIT").await.unwrap();
    };
    let both = async { tokio::join!(round_trips(proxy, op), commit_once_blocked) };
    must_finish("a call behind a row lock", GUARD, both)
        .await
        .0
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_a_write_that_committed_meanwhile_carries_its_version() {
    let Some((server, proxy, s)) = through_proxy("trips_race&application_name=race").await else {
        return;
    };
    let (admin, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@{}/postgres", server.addr()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Twice, so that every statement is prepared on the connection.
    for round in 0..2 {
        let path = format!("r{round}.json");
        let v1 = s.simple_upload(&path, "1".into()).await.unwrap();
        let write = s.upload(cas(&path, &v1.etag, "2"));
        let (trips, res) = behind_a_writing_transaction(&proxy, &admin, &path, false, write).await;
        let e = res.expect_err("a write over a replaced version was accepted");
        assert!(e.is_conflict(), "{e}");
        let current = e.current().expect("the refusal carries no version");
        assert_eq!(current.etag, "other-etag");
        assert_eq!(&current.content[..], b"other");
        assert_eq!(s.simple_download(&path).await.unwrap(), "other");
        // The update, then the look at what refused it.
        let update_trips = trips;

        let v1 = s.simple_upload(&path, "1".into()).await.unwrap();
        let delete = s.delete_if_match(&path, Some(&v1.etag));
        let (trips, res) = behind_a_writing_transaction(&proxy, &admin, &path, false, delete).await;
        let e = res.expect_err("a delete of a replaced version went through");
        assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");
        assert_eq!(s.simple_download(&path).await.unwrap(), "other");
        let delete_trips = trips;

        // A create that meets a row inserted (and not yet committed) by
        // another transaction waits for it; its snapshot shows no row.
        let new_path = format!("n{round}.json");
        let make = s.upload(create(&new_path, "mine"));
        let (trips, res) =
            behind_a_writing_transaction(&proxy, &admin, &new_path, true, make).await;
        let e = res.expect_err("a create over an inserted document went through");
        assert!(e.is_conflict(), "{e}");
        let current = e.current().expect("the refusal carries no version");
        assert_eq!(current.etag, "other-etag");
        assert_eq!(&current.content[..], b"other");
        assert_eq!(s.simple_download(&new_path).await.unwrap(), "other");
        let create_trips = trips;

        // An upsert that excludes the version the other transaction writes:
        // its snapshot shows one it does not exclude.
        s.simple_upload(&path, "1".into()).await.unwrap();
        let upsert = s.upload(UploadRequest {
            if_none_match: vec!["other-etag".into()],
            ..UploadRequest::new(&path, "mine")
        });
        let (trips, res) = behind_a_writing_transaction(&proxy, &admin, &path, false, upsert).await;
        let e = res.expect_err("an upsert over an excluded version went through");
        assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");
        let current = e.current().expect("the refusal carries no version");
        assert_eq!(current.etag, "other-etag");
        assert_eq!(s.simple_download(&path).await.unwrap(), "other");
        if round == 1 {
            assert_eq!(update_trips, 2, "update: {update_trips} round trips");
            assert_eq!(delete_trips, 2, "delete: {delete_trips} round trips");
            assert_eq!(create_trips, 2, "create: {create_trips} round trips");
            assert_eq!(trips, 2, "upsert: {trips} round trips");
        }
    }
}

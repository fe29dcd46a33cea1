//! PostgreSQL's combined writes (`upload_many`) against a real server: two
//! of them over the same rows in opposite orders never deadlock, and one
//! whose reply is lost after the server applied it is answered `Ok` by
//! looking up its etags.

#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::proxy::{Proxy, Release};
use common::servers;
use metadatacache::{DownloadRequest, PostgresStorage, Storage, UploadRequest, new_write_token};

async fn open(addr: &str, query: &str) -> PostgresStorage {
    PostgresStorage::from_url(&format!("postgres://postgres@{addr}/postgres{query}"))
        .await
        .unwrap()
}

/// Compare-and-swap updates of `paths` over their current etags.
async fn updates(s: &dyn Storage, paths: &[String], body: &str) -> Vec<UploadRequest> {
    let mut reqs = Vec::new();
    for path in paths {
        let cur = s
            .download(DownloadRequest::new(path.as_str()))
            .await
            .unwrap();
        reqs.push(UploadRequest {
            if_match: Some(cur.etag),
            write_token: Some(new_write_token()),
            ..UploadRequest::new(path.clone(), body.to_owned())
        });
    }
    reqs
}

/// One combined write through the storage's only connection, which
/// prepares the statement there.
async fn warm_up(s: &dyn Storage, paths: &[String]) {
    let reqs = updates(s, paths, "0").await;
    assert!(s.upload_many(reqs).await.iter().all(Result::is_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_writes_over_the_same_rows_never_deadlock() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let s: Arc<dyn Storage> = Arc::new(open(server.addr(), "?table=crossed").await);
    let paths: Vec<String> = (0..8).map(|i| format!("d{i}.json")).collect();
    for path in &paths {
        s.simple_upload(path, "0".into()).await.unwrap();
    }
    // Enough rows that the planner finds each row by the index, in the
    // order of the statement's array, rather than scanning the table.
    for chunk in 0..20 {
        let fill = (0..100)
            .map(|i| UploadRequest::new(format!("fill/{chunk}-{i}.json"), "0"))
            .collect();
        assert!(s.upload_many(fill).await.iter().all(Result::is_ok));
    }
    s.download(DownloadRequest::new("d0.json")).await.unwrap();
    let reversed: Vec<String> = paths.iter().rev().cloned().collect();
    let (mut written, mut refused) = (0, 0);
    for round in 0..40 {
        let forward = updates(s.as_ref(), &paths, &format!("f{round}")).await;
        let backward = updates(s.as_ref(), &reversed, &format!("b{round}")).await;
        let (a, b) = tokio::join!(s.upload_many(forward), s.upload_many(backward));
        for res in a.into_iter().chain(b) {
            match res {
                Ok(_) => written += 1,
                // The loser of a row sees the winner's etag.
                Err(e) if e.is_conflict() => {
                    let text = format!("{e} {e:?}");
                    assert!(!text.contains("deadlock"), "round {round}: {text}");
                    refused += 1;
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
    }
    eprintln!("crossed combined writes: {written} written, {refused} refused");
    // Each row took exactly one of the two writes per round.
    assert_eq!(written, 40 * 8);
}

/// Runs `call` with the replies of the connections open now held, and cuts
/// those connections once `direct` (a storage beside the proxy) sees `path`
/// at `etag`: the call's reply is lost after the server applied it. The
/// call's statement must be prepared on its connection already: a held
/// reply to the prepare would keep it from ever running.
async fn lose_reply<T>(
    proxy: &Proxy,
    direct: &dyn Storage,
    (path, etag): (&str, &str),
    call: impl Future<Output = T>,
) -> T {
    proxy.hold_replies();
    let cut = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the held write never reached the server"
            );
            let cur = direct.download(DownloadRequest::new(path)).await.unwrap();
            if cur.etag == etag {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        proxy.release_replies(Release::Cut);
    };
    tokio::join!(call, cut).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combined_write_whose_reply_is_lost_is_found_by_its_etags() {
    let Some(server) = servers::postgres() else {
        return;
    };
    let proxy = Proxy::start(server.addr()).await;
    let s = open(
        &proxy.addr(),
        "?table=lost_many&timeout_ms=1000&pool_size=1",
    )
    .await;
    let direct = open(server.addr(), "?table=lost_many").await;
    let paths: Vec<String> = (0..4).map(|i| format!("l{i}.json")).collect();
    for path in &paths {
        s.simple_upload(path, "0".into()).await.unwrap();
    }
    warm_up(&s, &paths).await;
    let reqs = updates(&s, &paths, "1").await;
    let tokens: Vec<String> = reqs
        .iter()
        .map(|r| r.write_token.clone().unwrap())
        .collect();
    // The statement runs and commits; its reply is lost with the
    // connection.
    let applied = (paths[0].as_str(), tokens[0].as_str());
    let res = lose_reply(&proxy, &direct, applied, s.upload_many(reqs)).await;
    for ((path, token), res) in paths.iter().zip(&tokens).zip(res) {
        let resp = res.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&resp.etag, token, "{path}");
        let got = s
            .download(DownloadRequest::new(path.as_str()))
            .await
            .unwrap();
        assert_eq!((got.content.as_ref(), &got.etag), (&b"1"[..], token));
    }
}

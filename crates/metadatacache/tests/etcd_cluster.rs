//! Several endpoints in one etcd URL: a dead endpoint in the list is
//! skipped, and a storage on a 3-member cluster on 127.0.0.1 keeps working
//! when a member crashes (SIGKILL): every call succeeds when a follower
//! dies; when the leader dies, calls fail only while the others elect a
//! new one, and a counter loses no acknowledged increment. A watch on a
//! member that lost its leader reports a gap.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventually;
use common::servers::{self, Server};
use common::watching::next_change;
use metadatacache::{Change, Error, ErrorKind, EtcdStorage, Options, RetryPolicy, Storage, Store};

/// A port on 127.0.0.1 that nothing listens on.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn connect(endpoints: &[String], space: &str) -> Arc<dyn Storage> {
    let url = format!("etcd://{}/{space}?timeout_ms=2000", endpoints.join(","));
    Arc::new(EtcdStorage::from_url(&url).await.unwrap())
}

/// `n` writes and reads of `doc`, each of which must succeed.
async fn all_succeed(storage: &dyn Storage, n: usize, what: &str) {
    for i in 0..n {
        let v = storage
            .simple_upload("doc", i.to_string().into())
            .await
            .unwrap_or_else(|e| panic!("{what}: write {i}: {e}"));
        let got = storage
            .download(metadatacache::DownloadRequest::new("doc"))
            .await
            .unwrap_or_else(|e| panic!("{what}: read {i}: {e}"));
        assert_eq!(got.etag, v.etag, "{what}: read {i}");
    }
}

/// The member that leads the cluster now, by index.
async fn leader(members: &[Server]) -> usize {
    for (i, m) in members.iter().enumerate() {
        let mut client = etcd_client::Client::connect([format!("http://{}", m.addr())], None)
            .await
            .unwrap();
        let status = client.status().await.unwrap();
        if status.header().map(|h| h.member_id()) == Some(status.leader()) {
            return i;
        }
    }
    panic!("no member leads the cluster");
}

/// Dead endpoints before, between or after the live one: every call
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoints_in_the_list_are_skipped() {
    let Some(server) = servers::etcd() else {
        return;
    };
    let live = server.addr().to_owned();
    let dead = || format!("127.0.0.1:{}", dead_port());
    for endpoints in [
        vec![dead(), live.clone()],
        vec![live.clone(), dead()],
        vec![dead(), live.clone(), dead()],
    ] {
        let storage = connect(&endpoints, "dead").await;
        all_succeed(&*storage, 30, &endpoints.join(",")).await;
    }
}

/// A follower crashes: every call of a storage that lists all three
/// members keeps succeeding, writes and reads alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_serving_when_a_follower_crashes() {
    let Some(mut members) = servers::etcd_cluster(3) else {
        return;
    };
    let endpoints: Vec<String> = members.iter().map(|m| m.addr().to_owned()).collect();
    let storage = connect(&endpoints, "follower").await;
    all_succeed(&*storage, 20, "all members up").await;

    let victim = (leader(&members).await + 1) % members.len();
    tokio::task::block_in_place(|| members[victim].crash());
    let started = Instant::now();
    all_succeed(&*storage, 100, "a follower down").await;
    eprintln!(
        "100 writes and reads with a follower down: {:?}",
        started.elapsed()
    );
}

/// The leader crashes while two stores count: updates may fail
/// (`Unavailable`) only while the other two members elect a new leader;
/// the count lies between the `Ok`s and the `Ok`s plus the
/// `Unavailable`s; and once a new leader is there, every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_counting_when_the_leader_crashes() {
    let Some(mut members) = servers::etcd_cluster(3) else {
        return;
    };
    let endpoints: Vec<String> = members.iter().map(|m| m.addr().to_owned()).collect();
    let store = |storage: Arc<dyn Storage>| -> Store<String, u64> {
        Store::new(
            Options::new(storage, |k: &String| format!("{k}.json"))
                .init(|| 0)
                .retries(10_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(20))),
        )
    };
    let stores = [
        store(connect(&endpoints, "leader").await),
        store(connect(&endpoints, "leader").await),
    ];
    let mut tasks = Vec::new();
    for s in &stores {
        for _ in 0..2 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut unavailable) = (0u64, 0u64);
                for _ in 0..60 {
                    let res = s
                        .update("counter".to_owned(), true, |n| {
                            Ok::<_, Error>((n + 1, true))
                        })
                        .await;
                    match res {
                        Ok(()) => ok += 1,
                        Err(e) if e.kind() == ErrorKind::Unavailable => unavailable += 1,
                        Err(e) => panic!("update: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, unavailable)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let victim = leader(&members).await;
    tokio::task::block_in_place(|| members[victim].crash());
    let (mut ok, mut unavailable) = (0, 0);
    for t in tasks {
        let (o, u) = t.await.unwrap();
        ok += o;
        unavailable += u;
    }
    let check = connect(&endpoints, "leader").await;
    let (bytes, failed) =
        eventually("read the counter", || check.simple_download("counter.json")).await;
    let count: u64 = serde_json::from_slice(&bytes).unwrap();
    eprintln!(
        "leader crashed: {ok} ok, {unavailable} unavailable, count {count}; {failed} reads failed"
    );
    assert!(
        (ok..=ok + unavailable).contains(&count),
        "count {count} outside [{ok}, {}]",
        ok + unavailable
    );
    assert!(ok > 0);
    all_succeed(&*check, 50, "after the election").await;
}

/// A watch on a member that loses its leader (the two others crash, as a
/// partition would cut it off) must not stay open and quiet while the rest
/// of the cluster could go on committing: the stream reports a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_member_without_a_leader_reports_a_gap() {
    let Some(mut members) = servers::etcd_cluster(3) else {
        return;
    };
    let lone = members[0].addr().to_owned();
    let storage = connect(&[lone], "cut").await;
    let mut stream = storage.watch("").await.unwrap();
    assert_eq!(next_change(&mut stream).await, Change::InSync);
    tokio::task::block_in_place(|| {
        members[1].crash();
        members[2].crash();
    });
    loop {
        match next_change(&mut stream).await {
            Change::Gap { reason } => {
                eprintln!("gap: {reason}");
                break;
            }
            other => eprintln!("before the gap: {other:?}"),
        }
    }
}

//! The fault-injecting proxy of `common::proxy` does what it claims: first
//! on hand-made HTTP/2 frames split across reads, then against real etcd
//! and PostgreSQL servers (skipped, with a message, when they are missing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Checks the counts of stalls and releases.
fn assert_stalls(proxy: &Proxy, (stalls, releases): (u64, u64), what: &str) {
    let c = proxy.counts();
    assert_eq!(
        (c.stalls, c.releases),
        (stalls, releases),
        "(stalls, releases) {what}"
    );
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Reads exactly `want.len()` bytes and compares them with `want`.
async fn expect_bytes(sink: &mut TcpStream, want: &[u8], what: &str) {
    let mut got = vec![0; want.len()];
    tokio::time::timeout(Duration::from_secs(10), sink.read_exact(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: fewer than {} bytes after 10 s", want.len()))
        .unwrap();
    // As escaped text, the frames' payloads are readable.
    let (got, want) = (Bytes::from(got), Bytes::copy_from_slice(want));
    assert!(got == want, "{what}:\n got {got:?}\nwant {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_frames_are_stalled_and_released_in_order_whatever_the_reads() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = Proxy::start(&target.local_addr().unwrap().to_string()).await;
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    client.set_nodelay(true).unwrap();
    let (mut sink, _) = target.accept().await.unwrap();
    proxy.stall_writes(b"MARK", 1, Duration::from_secs(60));

    let settings = frame(SETTINGS, 0, 0, &[]);
    // A header block in two frames.
    let headers1 = frame(HEADERS, 0, 1, b"h1");
    let continuation1 = frame(CONTINUATION, END_HEADERS, 1, b"c1");
    let data1 = frame(DATA, 0, 1, b"a MARK 1");
    let end1 = frame(DATA, END_STREAM, 1, b"");
    let headers3 = frame(HEADERS, END_HEADERS, 3, b"h3");
    let data3 = frame(DATA, END_STREAM, 3, b"no marker");
    let reset1 = frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]);
    let ping = frame(PING, 0, 0, &[7; 8]);
    let sent = [
        PREFACE,
        &settings,
        &headers1,
        &continuation1,
        &data1,
        &headers3,
        &data3,
        &end1,
        &reset1,
        &ping,
    ]
    .concat();
    // Split anywhere, frames and preface alike.
    for piece in sent.chunks(5) {
        client.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let passed = [
        PREFACE,
        &settings,
        &headers1,
        &continuation1,
        &headers3,
        &data3,
        &ping,
    ]
    .concat();
    expect_bytes(&mut sink, &passed, "everything but stream 1's DATA and RST").await;
    assert_stalls(&proxy, (1, 0), "after the stalled write");
    assert_eq!(proxy.counts().dropped_resets, 1);

    // The next DATA with the marker, coalesced with its HEADERS, lets the
    // held frames go right before it.
    let headers5 = frame(HEADERS, END_HEADERS, 5, b"h5");
    let data5 = frame(DATA, END_STREAM, 5, b"MARK 2");
    client
        .write_all(&[&headers5[..], &data5].concat())
        .await
        .unwrap();
    let late = [&headers5[..], &data1, &end1, &data5].concat();
    expect_bytes(
        &mut sink,
        &late,
        "the held DATA just before the next marker",
    )
    .await;
    assert_stalls(&proxy, (1, 1), "after the next marker");

    // Past the hold time the frames go by themselves.
    proxy.stall_writes(b"MARK", 1, Duration::from_millis(200));
    let headers7 = frame(HEADERS, END_HEADERS, 7, b"h7");
    let data7 = frame(DATA, END_STREAM, 7, b"MARK 3");
    client
        .write_all(&[&headers7[..], &data7].concat())
        .await
        .unwrap();
    expect_bytes(&mut sink, &headers7, "the HEADERS at once").await;
    expect_bytes(&mut sink, &data7, "the DATA after the hold time").await;
    assert_stalls(&proxy, (2, 2), "after the hold time");
    assert_eq!(proxy.counts().connections, 1);

    // Dropping the proxy ends its connections and frees its port.
    let addr = proxy.addr();
    drop(proxy);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sink.read_to_end(&mut rest))
        .await
        .expect("the proxy's connection outlived the proxy")
        .ok();
    assert!(rest.is_empty(), "{rest:?}");
    for attempt in 0.. {
        if TcpStream::connect(&addr).await.is_err() {
            break;
        }
        assert!(attempt < 500, "the dropped proxy still listens on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(feature = "etcd")]
mod etcd {
    use std::time::{Duration, Instant};

    use metadatacache::{ErrorKind, EtcdStorage, Storage, UploadRequest};

    use super::assert_stalls;
    use crate::common::proxy::Proxy;
    use crate::common::servers;

    /// Polls `check` for up to 10 s; panics with `what` if it never holds.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A key's value read straight from etcd, not through the proxy.
    async fn get(direct: &etcd_client::Client, key: &str) -> Option<String> {
        let resp = direct.kv_client().get(key, None).await.unwrap();
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8(kv.value().to_vec()).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_etcd_write_times_out_then_lands_late() {
        let Some(server) = servers::etcd() else {
            return;
        };
        let proxy = Proxy::start(server.addr()).await;
        let url = format!("etcd://{}/stall?timeout_ms=1000", proxy.addr());
        let storage = EtcdStorage::from_url(&url).await.unwrap();
        let direct = etcd_client::Client::connect([format!("http://{}", server.addr())], None)
            .await
            .unwrap();
        let old = storage.simple_upload("a.json", "old".into()).await.unwrap();

        proxy.stall_writes(b"LATE", 1, Duration::from_secs(60));
        let late = UploadRequest {
            if_match: Some(old.etag.clone()),
            ..UploadRequest::new("a.json", "LATE 1")
        };
        let start = Instant::now();
        let e = storage
            .upload(late)
            .await
            .expect_err("the stalled write was answered: the proxy let it through");
        eprintln!("stalled write: {e} after {:?}", start.elapsed());
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_stalls(&proxy, (1, 0), "after the stalled write");
        // Meanwhile the same client (one connection) still reads, and the
        // write has not reached etcd.
        let start = Instant::now();
        assert_eq!(storage.simple_download("a.json").await.unwrap(), "old");
        eprintln!("read during the stall: {:?}", start.elapsed());
        assert_eq!(get(&direct, "stall/a.json").await.as_deref(), Some("old"));

        // The next write with the marker first lets the late one through.
        storage
            .simple_upload("b.json", "LATE 2".into())
            .await
            .unwrap();
        assert_stalls(&proxy, (1, 1), "after the next marker");
        assert_eq!(
            get(&direct, "stall/a.json").await.as_deref(),
            Some("LATE 1"),
            "the late write reached etcd"
        );
        assert_eq!(storage.simple_download("a.json").await.unwrap(), "LATE 1");
        // Had it reached etcd, the request would have been cancelled.
        assert_eq!(
            proxy.counts().dropped_resets,
            1,
            "the client's RST_STREAM for the timed-out write"
        );

        // Or after the hold time, with no other write.
        proxy.stall_writes(b"LATE", 1, Duration::from_secs(2));
        let e = storage
            .simple_upload("c.json", "LATE 3".into())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        eventually("the write held past its hold time", async || {
            get(&direct, "stall/c.json").await.as_deref() == Some("LATE 3")
        })
        .await;
        assert_stalls(&proxy, (2, 2), "after the hold time");
        assert_eq!(
            proxy.counts().connections,
            1,
            "all calls shared one connection"
        );
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::{Duration, Instant};

    use metadatacache::{DownloadRequest, PostgresStorage, Storage};

    use crate::common::proxy::{Proxy, Release};
    use crate::common::servers;

    async fn client(addr: &str) -> tokio_postgres::Client {
        let url = format!("postgres://postgres@{addr}/postgres");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    async fn count(client: &tokio_postgres::Client) -> i64 {
        let row = tokio::time::timeout(
            Duration::from_secs(10),
            client.query_one("SELECT count(*) FROM t", &[]),
        )
        .await
        .expect("no answer after 10 s")
        .unwrap();
        row.get(0)
    }

    /// A statement that gets no reply within half a second.
    async fn unanswered(client: &tokio_postgres::Client, sql: &str) {
        let res = tokio::time::timeout(Duration::from_millis(500), client.batch_execute(sql)).await;
        assert!(
            res.is_err(),
            "{sql}: answered despite held replies: {res:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn held_postgres_replies_are_delivered_late_or_lost() {
        let Some(server) = servers::postgres() else {
            return;
        };
        let proxy = Proxy::start(server.addr()).await;
        let direct = client(server.addr()).await;
        direct
            .batch_execute("CREATE TABLE t (v int)")
            .await
            .unwrap();
        let held = client(&proxy.addr()).await;

        proxy.hold_replies();
        unanswered(&held, "INSERT INTO t VALUES (1)").await;
        assert!(proxy.counts().held_reply_bytes > 0);
        assert_eq!(count(&direct).await, 1, "the server ran the insert");
        // A connection opened now passes both ways.
        let fresh = client(&proxy.addr()).await;
        assert_eq!(count(&fresh).await, 1);
        drop(fresh);

        // Delivered late, the reply is skipped by the client, which stays
        // in step with the server.
        proxy.release_replies(Release::Deliver);
        assert_eq!(count(&held).await, 1);

        // Lost with the connection.
        proxy.hold_replies();
        unanswered(&held, "INSERT INTO t VALUES (2)").await;
        proxy.release_replies(Release::Cut);
        let e = tokio::time::timeout(Duration::from_secs(10), held.query_one("SELECT 1", &[]))
            .await
            .expect("a cut connection must fail, not hang")
            .unwrap_err();
        assert!(
            e.is_closed() || e.to_string().contains("communicating"),
            "{e}"
        );
        assert_eq!(count(&direct).await, 2, "the server ran the insert");

        // A plain cut, with no replies held.
        let victim = client(&proxy.addr()).await;
        assert_eq!(count(&victim).await, 2);
        proxy.cut();
        let e = tokio::time::timeout(Duration::from_secs(10), victim.query_one("SELECT 1", &[]))
            .await
            .expect("a cut connection must fail, not hang")
            .unwrap_err();
        assert!(
            e.is_closed() || e.to_string().contains("communicating"),
            "{e}"
        );
        assert_eq!(count(&client(&proxy.addr()).await).await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_postgres_write_whose_reply_is_held_is_applied() {
        let Some(server) = servers::postgres() else {
            return;
        };
        let proxy = Proxy::start(server.addr()).await;
        // One pooled connection, so the held one is the one the write uses.
        let query = "/postgres?table=held&timeout_ms=2000&pool_size=1";
        let storage =
            PostgresStorage::from_url(&format!("postgres://postgres@{}{query}", proxy.addr()))
                .await
                .unwrap();
        let direct =
            PostgresStorage::from_url(&format!("postgres://postgres@{}{query}", server.addr()))
                .await
                .unwrap();
        storage.simple_upload("doc.json", "1".into()).await.unwrap();

        proxy.hold_replies();
        let start = Instant::now();
        let res = storage.simple_upload("doc.json", "2".into()).await;
        let took = start.elapsed();
        eprintln!(
            "upload with its reply held: {res:?} after {took:?}, {} reply bytes held",
            proxy.counts().held_reply_bytes
        );
        assert!(proxy.counts().held_reply_bytes > 0, "no reply was held");
        assert!(
            took >= Duration::from_millis(2000),
            "answered before the timeout: {took:?}"
        );
        let stored = direct
            .download(DownloadRequest::new("doc.json"))
            .await
            .unwrap();
        assert_eq!(stored.content, "2", "the server ran the write");
        // The storage looked for its own write on a fresh connection (which
        // the proxy lets through) and found it.
        let written = res.expect("the write's own etag is stored, so it is no failure");
        assert_eq!(written.etag, stored.etag);
        proxy.release_replies(Release::Deliver);
    }
}

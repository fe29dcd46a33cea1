//! The S3 backend (`object_store`) against a real S3-compatible server
//! (moto): the shared suite of `common::suite`, and what only S3 has: its
//! etags, conditions and listing, and the same wrapper over `object_store`'s
//! in-memory store.
//!
//! moto keeps its state in memory, so a stopped moto loses every object: the
//! outage case recreates the bucket after the restart, and the
//! counter-across-a-restart case of the other backends is not run here (the
//! counter would restart from nothing); the plain concurrency counter is.
//! S3 has no write tokens, so lost replies stay `Unavailable`: the
//! write-token case is not run either.

#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::assert_bucket_missing;
use common::servers::{self, Server};
use common::suite::{self, TestServer};
use futures_util::StreamExt;
use metadatacache::{
    DownloadRequest, ErrorKind, ObjectStoreStorage, Result, S3Config, Storage, UploadRequest,
};

struct S3;

impl TestServer for S3 {
    const BACKEND: &'static str = "s3";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "s3://key:hunter2@bucket/p";
    const BAD_URLS: &'static [&'static str] = &[
        "s3://",
        "s3:///no-bucket",
        "s3://bucket/p?endpoint=not-a-url",
        "s3://bucket/p?endpoint=http://127.0.0.1:1",
        "s3://bucket/p?allow_http=perhaps",
        "s3://bucket:9000/p",
        "s3://bucket/a//b",
    ];

    fn launch() -> Option<Server> {
        servers::moto()
    }

    /// Bucket `space`, prefix `p`.
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        let timeout = suite::timeout_query("&", timeout);
        s3_url(addr, &format!("{space}/p"), &timeout)
    }

    fn root_url(addr: &str, space: &str) -> String {
        s3_url(addr, space, "")
    }

    fn prepare(server: &Server, space: &str) {
        servers::create_bucket(server.addr(), space);
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(ObjectStoreStorage::from_url(url).await?))
    }

    async fn open_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(
            ObjectStoreStorage::new(with_credentials(url)?).await?,
        ))
    }
}

suite::server_tests!(S3;
    served: conformance, outage_then_recovery, counter_counts_exactly, late_landing_writes;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

/// `s3://{bucket_and_prefix}` on the moto at `addr`, with the `extra`
/// query parameters.
fn s3_url(addr: &str, bucket_and_prefix: &str, extra: &str) -> String {
    format!(
        "s3://{bucket_and_prefix}?endpoint=http://{addr}&allow_http=true&region=us-east-1{extra}"
    )
}

/// The config of `url` with credentials given in code (moto accepts any;
/// the client needs some to sign requests). The process environment is
/// never changed: tests run on threads.
fn with_credentials(url: &str) -> Result<S3Config> {
    Ok(S3Config::from_url(url)?.credentials("test", "test-secret-key"))
}

/// The concrete storage at `bucket_and_prefix`, for what only it has.
async fn open(addr: &str, bucket_and_prefix: &str, extra: &str) -> ObjectStoreStorage {
    let config = with_credentials(&s3_url(addr, bucket_and_prefix, extra)).unwrap();
    ObjectStoreStorage::new(config).await.unwrap()
}

fn kind<T: std::fmt::Debug>(res: Result<T>) -> ErrorKind {
    S3::kind(res)
}

/// The same wrapper over `object_store`'s in-memory store, which also has
/// conditional puts: the backend is not tied to S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_wrapper_passes_the_suite_on_in_memory_store() {
    let inner = Arc::new(object_store::memory::InMemory::new());
    let storage =
        ObjectStoreStorage::from_store(inner.clone(), inner, "/pre/fix/", "object-store-memory")
            .unwrap();
    assert_eq!(storage.prefix(), "pre/fix");
    assert_eq!(storage.backend(), "object-store-memory");
    metadatacache::conformance::run_all(Arc::new(storage), "suite").await;
    let inner = Arc::new(object_store::memory::InMemory::new());
    let bad = ObjectStoreStorage::from_store(inner.clone(), inner, "a/../b", "x").unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidInput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_etags_conditions_listing_and_errors() {
    let Some(server) = S3::launch() else {
        return;
    };
    servers::create_bucket(server.addr(), "specifics");
    let s = open(server.addr(), "specifics/app", "&timeout_ms=3000").await;
    let debug = format!("{s:?}");
    assert!(!debug.contains("test-secret-key"), "{debug}");
    assert!(debug.contains("app"), "{debug}");
    assert_eq!(s.timeout(), Duration::from_millis(3000));

    // Etags are the server's, the same from upload, download, stat and list.
    let v1 = s
        .simple_upload("d/x.json", "{\"n\":1}".into())
        .await
        .unwrap();
    let got = s.download(DownloadRequest::new("d/x.json")).await.unwrap();
    assert_eq!(got.etag, v1.etag);
    assert_eq!(
        s.stat("d/x.json").await.unwrap().etag.as_deref(),
        Some(v1.etag.as_str())
    );
    let listed = s.list_dir("d").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].etag.as_deref(), Some(v1.etag.as_str()));
    assert_eq!(listed[0].size, 7);
    println!("etag format: {}", v1.etag);

    // Conditional download: several etags are also honoured.
    let two = DownloadRequest {
        if_none_match: vec!["\"other\"".into(), v1.etag.clone()],
        ..DownloadRequest::new("d/x.json")
    };
    assert_eq!(kind(s.download(two).await), ErrorKind::NotModified);
    assert_eq!(
        kind(
            s.download(DownloadRequest::if_none_match("d/x.json", &v1.etag))
                .await
        ),
        ErrorKind::NotModified
    );

    // if_match "*": any existing version; absent → NotFound.
    let star = |p: &str| UploadRequest {
        if_match: Some("*".into()),
        ..UploadRequest::new(p, "{\"n\":2}")
    };
    let v2 = s.upload(star("d/x.json")).await.unwrap();
    assert_ne!(v2.etag, v1.etag);
    assert_eq!(
        kind(s.upload(star("d/none.json")).await),
        ErrorKind::NotFound
    );
    // if_match on a missing document creates nothing.
    let missing = UploadRequest {
        if_match: Some(v2.etag.clone()),
        ..UploadRequest::new("d/none.json", "x")
    };
    let k = kind(s.upload(missing).await);
    assert!(
        matches!(k, ErrorKind::NotFound | ErrorKind::PreconditionFailed),
        "{k:?}"
    );
    assert_eq!(kind(s.stat("d/none.json").await), ErrorKind::NotFound);
    // if_none_match with an etag on a missing document creates it.
    let create = UploadRequest {
        if_none_match: vec![v2.etag.clone()],
        ..UploadRequest::new("d/new.json", "1")
    };
    s.upload(create).await.unwrap();

    // Errors name path and backend; bad paths never reach the server.
    let e = s
        .download(DownloadRequest::new("d/nope.json"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.path(), Some("d/nope.json"));
    assert!(e.to_string().starts_with("s3: "), "{e}");
    assert_eq!(kind(s.stat("../x").await), ErrorKind::InvalidInput);
    assert_eq!(kind(s.list_dir("a//b").await), ErrorKind::InvalidInput);
    assert_eq!(kind(s.delete("/abs").await), ErrorKind::InvalidInput);
    assert_eq!(
        kind(s.make_dir_if_not_exist("a/").await),
        ErrorKind::InvalidInput
    );

    // Directories are prefixes; the key prefix never shows.
    s.make_dir_if_not_exist("empty").await.unwrap();
    assert!(s.list_dir("empty").await.unwrap().is_empty());
    s.simple_upload("d/sub/deep/y.json", "2".into())
        .await
        .unwrap();
    s.simple_upload("top.json", "3".into()).await.unwrap();
    let root: Vec<String> = s.read_dir("").await.unwrap();
    assert_eq!(root, ["d", "top.json"]);
    assert_eq!(
        s.read_dir("d").await.unwrap(),
        ["d/new.json", "d/sub", "d/x.json"]
    );
    assert!(s.stat("").await.unwrap().is_dir());
    assert!(s.stat("d/sub").await.unwrap().is_dir());
    assert_eq!(kind(s.stat("d/su").await), ErrorKind::NotFound);
    // Keys outside the prefix are invisible.
    let other = open(server.addr(), "specifics/app-other", "").await;
    other.simple_upload("z.json", "1".into()).await.unwrap();
    assert_eq!(s.read_dir("").await.unwrap(), ["d", "top.json"]);
    let whole = open(server.addr(), "specifics", "").await;
    assert_eq!(whole.read_dir("").await.unwrap(), ["app", "app-other"]);

    // Unusual but valid names round-trip.
    let odd = "d/ä ö+%20[x]#1.json";
    s.simple_upload(odd, "odd".into()).await.unwrap();
    assert_eq!(s.simple_download(odd).await.unwrap(), "odd");
    assert!(s.read_dir("d").await.unwrap().contains(&odd.to_owned()));
}

/// A listing longer than a page (S3 answers at most 1000 keys a page)
/// follows the pages to the end: every document and directory once, and
/// nothing of the neighbouring directory `dx` (whose keys share the prefix
/// `d`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_follows_every_page() {
    let Some(server) = S3::launch() else {
        return;
    };
    servers::create_bucket(server.addr(), "paged");
    let storage = Arc::new(open(server.addr(), "paged/p", "").await);
    let mut expected: Vec<String> = (0..1100).map(|i| format!("d/doc{i:04}")).collect();
    expected.extend(["d/s1", "d/s2", "d/s3"].map(String::from));
    let writes = (0..1100)
        .map(|i| format!("d/doc{i:04}"))
        .chain(["d/s1/x", "d/s2/x", "d/s3/x", "dx/y"].map(String::from));
    futures_util::stream::iter(writes)
        .map(|path| {
            let storage = Arc::clone(&storage);
            async move { storage.simple_upload(&path, "{}".into()).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let listed = storage.list_dir("d").await.unwrap();
    let paths: Vec<&str> = listed.iter().map(|i| i.path.as_str()).collect();
    expected.sort();
    assert_eq!(paths, expected);
    let dirs: Vec<&str> = listed
        .iter()
        .filter(|i| i.is_dir())
        .map(|i| i.path.as_str())
        .collect();
    assert_eq!(dirs, ["d/s1", "d/s2", "d/s3"]);
}

/// `init` creates a missing bucket (CreateBucket), and again is a no-op;
/// before, every call on it fails with `InvalidInput`, naming the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_creates_the_bucket() {
    let Some(server) = S3::launch() else {
        return;
    };
    let s = open(server.addr(), "fresh/app", "").await;
    assert_bucket_missing(Arc::new(s.clone()), "bucket \"fresh\"").await;
    s.init("").await.unwrap();
    s.init("users").await.unwrap();
    s.simple_upload("a.json", "1".into()).await.unwrap();
    assert_eq!(s.read_dir("").await.unwrap(), ["a.json"]);
}

/// A bucket the server refuses to create (an invalid name): `init` fails
/// with `InvalidInput`, naming the bucket and the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refused_names_the_bucket() {
    let Some(server) = S3::launch() else {
        return;
    };
    let s = open(server.addr(), "ab/app", "").await;
    let e = s.init("").await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert_eq!(e.backend(), Some("s3"));
    assert!(e.to_string().contains("bucket \"ab\""), "{e}");
    assert!(e.to_string().contains("create bucket"), "{e}");
}

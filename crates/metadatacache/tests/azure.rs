//! The Azure backend (`object_store`) against a real Azure Blob Storage
//! emulator (Azurite, on loopback, data in a temporary directory): the
//! shared suite of `common::suite`, and what only Azure has: its etags, the
//! delete with `If-Match`, and `init` creating the container.
//!
//! Azurite keeps its data on disk, so the outage case checks that the
//! version written before the restart is still there, and the counter runs
//! across a restart too. Azure stores no write tokens here, so lost replies
//! stay `Unavailable`: the write-token case is not run.

#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::servers::{self, AZURITE_ACCOUNT, AZURITE_KEY, Server};
use common::suite::{self, TestServer};
use common::{assert_bucket_missing, create};
use metadatacache::{
    AzureConfig, DownloadRequest, ErrorKind, ObjectStoreStorage, Result, Storage, UploadRequest,
};

struct Azure;

impl TestServer for Azure {
    const BACKEND: &'static str = "azure";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "az://acct:hunter2@box/p";
    const BAD_URLS: &'static [&'static str] = &[
        "az://",
        "az:///no-container",
        "az://box/p?endpoint=not-a-url",
        "az://box/p?endpoint=http://127.0.0.1:1/acct",
        "az://box/p?allow_http=perhaps",
        "az://box/p?region=eu",
        "az://box:10000/p",
        "az://box/a//b",
        "az://Box/p",
    ];
    const BAD_SPACES: &'static [&'static str] = &["ab", "a_b", "Upper", "a--b"];

    fn launch() -> Option<Server> {
        servers::azurite()
    }

    /// Container `space`, prefix `p`.
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        az_url(
            addr,
            &format!("{space}/p"),
            &suite::timeout_query("&", timeout),
        )
    }

    fn root_url(addr: &str, space: &str) -> String {
        az_url(addr, space, "")
    }

    /// Creates the container through the backend's own `init` (again
    /// after a restart: a no-op then).
    fn prepare(server: &Server, space: &str) {
        let url = Self::root_url(server.addr(), space);
        // prepare is synchronous and called from async tests: a runtime of
        // its own, on a thread of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let storage = ObjectStoreStorage::new(with_key(&url)?).await?;
                storage.init("").await
            })
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("create container {space}: {e}"));
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(ObjectStoreStorage::from_url(url).await?))
    }

    async fn open_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(ObjectStoreStorage::new(with_key(url)?).await?))
    }
}

suite::server_tests!(Azure;
    served: conformance, outage_then_recovery, counter_counts_exactly, counter_survives_restart,
        late_landing_writes;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

/// `az://{container_and_prefix}` on the Azurite at `addr` (the account is
/// the endpoint's path), with the `extra` query parameters.
fn az_url(addr: &str, container_and_prefix: &str, extra: &str) -> String {
    format!(
        "az://{container_and_prefix}?endpoint=http://{addr}/{AZURITE_ACCOUNT}&allow_http=true{extra}"
    )
}

/// The config of `url` with Azurite's key given in code. The process
/// environment is never changed: tests run on threads.
fn with_key(url: &str) -> Result<AzureConfig> {
    Ok(AzureConfig::from_url(url)?.access_key(AZURITE_KEY))
}

async fn open(addr: &str, container_and_prefix: &str) -> ObjectStoreStorage {
    let config = with_key(&az_url(addr, container_and_prefix, "&timeout_ms=3000")).unwrap();
    ObjectStoreStorage::new(config).await.unwrap()
}

fn kind<T: std::fmt::Debug>(res: Result<T>) -> ErrorKind {
    Azure::kind(res)
}

/// `init` creates a missing container, and again is a no-op; a container
/// that does not exist fails every call with `InvalidInput` before,
/// naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_creates_the_container() {
    let Some(server) = Azure::launch() else {
        return;
    };
    let s = open(server.addr(), "fresh/app").await;
    assert_bucket_missing(Arc::new(s.clone()), "container \"fresh\"").await;
    s.init("").await.unwrap();
    s.init("users").await.unwrap();
    s.simple_upload("a.json", "1".into()).await.unwrap();
    assert_eq!(s.read_dir("").await.unwrap(), ["a.json"]);
    assert_eq!(kind(s.init("../x").await), ErrorKind::InvalidInput);
}

/// A key the server refuses: creating the container is refused, and the
/// error names the container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refused_names_the_container() {
    let Some(server) = Azure::launch() else {
        return;
    };
    let url = az_url(server.addr(), "refused/app", "&timeout_ms=3000");
    let wrong = AzureConfig::from_url(&url)
        .unwrap()
        .access_key("d3Jvbmcta2V5LXdyb25nLWtleQ==");
    let debug = format!("{wrong:?}");
    assert!(!debug.contains("d3Jvbmc"), "{debug}");
    let s = ObjectStoreStorage::new(wrong).await.unwrap();
    let e = s.init("").await.unwrap_err();
    eprintln!("{e}");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert_eq!(e.backend(), Some("azure"));
    assert!(e.to_string().contains("container \"refused\""), "{e}");
}

/// Delete Blob with `If-Match`: a stale etag keeps the newer version, the
/// current one deletes, a missing blob is `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_delete_is_checked_by_the_server() {
    let Some(server) = Azure::launch() else {
        return;
    };
    Azure::prepare(&server, "deletes");
    let s = open(server.addr(), "deletes/app").await;
    assert!(s.capabilities().conditional_delete);
    let v1 = s.simple_upload("d.json", "1".into()).await.unwrap();
    let v2 = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("d.json", "2")
        })
        .await
        .unwrap();
    assert_ne!(v1.etag, v2.etag);
    let e = s
        .delete_if_match("d.json", Some(&v1.etag))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PreconditionFailed, "{e}");
    assert_eq!(e.path(), Some("d.json"));
    assert_eq!(s.simple_download("d.json").await.unwrap(), "2");
    s.delete_if_match("d.json", Some(&v2.etag)).await.unwrap();
    assert_eq!(kind(s.stat("d.json").await), ErrorKind::NotFound);
    // Azurite answers 412 for If-Match on a missing blob.
    let k = kind(s.delete_if_match("d.json", Some(&v2.etag)).await);
    assert!(
        matches!(k, ErrorKind::NotFound | ErrorKind::PreconditionFailed),
        "{k:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_etags_conditions_and_listing() {
    let Some(server) = Azure::launch() else {
        return;
    };
    Azure::prepare(&server, "specifics");
    let s = open(server.addr(), "specifics/app").await;
    assert_eq!(s.timeout(), Duration::from_millis(3000));
    assert_eq!(s.backend(), "azure");

    // Etags are the server's, the same from upload, download, stat and list.
    let v1 = s
        .simple_upload("d/x.json", "{\"n\":1}".into())
        .await
        .unwrap();
    println!("etag format: {}", v1.etag);
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
    // Rewriting the same content gives a new etag.
    let same = s
        .simple_upload("d/x.json", "{\"n\":1}".into())
        .await
        .unwrap();
    assert_ne!(same.etag, v1.etag);

    // Conditional download: unchanged → NotModified, old etag → content.
    assert_eq!(
        kind(
            s.download(DownloadRequest::if_none_match("d/x.json", &same.etag))
                .await
        ),
        ErrorKind::NotModified
    );
    let old = s
        .download(DownloadRequest::if_none_match("d/x.json", &v1.etag))
        .await
        .unwrap();
    assert_eq!(old.etag, same.etag);

    // Conditional puts: stale etag, create over an existing blob.
    let stale = UploadRequest {
        if_match: Some(v1.etag.clone()),
        ..UploadRequest::new("d/x.json", "2")
    };
    assert_eq!(kind(s.upload(stale).await), ErrorKind::PreconditionFailed);
    assert_eq!(
        kind(s.upload(create("d/x.json", "2")).await),
        ErrorKind::AlreadyExists
    );
    let missing = UploadRequest {
        if_match: Some(same.etag.clone()),
        ..UploadRequest::new("d/none.json", "x")
    };
    let k = kind(s.upload(missing).await);
    assert!(
        matches!(k, ErrorKind::NotFound | ErrorKind::PreconditionFailed),
        "{k:?}"
    );
    assert_eq!(kind(s.stat("d/none.json").await), ErrorKind::NotFound);

    // Directories are prefixes; odd names round-trip.
    s.simple_upload("d/sub/deep/y.json", "2".into())
        .await
        .unwrap();
    assert_eq!(s.read_dir("d").await.unwrap(), ["d/sub", "d/x.json"]);
    let odd = "d/ä ö+%20[x]#1.json";
    let v = s.simple_upload(odd, "odd".into()).await.unwrap();
    assert_eq!(s.simple_download(odd).await.unwrap(), "odd");
    // The conditional delete builds the blob's URL itself.
    s.delete_if_match(odd, Some(&v.etag)).await.unwrap();
    let e = s.download(DownloadRequest::new(odd)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().starts_with("azure: "), "{e}");
}

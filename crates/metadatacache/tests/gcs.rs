//! The GCS backend (`object_store`) without a server: no GCS emulator that
//! honours generation preconditions can be installed here (see the
//! README), so only the cases of the shared suite that need no server run:
//! a silent or absent server answers `Unavailable` within the timeout, and
//! bad URLs are refused naming the URL without secrets.
//!
//! The client gets a service account key with `disable_oauth` (as for an
//! emulator): it then asks no token service, so nothing leaves loopback.

#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::servers::Server;
use common::suite::{self, TestServer};
use metadatacache::{GcsConfig, ObjectStoreStorage, Result, Storage};

/// A service account key that turns OAuth off; its private key is never used.
const EMULATOR_KEY: &str = r#"{"private_key": "unused", "private_key_id": "unused",
    "client_email": "test@example.invalid", "disable_oauth": true}"#;

struct Gcs;

impl TestServer for Gcs {
    const BACKEND: &'static str = "gcs";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "gs://key:hunter2@bucket/p";
    const BAD_URLS: &'static [&'static str] = &[
        "gs://",
        "gs:///no-bucket",
        "gs://bucket/p?endpoint=not-a-url",
        "gs://bucket/p?endpoint=http://127.0.0.1:1",
        "gs://bucket/p?account=a",
        "gs://bucket/p?region=r",
        "gs://bucket:4443/p",
        "gs://bucket/a//b",
    ];

    /// No server can be installed: the served cases are not run.
    fn launch() -> Option<Server> {
        None
    }

    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        let timeout = suite::timeout_query("&", timeout);
        format!("gs://{space}/p?endpoint=http://{addr}&allow_http=true{timeout}")
    }

    fn root_url(addr: &str, space: &str) -> String {
        format!("gs://{space}?endpoint=http://{addr}&allow_http=true")
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(ObjectStoreStorage::from_url(url).await?))
    }

    async fn open_url(url: &str) -> Result<Arc<dyn Storage>> {
        let config = GcsConfig::from_url(url)?.service_account_key(EMULATOR_KEY);
        Ok(Arc::new(ObjectStoreStorage::new(config).await?))
    }
}

suite::server_tests!(Gcs;
    served: ;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

/// The key given in code never shows in `Debug`; the storage reports
/// itself as "gcs" and offers conditional deletes.
#[tokio::test]
async fn gcs_config_hides_its_key() {
    let config = GcsConfig::from_url("gs://bucket/app?endpoint=http://127.0.0.1:1&allow_http=true")
        .unwrap()
        .service_account_key(EMULATOR_KEY);
    assert!(!format!("{config:?}").contains("unused"), "{config:?}");
    let storage = ObjectStoreStorage::new(config).await.unwrap();
    assert_eq!(storage.backend(), "gcs");
    assert!(storage.capabilities().conditional_delete);
    assert_eq!(storage.prefix(), "app");
}

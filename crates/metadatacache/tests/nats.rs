//! The NATS JetStream key-value backend against a real `nats-server -js`
//! (a missing `nats-server` fails the tests, naming what to install, unless
//! `MDCACHE_SKIP_SERVERS=1`): the shared suite of `common::suite`, and what
//! only NATS has: its key encoding, buckets made on first use,
//! credentials, and change notifications across a restart.

#![cfg(feature = "nats")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::servers::{self, Server};
use common::suite::{self, TestServer};
use metadatacache::{NatsStorage, Result, Storage};

struct Nats;

impl TestServer for Nats {
    const BACKEND: &'static str = "nats";
    const CONNECTS_ON_OPEN: bool = false;
    const SECRET_URL: &'static str = "nats://u:hunter2@h:1/x?password=hunter2&bogus=1";
    // No server; no bucket; TLS options that go together, alone.
    const BAD_URLS: &'static [&'static str] = &[
        "nats://",
        "nats://127.0.0.1:4222",
        "tls://127.0.0.1:4222/b?tls_key=k.pem",
        "nats://127.0.0.1:4222/b/a//c",
    ];
    // Bucket names: letters, digits, '-' and '_' only.
    const BAD_SPACES: &'static [&'static str] = &["a.b", "a%20b", "*"];
    const BAD_PARAMS: &'static [&'static str] = &["creds=a.creds&nkey=b.nk", "tls_cert=c.pem"];

    fn launch() -> Option<Server> {
        servers::nats()
    }

    /// Bucket `space`, key prefix `p`.
    fn url(addr: &str, space: &str, timeout: Option<Duration>) -> String {
        format!(
            "nats://{addr}/{space}/p{}",
            suite::timeout_query("?", timeout)
        )
    }

    fn root_url(addr: &str, space: &str) -> String {
        format!("nats://{addr}/{space}")
    }

    async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
        Ok(Arc::new(NatsStorage::from_url(url).await?))
    }
}

suite::server_tests!(Nats;
    served: conformance, outage_then_recovery, counter_counts_exactly, counter_survives_restart,
        late_landing_writes, lost_replies_are_resolved_by_write_token;
    offline: silent_server_is_unavailable, bad_urls_name_the_url_without_secrets);

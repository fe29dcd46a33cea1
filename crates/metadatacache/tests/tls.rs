//! TLS to etcd, PostgreSQL and NATS, against servers on 127.0.0.1 that take
//! only TLS connections with a client certificate (etcd
//! `--client-cert-auth`; PostgreSQL `ssl=on` with `hostssl …
//! clientcert=verify-ca`; nats-server `--tlsverify`), using a CA and
//! certificates the tests make (`common::certs`).
//!
//! The shared suite (conformance, the exact counter, an outage, change
//! streams) runs over TLS; then each way TLS goes wrong — a wrong CA, an
//! untrusted or misnamed server certificate, a plain-text URL at a TLS
//! server (and the reverse), a missing or untrusted client certificate —
//! must fail with [`ErrorKind::PermissionDenied`] and one line that says it
//! is a TLS or certificate problem, within the hang guard; a certificate
//! file that is missing or unusable is [`ErrorKind::InvalidInput`] naming
//! it, found before any network traffic (NATS: when the storage is
//! opened).

#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use common::certs::{CertFiles, Pki};
use common::servers::{self, Server};
use common::suite::{self, TestServer};
use common::{GUARD, must_finish};
use metadatacache::{Error, ErrorKind, Result, Storage};

/// The PKI of the suite's servers, whose URLs are made without any state
/// but the address. It lives in cargo's scratch directory for tests (which
/// `cargo clean` empties), as a static is never dropped.
static PKI: LazyLock<Pki> = LazyLock::new(|| Pki::new_in(Path::new(env!("CARGO_TARGET_TMPDIR"))));

/// `&name=path`.
fn file(name: &str, path: &Path) -> String {
    format!("&{name}={}", path.display())
}

/// Runs `fut` (a first call on a storage, or opening one), which must fail
/// within the hang guard; returns its error.
async fn must_fail<T: Debug>(what: &str, fut: impl Future<Output = Result<T>>) -> Error {
    let (res, took) = must_finish(what, GUARD, fut).await;
    let e = res.expect_err(what);
    eprintln!("{what}: failed after {took:?}: {e}");
    e
}

/// `e` is a TLS failure: `PermissionDenied`, one line, saying each of `says`.
fn assert_tls_failure(what: &str, e: &Error, says: &[&str]) {
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {text}");
    assert!(text.contains("TLS"), "{what}: does not say TLS: {text}");
    assert!(!text.contains('\n'), "{what}: not one line: {text}");
    for s in says {
        assert!(text.contains(s), "{what}: does not say {s:?}: {text}");
    }
}

/// `e` is `InvalidInput` naming `path`.
fn assert_names_file(what: &str, e: &Error, path: &Path) {
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what}: {text}");
    assert!(
        text.contains(&*path.to_string_lossy()),
        "{what}: does not name {}: {text}",
        path.display()
    );
}

/// A certificate file that does not exist.
fn nowhere(pki: &Pki) -> std::path::PathBuf {
    pki.dir().join("no-such-file.pem")
}

#[cfg(feature = "etcd")]
mod etcd {
    use super::*;
    use metadatacache::EtcdStorage;

    /// etcd with TLS: `?cacert=&cert=&key=` with the suite's PKI.
    struct EtcdTls;

    /// `cacert=PATH`, with the client certificate `client`.
    fn tls_query(ca: &Path, client: Option<&CertFiles>) -> String {
        let mut q = format!("cacert={}", ca.display());
        if let Some(c) = client {
            q += &file("cert", &c.cert);
            q += &file("key", &c.key);
        }
        q
    }

    impl TestServer for EtcdTls {
        const BACKEND: &'static str = "etcd";
        const CONNECTS_ON_OPEN: bool = false;
        const SECRET_URL: &'static str = "etcd://u:hunter2@h:1/x?password=hunter2&bogus=1";

        fn launch() -> Option<Server> {
            servers::etcd_tls(&PKI.server_tls(&PKI.server()))
        }

        fn url(addr: &str, space: &str, timeout: Option<std::time::Duration>) -> String {
            format!(
                "etcd://{addr}/{space}?{}{}",
                tls_query(&PKI.ca(), Some(&PKI.client())),
                suite::timeout_query("&", timeout)
            )
        }

        fn root_url(addr: &str, _space: &str) -> String {
            format!(
                "etcd://{addr}?{}",
                tls_query(&PKI.ca(), Some(&PKI.client()))
            )
        }

        async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
            Ok(Arc::new(EtcdStorage::from_url(url).await?))
        }
    }

    suite::server_tests!(EtcdTls;
        served: conformance, counter_counts_exactly, outage_then_recovery,
            watch_survives_restart;
        offline: );

    /// The first call on a storage opened from `url` fails: its error.
    async fn first_call(what: &str, url: &str) -> Error {
        let storage = EtcdStorage::from_url(url).await.unwrap();
        must_fail(what, storage.simple_download("doc")).await
    }

    /// Against a server that requires client certificates signed by the
    /// test CA: the right settings work, and every wrong one fails saying
    /// what is wrong and naming the file or the endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_tls_settings_fail_saying_so() {
        let pki = Pki::new();
        let Some(server) = servers::etcd_tls(&pki.server_tls(&pki.server())) else {
            return;
        };
        let addr = server.addr();
        let client = pki.client();
        let url = |query: String| format!("etcd://{addr}/f?{query}&timeout_ms=2000");

        let good = EtcdStorage::from_url(&url(tls_query(&pki.ca(), Some(&client))))
            .await
            .unwrap();
        good.simple_upload("doc", "1".into()).await.unwrap();
        // The certificate is for localhost too.
        let by_name = format!(
            "etcd://localhost:{}/f?{}",
            server.port(),
            tls_query(&pki.ca(), Some(&client))
        );
        let by_name = EtcdStorage::from_url(&by_name).await.unwrap();
        assert_eq!(by_name.simple_download("doc").await.unwrap(), "1");

        let other_ca = pki.other_ca();
        let e = first_call("wrong CA", &url(tls_query(&other_ca, Some(&client)))).await;
        assert_tls_failure(
            "wrong CA",
            &e,
            &["not trusted", &other_ca.to_string_lossy()],
        );

        let e = first_call("plain text to a TLS server", &url(String::new())).await;
        assert_tls_failure(
            "plain text to a TLS server",
            &e,
            &["speaks TLS", "cacert", addr],
        );

        let e = first_call("no client certificate", &url(tls_query(&pki.ca(), None))).await;
        assert_tls_failure(
            "no client certificate",
            &e,
            &["requires a client certificate", addr],
        );
        // A write refused by a TLS alert on its own connection was not
        // applied. One whose connection the server just closed may have
        // been, for all the client knows (a server that committed it and
        // then restarted closes it too): what a check of the servers finds
        // afterwards is said, and the write stays Unavailable.
        let storage = EtcdStorage::from_url(&url(tls_query(&pki.ca(), None)))
            .await
            .unwrap();
        let what = "a write without a client certificate";
        let e = must_fail(what, storage.simple_upload("doc", "2".into())).await;
        let text = e.to_string();
        // The alert reaches the client with the write's failure, or the
        // write meets the closed connection first (a broken pipe).
        let refused = e.kind() == ErrorKind::PermissionDenied;
        let unknown =
            e.kind() == ErrorKind::Unavailable && text.contains("may or may not have been applied");
        assert!(refused || unknown, "{what}: {text}");
        for says in ["requires a client certificate", addr] {
            assert!(text.contains(says), "{what}: {text}");
        }
        let storage = EtcdStorage::from_url(&url(String::new())).await.unwrap();
        let what = "a write in plain text to a TLS server";
        let e = must_fail(what, storage.simple_upload("doc", "2".into())).await;
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}");
        let text = e.to_string();
        for says in ["may or may not have been applied", "speaks TLS", addr] {
            assert!(text.contains(says), "{what}: {text}");
        }
        assert_eq!(good.simple_download("doc").await.unwrap(), "1");

        let stranger = pki.untrusted_client();
        let e = first_call(
            "client certificate of another CA",
            &url(tls_query(&pki.ca(), Some(&stranger))),
        )
        .await;
        assert_tls_failure(
            "client certificate of another CA",
            &e,
            &[
                "rejected the client certificate",
                &stranger.cert.to_string_lossy(),
            ],
        );
    }

    /// A TLS URL at a plain-text server says that the handshake failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_url_at_a_plain_server_fails_saying_so() {
        let pki = Pki::new();
        let Some(server) = servers::etcd() else {
            return;
        };
        let url = format!(
            "etcd://{}/f?{}&timeout_ms=2000",
            server.addr(),
            tls_query(&pki.ca(), Some(&pki.client()))
        );
        let e = first_call("TLS to a plain server", &url).await;
        assert_tls_failure("TLS to a plain server", &e, &["handshake", "cacert"]);
    }

    /// Missing or unusable certificate files: `InvalidInput` naming the
    /// file, before any network traffic (nothing listens on port 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_certificate_files_are_invalid_input_naming_them() {
        let pki = Pki::new();
        let (ca, client, missing) = (pki.ca(), pki.client(), nowhere(&pki));
        let cases = [
            ("missing cacert", tls_query(&missing, None), missing.clone()),
            (
                "missing cert",
                tls_query(
                    &ca,
                    Some(&CertFiles {
                        cert: missing.clone(),
                        key: client.key.clone(),
                    }),
                ),
                missing.clone(),
            ),
            (
                "a key file without a key",
                tls_query(
                    &ca,
                    Some(&CertFiles {
                        cert: client.cert.clone(),
                        key: ca.clone(),
                    }),
                ),
                ca.clone(),
            ),
            (
                "a CA file without a certificate",
                tls_query(&client.key, None),
                client.key.clone(),
            ),
        ];
        for (what, query, path) in cases {
            let url = format!("etcd://127.0.0.1:1/f?{query}");
            let e = must_fail(what, EtcdStorage::from_url(&url)).await;
            assert_names_file(what, &e, &path);
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use metadatacache::PostgresStorage;

    /// PostgreSQL with `sslmode=verify-full` and a client certificate.
    struct PostgresTls;

    /// `sslmode=MODE` with the CA `ca` and the client certificate `client`.
    fn tls_query(mode: &str, ca: Option<&Path>, client: Option<&CertFiles>) -> String {
        let mut q = format!("sslmode={mode}");
        if let Some(ca) = ca {
            q += &file("sslrootcert", ca);
        }
        if let Some(c) = client {
            q += &file("sslcert", &c.cert);
            q += &file("sslkey", &c.key);
        }
        q
    }

    impl TestServer for PostgresTls {
        const BACKEND: &'static str = "postgres";
        const CONNECTS_ON_OPEN: bool = true;
        const SECRET_URL: &'static str = "postgres://u:hunter2@127.0.0.1:1/db?table=a-b";

        fn launch() -> Option<Server> {
            servers::postgres_tls(&PKI.server_tls(&PKI.server()))
        }

        fn url(addr: &str, space: &str, timeout: Option<std::time::Duration>) -> String {
            format!(
                "postgresql://postgres@{addr}/postgres?table={space}&{}{}",
                tls_query("verify-full", Some(&PKI.ca()), Some(&PKI.client())),
                suite::timeout_query("&", timeout)
            )
        }

        fn root_url(addr: &str, space: &str) -> String {
            Self::url(addr, space, None)
        }

        async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
            Ok(Arc::new(PostgresStorage::from_url(url).await?))
        }
    }

    // The server takes no plain-text connection, so the change streams'
    // listening connections are TLS too.
    suite::server_tests!(PostgresTls;
        served: conformance, counter_counts_exactly, outage_then_recovery,
            watch_reports_changes_of_another_handle, watch_survives_restart;
        offline: );

    fn url(addr: &str, query: &str) -> String {
        format!("postgres://postgres@{addr}/postgres?table=t&timeout_ms=2000&{query}")
    }

    /// Opens a storage (which connects) and writes and reads a document.
    async fn works(what: &str, url: &str) {
        let s = PostgresStorage::from_url(url)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        s.simple_upload("doc", "1".into()).await.unwrap();
        assert_eq!(s.simple_download("doc").await.unwrap(), "1", "{what}");
    }

    async fn fails(what: &str, url: &str) -> Error {
        must_fail(what, PostgresStorage::from_url(url)).await
    }

    /// The server presents the right certificate and requires a client
    /// certificate: the right settings work (by address and by name), and
    /// every wrong one fails saying what is wrong, naming the URL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_tls_settings_fail_saying_so() {
        let pki = Pki::new();
        let Some(server) = servers::postgres_tls(&pki.server_tls(&pki.server())) else {
            return;
        };
        let addr = server.addr();
        let (ca, other_ca, client) = (pki.ca(), pki.other_ca(), pki.client());
        let by_name = format!("localhost:{}", server.port());
        works(
            "verify-full by name",
            &url(
                &by_name,
                &tls_query("verify-full", Some(&ca), Some(&client)),
            ),
        )
        .await;
        // libpq's weaker modes: encrypted, the certificate not checked.
        for mode in ["require", "prefer"] {
            works(mode, &url(addr, &tls_query(mode, None, Some(&client)))).await;
        }

        for mode in ["verify-full", "verify-ca", "require"] {
            let what = format!("{mode} with the wrong CA");
            let e = fails(
                &what,
                &url(addr, &tls_query(mode, Some(&other_ca), Some(&client))),
            )
            .await;
            assert_tls_failure(&what, &e, &["not trusted", &other_ca.to_string_lossy()]);
        }

        let e = fails("plain text", &url(addr, "sslmode=disable")).await;
        assert_tls_failure("plain text", &e, &["plain text", "sslmode=disable"]);

        let e = fails(
            "no client certificate",
            &url(addr, &tls_query("verify-full", Some(&ca), None)),
        )
        .await;
        assert_tls_failure("no client certificate", &e, &["certificate", addr]);

        let stranger = pki.untrusted_client();
        let e = fails(
            "client certificate of another CA",
            &url(addr, &tls_query("verify-full", Some(&ca), Some(&stranger))),
        )
        .await;
        assert_tls_failure(
            "client certificate of another CA",
            &e,
            &["client certificate", &stranger.cert.to_string_lossy()],
        );
    }

    /// A server certificate signed by the right CA for another host name:
    /// `verify-full` refuses it, `verify-ca` (and `require` with a root
    /// certificate, which libpq treats alike) take it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
        let pki = Pki::new();
        let Some(server) = servers::postgres_tls(&pki.server_tls(&pki.misnamed())) else {
            return;
        };
        let (addr, ca, client) = (server.addr(), pki.ca(), pki.client());
        let e = fails(
            "verify-full, misnamed",
            &url(addr, &tls_query("verify-full", Some(&ca), Some(&client))),
        )
        .await;
        assert_tls_failure(
            "verify-full, misnamed",
            &e,
            &["host name", &ca.to_string_lossy()],
        );
        for mode in ["verify-ca", "require"] {
            works(mode, &url(addr, &tls_query(mode, Some(&ca), Some(&client)))).await;
        }
    }

    /// A server certificate signed by a CA the client does not trust:
    /// `verify-ca` refuses it; `require` without a root certificate takes
    /// it (encrypted, unauthenticated: libpq's meaning).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_untrusted_server_certificate_is_refused() {
        let pki = Pki::new();
        let Some(server) = servers::postgres_tls(&pki.server_tls(&pki.untrusted())) else {
            return;
        };
        let (addr, ca, client) = (server.addr(), pki.ca(), pki.client());
        let e = fails(
            "verify-ca, untrusted",
            &url(addr, &tls_query("verify-ca", Some(&ca), Some(&client))),
        )
        .await;
        assert_tls_failure(
            "verify-ca, untrusted",
            &e,
            &["not trusted", &ca.to_string_lossy()],
        );
        works(
            "require",
            &url(addr, &tls_query("require", None, Some(&client))),
        )
        .await;
    }

    /// `sslmode=require` at a server without TLS fails saying so;
    /// `prefer` (the default) falls back to plain text there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn require_at_a_plain_server_fails_saying_so() {
        let Some(server) = servers::postgres() else {
            return;
        };
        let e = fails("require, no TLS", &url(server.addr(), "sslmode=require")).await;
        assert_tls_failure(
            "require, no TLS",
            &e,
            &["does not support TLS", "sslmode=require"],
        );
        works("prefer, no TLS", &url(server.addr(), "sslmode=prefer")).await;
    }

    /// Missing or unusable certificate files: `InvalidInput` naming the
    /// file, before any network traffic (nothing listens on port 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_certificate_files_are_invalid_input_naming_them() {
        let pki = Pki::new();
        let (ca, client, missing) = (pki.ca(), pki.client(), nowhere(&pki));
        let wrong_key = CertFiles {
            cert: client.cert.clone(),
            key: ca.clone(),
        };
        let absent_cert = CertFiles {
            cert: missing.clone(),
            key: client.key.clone(),
        };
        let cases = [
            (
                "missing sslrootcert",
                tls_query("verify-full", Some(&missing), None),
                &missing,
            ),
            (
                "missing sslcert",
                tls_query("require", None, Some(&absent_cert)),
                &missing,
            ),
            (
                "an sslkey without a key",
                tls_query("require", None, Some(&wrong_key)),
                &ca,
            ),
            (
                "an sslrootcert without a certificate",
                tls_query("verify-ca", Some(&client.key), None),
                &client.key,
            ),
        ];
        for (what, query, path) in cases {
            let e = fails(what, &url("127.0.0.1:1", &query)).await;
            assert_names_file(what, &e, path);
        }
    }
}

#[cfg(feature = "nats")]
mod nats {
    use super::*;
    use metadatacache::NatsStorage;

    /// nats-server with `--tlsverify`: TLS only, and a client certificate
    /// signed by the test CA.
    struct NatsTls;

    /// `tls_ca=PATH`, with the client certificate `client`.
    fn tls_query(ca: &Path, client: Option<&CertFiles>) -> String {
        let mut q = format!("tls_ca={}", ca.display());
        if let Some(c) = client {
            q += &file("tls_cert", &c.cert);
            q += &file("tls_key", &c.key);
        }
        q
    }

    /// Starts nats-server (JetStream) taking only TLS with a client
    /// certificate signed by `pki`'s CA.
    fn launch_tls(pki: &Pki) -> Option<Server> {
        let (server, ca) = (pki.server(), pki.ca());
        let (cert, key, ca) = (
            server.cert.to_string_lossy().into_owned(),
            server.key.to_string_lossy().into_owned(),
            ca.to_string_lossy().into_owned(),
        );
        servers::nats_with(&[
            "--tlsverify",
            "--tlscert",
            &cert,
            "--tlskey",
            &key,
            "--tlscacert",
            &ca,
        ])
    }

    impl TestServer for NatsTls {
        const BACKEND: &'static str = "nats";
        const CONNECTS_ON_OPEN: bool = false;
        const SECRET_URL: &'static str = "nats://u:hunter2@h:1/x?password=hunter2&bogus=1";

        fn launch() -> Option<Server> {
            launch_tls(&PKI)
        }

        fn url(addr: &str, space: &str, timeout: Option<std::time::Duration>) -> String {
            format!(
                "tls://{addr}/{space}/p?{}{}",
                tls_query(&PKI.ca(), Some(&PKI.client())),
                suite::timeout_query("&", timeout)
            )
        }

        fn root_url(addr: &str, space: &str) -> String {
            format!(
                "tls://{addr}/{space}?{}",
                tls_query(&PKI.ca(), Some(&PKI.client()))
            )
        }

        async fn from_url(url: &str) -> Result<Arc<dyn Storage>> {
            Ok(Arc::new(NatsStorage::from_url(url).await?))
        }
    }

    suite::server_tests!(NatsTls;
        served: conformance, counter_counts_exactly, outage_then_recovery;
        offline: );

    /// The first call on a storage opened from `url` fails: its error.
    async fn first_call(what: &str, url: &str) -> Error {
        match NatsStorage::from_url(url).await {
            Ok(storage) => must_fail(what, storage.simple_download("doc")).await,
            Err(e) => e,
        }
    }

    /// Against a server that requires client certificates signed by the
    /// test CA: the right settings work, and every wrong one fails saying
    /// what is wrong and naming the file or the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_tls_settings_fail_saying_so() {
        let pki = Pki::new();
        let Some(server) = launch_tls(&pki) else {
            return;
        };
        let addr = server.addr();
        let client = pki.client();
        let url =
            |scheme: &str, query: String| format!("{scheme}://{addr}/tlsb?{query}&timeout_ms=2000");

        let good = NatsStorage::from_url(&url("tls", tls_query(&pki.ca(), Some(&client))))
            .await
            .unwrap();
        good.simple_upload("doc", "1".into()).await.unwrap();
        assert_eq!(good.simple_download("doc").await.unwrap(), "1");

        let other_ca = pki.other_ca();
        let e = first_call("wrong CA", &url("tls", tls_query(&other_ca, Some(&client)))).await;
        assert_tls_failure(
            "wrong CA",
            &e,
            &["not trusted", &other_ca.to_string_lossy(), addr],
        );

        // A plain URL: the server asks for TLS, and the system's CAs do not
        // know the test CA.
        let plain = format!("nats://{addr}/tlsb?timeout_ms=2000");
        let e = first_call("no CA at a TLS server", &plain).await;
        assert_tls_failure(
            "no CA at a TLS server",
            &e,
            &["not trusted", "the system's CA certificates"],
        );

        let e = first_call(
            "no client certificate",
            &url("tls", tls_query(&pki.ca(), None)),
        )
        .await;
        assert_tls_failure(
            "no client certificate",
            &e,
            &["requires a client certificate", "tls_cert=PATH", addr],
        );

        let stranger = pki.untrusted_client();
        let e = first_call(
            "client certificate of another CA",
            &url("tls", tls_query(&pki.ca(), Some(&stranger))),
        )
        .await;
        assert_tls_failure(
            "client certificate of another CA",
            &e,
            &[
                "rejected the client certificate",
                &stranger.cert.to_string_lossy(),
            ],
        );
    }

    /// A TLS URL at a plain-text server says that the server offers no TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_url_at_a_plain_server_fails_saying_so() {
        let pki = Pki::new();
        let Some(server) = servers::nats() else {
            return;
        };
        let url = format!(
            "tls://{}/tlsb?{}&timeout_ms=2000",
            server.addr(),
            tls_query(&pki.ca(), Some(&pki.client()))
        );
        let e = first_call("TLS to a plain server", &url).await;
        assert_tls_failure(
            "TLS to a plain server",
            &e,
            &["does not offer it", server.addr()],
        );
        // A plain URL there is no TLS problem.
        let plain = format!("nats://{}/tlsb?timeout_ms=2000", server.addr());
        let storage = NatsStorage::from_url(&plain).await.unwrap();
        storage.simple_upload("doc", "1".into()).await.unwrap();
    }

    /// Missing or unusable certificate files: `InvalidInput` naming the
    /// file, when the storage is opened (nothing listens on port 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unusable_certificate_files_are_invalid_input_naming_them() {
        let pki = Pki::new();
        let (ca, client, missing) = (pki.ca(), pki.client(), nowhere(&pki));
        let with_cert = |cert: &Path, key: &Path| CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        let cases = [
            ("missing tls_ca", tls_query(&missing, None), missing.clone()),
            (
                "missing tls_cert",
                tls_query(&ca, Some(&with_cert(&missing, &client.key))),
                missing.clone(),
            ),
            (
                "a key file without a key",
                tls_query(&ca, Some(&with_cert(&client.cert, &ca))),
                ca.clone(),
            ),
            (
                "a CA file without a certificate",
                tls_query(&client.key, None),
                client.key.clone(),
            ),
        ];
        for (what, query, path) in cases {
            let url = format!("tls://127.0.0.1:1/b?{query}");
            let e = must_fail(what, NatsStorage::from_url(&url)).await;
            assert_names_file(what, &e, &path);
        }
    }
}

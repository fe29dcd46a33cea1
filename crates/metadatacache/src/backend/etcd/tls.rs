//! TLS to etcd: the client's TLS options from the URL's certificate files,
//! and finding out why a server closed a new connection at once.
//!
//! Most TLS failures come back from the driver with the rustls error inside
//! (an untrusted certificate, a server that does not speak TLS). Two do
//! not: a plain-text client at a TLS port, and a client without the
//! certificate a `--client-cert-auth` server requires (with TLS 1.3 the
//! server refuses it after the handshake). The driver sees only a closed
//! connection; [`probe`] then makes one TLS handshake of its own to tell.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::backend::tls::{self, Verify};
use crate::error::Result;

use super::config::TlsFiles;

/// The TLS settings of a connection to etcd.
pub(super) struct Tls {
    /// What the driver connects with.
    pub(super) options: TlsOptions,
    /// The same settings, for [`probe`].
    config: Arc<rustls::ClientConfig>,
    /// The files, for messages: `cacert /a/ca.pem, cert /a/c.pem`.
    pub(super) files: String,
    /// Whether the client has a certificate to show.
    has_identity: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Reads the certificate files and checks that they are usable (the CA
/// parses, the key fits the certificate) without any network traffic.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the
/// parameter and the file that is missing, unreadable or unusable.
pub(super) fn load(files: &TlsFiles, timeout: Duration) -> Result<Tls> {
    let ca_pem = tls::read_file("cacert", &files.cacert)?;
    let roots = tls::certificates("cacert", &files.cacert)?;
    let mut names = format!("cacert {}", files.cacert.display());
    let mut options = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .timeout(timeout);
    let identity = match &files.identity {
        Some((cert, key)) => {
            names += &format!(", cert {}, key {}", cert.display(), key.display());
            options = options.identity(Identity::from_pem(
                tls::read_file("cert", cert)?,
                tls::read_file("key", key)?,
            ));
            Some(tls::Identity {
                chain: tls::certificates("cert", cert)?,
                key: tls::private_key("key", key)?,
            })
        }
        None => None,
    };
    let mut config = tls::client_config(&roots, Verify::Full, identity, &names)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Tls {
        options,
        config: Arc::new(config),
        files: names,
        has_identity: files.identity.is_some(),
    })
}

/// Explains, if it can, why the servers at `endpoints` (`http://host:port`
/// or `https://host:port`) closed connections at once: one handshake with
/// each, until one tells. `tls` is the client's TLS, `None` for plain text.
/// The whole probe is bounded by `timeout`.
pub(super) async fn probe(
    endpoints: &[String],
    tls: Option<&Tls>,
    timeout: Duration,
) -> Option<String> {
    let each = async {
        for endpoint in endpoints {
            let Some(address) = endpoint.split_once("://").map(|(_, a)| a) else {
                continue;
            };
            let found = match tls {
                Some(tls) => refused(address, tls).await,
                None => speaks_tls(address).await,
            };
            if found.is_some() {
                return found;
            }
        }
        None
    };
    tokio::time::timeout(timeout, each).await.ok().flatten()
}

/// Whether the server at `address` answers a TLS handshake: a plain-text
/// client at a TLS port.
async fn speaks_tls(address: &str) -> Option<String> {
    let config = tls::client_config(&[], Verify::Nothing, None, "probe").ok()?;
    let (stream, name) = connect(address).await?;
    let answer = TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await;
    let tls_server = match &answer {
        Ok(_) => true,
        // The server answered in TLS, if only to refuse.
        Err(e) => tls::explain(e).is_some_and(|why| why.starts_with("TLS certificate problem")),
    };
    tls_server.then(|| {
        format!(
            "TLS problem: the server at {address} speaks TLS, but the URL names no CA \
             (cacert=PATH), so the client spoke plain text"
        )
    })
}

/// Why the server at `address` ends a TLS connection that the client
/// thinks is set up: TLS 1.3 servers check the client certificate after
/// the handshake and answer a missing or untrusted one with an alert.
async fn refused(address: &str, tls: &Tls) -> Option<String> {
    let (stream, name) = connect(address).await?;
    let connector = TlsConnector::from(Arc::clone(&tls.config));
    let mut stream = match connector.connect(name, stream).await {
        Ok(stream) => stream,
        Err(e) => return tls::explain(&e),
    };
    // Read what the server sends (HTTP/2 settings, session tickets) until
    // it refuses the connection or the caller's timeout ends the probe.
    let mut buf = [0; 4096];
    let refusal = loop {
        match stream.read(&mut buf).await {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => break tls::explain(&e)?,
        }
    };
    Some(refine(refusal, Some(tls)))
}

/// Servers answer a missing client certificate as a bad one (etcd 3.4's
/// Go sends "bad certificate"): the client knows which it was, and says so.
pub(super) fn refine(refusal: String, tls: Option<&Tls>) -> String {
    if tls.is_some_and(|tls| !tls.has_identity) && refusal.contains("client certificate") {
        let alert = refusal.find("received").map_or("", |at| &refusal[at..]);
        return format!(
            "TLS certificate problem: the server requires a client certificate, and the URL \
             names none (cert=PATH&key=PATH): {alert}"
        );
    }
    refusal
}

/// A TCP connection to `host:port` and the server name to check.
async fn connect(address: &str) -> Option<(TcpStream, ServerName<'static>)> {
    let (host, _port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let stream = TcpStream::connect(address).await.ok()?;
    Some((stream, name))
}

/// The files as the messages name them, for a config without TLS.
pub(super) fn describe(tls: Option<&Tls>) -> &str {
    tls.map_or("no cacert: plain text", |t| t.files.as_str())
}

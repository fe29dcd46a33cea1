//! TLS to NATS: the client configuration, built here with the crate's own
//! cryptography provider (async-nats would otherwise build one from the
//! process-wide default, which a build that links two providers — ring
//! here, aws-lc-rs for object stores — does not have, and its connection
//! task panics), and finding out why connecting fails.
//!
//! The client reports a failed connection only as "IO error"; [`probe`]
//! then makes one connection of its own to tell: the server's INFO line in
//! plain text, then the TLS handshake, then what the server answers (a
//! TLS 1.3 server refuses a missing or untrusted client certificate after
//! the handshake, with an alert).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::config::Tls;
use crate::backend::tls::{Identity, Verify, certificates, client_config, explain, private_key};
use crate::error::{Error, ErrorKind, Result};

/// The client configuration for `tls`: the CA certificates of `tls_ca`, or
/// the system's; the server checked for the host name it is reached by;
/// the client certificate of `tls_cert`/`tls_key` when given.
///
/// # Errors
/// `InvalidInput` naming the file that cannot be read or used.
pub(super) fn config(tls: &Tls) -> Result<ClientConfig> {
    let roots = match &tls.ca {
        Some(ca) => certificates("tls_ca", ca)?,
        None => system_roots(),
    };
    let identity = match &tls.client {
        Some((cert, key)) => Some(Identity {
            chain: certificates("tls_cert", cert)?,
            key: private_key("tls_key", key)?,
        }),
        None => None,
    };
    let what = describe(tls);
    client_config(&roots, Verify::Full, identity, &what)
}

/// The system's CA certificates; none where they cannot be read (a TLS
/// server then fails the handshake as untrusted, naming no file).
fn system_roots() -> Vec<CertificateDer<'static>> {
    rustls_native_certs::load_native_certs().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "nats: cannot read the system's CA certificates");
        Vec::new()
    })
}

/// The TLS files of `tls`, for messages: `tls_ca=…, tls_cert=…`, or "the
/// system's CA certificates".
fn describe(tls: &Tls) -> String {
    let file = |name: &str, path: &Path| format!("{name}={}", path.display());
    let mut parts = Vec::new();
    match &tls.ca {
        Some(ca) => parts.push(file("tls_ca", ca)),
        None => parts.push("the system's CA certificates".to_owned()),
    }
    if let Some((cert, key)) = &tls.client {
        parts.push(file("tls_cert", cert));
        parts.push(file("tls_key", key));
    }
    parts.join(", ")
}

/// What explains a failure to connect: the client's TLS configuration and
/// the servers.
#[derive(Debug)]
pub(super) struct Probe {
    config: Arc<ClientConfig>,
    /// The URL asks for TLS (`tls://` or a `tls_*` parameter).
    required: bool,
    has_identity: bool,
    /// `nats://host:port` or `tls://host:port` each.
    servers: Vec<String>,
    /// The TLS files, for messages.
    files: String,
}

impl Probe {
    pub(super) fn new(config: Arc<ClientConfig>, tls: &Tls, servers: &[String]) -> Probe {
        Probe {
            config,
            required: tls.required,
            has_identity: tls.client.is_some(),
            servers: servers.to_vec(),
            files: describe(tls),
        }
    }

    /// A `PermissionDenied` error saying what is wrong, naming the files
    /// and the servers, when TLS is why the client cannot connect: one
    /// connection to each server until one tells, all within `timeout`.
    /// `None` when none tells (or TLS is not in play): the client's own
    /// error stands.
    pub(super) async fn explain(&self, timeout: Duration) -> Option<Error> {
        let each = async {
            for server in &self.servers {
                let address = server.split_once("://").map_or(server.as_str(), |(_, a)| a);
                if let Some(why) = self.refused(address).await {
                    return Some(refine(why, self.has_identity));
                }
            }
            None
        };
        let why = tokio::time::timeout(timeout, each).await.ok().flatten()?;
        let text = format!("{why} ({}; servers {})", self.files, self.servers.join(","));
        Some(Error::new(ErrorKind::PermissionDenied, text))
    }

    /// Why the server at `address` refuses a TLS connection as this client
    /// makes it; `None` when TLS is not in play (neither side asks for it).
    async fn refused(&self, address: &str) -> Option<String> {
        let (host, _port) = address.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).ok()?;
        let mut stream = BufReader::new(TcpStream::connect(address).await.ok()?);
        // The INFO line comes first, in plain text, and says whether the
        // server takes TLS.
        let mut info = Vec::new();
        let _ = (&mut stream)
            .take(64 * 1024)
            .read_until(b'\n', &mut info)
            .await
            .ok()?;
        let info = String::from_utf8_lossy(&info).replace(' ', "");
        let server_requires = info.contains("\"tls_required\":true");
        let server_offers = server_requires || info.contains("\"tls_available\":true");
        if !self.required && !server_requires {
            return None;
        }
        if !server_offers {
            return Some(format!(
                "TLS problem: the URL asks for TLS, but the server at {address} does not offer it"
            ));
        }
        let connector = TlsConnector::from(Arc::clone(&self.config));
        let mut stream = match connector.connect(name, stream.into_inner()).await {
            Ok(stream) => stream,
            Err(e) => return explain(&e),
        };
        // The server sends nothing before the client's CONNECT, unless it
        // refuses the connection; the caller's timeout ends the wait.
        let mut buf = [0; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return explain(&e),
            }
        }
    }
}

/// Servers answer a missing client certificate as a bad one: the client
/// knows which it was, and says so.
fn refine(refusal: String, has_identity: bool) -> String {
    if !has_identity && refusal.contains("client certificate") {
        let alert = refusal.find("received").map_or("", |at| &refusal[at..]);
        return format!(
            "TLS certificate problem: the server requires a client certificate, and the URL \
             names none (tls_cert=PATH&tls_key=PATH): {alert}"
        );
    }
    refusal
}

//! TLS for the networked backends (etcd, PostgreSQL): certificates and keys
//! read from PEM files, rustls client configurations that check as much of
//! the server's certificate as the URL asks for, and the one-line
//! explanation of a failed handshake.
//!
//! A certificate file that is missing, unreadable or holds no usable PEM
//! is `InvalidInput` naming the file, found before any network traffic. A
//! handshake that fails is `PermissionDenied` (with [`explain`]'s words):
//! retrying cannot help, and the server never ran a request of a
//! connection it refused.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};

use crate::error::{Error, Result};

/// How much of the server's certificate a client checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Nothing: the connection is encrypted, but the server is not
    /// authenticated (libpq's `sslmode=require` without a root certificate).
    Nothing,
    /// That a trusted CA signed it, whatever host name it is for
    /// (`sslmode=verify-ca`).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Chain,
    /// That a trusted CA signed it for the host name the client connects
    /// to (`sslmode=verify-full`; etcd).
    Full,
}

/// A client certificate chain and its private key.
pub(crate) struct Identity {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The cryptography of every TLS connection this crate makes: ring's,
/// named explicitly so that a build that also links another provider
/// (object_store's aws-lc-rs) needs no process-wide default.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The bytes of the file that the URL parameter `param` names.
///
/// # Errors
/// `InvalidInput` naming the parameter and the file when it cannot be read.
pub(crate) fn read_file(param: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::invalid_input(format!(
            "cannot read the {param} file {}: {e}",
            path.display()
        ))
    })
}

/// The PEM certificates in the file `param` names (at least one).
///
/// # Errors
/// `InvalidInput` naming the parameter and the file when it cannot be read
/// or holds no PEM certificate.
pub(crate) fn certificates(param: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(param, path)?;
    let bad =
        |why: String| Error::invalid_input(format!("the {param} file {}: {why}", path.display()));
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("unreadable PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

/// The PEM private key in the file `param` names.
///
/// # Errors
/// `InvalidInput` naming the parameter and the file when it cannot be read
/// or holds no PEM private key.
pub(crate) fn private_key(param: &str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_file(param, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        Error::invalid_input(format!(
            "the {param} file {}: no usable PEM private key: {e}",
            path.display()
        ))
    })
}

/// A client configuration that trusts the CA certificates `roots`, checks
/// the server as `verify` says and presents `identity` when the server
/// asks for a client certificate.
///
/// # Errors
/// `InvalidInput` when a root is not a usable CA certificate
/// or the identity's key does not fit its certificate; `what` names the
/// files in the message.
pub(crate) fn client_config(
    roots: &[CertificateDer<'static>],
    verify: Verify,
    identity: Option<Identity>,
    what: &str,
) -> Result<ClientConfig> {
    let bad = |why: String| Error::invalid_input(format!("TLS settings ({what}): {why}"));
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let builder = if verify == Verify::Nothing {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| bad(e.to_string()))?;
        match verify {
            Verify::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))),
            _ => builder.with_webpki_verifier(webpki),
        }
    };
    match identity {
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad(format!("the client certificate and key do not fit: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts any server certificate, but still checks that the server holds
/// its key (the handshake signatures), as an encrypted but unauthenticated
/// connection does.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The full check without its last step: the certificate must chain to a
/// trusted CA, but may be for any host name. The webpki verifier checks
/// the name only after the chain, validity and usage, so "not valid for
/// this name" means everything else passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What went wrong with TLS, in one line, when `error` (or anything in its
/// chain of sources) is a TLS failure; `None` for any other error.
pub(crate) fn explain(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(explain_rustls(tls));
        }
        // An io::Error's `source` skips the error it wraps: look inside.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && let Some(found) = explain(inner)
        {
            return Some(found);
        }
        // Failures without a rustls error: tokio-rustls' and the drivers'
        // own words.
        let text = e.to_string();
        if text == "tls handshake eof" {
            return Some(
                "TLS handshake failed: the server closed the connection (does it speak TLS?)"
                    .to_owned(),
            );
        }
        if text == "server does not support TLS" {
            return Some("TLS required, but the server does not support TLS".to_owned());
        }
        // An alert that HTTP/2 passed on as text (the rustls error is gone).
        if let Some(name) = text.strip_prefix("received fatal alert: ")
            && let Some(alert) = (0..=u8::MAX)
                .map(AlertDescription::from)
                .find(|a| format!("{a:?}") == name)
        {
            return Some(explain_rustls(&rustls::Error::AlertReceived(alert)));
        }
        next = e.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error) -> String {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(cert) => {
            let what = match cert {
                C::UnknownIssuer | C::BadSignature => {
                    "the server's certificate is not trusted (not signed by the configured CA)"
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "the server's certificate is not valid for the host name connected to"
                }
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => {
                    "the server's certificate has expired or is not valid yet"
                }
                _ => "the server's certificate was rejected",
            };
            format!("TLS certificate problem: {what}: {e}")
        }
        rustls::Error::AlertReceived(alert) => {
            let what = match alert {
                AlertDescription::CertificateRequired => {
                    "the server requires a client certificate and none was sent"
                }
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied => {
                    "the server rejected the client certificate (or the lack of one)"
                }
                _ => "the server refused the TLS handshake",
            };
            format!("TLS certificate problem: {what}: {e}")
        }
        _ => format!("TLS handshake failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ErrorKind;

    #[test]
    fn missing_and_empty_files_are_invalid_input_naming_them() {
        let dir = std::env::temp_dir().join(format!("mdcache-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let e = certificates("cacert", &missing).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        assert!(e.to_string().contains("cacert"), "{e}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = certificates("sslrootcert", &empty).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains(&*empty.to_string_lossy()), "{e}");
        let e = private_key("sslkey", &empty).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("sslkey"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn explains_tls_failures_inside_io_errors_only() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let text = explain(&io).unwrap();
        assert!(text.contains("not trusted"), "{text}");
        assert!(!text.contains('\n'), "{text}");

        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(
            explain(&alert)
                .unwrap()
                .contains("requires a client certificate")
        );

        // HTTP/2 passes a received alert on as text only.
        let text = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: BadCertificate",
        );
        let text = explain(&text).unwrap();
        assert!(text.contains("rejected the client certificate"), "{text}");
        let other = std::io::Error::new(std::io::ErrorKind::InvalidData, "received fatal alert: ?");
        assert_eq!(explain(&other), None);

        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(explain(&refused), None);
    }
}

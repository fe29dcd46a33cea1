//! TLS to PostgreSQL: libpq's `sslmode` and certificate files as the
//! rustls connector of every connection (the pool's, the listening ones,
//! and cancel requests).
//!
//! | `sslmode` | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | chain, when `sslrootcert` is given; else not |
//! | `require` | always | chain, when `sslrootcert` is given; else not |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert`, and the host name |

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::backend::tls::{self, Identity, Verify};
use crate::error::Result;

use super::config::{SslMode, TlsSettings};

/// The TLS connector of every connection.
pub(super) type Tls = MakeRustlsConnect;

/// The connector that `settings` ask for, with the certificate files read.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the
/// parameter and the file that is missing, unreadable or unusable.
pub(super) fn connector(settings: &TlsSettings) -> Result<Tls> {
    let verify = match (settings.mode, &settings.root_cert) {
        (SslMode::VerifyFull, _) => Verify::Full,
        (SslMode::VerifyCa, _) | (SslMode::Prefer | SslMode::Require, Some(_)) => Verify::Chain,
        // `disable` never uses its connector (and takes no files).
        (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => Verify::Nothing,
    };
    let roots = match &settings.root_cert {
        Some(path) => tls::certificates("sslrootcert", path)?,
        None => Vec::new(),
    };
    let identity = match &settings.identity {
        Some((cert, key)) => Some(Identity {
            chain: tls::certificates("sslcert", cert)?,
            key: tls::private_key("sslkey", key)?,
        }),
        None => None,
    };
    let config = tls::client_config(&roots, verify, identity, &describe(settings))?;
    Ok(MakeRustlsConnect::new(config))
}

/// `sslmode=… sslrootcert=… sslcert=… sslkey=…`, for messages.
pub(super) fn describe(settings: &TlsSettings) -> String {
    let mode = match settings.mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    };
    let mut out = format!("sslmode={mode}");
    if let Some(root) = &settings.root_cert {
        out += &format!(" sslrootcert={}", root.display());
    }
    if let Some((cert, key)) = &settings.identity {
        out += &format!(" sslcert={} sslkey={}", cert.display(), key.display());
    }
    out
}

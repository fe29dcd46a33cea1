//! Parsing a `postgres://` URL into the driver's configuration and ours.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::SslMode as DriverSslMode;

use crate::backend::util::{bad_url, parse_millis, query_path, redact_url};
use crate::error::Result;

/// Table used when the URL names none.
pub(super) const DEFAULT_TABLE: &str = "metadatacache";
/// Bound of every call when the URL sets no `timeout_ms`.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The environment variable that holds the password when the URL has none
/// (libpq's).
const PASSWORD_ENV: &str = "PGPASSWORD";
/// Connections kept when the URL sets no `pool_size`.
pub(super) const DEFAULT_POOL_SIZE: usize = 10;
const MAX_POOL_SIZE: usize = 1000;

/// How to reach PostgreSQL and which table to use: what a `postgres://`
/// URL says (see [`PostgresStorage`](super::PostgresStorage) for its form).
/// `Debug` never shows the password, also not one from `PGPASSWORD`.
///
/// ```
/// use metadatacache::PostgresConfig;
/// let config = PostgresConfig::from_url("postgres://app:s3cret@127.0.0.1/app?table=docs")?;
/// assert_eq!(config.table(), "docs");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone)]
pub struct PostgresConfig {
    /// What is left for the driver once our own parameters are removed.
    pub(super) pg: tokio_postgres::Config,
    /// A validated plain identifier.
    pub(super) table: String,
    pub(super) timeout: Duration,
    pub(super) pool_size: usize,
    /// TLS: `sslmode` and the certificate files.
    pub(super) tls: TlsSettings,
    /// The URL with its password replaced by `***`, for messages and Debug.
    pub(super) redacted: String,
}

/// libpq's `sslmode` values (but `allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS parameters of a URL: `sslmode`, `sslrootcert`, `sslcert`,
/// `sslkey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsSettings {
    pub(super) mode: SslMode,
    /// The CA certificate(s) the server's certificate must chain to.
    pub(super) root_cert: Option<PathBuf>,
    /// A client certificate and its key.
    pub(super) identity: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted)
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .finish()
    }
}

impl PostgresConfig {
    /// Reads a `postgres://` (or `postgresql://`) URL: our parameters
    /// `table`, `timeout_ms` and `pool_size`, libpq's TLS parameters
    /// `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, and the driver's
    /// (libpq's) for everything else. Without a password in the URL, the
    /// one in the environment variable `PGPASSWORD` is used, as libpq does.
    /// Certificate files are read later, by
    /// [`PostgresStorage::new`](super::PostgresStorage::new).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (password hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<PostgresConfig> {
        parse_with_env(url, &|name| std::env::var(name).ok())
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The bound of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
fn parse(url: &str) -> Result<PostgresConfig> {
    parse_with_env(url, &|_| None)
}

/// Parses `postgres://user:pass@host:port/db?table=NAME&timeout_ms=N&pool_size=N`
/// (or `postgresql://`) with the TLS parameters. Other query parameters go
/// to the driver unchanged. `env` looks up environment variables.
fn parse_with_env(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<PostgresConfig> {
    let redacted = redact_url(url);
    let bad = |why: String| bad_url("postgres", url, why);
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(bad("expected postgres://user@host:port/db".into()));
    }
    if url.contains('#') {
        return Err(bad("a fragment ('#') is not allowed".into()));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut table = DEFAULT_TABLE.to_owned();
    let mut timeout = DEFAULT_TIMEOUT;
    let mut pool_size = DEFAULT_POOL_SIZE;
    // `None`: not given.
    let mut mode = None;
    let (mut root_cert, mut cert, mut cert_key) = (None, None, None);
    let mut driver_params = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = url::form_urlencoded::parse(part.as_bytes())
            .next()
            .unwrap_or_default();
        match key.as_ref() {
            "table" => {
                if !is_identifier(&value) {
                    return Err(bad(format!(
                        "table {value:?} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]{{0,62}})"
                    )));
                }
                table = value.into_owned();
            }
            "timeout_ms" => match parse_millis(&value) {
                Some(t) => timeout = t,
                None => {
                    return Err(bad(format!(
                        "timeout_ms {value:?} is not a positive integer"
                    )));
                }
            },
            "pool_size" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_POOL_SIZE).contains(&n) => pool_size = n,
                _ => {
                    return Err(bad(format!(
                        "pool_size {value:?} is not an integer from 1 to {MAX_POOL_SIZE}"
                    )));
                }
            },
            "sslmode" => {
                mode = Some(match value.as_ref() {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Err(bad(format!(
                            "sslmode {value:?} is not one of disable, prefer, require, \
                             verify-ca, verify-full"
                        )));
                    }
                });
            }
            "sslrootcert" | "sslcert" | "sslkey" if value.is_empty() => {
                return Err(bad(format!("{key} needs a file name")));
            }
            "sslrootcert" if value == "system" => {
                return Err(bad(
                    "sslrootcert=system (the system's CAs) is not supported: name a CA file".into(),
                ));
            }
            "sslrootcert" | "sslcert" | "sslkey" => {
                let path = query_path(part)
                    .ok_or_else(|| bad(format!("bad percent-encoding in {key}")))?;
                match key.as_ref() {
                    "sslrootcert" => root_cert = Some(path),
                    "sslcert" => cert = Some(path),
                    _ => cert_key = Some(path),
                }
            }
            _ => driver_params.push(part),
        }
    }
    let identity = match (cert, cert_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return Err(bad(
                "sslcert and sslkey go together: give both or neither".into()
            ));
        }
    };
    // A CA to check the server against means TLS is wanted: `prefer` would
    // go on in plain text when the server (or anyone on the way) declines.
    let mode = match mode {
        Some(SslMode::Prefer) if root_cert.is_some() => {
            return Err(bad(
                "sslmode=prefer with sslrootcert: prefer goes on in plain text when TLS is \
                 declined, so the CA would check nothing; use require, verify-ca or \
                 verify-full"
                    .into(),
            ));
        }
        Some(mode) => mode,
        None if root_cert.is_some() => SslMode::Require,
        None => SslMode::Prefer,
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        return Err(bad(
            "sslmode=verify-ca and verify-full need sslrootcert=PATH, the CA that signed \
             the server's certificate"
                .into(),
        ));
    }
    if mode == SslMode::Disable && (root_cert.is_some() || identity.is_some()) {
        return Err(bad(
            "sslmode=disable with certificate files: TLS is off, so they would be ignored".into(),
        ));
    }
    let driver_url = if driver_params.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", driver_params.join("&"))
    };
    let mut pg = tokio_postgres::Config::from_str(&driver_url)
        .map_err(|e| bad(format!("not a valid connection URL: {e}")))?;
    if pg.get_hosts().is_empty() {
        return Err(bad("no host".into()));
    }
    pg.ssl_mode(match mode {
        SslMode::Disable => DriverSslMode::Disable,
        SslMode::Prefer => DriverSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
    });
    if pg.get_password().is_none()
        && let Some(password) = env(PASSWORD_ENV)
    {
        pg.password(password);
    }
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(timeout);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("metadatacache");
    }
    Ok(PostgresConfig {
        pg,
        table,
        timeout,
        pool_size,
        tls: TlsSettings {
            mode,
            root_cert,
            identity,
        },
        redacted,
    })
}

/// `[A-Za-z_][A-Za-z0-9_]{0,62}`: safe to splice into SQL (it is quoted too).
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ErrorKind;

    fn parse_err(url: &str) -> crate::Error {
        match parse(url) {
            Ok(_) => panic!("{url} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_our_parameters_and_keeps_the_driver_ones() {
        let s = parse(
            "postgresql://u:pw@db.example:6543/app?table=docs_1&timeout_ms=250&pool_size=3&application_name=x",
        )
        .unwrap();
        assert_eq!(s.table, "docs_1");
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.pool_size, 3);
        assert_eq!(s.pg.get_dbname(), Some("app"));
        assert_eq!(s.pg.get_user(), Some("u"));
        assert_eq!(s.pg.get_application_name(), Some("x"));
        assert_eq!(
            s.pg.get_connect_timeout(),
            Some(&Duration::from_millis(250))
        );
        assert_eq!(
            s.redacted,
            "postgresql://u:***@db.example:6543/app?table=docs_1&timeout_ms=250&pool_size=3&application_name=x"
        );

        let s = parse("postgres://u@h/db").unwrap();
        assert_eq!(s.table, DEFAULT_TABLE);
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert_eq!(s.pool_size, DEFAULT_POOL_SIZE);
    }

    #[test]
    fn bad_urls_are_invalid_input_naming_the_url() {
        for url in [
            "postgres://u@h/db?table=bad-name",
            "postgres://u@h/db?table=1abc",
            "postgres://u@h/db?table=",
            "postgres://u@h/db?table=a%22b",
            "postgres://u@h/db?timeout_ms=0",
            "postgres://u@h/db?timeout_ms=soon",
            "postgres://u@h/db?pool_size=0",
            "postgres://u@h/db?sslmode=allow",
            "postgres://u@h/db?sslmode=verify-full",
            "postgres://u@h/db?sslmode=verify-ca&sslcert=c.pem&sslkey=",
            "postgres://u@h/db?sslmode=require&sslcert=c.pem",
            "postgres://u@h/db?sslmode=disable&sslrootcert=ca.pem",
            "postgres://u@h/db?sslrootcert=system",
            "postgres://u@h/db?port=notaport",
            "postgres://u@h:99999/db",
            "postgres://u@h/db#frag",
            "mysql://u@h/db",
        ] {
            let e = parse_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains(url), "{url}: {e}");
        }
        let long = format!("postgres://u@h/db?table={}", "t".repeat(64));
        assert_eq!(parse_err(&long).kind(), ErrorKind::InvalidInput);
        parse(&format!("postgres://u@h/db?table={}", "t".repeat(63))).unwrap();
    }

    #[test]
    fn reads_libpq_tls_parameters() {
        let s = parse("postgres://u@h/db").unwrap();
        assert_eq!(s.tls.mode, SslMode::Prefer);
        assert_eq!(s.pg.get_ssl_mode(), DriverSslMode::Prefer);

        let s = parse("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(s.pg.get_ssl_mode(), DriverSslMode::Disable);

        let s = parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/c.key&table=t",
        )
        .unwrap();
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert_eq!(s.pg.get_ssl_mode(), DriverSslMode::Require);
        assert_eq!(s.tls.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            s.tls.identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/c.key")))
        );
        assert_eq!(s.table, "t");
        assert!(format!("{s:?}").contains("/ca.pem"));

        // A CA without a mode: TLS required, never plain text; with
        // `prefer` named: refused.
        let s = parse("postgres://u@h/db?sslrootcert=ca.pem").unwrap();
        assert_eq!(s.tls.mode, SslMode::Require);
        assert_eq!(s.pg.get_ssl_mode(), DriverSslMode::Require);
        let e = parse_err("postgres://u@h/db?sslmode=prefer&sslrootcert=ca.pem");
        assert!(
            e.to_string().contains("sslmode=prefer with sslrootcert"),
            "{e}"
        );

        for (mode, expected) in [
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
        ] {
            let s = parse(&format!(
                "postgres://u@h/db?sslmode={mode}&sslrootcert=ca.pem"
            ))
            .unwrap();
            assert_eq!(s.tls.mode, expected);
            assert_eq!(s.pg.get_ssl_mode(), DriverSslMode::Require);
        }
    }

    #[test]
    fn password_from_pgpassword_unless_the_url_has_one() {
        let env = |name: &str| (name == "PGPASSWORD").then(|| "from-env".to_owned());
        let s = parse_with_env("postgres://u@h/db", &env).unwrap();
        assert_eq!(s.pg.get_password(), Some(&b"from-env"[..]));
        assert!(!format!("{s:?}").contains("from-env"));
        let s = parse_with_env("postgres://u:in-url@h/db", &env).unwrap();
        assert_eq!(s.pg.get_password(), Some(&b"in-url"[..]));
        let s = parse_with_env("postgres://u@h/db?password=q", &env).unwrap();
        assert_eq!(s.pg.get_password(), Some(&b"q"[..]));
        let s = parse("postgres://u@h/db").unwrap();
        assert_eq!(s.pg.get_password(), None);
    }

    #[test]
    fn passwords_are_redacted() {
        let e = parse_err("postgres://u:hunter2@h/db?table=no-no");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=hunter2"),
            "postgres://h/db?user=u&password=***"
        );
    }
}

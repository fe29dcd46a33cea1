//! Parsing of `etcd://` URLs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::util::{bad_url, parse_millis, percent_decode, query_path};
use crate::error::Result;
use crate::storage::validate_path;

use super::layout::check_not_reserved;

/// The default bound on every call.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable that holds the password when the URL names a
/// user but no password (etcdctl reads its flags from `ETCDCTL_*`
/// variables, `--password` from this one).
pub(super) const PASSWORD_ENV: &str = "ETCDCTL_PASSWORD";

/// How to reach an etcd cluster: what an `etcd://` URL says (see
/// [`EtcdStorage`](super::EtcdStorage) for its form). `Debug` never shows
/// the password (it shows the certificate files' paths).
///
/// ```
/// use metadatacache::EtcdConfig;
/// let config = EtcdConfig::from_url("etcd://app:s3cret@127.0.0.1:2379/myapp?timeout_ms=2000")?;
/// assert_eq!(config.prefix(), "myapp");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` of each endpoint.
    pub(super) endpoints: Vec<String>,
    /// The key prefix without a trailing slash; empty for none.
    pub(super) prefix: String,
    /// The bound on every call.
    pub(super) timeout: Duration,
    /// User name and password, if the cluster has authentication enabled.
    pub(super) credentials: Option<(String, String)>,
    /// TLS: the files that `cacert`, `cert` and `key` name.
    pub(super) tls: Option<TlsFiles>,
}

/// The certificate files of an `etcd://` URL: TLS is on when it names a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsFiles {
    /// The CA certificate(s) that the servers' certificates must chain to.
    pub(super) cacert: PathBuf,
    /// A client certificate and its key, for `--client-cert-auth` clusters.
    pub(super) identity: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl EtcdConfig {
    /// Reads `etcd://[user[:password]@]host:port[,host:port...][/prefix][?timeout_ms=N&user=U&password=P&cacert=PATH&cert=PATH&key=PATH]`.
    /// When the URL names a user but no password, the password is read from
    /// the environment variable `ETCDCTL_PASSWORD` (unset: empty). Certificate files are read later, by
    /// [`EtcdStorage::new`](super::EtcdStorage::new).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (password hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<EtcdConfig> {
        parse(url, &|name| std::env::var(name).ok())
    }
}

/// [`EtcdConfig::from_url`], with the environment `env` (for tests).
fn parse(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<EtcdConfig> {
    let bad = |why: &str| bad_url("etcd", url, why);
    let rest = if let Some(rest) = url.strip_prefix("etcd://") {
        rest
    } else if url.starts_with("etcds://") {
        return Err(bad(
            "there is no etcds:// scheme: TLS is on when the URL names the CA, \
                 etcd://host:port/prefix?cacert=PATH[&cert=PATH&key=PATH]",
        ));
    } else {
        return Err(bad("expected etcd://host:port[,host:port...]/prefix"));
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));

    let mut user = None;
    let mut password = None;
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            user = Some(percent_decode(u).ok_or_else(|| bad("bad percent-encoding in the user"))?);
            if userinfo.contains(':') {
                password = Some(
                    percent_decode(p).ok_or_else(|| bad("bad percent-encoding in the password"))?,
                );
            }
            hosts
        }
        None => authority,
    };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        endpoints.push(endpoint(host).ok_or_else(|| {
            bad("expected host:port endpoints separated by commas (port 2379 when left out)")
        })?);
    }
    let (mut cacert, mut cert, mut cert_key) = (None, None, None);

    let prefix = percent_decode(path.trim_end_matches('/'))
        .ok_or_else(|| bad("bad percent-encoding in the key prefix"))?;
    validate_path(&prefix, true).map_err(|e| bad(&format!("key prefix: {}", e.message())))?;
    check_not_reserved(&prefix).map_err(|e| bad(&format!("key prefix: {}", e.message())))?;

    let mut timeout = DEFAULT_TIMEOUT;
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = url::form_urlencoded::parse(part.as_bytes())
            .next()
            .unwrap_or_default();
        let path = || query_path(part).ok_or_else(|| bad("bad percent-encoding in a file name"));
        match &*name {
            "timeout_ms" => {
                timeout = parse_millis(&value)
                    .ok_or_else(|| bad("timeout_ms must be a positive integer"))?;
            }
            "user" => user = Some(value.into_owned()),
            "password" => password = Some(value.into_owned()),
            "cacert" | "cert" | "key" if value.is_empty() => {
                return Err(bad(&format!("{name} needs a file name")));
            }
            "cacert" => cacert = Some(path()?),
            "cert" => cert = Some(path()?),
            "key" => cert_key = Some(path()?),
            other => {
                return Err(bad(&format!(
                    "unknown parameter {other:?}; known: timeout_ms, user, password, \
                         cacert, cert, key"
                )));
            }
        }
    }
    let identity = match (cert, cert_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(bad("cert and key go together: give both or neither")),
    };
    let tls = match (cacert, identity) {
        (Some(cacert), identity) => Some(TlsFiles { cacert, identity }),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(bad(
                "a client certificate needs TLS, which is on when cacert=PATH names the CA",
            ));
        }
    };
    if tls.is_some() {
        for endpoint in &mut endpoints {
            endpoint.replace_range(.."http".len(), "https");
        }
    }
    if user.is_some() && password.is_none() {
        password = env(PASSWORD_ENV);
    }
    let credentials = match (user, password) {
        (Some(user), password) if !user.is_empty() => Some((user, password.unwrap_or_default())),
        (None, None) => None,
        _ => return Err(bad("a password needs a user name")),
    };
    Ok(EtcdConfig {
        endpoints,
        prefix,
        timeout,
        credentials,
        tls,
    })
}

impl EtcdConfig {
    /// The key prefix, without a trailing slash ("" for none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Bounds every call by `timeout` instead.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// `host:port`, `host` or `[v6]:port` → `http://host:port`.
fn endpoint(host: &str) -> Option<String> {
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{addr}]"), port)
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']')
            })
    };
    if !valid_name(&name) {
        return None;
    }
    let port: u16 = match port {
        None => 2379,
        Some(p) => p.parse().ok().filter(|p| *p != 0)?,
    };
    Some(format!("http://{name}:{port}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parses_endpoints_prefix_and_options() {
        let c = EtcdConfig::from_url("etcd://127.0.0.1:2379/app/docs").unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(c.prefix, "app/docs");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(c.credentials.is_none());

        let c = EtcdConfig::from_url("etcd://a:1,b,[::1]:3/?timeout_ms=250&user=u&password=p%26q")
            .unwrap();
        assert_eq!(
            c.endpoints,
            ["http://a:1", "http://b:2379", "http://[::1]:3"]
        );
        assert_eq!(c.prefix, "");
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.credentials, Some(("u".into(), "p&q".into())));

        let c = EtcdConfig::from_url("etcd://bob:s%40cret@h:9").unwrap();
        assert_eq!(c.endpoints, ["http://h:9"]);
        assert_eq!(c.credentials, Some(("bob".into(), "s@cret".into())));
        assert!(!format!("{c:?}").contains("cret"));
    }

    #[test]
    fn rejects_bad_urls_naming_them() {
        for url in [
            "etcd://",
            "etcd://h:notaport/x",
            "etcd://h:0",
            "etcd://h:1,/x",
            "etcd://h:1/../x",
            "etcd://h:1/a//b",
            "etcd://h:1/.mdcache-meta",
            "etcd://h:1/x?timeout_ms=0",
            "etcd://h:1/x?timeout_ms=abc",
            "etcd://h:1/x?bogus=1",
            "etcd://h:1/x?password=p",
            "etcd://h:1/%zz",
            "etcds://h:1/x",
            "http://h:1/x",
            "etcd://h:1/x?cert=c.pem&key=k.pem",
            "etcd://h:1/x?cacert=ca.pem&cert=c.pem",
            "etcd://h:1/x?cacert=ca.pem&key=k.pem",
            "etcd://h:1/x?cacert=",
            "etcd://h:1/x?cacert=%zz",
        ] {
            let e = EtcdConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(
                e.to_string()
                    .contains(&crate::backend::util::redact_url(url)),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn tls_when_the_url_names_a_ca() {
        let c = EtcdConfig::from_url(
            "etcd://a:1,b:2/p?cacert=/pki/ca.pem&cert=/pki/c+1.pem&key=/pki/c%201.key",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["https://a:1", "https://b:2"]);
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cacert, PathBuf::from("/pki/ca.pem"));
        assert_eq!(
            tls.identity,
            Some((PathBuf::from("/pki/c+1.pem"), PathBuf::from("/pki/c 1.key")))
        );
        assert!(format!("{c:?}").contains("/pki/ca.pem"));

        let c = EtcdConfig::from_url("etcd://a:1/p?cacert=ca.pem").unwrap();
        assert_eq!(c.endpoints, ["https://a:1"]);
        assert_eq!(c.tls.unwrap().identity, None);
    }

    #[test]
    fn password_from_etcdctl_password_when_the_url_has_none() {
        let env = |name: &str| (name == "ETCDCTL_PASSWORD").then(|| "from-env".to_owned());
        let c = parse("etcd://root@h:1/p", &env).unwrap();
        assert_eq!(c.credentials, Some(("root".into(), "from-env".into())));
        assert!(!format!("{c:?}").contains("from-env"));
        let c = parse("etcd://h:1/p?user=root", &env).unwrap();
        assert_eq!(c.credentials, Some(("root".into(), "from-env".into())));
        // The URL's password wins; no user, no password.
        let c = parse("etcd://root:url@h:1/p", &env).unwrap();
        assert_eq!(c.credentials, Some(("root".into(), "url".into())));
        let c = parse("etcd://h:1/p", &env).unwrap();
        assert_eq!(c.credentials, None);
        let c = parse("etcd://root@h:1/p", &|_| None).unwrap();
        assert_eq!(c.credentials, Some(("root".into(), String::new())));
    }

    #[test]
    fn messages_hide_passwords() {
        let e = EtcdConfig::from_url("etcd://u:hunter2@h:x/p?password=hunter3").unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("hunter"), "{text}");
        assert!(text.contains("etcd://u:***@h:x/p?password=***"), "{text}");
    }
}

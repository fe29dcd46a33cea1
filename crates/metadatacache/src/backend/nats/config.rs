//! Parsing of `nats://` (and `tls://`) URLs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::backend::util::{bad_url, parse_millis, percent_decode};
use crate::error::Result;
use crate::storage::validate_path;

/// The default bound on every call.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The NATS client port.
const DEFAULT_PORT: u16 = 4222;

/// How the client proves who it is.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Auth {
    /// No credentials.
    None,
    /// `user:password`.
    UserPassword(String, String),
    /// A token.
    Token(String),
    /// A `.creds` file (JWT and nkey seed), as `nats` CLI's `--creds`.
    CredsFile(PathBuf),
    /// A file holding an nkey seed, as `nats` CLI's `--nkey`.
    NkeyFile(PathBuf),
}

/// TLS settings; TLS is used when `required` (a `tls://` URL or any
/// `tls_*` parameter) or when the server asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tls {
    pub(super) required: bool,
    /// PEM file of the certificate authorities to trust.
    pub(super) ca: Option<PathBuf>,
    /// PEM files of a client certificate and its key.
    pub(super) client: Option<(PathBuf, PathBuf)>,
}

/// How to reach a NATS JetStream key-value bucket: what a `nats://` URL says
/// (see [`NatsStorage`](super::NatsStorage) for its form). `Debug` never
/// shows a password or token.
///
/// ```
/// use metadatacache::NatsConfig;
/// let config = NatsConfig::from_url("nats://app:s3cret@127.0.0.1:4222/docs/v1?timeout_ms=2000")?;
/// assert_eq!((config.bucket(), config.prefix()), ("docs", "v1"));
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port` of each server.
    pub(super) servers: Vec<String>,
    /// The key-value bucket.
    pub(super) bucket: String,
    /// The storage path of the key prefix in the bucket; empty for none.
    pub(super) prefix: String,
    /// The bound on every call.
    pub(super) timeout: Duration,
    pub(super) auth: Auth,
    pub(super) tls: Tls,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::UserPassword(user, _) => format!("user {user:?}, password <redacted>"),
            Auth::Token(_) => "token <redacted>".to_owned(),
            Auth::CredsFile(path) => format!("creds file {}", path.display()),
            Auth::NkeyFile(path) => format!("nkey seed file {}", path.display()),
        };
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("auth", &format_args!("{auth}"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl NatsConfig {
    /// Reads `nats://[user:password@|token@]host[:port][,host[:port]...]/bucket[/prefix][?options]`
    /// (or `tls://…` to require TLS); the options are those of
    /// [`NatsStorage`](super::NatsStorage).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (password and token hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<NatsConfig> {
        let bad = |why: &str| bad_url("nats", url, why);
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("nats://") {
            ("nats", rest)
        } else if let Some(rest) = url.strip_prefix("tls://") {
            ("tls", rest)
        } else {
            return Err(bad(
                "expected nats://host:port/bucket or tls://host:port/bucket",
            ));
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));

        let mut user = None;
        let mut password = None;
        let mut token = None;
        let hosts = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let decode = |s: &str, what: &str| {
                    percent_decode(s)
                        .ok_or_else(|| bad(&format!("bad percent-encoding in the {what}")))
                };
                match userinfo.split_once(':') {
                    Some((u, p)) => {
                        user = Some(decode(u, "user")?);
                        password = Some(decode(p, "password")?);
                    }
                    // A lone user-info is a token, as NATS clients read it.
                    None => token = Some(decode(userinfo, "token")?),
                }
                hosts
            }
            None => authority,
        };
        let mut servers = Vec::new();
        for host in hosts.split(',') {
            servers.push(server(scheme, host).ok_or_else(|| {
                bad("expected host:port servers separated by commas (port 4222 when left out)")
            })?);
        }

        let path = path.trim_end_matches('/');
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("the bucket is missing: nats://host:port/bucket"));
        }
        if !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("a bucket name holds only letters, digits, '-' and '_'"));
        }
        let prefix =
            percent_decode(prefix).ok_or_else(|| bad("bad percent-encoding in the key prefix"))?;
        validate_path(&prefix, true).map_err(|e| bad(&format!("key prefix: {}", e.message())))?;

        let mut timeout = DEFAULT_TIMEOUT;
        let mut creds = None;
        let mut nkey = None;
        let mut tls = Tls {
            required: scheme == "tls",
            ..Tls::default()
        };
        let (mut cert, mut key) = (None, None);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            let is_file = matches!(&*name, "creds" | "nkey" | "tls_ca" | "tls_cert" | "tls_key");
            if is_file && value.is_empty() {
                return Err(bad(&format!("{name} needs a file name")));
            }
            match &*name {
                "timeout_ms" => {
                    timeout = parse_millis(&value)
                        .ok_or_else(|| bad("timeout_ms must be a positive integer"))?;
                }
                "user" => user = Some(value),
                "password" => password = Some(value),
                "token" => token = Some(value),
                "creds" => creds = Some(PathBuf::from(value)),
                "nkey" => nkey = Some(PathBuf::from(value)),
                "tls_ca" => tls.ca = Some(PathBuf::from(value)),
                "tls_cert" => cert = Some(PathBuf::from(value)),
                "tls_key" => key = Some(PathBuf::from(value)),
                other => {
                    return Err(bad(&format!(
                        "unknown parameter {other:?}; known: timeout_ms, user, password, token, \
                         creds, nkey, tls_ca, tls_cert, tls_key"
                    )));
                }
            }
        }
        match (cert, key) {
            (Some(cert), Some(key)) => tls.client = Some((cert, key)),
            (None, None) => {}
            _ => return Err(bad("tls_cert and tls_key go together")),
        }
        tls.required |= tls.ca.is_some() || tls.client.is_some();

        let password_auth = match (user, password) {
            (Some(user), password) if !user.is_empty() => {
                Some(Auth::UserPassword(user, password.unwrap_or_default()))
            }
            (None, None) => None,
            _ => return Err(bad("a password needs a user name")),
        };
        let mut chosen: Vec<Auth> = [
            password_auth,
            token.map(Auth::Token),
            creds.map(Auth::CredsFile),
            nkey.map(Auth::NkeyFile),
        ]
        .into_iter()
        .flatten()
        .collect();
        if chosen.len() > 1 {
            return Err(bad(
                "give one way to sign in: user and password, a token, creds or nkey",
            ));
        }
        Ok(NatsConfig {
            servers,
            bucket: bucket.to_owned(),
            prefix,
            timeout,
            auth: chosen.pop().unwrap_or(Auth::None),
            tls,
        })
    }

    /// The key-value bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix in the bucket, as a storage path ("" for none).
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

/// `host:port`, `host` or `[v6]:port` → `scheme://host:port`.
fn server(scheme: &str, host: &str) -> Option<String> {
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
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if !valid_name {
        return None;
    }
    let port: u16 = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse().ok().filter(|p| *p != 0)?,
    };
    Some(format!("{scheme}://{name}:{port}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parses_servers_bucket_prefix_and_options() {
        let c = NatsConfig::from_url("nats://127.0.0.1:4222/docs").unwrap();
        assert_eq!(c.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("docs", ""));
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(c.auth == Auth::None && !c.tls.required);

        let c =
            NatsConfig::from_url("nats://a:1,b,[::1]:3/kv_1/app/v%201/?timeout_ms=250").unwrap();
        assert_eq!(c.servers, ["nats://a:1", "nats://b:4222", "nats://[::1]:3"]);
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("kv_1", "app/v 1"));
        assert_eq!(c.timeout, Duration::from_millis(250));

        let c = NatsConfig::from_url("nats://bob:s%40cret@h/b").unwrap();
        assert!(c.auth == Auth::UserPassword("bob".into(), "s@cret".into()));
        assert!(!format!("{c:?}").contains("cret"), "{c:?}");
        let c = NatsConfig::from_url("nats://t0ken@h/b").unwrap();
        assert!(c.auth == Auth::Token("t0ken".into()));
        assert!(!format!("{c:?}").contains("t0ken"), "{c:?}");
        let c = NatsConfig::from_url("nats://h/b?user=u&password=p%26q").unwrap();
        assert!(c.auth == Auth::UserPassword("u".into(), "p&q".into()));
        let c = NatsConfig::from_url("nats://h/b?creds=/etc/app.creds").unwrap();
        assert!(c.auth == Auth::CredsFile("/etc/app.creds".into()));
        let c = NatsConfig::from_url("nats://h/b?nkey=seed.nk").unwrap();
        assert!(c.auth == Auth::NkeyFile("seed.nk".into()));

        let c = NatsConfig::from_url("tls://h:4443/b").unwrap();
        assert_eq!(c.servers, ["tls://h:4443"]);
        assert!(c.tls.required);
        let c =
            NatsConfig::from_url("nats://h/b?tls_ca=ca.pem&tls_cert=c.pem&tls_key=k.pem").unwrap();
        assert!(c.tls.required);
        assert_eq!(c.tls.ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            c.tls.client,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
    }

    #[test]
    fn rejects_bad_urls_naming_them() {
        for url in [
            "nats://",
            "nats://h:4222",
            "nats://h:4222/",
            "nats://h:notaport/b",
            "nats://h:0/b",
            "nats://h:1,/b",
            "nats://h/b.c",
            "nats://h/b*",
            "nats://h/b/../x",
            "nats://h/b/a//c",
            "nats://h/b/%zz",
            "nats://h/b?timeout_ms=0",
            "nats://h/b?bogus=1",
            "nats://h/b?password=p",
            "nats://h/b?tls_cert=c.pem",
            "nats://u:p@h/b?token=t",
            "nats://h/b?creds=a&nkey=b",
            "nats://h/b?creds=",
            "nats://h/b?tls_ca=",
            "http://h/b",
        ] {
            let e = NatsConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}");
            assert!(
                e.to_string()
                    .contains(&crate::backend::util::redact_url(url)),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn messages_hide_secrets() {
        for (url, shown) in [
            (
                "nats://u:hunter2@h:x/b?password=hunter3",
                "nats://u:***@h:x/b?password=***",
            ),
            ("nats://hunter2@h:x/b", "nats://***@h:x/b"),
            ("tls://h/b?token=hunter2&x=1", "tls://h/b?token=***&x=1"),
        ] {
            let text = NatsConfig::from_url(url).unwrap_err().to_string();
            assert!(!text.contains("hunter"), "{text}");
            assert!(text.contains(shown), "{text}");
        }
    }
}

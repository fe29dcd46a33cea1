//! What every backend needs alike: hiding secrets in URLs, reading the
//! parts of a storage URL, and the errors that say a URL is bad or a call
//! got no answer.

// Only the networked backends (cargo features) read URLs.
#![cfg_attr(
    not(any(
        feature = "etcd",
        feature = "postgres",
        feature = "s3",
        feature = "nats"
    )),
    allow(dead_code)
)]

use std::fmt;
use std::time::Duration;

use crate::error::Error;

/// `url` with its secrets replaced by `***`, for messages and `Debug`: the
/// password of its user-info (before the last `@` of the authority, or,
/// when the authority holds none, before the last `@` of the URL: a
/// password with an unescaped `/`, `?` or `#` ends the authority early),
/// the value of every query parameter whose name
/// says it is secret (`password`, `token`, `secret`, `sig`, `signature`,
/// `credential`, SAS and access or account keys), and the user-info of a
/// URL given as a parameter's value (an `endpoint`). In a NATS URL
/// (`nats://`, `tls://`) a user-info without a colon is a token and is
/// hidden whole. A URL whose parts are ambiguous may be hidden more than
/// needed, never less.
///
/// ```text
/// etcd://u:hunter2@h:2379/p?password=x  →  etcd://u:***@h:2379/p?password=***
/// nats://s3cret@h:4222/bucket           →  nats://***@h:4222/bucket
/// s3://AKIA:wJal/rXUt@bucket/p          →  s3://AKIA:***@bucket/p
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let rest = &out[start..];
        let token_scheme = matches!(&out[..start - 3], "nats" | "tls");
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@').or_else(|| rest.rfind('@')) {
            match rest[..at].find(':') {
                Some(colon) => out.replace_range(start + colon + 1..start + at, "***"),
                None if token_scheme => out.replace_range(start..start + at, "***"),
                None => {}
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if is_secret_param(k) => format!("{k}=***"),
                Some((k, v)) if v.contains("://") && v.contains('@') => {
                    format!("{k}={}", redact_url(v))
                }
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// Whether a query parameter named `name` carries a secret.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name == "sig"
        || [
            "password",
            "token",
            "secret",
            "signature",
            "credential",
            "sas",
            "access_key",
            "account_key",
            "accesskey",
            "accountkey",
        ]
        .iter()
        .any(|word| name.contains(word))
}

/// Decodes the `%XX` escapes of a URL part (no `+` → space: that is for
/// query strings only). `None` for a malformed escape or invalid UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The file path a query part `key=value` names: the value percent-decoded
/// as a path part is (a `+` stays a `+`, as libpq and etcdctl read file
/// names). `None` for a malformed escape.
#[cfg_attr(not(any(feature = "etcd", feature = "postgres")), allow(dead_code))]
pub(crate) fn query_path(part: &str) -> Option<std::path::PathBuf> {
    let raw = part.split_once('=').map_or("", |(_, value)| value);
    percent_decode(raw).map(std::path::PathBuf::from)
}

/// A positive whole number of milliseconds, as `timeout_ms=` takes it.
pub(crate) fn parse_millis(value: &str) -> Option<Duration> {
    value
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// The one-line error for a bad storage URL: names the backend and the URL
/// (secrets hidden) and says what is wrong with it.
pub(crate) fn bad_url(backend: &'static str, url: &str, why: impl fmt::Display) -> Error {
    Error::invalid_input(format!(
        "invalid {backend} storage URL {:?}: {why}",
        redact_url(url)
    ))
    .with_backend(backend)
}

/// The error of a call that got no answer within `timeout`; for a write,
/// it says the write may have been applied.
pub(crate) fn no_answer(timeout: Duration, write: bool) -> Error {
    let ms = timeout.as_millis();
    Error::unavailable(if write {
        format!("no answer within the {ms} ms timeout; the write may or may not have been applied")
    } else {
        format!("no answer within the {ms} ms timeout")
    })
}

/// The waits between attempts to re-establish a change stream after an
/// outage: from 100 ms, doubling up to 5 s, each with random jitter so
/// that the replicas of a service do not reconnect in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The wait before the next attempt (between half and all of the
    /// current step).
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(Self::MAX);
        step.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secrets_only() {
        for (url, shown) in [
            (
                "etcd://u:hunter2@h:x/p?password=hunter3",
                "etcd://u:***@h:x/p?password=***",
            ),
            ("postgres://u:p:q@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?user=u&Password=hunter2",
                "postgres://h/db?user=u&Password=***",
            ),
            ("s3://key:hunter2@b/x@y?z=1", "s3://key:***@b/x@y?z=1"),
            ("memory:", "memory:"),
            (
                "nats://hunter2@h:4222/b?token=x&y=1",
                "nats://***@h:4222/b?token=***&y=1",
            ),
            ("tls://u:pw@h/b", "tls://u:***@h/b"),
            // Passwords that end the authority early: never shown.
            ("s3://AKIA:wJal/rXUt@bucket/p", "s3://AKIA:***@bucket/p"),
            ("postgres://app:pa#ss@db/app", "postgres://app:***@db/app"),
            ("etcd://u:ab/cd@h:2379/x", "etcd://u:***@h:2379/x"),
            ("etcd://u:p?q@h/x", "etcd://u:***@h/x"),
            // Secret parameters, and credentials in a parameter's URL.
            (
                "az://c/p?sv=2022-11-02&sig=S3CRET",
                "az://c/p?sv=2022-11-02&sig=***",
            ),
            (
                "s3://b/p?aws_secret_access_key=S&region=x",
                "s3://b/p?aws_secret_access_key=***&region=x",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let endpoint = redact_url("s3://b/p?endpoint=https://minio:S3CRET@h:9000");
        assert!(!endpoint.contains("S3CRET"), "{endpoint}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("plain+x").as_deref(), Some("plain+x"));
        for bad in ["%", "%z1", "%1", "a%zz", "%ff"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn millis() {
        assert_eq!(parse_millis("250"), Some(Duration::from_millis(250)));
        for bad in ["0", "-1", "soon", "", "1.5"] {
            assert_eq!(parse_millis(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_url_names_the_url_without_secrets() {
        let e = bad_url("etcd", "etcd://u:pw@h/x", "why");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
        assert_eq!(
            e.to_string(),
            "etcd: invalid etcd storage URL \"etcd://u:***@h/x\": why"
        );
    }
}

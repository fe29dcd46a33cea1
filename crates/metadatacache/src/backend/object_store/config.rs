//! Opening an S3 storage from an `s3://` URL.

use std::sync::Arc;
use std::time::Duration;

use ::object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use ::object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use crate::backend::util::{self, parse_millis, percent_decode, redact_url};
use crate::error::{Error, Result};

/// Default bound on every call.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of reads (GET, HEAD, LIST) within the call's timeout.
const READ_RETRIES: usize = 3;

/// How to reach an S3 bucket: what an `s3://` URL says (see
/// [`ObjectStoreStorage`](super::ObjectStoreStorage) for its form), plus
/// credentials given in code. Everything left unset comes from the usual
/// `AWS_*` environment variables.
///
/// `Debug` never shows the secret key.
///
/// ```
/// use metadatacache::S3Config;
/// let config = S3Config::from_url("s3://bucket/app?endpoint=http://127.0.0.1:9000&allow_http=true")?
///     .credentials("AKIA-EXAMPLE", "secret-example");
/// assert!(!format!("{config:?}").contains("secret-example"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub(super) bucket: String,
    pub(super) prefix: String,
    pub(super) timeout: Duration,
    pub(super) endpoint: Option<String>,
    pub(super) region: Option<String>,
    pub(super) allow_http: Option<bool>,
    /// Access key id and secret access key.
    credentials: Option<(String, String)>,
    /// The URL it came from, any user-info hidden, for messages.
    url: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|(id, _)| id),
            )
            .finish_non_exhaustive()
    }
}

/// A bad `s3://` URL, with the form that is expected.
fn bad_url(url: &str, why: impl std::fmt::Display) -> Error {
    util::bad_url(
        "s3",
        url,
        format!(
            "{why}; expected \
             s3://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&region=R&allow_http=true]"
        ),
    )
}

impl S3Config {
    /// Reads an `s3://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (any user-info hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<S3Config> {
        Self::parse(url)
    }

    /// Uses these credentials instead of `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    #[must_use]
    pub fn credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some((access_key_id.into(), secret_access_key.into()));
        self
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix ("" for none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Parses `s3://bucket/prefix?timeout_ms=N&endpoint=…&region=…&allow_http=…`.
    fn parse(url: &str) -> Result<S3Config> {
        let parsed = url::Url::parse(url).map_err(|e| bad_url(url, e))?;
        if parsed.scheme() != "s3" {
            return Err(bad_url(url, "the scheme must be s3"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad_url(
                url,
                "credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY",
            ));
        }
        if parsed.port().is_some() {
            return Err(bad_url(url, "a bucket name has no port; use endpoint="));
        }
        let bucket = parsed.host_str().unwrap_or_default();
        if bucket.is_empty() || bucket.contains(['%', ' ']) {
            return Err(bad_url(url, "missing or invalid bucket name"));
        }
        let prefix = percent_decode(parsed.path().trim_matches('/'))
            .ok_or_else(|| bad_url(url, "the prefix is not valid percent-encoded UTF-8"))?;
        if !prefix.is_empty() {
            crate::storage::validate_path(&prefix, false)
                .map_err(|e| bad_url(url, format!("bad prefix: {}", e.message())))?;
        }
        let mut out = S3Config {
            bucket: bucket.to_owned(),
            prefix,
            timeout: DEFAULT_TIMEOUT,
            endpoint: None,
            region: None,
            allow_http: None,
            credentials: None,
            url: redact_url(url),
        };
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "timeout_ms" => {
                    out.timeout = parse_millis(&value)
                        .ok_or_else(|| bad_url(url, "timeout_ms must be a positive integer"))?;
                }
                "endpoint" => {
                    let ep = url::Url::parse(&value)
                        .ok()
                        .filter(|ep| matches!(ep.scheme(), "http" | "https"))
                        .ok_or_else(|| bad_url(url, "endpoint must be an http(s) URL"))?;
                    out.endpoint = Some(ep.as_str().trim_end_matches('/').to_owned());
                }
                "region" if !value.is_empty() => out.region = Some(value.into_owned()),
                "allow_http" => {
                    out.allow_http = Some(match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad_url(url, "allow_http must be true or false")),
                    });
                }
                other => {
                    return Err(bad_url(url, format!("unknown parameter {other:?}")));
                }
            }
        }
        if out
            .endpoint
            .as_deref()
            .is_some_and(|ep| ep.starts_with("http:"))
            && out.allow_http != Some(true)
        {
            return Err(bad_url(url, "a plain-http endpoint needs allow_http=true"));
        }
        Ok(out)
    }

    /// Builds the client from the environment plus this URL. `retries` is how
    /// often object_store itself retries an idempotent request.
    pub(super) fn build(&self, retries: usize) -> Result<Arc<AmazonS3>> {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                ms(self.timeout),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                ms(self.timeout),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(50),
                    max_backoff: (self.timeout / 4).max(Duration::from_millis(50)),
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: self.timeout,
            });
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        }
        if let Some(allow) = self.allow_http {
            builder = builder.with_allow_http(allow);
        }
        if let Some((id, secret)) = &self.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        let store = builder
            .build()
            .map_err(|e| bad_url(&self.url, "cannot configure the S3 client").with_source(e))?;
        Ok(Arc::new(store))
    }

    /// The store for reads, with a few retries.
    pub(super) fn build_read_store(&self) -> Result<Arc<dyn ObjectStore>> {
        Ok(self.build(READ_RETRIES)?)
    }

    /// The store for writes: no automatic retries, because a retried
    /// conditional put whose first attempt was applied would answer
    /// "precondition failed" for a write that succeeded, and a retried
    /// unconditional put or delete could undo a newer write made meanwhile.
    /// It also signs the conditional deletes.
    pub(super) fn build_write_store(&self) -> Result<Arc<AmazonS3>> {
        self.build(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn parses() {
        let u = S3Config::parse("s3://bkt/a/b%20c/?timeout_ms=1500&region=eu-west-1").unwrap();
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix, "a/b c");
        assert_eq!(u.timeout, Duration::from_millis(1500));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        let u = S3Config::parse("s3://bkt?endpoint=http://127.0.0.1:9000&allow_http=true").unwrap();
        assert_eq!(u.prefix, "");
        assert_eq!(u.timeout, DEFAULT_TIMEOUT);
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.allow_http, Some(true));
    }

    #[test]
    fn rejects() {
        for bad in [
            "s3://",
            "s3:///prefix",
            "s3://b/x?timeout_ms=0",
            "s3://b/x?timeout_ms=abc",
            "s3://b/x?nope=1",
            "s3://b/x?endpoint=ftp://h",
            "s3://b/x?endpoint=http://h",
            "s3://b/x?allow_http=maybe",
            "s3://user:secret@b/x",
            "s3://b:9000/x",
            "s3://b/a//x",
            "s3://b/%ff",
            "gs://b/x",
        ] {
            let e = S3Config::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains(&redact_url(bad)), "{e} names {bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}

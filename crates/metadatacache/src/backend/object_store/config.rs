//! What the `s3://`, `az://` and `gs://` URLs share: the bucket (or
//! container) and prefix, the timeout, the endpoint, and the retry policy
//! of the clients built from them.

use std::time::Duration;

use ::object_store::{BackoffConfig, RetryConfig};

use super::azure::AzureConfig;
use super::gcs::GcsConfig;
use super::s3::S3Config;
use crate::backend::util::{self, parse_millis, percent_decode, redact_url};
use crate::error::{Error, Result};

/// Default bound on every call.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries of reads (GET, HEAD, LIST) within the call's timeout.
pub(super) const READ_RETRIES: usize = 3;

/// Which object store a URL names, with everything needed to reach it:
/// `s3://`, `az://` or `gs://` (see
/// [`ObjectStoreStorage`](super::ObjectStoreStorage) for their forms).
/// [`ObjectStoreStorage::new`](super::ObjectStoreStorage::new) takes it,
/// or any of the three configs.
///
/// ```
/// use metadatacache::{ObjectStoreConfig, AzureConfig};
/// let config = ObjectStoreConfig::from_url("az://photos/app")?;
/// assert!(matches!(config, ObjectStoreConfig::Azure(ref c) if c.container() == "photos"));
/// let same = ObjectStoreConfig::from(AzureConfig::from_url("az://photos/app")?);
/// assert_eq!(config, same);
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObjectStoreConfig {
    /// An S3 or S3-compatible bucket (`s3://`).
    S3(S3Config),
    /// An Azure Blob Storage container (`az://`).
    Azure(AzureConfig),
    /// A Google Cloud Storage bucket (`gs://`).
    Gcs(GcsConfig),
}

impl ObjectStoreConfig {
    /// Reads an `s3://`, `az://` or `gs://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (secrets hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<ObjectStoreConfig> {
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("s3") => S3Config::from_url(url).map(Self::S3),
            Some("az") => AzureConfig::from_url(url).map(Self::Azure),
            Some("gs") => GcsConfig::from_url(url).map(Self::Gcs),
            _ => Err(Error::invalid_input(format!(
                "not an object store URL: {:?}; expected s3://, az:// or gs://",
                redact_url(url)
            ))),
        }
    }
}

impl From<S3Config> for ObjectStoreConfig {
    fn from(config: S3Config) -> Self {
        Self::S3(config)
    }
}

impl From<AzureConfig> for ObjectStoreConfig {
    fn from(config: AzureConfig) -> Self {
        Self::Azure(config)
    }
}

impl From<GcsConfig> for ObjectStoreConfig {
    fn from(config: GcsConfig) -> Self {
        Self::Gcs(config)
    }
}

/// The form of one service's URLs, for reading them and for the messages
/// about bad ones.
pub(super) struct UrlForm {
    /// The URL scheme, without `://`.
    pub scheme: &'static str,
    /// The backend name errors carry ("s3", "azure", "gcs").
    pub backend: &'static str,
    /// "bucket" or "container".
    pub bucket_word: &'static str,
    /// The whole form, for messages.
    pub form: &'static str,
    /// Where credentials come from, for the message that refuses them in the URL.
    pub credentials_hint: &'static str,
    /// Query parameters only this service knows.
    pub params: &'static [&'static str],
}

impl UrlForm {
    /// A bad URL of this form, naming the URL and the expected form.
    pub fn bad(&self, url: &str, why: impl std::fmt::Display) -> Error {
        util::bad_url(self.backend, url, format!("{why}; expected {}", self.form))
    }
}

/// What every object store URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UrlParts {
    pub bucket: String,
    pub prefix: String,
    pub timeout: Duration,
    pub endpoint: Option<String>,
    pub allow_http: Option<bool>,
    /// The service's own parameters ([`UrlForm::params`]), in order.
    pub params: Vec<(String, String)>,
    /// The URL, secrets hidden, for messages.
    pub url: String,
}

/// Reads `SCHEME://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&allow_http=B&…]`.
pub(super) fn parse_url(url: &str, form: &UrlForm) -> Result<UrlParts> {
    let parsed = url::Url::parse(url).map_err(|e| form.bad(url, e))?;
    if parsed.scheme() != form.scheme {
        return Err(form.bad(url, format!("the scheme must be {}", form.scheme)));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(form.bad(
            url,
            format!(
                "credentials do not belong in the URL; {}",
                form.credentials_hint
            ),
        ));
    }
    let word = form.bucket_word;
    if parsed.port().is_some() {
        return Err(form.bad(url, format!("a {word} name has no port; use endpoint=")));
    }
    let bucket = parsed.host_str().unwrap_or_default();
    if bucket.is_empty() || bucket.contains(['%', ' ']) {
        return Err(form.bad(url, format!("missing or invalid {word} name")));
    }
    let prefix = percent_decode(parsed.path().trim_matches('/'))
        .ok_or_else(|| form.bad(url, "the prefix is not valid percent-encoded UTF-8"))?;
    if !prefix.is_empty() {
        crate::storage::validate_path(&prefix, false)
            .map_err(|e| form.bad(url, format!("bad prefix: {}", e.message())))?;
    }
    let mut out = UrlParts {
        bucket: bucket.to_owned(),
        prefix,
        timeout: DEFAULT_TIMEOUT,
        endpoint: None,
        allow_http: None,
        params: Vec::new(),
        url: redact_url(url),
    };
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "timeout_ms" => {
                out.timeout = parse_millis(&value)
                    .ok_or_else(|| form.bad(url, "timeout_ms must be a positive integer"))?;
            }
            "endpoint" => {
                let ep = url::Url::parse(&value)
                    .ok()
                    .filter(|ep| matches!(ep.scheme(), "http" | "https"))
                    .filter(|ep| ep.query().is_none() && ep.username().is_empty())
                    .ok_or_else(|| form.bad(url, "endpoint must be an http(s) URL"))?;
                out.endpoint = Some(ep.as_str().trim_end_matches('/').to_owned());
            }
            "allow_http" => {
                out.allow_http = Some(match value.as_ref() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(form.bad(url, "allow_http must be true or false")),
                });
            }
            own if form.params.contains(&own) && !value.is_empty() => {
                out.params.push((key.into_owned(), value.into_owned()));
            }
            other => return Err(form.bad(url, format!("unknown parameter {other:?}"))),
        }
    }
    if out
        .endpoint
        .as_deref()
        .is_some_and(|ep| ep.starts_with("http:"))
        && out.allow_http != Some(true)
    {
        return Err(form.bad(url, "a plain-http endpoint needs allow_http=true"));
    }
    Ok(out)
}

impl UrlParts {
    /// The value of the service's own parameter `key`, if given.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The retry policy of a client: `retries` retries of idempotent requests,
/// all within `timeout`.
pub(super) fn retry_config(timeout: Duration, retries: usize) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: (timeout / 4).max(Duration::from_millis(50)),
            base: 2.0,
        },
        max_retries: retries,
        retry_timeout: timeout,
    }
}

/// `timeout` as object_store's client options take it.
pub(super) fn millis(timeout: Duration) -> String {
    format!("{}ms", timeout.as_millis().max(1))
}

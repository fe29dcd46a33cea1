//! Google Cloud Storage buckets: the `gs://` URL, the client, and the
//! delete conditional on the generation.
//!
//! Untested here: no GCS emulator that honours generation preconditions on
//! the XML API `object_store` speaks can be installed from the package
//! registries this project uses (see the README).
//!
//! `object_store` writes conditionally on an object's *generation*
//! (`x-goog-if-generation-match`), not its ETag, so a `gs://` storage
//! reports the generation as the document's etag.

use std::sync::Arc;

use ::object_store::ClientConfigKey;
use ::object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder, GoogleConfigKey};
use ::object_store::path::Path as ObjectPath;
use async_trait::async_trait;
use reqwest::header::HeaderName;

use super::Connected;
use super::client::EtagStyle;
use super::config::{READ_RETRIES, UrlForm, UrlParts, millis, parse_url, retry_config};
use super::requests::{Requests, SignedDelete};
use crate::error::{Error, ErrorKind, Result};

const FORM: UrlForm = UrlForm {
    scheme: "gs",
    backend: "gcs",
    bucket_word: "bucket",
    form: "gs://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&allow_http=true]",
    credentials_hint: "set GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_APPLICATION_CREDENTIALS",
    params: &[],
};

/// The header of a delete conditional on the generation.
const IF_GENERATION_MATCH: &str = "x-goog-if-generation-match";

/// How to reach a Google Cloud Storage bucket: what a `gs://` URL says
/// (see [`ObjectStoreStorage`](super::ObjectStoreStorage) for its form),
/// plus a service account key given in code. Everything left unset comes
/// from the usual `GOOGLE_*` environment variables.
///
/// `Debug` never shows the key.
///
/// ```
/// use metadatacache::GcsConfig;
/// let config = GcsConfig::from_url("gs://my-bucket/app")?
///     .service_account_key(r#"{"private_key": "secret-example"}"#);
/// assert_eq!(config.bucket(), "my-bucket");
/// assert!(!format!("{config:?}").contains("secret-example"));
/// # Ok::<_, metadatacache::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct GcsConfig {
    pub(super) parts: UrlParts,
    service_account_key: Option<String>,
}

impl std::fmt::Debug for GcsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsConfig")
            .field("bucket", &self.parts.bucket)
            .field("prefix", &self.parts.prefix)
            .field("timeout", &self.parts.timeout)
            .field("endpoint", &self.parts.endpoint)
            .field("allow_http", &self.parts.allow_http)
            .field(
                "service_account_key",
                &self.service_account_key.as_ref().map(|_| "***"),
            )
            .finish_non_exhaustive()
    }
}

impl GcsConfig {
    /// Reads a `gs://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL and what is wrong with it.
    pub fn from_url(url: &str) -> Result<GcsConfig> {
        Ok(GcsConfig {
            parts: parse_url(url, &FORM)?,
            service_account_key: None,
        })
    }

    /// Uses this service account key (the JSON document) instead of the
    /// one the environment names.
    #[must_use]
    pub fn service_account_key(mut self, json: impl Into<String>) -> Self {
        self.service_account_key = Some(json.into());
        self
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.parts.bucket
    }

    /// The key prefix ("" for none).
    pub fn prefix(&self) -> &str {
        &self.parts.prefix
    }

    fn build(&self, retries: usize) -> Result<GoogleCloudStorage> {
        let timeout = self.parts.timeout;
        let mut builder = GoogleCloudStorageBuilder::from_env()
            .with_bucket_name(&self.parts.bucket)
            .with_config(
                GoogleConfigKey::Client(ClientConfigKey::Timeout),
                millis(timeout),
            )
            .with_config(
                GoogleConfigKey::Client(ClientConfigKey::ConnectTimeout),
                millis(timeout),
            )
            .with_retry(retry_config(timeout, retries));
        if let Some(endpoint) = &self.parts.endpoint {
            builder = builder.with_base_url(endpoint);
        }
        if let Some(allow) = self.parts.allow_http {
            builder = builder.with_config(
                GoogleConfigKey::Client(ClientConfigKey::AllowHttp),
                allow.to_string(),
            );
        }
        if let Some(key) = &self.service_account_key {
            builder = builder.with_service_account_key(key);
        }
        builder.build().map_err(|e| {
            FORM.bad(&self.parts.url, "cannot configure the GCS client")
                .with_source(e)
        })
    }

    /// The read store (a few retries), the write store (none, see
    /// [`S3Config`](super::S3Config)), and the deletes it signs.
    pub(super) fn connect(&self) -> Result<Connected> {
        let write = Arc::new(self.build(0)?);
        let header = HeaderName::from_static(IF_GENERATION_MATCH);
        let requests = GcsRequests {
            signed: SignedDelete::new(write.clone(), header, self.parts.timeout)?,
            bucket: self.parts.bucket.clone(),
        };
        let read = Arc::new(self.build(READ_RETRIES)?);
        Ok(Connected {
            read: read.clone(),
            pages: read,
            write,
            requests: Arc::new(requests),
            etags: EtagStyle::Generation,
        })
    }
}

/// DELETE with `x-goog-if-generation-match`, presigned by the bucket's own
/// store (the header bound into the V4 signature).
#[derive(Debug)]
struct GcsRequests {
    signed: SignedDelete,
    bucket: String,
}

#[async_trait]
impl Requests for GcsRequests {
    fn bucket(&self) -> (&'static str, Option<&str>) {
        ("bucket", Some(&self.bucket))
    }

    /// `etag` is the generation.
    async fn delete_if_match(&self, key: &ObjectPath, etag: &str) -> Result<()> {
        self.signed.delete(key, etag).await
    }

    /// Refused: creating a GCS bucket needs a project and a location,
    /// which a `gs://` URL does not say.
    async fn create_bucket(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Other,
            "GCS buckets are not created here (that needs a project); create it first",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = GcsConfig::from_url("gs://bkt/a/b?endpoint=http://127.0.0.1:4443&allow_http=true")
            .unwrap();
        assert_eq!((c.bucket(), c.prefix()), ("bkt", "a/b"));
        for bad in [
            "gs://",
            "gs://b/x?account=a",
            "gs://b/x?region=r",
            "gs://b:1/x",
            "gs://u:secret@b/x",
        ] {
            let e = GcsConfig::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert_eq!(e.backend(), Some("gcs"), "{bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}

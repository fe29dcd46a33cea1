//! S3 and S3-compatible buckets: the `s3://` URL, the client, creating the
//! bucket, and the delete with `If-Match`.

use std::sync::Arc;

use ::object_store::ClientConfigKey;
use ::object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use ::object_store::path::Path as ObjectPath;
use async_trait::async_trait;
use reqwest::header::{CONTENT_LENGTH, IF_MATCH};
use reqwest::{Method, StatusCode};

use super::Connected;
use super::client::EtagStyle;
use super::config::{READ_RETRIES, UrlForm, UrlParts, millis, parse_url, retry_config};
use super::requests::{Requests, SignedDelete, send};
use crate::error::{Error, Result};

const FORM: UrlForm = UrlForm {
    scheme: "s3",
    backend: "s3",
    bucket_word: "bucket",
    form: "s3://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&region=R&allow_http=true]",
    credentials_hint: "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    params: &["region"],
};

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
    pub(super) parts: UrlParts,
    /// Access key id and secret access key.
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.parts.bucket)
            .field("prefix", &self.parts.prefix)
            .field("timeout", &self.parts.timeout)
            .field("endpoint", &self.parts.endpoint)
            .field("region", &self.region())
            .field("allow_http", &self.parts.allow_http)
            .field(
                "access_key_id",
                &self.credentials.as_ref().map(|(id, _)| id),
            )
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// Reads an `s3://` URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming
    /// the URL (any user-info hidden) and what is wrong with it.
    pub fn from_url(url: &str) -> Result<S3Config> {
        Ok(S3Config {
            parts: parse_url(url, &FORM)?,
            credentials: None,
        })
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
        &self.parts.bucket
    }

    /// The key prefix ("" for none).
    pub fn prefix(&self) -> &str {
        &self.parts.prefix
    }

    fn region(&self) -> Option<&str> {
        self.parts.param("region")
    }

    /// The builder: the environment plus this URL. `retries` is how often
    /// object_store itself retries an idempotent request.
    fn builder(&self, retries: usize) -> AmazonS3Builder {
        let timeout = self.parts.timeout;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&self.parts.bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                millis(timeout),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                millis(timeout),
            )
            .with_retry(retry_config(timeout, retries));
        if let Some(endpoint) = &self.parts.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = self.region() {
            builder = builder.with_region(region);
        }
        if let Some(allow) = self.parts.allow_http {
            builder = builder.with_allow_http(allow);
        }
        if let Some((id, secret)) = &self.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
        }
        builder
    }

    fn build(&self, retries: usize) -> Result<AmazonS3> {
        self.builder(retries).build().map_err(|e| {
            FORM.bad(&self.parts.url, "cannot configure the S3 client")
                .with_source(e)
        })
    }

    /// The read store (a few retries), the write store (none: a retried
    /// conditional put whose first attempt was applied would answer
    /// "precondition failed" for a write that succeeded, and a retried
    /// unconditional put or delete could undo a newer write made
    /// meanwhile), and the requests signed by the write store.
    pub(super) fn connect(&self) -> Result<Connected> {
        let write = Arc::new(self.build(0)?);
        let region = self
            .builder(0)
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_owned());
        let requests = S3Requests {
            signed: SignedDelete::new(write.clone(), IF_MATCH, self.parts.timeout)?,
            bucket: self.parts.bucket.clone(),
            region,
        };
        let read = Arc::new(self.build(READ_RETRIES)?);
        Ok(Connected {
            read: read.clone(),
            pages: read,
            write,
            requests: Arc::new(requests),
            etags: EtagStyle::ETag,
        })
    }
}

/// DeleteObject with `If-Match` and CreateBucket, presigned by the bucket's
/// own store.
#[derive(Debug)]
struct S3Requests {
    signed: SignedDelete,
    bucket: String,
    region: String,
}

#[async_trait]
impl Requests for S3Requests {
    fn bucket(&self) -> (&'static str, Option<&str>) {
        ("bucket", Some(&self.bucket))
    }

    async fn delete_if_match(&self, key: &ObjectPath, etag: &str) -> Result<()> {
        self.signed.delete(key, etag).await
    }

    /// `PUT` on the bucket's own URL (the key "" presigned), with the
    /// region as location constraint outside `us-east-1`.
    async fn create_bucket(&self) -> Result<()> {
        const WHAT: &str = "create bucket";
        let url = self
            .signed
            .presign(Method::PUT, &ObjectPath::from(""))
            .await?;
        let body = if self.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint>\
                 </CreateBucketConfiguration>",
                self.region
            )
        };
        let request = self
            .signed
            .http()
            .put(url)
            .header(CONTENT_LENGTH, body.len())
            .body(body);
        let answer = send(request, WHAT).await?;
        if answer.is_success()
            || answer.status == StatusCode::CONFLICT
                && answer.body.contains("BucketAlreadyOwnedByYou")
        {
            return Ok(());
        }
        if answer.body.contains("<Code>BucketAlreadyExists</Code>") {
            return Err(Error::new(
                crate::ErrorKind::PermissionDenied,
                "the bucket name is taken by another account",
            ));
        }
        Err(answer.refused(WHAT))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::util::redact_url;
    use crate::error::ErrorKind;

    #[test]
    fn parses() {
        let u = S3Config::from_url("s3://bkt/a/b%20c/?timeout_ms=1500&region=eu-west-1").unwrap();
        assert_eq!(u.bucket(), "bkt");
        assert_eq!(u.prefix(), "a/b c");
        assert_eq!(u.parts.timeout, Duration::from_millis(1500));
        assert_eq!(u.region(), Some("eu-west-1"));
        let u =
            S3Config::from_url("s3://bkt?endpoint=http://127.0.0.1:9000&allow_http=true").unwrap();
        assert_eq!(u.prefix(), "");
        assert_eq!(u.parts.timeout, super::super::config::DEFAULT_TIMEOUT);
        assert_eq!(u.parts.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.parts.allow_http, Some(true));
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
            "s3://b/x?account=a",
            "s3://user:secret@b/x",
            "s3://b:9000/x",
            "s3://b/a//x",
            "s3://b/%ff",
            "gs://b/x",
        ] {
            let e = S3Config::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains(&redact_url(bad)), "{e} names {bad}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }
}

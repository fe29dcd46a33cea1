//! The requests `object_store` 0.14 cannot send: a delete that the server
//! checks against the etag, and creating the bucket.
//!
//! Each is sent with a plain HTTP client that never retries: a retried
//! delete whose first attempt was applied would report a precondition
//! failure instead of success. How a request is authorized is the
//! service's own ([`super::s3`], [`super::azure`], [`super::gcs`]); a store
//! given as a [`Signer`] presigns its deletes ([`SignedDelete`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::object_store::path::Path as ObjectPath;
use ::object_store::signer::{SignedUrlOptions, Signer};
use async_trait::async_trait;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};

use super::client::{NO_BUCKET, says_bucket_missing};
use crate::error::{Error, ErrorKind, Result};

/// How long a presigned request stays valid; it is sent at once.
const PRESIGN_VALIDITY: Duration = Duration::from_secs(300);

/// The requests of one bucket that `object_store` cannot send.
#[async_trait]
pub(super) trait Requests: fmt::Debug + Send + Sync {
    /// "bucket" or "container", and its name, for messages.
    fn bucket(&self) -> (&'static str, Option<&str>);

    /// Deletes `key` only if its etag is `etag` (exactly as the store
    /// reports it), checked by the server atomically with the delete.
    ///
    /// # Errors
    /// [`ErrorKind::PreconditionFailed`] (another version, which is kept),
    /// [`ErrorKind::NotFound`], [`ErrorKind::InvalidInput`] with
    /// [`NO_BUCKET`] for a missing bucket, [`ErrorKind::PermissionDenied`],
    /// [`ErrorKind::Unavailable`] when no answer came or the server failed
    /// (the delete may have been applied), [`ErrorKind::Other`] otherwise.
    async fn delete_if_match(&self, key: &ObjectPath, etag: &str) -> Result<()>;

    /// Creates the bucket; `Ok` also when it exists already.
    ///
    /// # Errors
    /// [`ErrorKind::PermissionDenied`] when the service refuses,
    /// [`ErrorKind::Other`] where this store cannot create buckets,
    /// [`ErrorKind::Unavailable`] when no answer came.
    async fn create_bucket(&self) -> Result<()>;
}

/// A plain HTTP client whose every request is bounded by `timeout`.
pub(super) fn http_client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| {
            Error::new(ErrorKind::Other, "cannot build the HTTP client for deletes").with_source(e)
        })
}

/// An answer: its status, and its body cut short, for messages.
#[derive(Debug)]
pub(super) struct Answer {
    pub status: StatusCode,
    pub body: String,
}

/// Sends `request`; `what` names it in the error when no answer comes.
pub(super) async fn send(request: reqwest::RequestBuilder, what: &str) -> Result<Answer> {
    let resp = request.send().await.map_err(|e| {
        Error::unavailable(format!(
            "no answer to the {what}; it may or may not have been applied"
        ))
        // The URL is signed: its signature, session token or SAS must not
        // reach a message.
        .with_source(e.without_url())
    })?;
    let status = resp.status();
    let body = if status.is_success() {
        String::new()
    } else {
        resp.text().await.unwrap_or_default()
    };
    Ok(Answer {
        status,
        body: body.chars().take(300).collect(),
    })
}

impl Answer {
    /// True for a success status.
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// The error of a refused `what`: the kind its status means; the
    /// message has the status, the body (the service's error document) is
    /// kept as the source.
    pub fn refused(&self, what: &str) -> Error {
        let body = || std::io::Error::other(self.body.clone());
        if self.status == StatusCode::NOT_FOUND && says_bucket_missing(&self.body) {
            return Error::invalid_input(NO_BUCKET).with_source(body());
        }
        let (kind, message) = match self.status {
            StatusCode::PRECONDITION_FAILED => (
                ErrorKind::PreconditionFailed,
                format!("{what}: etag precondition failed; the object was kept"),
            ),
            StatusCode::NOT_FOUND => (ErrorKind::NotFound, format!("{what}: not found")),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
                ErrorKind::PermissionDenied,
                format!("{what}: access denied"),
            ),
            s if s == StatusCode::REQUEST_TIMEOUT
                || s == StatusCode::TOO_MANY_REQUESTS
                || s.is_server_error() =>
            {
                (
                    ErrorKind::Unavailable,
                    format!("{what} failed in flight; it may or may not have been applied"),
                )
            }
            _ => (ErrorKind::Other, format!("{what} was refused")),
        };
        Error::new(kind, format!("{message} (HTTP {})", self.status.as_u16())).with_source(body())
    }
}

/// The error of a request that could not be signed or authorized: nothing
/// was sent.
pub(super) fn unsigned(what: &str, e: ::object_store::Error) -> Error {
    let kind = match e {
        ::object_store::Error::PermissionDenied { .. }
        | ::object_store::Error::Unauthenticated { .. } => ErrorKind::PermissionDenied,
        // Getting credentials may need the network (instance metadata):
        // nothing was sent yet, but the outcome is the same as for a store
        // that is down.
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("cannot authorize the {what}")).with_source(e)
}

/// Deletes through URLs presigned by the store's own [`Signer`], with the
/// precondition header bound into the signature (S3: `If-Match`; GCS:
/// `x-goog-if-generation-match`), so credentials, region, endpoint and
/// addressing style are exactly the store's.
#[derive(Debug, Clone)]
pub(super) struct SignedDelete {
    signer: Arc<dyn Signer>,
    header: HeaderName,
    http: reqwest::Client,
}

impl SignedDelete {
    /// Deletes signed by `signer`, conditional through `header`, each
    /// bounded by `timeout`.
    pub(super) fn new(
        signer: Arc<dyn Signer>,
        header: HeaderName,
        timeout: Duration,
    ) -> Result<Self> {
        Ok(SignedDelete {
            signer,
            header,
            http: http_client(timeout)?,
        })
    }

    /// The client, for the other requests of the same store.
    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends `DELETE key` with the precondition header set to `value`.
    pub(super) async fn delete(&self, key: &ObjectPath, value: &str) -> Result<()> {
        const WHAT: &str = "conditional delete";
        let value = HeaderValue::from_str(value).map_err(|e| {
            Error::invalid_input("the etag cannot be sent in a header").with_source(e)
        })?;
        let options =
            SignedUrlOptions::default().with_signed_header(self.header.clone(), value.clone());
        let url = self
            .signer
            .signed_url_opts(Method::DELETE, key, PRESIGN_VALIDITY, &options)
            .await
            .map_err(|e| unsigned(WHAT, e))?;
        let request = self
            .http
            .request(Method::DELETE, url)
            .header(self.header.clone(), value);
        let answer = send(request, WHAT).await?;
        if answer.is_success() {
            Ok(())
        } else {
            Err(answer.refused(WHAT))
        }
    }

    /// A presigned URL for `method` on `key`, no header bound.
    pub(super) async fn presign(&self, method: Method, key: &ObjectPath) -> Result<url::Url> {
        self.signer
            .signed_url(method, key, PRESIGN_VALIDITY)
            .await
            .map_err(|e| unsigned("request", e))
    }
}

/// A store given only as a [`Signer`] (see
/// [`ObjectStoreStorage::with_signer`](super::ObjectStoreStorage::with_signer)):
/// S3-style deletes with `If-Match`; no bucket creation.
#[derive(Debug)]
pub(super) struct SignerRequests(pub SignedDelete);

#[async_trait]
impl Requests for SignerRequests {
    fn bucket(&self) -> (&'static str, Option<&str>) {
        ("bucket", None)
    }

    async fn delete_if_match(&self, key: &ObjectPath, etag: &str) -> Result<()> {
        self.0.delete(key, etag).await
    }

    async fn create_bucket(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Other,
            "this store cannot create buckets (given as a signer only)",
        ))
    }
}

//! Conditional deletes: one `DELETE` with `If-Match`, checked by the server.
//!
//! `object_store` 0.14 has no way to send `If-Match` on a delete. The request
//! is therefore presigned by the store's own [`Signer`] (so credentials,
//! region, endpoint and addressing style are exactly the store's), with the
//! `If-Match` header bound into the signature, and sent with a plain HTTP
//! client that never retries: a retried delete whose first attempt was
//! applied would report a precondition failure instead of success.

use std::sync::Arc;
use std::time::Duration;

use ::object_store::path::Path as ObjectPath;
use ::object_store::signer::{SignedUrlOptions, Signer};
use reqwest::header::{HeaderValue, IF_MATCH};
use reqwest::{Method, StatusCode};

use crate::error::{Error, ErrorKind, Result};

/// How long a presigned delete stays valid; it is sent at once.
const PRESIGN_VALIDITY: Duration = Duration::from_secs(300);

/// Sends `DELETE` with `If-Match` through presigned URLs.
#[derive(Debug, Clone)]
pub(super) struct ConditionalDelete {
    signer: Arc<dyn Signer>,
    http: reqwest::Client,
}

impl ConditionalDelete {
    /// A deleter signing with `signer`; each request is bounded by
    /// `timeout`.
    pub(super) fn new(signer: Arc<dyn Signer>, timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Other, "cannot build the HTTP client for deletes")
                    .with_source(e)
            })?;
        Ok(ConditionalDelete { signer, http })
    }

    /// Deletes `key` only if its ETag is `etag` (as the server reports it,
    /// quotes included).
    ///
    /// # Errors
    /// [`ErrorKind::PreconditionFailed`] (412: the object has another
    /// version, which is kept), [`ErrorKind::NotFound`] (404),
    /// [`ErrorKind::PermissionDenied`] (401, 403), [`ErrorKind::Unavailable`]
    /// when no answer came or the server failed (the delete may have been
    /// applied), [`ErrorKind::Other`] for other refusals.
    pub(super) async fn delete(&self, key: &ObjectPath, etag: &str) -> Result<()> {
        let value = HeaderValue::from_str(etag).map_err(|e| {
            Error::invalid_input("the etag cannot be sent in an If-Match header").with_source(e)
        })?;
        let options = SignedUrlOptions::default().with_signed_header(IF_MATCH, value.clone());
        let url = self
            .signer
            .signed_url_opts(Method::DELETE, key, PRESIGN_VALIDITY, &options)
            .await
            .map_err(|e| {
                let kind = match e {
                    ::object_store::Error::PermissionDenied { .. }
                    | ::object_store::Error::Unauthenticated { .. } => ErrorKind::PermissionDenied,
                    // Getting credentials may need the network (instance
                    // metadata): nothing was sent yet, but the outcome is
                    // the same as for a store that is down.
                    _ => ErrorKind::Unavailable,
                };
                Error::new(kind, "cannot sign the conditional delete").with_source(e)
            })?;
        let resp = self
            .http
            .request(Method::DELETE, url)
            .header(IF_MATCH, value)
            .send()
            .await
            .map_err(|e| {
                Error::unavailable(
                    "no answer to the conditional delete; it may or may not have been applied",
                )
                .with_source(e)
            })?;
        let status = resp.status();
        let (kind, message) = match status {
            s if s.is_success() => return Ok(()),
            StatusCode::PRECONDITION_FAILED => (
                ErrorKind::PreconditionFailed,
                "etag precondition failed; the object was kept",
            ),
            StatusCode::NOT_FOUND => (ErrorKind::NotFound, "no such document"),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                (ErrorKind::PermissionDenied, "access denied")
            }
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => (
                ErrorKind::Unavailable,
                "the conditional delete failed in flight; it may or may not have been applied",
            ),
            s if s.is_server_error() => (
                ErrorKind::Unavailable,
                "the conditional delete failed in flight; it may or may not have been applied",
            ),
            _ => (ErrorKind::Other, "the conditional delete was refused"),
        };
        // The body names the reason (an S3 error document); keep its first
        // line short.
        let body = resp.text().await.unwrap_or_default();
        let detail: String = body.chars().take(300).collect();
        Err(
            Error::new(kind, format!("{message} (HTTP {})", status.as_u16()))
                .with_source(std::io::Error::other(detail)),
        )
    }
}

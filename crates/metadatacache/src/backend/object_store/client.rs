//! Talking to the object store: the one mapping from `object_store` errors
//! to [`ErrorKind`]s, and the conditional delete it cannot send itself.
//!
//! `object_store` 0.14 has no way to send `If-Match` on a delete. The request
//! is therefore presigned by the store's own [`Signer`] (so credentials,
//! region, endpoint and addressing style are exactly the store's), with the
//! `If-Match` header bound into the signature, and sent with a plain HTTP
//! client that never retries: a retried delete whose first attempt was
//! applied would report a precondition failure instead of success.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::object_store::client::HttpError;
use ::object_store::path::Path as ObjectPath;
use ::object_store::signer::{SignedUrlOptions, Signer};
use ::object_store::{Error as OsError, ObjectMeta, ObjectStoreExt};
use reqwest::header::{HeaderValue, IF_MATCH};
use reqwest::{Method, StatusCode};

use super::ObjectStoreStorage;
use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind, Result};

/// What the failed call was doing; a few answers mean different things for
/// different operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// A read: get, head or list.
    Read,
    /// A create-only put (`PutMode::Create`).
    Create,
    /// A put conditional on an etag (`PutMode::Update`).
    Update,
    /// An unconditional put (`PutMode::Overwrite`).
    Overwrite,
    /// A delete.
    Delete,
}

impl Op {
    fn is_write(self) -> bool {
        matches!(self, Op::Create | Op::Update | Op::Overwrite | Op::Delete)
    }
}

/// Maps an `object_store` error to this crate's [`Error`], tagged with the
/// backend and the storage path.
///
/// - `NotFound` → [`ErrorKind::NotFound`]
/// - `AlreadyExists` (also HTTP 409) → [`ErrorKind::AlreadyExists`] for a
///   create; for a conditional update a 409 means a concurrent conditional
///   write won, so [`ErrorKind::Aborted`] (not applied, retry); otherwise
///   [`ErrorKind::Other`]
/// - `Precondition` → [`ErrorKind::AlreadyExists`] for a create,
///   [`ErrorKind::PreconditionFailed`] otherwise
/// - `NotModified` → [`ErrorKind::NotModified`] (a create answered with 304
///   → [`ErrorKind::AlreadyExists`])
/// - `PermissionDenied`, `Unauthenticated` → [`ErrorKind::PermissionDenied`]
/// - `Generic` carrying a transport error (connect, timeout, reset, a reply
///   that could not be read) or an HTTP 5xx / 408 / 429 status →
///   [`ErrorKind::Unavailable`]; for writes every other `Generic` error
///   that is not an HTTP 4xx answer is also [`ErrorKind::Unavailable`],
///   because the write may have been applied (e.g. a reply without an etag)
/// - `InvalidPath` → [`ErrorKind::InvalidInput`]
/// - everything else (`NotSupported`, `NotImplemented`, …) → [`ErrorKind::Other`]
pub(super) fn map_error(e: OsError, op: Op, backend: &'static str, path: &str) -> Error {
    let (kind, message) = match &e {
        OsError::NotFound { .. } => (ErrorKind::NotFound, "no such document"),
        OsError::AlreadyExists { .. } => match op {
            Op::Create => (ErrorKind::AlreadyExists, "document already exists"),
            Op::Update => (
                ErrorKind::Aborted,
                "a concurrent conditional write is in progress",
            ),
            _ => (ErrorKind::Other, "conflict"),
        },
        OsError::Precondition { .. } => match op {
            Op::Create => (ErrorKind::AlreadyExists, "document already exists"),
            _ => (ErrorKind::PreconditionFailed, "etag precondition failed"),
        },
        OsError::NotModified { .. } => match op {
            Op::Create => (ErrorKind::AlreadyExists, "document already exists"),
            _ => (ErrorKind::NotModified, "etag unchanged"),
        },
        OsError::PermissionDenied { .. } | OsError::Unauthenticated { .. } => {
            (ErrorKind::PermissionDenied, "access denied")
        }
        OsError::InvalidPath { .. } => (ErrorKind::InvalidInput, "invalid object path"),
        OsError::Generic { .. } => match classify(&e) {
            Transport::SlowDown => (
                ErrorKind::TooEarly,
                "the object store asks to slow down; nothing was applied",
            ),
            Transport::Unreachable => (ErrorKind::Unavailable, unavailable_message(op)),
            Transport::ClientError => (ErrorKind::Other, "request refused"),
            Transport::Unknown if op.is_write() => {
                (ErrorKind::Unavailable, unavailable_message(op))
            }
            Transport::Unknown => (ErrorKind::Other, "object store error"),
        },
        OsError::JoinError { .. } if op.is_write() => {
            (ErrorKind::Unavailable, unavailable_message(op))
        }
        _ => (ErrorKind::Other, "object store error"),
    };
    Error::new(kind, message)
        .with_backend(backend)
        .with_path(path)
        .with_source(e)
}

fn unavailable_message(op: Op) -> &'static str {
    if op.is_write() {
        "object store unreachable or failed; the write may or may not have been applied"
    } else {
        "object store unreachable or failed"
    }
}

/// How a `Generic` error came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// No usable answer: connection refused or reset, timeout, a server
    /// error status, an unreadable reply.
    Unreachable,
    /// Turned away unprocessed to slow the client down (429, or 503 with
    /// the S3 code `SlowDown`).
    SlowDown,
    /// The server answered with a 4xx status: the request was refused.
    ClientError,
    /// Something else.
    Unknown,
}

/// Walks the source chain of a `Generic` error. `object_store` keeps its
/// retry error type private, so the HTTP status is read from its message
/// ("… status code: 503 …"); transport failures are recognised by their
/// public [`HttpError`] type or a `std::io::Error` in the chain.
fn classify(e: &OsError) -> Transport {
    let mut current: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<HttpError>().is_some()
            || err.downcast_ref::<std::io::Error>().is_some()
        {
            return Transport::Unreachable;
        }
        let text = err.to_string();
        if let Some(status) = status_in(&text) {
            return match status {
                // Rate limiting: the request was turned away unprocessed.
                429 => Transport::SlowDown,
                503 if text.contains("<Code>SlowDown</Code>") => Transport::SlowDown,
                408 | 500..=599 => Transport::Unreachable,
                400..=499 => Transport::ClientError,
                _ => Transport::Unknown,
            };
        }
        current = err.source();
    }
    Transport::Unknown
}

/// The HTTP status in an `object_store` message "… status code: NNN …".
fn status_in(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

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

impl ObjectStoreStorage {
    pub(super) fn map<'a>(
        &self,
        op: Op,
        path: &'a str,
    ) -> impl Fn(::object_store::Error) -> Error + 'a {
        let backend = self.backend;
        move |e| map_error(e, op, backend, path)
    }

    /// Runs `fut` within the timeout.
    pub(super) async fn timed<T>(
        &self,
        path: &str,
        write: bool,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(res) => res,
            Err(_) => Err(self.tag(no_answer(self.timeout, write).with_path(path))),
        }
    }

    /// HEAD: the object's metadata, `None` when absent.
    pub(super) async fn head(&self, path: &str, key: &ObjectPath) -> Result<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(::object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_error(e, Op::Read, self.backend, path)),
        }
    }

    pub(super) fn etag_of(&self, path: &str, etag: Option<String>) -> Result<String> {
        etag.ok_or_else(|| {
            self.tag(
                Error::new(ErrorKind::Other, "the object store reported no etag").with_path(path),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(msg: &str) -> OsError {
        OsError::Generic {
            store: "S3",
            source: msg.to_owned().into(),
        }
    }

    #[test]
    fn rate_limiting_is_too_early() {
        for msg in [
            "Error performing PUT: status code: 429 Too Many Requests",
            "Error performing PUT: status code: 503, body: <Error><Code>SlowDown</Code></Error>",
        ] {
            for op in [Op::Read, Op::Update] {
                let e = map_error(generic(msg), op, "s3", "p");
                assert_eq!(e.kind(), ErrorKind::TooEarly, "{msg}");
            }
        }
        // Any other 503 may hide an applied write.
        let e = map_error(
            generic("status code: 503 Service Unavailable"),
            Op::Update,
            "s3",
            "p",
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn kinds() {
        let nf = || OsError::NotFound {
            path: "p".into(),
            source: "404".into(),
        };
        assert_eq!(
            map_error(nf(), Op::Read, "s3", "p").kind(),
            ErrorKind::NotFound
        );
        let pre = || OsError::Precondition {
            path: "p".into(),
            source: "412".into(),
        };
        assert_eq!(
            map_error(pre(), Op::Update, "s3", "p").kind(),
            ErrorKind::PreconditionFailed
        );
        assert_eq!(
            map_error(pre(), Op::Create, "s3", "p").kind(),
            ErrorKind::AlreadyExists
        );
        let conflict = || OsError::AlreadyExists {
            path: "p".into(),
            source: "409".into(),
        };
        assert_eq!(
            map_error(conflict(), Op::Update, "s3", "p").kind(),
            ErrorKind::Aborted
        );
        let denied = OsError::Unauthenticated {
            path: "p".into(),
            source: "401".into(),
        };
        let e = map_error(denied, Op::Read, "s3", "a/b");
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(e.backend(), Some("s3"));
        assert_eq!(e.path(), Some("a/b"));
    }

    #[test]
    fn generic_errors() {
        let busy = "Error performing PUT http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(
            map_error(generic(busy), Op::Read, "s3", "p").kind(),
            ErrorKind::Unavailable
        );
        let bad = "Server returned non-2xx status code: 400 Bad Request: nope";
        assert_eq!(
            map_error(generic(bad), Op::Update, "s3", "p").kind(),
            ErrorKind::Other
        );
        assert_eq!(
            map_error(generic("weird"), Op::Read, "s3", "p").kind(),
            ErrorKind::Other
        );
        assert_eq!(
            map_error(generic("weird"), Op::Update, "s3", "p").kind(),
            ErrorKind::Unavailable,
            "an unexplained write failure is ambiguous"
        );
        let io = OsError::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        assert_eq!(
            map_error(io, Op::Read, "s3", "p").kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(status_in("status code: 4"), None);
    }
}

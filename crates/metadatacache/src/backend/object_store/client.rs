//! Talking to the object store: the one mapping from `object_store` errors
//! to [`ErrorKind`]s, the timeout of every call, and HEAD.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use ::object_store::client::HttpError;
use ::object_store::path::Path as ObjectPath;
use ::object_store::{Error as OsError, ObjectMeta, ObjectStoreExt, PutResult, UpdateVersion};

use super::ObjectStoreStorage;
use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind, Result};

/// How many timeouts a whole listing may take (see
/// [`ObjectStoreStorage::timed_listing`]).
const LISTING_TIMEOUTS: u32 = 32;

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
/// - any error that says the bucket (Azure: container) does not exist →
///   [`ErrorKind::InvalidInput`] with [`NO_BUCKET`] as its message (the
///   URL is wrong; `NotFound` would read as an absent document)
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
        // Whatever the request: a conditional write on a missing bucket
        // comes back as a failed precondition, say.
        _ if bucket_missing(&e) => (ErrorKind::InvalidInput, NO_BUCKET),
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
            Transport::Denied => (ErrorKind::PermissionDenied, "access denied"),
            Transport::Missing => (ErrorKind::NotFound, "no such bucket or document"),
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

/// The message of an error whose bucket (Azure: container) does not
/// exist, until [`ObjectStoreStorage::named`] names it.
pub(super) const NO_BUCKET: &str = "the bucket does not exist";

/// Whether the service said that the bucket itself is missing, not the
/// object: S3's `NoSuchBucket`, Azure's `ContainerNotFound`, Google Cloud
/// Storage's "bucket does not exist".
fn bucket_missing(e: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if says_bucket_missing(&err.to_string()) {
            return true;
        }
        current = err.source();
    }
    false
}

/// Whether a service's answer `text` says that the bucket is missing (see
/// [`bucket_missing`]). The codes are matched as their error documents
/// carry them, so that a path that spells one is not taken for it.
pub(super) fn says_bucket_missing(text: &str) -> bool {
    text.contains("<Code>NoSuchBucket</Code>")
        || text.contains("<Code>ContainerNotFound</Code>")
        || text.contains("The specified bucket does not exist")
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
    /// The server refused the credentials (401, 403).
    Denied,
    /// The server has no such thing (404): a missing bucket, say.
    Missing,
    /// The server answered with another 4xx status: the request was refused.
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
                401 | 403 => Transport::Denied,
                404 => Transport::Missing,
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

impl ObjectStoreStorage {
    pub(super) fn map<'a>(
        &'a self,
        op: Op,
        path: &'a str,
    ) -> impl Fn(::object_store::Error) -> Error + 'a {
        let backend = self.backend;
        move |e| self.named(map_error(e, op, backend, path))
    }

    /// `e`, naming the bucket (Azure: container) where it says that the
    /// bucket does not exist, and how to create it: the store's message
    /// would blame the document.
    pub(super) fn named(&self, e: Error) -> Error {
        if e.kind() != ErrorKind::InvalidInput || e.message() != NO_BUCKET {
            return e;
        }
        let message = format!(
            "{} does not exist (Storage::init creates it, as mdcache bench, torture and \
             migrate do)",
            self.bucket_name()
        );
        e.with_message(message)
    }

    /// `bucket "name"` (Azure: `container "name"`), or `the bucket` where
    /// the name is not known.
    pub(super) fn bucket_name(&self) -> String {
        let (word, bucket) = self
            .requests
            .as_ref()
            .map_or(("bucket", None), |r| r.bucket());
        bucket.map_or_else(|| format!("the {word}"), |b| format!("{word} {b:?}"))
    }

    /// Runs `fut` within the timeout.
    pub(super) async fn timed<T>(
        &self,
        path: &str,
        write: bool,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.timed_within(self.timeout, path, write, fut).await
    }

    /// Runs a listing made in one call (a store without
    /// [`with_pages`](ObjectStoreStorage::with_pages)): one LIST request per
    /// 1000 entries, each bounded by the client's timeout, and all of them
    /// by [`LISTING_TIMEOUTS`] times it (a directory of 20 000 documents took
    /// more than 5 s on moto).
    pub(super) async fn timed_listing<T>(
        &self,
        path: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.timed_within(self.timeout * LISTING_TIMEOUTS, path, false, fut)
            .await
    }

    async fn timed_within<T>(
        &self,
        limit: Duration,
        path: &str,
        write: bool,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, fut).await {
            Ok(res) => res,
            Err(_) => Err(self.tag(no_answer(limit, write).with_path(path))),
        }
    }

    /// HEAD: the object's metadata, `None` when absent.
    pub(super) async fn head(&self, path: &str, key: &ObjectPath) -> Result<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(::object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.named(map_error(e, Op::Read, self.backend, path))),
        }
    }

    pub(super) fn etag_of(&self, path: &str, etag: Option<String>) -> Result<String> {
        etag.ok_or_else(|| {
            self.tag(
                Error::new(ErrorKind::Other, "the object store reported no etag").with_path(path),
            )
        })
    }

    /// The etag this storage reports for an object: its ETag (on Azure
    /// quoted also where a listing gives it bare), or on GCS its generation
    /// (what conditional writes there compare).
    pub(super) fn etag_in(&self, meta: &ObjectMeta) -> Option<String> {
        match self.etags {
            EtagStyle::ETag => meta.e_tag.clone(),
            EtagStyle::QuotedETag => meta.e_tag.as_deref().map(quoted),
            EtagStyle::Generation => meta.version.clone(),
        }
    }

    /// The etag of a write's result, as [`etag_in`](Self::etag_in).
    pub(super) fn etag_written(&self, res: &PutResult) -> Option<String> {
        match self.etags {
            EtagStyle::ETag => res.e_tag.clone(),
            EtagStyle::QuotedETag => res.e_tag.as_deref().map(quoted),
            EtagStyle::Generation => res.version.clone(),
        }
    }

    /// The version a put conditional on `etag` names.
    pub(super) fn version_of(&self, etag: &str) -> UpdateVersion {
        let etag = Some(etag.to_owned());
        match self.etags {
            EtagStyle::ETag | EtagStyle::QuotedETag => UpdateVersion {
                e_tag: etag,
                version: None,
            },
            EtagStyle::Generation => UpdateVersion {
                e_tag: None,
                version: etag,
            },
        }
    }
}

/// What a storage reports as a document's etag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EtagStyle {
    /// The ETag exactly as the server gives it (S3).
    ETag,
    /// The ETag in double quotes, as Azure's headers give it; its listings
    /// give it bare.
    QuotedETag,
    /// The object's generation (GCS), which its conditional writes compare.
    Generation,
}

/// `etag` in double quotes, unless it has them already.
fn quoted(etag: &str) -> String {
    if etag.starts_with('"') || etag.starts_with("W/") {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
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
        // Azure's and S3's refusals that object_store leaves generic.
        let denied = "Server returned non-2xx status code: 403 Forbidden: AuthorizationFailure";
        assert_eq!(
            map_error(generic(denied), Op::Read, "azure", "p").kind(),
            ErrorKind::PermissionDenied
        );
        let missing = "Server returned non-2xx status code: 404 Not Found: \
                       <Error><Code>NoSuchBucket</Code></Error>";
        for op in [Op::Read, Op::Create, Op::Update, Op::Delete] {
            let e = map_error(generic(missing), op, "s3", "p");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert_eq!(e.message(), NO_BUCKET);
        }
        // A conditional write on a missing bucket, as object_store reports it.
        let refused = OsError::Precondition {
            path: "p".into(),
            source: "404 Not Found: <Error><Code>ContainerNotFound</Code></Error>".into(),
        };
        assert_eq!(
            map_error(refused, Op::Update, "azure", "p").message(),
            NO_BUCKET
        );
        // A document whose name spells a code is only a missing document.
        let named = "status code: 404 Not Found: GET http://h/b/NoSuchBucket.json";
        assert_eq!(
            map_error(generic(named), Op::Read, "s3", "p").message(),
            "no such bucket or document"
        );
    }

    #[test]
    fn listed_azure_etags_get_quotes() {
        assert_eq!(quoted("0x8DC"), "\"0x8DC\"");
        assert_eq!(quoted("\"0x8DC\""), "\"0x8DC\"");
        assert_eq!(quoted("W/\"x\""), "W/\"x\"");
    }
}

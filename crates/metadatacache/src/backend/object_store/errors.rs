//! The one mapping from `object_store` errors to [`ErrorKind`]s.

use std::error::Error as StdError;

use ::object_store::Error as OsError;
use ::object_store::client::HttpError;

use crate::error::{Error, ErrorKind};

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
        if let Some(status) = status_in(&err.to_string()) {
            return match status {
                408 | 429 | 500..=599 => Transport::Unreachable,
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

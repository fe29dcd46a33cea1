//! The precondition checks that backends which read and write under one lock
//! share, so that they all answer alike.

use std::time::SystemTime;

use super::{DownloadResponse, UploadRequest};
use crate::error::{Error, ErrorKind, Result};

/// `e`, with the stored version that refused the write attached when `e`
/// says another version is stored (`PreconditionFailed`, `AlreadyExists`;
/// see [`Capabilities::current_on_conflict`](super::Capabilities::current_on_conflict));
/// `current` is called only then. An `Aborted` write (the document changed
/// while it was checked) gets none: what was read does not explain it.
pub(crate) fn with_current(e: Error, current: impl FnOnce() -> Option<DownloadResponse>) -> Error {
    if !matches!(
        e.kind(),
        ErrorKind::PreconditionFailed | ErrorKind::AlreadyExists
    ) {
        return e;
    }
    match current() {
        Some(c) => e.with_current(c),
        None => e,
    }
}

/// Checks the preconditions of `req` against the current state of the
/// document (`None` when absent). Backends that can read and write under one
/// lock use this so they all answer alike.
///
/// # Errors
/// The precondition error a backend must return.
pub fn check_upload_preconditions(
    req: &UploadRequest,
    current: Option<(&str, SystemTime)>,
) -> Result<()> {
    if req.is_create_only() {
        if current.is_some() {
            return Err(
                Error::new(ErrorKind::AlreadyExists, "document already exists")
                    .with_path(&req.path),
            );
        }
        return Ok(());
    }
    if let Some(want) = &req.if_match {
        match current {
            None => {
                return Err(Error::not_found("if-match on a missing document").with_path(&req.path));
            }
            Some((etag, _)) if etag != want && want != "*" => {
                return Err(Error::new(
                    ErrorKind::PreconditionFailed,
                    format!("etag is {etag:?}, not {want:?}"),
                )
                .with_path(&req.path));
            }
            Some(_) => {}
        }
    }
    if let Some((etag, _)) = current
        && req.if_none_match.iter().any(|e| e == etag)
    {
        return Err(Error::new(
            ErrorKind::PreconditionFailed,
            format!("etag is {etag:?}, which if-none-match excludes"),
        )
        .with_path(&req.path));
    }
    if let (Some(since), Some((_, mtime))) = (req.if_unmodified_since, current)
        && mtime > since
    {
        return Err(Error::new(
            ErrorKind::PreconditionFailed,
            "document modified after if-unmodified-since",
        )
        .with_path(&req.path));
    }
    Ok(())
}

/// Checks a delete's `if_match` against the current etag (`None` when absent).
///
/// # Errors
/// [`ErrorKind::NotFound`] when absent, [`ErrorKind::PreconditionFailed`] on a
/// different etag.
pub fn check_delete_precondition(
    path: &str,
    if_match: Option<&str>,
    current: Option<&str>,
) -> Result<()> {
    match (current, if_match) {
        (None, _) => Err(Error::not_found("no such document").with_path(path)),
        (Some(etag), Some(want)) if etag != want && want != "*" => Err(Error::new(
            ErrorKind::PreconditionFailed,
            format!("etag is {etag:?}, not {want:?}"),
        )
        .with_path(path)),
        _ => Ok(()),
    }
}

//! Writes and deletes: one conditional statement each, which — when it
//! changed nothing — returns the version that refused it (and, for a write
//! that may insert, whether a parent document or a path below was in the
//! way). A second look is needed only when the version its snapshot
//! showed would have let it through: the row changed (or appeared) while
//! the statement waited for its lock.

use std::time::SystemTime;

use bytes::Bytes;
use tokio::time::Instant;

use super::client::{Conn, Failure, Params};
use super::sql::{ancestors, below};
use super::{BACKEND, PostgresStorage, tag};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadResponse, UploadRequest, UploadResponse, check_delete_precondition,
    check_upload_preconditions, validate_path, with_current,
};

impl PostgresStorage {
    /// [`Storage::upload`](crate::Storage::upload).
    pub(super) async fn write(&self, req: UploadRequest) -> Result<UploadResponse> {
        validate_path(&req.path, false).map_err(|e| e.with_backend(BACKEND))?;
        let deadline = self.deadline();
        let path = req.path.as_str();
        // A write token becomes the version's etag: a resent copy of a
        // write carries the same one, and the etag shows which write made
        // the stored version.
        let etag = match &req.write_token {
            Some(token) => token.clone(),
            None => self.new_etag(),
        };
        let content: &[u8] = &req.content;
        let parents = ancestors(path);
        let (lo, hi) = below(path);
        let if_match = req.if_match.as_deref().filter(|e| *e != "*");
        let since = req.if_unmodified_since;
        let sql = &self.inner.sql;
        let mut conn = Conn::get(&self.inner.pool, &self.inner.tls, deadline)
            .await
            .map_err(|f| self.fail(f, false, path))?;
        let res = if req.is_create_only() {
            let params: &Params<'_> = &[&path, &content, &etag, &req.mtime, &parents, &lo, &hi];
            conn.query(deadline, &sql.insert_new, params).await
        } else if req.if_match.is_some() {
            let params: &Params<'_> = &[
                &path,
                &content,
                &etag,
                &req.mtime,
                &if_match,
                &req.if_none_match,
                &since,
            ];
            conn.query(deadline, &sql.update_match, params).await
        } else {
            let params: &Params<'_> = &[
                &path,
                &content,
                &etag,
                &req.mtime,
                &parents,
                &lo,
                &hi,
                &req.if_none_match,
                &since,
            ];
            conn.query(deadline, &sql.upsert, params).await
        };
        let rows = match res {
            Ok(rows) => rows,
            Err(f) => {
                let e = self.fail(f, true, path);
                if e.kind() != ErrorKind::Unavailable {
                    return Err(e);
                }
                drop(conn);
                // The write's own deadline has passed: the look-up gets a
                // fresh one.
                return match self.find_own_write(self.deadline(), path, &etag).await {
                    Some(mtime) => Ok(UploadResponse { etag, mtime }),
                    None => Err(e),
                };
            }
        };
        // Every statement says what refused it; those that may insert say
        // whether something was in the way, too.
        let (seen, blocked) = match rows.first() {
            Some(row) => match row.try_get::<_, Option<SystemTime>>(0) {
                Ok(Some(mtime)) => return Ok(UploadResponse { etag, mtime }),
                Ok(None) => match seen_version(row, req.if_match.is_none()) {
                    Ok(seen) => seen,
                    Err(e) => return Err(self.fail(Failure::Pg(e), false, path)),
                },
                // Written, but the reply is unreadable: report it as unknown.
                Err(e) => return Err(self.fail(Failure::Pg(e), true, path)),
            },
            None => (None, false),
        };
        if let Some(e) = verdict(&req, seen, blocked) {
            return Err(e);
        }
        Err(self.explain_unwritten(&mut conn, deadline, &req).await)
    }

    /// [`Storage::delete_if_match`](crate::Storage::delete_if_match).
    pub(super) async fn remove(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        validate_path(path, false).map_err(|e| e.with_backend(BACKEND))?;
        let deadline = self.deadline();
        let want = if_match.filter(|e| *e != "*");
        let mut conn = Conn::get(&self.inner.pool, &self.inner.tls, deadline)
            .await
            .map_err(|f| self.fail(f, false, path))?;
        let rows = conn
            .query(deadline, &self.inner.sql.delete, &[&path, &want])
            .await
            .map_err(|f| self.fail(f, true, path))?;
        let seen = match rows.first() {
            Some(row) => match row.try_get::<_, bool>(0) {
                Ok(true) => return Ok(()),
                Ok(false) => match row.try_get::<_, String>(1) {
                    Ok(etag) => Some(etag),
                    Err(e) => return Err(self.fail(Failure::Pg(e), false, path)),
                },
                // Deleted or not, the reply does not say.
                Err(e) => return Err(self.fail(Failure::Pg(e), true, path)),
            },
            None => None,
        };
        if want.is_none() {
            return Err(tag(Error::not_found("no such document"), path));
        }
        // The version the statement saw refused it; only a version that
        // would have let it through (the row changed while the statement
        // waited for its lock) needs a fresh look.
        check_delete_precondition(path, if_match, seen.as_deref()).map_err(|e| tag(e, path))?;
        let rows = conn
            .query(deadline, &self.inner.sql.head, &[&path])
            .await
            .map_err(|f| self.fail(f, false, path))?;
        let current = match rows.first().map(|r| r.try_get::<_, String>(0)) {
            None => None,
            Some(Ok(etag)) => Some(etag),
            Some(Err(e)) => return Err(self.fail(Failure::Pg(e), false, path)),
        };
        check_delete_precondition(path, if_match, current.as_deref()).map_err(|e| tag(e, path))?;
        Err(tag(
            Error::new(
                ErrorKind::Aborted,
                "the document changed concurrently; nothing was deleted",
            ),
            path,
        ))
    }

    /// Why a write changed nothing.
    async fn explain_unwritten(
        &self,
        conn: &mut Conn,
        deadline: Instant,
        req: &UploadRequest,
    ) -> Error {
        let path = req.path.as_str();
        let parents = ancestors(path);
        let (lo, hi) = below(path);
        let rows = match conn
            .query(
                deadline,
                &self.inner.sql.probe,
                &[&path, &parents, &lo, &hi],
            )
            .await
        {
            Ok(rows) => rows,
            Err(f) => return self.fail(f, false, path),
        };
        let Some(row) = rows.first() else {
            return tag(Error::new(ErrorKind::Other, "probe returned no row"), path);
        };
        let (seen, blocked) = match seen_version(row, true) {
            Ok(seen) => seen,
            Err(e) => return self.fail(Failure::Pg(e), false, path),
        };
        if let Some(e) = verdict(req, seen, blocked) {
            return e;
        }
        tag(
            Error::new(
                ErrorKind::Aborted,
                "the document changed concurrently; nothing was written",
            ),
            path,
        )
    }

    /// After a write's reply was lost: its etag stored means it was applied.
    async fn find_own_write(
        &self,
        deadline: Instant,
        path: &str,
        etag: &str,
    ) -> Option<SystemTime> {
        let rows = self
            .read(deadline, &self.inner.sql.head, &[&path])
            .await
            .ok()?;
        let row = rows.first()?;
        let stored: String = row.try_get(0).ok()?;
        (stored == etag).then(|| row.try_get(1).ok()).flatten()
    }
}

/// The version that a refused write (or the probe after it) saw (`None`:
/// no document), and — where the row says (`with_blocked`: a write that
/// may insert, the probe) — whether a parent document or a path below was
/// in its way.
fn seen_version(
    row: &tokio_postgres::Row,
    with_blocked: bool,
) -> std::result::Result<(Option<Seen>, bool), tokio_postgres::Error> {
    let seen = match (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?) {
        (Some(etag), Some(mtime), Some(content)) => Some((etag, mtime, content)),
        _ => None,
    };
    let blocked = with_blocked && row.try_get::<_, bool>(4)?;
    Ok((seen, blocked))
}

/// Why `req` was not written, from the version `seen` and whether a
/// parent document or a path below was in the way (`blocked`); `None` when
/// neither explains it: the document changed while the statement ran.
fn verdict(req: &UploadRequest, seen: Option<Seen>, blocked: bool) -> Option<Error> {
    let absent = seen.is_none();
    if let Some(e) = refusal(req, seen) {
        return Some(e);
    }
    (absent && blocked && req.if_match.is_none()).then(|| {
        tag(
            Error::invalid_input("a directory exists at this path, or a parent path is a document"),
            &req.path,
        )
    })
}

/// A stored version: etag, mtime and content.
type Seen = (String, SystemTime, Vec<u8>);

/// The refusal of `req` by the version it saw (`None`: no document), or
/// `None` when that version would have let it through: then the document
/// changed while the statement ran, and only a fresh look says why.
fn refusal(req: &UploadRequest, seen: Option<Seen>) -> Option<Error> {
    let current = seen
        .as_ref()
        .map(|(etag, mtime, _)| (etag.as_str(), *mtime));
    let e = check_upload_preconditions(req, current).err()?;
    let version = || seen.map(|(etag, mtime, content)| response(etag, mtime, content));
    Some(tag(with_current(e, version), &req.path))
}

/// A version as a download returns it; its etag is also the token of the
/// write that made it.
pub(super) fn response(etag: String, mtime: SystemTime, content: Vec<u8>) -> DownloadResponse {
    DownloadResponse {
        content: Bytes::from(content),
        write_token: Some(etag.clone()),
        etag,
        mtime,
    }
}

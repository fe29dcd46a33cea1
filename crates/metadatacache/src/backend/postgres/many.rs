//! Combined writes: plain compare-and-swap updates of several documents in
//! one statement, so one transaction and one commit carry them all.

use std::collections::HashMap;
use std::time::SystemTime;

use super::client::{Conn, Failure, Params};
use super::write::response;
use super::{PostgresStorage, tag};
use crate::backend::combine::{Limits, combined, each_failed, plain_update};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadRequest, DownloadResponse, Storage, UploadRequest, UploadResponse,
    check_upload_preconditions, validate_path, with_current,
};

/// One statement carries at most this many updates and content bytes.
const LIMITS: Limits = Limits {
    items: 128,
    bytes: 4 << 20,
};

/// One statement reads at most this many documents.
const READS: Limits = Limits {
    items: 128,
    bytes: usize::MAX,
};

impl PostgresStorage {
    /// [`Storage::upload_many`](crate::Storage::upload_many).
    pub(super) async fn write_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        combined(
            reqs,
            LIMITS,
            |r| plain_update(r) && validate_path(&r.path, false).is_ok(),
            move |req| self.write(req),
            move |reqs| self.update_many(reqs),
        )
        .await
    }

    /// Plain compare-and-swap updates at distinct, valid paths, in one
    /// statement.
    async fn update_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let first = reqs[0].path.as_str();
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        let contents: Vec<&[u8]> = reqs.iter().map(|r| &r.content[..]).collect();
        // A write token becomes the version's etag, as in a single write.
        let etags: Vec<String> = reqs
            .iter()
            .map(|r| r.write_token.clone().unwrap_or_else(|| self.new_etag()))
            .collect();
        let mtimes: Vec<Option<SystemTime>> = reqs.iter().map(|r| r.mtime).collect();
        let if_match: Vec<&str> = reqs
            .iter()
            .map(|r| r.if_match.as_deref().unwrap_or_default())
            .collect();
        let params: &Params<'_> = &[&paths, &contents, &etags, &mtimes, &if_match];
        let deadline = self.deadline();
        let res = match Conn::get(&self.inner.pool, &self.inner.tls, deadline).await {
            Ok(mut conn) => conn
                .query(deadline, &self.inner.sql.update_many, params)
                .await
                .map_err(|f| self.fail(f, true, first)),
            Err(f) => Err(self.fail(f, false, first)),
        };
        let found = match res.map(|rows| read_rows(&rows)) {
            Ok(Ok(found)) => found,
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                // The reply was lost: a version carrying our etag is ours.
                let stored = self.find_own_writes(&paths).await;
                let own = |(path, etag): (&&str, String)| match stored.get(*path) {
                    Some((stored, mtime)) if *stored == etag => Ok(UploadResponse {
                        etag,
                        mtime: *mtime,
                    }),
                    _ => Err(e.duplicate().with_path(*path)),
                };
                return paths.iter().zip(etags).map(own).collect();
            }
            Err(e) => return each_failed(&reqs, &e),
            // Written, but the reply is unreadable: the outcome is unknown.
            Ok(Err(f)) => return each_failed(&reqs, &self.fail(f, true, first)),
        };
        let answer = |(req, etag): (&UploadRequest, String)| match found.get(req.path.as_str()) {
            Some(Row::Written(mtime)) => Ok(UploadResponse {
                etag,
                mtime: *mtime,
            }),
            Some(Row::Current(current)) => {
                let seen = current.as_ref().map(|c| (c.etag.as_str(), c.mtime));
                let refused = check_upload_preconditions(req, seen)
                    .err()
                    .unwrap_or_else(|| {
                        Error::new(
                            ErrorKind::Aborted,
                            "the document changed concurrently; nothing was written",
                        )
                    });
                Err(tag(with_current(refused, || current.clone()), &req.path))
            }
            None => Err(tag(
                Error::new(
                    ErrorKind::Unavailable,
                    "the server's reply left this write out; it may have been applied",
                ),
                &req.path,
            )),
        };
        reqs.iter().zip(etags).map(answer).collect()
    }

    /// The stored etag and mtime of each of `paths` that exists; empty when
    /// the server cannot be asked.
    async fn find_own_writes(&self, paths: &[&str]) -> HashMap<String, (String, SystemTime)> {
        let Ok(rows) = self
            .read(self.deadline(), &self.inner.sql.heads, &[&paths])
            .await
        else {
            return HashMap::new();
        };
        rows.iter()
            .filter_map(|row| {
                let path: String = row.try_get(0).ok()?;
                Some((path, (row.try_get(1).ok()?, row.try_get(2).ok()?)))
            })
            .collect()
    }
}

impl PostgresStorage {
    /// [`Storage::download_many`](crate::Storage::download_many): the
    /// reads with at most one `if_none_match` etag (not `*`) at distinct
    /// paths in one statement, the others one by one.
    pub(super) async fn read_many(
        &self,
        reqs: Vec<DownloadRequest>,
    ) -> Vec<Result<DownloadResponse>> {
        combined(
            reqs,
            READS,
            |r| {
                r.if_none_match.len() <= 1
                    && r.if_none_match.iter().all(|e| e != "*")
                    && validate_path(&r.path, false).is_ok()
            },
            move |req| self.download(req),
            move |reqs| self.select_many(reqs),
        )
        .await
    }

    /// Reads at distinct paths, each with at most one `if_none_match`, in
    /// one statement.
    async fn select_many(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        let inm: Vec<Option<&str>> = reqs
            .iter()
            .map(|r| r.if_none_match.first().map(String::as_str))
            .collect();
        let rows = match self
            .read(
                self.deadline(),
                &self.inner.sql.download_many,
                &[&paths, &inm],
            )
            .await
        {
            Ok(rows) => rows,
            Err(f) => return each_failed(&reqs, &self.fail(f, false, paths[0])),
        };
        let mut found = HashMap::with_capacity(rows.len());
        for row in &rows {
            let decoded = (|| {
                Ok::<_, tokio_postgres::Error>((
                    row.try_get::<_, String>(0)?,
                    row.try_get::<_, Option<String>>(1)?,
                    row.try_get::<_, Option<SystemTime>>(2)?,
                    row.try_get::<_, Option<Vec<u8>>>(3)?,
                ))
            })();
            match decoded {
                Ok((path, etag, mtime, content)) => {
                    found.insert(path, (etag, mtime, content));
                }
                Err(e) => {
                    let e = self.fail(Failure::Pg(e), false, paths[0]);
                    return paths
                        .iter()
                        .map(|p| Err(e.duplicate().with_path(*p)))
                        .collect();
                }
            }
        }
        paths
            .iter()
            .map(|path| match found.remove(*path) {
                Some((Some(etag), Some(mtime), Some(content))) => {
                    Ok(response(etag, mtime, content))
                }
                Some((Some(_), Some(_), None)) => Err(tag(
                    Error::new(ErrorKind::NotModified, "etag unchanged"),
                    path,
                )),
                _ => Err(tag(Error::not_found("no such document"), path)),
            })
            .collect()
    }
}

/// What the statement said of one path.
enum Row {
    /// Written, with this mtime.
    Written(SystemTime),
    /// Not written; the version the statement saw, if any.
    Current(Option<DownloadResponse>),
}

fn read_rows(rows: &[tokio_postgres::Row]) -> std::result::Result<HashMap<String, Row>, Failure> {
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let path: String = row.try_get(0).map_err(Failure::Pg)?;
        let written: Option<SystemTime> = row.try_get(1).map_err(Failure::Pg)?;
        let etag: Option<String> = row.try_get(2).map_err(Failure::Pg)?;
        let mtime: Option<SystemTime> = row.try_get(3).map_err(Failure::Pg)?;
        let content: Option<Vec<u8>> = row.try_get(4).map_err(Failure::Pg)?;
        let state = match (written, etag, mtime, content) {
            (Some(mtime), ..) => Row::Written(mtime),
            (None, Some(etag), Some(mtime), Some(content)) => {
                Row::Current(Some(response(etag, mtime, content)))
            }
            _ => Row::Current(None),
        };
        found.insert(path, state);
    }
    Ok(found)
}

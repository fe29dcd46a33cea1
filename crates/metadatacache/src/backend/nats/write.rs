//! Writes and deletes: each one publish that names the revision it
//! replaces, so the server applies it only over exactly that version.

use std::time::SystemTime;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::future::join_all;

use super::bucket::Bucket;
use super::version::{Version, delete_headers, etag, is_put, live, put_headers, revision};
use super::{NatsStorage, ancestors};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    UploadRequest, UploadResponse, check_delete_precondition, check_upload_preconditions,
    with_current,
};

/// How often a write re-reads and tries again when the key changes
/// between its read and its write.
const MAX_ATTEMPTS: usize = 16;

/// True for the error of a publish whose expected revision was not the
/// key's.
fn moved(e: &Error) -> bool {
    e.kind() == ErrorKind::PreconditionFailed
}

impl NatsStorage {
    /// [`Storage::upload`](crate::Storage::upload), within the timeout.
    pub(super) async fn write(&self, req: &UploadRequest) -> Result<UploadResponse> {
        let bucket = self.conn.bucket().await?;
        let path = req.path.as_str();
        let subject = self.layout.subject(path);
        let mtime = req.mtime.unwrap_or_else(SystemTime::now);
        let token = req.write_token.as_deref();
        let put = |expected: Option<u64>| {
            self.conn.publish(
                subject.clone(),
                put_headers(mtime, token, expected),
                req.content.clone(),
            )
        };
        let done = |rev: u64| {
            Ok(UploadResponse {
                etag: etag(rev),
                mtime,
            })
        };

        if req.is_create_only() {
            self.check_placement(&bucket, path).await?;
            // Over no message at all, else over the tombstone found.
            let mut expected = 0;
            for _ in 0..MAX_ATTEMPTS {
                match put(Some(expected)).await {
                    Ok(rev) => return done(rev),
                    Err(e) if moved(&e) => {}
                    Err(e) => return Err(e),
                }
                match self.read(&bucket, &subject).await? {
                    Some(v) if v.live => {
                        let e = Error::new(ErrorKind::AlreadyExists, "document already exists");
                        return Err(e.with_path(path).with_current(v.response()));
                    }
                    v => expected = v.map_or(0, |v| v.revision),
                }
            }
            return Err(kept_changing(path));
        }

        // The usual compare-and-swap: one publish naming the revision.
        let plain_if_match = req.if_none_match.is_empty() && req.if_unmodified_since.is_none();
        if plain_if_match && let Some(rev) = req.if_match.as_deref().and_then(revision) {
            return match put(Some(rev)).await {
                Ok(rev) => done(rev),
                Err(e) if moved(&e) => Err(self.why_refused(&bucket, req, &subject).await),
                Err(e) => Err(e),
            };
        }

        // Anything else: read, check, then write over exactly what was read.
        let unconditional = req.if_match.is_none() && plain_if_match;
        for _ in 0..MAX_ATTEMPTS {
            let current = self.read(&bucket, &subject).await?;
            let doc = current.as_ref().filter(|v| v.live);
            check_upload_preconditions(
                req,
                doc.map(|v| (v.etag(), v.mtime))
                    .as_ref()
                    .map(|(e, m)| (e.as_str(), *m)),
            )
            .map_err(|e| with_current(e, || doc.cloned().map(Version::response)))?;
            if doc.is_none() {
                self.check_placement(&bucket, path).await?;
            }
            // An unconditional write over a document need not name it.
            let expected = match (unconditional, doc) {
                (true, Some(_)) => None,
                _ => Some(current.map_or(0, |v| v.revision)),
            };
            match put(expected).await {
                Ok(rev) => return done(rev),
                Err(e) if moved(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(kept_changing(path))
    }

    /// The precondition error of a write refused for its revision: what
    /// the key holds now decides between `NotFound` and
    /// `PreconditionFailed`, and comes with it.
    async fn why_refused(&self, bucket: &Bucket, req: &UploadRequest, subject: &str) -> Error {
        let Ok(current) = self.current(bucket, subject).await else {
            return changed(&req.path);
        };
        let state = current.as_ref().map(|v| (v.etag(), v.mtime));
        let refused =
            check_upload_preconditions(req, state.as_ref().map(|(e, m)| (e.as_str(), *m)))
                .err()
                .unwrap_or_else(|| changed(&req.path));
        with_current(refused, || current.map(Version::response))
    }

    /// The live version of a subject after a refused write or delete, for
    /// its error only. The change was not applied whatever this read says,
    /// so a caller answers a failed read with [`changed`]: never with a
    /// made-up version.
    async fn current(&self, bucket: &Bucket, subject: &str) -> Result<Option<Version>> {
        Ok(self.read(bucket, subject).await?.filter(|v| v.live))
    }

    /// [`Storage::delete_if_match`](crate::Storage::delete_if_match),
    /// within the timeout: a tombstone naming the revision it deletes.
    pub(super) async fn remove(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        let bucket = self.conn.bucket().await?;
        let subject = self.layout.subject(path);
        let tombstone = |rev: u64| {
            self.conn
                .publish(subject.clone(), delete_headers(rev), Bytes::new())
        };
        let want = if_match.filter(|e| *e != "*");
        for _ in 0..MAX_ATTEMPTS {
            let rev = match want.and_then(revision) {
                Some(rev) => rev,
                None => {
                    let doc = self.read(&bucket, &subject).await?.filter(|v| v.live);
                    check_delete_precondition(
                        path,
                        if_match,
                        doc.as_ref().map(|v| v.etag()).as_deref(),
                    )?;
                    doc.map_or(0, |v| v.revision)
                }
            };
            match tombstone(rev).await {
                Ok(_) => return Ok(()),
                Err(e) if moved(&e) && want.is_some() => {
                    let Ok(doc) = self.current(&bucket, &subject).await else {
                        return Err(changed(path));
                    };
                    let etag = doc.as_ref().map(Version::etag);
                    return Err(check_delete_precondition(path, if_match, etag.as_deref())
                        .err()
                        .unwrap_or_else(|| changed(path)));
                }
                // Changed between the read and the delete: read again.
                Err(e) if moved(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(kept_changing(path))
    }

    /// The current version (or tombstone) of a subject.
    pub(super) async fn read(&self, bucket: &Bucket, subject: &str) -> Result<Option<Version>> {
        Ok(self
            .conn
            .read(bucket, subject, None)
            .await?
            .map(Version::of_message))
    }

    /// Refuses to create a document below a document or where documents
    /// lie below, and marks the directories above it. Not atomic with the
    /// write that follows (a KV bucket has no multi-key transactions): two
    /// first writes of a path and a path below it, at the same moment, can
    /// both succeed.
    ///
    /// One round of reads, all at once: the ancestors (none may be a
    /// document), their marks, and the path's own mark; then the missing
    /// marks are written. Only a path whose mark exists, or a bucket without
    /// marks, is checked by scanning what lies below it.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming what is in the way.
    pub(super) async fn check_placement(&self, bucket: &Bucket, path: &str) -> Result<()> {
        let marks = self.layout.marks_above(path);
        let own = self.layout.mark(path);
        let (parent, marked, below) = tokio::join!(
            self.first_document(bucket, ancestors(path)),
            join_all(marks.iter().map(|m| self.conn.read(bucket, m, None))),
            self.conn.read(bucket, &own, None),
        );
        if let Some(doc) = parent? {
            return Err(
                Error::invalid_input(format!("parent {doc:?} is a document")).with_path(path),
            );
        }
        if (!bucket.marked || below?.is_some()) && self.lies_below(bucket, path).await? {
            return Err(
                Error::invalid_input("documents lie below this path (it is a directory)")
                    .with_path(path),
            );
        }
        let mut missing = Vec::new();
        for (mark, found) in marks.into_iter().zip(marked) {
            if found?.is_none() {
                missing.push(mark);
            }
        }
        let written = missing
            .into_iter()
            .map(|mark| self.conn.publish(mark, HeaderMap::new(), Bytes::new()));
        for done in join_all(written).await {
            done?;
        }
        Ok(())
    }

    /// Whether a document lies below `path`: a scan of the last message of
    /// each key below it, until one that stores a document.
    pub(super) async fn lies_below(&self, bucket: &Bucket, path: &str) -> Result<bool> {
        let is_doc = |subject: &str| self.layout.path_of(subject).is_some();
        let below = self
            .conn
            .scan(bucket, &self.layout.below(path), |m| {
                is_doc(&m.subject) && m.message.headers.as_ref().is_none_or(is_put)
            })
            .await?;
        Ok(below
            .iter()
            .any(|s| is_doc(&s.subject) && is_put(&s.headers)))
    }

    /// The first of `paths` that is a document, reading them all at once.
    pub(super) async fn first_document<'p>(
        &self,
        bucket: &Bucket,
        paths: impl Iterator<Item = &'p str>,
    ) -> Result<Option<&'p str>> {
        let paths: Vec<&str> = paths.collect();
        let reads = paths.iter().map(|p| {
            let subject = self.layout.subject(p);
            async move { self.conn.read(bucket, &subject, None).await }
        });
        for (p, found) in paths.iter().zip(join_all(reads).await) {
            if live(found?).is_some() {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

/// A write or delete refused because the revision moved on (when the
/// state read afterwards does not say more).
fn changed(path: &str) -> Error {
    Error::new(ErrorKind::PreconditionFailed, "the document changed").with_path(path)
}

fn kept_changing(path: &str) -> Error {
    Error::new(
        ErrorKind::Aborted,
        "the document kept changing during the write",
    )
    .with_path(path)
}

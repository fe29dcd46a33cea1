//! Several uploads in one go ([`Storage::upload_many`](crate::Storage::upload_many)):
//! the documents share the syncs that make them durable.
//!
//! One upload costs two syncs: its temp file's and, after the rename, its
//! directory's. Here every temp file is written first and the kernel is
//! asked to start writing them all back at once; then each is synced, and
//! finds its data on its way already (on a journaling file system the
//! first sync's commit carries the others too). The documents of one
//! directory are then renamed under one lock and the directory is synced
//! once. Every document is still synced before it is renamed into place,
//! and keeps its own preconditions, fault hook and result: one refusal or
//! failure never fails another.

use std::fs::File;
use std::time::SystemTime;

use rustix::fs::Advice;

use super::fs::{DirFd, base, etag};
use super::lock::lock_dir;
use super::ops::{blocked_upload, refuse_early, replace, visible_error};
use super::temp::Temp;
use super::{DiskStep, Inner, check_path};
use crate::error::Result;
use crate::storage::{UploadRequest, UploadResponse, parent};

/// A request's temp file, written and not yet renamed.
struct Pending<'a> {
    temp: Temp<'a>,
    file: File,
    mtime: SystemTime,
}

/// The most documents written together: each holds a temp file (and
/// perhaps a directory) open until it is renamed, so a bound keeps a call
/// of thousands of requests within the process's open-file limit.
const CHUNK: usize = 64;

impl Inner {
    /// Uploads `reqs`, one result per request in order, [`CHUNK`] at a
    /// time; a bad path is answered without touching the file system.
    pub(in crate::backend::disk) fn upload_many(
        &self,
        reqs: &[UploadRequest],
    ) -> Vec<Result<UploadResponse>> {
        reqs.chunks(CHUNK)
            .flat_map(|chunk| self.upload_together(chunk))
            .collect()
    }

    /// Uploads `reqs` sharing their syncs (see the module docs).
    fn upload_together(&self, reqs: &[UploadRequest]) -> Vec<Result<UploadResponse>> {
        let mut results: Vec<Option<Result<UploadResponse>>> = reqs.iter().map(|_| None).collect();
        // The directories, opened once each; the index of each request's.
        let mut dirs: Vec<(&str, DirFd<'_>)> = Vec::new();
        let mut dir_of: Vec<Option<usize>> = vec![None; reqs.len()];
        for (i, req) in reqs.iter().enumerate() {
            if let Err(e) = check_path(&req.path, false) {
                results[i] = Some(Err(e));
                continue;
            }
            let dir = parent(&req.path);
            if let Some(d) = dirs.iter().position(|(p, _)| *p == dir) {
                dir_of[i] = Some(d);
                continue;
            }
            // A write that needs the document to exist creates no
            // directories.
            match self.walk(dir, req.if_match.is_none(), &req.path) {
                Ok(Ok(fd)) => {
                    dir_of[i] = Some(dirs.len());
                    dirs.push((dir, fd));
                }
                Ok(Err(blocked)) => results[i] = Some(Err(blocked_upload(req, blocked))),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut pending: Vec<Option<Pending<'_>>> = reqs.iter().map(|_| None).collect();
        for (i, req) in reqs.iter().enumerate() {
            let Some(d) = dir_of[i] else { continue };
            if let Err(e) = refuse_early(&dirs[d].1, req) {
                results[i] = Some(Err(e));
                continue;
            }
            match self.write_temp_unsynced(&dirs[d].1, base(&req.path), req) {
                Ok((temp, mtime, file)) => pending[i] = Some(Pending { temp, file, mtime }),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if self.opts.fsync {
            // Start writing them all back. Pages under write-back stay
            // cached (checked with `fincore`), so later reads still hit
            // the page cache. A failure only leaves the work to the fsync.
            for p in pending.iter().flatten() {
                let _ = rustix::fs::fadvise(&p.file, 0, None, Advice::DontNeed);
            }
        }
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(p) = slot
                && let Err(e) = self.sync_temp(&p.file, &reqs[i].path)
            {
                results[i] = Some(Err(e));
                *slot = None;
            }
        }
        for (d, (_, dirfd)) in dirs.iter().enumerate() {
            let members: Vec<usize> = (0..reqs.len())
                .filter(|&i| dir_of[i] == Some(d) && pending[i].is_some())
                .collect();
            let Some(&first) = members.first() else {
                continue;
            };
            let lock = match lock_dir(dirfd, &reqs[first].path) {
                Ok(lock) => lock,
                Err(e) => {
                    for &i in &members {
                        results[i] = Some(Err(e.duplicate()));
                        pending[i] = None;
                    }
                    continue;
                }
            };
            let mut renamed = Vec::new();
            for &i in &members {
                let Some(p) = pending[i].as_mut() else {
                    continue;
                };
                match replace(dirfd, &mut p.temp, &reqs[i]) {
                    Ok(()) => renamed.push(i),
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            drop(lock);
            self.sync_renamed(dirfd, reqs, &renamed, &mut pending, &mut results);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| unreachable!("every request is answered")))
            .collect()
    }

    /// Syncs directory `dir` once for the documents `renamed` into it and
    /// answers them: their etags, or [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable)
    /// when the sync failed (they are visible and may stand).
    fn sync_renamed(
        &self,
        dir: &DirFd<'_>,
        reqs: &[UploadRequest],
        renamed: &[usize],
        pending: &mut [Option<Pending<'_>>],
        results: &mut [Option<Result<UploadResponse>>],
    ) {
        if renamed.is_empty() {
            return;
        }
        // Each document's fault hook first, as for a single upload.
        let faults: Vec<_> = renamed
            .iter()
            .map(|&i| self.opts.fault(DiskStep::Renamed, &reqs[i].path))
            .collect();
        let synced = if self.opts.fsync {
            rustix::fs::fsync(dir)
        } else {
            Ok(())
        };
        for (&i, fault) in renamed.iter().zip(faults) {
            let path = reqs[i].path.as_str();
            let Some(p) = pending[i].take() else {
                continue;
            };
            results[i] = Some(match (fault, synced) {
                (Err(e), _) => Err(visible_error(e, path)),
                (Ok(()), Err(e)) => Err(visible_error(e.into(), path)),
                (Ok(()), Ok(())) => Ok(UploadResponse {
                    etag: etag(&reqs[i].content),
                    mtime: p.mtime,
                }),
            });
        }
    }
}

//! The storage operations of the disk backend, on top of the path walking,
//! reading and temp-file helpers of its parent module.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadRequest, DownloadResponse, FileInfo, UploadRequest, UploadResponse,
    check_delete_precondition, check_upload_preconditions, join, parent, validate_path,
    with_current,
};
use bytes::Bytes;
use rustix::fs::AtFlags;
use std::os::fd::AsFd;

use super::fs::*;
use super::lock::lock_dir;
use super::temp::Temp;
use super::{BACKEND, DiskStep, Inner, is_internal};

impl Inner {
    /// Syncs the directory a document was renamed into or removed from.
    /// That change is visible already, so a failure here (or anything else
    /// after it) is [`ErrorKind::Unavailable`]: the change may stand, or be
    /// lost on power loss, but must not be taken as "not applied".
    fn sync_dir(&self, dir: &DirFd<'_>, path: &str, step: DiskStep) -> Result<()> {
        let synced = self.opts.fault(step, path).and_then(|()| {
            if self.opts.fsync {
                rustix::fs::fsync(dir)?;
            }
            Ok(())
        });
        synced.map_err(|e| visible_error(e, path))
    }

    pub(in crate::backend::disk) fn upload(&self, req: &UploadRequest) -> Result<UploadResponse> {
        let path = req.path.as_str();
        // A write that needs the document to exist creates no directories.
        let dirfd = match self.walk(parent(path), req.if_match.is_none(), path)? {
            Ok(fd) => fd,
            Err(blocked) => return Err(blocked_upload(req, blocked)),
        };
        let etag = etag(&req.content);
        refuse_early(&dirfd, req)?;
        // The slow part (write + fsync) happens before taking the lock.
        let (mut temp, mtime) = self.write_temp(&dirfd, base(path), req)?;
        let lock = lock_dir(&dirfd, path)?;
        replace(&dirfd, &mut temp, req)?;
        drop(lock);
        self.sync_dir(&dirfd, path, DiskStep::Renamed)?;
        Ok(UploadResponse { etag, mtime })
    }

    pub(in crate::backend::disk) fn download(
        &self,
        req: &DownloadRequest,
    ) -> Result<DownloadResponse> {
        let path = req.path.as_str();
        let not_found = || Error::not_found("no such document").with_path(path);
        let Ok(dirfd) = self.walk(parent(path), false, path)? else {
            return Err(not_found());
        };
        let doc = match open_entry(dirfd.as_fd(), base(path), path, true)? {
            Entry::File(doc) => doc,
            Entry::Missing | Entry::Dir(_) => return Err(not_found()),
            Entry::Symlink => return Err(symlink_error(path, path)),
            Entry::Special => {
                return Err(Error::invalid_input("not a regular file").with_path(path));
            }
        };
        if req.if_none_match.iter().any(|e| *e == doc.etag || e == "*") {
            return Err(Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path));
        }
        Ok(DownloadResponse {
            content: Bytes::from(doc.content),
            etag: doc.etag,
            mtime: doc.mtime,
            write_token: None,
        })
    }

    pub(in crate::backend::disk) fn delete(
        &self,
        path: &str,
        if_match: Option<&str>,
    ) -> Result<()> {
        let Ok(dirfd) = self.walk(parent(path), false, path)? else {
            return check_delete_precondition(path, if_match, None);
        };
        let name = base(path);
        let lock = lock_dir(&dirfd, path)?;
        match open_entry(dirfd.as_fd(), name, path, if_match.is_some())? {
            Entry::File(doc) => check_delete_precondition(path, if_match, Some(&doc.etag))?,
            Entry::Missing | Entry::Dir(_) => check_delete_precondition(path, if_match, None)?,
            Entry::Symlink => return Err(symlink_error(path, path)),
            Entry::Special => {
                return Err(Error::invalid_input("not a regular file").with_path(path));
            }
        }
        rustix::fs::unlinkat(&dirfd, name, AtFlags::empty())
            .map_err(|e| io_error(e, path, "cannot remove"))?;
        drop(lock);
        self.sync_dir(&dirfd, path, DiskStep::Removed)
    }

    pub(in crate::backend::disk) fn stat(&self, path: &str) -> Result<FileInfo> {
        let not_found = || Error::not_found("no such document or directory").with_path(path);
        if path.is_empty() {
            let st = rustix::fs::fstat(&self.root).map_err(|e| io_error(e, path, "cannot stat"))?;
            return Ok(dir_info(String::new(), Some(mtime(&st))));
        }
        let Ok(dirfd) = self.walk(parent(path), false, path)? else {
            return Err(not_found());
        };
        match open_entry(dirfd.as_fd(), base(path), path, true)? {
            Entry::File(doc) => Ok(file_info(path.to_owned(), &doc)),
            Entry::Dir(mtime) => Ok(dir_info(path.to_owned(), Some(mtime))),
            Entry::Missing | Entry::Special => Err(not_found()),
            Entry::Symlink => Err(symlink_error(path, path)),
        }
    }

    pub(in crate::backend::disk) fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        let Ok(dirfd) = self.walk(path, false, path)? else {
            return Ok(Vec::new());
        };
        let names = read_names(dirfd.as_fd()).map_err(|e| io_error(e, path, "cannot list"))?;
        let mut out = Vec::with_capacity(names.len());
        for (name, _) in names {
            let child = join(path, &name);
            // Internal files, and names no storage path can address.
            if is_internal(&name) || validate_path(&child, false).is_err() {
                continue;
            }
            match open_entry(dirfd.as_fd(), &name, &child, true)? {
                Entry::File(doc) => out.push(file_info(child, &doc)),
                Entry::Dir(mtime) => out.push(dir_info(child, Some(mtime))),
                // Gone since listed, or not something this storage serves.
                Entry::Missing | Entry::Symlink | Entry::Special => {}
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    pub(in crate::backend::disk) fn make_dir(&self, path: &str) -> Result<()> {
        match self.walk(path, true, path)? {
            Ok(_) => Ok(()),
            Err(Blocked::NotDir(at)) => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{at:?} is a document"),
            )
            .with_path(path)),
            Err(Blocked::Missing) => {
                Err(Error::not_found("parent directory vanished").with_path(path))
            }
        }
    }
}

/// The error of an upload whose document's directory could not be opened
/// (`blocked`): the document is absent, so its preconditions answer first.
pub(super) fn blocked_upload(req: &UploadRequest, blocked: Blocked) -> Error {
    if let Err(e) = check_upload_preconditions(req, None) {
        return e;
    }
    match blocked {
        Blocked::NotDir(at) => Error::invalid_input(format!("parent {at:?} is a document")),
        Blocked::Missing => Error::not_found("parent directory vanished"),
    }
    .with_path(&req.path)
}

/// Refuses `req` before its temp file is written, when its preconditions
/// already fail: the temp file would cost an inode and a sync for nothing,
/// and the answer is as true as one given later. [`replace`] checks again
/// under the lock. A write without preconditions goes on.
pub(super) fn refuse_early(dir: &DirFd<'_>, req: &UploadRequest) -> Result<()> {
    if req.if_match.is_none() && req.if_none_match.is_empty() {
        return Ok(());
    }
    check_current(dir, req)
}

/// Checks `req`'s preconditions against the document in `dir` now; a
/// refusal carries the stored version (`Capabilities::current_on_conflict`).
fn check_current(dir: &DirFd<'_>, req: &UploadRequest) -> Result<()> {
    let path = req.path.as_str();
    let name = base(path);
    let needs_etag = req.if_match.is_some() || req.if_none_match.iter().any(|e| e != "*");
    let current = match open_entry(dir.as_fd(), name, path, needs_etag)? {
        Entry::Missing => None,
        Entry::File(doc) => Some(doc),
        Entry::Dir(_) => {
            return Err(Error::invalid_input("a directory exists at this path").with_path(path));
        }
        Entry::Symlink => return Err(symlink_error(path, path)),
        Entry::Special => {
            return Err(Error::invalid_input("not a regular file").with_path(path));
        }
    };
    let refused =
        match check_upload_preconditions(req, current.as_ref().map(|d| (d.etag.as_str(), d.mtime)))
        {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
    Err(with_current(refused, || {
        let doc = match current {
            Some(doc) if needs_etag => doc,
            // Read without its content: read it now.
            _ => match open_entry(dir.as_fd(), name, path, true) {
                Ok(Entry::File(doc)) => doc,
                _ => return None,
            },
        };
        Some(DownloadResponse {
            content: Bytes::from(doc.content),
            etag: doc.etag,
            mtime: doc.mtime,
            write_token: None,
        })
    }))
}

/// Checks `req`'s preconditions against the document in `dir` and renames
/// `temp` over it; the caller holds the directory's lock.
pub(super) fn replace(dir: &DirFd<'_>, temp: &mut Temp<'_>, req: &UploadRequest) -> Result<()> {
    check_current(dir, req)?;
    let path = req.path.as_str();
    rustix::fs::renameat(dir, temp.name.as_str(), dir, base(path))
        .map_err(|e| io_error(e, path, "cannot rename the temp file into place"))?;
    temp.armed = false;
    Ok(())
}

/// A failure after a change became visible (syncing its directory):
/// [`ErrorKind::Unavailable`], since the change may stand.
pub(super) fn visible_error(e: std::io::Error, path: &str) -> Error {
    let mut err = io_error(
        e,
        path,
        "the change is visible, but syncing its directory failed: it may stand, or be \
         lost on power loss",
    );
    if err.kind() != ErrorKind::Unavailable {
        err = Error::unavailable(err.message().to_owned())
            .with_path(path)
            .with_backend(BACKEND)
            .with_source(err);
    }
    err
}

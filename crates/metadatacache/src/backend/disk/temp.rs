//! Temp files: written and synced before the rename that publishes them,
//! removed when a write fails, and swept after a crash.

use crate::error::Result;
use crate::storage::{UploadRequest, join};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::fs::{File, Metadata, Permissions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use super::fs::*;
use super::{DiskStep, Inner, is_internal, is_temp};

/// Deepest directory the stale-temp sweep descends into (a path of at most
/// 1024 bytes has at most 512 segments).
const MAX_DEPTH: usize = 512;

/// The last status change time; unlike mtime, no caller can set it.
fn ctime(meta: &Metadata) -> SystemTime {
    let secs = u64::try_from(meta.ctime()).unwrap_or(0);
    let nanos = u32::try_from(meta.ctime_nsec()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

/// A temp file that is removed when dropped, unless renamed into place.
pub(super) struct Temp<'a> {
    pub(super) dir: BorrowedFd<'a>,
    pub(super) name: String,
    pub(super) armed: bool,
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: a leftover is removed by the next open's sweep.
            let _ = rustix::fs::unlinkat(self.dir, self.name.as_str(), AtFlags::empty());
        }
    }
}

/// The name of a new temp file for document `name`: `.{name}.tmp.{pid}.{random}`,
/// with `name` shortened to keep within the 255-byte limit of a file name.
pub(super) fn temp_name(name: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let pid = std::process::id().to_string();
    let mut temp = String::with_capacity(end + pid.len() + 23);
    for part in [".", &name[..end], ".tmp.", &pid, "."] {
        temp.push_str(part);
    }
    push_hex(&mut temp, &fastrand::u64(..).to_be_bytes());
    temp
}

impl Inner {
    /// Writes `req.content` to a new temp file in `dir`, mode and mtime set
    /// and (if configured) fsynced. Returns the file and its mtime.
    pub(super) fn write_temp<'a>(
        &self,
        dir: &'a DirFd<'_>,
        name: &str,
        req: &UploadRequest,
    ) -> Result<(Temp<'a>, SystemTime)> {
        let (temp, mtime, file) = self.write_temp_unsynced(dir, name, req)?;
        self.sync_temp(&file, &req.path)?;
        Ok((temp, mtime))
    }

    /// Like [`write_temp`](Self::write_temp) without the fsync: the caller
    /// syncs the returned file with [`sync_temp`](Self::sync_temp) before
    /// renaming it into place.
    pub(super) fn write_temp_unsynced<'a>(
        &self,
        dir: &'a DirFd<'_>,
        name: &str,
        req: &UploadRequest,
    ) -> Result<(Temp<'a>, SystemTime, File)> {
        let path = req.path.as_str();
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut attempt = 0;
        let (fd, temp) = loop {
            let temp = temp_name(name);
            match rustix::fs::openat(dir, temp.as_str(), flags, mode(self.opts.file_mode)) {
                Ok(fd) => break (fd, temp),
                Err(Errno::EXIST) if attempt < 8 => attempt += 1,
                Err(e) => return Err(io_error(e, path, "cannot create a temp file")),
            }
        };
        let temp = Temp {
            dir: dir.as_fd(),
            name: temp,
            armed: true,
        };
        let mut file = File::from(fd);
        let write = |file: &mut File| -> std::io::Result<SystemTime> {
            file.write_all(&req.content)?;
            if let Some(mtime) = req.mtime {
                file.set_modified(mtime)?;
            }
            // The mode is set exactly whatever the umask, but `fchmod` only
            // when the file did not get it at creation: the `fstat` that
            // reads the mtime shows the mode the umask (or a default ACL)
            // left, and the write (which clears set-user-ID and
            // set-group-ID bits) has happened. Neither chmod nor fsync
            // changes the mtime, and the fsync covers the mode too.
            let meta = file.metadata()?;
            if meta.mode() & 0o7777 != self.opts.file_mode {
                file.set_permissions(Permissions::from_mode(self.opts.file_mode))?;
            }
            meta.modified()
        };
        let mtime =
            write(&mut file).map_err(|e| io_error(e, path, "cannot write the temp file"))?;
        Ok((temp, mtime, file))
    }

    /// Syncs a temp file written for document `path` (if configured).
    pub(super) fn sync_temp(&self, file: &File, path: &str) -> Result<()> {
        let synced = if self.opts.fsync {
            file.sync_all()
        } else {
            Ok(())
        };
        synced
            .and_then(|()| self.opts.fault(DiskStep::TempWritten, path))
            .map_err(|e| io_error(e, path, "cannot write the temp file"))
    }

    /// Removes temp files left by killed writers: those whose ctime is older
    /// than the grace period (all of them for a zero grace). Problems are
    /// logged, not returned: a leftover temp file is never listed anyway.
    pub(in crate::backend::disk) fn sweep_temp_files(&self) {
        let grace = self.opts.stale_temp_grace;
        let cutoff = if grace.is_zero() {
            None
        } else {
            match SystemTime::now().checked_sub(grace) {
                Some(cutoff) => Some(cutoff),
                None => return,
            }
        };
        sweep(self.root.as_fd(), "", cutoff, 0);
    }
}

fn sweep(dir: BorrowedFd<'_>, at: &str, cutoff: Option<SystemTime>, depth: usize) {
    let names = match read_names(dir) {
        Ok(names) => names,
        Err(e) => {
            tracing::warn!(path = at, error = %e, "disk: cannot list directory while sweeping temp files");
            return;
        }
    };
    for (name, file_type) in names {
        if is_temp(&name) {
            let stale = match cutoff {
                None => true,
                Some(cutoff) => rustix::fs::openat(dir, name.as_str(), READ_FLAGS, Mode::empty())
                    .ok()
                    .and_then(|fd| File::from(fd).metadata().ok())
                    .is_some_and(|meta| meta.is_file() && ctime(&meta) <= cutoff),
            };
            if stale {
                match rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => {}
                    Err(e) => {
                        tracing::warn!(path = %join(at, &name), error = %e, "disk: cannot remove stale temp file");
                    }
                }
            }
        } else if !is_internal(&name)
            && depth < MAX_DEPTH
            && matches!(file_type, FileType::Directory | FileType::Unknown)
            && let Ok(sub) = rustix::fs::openat(dir, name.as_str(), DIR_FLAGS, Mode::empty())
        {
            sweep(sub.as_fd(), &join(at, &name), cutoff, depth + 1);
        }
    }
}

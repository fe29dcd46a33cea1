//! Compare-and-swap exclusion: an `flock` on the directory that holds the
//! document, which the kernel releases if the process dies, and the format
//! marker that names this locking scheme.
//!
//! The lock's identity is the directory a document lives in, the very
//! directory its new version is renamed into. Whatever anybody renames,
//! two writers of one document always lock the same directory, and a writer
//! that resolved a path before a rename locks the directory it will write
//! into.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

use super::fs::{DIR_FLAGS, DirFd, io_error};
use crate::error::{Error, Result};

/// The file in `<root>/.mdcache/` that names the on-disk format.
pub(super) const FORMAT_FILE: &str = "format";

/// What [`FORMAT_FILE`] holds for this version. Processes sharing a
/// directory must lock alike; a directory marked otherwise is refused.
pub(super) const FORMAT: &str =
    "metadatacache disk storage\nformat 2\nlocking: flock on the directory of each document\n";

/// An exclusive `flock` on a document's directory; dropping it unlocks.
pub(super) struct DirLock<'a> {
    fd: LockFd<'a>,
}

enum LockFd<'a> {
    /// The descriptor the path walk opened for this operation alone.
    Walked(BorrowedFd<'a>),
    /// A descriptor of the root opened for this lock (the root descriptor
    /// itself is shared by every operation of the storage).
    Own(OwnedFd),
}

impl AsFd for LockFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            LockFd::Walked(fd) => *fd,
            LockFd::Own(fd) => fd.as_fd(),
        }
    }
}

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock too, so a failed unlock
        // of a walked descriptor only lasts until the operation ends.
        let _ = rustix::fs::flock(self.fd.as_fd(), FlockOperation::Unlock);
    }
}

/// Takes the exclusive lock of directory `dir` (where document `path`
/// lives). Blocks until it is free.
///
/// An `flock` belongs to an open file description and does not exclude
/// another holder of the same description, so every lock is taken through a
/// description of its own: the one the walk just opened, or a new one for
/// the root.
pub(super) fn lock_dir<'a>(dir: &'a DirFd<'_>, path: &str) -> Result<DirLock<'a>> {
    let fd = match dir {
        DirFd::Sub(fd) => LockFd::Walked(fd.as_fd()),
        DirFd::Root(root) => LockFd::Own(
            rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| io_error(e, path, "cannot open the storage root to lock it"))?,
        ),
    };
    loop {
        match rustix::fs::flock(fd.as_fd(), FlockOperation::LockExclusive) {
            Ok(()) => return Ok(DirLock { fd }),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(io_error(e, path, "cannot lock the document's directory")),
        }
    }
}

/// How long an incomplete marker may stay before it counts as abandoned
/// (an opener of an earlier version, which wrote the marker in place, died
/// while writing it): markers now appear whole.
const ABANDONED: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks the format marker in `internal` (`<root>/.mdcache`), writing it
/// if missing, and replacing an incomplete one that was abandoned.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the
/// marker when another format is recorded there.
pub(super) fn check_format(internal: &OwnedFd, file_mode: u32, shown: &str) -> Result<()> {
    let marker = format!("{shown}/.mdcache/{FORMAT_FILE}");
    for _ in 0..100 {
        match read_marker(internal, &marker)? {
            Some(text) if text == FORMAT => return Ok(()),
            // Being written by an opener of an earlier version, or left
            // incomplete by one.
            Some(text) if FORMAT.starts_with(&text) => {
                if marker_age(internal) >= ABANDONED {
                    place_marker(internal, file_mode, &marker, true)?;
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            Some(text) => {
                let found = text.lines().nth(1).unwrap_or("no format line");
                return Err(Error::invalid_input(format!(
                    "this directory was written by an incompatible metadatacache ({found:?}; \
                     this version writes \"format 2\"); processes sharing a directory must \
                     lock alike"
                ))
                .with_path(marker)
                .with_backend(super::BACKEND));
            }
            None => {
                if place_marker(internal, file_mode, &marker, false)? {
                    return Ok(());
                }
            }
        }
    }
    Err(Error::unavailable("the format marker stays incomplete")
        .with_path(marker)
        .with_backend(super::BACKEND))
}

/// The marker's text; `None` when there is none.
fn read_marker(internal: &OwnedFd, marker: &str) -> Result<Option<String>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(internal, FORMAT_FILE, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(io_error(e, marker, "cannot open the format marker")),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
        .map_err(|e| io_error(e, marker, "cannot read the format marker"))?;
    Ok(Some(text))
}

/// How long ago the marker was last written (zero when that cannot be
/// told, so that it is waited for).
fn marker_age(internal: &OwnedFd) -> std::time::Duration {
    rustix::fs::statat(internal, FORMAT_FILE, AtFlags::SYMLINK_NOFOLLOW)
        .ok()
        .and_then(|st| super::fs::mtime(&st).elapsed().ok())
        .unwrap_or_default()
}

/// Writes the marker whole beside it (synced), then puts it in place: a
/// link that fails if another opener's came first (`replace` false: false
/// then), or a rename over an abandoned one. Either way no reader ever
/// sees a part of it, whenever a process dies or the power fails.
fn place_marker(internal: &OwnedFd, file_mode: u32, marker: &str, replace: bool) -> Result<bool> {
    let aside = format!(
        ".{FORMAT_FILE}.tmp.{}.{:016x}",
        std::process::id(),
        fastrand::u64(..)
    );
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(internal, &aside, flags, super::fs::mode(file_mode))
        .map_err(|e| io_error(e, marker, "cannot create the format marker"))?;
    let mut file = std::fs::File::from(fd);
    let written = std::io::Write::write_all(&mut file, FORMAT.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(e, marker, "cannot write the format marker"));
    let placed = written.and_then(|()| {
        let placed = if replace {
            rustix::fs::renameat(internal, &aside, internal, FORMAT_FILE).map(|()| true)
        } else {
            match rustix::fs::linkat(internal, &aside, internal, FORMAT_FILE, AtFlags::empty()) {
                Ok(()) => Ok(true),
                Err(Errno::EXIST) => Ok(false),
                Err(e) => Err(e),
            }
        };
        placed.map_err(|e| io_error(e, marker, "cannot put the format marker in place"))
    });
    // Gone already after a rename.
    let _ = rustix::fs::unlinkat(internal, &aside, AtFlags::empty());
    if placed? {
        rustix::fs::fsync(internal)
            .map_err(|e| io_error(e, marker, "cannot sync the format marker's directory"))?;
        return Ok(true);
    }
    Ok(false)
}

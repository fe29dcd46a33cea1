//! Compare-and-swap exclusion: 64 lock stripes, each an in-process mutex
//! plus an `flock` on a lock file that the kernel releases if the process
//! dies.

use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;
use xxhash_rust::xxh3::xxh3_64;

use super::Inner;
use super::fs::{io_error, mode};
use crate::error::Result;

/// How many lock files a storage has; a path locks the one its hash picks.
pub(super) const LOCK_STRIPES: usize = 64;

/// The in-process side of the lock stripes: for each, a mutex holding the
/// lock file's descriptor once it has been opened.
///
/// One open file description per stripe serves the whole process, so an
/// operation does not open and close a lock file. An `flock` belongs to the
/// description, so it does not exclude another thread using the same one:
/// the mutex does that, and is always taken before the `flock`.
#[derive(Debug)]
pub(super) struct LockStripes([Mutex<Option<OwnedFd>>; LOCK_STRIPES]);

impl LockStripes {
    pub(super) fn new() -> Self {
        LockStripes(std::array::from_fn(|_| Mutex::new(None)))
    }
}

/// An exclusive lock on one stripe, held in this process (the mutex) and
/// across processes (the `flock`). Dropping it releases both.
pub(super) struct StripeLock<'a> {
    slot: MutexGuard<'a, Option<OwnedFd>>,
}

impl Drop for StripeLock<'_> {
    fn drop(&mut self) {
        // The `flock` is released before the mutex (a field, dropped after
        // this body), so the next thread of this process takes a free lock.
        if let Some(fd) = self.slot.as_ref()
            && rustix::fs::flock(fd, FlockOperation::Unlock).is_err()
        {
            // Closing the descriptor releases the lock too; the next
            // operation on this stripe opens the lock file again.
            *self.slot = None;
        }
    }
}

impl Inner {
    /// Takes the exclusive lock of `path`'s stripe: first the stripe's
    /// in-process mutex, then an `flock` on its lock file, whose descriptor
    /// is opened once and kept. Both are released when the returned guard is
    /// dropped; the kernel releases the `flock` if the process dies.
    pub(super) fn lock(&self, path: &str) -> Result<StripeLock<'_>> {
        // The remainder is below 64, so the conversion is lossless.
        let stripe = (xxh3_64(path.as_bytes()) % LOCK_STRIPES as u64) as usize;
        let mut slot = self.stripes.0[stripe]
            .lock()
            // The mutex guards no data of its own: a panic elsewhere while
            // holding it leaves nothing inconsistent.
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let fd = match slot.take() {
                Some(fd) => fd,
                None => self.open_lock_file(stripe, path)?,
            };
            let fd = &*slot.insert(fd);
            loop {
                match rustix::fs::flock(fd, FlockOperation::LockExclusive) {
                    Ok(()) => break,
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(io_error(e, path, "cannot lock")),
                }
            }
            // A lock file removed (or replaced) since it was opened is no
            // longer the one other processes lock: close it (which releases
            // the `flock`) and lock the file now under that name.
            match rustix::fs::fstat(fd) {
                Ok(st) if st.st_nlink > 0 => return Ok(StripeLock { slot }),
                Ok(_) => *slot = None,
                Err(e) => {
                    *slot = None;
                    return Err(io_error(e, path, "cannot stat the lock file"));
                }
            }
        }
    }

    /// Opens (creating if missing) lock file `stripe`, for locking `path`.
    fn open_lock_file(&self, stripe: usize, path: &str) -> Result<OwnedFd> {
        let name = format!("{stripe:02}");
        let flags = OFlags::RDONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        rustix::fs::openat(&self.locks, name.as_str(), flags, mode(self.opts.file_mode))
            .map_err(|e| io_error(e, path, "cannot open the lock file"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::DiskStorage;
    use crate::backend::disk::fs::{INTERNAL_DIR, LOCKS_DIR};
    use crate::storage::UploadRequest;

    #[test]
    fn a_removed_lock_file_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let storage = DiskStorage::open(dir.path()).unwrap();
        let inner = &storage.inner;
        let path = "a/doc.json";
        let put = |body: &'static str| inner.upload(&UploadRequest::new(path, body)).unwrap();
        put("1");
        let stripe = (xxh3_64(path.as_bytes()) % LOCK_STRIPES as u64) as usize;
        let lock_file = dir
            .path()
            .join(INTERNAL_DIR)
            .join(LOCKS_DIR)
            .join(format!("{stripe:02}"));
        assert!(lock_file.exists());
        std::fs::remove_file(&lock_file).unwrap();
        // The kept descriptor is of a removed file: it is replaced by the
        // file other processes now lock.
        put("2");
        assert!(lock_file.exists());
        let held = inner.lock(path).unwrap();
        let kept = rustix::fs::fstat(held.slot.as_ref().unwrap()).unwrap();
        let named = std::fs::metadata(&lock_file).unwrap();
        assert_eq!(kept.st_ino, named.ino());
        // Held: another open file description cannot take it.
        let other = File::open(&lock_file).unwrap();
        assert_eq!(
            rustix::fs::flock(&other, FlockOperation::NonBlockingLockExclusive),
            Err(Errno::WOULDBLOCK)
        );
        drop(held);
        rustix::fs::flock(&other, FlockOperation::NonBlockingLockExclusive).unwrap();
    }
}

//! The blocking file system operations behind [`DiskStorage`](super::DiskStorage).
//!
//! Every path is resolved from the root descriptor one component at a time
//! with `O_NOFOLLOW`, so a symbolic link planted inside the root can never
//! lead outside it.

use std::borrow::Cow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, RawMode, Stat};
use rustix::io::Errno;

use super::{BACKEND, DiskOptions, Inner};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{EntryKind, FileInfo};

pub(super) const INTERNAL_DIR: &str = ".mdcache";

pub(super) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
/// `NONBLOCK` and `NOCTTY` so that a planted FIFO or device cannot hang or
/// hijack the process; such entries are rejected after `fstat`.
pub(super) const READ_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY);

/// Maps an I/O error to the crate's error; the one place that does so.
///
/// `ELOOP`, `ENOTDIR`, `EXDEV` and `EMLINK` come from resolving a path
/// through a symbolic link (or a document used as a directory) and are
/// reported as [`ErrorKind::PermissionDenied`]; errors that a retry may cure
/// (`EIO`, `ENOSPC`, …) as [`ErrorKind::Unavailable`].
pub(super) fn io_error(
    err: impl Into<std::io::Error>,
    path: &str,
    what: impl Into<Cow<'static, str>>,
) -> Error {
    let err = err.into();
    let kind = match Errno::from_io_error(&err) {
        Some(Errno::NOENT) => ErrorKind::NotFound,
        Some(Errno::ACCESS | Errno::PERM | Errno::ROFS) => ErrorKind::PermissionDenied,
        Some(Errno::LOOP | Errno::NOTDIR | Errno::XDEV | Errno::MLINK) => {
            ErrorKind::PermissionDenied
        }
        Some(Errno::NAMETOOLONG | Errno::ISDIR | Errno::INVAL) => ErrorKind::InvalidInput,
        Some(
            Errno::IO
            | Errno::NOSPC
            | Errno::DQUOT
            | Errno::AGAIN
            | Errno::INTR
            | Errno::BUSY
            | Errno::TIMEDOUT
            | Errno::STALE
            | Errno::NOLCK
            | Errno::MFILE
            | Errno::NFILE
            | Errno::NOMEM,
        ) => ErrorKind::Unavailable,
        _ => ErrorKind::Other,
    };
    Error::new(kind, what)
        .with_path(path)
        .with_backend(BACKEND)
        .with_source(err)
}

/// The error for a path that runs into a symbolic link at `at`.
pub(super) fn symlink_error(path: &str, at: &str) -> Error {
    io_error(
        Errno::LOOP,
        path,
        format!("{at:?} is a symbolic link; paths may not leave the storage root"),
    )
}

pub(super) fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as RawMode)
}

/// The strong etag of `content`: its BLAKE3 hash as 64 hex digits.
///
/// A cryptographic hash, so that nobody who can write documents can make
/// one whose etag equals another version's and pass a compare-and-swap
/// meant for that version.
pub(super) fn etag(content: &[u8]) -> String {
    let mut out = String::with_capacity(64);
    push_hex(&mut out, blake3::hash(content).as_bytes());
    out
}

/// Appends `bytes` as lowercase hex digits, two per byte: what `{:0Nx}`
/// formats, without the formatting machinery (an update formats three
/// etags).
pub(super) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// (times before 1970 included).
pub(super) fn mtime(st: &Stat) -> SystemTime {
    // The field types differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    let (secs, nanos) = (st.st_mtime as i64, st.st_mtime_nsec as u64);
    let whole = Duration::from_secs(secs.unsigned_abs());
    let time = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(whole)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(whole)
    };
    time.and_then(|t| t.checked_add(Duration::from_nanos(nanos.min(999_999_999))))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A directory opened by [`Inner::walk`]: the root itself (borrowed, so
/// resolving a document at the top costs no `open`) or one beneath it
/// (opened for this operation alone).
pub(super) enum DirFd<'a> {
    Root(BorrowedFd<'a>),
    Sub(OwnedFd),
}

impl AsFd for DirFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Root(fd) => *fd,
            DirFd::Sub(fd) => fd.as_fd(),
        }
    }
}

/// Why a directory could not be opened without creating anything.
pub(super) enum Blocked {
    /// A component does not exist.
    Missing,
    /// The component at this path is a document (or another non-directory).
    NotDir(String),
}

/// What is at a path.
pub(super) enum Entry {
    Missing,
    File(Doc),
    Dir(SystemTime),
    Symlink,
    /// A FIFO, socket or device.
    Special,
}

pub(super) struct Doc {
    /// Empty unless the content was asked for.
    pub(super) content: Vec<u8>,
    /// Empty unless the content was asked for.
    pub(super) etag: String,
    pub(super) mtime: SystemTime,
    pub(super) size: u64,
}

/// Creates the root (if missing) and the internal directory with its format
/// marker, and opens the root.
pub(super) fn open_root(dir: &Path, shown: &str, opts: &DiskOptions) -> Result<OwnedFd> {
    super::synced::create_root(dir, shown, opts)?;
    let root = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_error(e, shown, "cannot open the storage directory"))?;
    let internal = make_dir_at(&root, INTERNAL_DIR, opts, shown)?;
    super::lock::check_format(&internal, opts.file_mode, shown)?;
    Ok(root)
}

/// Opens directory `name` in `dir`, creating it with the configured mode
/// first if it is missing; `InvalidInput` when a non-directory is there.
pub(super) fn make_dir_at(
    dir: &OwnedFd,
    name: &str,
    opts: &DiskOptions,
    path: &str,
) -> Result<OwnedFd> {
    match open_dir_at(dir.as_fd(), name, name, true, opts, path)? {
        Ok(fd) => Ok(fd),
        Err(_) => Err(
            Error::invalid_input(format!("{name:?} exists and is not a directory"))
                .with_path(path)
                .with_backend(BACKEND),
        ),
    }
}

/// Opens the directory `name` in `dir` without following a symbolic link;
/// `at` is its storage path, for messages. With `create`, a missing
/// directory is created (mode set exactly, parent fsynced if configured).
pub(super) fn open_dir_at(
    dir: BorrowedFd<'_>,
    name: &str,
    at: &str,
    create: bool,
    opts: &DiskOptions,
    path: &str,
) -> Result<std::result::Result<OwnedFd, Blocked>> {
    let err = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => return Ok(Ok(fd)),
        Err(e) => e,
    };
    if err != Errno::NOENT || !create {
        return classify(dir, name, at, err, path).map(Err);
    }
    let created = match rustix::fs::mkdirat(dir, name, mode(opts.dir_mode)) {
        Ok(()) => true,
        Err(Errno::EXIST) => false,
        Err(e) => return Err(io_error(e, path, format!("cannot create directory {at:?}"))),
    };
    let fd = match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => return classify(dir, name, at, e, path).map(Err),
    };
    if created {
        rustix::fs::fchmod(&fd, mode(opts.dir_mode))
            .map_err(|e| io_error(e, path, format!("cannot set the mode of {at:?}")))?;
        if opts.fsync {
            rustix::fs::fsync(dir)
                .map_err(|e| io_error(e, path, format!("cannot sync the parent of {at:?}")))?;
        }
    }
    Ok(Ok(fd))
}

/// Explains why opening `name` in `dir` as a directory failed with `err`.
pub(super) fn classify(
    dir: BorrowedFd<'_>,
    name: &str,
    at: &str,
    err: Errno,
    path: &str,
) -> Result<Blocked> {
    if err == Errno::NOENT {
        return Ok(Blocked::Missing);
    }
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => Err(symlink_error(path, at)),
            FileType::Directory => {
                Err(io_error(err, path, format!("cannot open directory {at:?}")))
            }
            _ => Ok(Blocked::NotDir(at.to_owned())),
        },
        Err(Errno::NOENT) => Ok(Blocked::Missing),
        Err(_) => Err(io_error(err, path, format!("cannot open directory {at:?}"))),
    }
}

/// The names in directory `dir` with their types (`Unknown` where the file
/// system does not say), without `.`, `..` and names that are not UTF-8.
pub(super) fn read_names(dir: BorrowedFd<'_>) -> std::io::Result<Vec<(String, FileType)>> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if name != "." && name != ".." {
            out.push((name.to_owned(), entry.file_type()));
        }
    }
    Ok(out)
}

/// Reads the entry `name` of `dir` (storage path `path`) without following
/// a symbolic link; with `hash`, a document's content and etag too.
pub(super) fn open_entry(dir: BorrowedFd<'_>, name: &str, path: &str, hash: bool) -> Result<Entry> {
    let fd = match rustix::fs::openat(dir, name, READ_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Entry::Missing),
        Err(Errno::NXIO) => return Ok(Entry::Special),
        Err(err) => {
            return match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    Ok(Entry::Symlink)
                }
                _ => Err(io_error(err, path, "cannot open")),
            };
        }
    };
    // One `fstat` gives the type, size and mtime.
    let st = rustix::fs::fstat(&fd).map_err(|e| io_error(e, path, "cannot stat"))?;
    let mtime = mtime(&st);
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory => return Ok(Entry::Dir(mtime)),
        _ => return Ok(Entry::Special),
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let mut doc = Doc {
        content: Vec::new(),
        etag: String::new(),
        mtime,
        size,
    };
    if hash {
        doc.content = read_all(fd.as_fd(), size).map_err(|e| io_error(e, path, "cannot read"))?;
        doc.etag = etag(&doc.content);
        doc.size = doc.content.len() as u64;
    }
    Ok(Entry::File(doc))
}

/// Reads the regular file `fd` (at offset 0, `size` bytes by its `fstat`)
/// to its end.
///
/// Documents are never changed in place (a write replaces the file by
/// rename), so the size of an open document stays what `fstat` said. The
/// buffer has room for one byte more: the read that returns the whole
/// document comes back short of it, which on a regular file means the end,
/// so a document takes one `read`. A read that returns less than `size`
/// (a signal, say) or fills the buffer (the file grew anyway) is followed by
/// more until one returns 0.
pub(super) fn read_all(fd: BorrowedFd<'_>, size: u64) -> std::io::Result<Vec<u8>> {
    let room = usize::try_from(size).map_or(0, |s| s.saturating_add(1));
    let mut buf = Vec::with_capacity(room);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity().max(8192));
        }
        let room = buf.capacity() - buf.len();
        match rustix::io::read(fd, rustix::buffer::spare_capacity(&mut buf)) {
            Ok(0) => return Ok(buf),
            Ok(n) if n < room && buf.len() as u64 >= size => return Ok(buf),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl Inner {
    /// Opens directory `dir` (a validated storage path, "" for the root)
    /// beneath the root, one component at a time, never following a
    /// symbolic link. With `create`, missing directories are created.
    ///
    /// The walk starts from the root descriptor itself, and the root is
    /// returned borrowed: nothing is opened for a document at the top.
    pub(super) fn walk(
        &self,
        dir: &str,
        create: bool,
        path: &str,
    ) -> Result<std::result::Result<DirFd<'_>, Blocked>> {
        let mut cur = DirFd::Root(self.root.as_fd());
        if dir.is_empty() {
            return Ok(Ok(cur));
        }
        let mut end = 0;
        for segment in dir.split('/') {
            end += segment.len() + usize::from(end > 0);
            let at = &dir[..end];
            let next = match open_dir_at(cur.as_fd(), segment, at, create, &self.opts, path)? {
                Ok(next) => next,
                Err(blocked) => return Ok(Err(blocked)),
            };
            // A write goes through: its directories' entries must be on
            // disk before it is acknowledged (see `synced`).
            if create && self.opts.fsync && !self.synced.contains(at) {
                rustix::fs::fsync(cur.as_fd())
                    .map_err(|e| io_error(e, path, format!("cannot sync the parent of {at:?}")))?;
                self.synced.insert(at);
            }
            cur = DirFd::Sub(next);
        }
        Ok(Ok(cur))
    }
}

/// The last segment of `path`.
pub(super) fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

pub(super) fn file_info(path: String, doc: &Doc) -> FileInfo {
    FileInfo {
        path,
        kind: EntryKind::File,
        size: doc.size,
        mtime: Some(doc.mtime),
        etag: Some(doc.etag.clone()),
    }
}

pub(super) fn dir_info(path: String, mtime: Option<SystemTime>) -> FileInfo {
    FileInfo {
        mtime,
        ..FileInfo::dir(path)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, Write};

    use super::*;
    use crate::DiskStorage;
    use crate::backend::disk::is_temp;
    use crate::backend::disk::temp::temp_name;
    use crate::storage::{DownloadRequest, UploadRequest};

    fn read_back(content: &[u8], claimed: u64) -> Vec<u8> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(content).unwrap();
        file.rewind().unwrap();
        read_all(file.as_fd(), claimed).unwrap()
    }

    #[test]
    fn etags_and_temp_names_are_formatted_as_before() {
        for content in [&b""[..], b"{}", b"{\"count\":1}"] {
            assert_eq!(etag(content), blake3::hash(content).to_hex().as_str());
        }
        let name = temp_name("doc.json");
        let prefix = format!(".doc.json.tmp.{}.", std::process::id());
        let random = name.strip_prefix(&prefix).unwrap();
        assert_eq!(random.len(), 16);
        assert!(
            random
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(is_temp(&name));
        let long = "é".repeat(120);
        assert!(temp_name(&long).len() <= 255);
    }

    #[test]
    fn read_all_reads_to_the_end() {
        for len in [0, 1, 7, 4095, 4096, 8192, 100_000] {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let n = len as u64;
            assert_eq!(read_back(&content, n), content, "{len}");
            // A file larger or smaller than its `fstat` said is still read whole.
            assert_eq!(read_back(&content, n / 2), content, "{len}, grown");
            assert_eq!(read_back(&content, n * 2 + 1), content, "{len}, shrunk");
        }
    }

    #[test]
    fn mtime_matches_std() {
        let file = tempfile::NamedTempFile::new().unwrap();
        for t in [
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            SystemTime::UNIX_EPOCH - Duration::new(86_400, 250_000_000),
            SystemTime::UNIX_EPOCH,
        ] {
            file.as_file().set_modified(t).unwrap();
            let st = rustix::fs::fstat(file.as_file()).unwrap();
            let meta = file.as_file().metadata().unwrap();
            assert_eq!(mtime(&st), meta.modified().unwrap());
            assert_eq!(mtime(&st), t);
        }
    }

    #[test]
    fn top_level_documents_and_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let storage = DiskStorage::open(dir.path()).unwrap();
        let inner = &storage.inner;
        let up = inner.upload(&UploadRequest::new("top.json", "{}")).unwrap();
        let down = inner.download(&DownloadRequest::new("top.json")).unwrap();
        assert_eq!(&down.content[..], b"{}");
        assert_eq!(down.etag, up.etag);
        assert_eq!(down.mtime, up.mtime);
        assert_eq!(inner.stat("top.json").unwrap().mtime, Some(up.mtime));
        assert_eq!(inner.stat("").unwrap().kind, EntryKind::Dir);
        let listed = inner.list_dir("").unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, "top.json");
        inner.delete("top.json", Some(&up.etag)).unwrap();
        assert!(inner.list_dir("").unwrap().is_empty());
    }
}

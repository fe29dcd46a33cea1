//! In-process storage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, Change, ChangeSender, ChangeStream, DownloadRequest, DownloadResponse, EntryKind,
    FileInfo, Storage, UploadRequest, UploadResponse, check_delete_precondition,
    check_upload_preconditions, is_within, join, parent, validate_path, with_current,
};

/// Storage kept in this process's memory.
///
/// Every precondition is checked under one mutex together with the write, so
/// of many tasks racing on one etag exactly one wins. Clones share the same
/// documents. Each write gets a new, never reused etag, even when the content
/// is unchanged.
///
/// ```
/// # tokio_test_block_on(async {
/// use metadatacache::{MemoryStorage, Storage};
/// let storage = MemoryStorage::new();
/// storage.simple_upload("a/b.json", "{}".into()).await?;
/// assert_eq!(storage.read_dir("a").await?, vec!["a/b.json".to_string()]);
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    files: BTreeMap<String, Doc>,
    dirs: BTreeSet<String>,
    next_version: u64,
    /// Change streams and the prefix each watches.
    watchers: Vec<(String, ChangeSender)>,
}

#[derive(Debug, Clone)]
struct Doc {
    content: Bytes,
    etag: String,
    mtime: SystemTime,
    write_token: Option<String>,
}

impl Doc {
    fn response(&self) -> DownloadResponse {
        DownloadResponse {
            content: self.content.clone(),
            etag: self.etag.clone(),
            mtime: self.mtime,
            write_token: self.write_token.clone(),
        }
    }
}

const BACKEND: &str = "memory";

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty storage, from the URL `memory:`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL for anything else.
    pub fn from_url(url: &str) -> Result<Self> {
        match url {
            "memory:" | "memory://" => Ok(Self::new()),
            _ => Err(crate::backend::util::bad_url(
                BACKEND,
                url,
                "expected memory:",
            )),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State half-updated
        // (every mutation is a single insert/remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn tag(e: Error) -> Error {
    e.with_backend(BACKEND)
}

impl State {
    /// Reports a change to every stream watching `path`, under the lock
    /// that made it (so streams see changes in the order they happened;
    /// a reader waiting for the lock sees the change first). Drops
    /// streams whose consumer is gone.
    fn notify(&mut self, path: &str, etag: Option<&str>) {
        self.watchers.retain(|(prefix, tx)| {
            if !is_within(path, prefix) {
                return !tx.is_closed();
            }
            tx.send(Change::Changed {
                path: path.to_owned(),
                etag: etag.map(str::to_owned),
            })
        });
    }

    fn has_dir(&self, dir: &str) -> bool {
        if dir.is_empty() || self.dirs.contains(dir) {
            return true;
        }
        let prefix = format!("{dir}/");
        let under = |p: &String| p.starts_with(&prefix);
        self.files
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(p, _)| under(p))
            || self.dirs.range(prefix.clone()..).next().is_some_and(under)
    }

    /// A document may not sit where a directory is, nor below a document.
    fn check_placement(&self, path: &str) -> Result<()> {
        if self.has_dir(path) {
            return Err(Error::invalid_input("a directory exists at this path").with_path(path));
        }
        let mut p = parent(path);
        while !p.is_empty() {
            if self.files.contains_key(p) {
                return Err(
                    Error::invalid_input(format!("parent {p:?} is a document")).with_path(path)
                );
            }
            p = parent(p);
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Version-counter etags, write tokens, atomic conditional deletes,
    /// stored directories and the current version on a conflict.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            directories: true,
            notifications: true,
            current_on_conflict: true,
            ..Capabilities::VERSIONED
        }
    }

    /// Creates directory `name`.
    async fn init(&self, name: &str) -> Result<()> {
        self.make_dir_if_not_exist(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        validate_path(&req.path, false).map_err(tag)?;
        let mut state = self.state();
        let current = state
            .files
            .get(&req.path)
            .map(|d| (d.etag.as_str(), d.mtime));
        if let Err(e) = check_upload_preconditions(&req, current) {
            let doc = state.files.get(&req.path);
            return Err(tag(with_current(e, || doc.map(Doc::response))));
        }
        if current.is_none() {
            state.check_placement(&req.path).map_err(tag)?;
        }
        state.next_version += 1;
        let etag = version_etag(state.next_version);
        let mtime = req.mtime.unwrap_or_else(SystemTime::now);
        state.notify(&req.path, Some(&etag));
        state.files.insert(
            req.path,
            Doc {
                content: req.content,
                etag: etag.clone(),
                mtime,
                write_token: req.write_token,
            },
        );
        Ok(UploadResponse { etag, mtime })
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        validate_path(&req.path, false).map_err(tag)?;
        let state = self.state();
        let doc = state
            .files
            .get(&req.path)
            .ok_or_else(|| tag(Error::not_found("no such document").with_path(&req.path)))?;
        if req.if_none_match.iter().any(|e| *e == doc.etag || e == "*") {
            return Err(tag(
                Error::new(ErrorKind::NotModified, "etag unchanged").with_path(&req.path)
            ));
        }
        Ok(doc.response())
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        validate_path(path, false).map_err(tag)?;
        let mut state = self.state();
        let current = state.files.get(path).map(|d| d.etag.as_str());
        check_delete_precondition(path, if_match, current).map_err(tag)?;
        state.files.remove(path);
        state.notify(path, None);
        Ok(())
    }

    /// Changes are reported synchronously, by the write itself.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        validate_path(prefix, true).map_err(tag)?;
        let (tx, rx) = ChangeStream::channel();
        tx.send(Change::InSync);
        self.state().watchers.push((prefix.to_owned(), tx));
        Ok(rx)
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        validate_path(path, true).map_err(tag)?;
        let state = self.state();
        if let Some(doc) = state.files.get(path) {
            return Ok(file_info(path, doc));
        }
        if state.has_dir(path) {
            return Ok(FileInfo::dir(path.to_owned()));
        }
        Err(tag(
            Error::not_found("no such document or directory").with_path(path)
        ))
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        validate_path(path, true).map_err(tag)?;
        let state = self.state();
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let mut out = BTreeMap::new();
        for (p, doc) in state.files.range(prefix.clone()..) {
            let Some(rest) = p.strip_prefix(&prefix) else {
                break;
            };
            match rest.split_once('/') {
                None => {
                    out.insert(p.clone(), file_info(p, doc));
                }
                Some((child, _)) => {
                    let child = join(path, child);
                    out.entry(child.clone())
                        .or_insert_with(|| FileInfo::dir(child));
                }
            }
        }
        for d in state.dirs.range(prefix.clone()..) {
            let Some(rest) = d.strip_prefix(&prefix) else {
                break;
            };
            let child = join(path, rest.split('/').next().unwrap_or(rest));
            out.entry(child.clone())
                .or_insert_with(|| FileInfo::dir(child));
        }
        Ok(out.into_values().collect())
    }

    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        validate_path(path, true).map_err(tag)?;
        if path.is_empty() {
            return Ok(());
        }
        let mut state = self.state();
        let mut p = path;
        while !p.is_empty() {
            if state.files.contains_key(p) {
                return Err(tag(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{p:?} is a document"),
                )
                .with_path(path)));
            }
            p = parent(p);
        }
        state.dirs.insert(path.to_owned());
        Ok(())
    }
}

/// `m` and the version in hex, without going through `format!` (this is on
/// every write's path).
fn version_etag(v: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(17);
    out.push('m');
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
    out
}

fn file_info(path: &str, doc: &Doc) -> FileInfo {
    FileInfo {
        path: path.to_owned(),
        kind: EntryKind::File,
        size: doc.content.len() as u64,
        mtime: Some(doc.mtime),
        etag: Some(doc.etag.clone()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_etags_are_hex() {
        for v in [0u64, 1, 15, 16, 255, 0xabc, u64::MAX] {
            assert_eq!(super::version_etag(v), format!("m{v:x}"));
        }
    }
}

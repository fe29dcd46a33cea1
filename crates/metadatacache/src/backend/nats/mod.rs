//! Storage in a NATS JetStream key-value bucket, with compare-and-swap by
//! the revision a write expects.
//!
//! The public configuration and URL parsing live in [`config`], the
//! connection, the bucket, the timeout and the error mapping of every call
//! in [`client`] (its state in [`link`]), the requests sent through it in [`requests`], the
//! encoding of paths as keys in [`keys`], what a key's messages say in
//! [`version`], writes and deletes in [`write`], and change notifications
//! in [`watch`].

mod bucket;
mod client;
mod config;
mod keys;
mod link;
mod requests;
mod tls;
mod version;
mod watch;
mod write;

pub use self::config::NatsConfig;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, Storage,
    UploadRequest, UploadResponse, join, parent, validate_path,
};

use client::Conn;
use keys::Layout;
use version::{Version, live, revision};

const BACKEND: &str = "nats";

/// Storage in a NATS JetStream key-value bucket.
///
/// # URL
///
/// `nats://[user:password@|token@]host[:port][,host[:port]...]/bucket[/prefix][?options]`
///
/// * servers: one or more `host:port` (port 4222 when left out; `[v6]:port`
///   for IPv6). `tls://` instead of `nats://` requires TLS; with `nats://`
///   TLS is used when the server asks for it.
/// * `bucket`: the key-value bucket (letters, digits, `-`, `_`). A missing
///   bucket is created by the first call that needs it (history 1, file
///   storage), as `nats kv add bucket` would.
/// * `prefix`: an optional key prefix in the bucket, as a storage path
///   (`app/v1`); empty for the whole bucket.
/// * options: `timeout_ms` (the bound on every call, default 5000: a call
///   without an answer in time fails with [`ErrorKind::Unavailable`]);
///   credentials, one way at a time, as NATS tools take them: `user` and
///   `password` (or `user:password@`), `token` (or `token@`), `creds` (the
///   path of a `.creds` file, as `nats --creds`), `nkey` (the path of a file
///   holding an nkey seed, as `nats --nkey`); TLS: `tls_ca` (PEM file of the
///   authorities to trust; else the system's), `tls_cert` and `tls_key` (a
///   client certificate), each of which requires TLS. Passwords and tokens are
///   never printed, neither by `Debug` nor in error messages.
///
/// # Layout and semantics
///
/// * A document is one key of the bucket holding exactly the document's
///   bytes. The key encodes the path one segment per token: `A-Z a-z 0-9 -
///   _` stay, every other byte becomes `=XX`, and `/` becomes `.`, so
///   `users/alice.json` is the key `users.alice=2Ejson` (after the
///   prefix's key, if any), where other NATS key-value clients see the
///   plain document. Every path has a
///   key of its own, and a directory's keys are exactly those under
///   `<its key>.>`. Keys that this encoding never makes (written by other
///   tools) are not listed.
/// * The etag is the key's revision (the message's stream sequence) in
///   decimal: every write gets a new one, also with unchanged content, and
///   a revision never comes back, also after a delete and a re-create (as
///   long as the bucket itself is not deleted and made anew).
/// * Each write names the revision it replaces
///   (`Nats-Expected-Last-Subject-Sequence`), so the server applies it
///   only over exactly that version: create-only writes over no message or
///   over the key's tombstone ([`ErrorKind::AlreadyExists`] if a document is
///   there), `if_match` writes over that revision (else
///   [`ErrorKind::PreconditionFailed`], or [`ErrorKind::NotFound`] when the
///   key is deleted), and the other preconditions read the key and then
///   write over the revision read. A delete stores a `DEL` tombstone over
///   the revision it deletes, so a conditional delete never removes a
///   newer version. Deleted keys read as absent.
/// * The modification time ([`UploadRequest::mtime`], else the writer's
///   clock) and the write token travel as headers of the message that
///   stores the document: they are written in one step with it. A value
///   written by another tool has the server's time of storing it.
/// * A conditional download whose etag is current answers
///   [`ErrorKind::NotModified`] without fetching the content: it asks for
///   a message of the key newer than that revision, and there is none.
///   (This relies on the bucket keeping one message per key, history 1;
///   on a bucket with a longer history the current version is fetched and
///   compared.)
/// * Directories are key prefixes: a directory exists while a document
///   lies below it. [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist)
///   stores nothing (it only refuses a path where a document is). A
///   document cannot be created where documents lie below it, nor below
///   another document; a bucket has no multi-key transactions, so this is
///   checked just before the write, and two first writes racing to create
///   a path and a path below it can both succeed (a listing then shows the
///   document).
/// * The first write of a document marks every directory above it (an
///   empty value at the key `<directory's key>.=`, never listed), so the
///   check above is a few direct reads however large the bucket. A bucket
///   this backend finds empty is flagged as marked (key `=dirs`); in a
///   bucket that held documents before (written by another tool or an
///   earlier version) the check scans the keys below the path, as does a
///   path that once was a directory. Other tools writing into a marked
///   bucket should not create new directories.
/// * [`watch`](Storage::watch) follows the bucket with a JetStream
///   consumer (headers only, from now on) and reports a
///   [`Change::Gap`](crate::Change::Gap) whenever the connection is lost,
///   then subscribes again.
///
/// # Connections
///
/// [`new`](NatsStorage::new) and [`from_url`](NatsStorage::from_url) do
/// not wait for the server: the client connects in the background,
/// reconnects by itself after the connection breaks, and the bucket is
/// looked up (or created) by the first call. A call waits for the
/// connection within its timeout and hands nothing to a disconnected
/// client (which would keep a write and send it whenever it reconnects,
/// long after the caller gave up): while the server is away, calls fail
/// with [`ErrorKind::Unavailable`] at their timeout, having sent nothing,
/// or with [`ErrorKind::PermissionDenied`] when the server refuses the
/// credentials. Only a write caught in the client's queue at the moment
/// the connection breaks may still be sent after it reconnects (a
/// conditional write then lands only over the version it was written
/// against).
///
/// ```no_run
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use metadatacache::{NatsStorage, Storage};
/// let storage = NatsStorage::from_url("nats://127.0.0.1:4222/myapp?timeout_ms=2000").await?;
/// storage.simple_upload("users/alice.json", "{}".into()).await?;
/// // or through the generic opener:
/// let storage = metadatacache::open("nats://127.0.0.1:4222/myapp").await?;
/// assert_eq!(storage.backend(), "nats");
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
pub struct NatsStorage {
    conn: Arc<Conn>,
    layout: Layout,
    config: NatsConfig,
}

impl fmt::Debug for NatsStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsStorage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NatsStorage {
    /// A storage in the bucket `config` describes. The client starts
    /// connecting in the background; nothing waits for the server.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when a credentials or nkey file cannot
    /// be read.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is written.
    pub async fn new(config: NatsConfig) -> Result<NatsStorage> {
        let conn = Conn::new(&config)
            .await
            .map_err(|e| e.with_backend(BACKEND))?;
        Ok(NatsStorage {
            conn: Arc::new(conn),
            layout: Layout::new(&config.bucket, &config.prefix),
            config,
        })
    }

    /// Sets up a storage from a `nats://` or `tls://` URL (see the type's
    /// documentation for its form).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL (with any password or
    /// token hidden) when it is malformed; as [`new`](NatsStorage::new).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is written.
    pub async fn from_url(url: &str) -> Result<NatsStorage> {
        Self::new(NatsConfig::from_url(url)?).await
    }

    /// The key-value bucket.
    pub fn bucket(&self) -> &str {
        &self.config.bucket
    }

    /// The key prefix in the bucket, as a storage path ("" for none).
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.conn.timeout()
    }

    /// Checks a path and that its subject is not too long.
    fn check_path(&self, path: &str, allow_root: bool) -> Result<()> {
        validate_path(path, allow_root)
            .and_then(|()| self.layout.check_len(path))
            .map_err(|e| e.with_backend(BACKEND))
    }
}

/// The ancestors of `path`, nearest first (not the root).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(parent(path)), |p| {
        Some(parent(p)).filter(|_| !p.is_empty())
    })
    .filter(|p| !p.is_empty())
}

#[async_trait]
impl Storage for NatsStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Revisions never repeat; write tokens travel as headers of the
    /// message that stores the version; deletes name the revision they
    /// delete; a consumer reports changes; a refused write comes with the
    /// version it read to tell why.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            notifications: true,
            current_on_conflict: true,
            ..Capabilities::VERSIONED
        }
    }

    /// Checks the name, that JetStream answers, and that the bucket exists,
    /// creating it when it is missing.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad name, [`ErrorKind::Unavailable`]
    /// when NATS does not answer, [`ErrorKind::Other`] when JetStream
    /// refuses (not enabled, limits).
    async fn init(&self, name: &str) -> Result<()> {
        self.check_path(name, true)?;
        self.conn
            .bounded(name, false, async { self.conn.bucket().await.map(drop) })
            .await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        self.check_path(&req.path, false)?;
        self.conn.bounded(&req.path, true, self.write(&req)).await
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        let path = req.path.as_str();
        self.check_path(path, false)?;
        let not_modified = || Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path);
        let op = async {
            let bucket = self.conn.bucket().await?;
            let subject = self.layout.subject(path);
            let any = req.if_none_match.iter().any(|e| e == "*");
            // One known revision: ask only for a newer message, so an
            // unchanged document is not sent.
            let newer_than = match req.if_none_match.as_slice() {
                [etag] if bucket.single_history => revision(etag),
                _ => None,
            };
            let found = self.conn.read(&bucket, &subject, newer_than).await?;
            if found.is_none() && newer_than.is_some() {
                return Err(not_modified());
            }
            let Some(doc) = live(found) else {
                return Err(Error::not_found("no such document").with_path(path));
            };
            if any || req.if_none_match.contains(&doc.etag()) {
                return Err(not_modified());
            }
            Ok(doc.response())
        };
        self.conn.bounded(path, false, op).await
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        self.check_path(path, false)?;
        self.conn
            .bounded(path, true, self.remove(path, if_match))
            .await
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        self.check_path(path, true)?;
        if path.is_empty() {
            return Ok(FileInfo::dir(String::new()));
        }
        let op = async {
            let bucket = self.conn.bucket().await?;
            let subject = self.layout.subject(path);
            if let Some(doc) = live(self.conn.read(&bucket, &subject, None).await?) {
                return Ok(doc.file_info(path.to_owned()));
            }
            // Nothing was ever written below an unmarked path.
            let marked = !bucket.marked
                || (self
                    .conn
                    .read(&bucket, &self.layout.mark(path), None)
                    .await?)
                    .is_some();
            if marked && self.lies_below(&bucket, path).await? {
                return Ok(FileInfo::dir(path.to_owned()));
            }
            Err(Error::not_found("no such document or directory").with_path(path))
        };
        self.conn.bounded(path, false, op).await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.check_path(path, true)?;
        let op = async {
            let bucket = self.conn.bucket().await?;
            let scanned = self
                .conn
                .scan(&bucket, &self.layout.below(path), |_| false)
                .await?;
            let mut out = BTreeMap::new();
            for s in &scanned {
                let version = Version::of_scanned(s);
                let Some(full) = version
                    .live
                    .then(|| self.layout.path_of(&s.subject))
                    .flatten()
                else {
                    continue;
                };
                let rest = if path.is_empty() {
                    full.as_str()
                } else {
                    match full.strip_prefix(path).and_then(|r| r.strip_prefix('/')) {
                        Some(rest) => rest,
                        None => continue,
                    }
                };
                match rest.split_once('/') {
                    Some((child, _)) => {
                        let child = join(path, child);
                        out.entry(child.clone())
                            .or_insert_with(|| FileInfo::dir(child));
                    }
                    // A document wins over a directory at the same path
                    // (only after the placement race).
                    None => {
                        out.insert(full.clone(), version.file_info(full.clone()));
                    }
                }
            }
            Ok(out.into_values().collect())
        };
        self.conn.bounded(path, false, op).await
    }

    /// Stores nothing: directories exist while documents lie below them.
    /// Refuses a path where a document is, or below one.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyExists`] when `path` or one of its parents is a
    /// document.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        self.check_path(path, true)?;
        if path.is_empty() {
            return Ok(());
        }
        let op = async {
            let bucket = self.conn.bucket().await?;
            let chain = std::iter::once(path).chain(ancestors(path));
            match self.first_document(&bucket, chain).await? {
                Some(doc) => Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{doc:?} is a document"),
                )
                .with_path(path)),
                None => Ok(()),
            }
        };
        self.conn.bounded(path, false, op).await
    }

    /// Subscribes with a JetStream consumer of the storage's keys (headers
    /// only, from now on) and keeps it up until the stream is dropped: a
    /// lost connection is reported as a gap at once, then it subscribes
    /// again and reports that it is in sync.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad prefix; as
    /// [`download`](Storage::download) when the first subscription fails.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        self.check_path(prefix, true)?;
        watch::start(Arc::clone(&self.conn), self.layout.clone(), prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestors_nearest_first() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), ["a/b", "a"]);
        assert_eq!(ancestors("a").count(), 0);
    }
}

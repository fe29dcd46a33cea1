//! Storage in etcd (API v3), with compare-and-swap by transactions on
//! `mod_revision`.
//!
//! The public configuration and URL parsing live in [`config`], the
//! connection with the timeout, sign-in and error mapping of every call in
//! [`client`], the key layout and encodings in [`layout`], and the
//! transaction of a write in [`write`], and change streams in [`watch`].

mod client;
mod config;
mod layout;
mod list;
mod many;
mod tls;
mod watch;
mod write;

pub use self::config::EtcdConfig;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, Storage,
    UploadRequest, UploadResponse, check_delete_precondition,
};

use client::{Conn, count_at, kvs_at};
use layout::{
    Layout, absent, ancestors, check_path, etag, etag_is, exists, file_info, mtime_of, revision,
    token_of,
};

const BACKEND: &str = "etcd";

/// Storage in an etcd v3 cluster.
///
/// # URL
///
/// `etcd://[user[:password]@]host:port[,host:port...][/prefix][?timeout_ms=N&user=U&password=P&cacert=PATH&cert=PATH&key=PATH]`
///
/// * endpoints: one or more `host:port` (port 2379 when left out; `[v6]:port`
///   for IPv6), spoken to over HTTP/2. Requests are spread over the
///   endpoints; one that finds its endpoint dead (the connection refused or
///   unreachable, so nothing was sent) is sent again, to another, for up to
///   three quarters of the timeout.
/// * `cacert`, `cert`, `key` (etcdctl's names): TLS is on when `cacert`
///   names the CA file (PEM) that signed the servers' certificates, which
///   must be valid for the host names (or addresses) of the endpoints.
///   `cert` and `key` (PEM, together) are a client certificate, for clusters
///   started with `--client-cert-auth`. There is no `etcds://`, and no
///   trust in the system's CAs. A missing or unusable file is
///   [`ErrorKind::InvalidInput`] naming it, from [`new`](EtcdStorage::new).
///   A wrong CA, a missing or refused client certificate, or a plain-text
///   URL at a TLS-only server fail the first call with
///   [`ErrorKind::PermissionDenied`] and a message that says it is a TLS
///   problem and names the endpoints and files (the last two the client
///   learns by one handshake of its own after the server closed the
///   connection).
/// * `prefix`: the key prefix (may be empty or nested, `a/b`); a document at
///   `path` is the key `<prefix>/<path>` (just `<path>` without a prefix).
/// * `timeout_ms`: the bound on every call, default 5000. A call that gets
///   no answer within it fails with [`ErrorKind::Unavailable`].
/// * `user`, `password`: for clusters with authentication enabled (also
///   accepted as `user:password@` before the hosts; percent-encode special
///   characters). With a user but no password in the URL, the password is
///   read from the environment variable `ETCDCTL_PASSWORD` (etcdctl reads
///   `--password` from it). The password is never printed, neither by
///   `Debug` nor in error messages.
///
/// # Layout and semantics
///
/// * The document key holds exactly the document's bytes, so
///   `etcdctl get <prefix>/<path>` shows the plain document.
/// * The etag is the key's `mod_revision` in decimal. Every write gets a new
///   one, even with unchanged content.
/// * The modification time lives in the sibling key
///   `<prefix>/.mdcache-meta/<path>`, written in the same transaction as the
///   document. The first path segment `.mdcache-meta` is therefore reserved
///   ([`ErrorKind::InvalidInput`]) and never listed. A document written by
///   another tool has no modification time (`None` in [`FileInfo`], the Unix
///   epoch in [`DownloadResponse`]). The time is
///   [`UploadRequest::mtime`] or the writer's clock, so
///   `if_unmodified_since` across machines is only as good as their clocks.
/// * Preconditions are compares inside one etcd transaction with the write:
///   create-only is `create_revision == 0`, `if_match` is
///   `mod_revision == etag`, `if_none_match` etags are `mod_revision != etag`.
///   `if_unmodified_since` reads the time first and then writes only if
///   `mod_revision` is still the one read. When a transaction's compares
///   fail, its else-branch reads the state they saw, which decides between
///   `NotFound`, `AlreadyExists` and `PreconditionFailed` without another
///   round trip.
/// * Directories are key prefixes: a directory exists while a document lies
///   below it. [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist)
///   stores nothing (it only refuses a path where a document is), so an
///   empty directory does not show in [`stat`](Storage::stat) or
///   [`list_dir`](Storage::list_dir). A document cannot be created where
///   documents lie below it, nor below another document.
/// * A conditional download whose etag is current answers
///   [`ErrorKind::NotModified`] from the transaction's compare, without
///   sending the content.
/// * Changes are reported ([`Storage::watch`]) by an etcd watch on the key
///   prefix, which stores nothing; a broken watch (outage, restart,
///   compaction) is reported as a gap and re-established.
///
/// # Connections
///
/// [`new`](EtcdStorage::new) and [`from_url`](EtcdStorage::from_url) do no network traffic: connections
/// are made by the first call and made again after the server restarts.
/// With credentials, the client signs in on first use and again whenever
/// etcd rejects its token (tokens expire, and do not survive a restart).
///
/// ```no_run
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use metadatacache::{EtcdStorage, Storage};
/// let storage =
///     EtcdStorage::from_url("etcd://127.0.0.1:2379,127.0.0.1:22379/myapp?timeout_ms=2000").await?;
/// storage.simple_upload("users/alice.json", "{}".into()).await?;
/// // or through the generic opener:
/// let storage = metadatacache::open("etcd://127.0.0.1:2379/myapp").await?;
/// assert_eq!(storage.backend(), "etcd");
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
pub struct EtcdStorage {
    conn: Arc<Conn>,
    layout: Layout,
    config: EtcdConfig,
}

impl fmt::Debug for EtcdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStorage")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EtcdStorage {
    /// A storage on the cluster `config` describes, with its certificate
    /// files read. No network traffic happens here: connections are made by
    /// the first call.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the endpoints when the client
    /// cannot be set up with them, or naming a certificate file that is
    /// missing, unreadable or unusable.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn new(config: EtcdConfig) -> Result<EtcdStorage> {
        let conn = Conn::new(&config).await.map_err(|e| {
            let message = format!("{} (endpoints {})", e.message(), config.endpoints.join(","));
            e.with_message(message).with_backend(BACKEND)
        })?;
        Ok(EtcdStorage {
            conn: Arc::new(conn),
            layout: Layout::new(&config.prefix),
            config,
        })
    }

    /// Sets up a storage from an `etcd://` URL (see the type's
    /// documentation for its form). No network traffic happens here.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL (with any password hidden)
    /// when it is malformed, or naming a certificate file that is missing,
    /// unreadable or unusable.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn from_url(url: &str) -> Result<EtcdStorage> {
        Self::new(EtcdConfig::from_url(url)?).await
    }

    /// The key prefix, without a trailing slash ("" for none).
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> std::time::Duration {
        self.conn.timeout()
    }
}

/// The answer to `req` from the document and metadata keys read for it;
/// `if_none_match` is checked here (a no-op where the read's compares
/// already did).
fn answer(
    req: &DownloadRequest,
    doc: Option<KeyValue>,
    meta: Option<KeyValue>,
) -> Result<DownloadResponse> {
    let path = req.path.as_str();
    let Some(doc) = doc else {
        return Err(tag(Error::not_found("no such document").with_path(path)));
    };
    let etag = etag(doc.mod_revision());
    if req.if_none_match.iter().any(|e| e == "*" || *e == etag) {
        return Err(tag(
            Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path)
        ));
    }
    Ok(response(doc, meta))
}

/// A document as a download returns it, from its key (read with its value)
/// and its metadata key.
fn response(doc: KeyValue, meta: Option<KeyValue>) -> DownloadResponse {
    let etag = etag(doc.mod_revision());
    let mtime = mtime_of(&doc, meta.as_ref()).unwrap_or(SystemTime::UNIX_EPOCH);
    let write_token = token_of(&doc, meta.as_ref());
    let (_, value) = doc.into_key_value();
    DownloadResponse {
        content: Bytes::from(value),
        etag,
        mtime,
        write_token,
    }
}

fn tag(e: Error) -> Error {
    e.with_backend(BACKEND)
}

#[async_trait]
impl Storage for EtcdStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Etags are mod revisions, which never repeat; write tokens live in
    /// the metadata key, written in the same transaction as the document;
    /// deletes compare the mod revision in their transaction; changes are
    /// reported by an etcd watch.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            notifications: true,
            combined_calls: true,
            current_on_conflict: true,
            ..Capabilities::VERSIONED
        }
    }

    /// Watches the document keys below `prefix` with an etcd watch that
    /// starts at the revision after the one current at the call; each put
    /// is reported with its mod revision as the etag, each delete without
    /// one. Metadata keys are not reported.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad prefix;
    /// [`ErrorKind::Unavailable`] when etcd does not set up the watch
    /// within the timeout; [`ErrorKind::PermissionDenied`] when it refuses
    /// access.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        self.subscribe(prefix).await
    }

    /// Checks the name and that etcd answers; the key prefix needs no
    /// creating.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad name, [`ErrorKind::Unavailable`]
    /// or [`ErrorKind::PermissionDenied`] when etcd cannot be used.
    async fn init(&self, name: &str) -> Result<()> {
        check_path(name, true).map_err(tag)?;
        let count = GetOptions::new().with_prefix().with_count_only();
        let txn = Txn::new().and_then([TxnOp::get(self.layout.under(name), Some(count))]);
        self.conn.txn(name, txn, false).await.map(drop)
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        self.write(req).await
    }

    /// Plain compare-and-swap updates go in one transaction (up to 32 of
    /// them, 1 MiB of content), each in a nested transaction of its own
    /// that compares its etag: every request has its own outcome. Other
    /// requests are written one by one.
    ///
    /// # Errors
    /// Per request, as [`upload`](Self::upload).
    async fn upload_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        self.write_many(reqs).await
    }

    /// Up to 16 documents per transaction, read whole: an `if_none_match`
    /// is checked after the read.
    ///
    /// # Errors
    /// Per request, as [`download`](Self::download).
    async fn download_many(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        self.read_many(reqs).await
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        let path = req.path.as_str();
        check_path(path, false).map_err(tag)?;
        let doc_key = self.layout.doc(path);
        // Read only when no listed etag is current; else send nothing back.
        let when: Vec<Compare> = req
            .if_none_match
            .iter()
            .filter_map(|e| match e.as_str() {
                "*" => Some(absent(&doc_key)),
                e => revision(e)
                    .map(|r| Compare::mod_revision(doc_key.as_str(), CompareOp::NotEqual, r)),
            })
            .collect();
        let txn = Txn::new().when(when).and_then([
            TxnOp::get(doc_key.as_str(), None),
            TxnOp::get(self.layout.meta(path), None),
        ]);
        let resp = self.conn.txn(path, txn, false).await?;
        if !resp.succeeded() {
            return Err(tag(
                Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path)
            ));
        }
        let mut ops = resp.op_responses();
        let doc = kvs_at(&mut ops, 0).into_iter().next();
        answer(&req, doc, kvs_at(&mut ops, 1).into_iter().next())
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        check_path(path, false).map_err(tag)?;
        let doc_key = self.layout.doc(path);
        let mut when = vec![exists(&doc_key)];
        if let Some(want) = if_match.filter(|e| *e != "*") {
            when.push(etag_is(&doc_key, want));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([
                TxnOp::delete(doc_key.as_str(), None),
                TxnOp::delete(self.layout.meta(path), None),
            ])
            .or_else([TxnOp::get(
                doc_key.as_str(),
                Some(GetOptions::new().with_keys_only()),
            )]);
        let resp = self.conn.txn(path, txn, true).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let mut ops = resp.op_responses();
        let current = kvs_at(&mut ops, 0)
            .first()
            .map(|kv| etag(kv.mod_revision()));
        check_delete_precondition(path, if_match, current.as_deref()).map_err(tag)?;
        // The compares saw exactly this state, so the check above failed.
        Err(tag(Error::new(
            ErrorKind::Aborted,
            "delete precondition failed without a reason",
        )
        .with_path(path)))
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        check_path(path, true).map_err(tag)?;
        if path.is_empty() {
            return Ok(FileInfo::dir(String::new()));
        }
        let txn = Txn::new().and_then([
            TxnOp::get(self.layout.doc(path), None),
            TxnOp::get(self.layout.meta(path), None),
            TxnOp::get(
                self.layout.under(path),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]);
        let mut ops = self.conn.txn(path, txn, false).await?.op_responses();
        if let Some(doc) = kvs_at(&mut ops, 0).first() {
            let meta = kvs_at(&mut ops, 1).into_iter().next();
            return Ok(file_info(path.to_owned(), doc, meta.as_ref()));
        }
        if count_at(&ops, 2) > 0 {
            return Ok(FileInfo::dir(path.to_owned()));
        }
        Err(tag(
            Error::not_found("no such document or directory").with_path(path)
        ))
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        check_path(path, true).map_err(tag)?;
        list::list_dir(&self.conn, &self.layout, path).await
    }

    /// Stores nothing: directories exist while documents lie below them.
    /// Refuses a path where a document is, or below one.
    ///
    /// # Errors
    /// [`ErrorKind::AlreadyExists`] when `path` or one of its parents is a
    /// document.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        check_path(path, true).map_err(tag)?;
        if path.is_empty() {
            return Ok(());
        }
        let chain: Vec<&str> = std::iter::once(path).chain(ancestors(path)).collect();
        let txn = Txn::new().and_then(
            chain
                .iter()
                .map(|p| TxnOp::get(self.layout.doc(p), Some(GetOptions::new().with_keys_only())))
                .collect::<Vec<_>>(),
        );
        let mut ops = self.conn.txn(path, txn, false).await?.op_responses();
        for (i, p) in chain.iter().enumerate() {
            if !kvs_at(&mut ops, i).is_empty() {
                return Err(tag(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{p:?} is a document"),
                )
                .with_path(path)));
            }
        }
        Ok(())
    }
}

//! S3 and S3-compatible object storage through the `object_store` crate.

mod client;
mod config;
mod write;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::object_store::path::Path as ObjectPath;
use ::object_store::{GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, UpdateVersion};
use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, DownloadRequest, DownloadResponse, EntryKind, FileInfo, Storage, UploadRequest,
    UploadResponse, check_delete_precondition, validate_path,
};
use ::object_store::signer::Signer;
use client::ConditionalDelete;
use client::Op;
pub use config::S3Config;

/// Storage in an object store (S3 or S3-compatible such as MinIO, R2, Ceph;
/// any other `object_store` backend with conditional put can be wrapped with
/// [`ObjectStoreStorage::from_store`]).
///
/// Each document is one object at `PREFIX/PATH`; its etag is the object's
/// ETag exactly as the server reports it (for S3 a quoted content MD5, e.g.
/// `"\"9b2c…\""`), the same from upload, download, stat and list.
///
/// # URL
///
/// `s3://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&region=REGION&allow_http=true]`
///
/// - `BUCKET` must exist already ([`init`](Storage::init) does not create it).
/// - `PREFIX` (optional, percent-encoded) is prepended to every path.
/// - `timeout_ms` bounds every call (default 5000): a dead endpoint yields
///   [`ErrorKind::Unavailable`] within it.
/// - `endpoint`, `region`, `allow_http` override the environment.
///
/// Everything else comes from the usual environment variables (read by
/// `object_store`'s `AmazonS3Builder::from_env`): `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
/// `AWS_DEFAULT_REGION` (default `us-east-1`), `AWS_ENDPOINT` /
/// `AWS_ENDPOINT_URL` (for S3-compatible servers), `AWS_ALLOW_HTTP=true`
/// (for a plain-http endpoint), plus the other `AWS_*` options
/// `object_store` knows (web identity, container credentials, …). Without
/// credentials the client asks the instance metadata service. Credentials
/// are never accepted in the URL and never printed by `Debug`.
///
/// ```no_run
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use metadatacache::{ObjectStoreStorage, Storage};
/// // AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set in the environment.
/// let storage = ObjectStoreStorage::from_url(
///     "s3://my-bucket/app/meta?endpoint=http://127.0.0.1:9000&allow_http=true&timeout_ms=2000",
/// )
/// .await?;
/// storage.simple_upload("users/alice.json", "{}".into()).await?;
/// // Or through the generic opener, with everything else from AWS_* variables:
/// let storage = metadatacache::open("s3://my-bucket/app/meta").await?;
/// assert_eq!(storage.backend(), "s3");
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
///
/// # Consistency
///
/// - Create-only uploads use `PutMode::Create` (`If-None-Match: *`), `if_match`
///   uploads `PutMode::Update` (`If-Match`): the server checks them
///   atomically with the write.
/// - `if_none_match` with etags, `if_unmodified_since` and `if_match: "*"`
///   have no S3 form on PUT: the object is read (HEAD), the condition checked
///   against what was read, and the write made conditional on the etag read
///   (or create-only when absent). The write therefore happens only on the
///   very version the condition was checked against, which keeps it atomic;
///   if another writer slipped in between, the check starts over (a few times,
///   then [`ErrorKind::Aborted`]).
/// - Writes (puts and deletes) are never retried by the HTTP client: an
///   answer lost in transit (timeout, reset, 5xx) is reported as
///   [`ErrorKind::Unavailable`], meaning "may have been applied", never as the
///   precondition failure of a retry, and a late retry can never overwrite or
///   delete a newer version written meanwhile. Reads are retried a few times
///   within the timeout.
/// - Downloads with one `if_none_match` etag are conditional GETs: a 304
///   answer transfers no content.
/// - `delete_if_match` with an etag is one `DELETE` with `If-Match`,
///   checked by the server atomically with the delete (a version written
///   meanwhile is kept: [`ErrorKind::PreconditionFailed`]). `object_store`
///   0.14 cannot send that header, so this one request is presigned with the
///   store's own signer (`If-Match` bound into the signature) and sent with
///   a plain HTTP client without retries; see
///   [`with_signer`](ObjectStoreStorage::with_signer). An unconditional
///   delete reads first only to answer [`ErrorKind::NotFound`] for a
///   missing object.
/// - There are no directories: [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist)
///   is a no-op and a "directory" exists while some document lies below it.
/// - The server keeps the modification time (second resolution);
///   [`UploadRequest::mtime`] is ignored and the returned `mtime` is this
///   host's clock at the end of the write.
#[derive(Clone)]
pub struct ObjectStoreStorage {
    /// For reads and lists.
    store: Arc<dyn ObjectStore>,
    /// For writes: puts and deletes (configured without automatic retries).
    write_store: Arc<dyn ObjectStore>,
    /// Sends `DELETE` with `If-Match`; `None` when no signer was given.
    deleter: Option<ConditionalDelete>,
    /// "" or a normalised path without a trailing slash.
    prefix: String,
    backend: &'static str,
    timeout: Duration,
}

impl fmt::Debug for ObjectStoreStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The stores' Display names the service and bucket; their Debug could
        // include credentials, so it is not used.
        f.debug_struct("ObjectStoreStorage")
            .field("backend", &self.backend)
            .field("store", &format_args!("{}", self.store))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ObjectStoreStorage {
    /// Wraps any `object_store` store; every path is stored under `prefix`
    /// ("" for none). `backend_name` is what [`Storage::backend`] and errors
    /// report ("s3", "gcs", …). The timeout is 5 s (see
    /// [`with_timeout`](Self::with_timeout)).
    ///
    /// The same store serves writes. `object_store` retries some failed
    /// writes by itself (after a 5xx answer or a dropped connection), and a
    /// retried write whose first attempt was applied is reported as a
    /// precondition failure or overwrites a newer version; so pass a store
    /// configured with `max_retries: 0` for writes with
    /// [`with_write_store`](Self::with_write_store).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a prefix that is not a valid relative
    /// path (leading and trailing slashes are trimmed).
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        backend_name: &'static str,
    ) -> Result<ObjectStoreStorage> {
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_path(prefix, false).map_err(|e| {
                e.with_backend(backend_name)
                    .with_message("invalid object store prefix")
            })?;
        }
        Ok(ObjectStoreStorage {
            write_store: Arc::clone(&store),
            deleter: None,
            store,
            prefix: prefix.to_owned(),
            backend: backend_name,
            timeout: config::DEFAULT_TIMEOUT,
        })
    }

    /// Opens an S3 bucket from a URL (see the [type docs](Self) for the URL
    /// format and the environment variables). Nothing is sent to the server
    /// yet.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL when it is malformed or the
    /// client cannot be configured from it and the environment.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn from_url(url: &str) -> Result<ObjectStoreStorage> {
        Self::new(S3Config::from_url(url)?).await
    }

    /// Opens an S3 bucket as `config` describes it. Nothing is sent to the
    /// server yet.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL the config came from when
    /// the client cannot be configured.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn new(config: S3Config) -> Result<ObjectStoreStorage> {
        let store = config.build_read_store()?;
        let write_store = config.build_write_store()?;
        ObjectStoreStorage::from_store(store, &config.prefix, "s3")?
            .with_write_store(write_store.clone())
            .with_timeout(config.timeout)
            .with_signer(write_store)
    }

    /// Enables conditional deletes: `delete_if_match` with an etag sends
    /// one `DELETE` with `If-Match`, presigned by `signer` (the same bucket's
    /// store, e.g. an `AmazonS3`) and checked by the server, never retried.
    /// Without a signer, such deletes are refused: a read followed by an
    /// unconditional delete could delete a version written in between.
    /// Call it after [`with_timeout`](Self::with_timeout): the deletes use
    /// the timeout set then.
    ///
    /// # Errors
    /// [`ErrorKind::Other`] when the HTTP client cannot be set up.
    pub fn with_signer(mut self, signer: Arc<dyn Signer>) -> Result<Self> {
        self.deleter = Some(ConditionalDelete::new(signer, self.timeout).map_err(|e| self.tag(e))?);
        Ok(self)
    }

    /// Uses `store` (the same bucket and prefix, configured without
    /// automatic retries) for writes: puts and deletes.
    #[must_use]
    pub fn with_write_store(mut self, store: Arc<dyn ObjectStore>) -> Self {
        self.write_store = store;
        self
    }

    /// Bounds every call by `timeout` (a call that takes longer fails with
    /// [`ErrorKind::Unavailable`]).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key prefix ("" for none).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn tag(&self, e: Error) -> Error {
        e.with_backend(self.backend)
    }

    /// The object key of storage path `path` ("" is the prefix itself).
    fn key(&self, path: &str) -> Result<ObjectPath> {
        let key = match (self.prefix.is_empty(), path.is_empty()) {
            (true, _) => path.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{path}", self.prefix),
        };
        ObjectPath::parse(&key).map_err(|e| {
            self.tag(
                Error::invalid_input("not a valid object key")
                    .with_path(path)
                    .with_source(e),
            )
        })
    }

    /// The storage path of object key `key`, if it lies under the prefix.
    fn path_of<'a>(&self, key: &'a ObjectPath) -> Option<&'a str> {
        let key: &str = key.as_ref();
        let rel = if self.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?
        };
        validate_path(rel, false).ok().map(|()| rel)
    }

    async fn download_inner(
        &self,
        req: &DownloadRequest,
        key: &ObjectPath,
    ) -> Result<DownloadResponse> {
        let path = req.path.as_str();
        let mut opts = GetOptions::default();
        if let [etag] = req.if_none_match.as_slice()
            && etag != "*"
        {
            opts.if_none_match = Some(etag.clone());
        }
        let got = self
            .store
            .get_opts(key, opts)
            .await
            .map_err(self.map(Op::Read, path))?;
        let etag = self.etag_of(path, got.meta.e_tag.clone())?;
        let mtime = SystemTime::from(got.meta.last_modified);
        // Several etags, or "*": checked here, after the transfer.
        if req.if_none_match.iter().any(|e| *e == etag || e == "*") {
            return Err(
                self.tag(Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path))
            );
        }
        let content = got.bytes().await.map_err(self.map(Op::Read, path))?;
        Ok(DownloadResponse {
            content,
            etag,
            mtime,
            write_token: None,
        })
    }

    fn file_info(&self, path: &str, meta: ObjectMeta) -> FileInfo {
        FileInfo {
            path: path.to_owned(),
            kind: EntryKind::File,
            size: meta.size,
            mtime: Some(SystemTime::from(meta.last_modified)),
            etag: meta.e_tag,
        }
    }
}

#[async_trait]
impl Storage for ObjectStoreStorage {
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// Conditional deletes when a signer is set (always for `s3://` URLs).
    /// Etags are content hashes: they repeat.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            conditional_delete: self.deleter.is_some(),
            ..Capabilities::default()
        }
    }

    /// Checks `name` and that the bucket answers (a directory needs no
    /// creating; the bucket must exist already).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad name; [`ErrorKind::NotFound`]
    /// naming the bucket when it does not exist; [`ErrorKind::Unavailable`]
    /// or [`ErrorKind::PermissionDenied`] when it cannot be used.
    async fn init(&self, name: &str) -> Result<()> {
        validate_path(name, true).map_err(|e| self.tag(e))?;
        self.list_dir(name).await.map(drop)
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        validate_path(&req.path, false).map_err(|e| self.tag(e))?;
        let key = self.key(&req.path)?;
        let path = req.path.as_str();
        let plain = req.if_none_match.is_empty() && req.if_unmodified_since.is_none();
        self.timed(path, true, async {
            if req.is_create_only() {
                self.put(path, &key, &req, PutMode::Create).await
            } else if plain && req.if_match.is_none() {
                self.put(path, &key, &req, PutMode::Overwrite).await
            } else if plain && let Some(etag) = req.if_match.as_ref().filter(|e| *e != "*") {
                let version = UpdateVersion {
                    e_tag: Some(etag.clone()),
                    version: None,
                };
                self.put(path, &key, &req, PutMode::Update(version)).await
            } else {
                self.checked_put(path, &key, &req).await
            }
        })
        .await
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        validate_path(&req.path, false).map_err(|e| self.tag(e))?;
        let key = self.key(&req.path)?;
        self.timed(&req.path, false, self.download_inner(&req, &key))
            .await
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        validate_path(path, false).map_err(|e| self.tag(e))?;
        let key = self.key(path)?;
        if let Some(etag) = if_match.filter(|e| *e != "*") {
            let Some(deleter) = &self.deleter else {
                return Err(self.tag(
                    Error::new(
                        ErrorKind::Other,
                        "this object store has no conditional delete (see \
                         ObjectStoreStorage::with_signer); nothing was deleted",
                    )
                    .with_path(path),
                ));
            };
            return self
                .timed(path, true, async {
                    deleter
                        .delete(&key, etag)
                        .await
                        .map_err(|e| self.tag(e.with_path(path)))
                })
                .await;
        }
        self.timed(path, true, async {
            // An unconditional delete. S3 deletes a missing key silently:
            // look first, to answer NotFound.
            let current = self.head(path, &key).await?;
            let etag = current.map(|m| self.etag_of(path, m.e_tag)).transpose()?;
            check_delete_precondition(path, if_match, etag.as_deref()).map_err(|e| self.tag(e))?;
            self.write_store
                .delete(&key)
                .await
                .map_err(self.map(Op::Delete, path))
        })
        .await
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        validate_path(path, true).map_err(|e| self.tag(e))?;
        if path.is_empty() {
            return Ok(FileInfo::dir(String::new()));
        }
        let key = self.key(path)?;
        self.timed(path, false, async {
            if let Some(meta) = self.head(path, &key).await? {
                return Ok(self.file_info(path, meta));
            }
            let listed = self
                .store
                .list_with_delimiter(Some(&key))
                .await
                .map_err(self.map(Op::Read, path))?;
            if listed.objects.is_empty() && listed.common_prefixes.is_empty() {
                Err(self.tag(Error::not_found("no such document or directory").with_path(path)))
            } else {
                Ok(FileInfo::dir(path.to_owned()))
            }
        })
        .await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        validate_path(path, true).map_err(|e| self.tag(e))?;
        let key = self.key(path)?;
        self.timed(path, false, async {
            let prefix = (!key.as_ref().is_empty()).then_some(&key);
            let listed = self
                .store
                .list_with_delimiter(prefix)
                .await
                .map_err(self.map(Op::Read, path))?;
            let mut out: Vec<FileInfo> = Vec::new();
            for dir in &listed.common_prefixes {
                if let Some(p) = self.path_of(dir) {
                    out.push(FileInfo::dir(p.to_owned()));
                }
            }
            for meta in listed.objects {
                if let Some(p) = self.path_of(&meta.location).map(str::to_owned) {
                    out.push(self.file_info(&p, meta));
                }
            }
            out.sort_by(|a, b| a.path.cmp(&b.path));
            out.dedup_by(|a, b| a.path == b.path);
            Ok(out)
        })
        .await
    }

    /// A no-op: object stores have no directories; a "directory" exists
    /// while a document lies below it. Only `path` is checked.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        validate_path(path, true).map_err(|e| self.tag(e))
    }
}

//! Object storage through the `object_store` crate: S3 and S3-compatible
//! buckets, Azure Blob Storage containers, Google Cloud Storage buckets.

mod azure;
mod client;
mod config;
mod gcs;
mod read;
mod requests;
mod s3;
mod write;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::object_store::list::PaginatedListStore;
use ::object_store::signer::Signer;
use ::object_store::{ObjectStore, ObjectStoreExt, PutMode};
use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::header::IF_MATCH;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, DownloadRequest, DownloadResponse, FileInfo, Storage, UploadRequest,
    UploadResponse, check_delete_precondition, validate_path,
};
pub use azure::AzureConfig;
use client::{EtagStyle, Op};
pub use config::ObjectStoreConfig;
pub use gcs::GcsConfig;
use requests::{Requests, SignedDelete, SignerRequests};
pub use s3::S3Config;

/// Storage in an object store: an S3 or S3-compatible bucket (MinIO, R2,
/// Ceph, …), an Azure Blob Storage container or a Google Cloud Storage
/// bucket; any other `object_store` store with conditional puts can be
/// wrapped with [`ObjectStoreStorage::from_store`].
///
/// Each document is one object at `PREFIX/PATH`; its etag is the object's
/// ETag exactly as the server reports it (S3: a quoted content MD5, e.g.
/// `"\"9b2c…\""`; Azure: `"\"0x8DC…\""`), or on GCS the object's
/// generation (e.g. `"1712345678901234"`), the same from upload, download,
/// stat and list.
///
/// # URLs
///
/// - `s3://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&region=REGION&allow_http=true]`
/// - `az://CONTAINER[/PREFIX][?timeout_ms=N&endpoint=URL&account=NAME&allow_http=true]`
/// - `gs://BUCKET[/PREFIX][?timeout_ms=N&endpoint=URL&allow_http=true]`
///
/// - `PREFIX` (optional, percent-encoded) is prepended to every path.
/// - `timeout_ms` bounds every call (default 5000): a dead endpoint yields
///   [`ErrorKind::Unavailable`] within it.
/// - `endpoint`, `region`, `allow_http` override the environment. On Azure
///   the account is `account=`, else the path of a path-style endpoint
///   (Azurite: `endpoint=http://127.0.0.1:10000/devstoreaccount1`), else
///   `AZURE_STORAGE_ACCOUNT_NAME`.
/// - [`init`](Storage::init) creates the bucket or container where the
///   service lets these credentials (S3, Azure); a GCS bucket must exist.
///   Until it exists every call fails with [`ErrorKind::InvalidInput`]
///   naming the bucket — never [`ErrorKind::NotFound`], which would read
///   as a missing document (a [`Store`](crate::Store)'s `get` would answer
///   `None`).
///
/// Everything else comes from the usual environment variables, read by
/// `object_store`'s builders:
/// - S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
///   `AWS_REGION` / `AWS_DEFAULT_REGION` (default `us-east-1`),
///   `AWS_ENDPOINT` / `AWS_ENDPOINT_URL` (S3-compatible servers),
///   `AWS_ALLOW_HTTP=true`, and the other `AWS_*` options `object_store`
///   knows (web identity, container credentials, …); without credentials
///   the client asks the instance metadata service.
/// - Azure: `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, or
///   `AZURE_STORAGE_SAS_KEY`, `AZURE_STORAGE_TOKEN`, `AZURE_CLIENT_ID` /
///   `AZURE_CLIENT_SECRET` / `AZURE_TENANT_ID`, managed identity, and the
///   other `AZURE_*` options `object_store` knows.
/// - GCS: `GOOGLE_SERVICE_ACCOUNT` (a key file), `GOOGLE_SERVICE_ACCOUNT_KEY`,
///   `GOOGLE_APPLICATION_CREDENTIALS`, else the instance metadata service.
///
/// Credentials are never accepted in the URL and never printed by `Debug`;
/// in code they go into [`S3Config::credentials`],
/// [`AzureConfig::access_key`] or [`GcsConfig::service_account_key`].
///
/// ```no_run
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use metadatacache::{ObjectStoreStorage, Storage};
/// // AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set in the environment.
/// let storage = ObjectStoreStorage::from_url(
///     "s3://my-bucket/app/meta?endpoint=http://127.0.0.1:9000&allow_http=true&timeout_ms=2000",
/// )
/// .await?;
/// storage.init("").await?; // creates the bucket if it is missing
/// storage.simple_upload("users/alice.json", "{}".into()).await?;
/// // Or through the generic opener, with everything else from AZURE_* variables:
/// let storage = metadatacache::open("az://my-container/app/meta").await?;
/// assert_eq!(storage.backend(), "azure");
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
///
/// # Consistency
///
/// - Create-only uploads use `PutMode::Create` (`If-None-Match: *`; GCS:
///   `x-goog-if-generation-match: 0`), `if_match` uploads `PutMode::Update`
///   (`If-Match`; GCS: `x-goog-if-generation-match`): the server checks them
///   atomically with the write.
/// - `if_none_match` with etags, `if_unmodified_since` and `if_match: "*"`
///   have no form on PUT: the object is read (HEAD), the condition checked
///   against what was read, and the write made conditional on the version
///   read (or create-only when absent). The write therefore happens only on
///   the very version the condition was checked against, which keeps it
///   atomic; if another writer slipped in between, the check starts over (a
///   few times, then [`ErrorKind::Aborted`]).
/// - Writes (puts and deletes) are never retried by the HTTP client: an
///   answer lost in transit (timeout, reset, 5xx) is reported as
///   [`ErrorKind::Unavailable`], meaning "may have been applied", never as the
///   precondition failure of a retry, and a late retry can never overwrite or
///   delete a newer version written meanwhile. Reads are retried a few times
///   within the timeout.
/// - Downloads with one `if_none_match` etag are conditional GETs: a 304
///   answer transfers no content (GCS: a HEAD compares the generation).
/// - `delete_if_match` with an etag is one `DELETE` that the server checks
///   atomically with the delete (a version written meanwhile is kept:
///   [`ErrorKind::PreconditionFailed`]). `object_store` 0.14 cannot send
///   it, so this one request is sent by the backend itself without retries:
///   S3 `If-Match` and GCS `x-goog-if-generation-match` presigned by the
///   store's own signer with the header bound into the signature; Azure
///   `If-Match` authorized with the store's own credential through
///   `object_store`'s `AzureAuthorizer` (Shared Key signs the `If-Match`
///   value; Azure's SAS URLs cannot bind a header). See
///   [`with_signer`](ObjectStoreStorage::with_signer). An unconditional
///   delete reads first only to answer [`ErrorKind::NotFound`] for a
///   missing object.
/// - There are no directories: [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist)
///   is a no-op and a "directory" exists while some document lies below it.
///   [`list_dir`](Storage::list_dir) reads one LIST page (up to 1000
///   entries) at a time, each within the timeout, so a directory of any size
///   can be listed (a store wrapped with [`from_store`](ObjectStoreStorage::from_store)
///   lists in one call bounded by 32 timeouts, unless given
///   [`with_pages`](ObjectStoreStorage::with_pages)).
/// - The server keeps the modification time (second resolution);
///   [`UploadRequest::mtime`] is ignored and the returned `mtime` is this
///   host's clock at the end of the write.
#[derive(Clone)]
pub struct ObjectStoreStorage {
    /// For reads and lists.
    store: Arc<dyn ObjectStore>,
    /// For writes: puts and deletes (configured without automatic retries).
    write_store: Arc<dyn ObjectStore>,
    /// For listings, a page at a time; `None`: a listing is one call.
    pages: Option<Arc<dyn PaginatedListStore>>,
    /// The conditional delete and bucket creation; `None` when neither a
    /// URL nor a signer gave them.
    requests: Option<Arc<dyn Requests>>,
    /// "" or a normalised path without a trailing slash.
    prefix: String,
    backend: &'static str,
    timeout: Duration,
    /// What the etags are: ETags, or generations (GCS).
    etags: EtagStyle,
}

/// What a service's config builds: the stores, the requests they cannot
/// send, and how the storage reports itself.
struct Connected {
    read: Arc<dyn ObjectStore>,
    /// The read store, listing a page at a time.
    pages: Arc<dyn PaginatedListStore>,
    write: Arc<dyn ObjectStore>,
    requests: Arc<dyn Requests>,
    etags: EtagStyle,
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
    /// Wraps any `object_store` store: `store` for reads and listings,
    /// `write_store` (the same bucket) for puts and deletes; every path is
    /// stored under `prefix` ("" for none). `backend_name` is what
    /// [`Storage::backend`] and errors report ("s3", "minio", …). The
    /// timeout is 5 s (see [`with_timeout`](Self::with_timeout)). Etags are
    /// the store's ETags.
    ///
    /// `write_store` must not retry by itself: `object_store`'s HTTP stores
    /// retry some failed requests (after a 5xx answer or a dropped
    /// connection) unless built with `max_retries: 0`, and a resent write
    /// whose first attempt was applied comes back as a precondition failure
    /// (reported as not applied) or overwrites a newer version. A store
    /// without a network (`InMemory`, `LocalFileSystem`) may serve both.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a prefix that is not a valid relative
    /// path (leading and trailing slashes are trimmed).
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        write_store: Arc<dyn ObjectStore>,
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
            write_store,
            pages: None,
            requests: None,
            store,
            prefix: prefix.to_owned(),
            backend: backend_name,
            timeout: config::DEFAULT_TIMEOUT,
            etags: EtagStyle::ETag,
        })
    }

    /// Opens the bucket or container an `s3://`, `az://` or `gs://` URL
    /// names (see the [type docs](Self) for the forms and the environment
    /// variables). Nothing is sent to the server yet.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL when it is malformed or the
    /// client cannot be configured from it and the environment.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn from_url(url: &str) -> Result<ObjectStoreStorage> {
        Self::new(ObjectStoreConfig::from_url(url)?).await
    }

    /// Opens the bucket or container `config` describes (an
    /// [`S3Config`], [`AzureConfig`], [`GcsConfig`] or
    /// [`ObjectStoreConfig`]). Nothing is sent to the server yet.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL the config came from when
    /// the client cannot be configured.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is sent.
    pub async fn new(config: impl Into<ObjectStoreConfig>) -> Result<ObjectStoreStorage> {
        let (connected, parts, backend) = match config.into() {
            ObjectStoreConfig::S3(c) => (c.connect()?, c.parts, "s3"),
            ObjectStoreConfig::Azure(c) => (c.connect()?, c.parts, "azure"),
            ObjectStoreConfig::Gcs(c) => (c.connect()?, c.parts, "gcs"),
        };
        let mut storage = ObjectStoreStorage::from_store(
            connected.read,
            connected.write,
            &parts.prefix,
            backend,
        )?
        .with_pages(connected.pages)
        .with_timeout(parts.timeout);
        storage.requests = Some(connected.requests);
        storage.etags = connected.etags;
        Ok(storage)
    }

    /// Enables conditional deletes on a store made with
    /// [`from_store`](Self::from_store): `delete_if_match` with an etag
    /// sends one `DELETE` with `If-Match`, presigned by `signer` (the same
    /// bucket's store, e.g. an `AmazonS3`, with the header bound into the
    /// signature) and checked by the server, never retried. Without a
    /// signer, such deletes are refused: a read followed by an
    /// unconditional delete could delete a version written in between.
    /// Call it after [`with_timeout`](Self::with_timeout): the deletes use
    /// the timeout set then.
    ///
    /// # Errors
    /// [`ErrorKind::Other`] when the HTTP client cannot be set up.
    pub fn with_signer(mut self, signer: Arc<dyn Signer>) -> Result<Self> {
        let signed = SignedDelete::new(signer, IF_MATCH, self.timeout).map_err(|e| self.tag(e))?;
        self.requests = Some(Arc::new(SignerRequests(signed)));
        Ok(self)
    }

    /// Lists through `store` (the bucket of the read store, e.g. the same
    /// `AmazonS3`) one page of up to 1000 entries at a time, each page
    /// bounded by the timeout, so that a listing of any size completes.
    /// Without it a listing is one `list_with_delimiter` call, bounded by
    /// 32 timeouts in all. Stores made from a URL list by pages.
    #[must_use]
    pub fn with_pages(mut self, store: Arc<dyn PaginatedListStore>) -> Self {
        self.pages = Some(store);
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
}

#[async_trait]
impl Storage for ObjectStoreStorage {
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// Conditional deletes when the URL or a signer gave them (always for
    /// `s3://`, `az://` and `gs://` URLs). Etags are content hashes (S3),
    /// or may repeat (Azure), or are not known to be unique (GCS).
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            conditional_delete: self.requests.is_some(),
            ..Capabilities::default()
        }
    }

    /// Creates the bucket or container where the service lets these
    /// credentials (S3 CreateBucket, Azure Create Container; already there
    /// is fine), else checks that it exists. `name` is only checked: a
    /// directory needs no creating.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad name, or naming the bucket
    /// when it does not exist and could not be created (with the reason);
    /// [`ErrorKind::PermissionDenied`] or [`ErrorKind::Unavailable`] naming
    /// it when it cannot be used.
    async fn init(&self, name: &str) -> Result<()> {
        validate_path(name, true).map_err(|e| self.tag(e))?;
        let named = self.bucket_name();
        let created = match &self.requests {
            Some(requests) => self.timed(name, false, requests.create_bucket()).await,
            None => Err(Error::new(ErrorKind::Other, "no way to create buckets")),
        };
        let Err(refused) = created else {
            return Ok(());
        };
        match self.list_dir(name).await {
            Ok(_) => Ok(()),
            // A valid name's listing is refused as input only for a
            // missing bucket.
            Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound) => {
                Err(self
                    .tag(Error::invalid_input(format!(
                        "{named} does not exist and cannot be created here"
                    )))
                    .with_source(refused))
            }
            Err(e) => {
                let message = format!("{named} cannot be used: {}", e.message());
                Err(e.with_message(message))
            }
        }
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
                let version = self.version_of(etag);
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
            let Some(requests) = &self.requests else {
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
                    requests
                        .delete_if_match(&key, etag)
                        .await
                        .map_err(|e| self.named(self.tag(e.with_path(path))))
                })
                .await;
        }
        self.timed(path, true, async {
            // An unconditional delete. S3 deletes a missing key silently:
            // look first, to answer NotFound.
            let current = self.head_in_bucket(path, &key).await?;
            let etag = current
                .map(|m| self.etag_of(path, self.etag_in(&m)))
                .transpose()?;
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
            // A directory: anything below it. The first object is enough
            // (one request, however large the directory).
            let first = self.store.list(Some(&key)).next().await;
            match first.transpose().map_err(self.map(Op::Read, path))? {
                Some(_) => Ok(FileInfo::dir(path.to_owned())),
                None => {
                    Err(self.tag(Error::not_found("no such document or directory").with_path(path)))
                }
            }
        })
        .await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        validate_path(path, true).map_err(|e| self.tag(e))?;
        let key = self.key(path)?;
        let (dirs, objects) = self.list(path, &key).await?;
        let mut out: Vec<FileInfo> = Vec::new();
        for dir in &dirs {
            if let Some(p) = self.path_of(dir) {
                out.push(FileInfo::dir(p.to_owned()));
            }
        }
        for meta in objects {
            if let Some(p) = self.path_of(&meta.location).map(str::to_owned) {
                out.push(self.file_info(&p, meta));
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out.dedup_by(|a, b| a.path == b.path);
        Ok(out)
    }

    /// A no-op: object stores have no directories; a "directory" exists
    /// while a document lies below it. Only `path` is checked.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        validate_path(path, true).map_err(|e| self.tag(e))
    }
}

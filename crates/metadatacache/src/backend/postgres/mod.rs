//! PostgreSQL storage: one table of (path, content, etag, mtime), and a
//! trigger that reports its changes with NOTIFY.

mod config;

pub use self::config::PostgresConfig;
mod client;
mod listen;
mod many;
mod sql;
mod tls;
mod write;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_postgres::Row;

use self::client::{Conn, Failure, Params, retry_read, to_error};
use self::sql::{Sql, below};
use self::tls::Tls;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, EntryKind, FileInfo, Storage,
    UploadRequest, UploadResponse, join, new_write_token, validate_path,
};

const BACKEND: &str = "postgres";

/// Storage in one PostgreSQL table.
///
/// # URL
///
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE?table=NAME&timeout_ms=N&pool_size=N`
/// (`postgresql://` works too). Our own parameters:
///
/// - `table` — the table (default `metadatacache`); a plain identifier
///   `[A-Za-z_][A-Za-z0-9_]{0,62}`;
/// - `timeout_ms` — the bound of every call, including waiting for and
///   opening a connection (default 5000); also the connect timeout unless
///   `connect_timeout` is given;
/// - `pool_size` — connections kept open (default 10). Every replica
///   keeps its own pool, and the server runs a process per connection:
///   size the sum to the server's cores, not to the callers' tasks (on a
///   2-core server, 4 replicas of 3 connections each wrote 10–25 % more
///   than 4 of 10, see BENCHMARKS.md).
///
/// libpq's TLS parameters, for every connection (the pool's, the listening
/// connections of change streams, and cancel requests), with rustls:
///
/// - `sslmode` — `disable`: plain text. `prefer` (the default, as in
///   libpq): TLS when the server offers it, plain text when it has TLS off;
///   unlike libpq, a TLS handshake that fails is not retried in plain text.
///   `require`: TLS or fail. With these two, the server's certificate is
///   not checked, unless `sslrootcert` is given: then its chain is, as
///   libpq does. `verify-ca`: TLS, the certificate must chain to
///   `sslrootcert` (required), whatever host name it is for.
///   `verify-full`: that, and the certificate must be valid for the host
///   name (or address) connected to. libpq's `allow` is refused.
/// - `sslrootcert` — the CA file (PEM). libpq's default
///   `~/.postgresql/root.crt` is not read, and `system` is refused.
/// - `sslcert`, `sslkey` — a client certificate and its key (PEM),
///   together; no `~/.postgresql/postgresql.crt` default.
///
/// A missing or unusable file is [`ErrorKind::InvalidInput`] naming it,
/// before any connection is made. A handshake that fails (a certificate
/// not trusted or for another host, a client certificate refused, a server
/// without TLS for `require`) is [`ErrorKind::PermissionDenied`] with one
/// line that says it is a TLS problem and names the URL; so is a server that
/// takes only TLS connections (`hostssl`) reached with `sslmode=disable`.
///
/// Without a password in the URL (`user:password@` or `password=`), the
/// one in the environment variable `PGPASSWORD` is used, as libpq does.
/// Every other query parameter (`application_name`, `options`, `host` for a
/// Unix socket directory, …) goes to the driver as in libpq.
///
/// # Table and semantics
///
/// `path TEXT COLLATE "C" PRIMARY KEY, content BYTEA, etag TEXT, mtime
/// TIMESTAMPTZ`, created by [`new`](PostgresStorage::new) and again
/// by [`init`](Storage::init) if missing (several processes may do this at
/// once). Each write is one statement, so its preconditions hold atomically
/// against every other client: create-only is `INSERT … ON CONFLICT DO
/// NOTHING`, `if_match` is `UPDATE … WHERE etag = $etag`, `if_none_match`
/// etags and `if_unmodified_since` are part of the `WHERE` clause.
///
/// Etags are 128-bit values chosen by the writer, so every write gets a new
/// etag, also when the content is unchanged: the request's
/// [`write_token`](crate::UploadRequest::write_token) when it has one (a
/// [`Store`](crate::Store) always sends one), else a fresh one made the same
/// way ([`new_write_token`](crate::new_write_token)). A download reports the
/// etag as the version's write token. Because an etag is unique to the
/// write that made it, a write whose reply was lost is looked up once, with
/// a fresh timeout: finding its etag stored proves it was applied.
/// Otherwise such a write fails with [`ErrorKind::Unavailable`]: it may or
/// may not have been applied (and a [`Store`](crate::Store) then settles it
/// by resending the same write).
///
/// Besides the table, [`new`](PostgresStorage::new) creates (once, under an
/// advisory lock) its triggers `mdcache_notify_v3` and
/// `mdcache_notify_v3_truncate`, the table `mdcache_watchers` and the
/// functions `mdcache_notify_v3` and `mdcache_watch_v2`. While a session
/// watches the table, each committed change sends
/// `pg_notify('mdcache_<table>', …)` with the path and new etag (none is
/// sent while none does). [`watch`](Storage::watch) listens on that
/// channel over one connection of its own per stream, outside the pool,
/// reconnecting after an outage.
///
/// Directories are not stored: a directory exists while a document lies
/// under it, and [`make_dir_if_not_exist`](Storage::make_dir_if_not_exist)
/// is a no-op. A new document may not sit at a directory or below a
/// document ([`ErrorKind::InvalidInput`]); this is checked in the insert
/// statement itself, which closes all but a narrow race between two
/// concurrent first writes of a path and a path below it.
///
/// Connections come from a pool; one that timed out or failed is dropped, so
/// after the server restarts the same storage object works again.
///
/// ```no_run
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use metadatacache::{PostgresStorage, Storage};
/// let storage =
///     PostgresStorage::from_url("postgres://app@127.0.0.1:5432/app?table=documents&timeout_ms=2000")
///         .await?;
/// storage.simple_upload("users/alice.json", "{}".into()).await?;
/// assert_eq!(storage.read_dir("users").await?, vec!["users/alice.json".to_string()]);
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct PostgresStorage {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// How to open the listening connection of a change stream.
    pg: tokio_postgres::Config,
    /// The TLS of every connection (the pool's, listening ones, cancels).
    tls: Tls,
    sql: Sql,
    table: String,
    timeout: Duration,
    redacted_url: String,
}

impl fmt::Debug for PostgresStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStorage")
            .field("url", &self.inner.redacted_url)
            .field("table", &self.inner.table)
            .field("timeout", &self.inner.timeout)
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

fn tag(e: Error, path: &str) -> Error {
    e.with_backend(BACKEND).with_path(path)
}

impl PostgresStorage {
    /// Connects to the server a `postgres://` URL names and creates the table
    /// if it is missing. See the type's documentation for the URL.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming the URL (password hidden) when it
    /// is malformed, or naming a certificate file that is missing or
    /// unusable; [`ErrorKind::Unavailable`] when the server cannot be
    /// reached within the timeout; [`ErrorKind::PermissionDenied`] when it
    /// refuses the login, TLS fails, or the table cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe: a table half-created by a cancelled call is rolled
    /// back by the server.
    pub async fn from_url(url: &str) -> Result<PostgresStorage> {
        Self::new(PostgresConfig::from_url(url)?).await
    }

    /// Connects as `config` says and creates the table if it is missing.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] naming a certificate file that is missing
    /// or unusable; [`ErrorKind::Unavailable`] when the server cannot be
    /// reached within the timeout; [`ErrorKind::PermissionDenied`] when it
    /// refuses the login, TLS fails, or the table cannot be created.
    ///
    /// # Cancel safety
    /// Cancel safe: a table half-created by a cancelled call is rolled
    /// back by the server.
    pub async fn new(settings: PostgresConfig) -> Result<PostgresStorage> {
        let tls = tls::connector(&settings.tls).map_err(|e| e.with_backend(BACKEND))?;
        let pool = client::pool(&settings, tls.clone()).map_err(|e| e.with_backend(BACKEND))?;
        let storage = PostgresStorage {
            inner: Arc::new(Inner {
                pool,
                pg: settings.pg,
                tls,
                sql: Sql::new(&settings.table),
                table: settings.table,
                timeout: settings.timeout,
                redacted_url: settings.redacted,
            }),
        };
        storage.ensure_schema().await?;
        Ok(storage)
    }

    /// The table this storage uses.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The bound of every call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.timeout
    }

    fn fail(&self, failure: Failure, write_in_flight: bool, path: &str) -> Error {
        let e = to_error(failure, write_in_flight, self.inner.timeout);
        let e = if e.message().starts_with("TLS") {
            let message = format!("{} (at {})", e.message(), self.inner.redacted_url);
            e.with_message(message)
        } else {
            e
        };
        tag(e, path)
    }

    fn new_etag(&self) -> String {
        new_write_token()
    }

    async fn ensure_schema(&self) -> Result<()> {
        let deadline = self.deadline();
        let run = async {
            let mut conn = Conn::get(&self.inner.pool, &self.inner.tls, deadline).await?;
            conn.batch(deadline, &self.inner.sql.schema).await
        };
        match run.await {
            Ok(()) => Ok(()),
            // Two sessions creating the table at once: the loser fails on
            // the catalog's unique index (23505), on the table's row type
            // (42710) or finds the relation (42P07). Either way the winner
            // has committed and the table now exists.
            Err(Failure::Pg(e))
                if e.code()
                    .is_some_and(|c| matches!(c.code(), "23505" | "42710" | "42P07")) =>
            {
                Ok(())
            }
            Err(f) => {
                let e = to_error(f, false, self.inner.timeout);
                let message = format!(
                    "{} (table {:?} at {})",
                    e.message(),
                    self.inner.table,
                    self.inner.redacted_url
                );
                Err(e.with_message(message).with_backend(BACKEND))
            }
        }
    }

    /// A read-only statement, tried once more on a fresh connection when
    /// the pooled one turns out dead.
    async fn read(
        &self,
        deadline: Instant,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Failure> {
        let mut retried = false;
        loop {
            let res = async {
                let mut conn = Conn::get(&self.inner.pool, &self.inner.tls, deadline).await?;
                conn.query(deadline, sql, params).await
            }
            .await;
            match res {
                Err(f) if !retried && retry_read(&f, deadline) => retried = true,
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Storage for PostgresStorage {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    /// Etags are chosen by the writer, unique to each write: the write
    /// token when the request has one (so it is stored with the version),
    /// else a fresh value. Deletes check `if_match` in their statement.
    /// Changes are reported by the table's trigger, with NOTIFY.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            notifications: true,
            combined_calls: true,
            current_on_conflict: true,
            ..Capabilities::VERSIONED
        }
    }

    /// Listens for the table's notifications on a connection of its own;
    /// each insert or update is reported with its new etag, each delete
    /// without one.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad prefix;
    /// [`ErrorKind::Unavailable`] when the server cannot be reached within
    /// the timeout; [`ErrorKind::PermissionDenied`] when it refuses the
    /// login.
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        self.subscribe(prefix).await
    }

    /// Checks `name` and ensures the table exists (idempotent); a
    /// directory needs no creating.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad name;
    /// [`ErrorKind::Unavailable`] when the server cannot be reached;
    /// [`ErrorKind::PermissionDenied`] when the table cannot be created.
    async fn init(&self, name: &str) -> Result<()> {
        validate_path(name, true).map_err(|e| e.with_backend(BACKEND))?;
        self.ensure_schema().await
    }

    /// Writes a document in one statement that also checks the
    /// preconditions; a refused create or `if_match` update returns, in the
    /// same statement, the version that refused it.
    ///
    /// # Errors
    /// As [`Storage::upload`]; [`ErrorKind::InvalidInput`] when a directory
    /// or a parent document is in the way; [`ErrorKind::Aborted`] when the
    /// document changed between the write and the check of why it failed.
    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        self.write(req).await
    }

    /// Plain compare-and-swap updates in one statement (up to 128, 4 MiB).
    async fn upload_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        self.write_many(reqs).await
    }

    /// Reads with at most one `if_none_match` etag in one statement.
    async fn download_many(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        self.read_many(reqs).await
    }

    /// Reads a document; a matching `if_none_match` makes the server leave
    /// the content out of its reply.
    ///
    /// # Errors
    /// As [`Storage::download`]; [`ErrorKind::Unavailable`] when the server
    /// does not answer within the timeout.
    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        validate_path(&req.path, false).map_err(|e| e.with_backend(BACKEND))?;
        let path = req.path.as_str();
        let rows = self
            .read(
                self.deadline(),
                &self.inner.sql.download,
                &[&path, &req.if_none_match],
            )
            .await
            .map_err(|f| self.fail(f, false, path))?;
        let Some(row) = rows.first() else {
            return Err(tag(Error::not_found("no such document"), path));
        };
        let decode = || {
            Ok::<_, tokio_postgres::Error>((
                row.try_get::<_, String>(0)?,
                row.try_get::<_, SystemTime>(1)?,
                row.try_get::<_, Option<Vec<u8>>>(2)?,
            ))
        };
        match decode() {
            Ok((etag, mtime, Some(content))) => Ok(write::response(etag, mtime, content)),
            Ok((_, _, None)) => Err(tag(
                Error::new(ErrorKind::NotModified, "etag unchanged"),
                path,
            )),
            Err(e) => Err(self.fail(Failure::Pg(e), false, path)),
        }
    }

    /// Deletes a document in one statement that also checks `if_match`,
    /// and that returns the etag which refused it.
    ///
    /// # Errors
    /// As [`Storage::delete_if_match`]; [`ErrorKind::Unavailable`] when the
    /// outcome is unknown.
    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        self.remove(path, if_match).await
    }

    /// Describes a document, or a directory when documents lie under `path`.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when neither exists.
    async fn stat(&self, path: &str) -> Result<FileInfo> {
        validate_path(path, true).map_err(|e| e.with_backend(BACKEND))?;
        if path.is_empty() {
            return Ok(FileInfo::dir(String::new()));
        }
        let (lo, hi) = below(path);
        let rows = self
            .read(self.deadline(), &self.inner.sql.stat, &[&path, &lo, &hi])
            .await
            .map_err(|f| self.fail(f, false, path))?;
        let decode = |row: &Row| {
            Ok::<_, tokio_postgres::Error>((
                row.try_get::<_, Option<String>>(0)?,
                row.try_get::<_, Option<SystemTime>>(1)?,
                row.try_get::<_, Option<i64>>(2)?,
                row.try_get::<_, bool>(3)?,
            ))
        };
        match rows.first().map(decode) {
            Some(Ok((Some(etag), mtime, size, _))) => {
                Ok(file_info(path.to_owned(), etag, size, mtime))
            }
            Some(Ok((None, _, _, true))) => Ok(FileInfo::dir(path.to_owned())),
            Some(Ok(_)) | None => Err(tag(Error::not_found("no such document or directory"), path)),
            Some(Err(e)) => Err(self.fail(Failure::Pg(e), false, path)),
        }
    }

    /// Lists the direct children of `path`, sorted; the server sends names,
    /// sizes and etags, never contents.
    ///
    /// # Errors
    /// [`ErrorKind::Unavailable`] when the server does not answer.
    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        validate_path(path, true).map_err(|e| e.with_backend(BACKEND))?;
        let deadline = self.deadline();
        let sql = &self.inner.sql;
        let rows = if path.is_empty() {
            self.read(deadline, &sql.list_root, &[]).await
        } else {
            let (lo, hi) = below(path);
            // `substr` counts characters; `lo` is at most 1025 bytes.
            let start = i32::try_from(lo.chars().count() + 1).unwrap_or(i32::MAX);
            self.read(deadline, &sql.list_dir, &[&lo, &hi, &start])
                .await
        }
        .map_err(|f| self.fail(f, false, path))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let decode = || {
                Ok::<_, tokio_postgres::Error>((
                    row.try_get::<_, String>(0)?,
                    row.try_get::<_, Option<String>>(1)?,
                    row.try_get::<_, Option<i64>>(2)?,
                    row.try_get::<_, Option<SystemTime>>(3)?,
                ))
            };
            let (name, etag, size, mtime) =
                decode().map_err(|e| self.fail(Failure::Pg(e), false, path))?;
            let child = join(path, &name);
            // A document and a directory at one path (only possible after
            // the placement race) is shown as the document.
            out.push(match etag {
                Some(etag) => file_info(child, etag, size, mtime),
                None => FileInfo::dir(child),
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// A no-op: directories exist while documents lie under them.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for a bad path.
    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        validate_path(path, true).map_err(|e| e.with_backend(BACKEND))
    }
}

fn file_info(path: String, etag: String, size: Option<i64>, mtime: Option<SystemTime>) -> FileInfo {
    FileInfo {
        path,
        kind: EntryKind::File,
        size: size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
        mtime,
        etag: Some(etag),
    }
}

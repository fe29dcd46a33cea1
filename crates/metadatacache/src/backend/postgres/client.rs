//! Connections from the pool, deadlines, and the one mapping of driver
//! errors to [`ErrorKind`]s.

use std::time::Duration;

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio::time::{Instant, timeout_at};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::backend::tls::explain;
use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind};

use super::config::PostgresConfig;
use super::tls::Tls;

/// Statement parameters.
pub(super) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// What went wrong talking to the server, before it becomes an [`Error`].
#[derive(Debug)]
pub(super) enum Failure {
    /// Getting a connection from the pool failed: nothing was sent.
    Pool(PoolError),
    /// A statement failed (or its reply could not be decoded).
    Pg(tokio_postgres::Error),
    /// The call's deadline passed.
    Timeout,
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

/// The TLS failure in `failure`, in one line; `None` for any other.
fn tls_failure(failure: &Failure) -> Option<String> {
    match failure {
        Failure::Pool(PoolError::Backend(e)) | Failure::Pg(e) => explain(e),
        _ => None,
    }
}

/// THE mapping of driver failures to error kinds.
///
/// - a failed TLS handshake (an untrusted certificate, a server without
///   TLS) → `PermissionDenied`: it happens before any statement is sent,
///   and trying again cannot help;
/// - deadline passed, pool wait/create/recycle timeouts, a closed pool or
///   connection, I/O and connect errors, SQLSTATE classes 08 (connection),
///   53 (insufficient resources) and 57 (shutdown, cancel) → `Unavailable`;
/// - SQLSTATE class 28 (authorization) and 42501 (insufficient privilege)
///   → `PermissionDenied`;
/// - 40001 (serialization) and 40P01 (deadlock) → `Aborted`;
/// - 53300 (too many connections, at login) → `TooEarly`;
/// - any failure that is not an error reported by the server while a write
///   was in flight (`write_in_flight`) → `Unavailable`: the write may or may
///   not have been applied;
/// - everything else → `Other`.
pub(super) fn classify(failure: &Failure, write_in_flight: bool) -> ErrorKind {
    if tls_failure(failure).is_some() {
        return ErrorKind::PermissionDenied;
    }
    let e = match failure {
        Failure::Timeout => return ErrorKind::Unavailable,
        Failure::Pool(PoolError::Backend(e)) => e,
        Failure::Pool(PoolError::Timeout(_) | PoolError::Closed) => return ErrorKind::Unavailable,
        Failure::Pool(_) => return ErrorKind::Other,
        Failure::Pg(e) => e,
    };
    if let Some(state) = e.code() {
        let code = state.code();
        return match code {
            _ if code.starts_with("28") || code == "42501" => ErrorKind::PermissionDenied,
            "40001" | "40P01" => ErrorKind::Aborted,
            // Too many connections: refused at login, nothing was sent.
            "53300" if !write_in_flight => ErrorKind::TooEarly,
            _ if ["08", "53", "57"].iter().any(|c| code.starts_with(c)) => ErrorKind::Unavailable,
            _ => ErrorKind::Other,
        };
    }
    if write_in_flight && matches!(failure, Failure::Pg(_)) {
        return ErrorKind::Unavailable;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return ErrorKind::Unavailable;
        }
        source = s.source();
    }
    // The driver's error kinds are private; these are its messages for a
    // dead or unreachable server and for a refused login.
    let text = e.to_string();
    if e.is_closed()
        || text.starts_with("error connecting to server")
        || text.starts_with("error communicating with the server")
        || text.starts_with("timeout waiting for server")
    {
        ErrorKind::Unavailable
    } else if text.starts_with("authentication error") {
        ErrorKind::PermissionDenied
    } else {
        ErrorKind::Other
    }
}

/// A message for a failure of `kind`.
pub(super) fn to_error(failure: Failure, write_in_flight: bool, timeout: Duration) -> Error {
    let kind = classify(&failure, write_in_flight);
    let ambiguous = if write_in_flight && kind == ErrorKind::Unavailable {
        "; the write may or may not have been applied"
    } else {
        ""
    };
    if let Some(why) = tls_failure(&failure) {
        return match failure {
            Failure::Pool(e) => Error::new(kind, why).with_source(e),
            Failure::Pg(e) => Error::new(kind, why).with_source(e),
            Failure::Timeout => no_answer(timeout, write_in_flight),
        };
    }
    match failure {
        Failure::Timeout => no_answer(timeout, write_in_flight),
        Failure::Pool(PoolError::Backend(e)) if e.as_db_error().is_some() => {
            let message = server_message(&e, "");
            Error::new(kind, message).with_source(e)
        }
        Failure::Pool(e) => Error::new(kind, "cannot get a database connection").with_source(e),
        Failure::Pg(e) => {
            let message = match e.as_db_error() {
                Some(_) => server_message(&e, ambiguous),
                None => format!("statement failed{ambiguous}"),
            };
            Error::new(kind, message).with_source(e)
        }
    }
}

/// The server's own words, more useful than "db error"; a refused login
/// that is about TLS says so first.
fn server_message(e: &tokio_postgres::Error, ambiguous: &str) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let (code, text) = (db.code().code(), db.message());
    let prefix = if !code.starts_with("28") {
        ""
    } else if text.contains("no encryption") {
        "TLS problem: the server takes only TLS connections, and this one was plain text \
         (sslmode=disable): "
    } else if text.contains("certificate") {
        "TLS certificate problem: "
    } else {
        ""
    };
    format!("{prefix}{code}: {text}{ambiguous}")
}

/// True when the connection a failure came from must not be used again.
fn breaks_connection(failure: &Failure) -> bool {
    match failure {
        Failure::Timeout | Failure::Pool(_) => true,
        Failure::Pg(e) => {
            e.is_closed()
                || e.code().is_none_or(|c| {
                    let c = c.code();
                    c.starts_with("08") || c.starts_with("57")
                })
        }
    }
}

/// The pool of connections that `config` describes, each made with `tls`.
/// No connection is made here.
pub(super) fn pool(config: &PostgresConfig, tls: Tls) -> Result<Pool, Error> {
    let manager = Manager::from_config(
        config.pg.clone(),
        tls,
        ManagerConfig {
            // A connection closed by the server is noticed by the driver
            // and replaced here; one that fails silently is dropped by
            // `Conn` after its first failure.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.pool_size)
        .wait_timeout(Some(config.timeout))
        .create_timeout(Some(config.timeout))
        .recycle_timeout(Some(config.timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| {
            Error::new(ErrorKind::Other, "cannot build the connection pool").with_source(e)
        })
}

/// A pooled connection; dropped from the pool instead of returned to it once
/// a statement on it timed out or hit a connection error, so that the next
/// call gets a fresh one (the server may have restarted).
pub(super) struct Conn {
    object: Option<Object>,
    broken: bool,
    /// For cancel requests, which open a connection of their own.
    tls: Tls,
}

impl Conn {
    /// A connection from `pool` (whose connections use `tls`), waiting no
    /// longer than `deadline`.
    pub(super) async fn get(pool: &Pool, tls: &Tls, deadline: Instant) -> Result<Conn, Failure> {
        match timeout_at(deadline, pool.get()).await {
            Ok(Ok(object)) => Ok(Conn {
                object: Some(object),
                broken: false,
                tls: tls.clone(),
            }),
            Ok(Err(e)) => Err(Failure::Pool(e)),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Runs a (cached) prepared statement before `deadline`.
    pub(super) async fn query(
        &mut self,
        deadline: Instant,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Failure> {
        self.run(deadline, async |client: &Object| {
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        })
        .await
    }

    /// Runs SQL text with the simple protocol before `deadline`.
    pub(super) async fn batch(&mut self, deadline: Instant, sql: &str) -> Result<(), Failure> {
        self.run(deadline, async |client: &Object| {
            client.batch_execute(sql).await
        })
        .await
    }

    /// Runs `op` on the connection before `deadline`: past it, the server is
    /// asked to cancel; a failure that breaks the connection marks it so
    /// that it is not returned to the pool.
    async fn run<T>(
        &mut self,
        deadline: Instant,
        op: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Failure> {
        let Some(client) = self.object.as_ref() else {
            return Err(Failure::Timeout);
        };
        let res = match timeout_at(deadline, op(client)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => Failure::Pg(e),
            Err(_) => {
                cancel(client, self.tls.clone());
                Failure::Timeout
            }
        };
        self.broken |= breaks_connection(&res);
        Err(res)
    }
}

/// Asks the server, in the background, to cancel what the connection is
/// running: a statement we stopped waiting for (say, blocked on a lock)
/// should not be applied long after we reported it as unknown. Best effort
/// and racy — the caller still reports the outcome as unknown.
fn cancel(client: &tokio_postgres::Client, tls: Tls) {
    let token = client.cancel_token();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CANCEL_TIMEOUT, token.cancel_query(tls)).await;
    });
}

/// How long a background cancel request may take.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for Conn {
    fn drop(&mut self) {
        if self.broken
            && let Some(object) = self.object.take()
        {
            // Detach it from the pool; dropping the client ends its
            // connection task.
            drop(Object::take(object));
        }
    }
}

/// Whether a failed read is worth one more try on a fresh connection: the
/// connection it used was dead (e.g. the server restarted since it was
/// opened) and the deadline has not passed.
pub(super) fn retry_read(failure: &Failure, deadline: Instant) -> bool {
    matches!(failure, Failure::Pg(_))
        && breaks_connection(failure)
        && classify(failure, false) == ErrorKind::Unavailable
        && Instant::now() < deadline
}

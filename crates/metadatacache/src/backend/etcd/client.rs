//! Running one transaction against etcd: the timeout, lazy authentication,
//! failing over between endpoints, and the mapping of driver errors.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, Txn, TxnOpResponse, TxnResponse, WatchOptions, WatchStream,
    Watcher,
};

use crate::backend::tls::explain;
use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind, Result};

use super::BACKEND;
use super::config::EtcdConfig;
use super::tls::{self, Tls};

/// Largest response accepted (directory listings carry every document
/// below the directory).
const MAX_RESPONSE: usize = 64 << 20;

/// etcd's messages for a wrong or missing user or password.
const AUTH_MESSAGES: [&str; 4] = [
    "authentication failed",
    "user name is empty",
    "user name not found",
    "permission denied",
];

/// etcd's message when it sheds load before proposing a request.
const TOO_MANY_REQUESTS: &str = "too many requests";

/// The driver's message for a connection that could not be opened (refused,
/// unreachable): the request was never sent.
const CONNECT_FAILED: &str = "tcp connect error";

/// The longest wait between two tries of a request that found an endpoint
/// dead.
const MAX_FAILOVER_DELAY: Duration = Duration::from_millis(50);

/// gRPC status codes (the numbers are fixed by the gRPC specification).
mod code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// A connected client plus what it needs to stay usable: its timeout and
/// the credentials to sign in again when the server forgot the token (it
/// does on every restart and after the token's TTL).
pub(super) struct Conn {
    client: Client,
    timeout: Duration,
    /// `http(s)://host:port` of each endpoint.
    endpoints: Vec<String>,
    tls: Option<Tls>,
    credentials: Option<(String, String)>,
    /// False while the client holds no token, or one etcd rejected.
    signed_in: AtomicBool,
    /// Counts sign-ins, so that a request rejected with an older token does
    /// not throw away a newer one.
    epoch: AtomicU64,
    /// Serialises sign-ins so that a restart does not cause a stampede.
    auth_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("timeout", &self.timeout)
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Builds the client, reading the certificate files. No network
    /// traffic: connections are made lazily, and re-made after they break,
    /// by the first call that needs one.
    pub(super) async fn new(config: &EtcdConfig) -> Result<Conn> {
        let tls = match &config.tls {
            Some(files) => Some(tls::load(files, config.timeout)?),
            None => None,
        };
        let mut options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(10), config.timeout)
            .with_keep_alive_while_idle(false)
            .with_tcp_keepalive(Duration::from_secs(30))
            // A member cut off from its leader cancels the watches (and
            // fails the calls) of this client, instead of keeping a watch
            // open that hears nothing while the others commit.
            .with_require_leader(true);
        if let Some(tls) = &tls {
            options = options.with_tls(tls.options.clone());
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| map_error(e).with_message("cannot set up the etcd client"))?;
        Ok(Conn {
            client,
            timeout: config.timeout,
            endpoints: config.endpoints.clone(),
            tls,
            credentials: config.credentials.clone(),
            signed_in: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            auth_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The bound on every call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `txn` within the timeout. Errors carry the backend and `path`.
    ///
    /// A call that times out or loses its connection is
    /// [`ErrorKind::Unavailable`]: for a write that means it may have been
    /// applied.
    pub(super) async fn txn(&self, path: &str, txn: Txn, write: bool) -> Result<TxnResponse> {
        let attempt = self.signed_in_call(write, |client| {
            let txn = txn.clone();
            async move {
                let mut kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE);
                kv.txn(txn).await
            }
        });
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(res) => res,
            Err(_) => Err(no_answer(self.timeout, write)),
        }
        .map_err(|e| e.with_backend(BACKEND).with_path(path))
    }

    /// Opens a watch of every key starting with `key`, from the revision
    /// after the one current now, within the timeout: every change made
    /// after this call began is reported on the stream.
    pub(super) async fn watch(&self, key: &str) -> Result<(Watcher, WatchStream)> {
        let attempt = async {
            let count = GetOptions::new().with_prefix().with_count_only();
            let now = self
                .signed_in_call(false, |client| {
                    let (key, count) = (key.to_owned(), count.clone());
                    async move { client.kv_client().get(key, Some(count)).await }
                })
                .await?;
            let revision = now.header().map_or(0, |h| h.revision());
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            self.signed_in_call(false, |client| {
                let (key, options) = (key.to_owned(), options.clone());
                async move {
                    let mut watch = client
                        .watch_client()
                        .max_decoding_message_size(MAX_RESPONSE);
                    watch.watch(key, Some(options)).await
                }
            })
            .await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(res) => res,
            Err(_) => Err(no_answer(self.timeout, false)),
        }
        .map_err(|e| e.with_backend(BACKEND))
    }

    /// Runs `call` with a signed-in client (when there are credentials).
    /// A rejected token means the request was not executed, so it is safe
    /// to sign in again and send it once more. `write`: the call changes
    /// something (see [`fail`](Self::fail)).
    async fn signed_in_call<T, F, Fut>(&self, write: bool, mut call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        for retry in [true, false] {
            let epoch = self.sign_in().await?;
            match self.failing_over(&mut call).await {
                Ok(value) => return Ok(value),
                Err(e) if retry && self.credentials.is_some() && token_rejected(&e) => {
                    // Unless another task has signed in since.
                    if self.epoch.load(Ordering::SeqCst) == epoch {
                        self.signed_in.store(false, Ordering::SeqCst);
                    }
                }
                Err(e) => return Err(self.fail(e, write).await),
            }
        }
        Err(Error::new(
            ErrorKind::PermissionDenied,
            "etcd rejected a fresh auth token",
        ))
    }

    /// Runs `call`, and again while it fails because the endpoint it was
    /// sent to cannot be connected to (the request never left), for up to
    /// three quarters of the timeout (the rest is for the call that gets
    /// through), when there are other endpoints to try: the client spreads
    /// requests over every endpoint, and keeps trying a dead one, so a
    /// call may find dead ones many times in a row on a busy machine.
    async fn failing_over<T, F, Fut>(
        &self,
        call: &mut F,
    ) -> std::result::Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let give_up = tokio::time::Instant::now() + self.timeout * 3 / 4;
        let mut delay = Duration::from_millis(1);
        loop {
            match call(self.client.clone()).await {
                Err(e)
                    if self.endpoints.len() > 1
                        && never_sent(&e)
                        && tokio::time::Instant::now() + delay < give_up =>
                {
                    tracing::debug!(error = %e, "etcd: an endpoint is unreachable; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_FAILOVER_DELAY);
                }
                done => return done,
            }
        }
    }

    /// The error for a failed call: a TLS failure (found in the driver's
    /// error, or by a probe when a server closed the connection at once)
    /// names the endpoints and the certificate files.
    ///
    /// A probe speaks of the servers as they are now (any of them), not of
    /// the connection that closed under the call: a `write` cut off so may
    /// have been applied before (a server that committed it and restarted,
    /// say), so it stays [`ErrorKind::Unavailable`], with what the probe
    /// found in its message.
    async fn fail(&self, e: etcd_client::Error, write: bool) -> Error {
        let (explanation, probed) = match tls_failure(&e) {
            Some(why) => (Some(tls::refine(why, self.tls.as_ref())), false),
            None if closed_by_server(&e) => {
                let found = tls::probe(&self.endpoints, self.tls.as_ref(), self.timeout / 4).await;
                (found, true)
            }
            None => (None, false),
        };
        let Some(why) = explanation else {
            return map_error(e);
        };
        let context = format!(
            "endpoints {}; {}",
            self.endpoints.join(","),
            tls::describe(self.tls.as_ref())
        );
        if write && probed {
            let message = format!(
                "etcd closed the connection under a write, which may or may not have been \
                 applied; a check of the endpoints found: {why} ({context})"
            );
            return Error::new(ErrorKind::Unavailable, message).with_source(e);
        }
        Error::new(ErrorKind::PermissionDenied, format!("{why} ({context})")).with_source(e)
    }

    /// Signs in unless the client holds a token that was not rejected yet;
    /// returns the token's epoch.
    async fn sign_in(&self) -> Result<u64> {
        let Some((user, password)) = &self.credentials else {
            return Ok(0);
        };
        if self.signed_in.load(Ordering::SeqCst) {
            return Ok(self.epoch.load(Ordering::SeqCst));
        }
        let _guard = self.auth_lock.lock().await;
        if self.signed_in.load(Ordering::SeqCst) {
            return Ok(self.epoch.load(Ordering::SeqCst));
        }
        let mut auth = self.client.auth_client();
        // The client sends its token with every request, the sign-in too,
        // and etcd refuses a sign-in that carries a stale token.
        auth.remove_client_auth();
        let signed_in = self
            .failing_over(&mut |_| {
                let (mut auth, user, password) = (auth.clone(), user.clone(), password.clone());
                async move { auth.set_client_auth(user, password).await }
            })
            .await;
        if let Err(e) = signed_in {
            let e = self.fail(e, false).await;
            let message = format!("signing in to etcd failed: {}", e.message());
            return Err(e.with_message(message));
        }
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.signed_in.store(true, Ordering::SeqCst);
        Ok(epoch)
    }
}

/// True when the request never left: the endpoint it was sent to could not
/// be connected to.
fn never_sent(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == code::UNAVAILABLE
            && s.message().starts_with(CONNECT_FAILED)
            && std::error::Error::source(s).is_some())
}

/// A TLS failure the driver reports with its cause.
fn tls_failure(e: &etcd_client::Error) -> Option<String> {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => std::error::Error::source(s).and_then(explain),
        E::TransportError(e) => explain(e),
        E::IoError(e) => explain(e),
        _ => None,
    }
}

/// True when the server closed or reset the connection under the request
/// (what a server that refuses the client's TLS, or lack of it, does), as
/// opposed to a timeout, a refused connection or a status etcd sent.
fn closed_by_server(e: &etcd_client::Error) -> bool {
    use std::io::ErrorKind as Io;
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    let mut next = std::error::Error::source(status);
    while let Some(e) = next {
        let io = e.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| {
            matches!(
                io.kind(),
                Io::BrokenPipe | Io::ConnectionReset | Io::ConnectionAborted | Io::UnexpectedEof
            )
        }) || e.to_string().contains("connection closed")
        {
            return true;
        }
        // An io::Error's `source` skips the error it wraps.
        next = match io.and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// True when etcd refused the auth token (expired, issued before a restart,
/// or older than a change of users and roles), as opposed to refusing the
/// user. "user name is empty" is a request that went out while another
/// task was signing in again. The request was not executed.
fn token_rejected(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() as i32 == code::UNAUTHENTICATED
            || s.message().contains("revision of auth store is old")
            || s.message().contains("user name is empty"))
}

/// The one mapping of driver errors to [`ErrorKind`]s.
///
/// "Too many requests" (etcd refuses a request while its apply loop lags;
/// nothing was proposed) → [`ErrorKind::TooEarly`]; unreachable servers,
/// broken connections, timeouts and any error whose outcome is unknown →
/// [`ErrorKind::Unavailable`] (for a write: it may have been applied);
/// authentication and permission failures → [`ErrorKind::PermissionDenied`];
/// everything else → [`ErrorKind::Other`].
pub(super) fn map_error(e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    let kind = match &e {
        E::TransportError(_) | E::IoError(_) => ErrorKind::Unavailable,
        E::GRpcStatus(status) => match status.code() as i32 {
            code::RESOURCE_EXHAUSTED if status.message().contains(TOO_MANY_REQUESTS) => {
                ErrorKind::TooEarly
            }
            code::CANCELLED
            | code::UNKNOWN
            | code::DEADLINE_EXCEEDED
            | code::RESOURCE_EXHAUSTED
            | code::ABORTED
            | code::INTERNAL
            | code::UNAVAILABLE => ErrorKind::Unavailable,
            code::PERMISSION_DENIED | code::UNAUTHENTICATED => ErrorKind::PermissionDenied,
            // etcd answers a wrong or missing user or password with
            // InvalidArgument or FailedPrecondition.
            code::INVALID_ARGUMENT | code::FAILED_PRECONDITION
                if AUTH_MESSAGES.iter().any(|m| status.message().contains(m)) =>
            {
                ErrorKind::PermissionDenied
            }
            _ => ErrorKind::Other,
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidHeaderValue(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Other,
    };
    let message = match kind {
        ErrorKind::TooEarly => "etcd is shedding load; nothing was applied",
        ErrorKind::Unavailable => "etcd unreachable or the call failed in flight",
        ErrorKind::PermissionDenied => "etcd refused access",
        _ => "etcd call failed",
    };
    Error::new(kind, message).with_source(e)
}

/// The key-values of the `i`-th get in a transaction's responses.
pub(super) fn kvs_at(ops: &mut [TxnOpResponse], i: usize) -> Vec<etcd_client::KeyValue> {
    match ops.get_mut(i) {
        Some(TxnOpResponse::Get(get)) => get.take_kvs(),
        _ => Vec::new(),
    }
}

/// The count of the `i`-th get (with `count_only`) in a transaction.
pub(super) fn count_at(ops: &[TxnOpResponse], i: usize) -> i64 {
    match ops.get(i) {
        Some(TxnOpResponse::Get(get)) => get.count(),
        _ => 0,
    }
}

//! Running one transaction against etcd: the timeout, lazy authentication
//! and the mapping of driver errors.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, Txn, TxnOpResponse, TxnResponse, WatchOptions, WatchStream,
    Watcher,
};

use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind, Result};

use super::BACKEND;
use super::config::EtcdConfig;

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
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Builds the client. No network traffic: connections are made lazily,
    /// and re-made after they break, by the first call that needs one.
    pub(super) async fn new(config: &EtcdConfig) -> Result<Conn> {
        let options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(10), config.timeout)
            .with_keep_alive_while_idle(false)
            .with_tcp_keepalive(Duration::from_secs(30));
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| map_error(e).with_message("cannot set up the etcd client"))?;
        Ok(Conn {
            client,
            timeout: config.timeout,
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
        let attempt = self.signed_in_call(|client| {
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
                .signed_in_call(|client| {
                    let (key, count) = (key.to_owned(), count.clone());
                    async move { client.kv_client().get(key, Some(count)).await }
                })
                .await?;
            let revision = now.header().map_or(0, |h| h.revision());
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            self.signed_in_call(|client| {
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
    /// to sign in again and send it once more.
    async fn signed_in_call<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        for retry in [true, false] {
            let epoch = self.sign_in().await?;
            match call(self.client.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) if retry && self.credentials.is_some() && token_rejected(&e) => {
                    // Unless another task has signed in since.
                    if self.epoch.load(Ordering::SeqCst) == epoch {
                        self.signed_in.store(false, Ordering::SeqCst);
                    }
                }
                Err(e) => return Err(map_error(e)),
            }
        }
        Err(Error::new(
            ErrorKind::PermissionDenied,
            "etcd rejected a fresh auth token",
        ))
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
        auth.set_client_auth(user.clone(), password.clone())
            .await
            .map_err(|e| map_error(e).with_message("signing in to etcd failed"))?;
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.signed_in.store(true, Ordering::SeqCst);
        Ok(epoch)
    }
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

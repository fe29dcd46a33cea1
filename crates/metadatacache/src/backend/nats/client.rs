//! The connection to NATS: connecting and reconnecting, the bound on every
//! call, and the one mapping of driver errors to [`ErrorKind`]s. The bucket
//! is looked up in [`bucket`](super::bucket), the requests themselves are in
//! [`requests`](super::requests).

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::StreamError;
use async_nats::jetstream::consumer::push::OrderedError;
use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, PublishError,
    PublishErrorKind,
};
use async_nats::jetstream::stream::{
    ConsumerError, ConsumerErrorKind, DirectGetError, DirectGetErrorKind, RawMessageError,
    RawMessageErrorKind,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, ServerAddr, StatusCode};
use rustls::ClientConfig;
use tokio::sync::watch;

use super::BACKEND;
use super::bucket::Bucket;
use super::config::{Auth, NatsConfig};
use super::link::{Link, LinkState, reconnect_delay};
use super::tls::Probe;
use crate::backend::util::no_answer;
use crate::error::{Error, ErrorKind, Result};

/// The client, its JetStream context and the bucket handle.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) js: jetstream::Context,
    pub(super) bucket_name: String,
    timeout: Duration,
    pub(super) bucket: Mutex<Option<Arc<Bucket>>>,
    /// Serialises looking the bucket up (and creating it).
    pub(super) bucket_lock: tokio::sync::Mutex<()>,
    link: Arc<Link>,
    /// For explaining a failure to connect.
    tls: Probe,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("bucket", &self.bucket_name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Sets the client up. It connects in the background and reconnects
    /// by itself after the connection breaks, forever; calls made while it
    /// is down wait, within their timeout.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] when a credentials file cannot be read
    /// or a server address is refused.
    pub(super) async fn new(config: &NatsConfig) -> Result<Conn> {
        let link = Arc::new(Link::default());
        let events = Arc::clone(&link);
        // The driver's own deadlines stay behind ours, so that every call
        // ends by our timeout, with our message.
        let driver_timeout = config.timeout.saturating_mul(2);
        let mut options = ConnectOptions::new()
            .name("metadatacache")
            .retry_on_initial_connect()
            .connection_timeout(config.timeout)
            .request_timeout(Some(driver_timeout))
            .ping_interval(Duration::from_secs(10))
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                events.record(event);
                async {}
            });
        let unreadable = |what: &str, path: &std::path::Path, e: std::io::Error| {
            Error::invalid_input(format!("cannot read the {what} {}", path.display()))
                .with_source(e)
        };
        options = match &config.auth {
            Auth::None => options,
            Auth::UserPassword(user, password) => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::CredsFile(path) => options
                .credentials_file(path)
                .await
                .map_err(|e| unreadable("NATS credentials file", path, e))?,
            Auth::NkeyFile(path) => {
                let seed = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| unreadable("nkey seed file", path, e))?;
                options.nkey(seed.trim().to_owned())
            }
        };
        // Always ours, also for a server that asks for TLS unasked.
        let tls = Arc::new(super::tls::config(&config.tls)?);
        options = options
            .require_tls(config.tls.required)
            .tls_client_config(ClientConfig::clone(&tls));
        let mut servers = Vec::new();
        for server in &config.servers {
            servers.push(server.parse::<ServerAddr>().map_err(|e| {
                Error::invalid_input(format!("bad NATS server address {server}")).with_source(e)
            })?);
        }
        // With retry_on_initial_connect this returns at once.
        let client = options
            .connect(servers)
            .await
            .map_err(|e| Error::invalid_input("cannot set up the NATS client").with_source(e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(driver_timeout)
            .build(client.clone());
        Ok(Conn {
            client,
            js,
            bucket_name: config.bucket.clone(),
            timeout: config.timeout,
            bucket: Mutex::new(None),
            bucket_lock: tokio::sync::Mutex::new(()),
            link,
            tls: Probe::new(tls, &config.tls, &config.servers),
        })
    }

    /// The bound on every call.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Follows the connection's state (for the watch task).
    pub(super) fn link(&self) -> watch::Receiver<LinkState> {
        self.link.subscribe()
    }

    /// Runs `op` within the timeout, once the client is connected; errors
    /// carry the backend and `path`.
    ///
    /// Nothing is handed to the client while it is disconnected: it would
    /// keep a write and send it whenever it reconnects, long after the
    /// caller gave up. A call that finds no connection within the timeout
    /// sent nothing: [`ErrorKind::Unavailable`] (or
    /// [`ErrorKind::PermissionDenied`] when the server refused the
    /// credentials). A call sent but not answered in time is
    /// [`ErrorKind::Unavailable`]; for a write (`write`), it may have been
    /// applied.
    pub(super) async fn bounded<T>(
        &self,
        path: &str,
        write: bool,
        op: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let res = match tokio::time::timeout_at(deadline, self.connected()).await {
            Err(_) => Err(self.not_connected().await),
            Ok(()) => match tokio::time::timeout_at(deadline, op).await {
                Ok(res) => res,
                Err(_) => {
                    // A deleted bucket's reads go unanswered: look it up
                    // again next time.
                    *self.cached_bucket() = None;
                    Err(no_answer(self.timeout, write))
                }
            },
        };
        res.map_err(|e| e.with_backend(BACKEND).with_path(path))
    }

    /// True while the client is connected (requests go out at once).
    pub(super) fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Waits until the client is connected.
    async fn connected(&self) {
        let mut link = self.link.subscribe();
        while !self.is_connected() {
            // The events say when; the pause covers events dropped under
            // load (the client's state is the truth).
            let _ = tokio::time::timeout(Duration::from_millis(50), link.changed()).await;
        }
    }

    /// The error of a call that found no connection in time (it sent
    /// nothing), with the last error connecting; a TLS failure (which the
    /// client reports only as an IO error) found by a probe of its own,
    /// within a quarter of the timeout, is `PermissionDenied` saying what
    /// is wrong, naming the files and the servers.
    async fn not_connected(&self) -> Error {
        let last = self.link.last_error().clone();
        let refused = last
            .as_deref()
            .is_some_and(|m| m.to_ascii_lowercase().contains("authorization"));
        if last.is_some()
            && !refused
            && let Some(e) = self.tls.explain(self.timeout / 4).await
        {
            return e;
        }
        let text = format!(
            "not connected to NATS within the {} ms timeout{}; nothing was sent",
            self.timeout.as_millis(),
            last.map(|l| format!(" (last error: {l})"))
                .unwrap_or_default()
        );
        let kind = if refused {
            ErrorKind::PermissionDenied
        } else {
            ErrorKind::Unavailable
        };
        Error::new(kind, text)
    }

    /// Maps a driver failure; forgets the bucket handle when its stream is
    /// gone, so that the next call looks it up (and creates it) again.
    pub(super) fn fail(&self, failure: Failure) -> Error {
        if failure.stream_missing() {
            *self.cached_bucket() = None;
        }
        map_error(failure)
    }
}

/// A driver failure, before it becomes an [`Error`].
#[derive(Debug)]
pub(super) enum Failure {
    Publish(PublishError),
    Get(DirectGetError),
    Raw(RawMessageError),
    GetStream(GetStreamError),
    CreateBucket(CreateStreamError),
    Consumer(ConsumerError),
    Messages(StreamError),
    Ordered(OrderedError),
}

impl Failure {
    /// True when the bucket's stream did not take the request because it
    /// no longer exists.
    fn stream_missing(&self) -> bool {
        let missing = |e: &jetstream::Error| e.error_code() == ErrorCode::STREAM_NOT_FOUND;
        match self {
            Failure::Publish(e) => e.kind() == PublishErrorKind::StreamNotFound,
            Failure::Raw(e) => matches!(e.kind(), RawMessageErrorKind::JetStream(j) if missing(&j)),
            Failure::Consumer(e) => {
                matches!(e.kind(), ConsumerErrorKind::JetStream(j) if missing(&j))
            }
            _ => false,
        }
    }
}

/// The JetStream API error behind a publish that the server refused.
fn refusal(e: &PublishError) -> Option<&jetstream::Error> {
    std::error::Error::source(e)?.downcast_ref::<jetstream::Error>()
}

/// The one mapping of driver failures to [`ErrorKind`]s.
///
/// - a key whose revision is not the expected one → `PreconditionFailed`
///   (nothing written);
/// - no message / no stream on a lookup → `NotFound` (the callers decide
///   what is absent);
/// - timeouts, lost connections, no responders, and a write whose
///   acknowledgement did not come → `Unavailable` (a write may have been
///   applied);
/// - a subject the server refuses → `InvalidInput`;
/// - JetStream refusing a request (disabled, limits) → `Other`.
pub(super) fn map_error(failure: Failure) -> Error {
    use ErrorKind as K;
    let not_enabled = |e: &jetstream::Error| {
        matches!(
            e.error_code(),
            ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        )
    };
    const NO_JETSTREAM: &str = "JetStream did not answer (not connected, or the server runs \
                                without JetStream: start it with nats-server -js)";
    let (kind, message): (ErrorKind, String) = match &failure {
        Failure::Publish(e) => match e.kind() {
            PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => (
                K::PreconditionFailed,
                "the key's revision is not the expected one; nothing was written".into(),
            ),
            PublishErrorKind::StreamNotFound => (
                K::Unavailable,
                "no stream took the write (the bucket was deleted?); nothing was written".into(),
            ),
            _ => match refusal(e) {
                Some(j) => (K::Other, format!("JetStream refused the write: {j}")),
                None => (
                    K::Unavailable,
                    "NATS did not acknowledge the write; it may or may not have been applied"
                        .into(),
                ),
            },
        },
        Failure::Get(e) => match e.kind() {
            DirectGetErrorKind::NotFound => (K::NotFound, "no such key".into()),
            DirectGetErrorKind::InvalidSubject => {
                (K::InvalidInput, "the server refused the key".into())
            }
            DirectGetErrorKind::TimedOut | DirectGetErrorKind::Request => {
                (K::Unavailable, "NATS did not answer a read".into())
            }
            DirectGetErrorKind::ErrorResponse(StatusCode::NO_RESPONDERS, _) => {
                (K::Unavailable, NO_JETSTREAM.into())
            }
            kind => (K::Other, format!("a read failed: {kind}")),
        },
        Failure::Raw(e) => match e.kind() {
            RawMessageErrorKind::NoMessageFound => (K::NotFound, "no such key".into()),
            RawMessageErrorKind::InvalidSubject => {
                (K::InvalidInput, "the server refused the key".into())
            }
            RawMessageErrorKind::JetStream(j) => {
                (K::Other, format!("JetStream refused a read: {j}"))
            }
            RawMessageErrorKind::Other => (K::Unavailable, "NATS did not answer a read".into()),
        },
        Failure::GetStream(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                (K::NotFound, "no such bucket".into())
            }
            GetStreamErrorKind::JetStream(j) if not_enabled(&j) => (
                K::Other,
                format!("JetStream is not enabled (start nats-server with -js): {j}"),
            ),
            GetStreamErrorKind::JetStream(j) => (
                K::Other,
                format!("JetStream refused to describe the bucket: {j}"),
            ),
            GetStreamErrorKind::Request => (K::Unavailable, NO_JETSTREAM.into()),
            kind => (K::InvalidInput, format!("bad bucket: {kind}")),
        },
        Failure::CreateBucket(e) => match e.kind() {
            CreateStreamErrorKind::TimedOut
            | CreateStreamErrorKind::JetStreamUnavailable
            | CreateStreamErrorKind::Response => (K::Unavailable, NO_JETSTREAM.into()),
            CreateStreamErrorKind::InvalidStreamName | CreateStreamErrorKind::EmptyStreamName => {
                (K::InvalidInput, "invalid bucket name".into())
            }
            _ => (
                K::Other,
                format!("JetStream refused to create the bucket: {e}"),
            ),
        },
        Failure::Consumer(e) => match e.kind() {
            ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => {
                (K::Unavailable, NO_JETSTREAM.into())
            }
            ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                (K::Unavailable, "the bucket's stream is gone".into())
            }
            kind => (K::Other, format!("JetStream refused a consumer: {kind}")),
        },
        Failure::Messages(_) | Failure::Ordered(_) => (
            K::Unavailable,
            "the JetStream consumer broke off (connection lost?)".into(),
        ),
    };
    let e = Error::new(kind, message);
    match failure {
        Failure::Publish(s) => e.with_source(s),
        Failure::Get(s) => e.with_source(s),
        Failure::Raw(s) => e.with_source(s),
        Failure::GetStream(s) => e.with_source(s),
        Failure::CreateBucket(s) => e.with_source(s),
        Failure::Consumer(s) => e.with_source(s),
        Failure::Messages(s) => e.with_source(s),
        Failure::Ordered(s) => e.with_source(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_failures_map_to_kinds() {
        let kind = |f| map_error(f).kind();
        assert_eq!(
            kind(Failure::Publish(PublishError::new(
                PublishErrorKind::WrongLastSequence
            ))),
            ErrorKind::PreconditionFailed
        );
        for k in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::Other,
        ] {
            assert_eq!(
                kind(Failure::Publish(PublishError::new(k))),
                ErrorKind::Unavailable,
                "{k:?}"
            );
        }
        assert_eq!(
            kind(Failure::Get(DirectGetError::new(
                DirectGetErrorKind::NotFound
            ))),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(Failure::Get(DirectGetError::new(
                DirectGetErrorKind::TimedOut
            ))),
            ErrorKind::Unavailable
        );
        assert!(
            Failure::Publish(PublishError::new(PublishErrorKind::StreamNotFound)).stream_missing()
        );
    }
}

//! Change streams: `LISTEN` on the table's channel over a connection of
//! its own (never one of the pool, whose connections run statements).
//!
//! The table's trigger (see `sql.rs`) sends a notification per changed row
//! while a session listens (each enters itself in the table of watchers);
//! PostgreSQL delivers it when the change commits, so it is visible to
//! reads by then. When the connection is lost, the stream reports a gap,
//! reconnects with backoff for as long as the server is away, listens
//! again and reports that it is in sync. An idle connection is checked now
//! and then with an empty statement, so one that died silently is noticed.

use std::future::{Future, poll_fn};
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Socket};

use super::client::{Failure, to_error};
use super::sql::{GATE, REGISTER};
use super::tls::Tls;
use super::{BACKEND, PostgresStorage};
use crate::backend::util::Backoff;
use crate::error::{Error, Result};
use crate::storage::{Change, ChangeSender, ChangeStream, is_within, validate_path};

/// How often an idle listening connection is checked.
const HEARTBEAT: Duration = Duration::from_secs(10);

type PgConnection = Connection<Socket, <Tls as MakeTlsConnect<Socket>>::Stream>;

/// What one change stream listens to.
struct Listener {
    config: tokio_postgres::Config,
    /// The same TLS as the pool's connections.
    tls: Tls,
    channel: String,
    /// The storage path below which documents are reported ("" for all).
    prefix: String,
    timeout: Duration,
}

/// A listening connection.
struct Session {
    client: Client,
    connection: PgConnection,
}

/// A notification's payload, as the trigger writes it.
#[derive(Debug, Deserialize)]
struct Payload {
    path: Option<String>,
    etag: Option<String>,
    /// Changes could not be told one by one (a `TRUNCATE`, a path too long
    /// for a notification): why.
    reset: Option<String>,
}

/// Why a connection stopped working: the driver's error, or `None` when
/// the server closed it without one.
type Lost = Option<tokio_postgres::Error>;

impl PostgresStorage {
    /// [`Storage::watch`](crate::Storage::watch): connects and listens
    /// within the timeout, then follows the notifications from a task of
    /// its own.
    pub(super) async fn subscribe(&self, prefix: &str) -> Result<ChangeStream> {
        validate_path(prefix, true).map_err(|e| e.with_backend(BACKEND))?;
        let listener = Listener {
            config: self.inner.pg.clone(),
            tls: self.inner.tls.clone(),
            channel: self.inner.sql.channel.clone(),
            prefix: prefix.to_owned(),
            timeout: self.inner.timeout,
        };
        let session = match tokio::time::timeout(listener.timeout, listener.connect()).await {
            Ok(Ok(session)) => session,
            Ok(Err(Some(e))) => return Err(listener.error(Failure::Pg(e))),
            Ok(Err(None)) => {
                return Err(
                    Error::unavailable("the server closed the connection").with_backend(BACKEND)
                );
            }
            Err(_) => return Err(listener.error(Failure::Timeout)),
        };
        let (tx, rx) = ChangeStream::channel();
        tx.send(Change::InSync);
        tokio::spawn(listener.follow(tx, session));
        Ok(rx)
    }
}

impl Listener {
    fn error(&self, failure: Failure) -> Error {
        let e = to_error(failure, false, self.timeout);
        let message = format!("cannot listen for changes: {}", e.message());
        e.with_message(message).with_backend(BACKEND)
    }

    /// Opens a connection, listens on the channel and enters the session
    /// among the channel's watchers, so that writers notify it; then waits
    /// out the writers that did not notify because they looked before it
    /// entered (see `sql.rs`). Each statement commits on its own: the entry
    /// must be visible before the wait.
    async fn connect(&self) -> std::result::Result<Session, Lost> {
        let (client, mut connection) = self.config.connect(self.tls.clone()).await.map_err(Some)?;
        let channel = &self.channel;
        let listen = format!("LISTEN \"{channel}\"");
        drive(&mut connection, client.batch_execute(&listen), |_| {}).await?;
        let enter = format!("SELECT {REGISTER}('{channel}')");
        match drive(&mut connection, client.batch_execute(&enter), |_| {}).await {
            Ok(()) => {
                let gate = format!(
                    "SELECT pg_advisory_lock({GATE}, hashtext('{channel}')), \
                            pg_advisory_unlock({GATE}, hashtext('{channel}'))"
                );
                drive(&mut connection, client.batch_execute(&gate), |_| {}).await?;
            }
            // No such function: the table still has the trigger of an
            // earlier version, which notifies every change (its owner has
            // not opened it since).
            Err(Some(e)) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {}
            Err(lost) => return Err(lost),
        }
        Ok(Session { client, connection })
    }

    /// Reports the notifications, and reconnects whenever the connection
    /// is lost, until the consumer drops the stream.
    async fn follow(self, tx: ChangeSender, mut session: Session) {
        loop {
            let reason = tokio::select! {
                () = tx.closed() => return,
                reason = self.report(&tx, &mut session) => match reason {
                    Some(reason) => reason,
                    None => return,
                },
            };
            tracing::debug!(%reason, channel = %self.channel, "postgres listener: broken");
            if !tx.send(Change::Gap { reason }) {
                return;
            }
            session = match self.reconnect(&tx).await {
                Some(session) => session,
                None => return,
            };
            if !tx.send(Change::InSync) {
                return;
            }
        }
    }

    /// Reports the notifications of `session` until its connection is
    /// lost; returns why, or `None` once the consumer is gone.
    async fn report(&self, tx: &ChangeSender, session: &mut Session) -> Option<String> {
        let Session { client, connection } = session;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if !self.deliver(tx, &n) {
                            return None;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Some(lost_reason(Some(e))),
                    None => return Some(lost_reason(None)),
                },
                _ = heartbeat.tick() => {
                    let ping = drive(connection, client.batch_execute(""), |n| {
                        self.deliver(tx, n);
                    });
                    match tokio::time::timeout(self.timeout, ping).await {
                        Ok(Ok(())) => {}
                        Ok(Err(lost)) => return Some(lost_reason(lost)),
                        Err(_) => {
                            return Some(format!(
                                "the listening connection did not answer within {:?}",
                                self.timeout
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Reports one notification; false once the consumer is gone.
    fn deliver(&self, tx: &ChangeSender, n: &Notification) -> bool {
        if n.channel() != self.channel {
            return true;
        }
        match serde_json::from_str::<Payload>(n.payload()) {
            Ok(Payload {
                path: Some(path),
                etag,
                reset: None,
            }) => !is_within(&path, &self.prefix) || tx.send(Change::Changed { path, etag }),
            Ok(Payload {
                reset: Some(why), ..
            }) => {
                // The change is committed: a read from now on sees it.
                let reason = format!("changes that cannot be told one by one: {why}");
                tx.send(Change::Gap { reason }) && tx.send(Change::InSync)
            }
            _ => {
                let reason = format!("an unreadable notification: {:?}", n.payload());
                tx.send(Change::Gap { reason }) && tx.send(Change::InSync)
            }
        }
    }

    /// Connects and listens again, retrying with backoff while the server
    /// is away; `None` once the consumer is gone.
    async fn reconnect(&self, tx: &ChangeSender) -> Option<Session> {
        let mut backoff = Backoff::new();
        loop {
            let attempt = tokio::select! {
                () = tx.closed() => return None,
                attempt = tokio::time::timeout(self.timeout, self.connect()) => attempt,
            };
            match attempt {
                Ok(Ok(session)) => return Some(session),
                Ok(Err(lost)) => {
                    tracing::debug!(reason = %lost_reason(lost), "postgres listener: cannot reconnect yet");
                }
                Err(_) => tracing::debug!("postgres listener: no answer while reconnecting"),
            }
            tokio::select! {
                () = tx.closed() => return None,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// Why the listening connection was lost, in the server's words where it
/// said something (say, that it is shutting down).
fn lost_reason(lost: Lost) -> String {
    match lost {
        Some(e) => match e.as_db_error() {
            Some(db) => format!(
                "the listening connection broke: {}: {}",
                db.code().code(),
                db.message()
            ),
            None => format!("the listening connection broke: {e}"),
        },
        None => "the server closed the listening connection".to_owned(),
    }
}

/// Runs `statement` (on the client of `connection`) to its end while
/// polling `connection`, which is what carries it; a notification that
/// arrives meanwhile goes to `notified`. A connection that ends first
/// fails it: the statement's reply can no longer come.
async fn drive<T>(
    connection: &mut PgConnection,
    statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    mut notified: impl FnMut(&Notification),
) -> std::result::Result<T, Lost> {
    let mut statement = std::pin::pin!(statement);
    loop {
        tokio::select! {
            done = &mut statement => return done.map_err(Some),
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => notified(&n),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Some(e)),
                None => return Err(None),
            },
        }
    }
}

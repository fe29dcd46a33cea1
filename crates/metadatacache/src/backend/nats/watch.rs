//! Change notifications: a JetStream consumer of the storage's keys (from
//! now on, headers only), kept up by a task until the stream is dropped.
//!
//! The consumer alone would heal a broken connection quietly, but changes
//! made while this client was cut off arrive late, and meanwhile a store
//! would serve cached copies as current. So a lost connection is reported
//! as a [`Change::Gap`] at once; once connected again the task subscribes
//! anew and reports [`Change::InSync`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::push::Ordered;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::client::Conn;
use super::keys::Layout;
use super::link::LinkState;
use super::version::{etag, is_put};
use crate::error::{Error, Result};
use crate::storage::{Change, ChangeSender, ChangeStream};

/// The first pause before subscribing again after a failed attempt; it
/// doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// A consumer, and how often the connection had been lost when it was set
/// up (a later loss breaks it).
struct Subscription {
    messages: Ordered,
    losses: u64,
}

/// Subscribes (within the timeout, so that a failure is the caller's
/// error), then hands the subscription to a task that reports its changes.
pub(super) async fn start(conn: Arc<Conn>, layout: Layout, prefix: &str) -> Result<ChangeStream> {
    let first = subscribe(&conn, &layout, prefix).await?;
    let (tx, rx) = ChangeStream::channel();
    tx.send(Change::InSync);
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        tokio::select! {
            () = follow(&conn, &layout, &prefix, first, &tx) => {}
            () = tx.closed() => {}
        }
    });
    Ok(rx)
}

async fn subscribe(conn: &Conn, layout: &Layout, prefix: &str) -> Result<Subscription> {
    let losses = conn.link().borrow().losses;
    let messages = conn
        .bounded(prefix, false, async {
            let bucket = conn.bucket().await?;
            if let Some(why) = bucket.silent_removals() {
                return Err(Error::invalid_input(format!(
                    "changes to bucket {:?} cannot be followed: {why}, and such removals \
                     send no message",
                    conn.bucket_name
                )));
            }
            conn.subscribe(&bucket, &layout.below("")).await
        })
        .await?;
    Ok(Subscription { messages, losses })
}

/// Reports changes until the subscription breaks, then a gap, subscribes
/// again and reports that it is in sync; forever (the caller stops it when
/// the stream is dropped).
async fn follow(
    conn: &Conn,
    layout: &Layout,
    prefix: &str,
    mut sub: Subscription,
    tx: &ChangeSender,
) {
    let mut link = conn.link();
    loop {
        let reason = relay(layout, prefix, &mut sub, &mut link, tx).await;
        tracing::debug!(%reason, "nats watch: gap");
        tx.send(Change::Gap { reason });
        sub = resubscribe(conn, layout, prefix, &mut link).await;
        tx.send(Change::InSync);
    }
}

/// Forwards the changes of one subscription; returns why it broke.
async fn relay(
    layout: &Layout,
    prefix: &str,
    sub: &mut Subscription,
    link: &mut watch::Receiver<LinkState>,
    tx: &ChangeSender,
) -> String {
    loop {
        if link.borrow_and_update().losses != sub.losses {
            return "the connection to NATS was lost".to_owned();
        }
        tokio::select! {
            changed = link.changed() => {
                if changed.is_err() {
                    return "the NATS client is gone".to_owned();
                }
            }
            message = sub.messages.next() => match message {
                None => return "the JetStream consumer ended".to_owned(),
                Some(Err(e)) => return format!("the JetStream consumer failed: {e}"),
                Some(Ok(message)) => {
                    let Ok(info) = message.info() else {
                        return "undecodable JetStream message metadata".to_owned();
                    };
                    let revision = info.stream_sequence;
                    let Some(path) = layout.path_of(&message.subject) else {
                        continue; // A key of another tool.
                    };
                    if !under(&path, prefix) {
                        continue;
                    }
                    let put = message.message.headers.as_ref().is_none_or(is_put);
                    tx.send(Change::Changed {
                        path,
                        etag: put.then(|| etag(revision)),
                    });
                }
            },
        }
    }
}

/// Subscribes again once connected, retrying with a growing pause.
async fn resubscribe(
    conn: &Conn,
    layout: &Layout,
    prefix: &str,
    link: &mut watch::Receiver<LinkState>,
) -> Subscription {
    let mut pause = FIRST_RETRY;
    loop {
        // Events can be dropped under load: do not wait on them forever.
        let _ = tokio::time::timeout(MAX_RETRY, link.wait_for(|s| s.connected)).await;
        match subscribe(conn, layout, prefix).await {
            Ok(sub) => return sub,
            Err(e) => tracing::debug!(error = %e, "nats watch: subscribing again failed"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}

/// True when `path` is `prefix` or lies below it (`""`: everything).
fn under(path: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(under("a/b", ""));
        assert!(under("a/b", "a"));
        assert!(under("a", "a"));
        assert!(!under("ab/c", "a"));
    }
}

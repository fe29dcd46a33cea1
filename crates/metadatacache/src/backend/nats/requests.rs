//! The requests the backend sends through the connection: reading a
//! key's message, publishing one, and consumers that list keys or follow
//! changes.

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::consumer::push::{self, Ordered};
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;
use futures_util::StreamExt;

use super::bucket::Bucket;
use super::client::{Conn, Failure};
use crate::error::{Error, ErrorKind, Result};

/// Room left for headers when checking a document against the server's
/// largest message.
const HEADER_ROOM: usize = 512;

impl Conn {
    /// The last message of `subject` (`after`: the first one after that
    /// revision); `None` when there is none.
    pub(super) async fn read(
        &self,
        bucket: &Bucket,
        subject: &str,
        after: Option<u64>,
    ) -> Result<Option<StreamMessage>> {
        let res = if bucket.direct {
            let get = bucket.stream.direct_get_builder();
            let get = match after {
                Some(rev) => get.sequence(rev + 1).next_by_subject(subject),
                None => get.last_by_subject(subject),
            };
            get.send().await.map_err(Failure::Get)
        } else {
            let get = bucket.stream.raw_message_builder();
            let get = match after {
                Some(rev) => get.sequence(rev + 1).next_by_subject(subject),
                None => get.last_by_subject(subject),
            };
            get.send().await.map_err(Failure::Raw)
        };
        match res {
            Ok(message) => Ok(Some(message)),
            Err(f) => match self.fail(f) {
                e if e.kind() == ErrorKind::NotFound => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Stores a message; returns its revision. The expected revision, if
    /// any, is among `headers`.
    pub(super) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<u64> {
        // Sent now or never: a disconnected client would keep it for later.
        if !self.is_connected() {
            return Err(Error::unavailable(
                "the connection to NATS was lost; the write was not sent",
            ));
        }
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() + HEADER_ROOM > max {
            return Err(Error::invalid_input(format!(
                "document of {} bytes too large: this NATS server takes messages up to {max} bytes",
                payload.len()
            )));
        }
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| self.fail(Failure::Publish(e)))?;
        let ack = ack.await.map_err(|e| self.fail(Failure::Publish(e)))?;
        Ok(ack.sequence)
    }

    /// A consumer of the messages under `filter`, headers only: the last
    /// one of each key (`last_per_key`) or only those stored from now on.
    async fn consume(
        &self,
        bucket: &Bucket,
        filter: &str,
        last_per_key: bool,
    ) -> Result<(u64, Ordered)> {
        let consumer = bucket
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("metadatacache".to_owned()),
                filter_subject: filter.to_owned(),
                headers_only: true,
                replay_policy: ReplayPolicy::Instant,
                deliver_policy: if last_per_key {
                    DeliverPolicy::LastPerSubject
                } else {
                    DeliverPolicy::New
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.fail(Failure::Consumer(e)))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| self.fail(Failure::Messages(e)))?;
        Ok((pending, messages))
    }

    /// The last message (headers only) of every key under `filter`, until
    /// `enough` says so.
    pub(super) async fn scan(
        &self,
        bucket: &Bucket,
        filter: &str,
        mut enough: impl FnMut(&jetstream::Message) -> bool,
    ) -> Result<Vec<Scanned>> {
        let (pending, mut messages) = self.consume(bucket, filter, true).await?;
        let mut out = Vec::new();
        if pending == 0 {
            return Ok(out);
        }
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| self.fail(Failure::Ordered(e)))?;
            let info = message.info().map_err(|e| {
                Error::new(ErrorKind::Other, "undecodable JetStream message metadata")
                    .with_boxed_source(e)
            })?;
            let (revision, left) = (info.stream_sequence, info.pending);
            let published = info.published.unix_timestamp_nanos();
            let stop = enough(&message);
            out.push(Scanned {
                subject: message.subject.to_string(),
                revision,
                published,
                headers: message.message.headers.clone().unwrap_or_default(),
            });
            if stop || left == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Follows the messages stored under `filter` from now on (headers
    /// only).
    pub(super) async fn subscribe(&self, bucket: &Bucket, filter: &str) -> Result<Ordered> {
        Ok(self.consume(bucket, filter, false).await?.1)
    }
}

/// The last message of a key, as a scan sees it.
#[derive(Debug)]
pub(super) struct Scanned {
    pub(super) subject: String,
    pub(super) revision: u64,
    /// When the server stored it, in nanoseconds since the Unix epoch.
    pub(super) published: i128,
    pub(super) headers: HeaderMap,
}

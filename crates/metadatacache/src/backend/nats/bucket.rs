//! The bucket: looked up on first use, created when missing, and whether
//! its documents carry directory marks.

use std::sync::{Arc, MutexGuard};

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType, Stream};
use bytes::Bytes;

use super::client::{Conn, Failure, map_error};
use super::keys;
use crate::error::{ErrorKind, Result};

/// A bucket's stream, as the calls use it.
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) stream: Stream,
    /// The bucket keeps one message per key (history 1), so any message of
    /// a key newer than a revision is its current version.
    pub(super) single_history: bool,
    /// Direct gets are allowed (else reads go through the stream leader).
    pub(super) direct: bool,
    /// Every document was written with its directory marks (see
    /// [`keys`](super::keys)), so a mark's absence proves an empty directory.
    pub(super) marked: bool,
}

impl Bucket {
    /// Why the stream may remove a document's current version without a
    /// message saying so (it expires messages, or drops the oldest when
    /// full), which a watch would never hear of; `None` when it cannot.
    pub(super) fn silent_removals(&self) -> Option<String> {
        let config = &self.stream.cached_info().config;
        if !config.max_age.is_zero() {
            return Some(format!(
                "it expires documents (max_age {:?})",
                config.max_age
            ));
        }
        let full = config.max_messages > 0 || config.max_bytes > 0;
        (full && config.discard == DiscardPolicy::Old).then(|| {
            format!(
                "it drops its oldest documents when full (discard old, max_msgs {}, \
                 max_bytes {})",
                config.max_messages, config.max_bytes
            )
        })
    }
}

impl Conn {
    pub(super) fn cached_bucket(&self) -> MutexGuard<'_, Option<Arc<Bucket>>> {
        // Replacing an Arc cannot be left half done.
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bucket, looked up on first use and created when it is missing.
    pub(super) async fn bucket(&self) -> Result<Arc<Bucket>> {
        if let Some(b) = self.cached_bucket().clone() {
            return Ok(b);
        }
        let _one_at_a_time = self.bucket_lock.lock().await;
        if let Some(b) = self.cached_bucket().clone() {
            return Ok(b);
        }
        let name = format!("KV_{}", self.bucket_name);
        let stream = match self.js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(e) => {
                let e = map_error(Failure::GetStream(e));
                if e.kind() != ErrorKind::NotFound {
                    return Err(e);
                }
                self.create_bucket(&name).await?
            }
        };
        let info = stream.cached_info();
        let empty = info.state.messages == 0;
        let mut bucket = Bucket {
            single_history: info.config.max_messages_per_subject == 1,
            direct: info.config.allow_direct,
            stream,
            marked: false,
        };
        bucket.marked = self.is_marked(&bucket, empty).await?;
        let bucket = Arc::new(bucket);
        *self.cached_bucket() = Some(Arc::clone(&bucket));
        Ok(bucket)
    }

    /// Whether the bucket says all its documents have their directory
    /// marks; a bucket found empty is made to say so. Documents written by
    /// this backend always get their marks, so only one written by another
    /// tool, or before marks existed, can lack them, and neither is in an
    /// empty bucket. A flag that cannot be written (a client that may only
    /// read, say) leaves the bucket unmarked for this handle: slower
    /// creates, never a wrong answer.
    async fn is_marked(&self, bucket: &Bucket, empty: bool) -> Result<bool> {
        let flag = keys::marked_flag(&self.bucket_name);
        if self.read(bucket, &flag, None).await?.is_some() {
            return Ok(true);
        }
        if !empty {
            return Ok(false);
        }
        match self.publish(flag, HeaderMap::new(), Bytes::new()).await {
            Ok(_) => Ok(true),
            Err(e) => {
                tracing::debug!(error = %e, "nats: cannot flag the empty bucket as marked");
                Ok(false)
            }
        }
    }

    /// Creates the bucket: a stream as NATS KV clients make one (`nats kv
    /// add` sees a bucket), with history 1 and file storage.
    async fn create_bucket(&self, name: &str) -> Result<Stream> {
        let config = stream::Config {
            name: name.to_owned(),
            description: Some("metadatacache documents".to_owned()),
            subjects: vec![format!("$KV.{}.>", self.bucket_name)],
            max_messages_per_subject: 1,
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: 1,
            ..stream::Config::default()
        };
        // Not `create_key_value`: that one asks for account details in a
        // form servers before 2.10 do not give.
        match self.js.create_stream(config).await {
            Ok(stream) => Ok(stream),
            // Another client may have created it meanwhile (with other
            // settings, which creating it again refuses).
            Err(e) => match self.js.get_stream(name).await {
                Ok(stream) => Ok(stream),
                Err(_) => Err(map_error(Failure::CreateBucket(e))),
            },
        }
    }
}

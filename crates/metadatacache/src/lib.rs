//! Typed documents shared by the replicas of a service: an in-memory cache
//! with etag compare-and-swap over a pluggable [`Storage`].
//!
//! Each replica keeps small documents — a user's app passwords, share lists,
//! settings — in one shared storage. A [`Store`] gives it three things at
//! once:
//!
//! - **cheap reads**: values are cached in memory and revalidated with a
//!   conditional download that transfers nothing while the document is
//!   unchanged;
//! - **safe read-modify-write**: [`Store::update`] writes with etag
//!   compare-and-swap and re-runs your closure on conflict, so no replica
//!   ever loses another's change;
//! - **a storage that fits**: memory, a local directory, or (behind cargo
//!   features) etcd, PostgreSQL, S3 and NATS JetStream key-value buckets,
//!   all behind one [`Storage`] trait and opened from a URL with [`open`].
//!
//! # Tutorial
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Arc;
//! use metadatacache::{Error, MemoryStorage, Options, Storage, Store};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // One storage shared by two replicas (in real life: two processes).
//! let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
//! let replica = |storage: Arc<dyn Storage>| -> Store<String, HashMap<String, String>> {
//!     Store::new(
//!         Options::new(storage, |user: &String| format!("users/{user}.json"))
//!             .init(HashMap::new),
//!     )
//! };
//! let a = replica(Arc::clone(&storage));
//! let b = replica(Arc::clone(&storage));
//!
//! // Read-modify-write; the closure may run several times on conflict.
//! a.update("alice".to_string(), true, |mut settings| {
//!     settings.insert("theme".into(), "dark".into());
//!     Ok::<_, Error>((settings, true)) // (new value, persist?)
//! })
//! .await?;
//!
//! // Another replica sees it on its next read.
//! let settings = b.get("alice".to_string()).await?.expect("written by a");
//! assert_eq!(settings["theme"], "dark");
//!
//! // The closure may borrow from the caller's stack to hand results out.
//! let mut previous = None;
//! b.update("alice".to_string(), false, |mut settings| {
//!     previous = settings.insert("theme".into(), "light".into());
//!     Ok((settings, true))
//! })
//! .await?;
//! assert_eq!(previous.as_deref(), Some("dark"));
//!
//! // A read on `a` revalidates and sees b's change.
//! assert_eq!(a.get("alice".to_string()).await?.unwrap()["theme"], "light");
//!
//! // Explicit locking: operations that need the key's lock live on the guard.
//! let mut g = a.lock("bob".to_string()).await;
//! assert!(g.get().await?.is_none());
//! g.set(HashMap::from([("lang".to_string(), "de".to_string())]));
//! g.persist().await?;
//! drop(g); // unlock
//!
//! assert!(a.remove("bob".to_string()).await?);
//! assert!(b.get("bob".to_string()).await?.is_none());
//! # Ok::<_, Error>(()) }).unwrap();
//! ```
//!
//! # What an `update` result promises
//!
//! - `Ok(())`: the change was applied exactly once (or `f` chose not to
//!   persist).
//! - [`ErrorKind::Unavailable`]: the storage did not answer; the change may
//!   have been applied, at most once (also if it lands later: a write whose
//!   reply was lost is never run again).
//!
//!   Where the backend allows it, a store settles a lost reply instead: on
//!   backends whose etags never repeat ([`Capabilities::unique_etags`]:
//!   memory, etcd, PostgreSQL, NATS) it sends the very same write again, so that
//!   of all copies at most one can land, and answers `Ok` when a copy is
//!   acknowledged or the stored version carries its write token
//!   ([`Capabilities::write_tokens`]). On disk and S3, whose etags are
//!   content hashes, equal content cannot tell one replica's write from
//!   another's, and Azure's and GCS's etags are not known never to repeat:
//!   the answer stays `Unavailable`.
//! - any other error: the change was not applied.
//!
//! # Metrics
//!
//! With the cargo feature `metrics`, every counter of [`Stats`] and two
//! latency histograms go through the [`metrics`](https://docs.rs/metrics)
//! facade, labelled with the backend: `metadatacache_<counter>_total`
//! (`downloads`, `not_modified`, `uploads`, `conflicts`,
//! `conflict_versions`, `retries`,
//! `give_ups`, `lost_replies`, `lost_replies_settled`, `read_retries`,
//! `hits`, `watch_gaps`), `metadatacache_operation_seconds{op, outcome}`
//! (`get`, `update`, `remove`, `reset`) and
//! `metadatacache_storage_seconds{op, outcome}` (`download`, `upload`,
//! `delete`), where `outcome` is `ok` or the error's kind. A service
//! installs one recorder at start-up, for Prometheus for example:
//!
//! ```text
//! metrics_exporter_prometheus::PrometheusBuilder::new()
//!     .with_http_listener(([0, 0, 0, 0], 9000))
//!     .install()?;
//! ```
//!
//! # Consistency
//!
//! Every [`Store::get`] and [`Store::update`] revalidates the cached copy
//! (unless [`Options::max_staleness`] allows an older one), so a change made
//! by any replica is visible to every read that starts after it completed.
//! Tasks queued on one key share a revalidation that started after their
//! call, instead of one round trip each. An update of a key this store
//! wrote last may skip the revalidation and let its compare-and-swap check
//! the cached version instead ([`Options::optimistic_writes`]); an outcome
//! is still never decided on a stale value.
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]

mod backend;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod storage;
mod store;
#[cfg(any(feature = "history", feature = "testing"))]
pub mod testing;

pub use backend::disk::{DiskOptions, DiskStep, DiskStorage};
#[cfg(feature = "etcd")]
pub use backend::etcd::{EtcdConfig, EtcdStorage};
pub use backend::memory::MemoryStorage;
#[cfg(feature = "nats")]
pub use backend::nats::{NatsConfig, NatsStorage};
#[cfg(feature = "s3")]
pub use backend::object_store::{
    AzureConfig, GcsConfig, ObjectStoreConfig, ObjectStoreStorage, S3Config,
};
pub use backend::open::open;
#[cfg(feature = "postgres")]
pub use backend::postgres::{PostgresConfig, PostgresStorage};
pub use backend::util::redact_url;
pub use error::{Error, ErrorKind, Result};
pub use storage::{
    Capabilities, Change, ChangeSender, ChangeStream, DownloadRequest, DownloadResponse, EntryKind,
    FileInfo, MAX_PATH_LEN, MAX_SEGMENT_LEN, Storage, UploadRequest, UploadResponse,
    check_delete_precondition, check_upload_preconditions, new_write_token, parent, validate_path,
};
pub use store::{Codec, JsonCodec, KeyGuard, Options, RetryPolicy, Stats, Store};

//! Storage backends and opening one from a URL.

#[cfg(any(feature = "etcd", feature = "postgres"))]
pub(crate) mod combine;
pub(crate) mod disk;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
pub(crate) mod memory;
#[cfg(feature = "nats")]
pub(crate) mod nats;
#[cfg(feature = "s3")]
pub(crate) mod object_store;
pub(crate) mod open;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(any(feature = "etcd", feature = "postgres", feature = "nats"))]
pub(crate) mod tls;
pub(crate) mod util;

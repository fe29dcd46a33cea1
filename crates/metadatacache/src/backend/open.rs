//! Opening a storage from a URL, the same in code and on the command line.

use std::sync::Arc;

use crate::backend::disk::DiskStorage;
use crate::backend::memory::MemoryStorage;
use crate::backend::util::redact_url;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// Opens the storage a URL names.
///
/// | URL | storage |
/// |---|---|
/// | `memory:` | a new, empty [`MemoryStorage`] |
/// | `disk:PATH`, or a bare `PATH` | [`DiskStorage::open`]`(PATH)`: `disk:./data`, `disk:/abs/dir`, `./data`, `/abs/dir` (`disk:///abs/dir` works too) |
/// | `etcd://…`, `postgres://…` | the etcd and PostgreSQL backends (cargo features `etcd`, `postgres`) |
/// | `s3://…`, `az://…`, `gs://…` | `ObjectStoreStorage`: S3, Azure Blob Storage, Google Cloud Storage (cargo feature `s3`) |
///
/// A bare path is anything that does not start with a URL scheme
/// (`letters:`); write a path that does as `disk:PATH`.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the URL
/// for an unknown scheme or a malformed URL; the backend's own errors when it
/// cannot be opened.
///
/// # Cancel safety
/// Cancel safe: opening writes no document (a disk directory or a
/// PostgreSQL table created half-way is created again by the next open).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let storage = metadatacache::open("memory:").await?;
/// assert_eq!(storage.backend(), "memory");
/// let err = metadatacache::open("ftp://example/x").await.unwrap_err();
/// assert!(err.to_string().contains("ftp://example/x"));
/// # Ok::<_, metadatacache::Error>(()) }).unwrap();
/// ```
pub async fn open(url: &str) -> Result<Arc<dyn Storage>> {
    let scheme = url.split_once(':').map(|(s, _)| s).filter(|s| is_scheme(s));
    match scheme {
        Some("memory") => Ok(Arc::new(MemoryStorage::from_url(url)?)),
        Some("disk") => open_disk(url).await,
        None if !url.is_empty() => open_disk(url).await,
        Some("etcd" | "etcds") => {
            #[cfg(feature = "etcd")]
            return Ok(Arc::new(
                crate::backend::etcd::EtcdStorage::from_url(url).await?,
            ));
            #[cfg(not(feature = "etcd"))]
            return Err(feature_missing(url, "etcd"));
        }
        Some("postgres" | "postgresql") => {
            #[cfg(feature = "postgres")]
            return Ok(Arc::new(
                crate::backend::postgres::PostgresStorage::from_url(url).await?,
            ));
            #[cfg(not(feature = "postgres"))]
            return Err(feature_missing(url, "postgres"));
        }
        Some("s3" | "az" | "gs") => {
            #[cfg(feature = "s3")]
            return Ok(Arc::new(
                crate::backend::object_store::ObjectStoreStorage::from_url(url).await?,
            ));
            #[cfg(not(feature = "s3"))]
            return Err(feature_missing(url, "s3"));
        }
        Some("nats" | "tls") => {
            #[cfg(feature = "nats")]
            return Ok(Arc::new(
                crate::backend::nats::NatsStorage::from_url(url).await?,
            ));
            #[cfg(not(feature = "nats"))]
            return Err(feature_missing(url, "nats"));
        }
        _ => Err(Error::invalid_input(format!(
            "unsupported storage URL {:?}; expected memory:, disk:PATH, a path, \
             etcd://, postgres:// (postgresql://), s3://, az://, gs://, nats:// or tls://",
            redact_url(url)
        ))),
    }
}

/// The error for a URL whose backend was left out of this build.
#[allow(dead_code)]
fn feature_missing(url: &str, feature: &str) -> Error {
    Error::invalid_input(format!(
        "storage URL {:?} needs the {feature} backend, which this build leaves out \
         (cargo feature \"{feature}\")",
        redact_url(url)
    ))
}

/// True for a URL scheme: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Opens a [`DiskStorage`] off the async threads (it creates the directory
/// and sweeps stale temp files).
async fn open_disk(url: &str) -> Result<Arc<dyn Storage>> {
    let url = url.to_owned();
    match tokio::task::spawn_blocking(move || DiskStorage::from_url(&url)).await {
        Ok(storage) => Ok(Arc::new(storage?)),
        Err(e) => Err(
            Error::new(ErrorKind::Unavailable, "opening the disk storage failed")
                .with_backend("disk")
                .with_source(e),
        ),
    }
}

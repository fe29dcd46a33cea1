//! Opening a storage from a URL, the same in code and on the command line.

use std::sync::Arc;

use crate::backend::memory::MemoryStorage;
use crate::error::{Error, Result};
use crate::storage::Storage;

/// Opens the storage a URL names.
///
/// | URL | storage |
/// |---|---|
/// | `memory:` | a new, empty [`MemoryStorage`] |
///
/// # Errors
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the URL
/// for an unknown scheme or a malformed URL; the backend's own errors when it
/// cannot be opened.
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
    let scheme = url.split_once(':').map(|(s, _)| s);
    match scheme {
        Some("memory") => Ok(Arc::new(MemoryStorage::new())),
        _ => Err(Error::invalid_input(format!(
            "unsupported storage URL {url:?}; expected memory:"
        ))),
    }
}

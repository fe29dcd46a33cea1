//! How values become bytes and back.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

/// Encodes values for storage and decodes stored documents.
///
/// The default is [`JsonCodec`]. A codec must be deterministic enough that
/// decoding what it encoded gives an equal value.
pub trait Codec<V>: Send + Sync + 'static {
    /// Encodes `value`.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] when the value cannot be represented.
    fn encode(&self, value: &V) -> Result<Bytes>;

    /// Decodes a stored document.
    ///
    /// # Errors
    /// [`ErrorKind::Codec`] when the bytes are not a valid document.
    fn decode(&self, bytes: &[u8]) -> Result<V>;
}

/// JSON via `serde_json`: stored documents stay readable with `cat`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl<V: Serialize + DeserializeOwned> Codec<V> for JsonCodec {
    fn encode(&self, value: &V) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::new(ErrorKind::Codec, "cannot encode value as JSON").with_source(e))
    }

    fn decode(&self, bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|e| {
            let what = if bytes.is_empty() {
                "empty document is not valid JSON"
            } else {
                "stored document is not valid JSON for this type"
            };
            Error::new(ErrorKind::Codec, what).with_source(e)
        })
    }
}

//! What a download returns (apart from the rest of the storage types, so
//! that an error can carry one).

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;

/// What a successful download returns.
#[derive(Clone, PartialEq, Eq)]
pub struct DownloadResponse {
    /// The stored bytes.
    pub content: Bytes,
    /// The etag of this version.
    pub etag: String,
    /// Its modification time.
    pub mtime: SystemTime,
    /// The [`UploadRequest::write_token`](super::UploadRequest::write_token)
    /// of the write that made this version, on backends that store one
    /// ([`Capabilities::write_tokens`](super::Capabilities::write_tokens));
    /// `None` elsewhere.
    pub write_token: Option<String>,
}

impl fmt::Debug for DownloadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadResponse")
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("etag", &self.etag)
            .field("mtime", &self.mtime)
            .field("write_token", &self.write_token)
            .finish()
    }
}

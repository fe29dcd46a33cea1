//! What a backend declares it can do.

/// What a [`Storage`](super::Storage) can do beyond the operations every
/// backend has.
///
/// A store and the conformance suite rely only on what a backend declares here.
/// New fields may be added; build a value from [`Capabilities::default`]
/// (nothing declared) and set what holds:
///
/// ```
/// let mut caps = metadatacache::Capabilities::default();
/// caps.unique_etags = true;
/// assert!(!caps.write_tokens);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Every version gets an etag the path never had before, also after a
    /// delete and a re-create: once the etag moved away from `e`, no write with
    /// `if_match: e` can ever succeed again. Revision numbers (etcd, NATS) and
    /// writer-chosen unique etags (memory, PostgreSQL) have this; content
    /// hashes (disk, S3) do not, since equal content has an equal etag. With
    /// it, a store may resend a write whose reply was lost: of all copies, at
    /// most one can land.
    pub unique_etags: bool,
    /// The backend stores
    /// [`UploadRequest::write_token`](super::UploadRequest::write_token) with
    /// the version it writes and returns it in
    /// [`DownloadResponse::write_token`](super::DownloadResponse::write_token),
    /// so a writer whose reply was lost can see that its write landed.
    pub write_tokens: bool,
    /// [`Storage::delete_if_match`](super::Storage::delete_if_match) is checked
    /// by the server atomically with the delete (never a read followed by an
    /// unconditional delete).
    pub conditional_delete: bool,
    /// The backend can report changes to documents as they happen.
    pub notifications: bool,
    /// [`Storage::upload_many`](super::Storage::upload_many) and
    /// [`Storage::download_many`](super::Storage::download_many) send several
    /// requests in one round trip, so a store combines the concurrent writes,
    /// and reads, of different keys into them.
    pub combined_calls: bool,
    /// An upload that `if_match` or `if_none_match` refused carries the stored
    /// version ([`Error::current`](crate::Error::current)): the one that
    /// refused it, or one stored after it.
    pub current_on_conflict: bool,
    /// Directories are stored:
    /// [`Storage::make_dir_if_not_exist`](super::Storage::make_dir_if_not_exist)
    /// creates one that exists (and is listed) while empty. Elsewhere a
    /// directory exists only while a document lies below it.
    pub directories: bool,
}

impl Capabilities {
    /// What a backend that keeps versions on its server offers: etags that
    /// never repeat, stored write tokens, and conditional deletes checked with
    /// the delete.
    pub const VERSIONED: Capabilities = Capabilities {
        unique_etags: true,
        write_tokens: true,
        conditional_delete: true,
        notifications: false,
        directories: false,
        combined_calls: false,
        current_on_conflict: false,
    };
}

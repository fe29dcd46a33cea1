//! Reads: object keys of storage paths and back, downloads (conditional
//! where the service can), and the file info of an object.

use std::borrow::Cow;
use std::time::SystemTime;

use ::object_store::list::PaginatedListOptions;
use ::object_store::path::{DELIMITER, Path as ObjectPath};
use ::object_store::{GetOptions, ObjectMeta, ObjectStore};

use super::ObjectStoreStorage;
use super::client::{EtagStyle, Op};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{DownloadRequest, DownloadResponse, EntryKind, FileInfo, validate_path};

impl ObjectStoreStorage {
    /// The object key of storage path `path` ("" is the prefix itself).
    pub(super) fn key(&self, path: &str) -> Result<ObjectPath> {
        let key = match (self.prefix.is_empty(), path.is_empty()) {
            (true, _) => path.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{path}", self.prefix),
        };
        ObjectPath::parse(&key).map_err(|e| {
            self.tag(
                Error::invalid_input("not a valid object key")
                    .with_path(path)
                    .with_source(e),
            )
        })
    }

    /// Fails, naming the bucket, when the bucket does not exist: a listing
    /// of at most one object at `key` (storage path `path`). A HEAD's 404
    /// has no body to tell a missing bucket from a missing object.
    pub(super) async fn check_bucket(&self, path: &str, key: &ObjectPath) -> Result<()> {
        let listed = async {
            match &self.pages {
                Some(pages) => {
                    let opts = PaginatedListOptions {
                        max_keys: Some(1),
                        ..PaginatedListOptions::default()
                    };
                    pages
                        .list_paginated(Some(key.as_ref()), opts)
                        .await
                        .map(drop)
                }
                None => self.store.list_with_delimiter(Some(key)).await.map(drop),
            }
        };
        self.timed(path, false, async {
            listed.await.map_err(self.map(Op::Read, path))
        })
        .await
    }

    /// The object at `key` (storage path `path`), `None` when there is
    /// none; fails naming the bucket when it is the bucket that is missing
    /// (see [`check_bucket`](Self::check_bucket)).
    pub(super) async fn head_in_bucket(
        &self,
        path: &str,
        key: &ObjectPath,
    ) -> Result<Option<ObjectMeta>> {
        let meta = self.head(path, key).await?;
        if meta.is_none() {
            self.check_bucket(path, key).await?;
        }
        Ok(meta)
    }

    /// The common prefixes and objects directly below object key `key`
    /// (storage path `path`): page by page, each within the timeout, with
    /// [`with_pages`](ObjectStoreStorage::with_pages); else in one call.
    pub(super) async fn list(
        &self,
        path: &str,
        key: &ObjectPath,
    ) -> Result<(Vec<ObjectPath>, Vec<ObjectMeta>)> {
        let prefix = (!key.as_ref().is_empty()).then_some(key);
        let Some(pages) = &self.pages else {
            let listed = self.store.list_with_delimiter(prefix);
            let listed = self
                .timed_listing(path, async {
                    listed.await.map_err(self.map(Op::Read, path))
                })
                .await?;
            return Ok((listed.common_prefixes, listed.objects));
        };
        // A paginated listing takes its prefix as given: end it with the
        // delimiter, or "a/b" would list "a/bc" too.
        let prefix = prefix.map(|k| format!("{k}{DELIMITER}"));
        let (mut dirs, mut objects) = (Vec::new(), Vec::new());
        let mut token = None;
        loop {
            let opts = PaginatedListOptions {
                delimiter: Some(Cow::Borrowed(DELIMITER)),
                page_token: token,
                ..PaginatedListOptions::default()
            };
            let page = pages.list_paginated(prefix.as_deref(), opts);
            let page = self
                .timed(path, false, async {
                    page.await.map_err(self.map(Op::Read, path))
                })
                .await?;
            dirs.extend(page.result.common_prefixes);
            objects.extend(page.result.objects);
            token = page.page_token;
            if token.is_none() {
                return Ok((dirs, objects));
            }
        }
    }

    /// The storage path of object key `key`, if it lies under the prefix.
    pub(super) fn path_of<'a>(&self, key: &'a ObjectPath) -> Option<&'a str> {
        let key: &str = key.as_ref();
        let rel = if self.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?
        };
        validate_path(rel, false).ok().map(|()| rel)
    }

    /// One download. With one `if_none_match` etag it is a conditional GET
    /// (a 304 answer transfers no content); on GCS, whose etags here are
    /// generations that `If-None-Match` does not compare, a HEAD decides
    /// instead.
    pub(super) async fn download_inner(
        &self,
        req: &DownloadRequest,
        key: &ObjectPath,
    ) -> Result<DownloadResponse> {
        let path = req.path.as_str();
        let not_modified =
            || self.tag(Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path));
        let mut opts = GetOptions::default();
        if self.etags == EtagStyle::Generation && !req.if_none_match.is_empty() {
            let Some(meta) = self.head_in_bucket(path, key).await? else {
                return Err(self.tag(Error::not_found("no such document").with_path(path)));
            };
            let etag = self.etag_of(path, self.etag_in(&meta))?;
            if req.if_none_match.iter().any(|e| *e == etag || e == "*") {
                return Err(not_modified());
            }
        } else if let [etag] = req.if_none_match.as_slice()
            && etag != "*"
        {
            opts.if_none_match = Some(etag.clone());
        }
        let got = self
            .store
            .get_opts(key, opts)
            .await
            .map_err(self.map(Op::Read, path))?;
        let etag = self.etag_of(path, self.etag_in(&got.meta))?;
        let mtime = SystemTime::from(got.meta.last_modified);
        // Several etags, or "*": checked here, after the transfer.
        if req.if_none_match.iter().any(|e| *e == etag || e == "*") {
            return Err(not_modified());
        }
        let content = got.bytes().await.map_err(self.map(Op::Read, path))?;
        Ok(DownloadResponse {
            content,
            etag,
            mtime,
            write_token: None,
        })
    }

    /// The file info of the object `meta` describes, at storage path `path`.
    pub(super) fn file_info(&self, path: &str, meta: ObjectMeta) -> FileInfo {
        FileInfo {
            path: path.to_owned(),
            kind: EntryKind::File,
            size: meta.size,
            mtime: Some(SystemTime::from(meta.last_modified)),
            etag: self.etag_in(&meta),
        }
    }
}

//! Puts: plain, conditional, and read-check-write.

use std::time::SystemTime;

use ::object_store::path::Path as ObjectPath;
use ::object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use super::ObjectStoreStorage;
use super::client::Op;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{UploadRequest, UploadResponse, check_upload_preconditions};

/// How often a read-check-write upload (`if_none_match` with etags,
/// `if_unmodified_since`, `if_match: "*"`) starts over when another writer
/// changes the document between the read and the conditional write.
const CHECKED_WRITE_ATTEMPTS: usize = 8;

impl ObjectStoreStorage {
    /// One put in `mode`.
    pub(super) async fn put(
        &self,
        path: &str,
        key: &ObjectPath,
        req: &UploadRequest,
        mode: PutMode,
    ) -> Result<UploadResponse> {
        let op = match mode {
            PutMode::Overwrite => Op::Overwrite,
            PutMode::Create => Op::Create,
            PutMode::Update(_) => Op::Update,
        };
        let payload = PutPayload::from(req.content.clone());
        let res = self
            .write_store
            .put_opts(key, payload, PutOptions::from(mode))
            .await
            .map_err(self.map(op, path))?;
        let etag = self.etag_written(&res).ok_or_else(|| {
            // The write was applied but cannot be identified.
            self.tag(
                Error::unavailable("the object store returned no etag for the write")
                    .with_path(path),
            )
        })?;
        Ok(UploadResponse {
            etag,
            mtime: SystemTime::now(),
        })
    }

    /// HEAD, check the preconditions locally, then write conditional on the
    /// version read; start over when another writer came in between.
    pub(super) async fn checked_put(
        &self,
        path: &str,
        key: &ObjectPath,
        req: &UploadRequest,
    ) -> Result<UploadResponse> {
        for _ in 0..CHECKED_WRITE_ATTEMPTS {
            let current = self.head(path, key).await?;
            let mode = match &current {
                Some(meta) => {
                    let etag = self.etag_of(path, self.etag_in(meta))?;
                    let mtime = SystemTime::from(meta.last_modified);
                    check_upload_preconditions(req, Some((&etag, mtime)))
                        .map_err(|e| self.tag(e))?;
                    PutMode::Update(self.version_of(&etag))
                }
                None => {
                    check_upload_preconditions(req, None).map_err(|e| self.tag(e))?;
                    PutMode::Create
                }
            };
            match self.put(path, key, req, mode).await {
                Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                res => return res,
            }
        }
        Err(self.tag(
            Error::new(
                ErrorKind::Aborted,
                "the document kept changing between the precondition check and the write",
            )
            .with_path(path),
        ))
    }
}

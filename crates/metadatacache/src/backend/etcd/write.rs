//! A write: one transaction whose compares are the request's preconditions.

use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};

use super::client::{count_at, kvs_at};
use super::layout::{
    absent, ancestors, check_path, encode_meta, etag, etag_is, exists, mtime_of, revision,
};
use super::{EtcdStorage, response, tag};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{UploadRequest, UploadResponse, check_upload_preconditions, with_current};

/// How often an upload with `if_unmodified_since` re-reads and retries
/// when the document changes between its check and its write.
const MAX_ATTEMPTS: usize = 16;

impl EtcdStorage {
    /// [`Storage::upload`](crate::Storage::upload).
    pub(super) async fn write(&self, req: UploadRequest) -> Result<UploadResponse> {
        let path = req.path.as_str();
        check_path(path, false).map_err(tag)?;
        let doc_key = self.layout.doc(path);
        let meta_key = self.layout.meta(path);
        let under_key = self.layout.under(path);

        // Compares mirroring `check_upload_preconditions`.
        let mut compares = Vec::new();
        if req.is_create_only() {
            compares.push(absent(&doc_key));
        } else {
            match req.if_match.as_deref() {
                Some("*") => compares.push(exists(&doc_key)),
                Some(want) => compares.push(etag_is(&doc_key, want)),
                None => {}
            }
            compares.extend(
                req.if_none_match
                    .iter()
                    .filter_map(|e| revision(e))
                    .map(|r| Compare::mod_revision(doc_key.as_str(), CompareOp::NotEqual, r)),
            );
        }
        // Placement: no document below this path, no document above it.
        compares.push(absent(&under_key).with_prefix());
        compares.extend(ancestors(path).map(|a| absent(&self.layout.doc(a))));

        // The else-branch reads what the compares saw, the document with
        // its value, which a refused write returns.
        let mut on_failure = vec![
            TxnOp::get(doc_key.as_str(), None),
            TxnOp::get(meta_key.as_str(), None),
            TxnOp::get(
                under_key.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ];
        on_failure.extend(
            ancestors(path)
                .map(|a| TxnOp::get(self.layout.doc(a), Some(GetOptions::new().with_keys_only()))),
        );

        let mtime = req.mtime.unwrap_or_else(SystemTime::now);
        let writes = [
            TxnOp::put(doc_key.as_str(), req.content.to_vec(), None),
            TxnOp::put(
                meta_key.as_str(),
                encode_meta(mtime, req.write_token.as_deref()),
                None,
            ),
        ];

        let needs_time = !req.is_create_only() && req.if_unmodified_since.is_some();
        let mut observed = if needs_time {
            Some(self.read_state(path).await?)
        } else {
            None
        };
        for _ in 0..MAX_ATTEMPTS {
            let mut when = compares.clone();
            if let Some(state) = &observed {
                let current = current_of(state.as_ref());
                check_upload_preconditions(&req, current.as_ref().map(|(e, m)| (e.as_str(), *m)))
                    .map_err(tag)?;
                let seen = state.as_ref().map_or(0, |(doc, _)| doc.mod_revision());
                when.push(Compare::mod_revision(
                    doc_key.as_str(),
                    CompareOp::Equal,
                    seen,
                ));
            }
            let txn = Txn::new()
                .when(when)
                .and_then(writes.clone())
                .or_else(on_failure.clone());
            let resp = self.conn.txn(path, txn, true).await?;
            if resp.succeeded() {
                // Written, but without the revision there is no etag to
                // return: report the outcome as unknown.
                let revision = resp.header().map(|h| h.revision()).ok_or_else(|| {
                    tag(Error::unavailable("etcd answered without a revision").with_path(path))
                })?;
                return Ok(UploadResponse {
                    etag: etag(revision),
                    mtime,
                });
            }
            let mut ops = resp.op_responses();
            let doc = kvs_at(&mut ops, 0).into_iter().next();
            let meta = kvs_at(&mut ops, 1).into_iter().next();
            let state = doc.map(|d| (d, meta));
            let current = current_of(state.as_ref());
            if let Err(e) =
                check_upload_preconditions(&req, current.as_ref().map(|(e, m)| (e.as_str(), *m)))
            {
                return Err(tag(with_current(e, || state.map(|(d, m)| response(d, m)))));
            }
            if count_at(&ops, 2) > 0 {
                return Err(tag(Error::invalid_input(
                    "documents lie below this path (it is a directory)",
                )
                .with_path(path)));
            }
            if let Some(doc_parent) = ancestors(path)
                .enumerate()
                .find(|(i, _)| !kvs_at(&mut ops, 3 + i).is_empty())
                .map(|(_, a)| a)
            {
                return Err(tag(Error::invalid_input(format!(
                    "parent {doc_parent:?} is a document"
                ))
                .with_path(path)));
            }
            // Only the `if_unmodified_since` compare can have failed: the
            // document changed after it was read. Check again.
            observed = Some(state);
        }
        Err(tag(Error::new(
            ErrorKind::Aborted,
            "the document kept changing during the upload",
        )
        .with_path(path)))
    }

    /// Reads a document key (keys only) and its metadata.
    async fn read_state(&self, path: &str) -> Result<Option<(KeyValue, Option<KeyValue>)>> {
        let txn = Txn::new().and_then([
            TxnOp::get(
                self.layout.doc(path),
                Some(GetOptions::new().with_keys_only()),
            ),
            TxnOp::get(self.layout.meta(path), None),
        ]);
        let mut ops = self.conn.txn(path, txn, false).await?.op_responses();
        let doc = kvs_at(&mut ops, 0).into_iter().next();
        let meta = kvs_at(&mut ops, 1).into_iter().next();
        Ok(doc.map(|d| (d, meta)))
    }
}

/// The `(etag, mtime)` that the precondition checks compare against.
pub(super) fn current_of(
    state: Option<&(KeyValue, Option<KeyValue>)>,
) -> Option<(String, SystemTime)> {
    state.map(|(doc, meta)| {
        (
            etag(doc.mod_revision()),
            mtime_of(doc, meta.as_ref()).unwrap_or(SystemTime::UNIX_EPOCH),
        )
    })
}

//! Combined calls: plain compare-and-swap updates of several documents in
//! one transaction, and reads of several documents in another.
//!
//! An etcd transaction applies all its writes or none, so each document
//! gets a transaction of its own nested in the one sent: its compare decides
//! its own write, and a refused request never holds up the others.

use std::time::SystemTime;

use etcd_client::{Txn, TxnOp, TxnOpResponse};

use super::client::kvs_at;
use super::layout::{check_path, encode_meta, etag, etag_is};
use super::write::current_of;
use super::{EtcdStorage, answer, response, tag};
use crate::backend::combine::{Limits, combined, each_failed, plain_update};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadRequest, DownloadResponse, Storage, UploadRequest, UploadResponse,
    check_upload_preconditions, with_current,
};

/// One transaction carries at most this many updates (a nested transaction
/// each, within etcd's default of 128 operations per branch) and content
/// bytes (within its default 1.5 MiB request limit).
const LIMITS: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

/// One transaction reads at most this many documents.
const READS: Limits = Limits {
    items: 16,
    bytes: usize::MAX,
};

impl EtcdStorage {
    /// [`Storage::upload_many`](crate::Storage::upload_many).
    pub(super) async fn write_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        combined(
            reqs,
            LIMITS,
            |r| plain_update(r) && check_path(&r.path, false).is_ok(),
            move |req| self.write(req),
            move |reqs| self.update_many(reqs),
        )
        .await
    }

    /// Plain compare-and-swap updates at distinct, valid paths, in one
    /// transaction holding a nested transaction per document: each compares
    /// its own etag, writes when it holds and reads the document when not,
    /// so each request has its own outcome in one round trip.
    async fn update_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let mtimes: Vec<SystemTime> = reqs
            .iter()
            .map(|r| r.mtime.unwrap_or_else(SystemTime::now))
            .collect();
        let each = reqs.iter().zip(&mtimes).map(|(req, mtime)| {
            let (doc, meta) = (self.layout.doc(&req.path), self.layout.meta(&req.path));
            let want = req.if_match.as_deref().unwrap_or_default();
            let token = req.write_token.as_deref();
            TxnOp::txn(
                Txn::new()
                    .when([etag_is(&doc, want)])
                    .and_then([
                        TxnOp::put(doc.as_str(), req.content.to_vec(), None),
                        TxnOp::put(meta.as_str(), encode_meta(*mtime, token), None),
                    ])
                    // What refused it, returned with the refusal.
                    .or_else([TxnOp::get(doc, None), TxnOp::get(meta, None)]),
            )
        });
        let txn = Txn::new().and_then(each.collect::<Vec<_>>());
        let resp = match self.conn.txn(&reqs[0].path, txn, true).await {
            Ok(resp) => resp,
            Err(e) => return each_failed(&reqs, &e),
        };
        let revision = resp.header().map(|h| h.revision());
        let mut nested = resp.op_responses().into_iter();
        let answer = |(req, mtime): (&UploadRequest, SystemTime)| {
            let path = req.path.as_str();
            match (nested.next(), revision) {
                (Some(TxnOpResponse::Txn(t)), Some(r)) if t.succeeded() => Ok(UploadResponse {
                    etag: etag(r),
                    mtime,
                }),
                (Some(TxnOpResponse::Txn(t)), _) if !t.succeeded() => {
                    let mut ops = t.op_responses();
                    let doc = kvs_at(&mut ops, 0).into_iter().next();
                    let meta = kvs_at(&mut ops, 1).into_iter().next();
                    let state = doc.map(|d| (d, meta));
                    let current = current_of(state.as_ref());
                    let current = current.as_ref().map(|(e, m)| (e.as_str(), *m));
                    let refused = check_upload_preconditions(req, current)
                        .err()
                        .unwrap_or_else(|| {
                            Error::new(ErrorKind::Aborted, "the document changed concurrently")
                        });
                    let refused = with_current(refused, || state.map(|(d, m)| response(d, m)));
                    Err(tag(refused.with_path(path)))
                }
                // Written, but without the revision there is no etag to
                // return; or an answer that does not fit the request: the
                // outcome is unknown.
                _ => Err(tag(Error::unavailable(
                    "etcd's answer to a combined write left this one unclear; it may have \
                     been applied",
                )
                .with_path(path))),
            }
        };
        reqs.iter().zip(mtimes).map(answer).collect()
    }

    /// [`Storage::download_many`](crate::Storage::download_many): up to 16
    /// documents per transaction, read whole; an `if_none_match` is checked
    /// here, so a version not modified is still sent.
    pub(super) async fn read_many(
        &self,
        reqs: Vec<DownloadRequest>,
    ) -> Vec<Result<DownloadResponse>> {
        combined(
            reqs,
            READS,
            |r| check_path(&r.path, false).is_ok(),
            move |req| self.download(req),
            move |reqs| self.read_together(reqs),
        )
        .await
    }

    /// Reads at distinct, valid paths, in one transaction.
    async fn read_together(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        let ops = reqs.iter().flat_map(|r| {
            [
                TxnOp::get(self.layout.doc(&r.path), None),
                TxnOp::get(self.layout.meta(&r.path), None),
            ]
        });
        let txn = Txn::new().and_then(ops.collect::<Vec<_>>());
        let mut ops = match self.conn.txn(&reqs[0].path, txn, false).await {
            Ok(resp) => resp.op_responses(),
            Err(e) => return each_failed(&reqs, &e),
        };
        (0..reqs.len())
            .map(|k| {
                let doc = kvs_at(&mut ops, 2 * k).into_iter().next();
                let meta = kvs_at(&mut ops, 2 * k + 1).into_iter().next();
                answer(&reqs[k], doc, meta)
            })
            .collect()
    }
}

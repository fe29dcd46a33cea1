//! Combined writes: plain compare-and-swap updates of several documents in
//! one transaction, with a compare per document.
//!
//! An etcd transaction applies all its writes or none, so each document
//! gets a transaction of its own nested in the one sent: its compare decides
//! its own write, and a refused request never holds up the others.

use std::time::SystemTime;

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use futures_util::future::join_all;

use super::client::kvs_at;
use super::layout::{check_path, encode_meta, etag, etag_is, mtime_of, token_of};
use super::{EtcdStorage, tag};
use crate::backend::combine::{Limits, upload_combined};
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{
    DownloadRequest, DownloadResponse, UploadRequest, UploadResponse, check_upload_preconditions,
};

/// One transaction reads at most this many documents.
const READS: usize = 16;

/// One transaction carries at most this many updates (a nested transaction
/// each, within etcd's default of 128 operations per branch) and content
/// bytes (within its default 1.5 MiB request limit).
const LIMITS: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

impl EtcdStorage {
    /// [`Storage::upload_many`](crate::Storage::upload_many).
    pub(super) async fn write_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        upload_combined(
            reqs,
            LIMITS,
            move |req| self.write(req),
            move |reqs| self.update_many(reqs),
        )
        .await
    }

    /// Plain compare-and-swap updates at distinct paths, in one transaction
    /// holding a nested transaction per document: each compares its own
    /// etag, writes when it holds and reads the document when not, so each
    /// request has its own outcome in one round trip.
    async fn update_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let mut out: Vec<Option<Result<UploadResponse>>> = reqs
            .iter()
            .map(|r| check_path(&r.path, false).err().map(|e| Err(tag(e))))
            .collect();
        let live: Vec<usize> = (0..reqs.len()).filter(|&i| out[i].is_none()).collect();
        let Some(&first) = live.first() else {
            return out.into_iter().flatten().collect();
        };
        let mtimes: Vec<SystemTime> = reqs
            .iter()
            .map(|r| r.mtime.unwrap_or_else(SystemTime::now))
            .collect();
        let each = live.iter().map(|&i| {
            let req = &reqs[i];
            let (doc, meta) = (self.layout.doc(&req.path), self.layout.meta(&req.path));
            let want = req.if_match.as_deref().unwrap_or_default();
            let token = req.write_token.as_deref();
            TxnOp::txn(
                Txn::new()
                    .when([etag_is(&doc, want)])
                    .and_then([
                        TxnOp::put(doc.as_str(), req.content.to_vec(), None),
                        TxnOp::put(meta.as_str(), encode_meta(mtimes[i], token), None),
                    ])
                    .or_else([
                        TxnOp::get(doc, Some(GetOptions::new().with_keys_only())),
                        TxnOp::get(meta, None),
                    ]),
            )
        });
        let txn = Txn::new().and_then(each.collect::<Vec<_>>());
        let resp = match self.conn.txn(&reqs[first].path, txn, true).await {
            Ok(resp) => resp,
            Err(e) => {
                for &i in &live {
                    out[i] = Some(Err(e.duplicate().with_path(&reqs[i].path)));
                }
                return out.into_iter().flatten().collect();
            }
        };
        let revision = resp.header().map(|h| h.revision());
        let mut nested = resp.op_responses().into_iter();
        for &i in &live {
            let path = reqs[i].path.as_str();
            out[i] = Some(match (nested.next(), revision) {
                (Some(TxnOpResponse::Txn(t)), Some(r)) if t.succeeded() => Ok(UploadResponse {
                    etag: etag(r),
                    mtime: mtimes[i],
                }),
                (Some(TxnOpResponse::Txn(t)), _) if !t.succeeded() => {
                    let mut ops = t.op_responses();
                    let doc = kvs_at(&mut ops, 0).into_iter().next();
                    let meta = kvs_at(&mut ops, 1).into_iter().next();
                    let current = doc.map(|d| {
                        let mtime = mtime_of(&d, meta.as_ref()).unwrap_or(SystemTime::UNIX_EPOCH);
                        (etag(d.mod_revision()), mtime)
                    });
                    let current = current.as_ref().map(|(e, m)| (e.as_str(), *m));
                    Err(tag(check_upload_preconditions(&reqs[i], current)
                        .err()
                        .unwrap_or_else(|| {
                            Error::new(ErrorKind::Aborted, "the document changed concurrently")
                        })
                        .with_path(path)))
                }
                // Written, but without the revision there is no etag to
                // return; or an answer that does not fit the request: the
                // outcome is unknown.
                _ => Err(tag(Error::unavailable(
                    "etcd's answer to a combined write left this one unclear; it may have \
                     been applied",
                )
                .with_path(path))),
            });
        }
        out.into_iter().flatten().collect()
    }
}

impl EtcdStorage {
    /// [`Storage::download_many`](crate::Storage::download_many): up to
    /// [`READS`] documents per transaction, read whole; an `if_none_match`
    /// is checked here, so a version not modified is still sent.
    pub(super) async fn read_many(
        &self,
        reqs: Vec<DownloadRequest>,
    ) -> Vec<Result<DownloadResponse>> {
        let chunks = join_all(reqs.chunks(READS).map(|c| self.read_chunk(c))).await;
        chunks.into_iter().flatten().collect()
    }

    async fn read_chunk(&self, reqs: &[DownloadRequest]) -> Vec<Result<DownloadResponse>> {
        let mut out: Vec<Option<Result<DownloadResponse>>> = reqs
            .iter()
            .map(|r| check_path(&r.path, false).err().map(|e| Err(tag(e))))
            .collect();
        let live: Vec<usize> = (0..reqs.len()).filter(|&i| out[i].is_none()).collect();
        let Some(&first) = live.first() else {
            return out.into_iter().flatten().collect();
        };
        let ops = live.iter().flat_map(|&i| {
            [
                TxnOp::get(self.layout.doc(&reqs[i].path), None),
                TxnOp::get(self.layout.meta(&reqs[i].path), None),
            ]
        });
        let txn = Txn::new().and_then(ops.collect::<Vec<_>>());
        let mut ops = match self.conn.txn(&reqs[first].path, txn, false).await {
            Ok(resp) => resp.op_responses(),
            Err(e) => {
                for &i in &live {
                    out[i] = Some(Err(e.duplicate().with_path(&reqs[i].path)));
                }
                return out.into_iter().flatten().collect();
            }
        };
        for (k, &i) in live.iter().enumerate() {
            let doc = kvs_at(&mut ops, 2 * k).into_iter().next();
            let meta = kvs_at(&mut ops, 2 * k + 1).into_iter().next();
            out[i] = Some(answer(&reqs[i], doc, meta));
        }
        out.into_iter().flatten().collect()
    }
}

/// The answer to `req` from the document and metadata keys read for it.
fn answer(
    req: &DownloadRequest,
    doc: Option<KeyValue>,
    meta: Option<KeyValue>,
) -> Result<DownloadResponse> {
    let path = req.path.as_str();
    let Some(doc) = doc else {
        return Err(tag(Error::not_found("no such document").with_path(path)));
    };
    let etag = etag(doc.mod_revision());
    if req.if_none_match.iter().any(|e| e == "*" || *e == etag) {
        return Err(tag(
            Error::new(ErrorKind::NotModified, "etag unchanged").with_path(path)
        ));
    }
    let mtime = mtime_of(&doc, meta.as_ref()).unwrap_or(SystemTime::UNIX_EPOCH);
    let write_token = token_of(&doc, meta.as_ref());
    let (_, value) = doc.into_key_value();
    Ok(DownloadResponse {
        content: Bytes::from(value),
        etag,
        mtime,
        write_token,
    })
}

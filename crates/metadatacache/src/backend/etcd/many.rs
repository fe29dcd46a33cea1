//! Combined writes: plain compare-and-swap updates of several documents in
//! one transaction, with a compare per document.
//!
//! An etcd transaction applies all its writes or none. When one compare
//! fails, the transaction's else-branch reads every document, so each
//! request whose etag moved is answered with its refusal at once and the
//! rest are sent again together: a refused request costs the others one
//! more round trip, never their write.

use std::time::SystemTime;

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue, Txn, TxnOp};
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

/// One transaction carries at most this many updates (two puts each, within
/// etcd's default of 128 operations per branch) and content bytes (within
/// its default 1.5 MiB request limit).
const LIMITS: Limits = Limits {
    items: 32,
    bytes: 1 << 20,
};

/// How often the requests whose compares held are sent again after others
/// were refused.
const ROUNDS: usize = 4;

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
    /// per round.
    async fn update_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let mut out: Vec<Option<Result<UploadResponse>>> = reqs
            .iter()
            .map(|r| check_path(&r.path, false).err().map(|e| Err(tag(e))))
            .collect();
        let mtimes: Vec<SystemTime> = reqs
            .iter()
            .map(|r| r.mtime.unwrap_or_else(SystemTime::now))
            .collect();
        let mut pending: Vec<usize> = (0..reqs.len()).filter(|&i| out[i].is_none()).collect();
        for _ in 0..ROUNDS {
            if pending.is_empty() {
                break;
            }
            let mut when = Vec::new();
            let mut writes = Vec::new();
            let mut reads = Vec::new();
            for &i in &pending {
                let req = &reqs[i];
                let (doc, meta) = (self.layout.doc(&req.path), self.layout.meta(&req.path));
                let want = req.if_match.as_deref().unwrap_or_default();
                when.push(etag_is(&doc, want));
                writes.push(TxnOp::put(doc.as_str(), req.content.to_vec(), None));
                writes.push(TxnOp::put(
                    meta.as_str(),
                    encode_meta(mtimes[i], req.write_token.as_deref()),
                    None,
                ));
                reads.push(TxnOp::get(doc, Some(GetOptions::new().with_keys_only())));
                reads.push(TxnOp::get(meta, None));
            }
            let txn = Txn::new().when(when).and_then(writes).or_else(reads);
            let first = reqs[pending[0]].path.as_str();
            let resp = match self.conn.txn(first, txn, true).await {
                Ok(resp) => resp,
                Err(e) => {
                    for &i in &pending {
                        out[i] = Some(Err(e.duplicate().with_path(&reqs[i].path)));
                    }
                    pending.clear();
                    break;
                }
            };
            if resp.succeeded() {
                let revision = resp.header().map(|h| h.revision());
                for &i in &pending {
                    out[i] = Some(match revision {
                        Some(r) => Ok(UploadResponse {
                            etag: etag(r),
                            mtime: mtimes[i],
                        }),
                        // Written, but without the revision there is no
                        // etag to return: report the outcome as unknown.
                        None => Err(tag(Error::unavailable("etcd answered without a revision")
                            .with_path(&reqs[i].path))),
                    });
                }
                pending.clear();
                break;
            }
            let mut ops = resp.op_responses();
            let mut again = Vec::new();
            for (k, &i) in pending.iter().enumerate() {
                let doc = kvs_at(&mut ops, 2 * k).into_iter().next();
                let meta = kvs_at(&mut ops, 2 * k + 1).into_iter().next();
                let current = doc.map(|d| {
                    let mtime = mtime_of(&d, meta.as_ref()).unwrap_or(SystemTime::UNIX_EPOCH);
                    (etag(d.mod_revision()), mtime)
                });
                let current = current.as_ref().map(|(e, m)| (e.as_str(), *m));
                match check_upload_preconditions(&reqs[i], current) {
                    Err(e) => out[i] = Some(Err(tag(e.with_path(&reqs[i].path)))),
                    Ok(()) => again.push(i),
                }
            }
            pending = again;
        }
        for i in pending {
            out[i] = Some(Err(tag(Error::new(
                ErrorKind::Aborted,
                "other documents of the combined write kept changing",
            )
            .with_path(&reqs[i].path))));
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

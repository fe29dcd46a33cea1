//! Splitting a [`Storage::upload_many`](crate::Storage::upload_many) call
//! for a backend that writes several plain compare-and-swap updates in one
//! round trip: which requests go together, in groups within the backend's
//! limits, and which are written alone.

use std::collections::HashSet;
use std::future::Future;

use futures_util::future::join_all;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{UploadRequest, UploadResponse};

/// How many requests, and how many content bytes, one combined write may
/// carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) items: usize,
    pub(crate) bytes: usize,
}

/// Whether `req` is a plain compare-and-swap update: `if_match` one etag
/// and no other precondition.
fn combinable(req: &UploadRequest, limits: Limits) -> bool {
    matches!(req.if_match.as_deref(), Some(e) if e != "*")
        && req.if_none_match.is_empty()
        && req.if_unmodified_since.is_none()
        && req.content.len() <= limits.bytes
}

/// The group of each request (`None`: written alone). A path that appears
/// twice is written alone both times.
fn plan(reqs: &[UploadRequest], limits: Limits) -> Vec<Option<usize>> {
    let mut seen = HashSet::new();
    let repeated: HashSet<&str> = reqs
        .iter()
        .filter(|r| !seen.insert(r.path.as_str()))
        .map(|r| r.path.as_str())
        .collect();
    let mut group_of = vec![None; reqs.len()];
    let (mut group, mut items, mut bytes) = (0, 0, 0);
    for (i, req) in reqs.iter().enumerate() {
        if !combinable(req, limits) || repeated.contains(req.path.as_str()) {
            continue;
        }
        if items == limits.items || bytes + req.content.len() > limits.bytes {
            group += 1;
            (items, bytes) = (0, 0);
        }
        group_of[i] = Some(group);
        items += 1;
        bytes += req.content.len();
    }
    group_of
}

/// Runs `reqs`: each group of plain updates through `many` (which answers
/// each request of its group, in order), every other request through
/// `single`, all concurrently; the results in request order.
pub(crate) async fn upload_combined<S, SF, M, MF>(
    reqs: Vec<UploadRequest>,
    limits: Limits,
    single: S,
    many: M,
) -> Vec<Result<UploadResponse>>
where
    S: Fn(UploadRequest) -> SF,
    SF: Future<Output = Result<UploadResponse>>,
    M: Fn(Vec<UploadRequest>) -> MF,
    MF: Future<Output = Vec<Result<UploadResponse>>>,
{
    let group_of = plan(&reqs, limits);
    let n = reqs.len();
    let groups = group_of.iter().flatten().max().map_or(0, |g| g + 1);
    let mut grouped: Vec<Vec<(usize, UploadRequest)>> = (0..groups).map(|_| Vec::new()).collect();
    let mut alone = Vec::new();
    for (i, req) in reqs.into_iter().enumerate() {
        match group_of[i] {
            Some(g) => grouped[g].push((i, req)),
            None => alone.push((i, req)),
        }
    }
    // A group of one gains nothing from the combined form.
    for group in grouped.iter_mut().filter(|g| g.len() == 1) {
        alone.append(group);
    }
    grouped.retain(|g| !g.is_empty());
    let mut order = Vec::new();
    let batches = grouped.into_iter().map(|group| {
        let (idx, reqs): (Vec<usize>, Vec<UploadRequest>) = group.into_iter().unzip();
        order.push(idx);
        many(reqs)
    });
    let batches: Vec<_> = batches.collect();
    let (alone_idx, alone): (Vec<usize>, Vec<UploadRequest>) = alone.into_iter().unzip();
    let (batch_results, alone_results) =
        futures_util::future::join(join_all(batches), join_all(alone.into_iter().map(single)))
            .await;
    let mut out: Vec<Option<Result<UploadResponse>>> = (0..n).map(|_| None).collect();
    for (idx, results) in order.into_iter().zip(batch_results) {
        for (i, res) in idx.into_iter().zip(results) {
            out[i] = Some(res);
        }
    }
    for (i, res) in alone_idx.into_iter().zip(alone_results) {
        out[i] = Some(res);
    }
    out.into_iter()
        .map(|res| {
            res.unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    "a combined write answered too few of its requests; it may have been applied",
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cas(path: &str, size: usize) -> UploadRequest {
        UploadRequest {
            if_match: Some("1".into()),
            ..UploadRequest::new(path, vec![b'x'; size])
        }
    }

    #[test]
    fn groups_keep_within_limits_and_leave_the_rest_alone() {
        let limits = Limits {
            items: 2,
            bytes: 10,
        };
        let reqs = vec![
            cas("a", 4),
            cas("b", 4),
            cas("c", 4),
            UploadRequest::new("d", "x"),
            cas("e", 11),
            cas("f", 4),
            cas("c", 1),
        ];
        // "c" twice: alone both times; "d" is unconditional; "e" too big.
        assert_eq!(
            plan(&reqs, limits),
            vec![Some(0), Some(0), None, None, None, Some(1), None]
        );
    }
}

//! Splitting a [`Storage::upload_many`](crate::Storage::upload_many) or
//! [`Storage::download_many`](crate::Storage::download_many) call for a
//! backend that sends several requests in one round trip: which requests go
//! together, in groups within the backend's limits, and which are sent
//! alone.

use std::collections::HashSet;
use std::future::Future;

use futures_util::future::join_all;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::{DownloadRequest, UploadRequest};

/// How many requests, and how many content bytes, one combined call may
/// carry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) items: usize,
    pub(crate) bytes: usize,
}

/// A request as the grouping sees it.
pub(crate) trait Request {
    fn path(&self) -> &str;
    /// The content bytes it sends.
    fn size(&self) -> usize;
}

impl Request for UploadRequest {
    fn path(&self) -> &str {
        &self.path
    }
    fn size(&self) -> usize {
        self.content.len()
    }
}

impl Request for DownloadRequest {
    fn path(&self) -> &str {
        &self.path
    }
    fn size(&self) -> usize {
        0
    }
}

/// Whether `req` is a plain compare-and-swap update: `if_match` one etag
/// and no other precondition.
pub(crate) fn plain_update(req: &UploadRequest) -> bool {
    matches!(req.if_match.as_deref(), Some(e) if e != "*")
        && req.if_none_match.is_empty()
        && req.if_unmodified_since.is_none()
}

/// `e` for each request of a combined call that failed whole, naming the
/// request's path.
pub(crate) fn each_failed<R: Request, T>(reqs: &[R], e: &Error) -> Vec<Result<T>> {
    reqs.iter()
        .map(|r| Err(e.duplicate().with_path(r.path())))
        .collect()
}

/// The group of each request (`None`: sent alone): those `combinable`
/// accepts, within the limits. A path that appears twice is sent alone
/// both times.
fn plan<R: Request>(
    reqs: &[R],
    limits: Limits,
    combinable: impl Fn(&R) -> bool,
) -> Vec<Option<usize>> {
    let mut seen = HashSet::new();
    let repeated: HashSet<&str> = reqs
        .iter()
        .filter(|r| !seen.insert(r.path()))
        .map(Request::path)
        .collect();
    let mut group_of = vec![None; reqs.len()];
    let (mut group, mut items, mut bytes) = (0, 0, 0);
    for (i, req) in reqs.iter().enumerate() {
        if !combinable(req) || req.size() > limits.bytes || repeated.contains(req.path()) {
            continue;
        }
        if items == limits.items || bytes + req.size() > limits.bytes {
            group += 1;
            (items, bytes) = (0, 0);
        }
        group_of[i] = Some(group);
        items += 1;
        bytes += req.size();
    }
    group_of
}

/// Runs `reqs`: each group of requests that `combinable` accepts through
/// `many` (which answers each request of its group, in order; the paths of
/// a group are distinct), every other request through `single`, all
/// concurrently; the results in request order.
pub(crate) async fn combined<R, T, S, SF, M, MF>(
    reqs: Vec<R>,
    limits: Limits,
    combinable: impl Fn(&R) -> bool,
    single: S,
    many: M,
) -> Vec<Result<T>>
where
    R: Request,
    S: Fn(R) -> SF,
    SF: Future<Output = Result<T>>,
    M: Fn(Vec<R>) -> MF,
    MF: Future<Output = Vec<Result<T>>>,
{
    let group_of = plan(&reqs, limits, combinable);
    let n = reqs.len();
    let groups = group_of.iter().flatten().max().map_or(0, |g| g + 1);
    let mut grouped: Vec<Vec<(usize, R)>> = (0..groups).map(|_| Vec::new()).collect();
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
        let (idx, reqs): (Vec<usize>, Vec<R>) = group.into_iter().unzip();
        order.push(idx);
        many(reqs)
    });
    let batches: Vec<_> = batches.collect();
    let (alone_idx, alone): (Vec<usize>, Vec<R>) = alone.into_iter().unzip();
    let (batch_results, alone_results) =
        futures_util::future::join(join_all(batches), join_all(alone.into_iter().map(single)))
            .await;
    let mut out: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
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
                    "a combined call answered too few of its requests; a write among them may \
                     have been applied",
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
            plan(&reqs, limits, plain_update),
            vec![Some(0), Some(0), None, None, None, Some(1), None]
        );
    }
}

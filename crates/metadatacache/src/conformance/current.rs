//! A refused compare-and-swap returns the stored version where the backend
//! declares [`Capabilities::current_on_conflict`](crate::Capabilities::current_on_conflict),
//! and never a made-up one where it does not.

use crate::error::{Error, ErrorKind};
use crate::storage::{DownloadRequest, Storage, UploadRequest};

use super::{p, two_versions};

/// Uploads refused by `if_match` (stale), `if_none_match: *` (the document
/// exists) and `if_none_match` (the current etag), alone and in a combined
/// call, carry exactly what a download returns then; one refused because
/// the document is missing carries nothing.
pub async fn current_on_conflict(s: &dyn Storage, dir: &str) {
    let declared = s.capabilities().current_on_conflict;
    let path = p(dir, "current.json");
    let (v1, v2) = two_versions(s, &path).await;
    let stored = s
        .download(DownloadRequest::new(&path))
        .await
        .expect("download");
    assert_eq!(stored.etag, v2.etag);
    let refused = [
        (
            "if_match with a stale etag",
            UploadRequest {
                if_match: Some(v1.etag.clone()),
                ..UploadRequest::new(path.clone(), "3")
            },
        ),
        (
            "create-only over a document",
            UploadRequest {
                if_none_match: vec!["*".into()],
                ..UploadRequest::new(path.clone(), "3")
            },
        ),
        (
            "if_none_match with the current etag",
            UploadRequest {
                if_none_match: vec![v2.etag.clone()],
                ..UploadRequest::new(path.clone(), "3")
            },
        ),
    ];
    let check = |case: &str, res: Result<_, Error>| {
        let e = match res {
            Err(e) if e.is_conflict() => e,
            other => panic!("{case}: expected a conflict, got {other:?}"),
        };
        match (declared, e.current()) {
            (true, Some(current)) => {
                assert_eq!(
                    current, &stored,
                    "{case}: the version returned with the refusal"
                );
            }
            (true, None) => panic!("{case}: the refusal carries no version: {e:?}"),
            (false, None) => {}
            (false, Some(_)) => panic!("{case}: a version returned, but not declared"),
        }
    };
    for (case, req) in refused.clone() {
        check(case, s.upload(req).await);
    }
    // The same, each next to a write that lands, in one combined call.
    let other = p(dir, "current-other.json");
    let mut reqs: Vec<UploadRequest> = refused.iter().map(|(_, r)| r.clone()).collect();
    reqs.push(UploadRequest::new(other.clone(), "x"));
    let mut results = s.upload_many(reqs).await;
    results
        .pop()
        .expect("one result per request")
        .expect("the write beside the refused ones");
    for ((case, _), res) in refused.iter().zip(results) {
        check(&format!("{case} (combined)"), res);
    }
    assert_eq!(s.simple_download(&path).await.expect("download"), "2");
    let missing = s
        .upload(UploadRequest {
            if_match: Some(v2.etag.clone()),
            ..UploadRequest::new(p(dir, "current-missing.json"), "x")
        })
        .await;
    match missing {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound | ErrorKind::PreconditionFailed
            ) =>
        {
            assert!(
                e.current().is_none(),
                "if_match on a missing document returned a version: {e:?}"
            );
        }
        other => panic!("if_match on a missing document: {other:?}"),
    }
}

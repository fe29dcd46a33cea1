//! One document: its create-only copy, and its verification.

use std::sync::Arc;

use bytes::Bytes;
use metadatacache::{DownloadRequest, Error, ErrorKind, Storage, UploadRequest};

use super::Outcome;
use super::walk::{ATTEMPTS, pause, retrying, transient};

/// The source's document at `path`, `None` when it is gone.
async fn read(storage: &Arc<dyn Storage>, path: &str) -> Result<Option<Bytes>, Error> {
    match retrying(|| storage.download(DownloadRequest::new(path))).await {
        Ok(d) => Ok(Some(d.content)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Copies `path` from `from` to `to`, create-only: a document already on
/// the target is never overwritten. It counts as already there when it
/// holds the same bytes, as a difference otherwise.
///
/// Transient errors are retried. An upload answered `Unavailable` may have
/// landed: when a later attempt finds the document there with the same
/// bytes, that is this copy.
pub(super) async fn copy_one(
    from: Arc<dyn Storage>,
    to: Arc<dyn Storage>,
    path: String,
) -> Outcome {
    let doc = match retrying(|| from.download(DownloadRequest::new(&path))).await {
        Ok(doc) => doc,
        Err(e) if e.kind() == ErrorKind::NotFound => return Outcome::Vanished,
        Err(e) => return Outcome::Failed(e),
    };
    let parent = metadatacache::parent(&path);
    if !parent.is_empty()
        && let Err(e) = retrying(|| to.make_dir_if_not_exist(parent)).await
    {
        return Outcome::Failed(e);
    }
    let mut maybe_landed = false;
    let mut attempt = 1;
    loop {
        let req = UploadRequest {
            if_none_match: vec!["*".to_owned()],
            mtime: Some(doc.mtime),
            ..UploadRequest::new(path.clone(), doc.content.clone())
        };
        match to.upload(req).await {
            Ok(_) => return Outcome::Copied,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return match read(&to, &path).await {
                    Ok(Some(there)) if there == doc.content => {
                        if maybe_landed {
                            Outcome::Copied
                        } else {
                            Outcome::AlreadyThere
                        }
                    }
                    Ok(Some(_)) => Outcome::Differs,
                    Ok(None) => Outcome::Failed(
                        Error::new(
                            ErrorKind::Aborted,
                            "the target refused the copy as existing, then had no document",
                        )
                        .with_path(&path),
                    ),
                    Err(e) => Outcome::Failed(e),
                };
            }
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                maybe_landed |= e.kind() == ErrorKind::Unavailable;
                pause(attempt).await;
                attempt += 1;
            }
            Err(e) => return Outcome::Failed(e),
        }
    }
}

/// Checks that the target holds `path` with the source's bytes.
pub(super) async fn verify_one(
    from: Arc<dyn Storage>,
    to: Arc<dyn Storage>,
    path: String,
) -> Outcome {
    let source = match read(&from, &path).await {
        Ok(Some(content)) => content,
        Ok(None) => return Outcome::Vanished,
        Err(e) => return Outcome::Failed(e),
    };
    match read(&to, &path).await {
        Ok(Some(target)) if target == source => Outcome::Identical,
        Ok(Some(_)) => Outcome::Differs,
        Ok(None) => Outcome::Missing,
        Err(e) => Outcome::Failed(e),
    }
}

#[cfg(all(test, feature = "faults"))]
mod tests {
    use super::*;
    use metadatacache::MemoryStorage;
    use metadatacache::testing::FaultyStorage;

    fn memory() -> Arc<dyn Storage> {
        Arc::new(MemoryStorage::new())
    }

    #[tokio::test]
    async fn a_lost_reply_whose_copy_landed_counts_as_copied() {
        let (from, inner) = (memory(), memory());
        from.simple_upload("a/doc.json", Bytes::from_static(b"{\"v\":1}"))
            .await
            .unwrap();
        // Every upload lands but answers Unavailable.
        let to: Arc<dyn Storage> =
            Arc::new(FaultyStorage::new(Arc::clone(&inner), 7).ambiguous(1.0));
        let outcome = copy_one(Arc::clone(&from), to, "a/doc.json".into()).await;
        assert!(matches!(outcome, Outcome::Copied), "{outcome:?}");
        assert_eq!(
            inner.simple_download("a/doc.json").await.unwrap(),
            Bytes::from_static(b"{\"v\":1}")
        );
        // Against a target that never answers, the copy fails, named.
        let down: Arc<dyn Storage> = Arc::new(FaultyStorage::new(memory(), 7).unavailable(1.0));
        let outcome = copy_one(from, down, "a/doc.json".into()).await;
        assert!(
            matches!(&outcome, Outcome::Failed(e) if e.kind() == ErrorKind::Unavailable),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn an_existing_document_is_never_overwritten() {
        let (from, to) = (memory(), memory());
        from.simple_upload("d.json", Bytes::from_static(b"old"))
            .await
            .unwrap();
        to.simple_upload("d.json", Bytes::from_static(b"newer"))
            .await
            .unwrap();
        let outcome = copy_one(Arc::clone(&from), Arc::clone(&to), "d.json".into()).await;
        assert!(matches!(outcome, Outcome::Differs), "{outcome:?}");
        assert_eq!(to.simple_download("d.json").await.unwrap(), "newer");
        to.simple_upload("d.json", Bytes::from_static(b"old"))
            .await
            .unwrap();
        let outcome = copy_one(from, to, "d.json".into()).await;
        assert!(matches!(outcome, Outcome::AlreadyThere), "{outcome:?}");
    }
}

//! A large document: what `update` of a ~1 MiB document costs against the
//! raw write it ends in (encode + if-match upload, the etag known).

use std::sync::{Arc, Mutex};

use metadatacache::{Error, Options, Storage, Store, UploadRequest};

use super::report::{Goal, Row, compare};
use super::{Doc, Result, doc_of_size};

/// Just under 1 MiB of JSON, so that it fits a NATS server's default
/// message limit (1 MiB with the headers).
const SIZE: usize = 1000 * 1024;

/// `update` (revalidate the cached value, `f`, encode, upload) of a large
/// document against encoding it and uploading it with `if_match`. `None`
/// (after printing why) when the storage does not take such a document.
pub(super) async fn bench_update_large(
    storage: &Arc<dyn Storage>,
    rounds: usize,
    n: usize,
) -> Result<Option<Row>> {
    let backend = storage.backend().to_owned();
    let doc = doc_of_size(SIZE);
    let body = serde_json::to_vec(&doc).map_err(Error::from)?;
    let ours_path = "bench/large-update.json";
    let raw_path = "bench/large-raw.json";
    let mut etag = String::new();
    for path in [ours_path, raw_path] {
        match storage.simple_upload(path, body.clone().into()).await {
            Ok(put) => etag = put.etag,
            Err(e) => {
                println!("{backend:<8} update ~1 MiB: not measured: {e}");
                return Ok(None);
            }
        }
    }
    let store: Store<u8, Doc> = Store::new(Options::new(Arc::clone(storage), |_: &u8| {
        ours_path.to_owned()
    }));
    store.get(0).await?;
    let raw = Mutex::new((doc, etag));
    let (ours, baseline) = compare(
        rounds,
        n.max(2),
        |_| async {
            store
                .update(0, false, |mut d| {
                    if let Some(item) = d.items.first_mut() {
                        item.created += 1;
                    }
                    Ok::<_, Error>((d, true))
                })
                .await
        },
        |_| async {
            let (body, if_match) = {
                let mut raw = raw
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(item) = raw.0.items.first_mut() {
                    item.created += 1;
                }
                (
                    serde_json::to_vec(&raw.0).map_err(Error::from)?,
                    raw.1.clone(),
                )
            };
            let put = storage
                .upload(UploadRequest {
                    if_match: Some(if_match),
                    ..UploadRequest::new(raw_path, body)
                })
                .await?;
            raw.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1 = put.etag;
            Ok(())
        },
    )
    .await?;
    Ok(Some(Row {
        storage: backend,
        what: "update ~1 MiB vs encode+if-match upload".into(),
        ours,
        baseline,
        goal: Goal::AtMost(1.10),
    }))
}

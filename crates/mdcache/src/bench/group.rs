//! Group commit against its limit: T tasks of one process on one hot key.
//!
//! At best every write carries the updates of all T tasks, so the limit is
//! T updates per write: T divided by the latency of the compare-and-swap
//! upload that ends each batch (the same document, written back to back by
//! one task). Both are measured in the same run, in short alternating
//! rounds; the report shows the round with the median ratio.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metadatacache::{Error, ErrorKind, Options, Storage, Store, UploadRequest};

use super::report::fmt_dur;
use super::{Counter, Result, increment};

/// Prints one row per T: goodput, the limit, their ratio, and how far the
/// stored counter is from the acknowledged updates (lost or doubled: 0).
pub(super) async fn bench_group_commit(storage: &Arc<dyn Storage>, quick: bool) -> Result<()> {
    let backend = storage.backend().to_owned();
    let rounds = if quick { 3 } else { 9 };
    println!();
    println!(
        "{:<8} {:<6} {:>12} {:>10} {:>12} {:>12} {:>8} {:>8}  goal",
        "storage", "tasks", "goodput/s", "per write", "CAS write", "limit/s", "ratio", "lost/dup"
    );
    for tasks in [8usize, 32] {
        let path = format!("bench/group-{tasks}.json");
        let raw = format!("bench/group-{tasks}-raw.json");
        let per_task = if quick { 25 } else { 100 };
        let writes = per_task * 2;
        let store: Store<u8, Counter> = Store::new(
            Options::new(Arc::clone(storage), move |_: &u8| path.clone()).init(Counter::default),
        );
        // An earlier run on the same storage left its count.
        let start = store.get(0).await?.map_or(0, |c| c.count);
        let uploads = store.stats().uploads;
        let mut etag = storage
            .simple_upload(&raw, bytes::Bytes::from_static(b"{\"count\":0}"))
            .await?
            .etag;
        // Short paired rounds: a round's ratio compares its two halves,
        // run back to back, so drift between rounds cancels out.
        let mut paired: Vec<(f64, Duration)> = Vec::new();
        let mut acked = 0u64;
        for _ in 0..rounds {
            let start = Instant::now();
            acked += hammer(&store, tasks, per_task).await?;
            let rate = (tasks * per_task) as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            for i in 0..writes {
                let req = UploadRequest {
                    if_match: Some(etag),
                    ..UploadRequest::new(raw.clone(), format!("{{\"count\":{i}}}"))
                };
                etag = storage.upload(req).await?.etag;
            }
            let write = start.elapsed() / u32::try_from(writes).unwrap_or(u32::MAX);
            paired.push((rate, write));
        }
        let ratio_of = |(rate, write): &(f64, Duration)| rate * write.as_secs_f64() / tasks as f64;
        paired.sort_by(|a, b| ratio_of(a).total_cmp(&ratio_of(b)));
        let median = paired[paired.len() / 2];
        let (rate, write) = median;
        let ratio = ratio_of(&median);
        let counted = store
            .get(0)
            .await?
            .map_or(0, |c| c.count)
            .saturating_sub(start);
        let per_write = acked as f64 / (store.stats().uploads - uploads).max(1) as f64;
        let limit = tasks as f64 / write.as_secs_f64();
        println!(
            "{backend:<8} {tasks:<6} {rate:>12.0} {per_write:>10.1} {:>12} {limit:>12.0} {ratio:>7.2}× {:>8}  ≥ 0.85×: {}",
            fmt_dur(write),
            acked.abs_diff(counted),
            if ratio >= 0.85 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}

/// `tasks` tasks doing `per_task` increments each; the number acknowledged.
async fn hammer(store: &Store<u8, Counter>, tasks: usize, per_task: usize) -> Result<u64> {
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..per_task {
                    store.update(0, true, increment).await?;
                }
                Ok::<_, Error>(per_task as u64)
            })
        })
        .collect();
    let mut acked = 0;
    for h in handles {
        acked += h
            .await
            .map_err(|e| Error::new(ErrorKind::Other, format!("bench task failed: {e}")))??;
    }
    Ok(acked)
}

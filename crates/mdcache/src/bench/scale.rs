//! `bench --ls N`: how long listing a directory of N documents takes.
//!
//! The documents are written once (64 uploads in flight) and kept, so a
//! second run on the same storage only lists.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metadatacache::{Error, ErrorKind, Storage};
use tokio::task::JoinSet;

use super::Result;
use super::report::fmt_dur;

const DIR: &str = "bench/ls";
const IN_FLIGHT: usize = 64;

/// Fills [`DIR`] with `n` small documents (if it holds fewer) and prints the
/// best of three `list_dir` calls over it.
pub(super) async fn bench_ls(storage: &Arc<dyn Storage>, n: usize) -> Result<()> {
    let backend = storage.backend().to_owned();
    storage.make_dir_if_not_exist(DIR).await?;
    let have = match storage.list_dir(DIR).await {
        Ok(entries) => entries.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let filled = Instant::now();
    if have < n {
        fill(storage, have, n).await?;
        println!(
            "{backend:<8} wrote {} documents for the listing in {:.1} s",
            n - have,
            filled.elapsed().as_secs_f64()
        );
    }
    let mut best = Duration::MAX;
    let mut listed = 0;
    for _ in 0..3 {
        let start = Instant::now();
        listed = storage.list_dir(DIR).await?.len();
        best = best.min(start.elapsed());
    }
    if listed < n {
        return Err(Error::new(
            ErrorKind::Other,
            format!("bench: {DIR} lists {listed} entries, {n} were written"),
        ));
    }
    println!(
        "{backend:<8} list_dir of {listed} documents: {} ({} per entry)",
        fmt_dur(best),
        fmt_dur(best / u32::try_from(listed.max(1)).unwrap_or(u32::MAX))
    );
    Ok(())
}

/// Writes documents `from..n` of [`DIR`], [`IN_FLIGHT`] at a time.
async fn fill(storage: &Arc<dyn Storage>, from: usize, n: usize) -> Result<()> {
    let mut tasks = JoinSet::new();
    for i in from..n {
        if tasks.len() >= IN_FLIGHT {
            join_one(&mut tasks).await?;
        }
        let storage = Arc::clone(storage);
        tasks.spawn(async move {
            storage
                .simple_upload(
                    &format!("{DIR}/{i:07}.json"),
                    format!("{{\"n\":{i}}}").into(),
                )
                .await
                .map(drop)
        });
    }
    while !tasks.is_empty() {
        join_one(&mut tasks).await?;
    }
    Ok(())
}

async fn join_one(tasks: &mut JoinSet<Result<()>>) -> Result<()> {
    match tasks.join_next().await {
        Some(Ok(res)) => res,
        Some(Err(e)) => Err(Error::new(
            ErrorKind::Other,
            format!("bench: an upload task failed: {e}"),
        )),
        None => Ok(()),
    }
}

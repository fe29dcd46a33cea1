//! Push invalidation, measured with two replicas on separate storage
//! handles of one backend: an unchanged watched `get` against a
//! revalidating one, how soon a write on one replica is seen by a watched
//! other, and a counter through watched stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metadatacache::{Error, ErrorKind, Options, Storage, Store};
use serde::{Deserialize, Serialize};

use super::Result;
use super::report::{Goal, Row, compare, fmt_dur};

/// A small document (about 1 KiB) with a version number.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Doc {
    n: u64,
    pad: String,
}

fn store(storage: &Arc<dyn Storage>, watch: bool) -> Store<String, Doc> {
    Store::new(
        Options::new(Arc::clone(storage), |k: &String| format!("watch/{k}.json"))
            .init(|| Doc {
                n: 0,
                pad: "x".repeat(1000),
            })
            .watch(watch),
    )
}

/// Two handles on the storage `url` names (one, shared, for `memory:`,
/// which lives in one process).
async fn handles(url: &str) -> Result<(Arc<dyn Storage>, Arc<dyn Storage>)> {
    let a = metadatacache::open(url).await?;
    let b = if a.backend() == "memory" {
        Arc::clone(&a)
    } else {
        metadatacache::open(url).await?
    };
    Ok((a, b))
}

/// Reads through `reader` until it shows version `want` of the document
/// (the `n` field); the time it took. Fails after a minute.
async fn until_seen(reader: &Store<String, Doc>, want: u64) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let doc = reader.get("k".into()).await?;
        if doc.is_some_and(|d| d.n == want) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::new(
                ErrorKind::Other,
                format!(
                    "a write was not seen by the watching replica within a minute (version {want})"
                ),
            ));
        }
        tokio::task::yield_now().await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

pub(super) async fn bench_watch(url: &str, quick: bool) -> Result<()> {
    let (one, two) = handles(url).await?;
    let backend = one.backend().to_owned();
    if !two.capabilities().notifications {
        println!("{backend:<8} watch: this backend cannot notify; watched reads revalidate");
        return Ok(());
    }
    let writer = store(&one, false);
    let watched = store(&two, true);
    let plain = store(&two, false);
    writer
        .update("k".into(), true, |mut d| {
            d.n = 0;
            Ok((d, true))
        })
        .await?;
    until_seen(&watched, 0).await?;
    plain.get("k".into()).await?;
    // Let the stream get in sync: a read served from memory.
    let start = Instant::now();
    loop {
        let before = watched.stats();
        watched.get("k".into()).await?;
        let after = watched.stats();
        if after.downloads + after.not_modified == before.downloads + before.not_modified {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::new(ErrorKind::Other, "the watch never got in sync"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let (rounds, n) = if quick { (3, 200) } else { (5, 2000) };
    let calls = |s: &Store<String, Doc>| s.stats().downloads + s.stats().not_modified;
    let before = calls(&watched);
    let (ours, baseline) = compare(
        rounds,
        n,
        |_| async { watched.get("k".into()).await.map(drop) },
        |_| async { plain.get("k".into()).await.map(drop) },
    )
    .await?;
    let watched_calls = calls(&watched) - before;
    Row {
        storage: backend.clone(),
        what: format!("watched get vs revalidating ({watched_calls} storage calls)"),
        ours,
        baseline,
        goal: match backend.as_str() {
            "memory" => Goal::None,
            "disk" => Goal::SpeedupAtLeast(3.0),
            _ => Goal::SpeedupAtLeast(20.0),
        },
    }
    .print();

    // A write on one replica, seen by the other.
    let samples = if quick { 50 } else { 200 };
    let mut seen = Vec::with_capacity(samples);
    for v in 1..=samples as u64 {
        writer
            .update("k".into(), true, |mut d| {
                d.n = v;
                Ok((d, true))
            })
            .await?;
        seen.push(until_seen(&watched, v).await?);
    }
    seen.sort();
    let (p50, p99) = (percentile(&seen, 0.5), percentile(&seen, 0.99));
    println!(
        "{backend:<8} {:<44} {:>10} {:>10} {:>14} {:>14}",
        "write seen by a watched replica (p50 / p99)",
        fmt_dur(p50),
        fmt_dur(p99),
        "",
        format!(
            "p99 ≤ 50 ms {}",
            if p99 <= Duration::from_millis(50) {
                "met"
            } else {
                "MISSED"
            }
        ),
    );

    // Compare-and-swap stays exact through watched stores.
    let replicas = [store(&one, true), store(&two, true)];
    // The counter of an earlier run on the same storage counts on.
    let start = replicas[0].get("c".into()).await?.map_or(0, |d| d.n);
    let mut tasks = Vec::new();
    for r in &replicas {
        for _ in 0..2 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    r.update("c".into(), true, |mut d| {
                        d.n += 1;
                        Ok((d, true))
                    })
                    .await?;
                }
                Ok::<_, Error>(())
            }));
        }
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::new(ErrorKind::Other, "a counter task failed").with_source(e))??;
    }
    let total = replicas[0]
        .get("c".into())
        .await?
        .map_or(0, |d| d.n)
        .saturating_sub(start);
    println!(
        "{backend:<8} {:<44} {:>10} {:>10} {:>14} {:>14}",
        "2 watched replicas x 2 tasks x 100 increments",
        total,
        400,
        "",
        match total.cmp(&400) {
            std::cmp::Ordering::Equal => "exact",
            std::cmp::Ordering::Less => "LOST UPDATES",
            std::cmp::Ordering::Greater => "APPLIED TWICE",
        },
    );
    if total != 400 {
        return Err(Error::new(
            ErrorKind::Other,
            format!("watched stores counted {total} of 400 increments"),
        ));
    }
    Ok(())
}

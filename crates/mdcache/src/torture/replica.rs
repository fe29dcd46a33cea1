//! The replica side: one process of a torture run.

use super::protocol::Report;
use super::*;

/// Runs in each replica process.
pub async fn replica(url: &str, args: ReplicaArgs) -> Result<ExitCode> {
    // Installed before the store exists, so that it sees every metric.
    let metrics = metrics_reporter(args.metrics)?;
    let mut storage = metadatacache::open(url).await?;
    #[cfg(feature = "faults")]
    {
        storage = args.faults.wrap(storage, args.seed);
    }
    let mut recorder = None;
    if let Some(file) = &args.history {
        let recording = Arc::new(RecordingStorage::to_file(storage, file)?);
        recorder = Some(Arc::clone(&recording));
        storage = recording;
    }
    let store = counter_store(
        storage,
        !args.no_batching,
        !args.no_backoff,
        args.max_attempts,
    );
    let remaining = Arc::new(AtomicUsize::new(args.ops));
    let mut tasks = Vec::new();
    for t in 0..args.tasks.max(1) {
        let store = store.clone();
        let remaining = Arc::clone(&remaining);
        let keys = args.keys.max(1);
        let seed = args.seed ^ ((args.id as u64) << 32) ^ t as u64;
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let k = rng.usize(..keys);
                println!("{}", Report::Start(k));
                let res = store
                    .update(k, true, |mut c| {
                        c.count += 1;
                        Ok((c, true))
                    })
                    .await;
                println!("{}", Report::outcome(k, &res));
            }
        }));
    }
    let reporter = {
        let store = store.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                print_stats(&store);
                metrics();
            }
        })
    };
    for t in tasks {
        t.await
            .map_err(|e| Error::new(ErrorKind::Other, "replica task failed").with_source(e))?;
    }
    reporter.abort();
    // Wait for it to stop, so that no older report follows the last one.
    let _ = reporter.await;
    print_stats(&store);
    metrics();
    // A history with records missing would be checked as if whole.
    if let Some(lost) = recorder.map(|r| r.lost_records()).filter(|n| *n > 0) {
        return Err(Error::new(
            ErrorKind::Other,
            format!("{lost} history records could not be written"),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// What prints this process's metrics (`--metrics`; a no-op without).
type MetricsReporter = Arc<dyn Fn() + Send + Sync>;

/// Installs the recorder when `on`, and returns what prints its metrics.
fn metrics_reporter(on: bool) -> Result<MetricsReporter> {
    #[cfg(feature = "metrics")]
    if on {
        let recorder = super::recorder::Recorder::install()?;
        return Ok(Arc::new(move || {
            let lines: String = recorder
                .snapshot()
                .into_iter()
                .map(|(key, value)| format!("{}\n", Report::Metric(key, value)))
                .collect();
            print!("{lines}");
        }));
    }
    let _ = on;
    Ok(Arc::new(|| {}))
}

fn print_stats(store: &Store<usize, Counter>) {
    let s = store.stats();
    let stats = Report::Stats {
        conflicts: s.conflicts,
        retries: s.retries,
        give_ups: s.give_ups,
        uploads: s.uploads,
    };
    println!("{stats}");
}

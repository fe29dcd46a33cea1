//! The replica side: one process of a torture run.

use super::*;

/// Runs in each replica process.
pub async fn replica(url: &str, args: ReplicaArgs) -> Result<ExitCode> {
    let mut storage = metadatacache::open(url).await?;
    if args.racy_cas {
        storage = Arc::new(FaultyStorage::new(storage, args.seed).racy_cas(true));
    }
    if let Some(file) = &args.history {
        storage = Arc::new(RecordingStorage::to_file(storage, file)?);
    }
    let store = counter_store(storage, !args.no_batching, !args.no_backoff);
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
                println!("S {k}");
                let res = store
                    .update(k, true, |mut c| {
                        c.count += 1;
                        Ok((c, true))
                    })
                    .await;
                match res {
                    Ok(()) => println!("A {k}"),
                    Err(e) if e.kind() == ErrorKind::Unavailable => println!("U {k}"),
                    Err(e) if e.is_conflict() => println!("G {k}"),
                    Err(e) => {
                        println!("E {k}");
                        eprintln!("replica {}: {e}", std::process::id());
                    }
                }
            }
        }));
    }
    let reporter = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                print_stats(&store);
            }
        })
    };
    for t in tasks {
        t.await
            .map_err(|e| Error::new(ErrorKind::Other, "replica task failed").with_source(e))?;
    }
    reporter.abort();
    print_stats(&store);
    Ok(ExitCode::SUCCESS)
}

fn print_stats(store: &Store<usize, Counter>) {
    let s = store.stats();
    println!("T {} {} {}", s.conflicts, s.retries, s.give_ups);
}

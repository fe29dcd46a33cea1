//! The counter promise under late-landing writes, for any storage.
//!
//! Several stores (replicas), each behind its own [`FaultyStorage`] with
//! `delayed_apply`, update one document through `Store::update`. A delayed
//! upload answers `Unavailable` at once and reaches the storage later,
//! racing the store's next calls. Each update appends its own id to a list
//! (a counter that remembers who counted). The promise: every `Ok` was
//! applied exactly once and every `Unavailable` at most once, so the final
//! count lies in `[ok, ok + unavailable]`; and per id: every `Ok` id is
//! there once, no id is there twice, no id of another outcome is there. No
//! error other than `Unavailable` occurs.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use metadatacache::testing::FaultyStorage;
use metadatacache::{ErrorKind, Options, RetryPolicy, Storage, Store};

/// How a run of [`delayed_counter`] went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterRun {
    pub ok: u64,
    pub unavailable: u64,
    pub final_value: u64,
    /// Uploads the faults delayed, and how many of those landed late.
    pub delayed: u64,
    pub delayed_landed: u64,
    /// Lost replies the stores settled into `Ok`.
    pub settled: u64,
}

/// The fault settings of a run.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Fraction of uploads delayed.
    pub p: f64,
    pub max_delay: Duration,
    /// Added to every call, so that a delayed upload can land between a
    /// store's read and its next write.
    pub latency: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            p: 0.2,
            max_delay: Duration::from_millis(20),
            latency: Duration::from_millis(1),
        }
    }
}

/// `stores` stores × `tasks` tasks × `updates` increments of the counter at
/// `path`; panics if the promise breaks or an error other than
/// `Unavailable` comes back.
pub async fn delayed_counter(
    storage: Arc<dyn Storage>,
    path: &str,
    stores: usize,
    tasks: usize,
    updates: usize,
    faults: Faults,
) -> CounterRun {
    let mut faulty = Vec::new();
    let mut handles = Vec::new();
    for s in 0..stores {
        let f = Arc::new(
            FaultyStorage::new(Arc::clone(&storage), 1000 + s as u64)
                .delayed_apply(faults.p, faults.max_delay)
                .latency(faults.latency),
        );
        faulty.push(Arc::clone(&f));
        let path = path.to_owned();
        let store: Store<String, Vec<u64>> = Store::new(
            Options::new(f as Arc<dyn Storage>, move |_: &String| path.clone())
                .init(Vec::new)
                .retries(100_000)
                .retry_policy(RetryPolicy::default().max_delay(Duration::from_millis(5))),
        );
        for t in 0..tasks {
            let store = store.clone();
            let first_id = ((s * tasks + t) * updates) as u64;
            handles.push(tokio::spawn(async move {
                let (mut ok, mut unavailable) = (HashSet::new(), HashSet::new());
                for id in first_id..first_id + updates as u64 {
                    let res = store
                        .update("n".into(), true, |mut ids| {
                            ids.push(id);
                            Ok((ids, true))
                        })
                        .await;
                    match res {
                        Ok(()) => ok.insert(id),
                        Err(e) if e.kind() == ErrorKind::Unavailable => unavailable.insert(id),
                        Err(e) => panic!("an update failed with {e} (not allowed)"),
                    };
                }
                (ok, unavailable, store.stats().lost_replies_settled)
            }));
        }
    }
    let (mut ok, mut unavailable) = (HashSet::new(), HashSet::new());
    let mut run = CounterRun::default();
    let mut settled_per_store = vec![0; stores];
    for (i, h) in handles.into_iter().enumerate() {
        let (o, u, settled) = h.await.expect("task");
        ok.extend(o);
        unavailable.extend(u);
        settled_per_store[i / tasks] = settled;
    }
    run.ok = ok.len() as u64;
    run.unavailable = unavailable.len() as u64;
    run.settled = settled_per_store.iter().sum();
    for f in &faulty {
        f.settle().await;
        run.delayed += f.faults().delayed;
        run.delayed_landed += f.faults().delayed_landed;
    }
    let bytes = storage.simple_download(path).await.expect("read the list");
    let ids: Vec<u64> = serde_json::from_slice(&bytes).expect("a list of ids");
    run.final_value = ids.len() as u64;
    assert!(run.delayed > 0, "no upload was delayed: {run:?}");
    let mut seen = HashSet::new();
    for id in &ids {
        assert!(seen.insert(*id), "update {id} was applied twice ({run:?})");
        assert!(
            ok.contains(id) || unavailable.contains(id),
            "update {id} was applied though it failed ({run:?})"
        );
    }
    for id in &ok {
        assert!(
            seen.contains(id),
            "update {id} answered Ok but is not there ({run:?})"
        );
    }
    assert!(
        run.ok <= run.final_value && run.final_value <= run.ok + run.unavailable,
        "the promise broke: final {} outside [ok {}, ok + unavailable {}] ({run:?})",
        run.final_value,
        run.ok,
        run.ok + run.unavailable
    );
    run
}

//! Every counter of `Stats` and the latency histograms reach the `metrics`
//! facade, labelled with the backend (cargo feature `metrics`).

#![cfg(feature = "metrics")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use metadatacache::testing::FaultyStorage;
use metadatacache::{MemoryStorage, Options, RetryPolicy, Storage, Store};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_reach_the_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let faulty: Arc<dyn Storage> = Arc::new(
        FaultyStorage::new(Arc::clone(&memory), 3)
            .ambiguous(0.3)
            .conflicts(0.2),
    );
    let store: Store<String, u64> = Store::new(
        Options::new(faulty, |k: &String| format!("{k}.json"))
            .init(|| 0)
            .retry_policy(RetryPolicy::immediate()),
    );
    for _ in 0..50 {
        store
            .update("n".into(), true, |n| Ok((n + 1, true)))
            .await
            .unwrap();
        store.get("n".into()).await.unwrap();
        store.clear_cache();
        store.get("n".into()).await.unwrap();
    }
    store.remove("n".into()).await.unwrap();
    let stats = store.stats();

    let mut counters = BTreeMap::new();
    let mut histograms = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        assert!(
            labels.contains(&"backend=memory".to_owned()),
            "{} {labels:?}",
            key.name()
        );
        match value {
            DebugValue::Counter(n) => {
                *counters.entry(key.name().to_owned()).or_insert(0) += n;
            }
            DebugValue::Histogram(samples) => {
                let op = labels
                    .iter()
                    .find(|l| l.starts_with("op="))
                    .cloned()
                    .unwrap();
                *histograms.entry((key.name().to_owned(), op)).or_insert(0) += samples.len();
            }
            DebugValue::Gauge(_) => {}
        }
    }
    eprintln!("counters {counters:?}\nhistograms {histograms:?}\nstats {stats:?}");
    for (name, value) in [
        ("metadatacache_downloads_total", stats.downloads),
        ("metadatacache_not_modified_total", stats.not_modified),
        ("metadatacache_uploads_total", stats.uploads),
        ("metadatacache_conflicts_total", stats.conflicts),
        ("metadatacache_retries_total", stats.retries),
        ("metadatacache_lost_replies_total", stats.lost_replies),
        (
            "metadatacache_lost_replies_settled_total",
            stats.lost_replies_settled,
        ),
    ] {
        assert!(value > 0, "{name}: nothing to compare");
        assert_eq!(counters.get(name).copied(), Some(value), "{name}");
    }
    assert_eq!(
        counters.len(),
        7,
        "only the counters that moved are reported"
    );
    for op in ["get", "update", "remove"] {
        let n = histograms[&(
            "metadatacache_operation_seconds".to_owned(),
            format!("op={op}"),
        )];
        assert!(n > 0, "{op}");
    }
    assert_eq!(
        histograms[&(
            "metadatacache_operation_seconds".to_owned(),
            "op=update".to_owned()
        )],
        50
    );
    for op in ["download", "upload", "delete"] {
        assert!(
            histograms[&(
                "metadatacache_storage_seconds".to_owned(),
                format!("op={op}")
            )] > 0
        );
    }
}

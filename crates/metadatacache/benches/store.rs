//! Micro benchmarks of the hot paths: `cargo bench -p metadatacache`.
//!
//! The side-by-side ratios users care about are in `mdcache bench`; these
//! isolate single operations for profiling.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use metadatacache::{
    DiskStorage, DownloadRequest, MemoryStorage, Options, Storage, Store, UploadRequest,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn counter_store(storage: Arc<dyn Storage>) -> Store<u8, u64> {
    Store::new(Options::new(storage, |_: &u8| "bench/counter.json".to_owned()).init(|| 0))
}

fn memory(c: &mut Criterion) {
    let rt = runtime();
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let store = counter_store(Arc::clone(&storage));
    rt.block_on(store.update(0, true, |n| Ok((n + 1, true))))
        .expect("seed");
    c.bench_function("memory/update", |b| {
        b.to_async(&rt).iter(|| async {
            store
                .update(0, true, |n| Ok((n + 1, true)))
                .await
                .expect("update")
        });
    });
    c.bench_function("memory/get unchanged", |b| {
        b.to_async(&rt)
            .iter(|| async { store.get(0).await.expect("get") });
    });
    c.bench_function("memory/raw CAS increment", |b| {
        b.to_async(&rt).iter(|| async {
            let cur = storage
                .download(DownloadRequest::new("bench/counter.json"))
                .await
                .expect("download");
            let n: u64 = serde_json::from_slice(&cur.content).expect("number");
            storage
                .upload(UploadRequest {
                    if_match: Some(cur.etag),
                    ..UploadRequest::new("bench/counter.json", (n + 1).to_string())
                })
                .await
                .expect("upload");
        });
    });
}

fn disk(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let storage: Arc<dyn Storage> = Arc::new(DiskStorage::open(dir.path()).expect("open"));
    let store = counter_store(Arc::clone(&storage));
    rt.block_on(store.update(0, true, |n| Ok((n + 1, true))))
        .expect("seed");
    let mut group = c.benchmark_group("disk");
    group.sample_size(20);
    group.bench_function("update", |b| {
        b.to_async(&rt).iter(|| async {
            store
                .update(0, true, |n| Ok((n + 1, true)))
                .await
                .expect("update")
        });
    });
    let big: Vec<u64> = (0..8000).collect();
    let docs: Store<u8, Vec<u64>> = Store::new(Options::new(Arc::clone(&storage), |_: &u8| {
        "bench/big.json".to_owned()
    }));
    rt.block_on(storage.simple_upload(
        "bench/big.json",
        serde_json::to_vec(&big).expect("encode").into(),
    ))
    .expect("upload");
    group.bench_function("get unchanged 40 KiB", |b| {
        b.to_async(&rt)
            .iter(|| async { docs.get(0).await.expect("get") });
    });
    group.finish();
}

criterion_group!(benches, memory, disk);
criterion_main!(benches);

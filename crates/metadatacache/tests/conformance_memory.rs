//! The shared conformance suite on the memory backend.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use metadatacache::MemoryStorage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_the_conformance_suite() {
    metadatacache::conformance::run_all(Arc::new(MemoryStorage::new()), "suite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_passes_the_conformance_suite_at_the_root() {
    metadatacache::conformance::run_all(Arc::new(MemoryStorage::new()), "").await;
}

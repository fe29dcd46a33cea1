//! Shared helpers of the integration tests.

pub mod counter;
pub mod proxy;
pub mod servers;

use std::future::Future;
use std::time::{Duration, Instant};

/// Runs `fut` and returns its output and how long it took, failing the test
/// if it has not finished after `guard`. A hang detector, never a speed
/// bound: `guard` is many times what the call should take, so a slow or
/// busy machine cannot trip it; speed belongs in benchmarks.
#[allow(dead_code)]
pub async fn must_finish<T>(
    what: &str,
    guard: Duration,
    fut: impl Future<Output = T>,
) -> (T, Duration) {
    let start = Instant::now();
    match tokio::time::timeout(guard, fut).await {
        Ok(v) => (v, start.elapsed()),
        Err(_) => panic!("{what}: still running after {guard:?}: it hangs"),
    }
}

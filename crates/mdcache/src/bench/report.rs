//! Timing the two sides of a comparison, and the report's rows.

use std::future::Future;
use std::time::{Duration, Instant};

use super::Result;

/// Best per-operation time of `rounds` rounds of `n` calls.
pub(super) async fn per_op<F, Fut>(n: usize, mut f: F) -> Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    for i in 0..n {
        f(i).await?;
    }
    Ok(start.elapsed() / u32::try_from(n.max(1)).unwrap_or(u32::MAX))
}

/// Runs `a` and `b` alternately `rounds` times; the best of each.
pub(super) async fn compare<A, AF, B, BF>(
    rounds: usize,
    n: usize,
    mut a: A,
    mut b: B,
) -> Result<(Duration, Duration)>
where
    A: FnMut(usize) -> AF,
    AF: Future<Output = Result<()>>,
    B: FnMut(usize) -> BF,
    BF: Future<Output = Result<()>>,
{
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        best_a = best_a.min(per_op(n, &mut a).await?);
        best_b = best_b.min(per_op(n, &mut b).await?);
    }
    Ok((best_a, best_b))
}

pub(super) struct Row {
    pub(super) storage: String,
    pub(super) what: String,
    pub(super) ours: Duration,
    pub(super) baseline: Duration,
    pub(super) goal: Goal,
}

#[derive(Clone, Copy)]
pub(super) enum Goal {
    /// ours / baseline at most this.
    AtMost(f64),
    /// baseline / ours at least this.
    SpeedupAtLeast(f64),
    None,
}

pub(super) fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

impl Row {
    pub(super) fn print(&self) {
        let ratio = self.ours.as_secs_f64() / self.baseline.as_secs_f64().max(1e-12);
        let (shown, goal, met) = match self.goal {
            Goal::AtMost(g) => (format!("{ratio:.2}×"), format!("≤ {g:.2}×"), ratio <= g),
            Goal::SpeedupAtLeast(g) => {
                let s = 1.0 / ratio.max(1e-12);
                (
                    format!("{s:.1}× faster"),
                    format!("≥ {g:.0}× faster"),
                    s >= g,
                )
            }
            Goal::None if ratio < 1.0 => (
                format!("{:.1}× faster", 1.0 / ratio.max(1e-12)),
                "-".to_owned(),
                true,
            ),
            Goal::None => (format!("{ratio:.2}×"), "-".to_owned(), true),
        };
        println!(
            "{:<8} {:<44} {:>10} {:>10} {:>14} {:>14} {}",
            self.storage,
            self.what,
            fmt_dur(self.ours),
            fmt_dur(self.baseline),
            shown,
            goal,
            if matches!(self.goal, Goal::None) {
                ""
            } else if met {
                "met"
            } else {
                "MISSED"
            }
        );
    }
}

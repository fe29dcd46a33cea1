//! Ratios whose two sides are torture runs (replica processes on shared
//! storage), measured in alternating rounds so that drift hits both sides.

use super::Result;
use crate::torture::{self, TortureArgs};

/// Rounds of a paired comparison.
pub(super) fn rounds(quick: bool) -> usize {
    if quick { 1 } else { 3 }
}

/// Two sides of a ratio run in alternating rounds: goodputs, and what
/// every run lost or gave up (all 0 when the promise holds).
pub(super) struct Paired {
    a: Vec<f64>,
    b: Vec<f64>,
    lost: u64,
    gave_up: u64,
}

/// Runs `a` and `b` (torture runs on `url`) alternately, `rounds` times.
pub(super) async fn paired(
    url: &str,
    rounds: usize,
    a: impl Fn() -> TortureArgs,
    b: impl Fn() -> TortureArgs,
) -> Result<Paired> {
    let mut p = Paired {
        a: Vec::new(),
        b: Vec::new(),
        lost: 0,
        gave_up: 0,
    };
    for _ in 0..rounds {
        for (args, out) in [(a(), &mut p.a), (b(), &mut p.b)] {
            let (run, finals) = torture::run(url, args, false).await?;
            let s = run.summary(&finals);
            out.push(s.acked as f64 / s.secs);
            p.lost += s.lost;
            p.gave_up += s.gave_up;
        }
    }
    Ok(p)
}

impl Paired {
    /// The median of the rounds' b/a ratios.
    fn median(&self) -> f64 {
        let mut r: Vec<f64> = self
            .a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| b / a.max(1e-9))
            .collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(0.0)
    }

    pub(super) fn print(&self, what: &str, a: &str, b: &str, goal: f64) {
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.0}–{hi:.0}/s")
        };
        let r = self.median();
        println!(
            "{what}, {}: {a} {}, {b} {}: {r:.2}× (goal ≥ {goal:.1}×: {}); lost {}, give-ups {}",
            match self.a.len() {
                1 => "1 round".to_owned(),
                n => format!("{n} alternating rounds"),
            },
            range(&self.a),
            range(&self.b),
            if r >= goal { "met" } else { "MISSED" },
            self.lost,
            self.gave_up
        );
    }
}

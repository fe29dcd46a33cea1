//! Totals of a run and the final table.

use super::*;

/// Totals of a run, checked against the final counts.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) acked: u64,
    pub(crate) unavailable: u64,
    pub(crate) failed: u64,
    pub(crate) gave_up: u64,
    pub(crate) cut: u64,
    pub(crate) applied: u64,
    pub(crate) lost: u64,
    pub(crate) extra: u64,
    pub(crate) secs: f64,
}

impl RunResult {
    pub(crate) fn summary(&self, finals: &[u64]) -> Summary {
        let mut s = Summary {
            secs: self.elapsed.as_secs_f64().max(1e-9),
            ..Summary::default()
        };
        for ((t, final_count), initial) in self.tally.iter().zip(finals).zip(&self.initial) {
            let delta = final_count.saturating_sub(*initial);
            let cut = t.started.saturating_sub(t.finished());
            s.lost += t.acked.saturating_sub(delta);
            s.extra += delta.saturating_sub(t.acked + t.unavailable + cut);
            s.acked += t.acked;
            s.unavailable += t.unavailable;
            s.failed += t.failed;
            s.gave_up += t.gave_up;
            s.cut += cut;
            s.applied += delta;
        }
        s.gave_up = s.gave_up.max(self.give_ups);
        s
    }

    pub(crate) fn conflicts(&self) -> u64 {
        self.conflicts
    }
}

pub(super) fn report(run: &RunResult, finals: &[u64]) -> ExitCode {
    let Summary {
        acked,
        unavailable,
        failed,
        gave_up,
        cut,
        applied,
        lost,
        extra,
        secs,
    } = run.summary(finals);
    let violations = run.history.as_ref().map_or(0, |h| h.violations.len());
    let ok = lost == 0 && extra == 0 && violations == 0;
    let rows: [(&str, String); 15] = [
        (
            "replicas × tasks",
            format!("{} × {}", run.replicas, run.tasks),
        ),
        ("keys", run.keys.to_string()),
        ("elapsed", format!("{secs:.1} s")),
        (
            "updates/s (acknowledged)",
            format!("{:.0}", acked as f64 / secs),
        ),
        ("acknowledged", acked.to_string()),
        ("unavailable (maybe applied)", unavailable.to_string()),
        ("cut short by kill (maybe)", cut.to_string()),
        ("failed (not applied)", failed.to_string()),
        ("give-ups", gave_up.to_string()),
        ("conflicts", run.conflicts.to_string()),
        ("retries", run.retries.to_string()),
        ("kills", run.kills.to_string()),
        ("final − initial", applied.to_string()),
        ("lost", lost.to_string()),
        ("applied beyond attempts", extra.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<30} {value:>12}");
    }
    if let Some(h) = &run.history {
        println!("{:<30} {:>12}", "history: writes checked", h.writes);
        println!("{:<30} {:>12}", "history: reads checked", h.reads);
        println!("{:<30} {:>12}", "history: violations", h.violations.len());
        for v in h.violations.iter().take(10) {
            eprintln!("violation: {v}");
        }
    }
    let verdict = if ok {
        "OK"
    } else if lost > 0 || extra > 0 {
        "LOST UPDATES"
    } else {
        "HISTORY VIOLATIONS"
    };
    println!("{:<30} {:>12}", "result", verdict);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

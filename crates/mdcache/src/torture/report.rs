//! Totals of a run and the final table.

use super::*;

/// Totals of a run, checked against the final counts.
#[derive(Debug, Default, Clone, Copy)]
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

impl RunResult {
    /// Why the run failed, one line each; empty when it passed.
    pub(crate) fn verdicts(&self, s: &Summary) -> Vec<String> {
        let mut out = Vec::new();
        if s.lost > 0 {
            out.push(format!(
                "lost: {} acknowledged {} missing from the final counts",
                s.lost,
                updates(s.lost)
            ));
        }
        if s.extra > 0 {
            out.push(format!(
                "applied twice: the final counts exceed acknowledged + unavailable{} by {} \
                 (an update was applied more than once)",
                if s.cut > 0 {
                    " + cut short by kill"
                } else {
                    ""
                },
                s.extra
            ));
        }
        for (kind, k) in &self.failures {
            out.push(format!(
                "error {kind}: {} {} failed with {kind} (the only error allowed is \
                 Unavailable); first: {}",
                k.count,
                updates(k.count),
                k.first
            ));
        }
        if s.gave_up > 0 {
            let first = self
                .first_give_up
                .as_deref()
                .map(|m| format!("; first: {m}"))
                .unwrap_or_default();
            out.push(format!(
                "give-ups: {} {} ran out of attempts (--max-attempts {}){first}",
                s.gave_up,
                updates(s.gave_up),
                self.max_attempts
            ));
        }
        if self.kill && self.kills == 0 {
            out.push(
                "no kill: --kill was given but the run ended before any replica was killed"
                    .to_owned(),
            );
        }
        if let Some(h) = &self.history
            && !h.violations.is_empty()
        {
            out.push(format!(
                "history: {} {} of one etag chain per key or fresh reads (the first ones on standard error)",
                h.violations.len(),
                if h.violations.len() == 1 {
                    "violation"
                } else {
                    "violations"
                }
            ));
        }
        for r in &self.short_reports {
            out.push(format!(
                "replica {} (start {}): exited after reporting {} of its {} updates",
                r.replica,
                r.incarnation + 1,
                r.reported,
                r.planned
            ));
        }
        if let (n @ 1.., Some(first)) = &self.unreadable {
            out.push(format!(
                "protocol: {n} unreadable {} from the replicas; first: {first:?}",
                if *n == 1 { "line" } else { "lines" }
            ));
        }
        out
    }
}

fn updates(n: u64) -> &'static str {
    if n == 1 { "update" } else { "updates" }
}

pub(super) fn report(run: &RunResult, finals: &[u64]) -> ExitCode {
    let summary = run.summary(finals);
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
    } = summary;
    let mut rows: Vec<(String, String)> = vec![
        (
            "replicas × tasks".into(),
            format!("{} × {}", run.replicas, run.tasks),
        ),
        ("keys".into(), run.keys.to_string()),
        ("elapsed".into(), format!("{secs:.1} s")),
        (
            "updates/s (acknowledged)".into(),
            format!("{:.0}", acked as f64 / secs),
        ),
        ("acknowledged".into(), acked.to_string()),
        (
            "unavailable (maybe applied)".into(),
            unavailable.to_string(),
        ),
        ("cut short by kill (maybe)".into(), cut.to_string()),
        ("failed (not applied)".into(), failed.to_string()),
    ];
    for (kind, k) in &run.failures {
        rows.push((format!("failed: {kind}"), k.count.to_string()));
    }
    rows.extend([
        ("give-ups".into(), gave_up.to_string()),
        ("conflicts".into(), run.conflicts.to_string()),
        ("retries".into(), run.retries.to_string()),
        ("uploads".into(), run.uploads.to_string()),
        ("kills".into(), run.kills.to_string()),
        ("final − initial".into(), applied.to_string()),
        ("lost".into(), lost.to_string()),
        ("applied twice".into(), extra.to_string()),
    ]);
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
    let verdicts = run.verdicts(&summary);
    for v in &verdicts {
        println!("FAIL {v}");
    }
    let ok = verdicts.is_empty();
    println!("{:<30} {:>12}", "result", if ok { "OK" } else { "FAILED" });
    if let Some(metrics) = &run.metrics {
        metrics.print();
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run on one key whose replicas reported `acked` and `unavailable`
    /// outcomes, and nothing else.
    fn run(acked: u64, unavailable: u64) -> RunResult {
        RunResult {
            keys: 1,
            replicas: 1,
            tasks: 1,
            max_attempts: 3,
            initial: vec![10],
            tally: vec![KeyTally {
                started: acked + unavailable,
                acked,
                unavailable,
                ..KeyTally::default()
            }],
            failures: BTreeMap::new(),
            first_give_up: None,
            unreadable: (0, None),
            short_reports: Vec::new(),
            kill: false,
            kills: 0,
            elapsed: Duration::from_secs(1),
            conflicts: 0,
            retries: 0,
            give_ups: 0,
            uploads: 0,
            history: None,
            metrics: None,
        }
    }

    fn verdicts(run: &RunResult, finals: &[u64]) -> Vec<String> {
        run.verdicts(&run.summary(finals))
    }

    #[test]
    fn the_final_count_must_lie_within_the_promise() {
        let r = run(5, 2);
        // 10 + [5, 5 + 2]: anything in between is what the promise allows.
        for ok in 15..=17 {
            assert_eq!(verdicts(&r, &[ok]), Vec::<String>::new(), "final {ok}");
        }
        let v = verdicts(&r, &[14]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with("lost: 1 acknowledged update missing"),
            "{v:?}"
        );
        let v = verdicts(&r, &[19]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with("applied twice:") && v[0].contains("by 2"),
            "{v:?}"
        );
    }

    #[test]
    fn each_reason_is_one_line() {
        let mut r = run(5, 0);
        r.kill = true;
        r.give_ups = 2; // known from the stores' statistics only
        r.failures.insert(
            "Codec".into(),
            KindTally {
                count: 3,
                first: "disk: k.json: not JSON".into(),
            },
        );
        r.tally[0].failed = 3;
        r.short_reports.push(ShortReport {
            replica: 1,
            incarnation: 0,
            reported: 98,
            planned: 100,
        });
        r.unreadable = (1, Some("garbage".into()));
        let v = verdicts(&r, &[15]);
        let starts = [
            "error Codec: 3 updates failed with Codec",
            "give-ups: 2 updates ran out of attempts (--max-attempts 3)",
            "no kill:",
            "replica 1 (start 1): exited after reporting 98 of its 100 updates",
            "protocol: 1 unreadable line",
        ];
        assert_eq!(v.len(), starts.len(), "{v:?}");
        for (line, start) in v.iter().zip(starts) {
            assert!(
                line.starts_with(start),
                "{line:?} should start with {start:?}"
            );
            assert!(!line.contains('\n'), "{line:?}");
        }
    }
}

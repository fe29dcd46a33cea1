//! Fault injection in the replicas (cargo feature `faults`): test aids that
//! break the storage on purpose, to see the verdicts and checks catch it.
//! Not part of a release build.

use std::sync::Arc;

use clap::Args;
use metadatacache::Storage;
use metadatacache::testing::FaultyStorage;

/// Options of `mdcache torture` and `mdcache replica` that inject faults.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Fault injection (cargo feature `faults`)")]
pub(crate) struct FaultArgs {
    /// Break compare-and-swap in the replicas (check, pause, write) to see
    /// the checks fail.
    #[arg(long)]
    racy_cas: bool,
    /// Fraction of storage calls that fail with Unavailable, the storage
    /// untouched.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    fault_unavailable: f64,
    /// Fraction of uploads that are applied but answered with Unavailable (a
    /// lost reply).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    fault_ambiguous: f64,
    /// Fraction of uploads that fail with a spurious conflict, not applied.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    fault_conflict: f64,
    /// Fraction of storage calls that fail with an error of kind Other, not
    /// applied.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    fault_error: f64,
    /// Fraction of uploads that are applied but answered with a conflict: a
    /// storage that lies, so a retried update is applied twice.
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = probability)]
    fault_applied_conflict: f64,
}

fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

impl FaultArgs {
    /// The same options, for a replica's command line.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.racy_cas {
            out.push("--racy-cas".to_owned());
        }
        for (flag, p) in [
            ("--fault-unavailable", self.fault_unavailable),
            ("--fault-ambiguous", self.fault_ambiguous),
            ("--fault-conflict", self.fault_conflict),
            ("--fault-error", self.fault_error),
            ("--fault-applied-conflict", self.fault_applied_conflict),
        ] {
            if p > 0.0 {
                out.push(flag.to_owned());
                out.push(p.to_string());
            }
        }
        out
    }

    /// `storage` with these faults, or as it is when there are none.
    pub(crate) fn wrap(&self, storage: Arc<dyn Storage>, seed: u64) -> Arc<dyn Storage> {
        if self.to_args().is_empty() {
            return storage;
        }
        Arc::new(
            FaultyStorage::new(storage, seed)
                .racy_cas(self.racy_cas)
                .unavailable(self.fault_unavailable)
                .ambiguous(self.fault_ambiguous)
                .conflicts(self.fault_conflict)
                .errors(self.fault_error)
                .applied_conflicts(self.fault_applied_conflict),
        )
    }
}

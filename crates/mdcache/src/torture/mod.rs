//! `mdcache torture`: replica processes hammering shared keys through
//! `Store::update`, and the check that no acknowledged update was lost.
//!
//! Each replica process runs `tasks` tasks that increment counters in `keys`
//! shared documents. It reports every operation on its standard output, one
//! line each (see [`protocol`]). The parent counts these, optionally kills
//! and restarts replicas, and at the end checks for each key that
//! `acknowledged ≤ final − initial ≤ acknowledged + maybe`,
//! where `maybe` counts `Unavailable` answers and updates cut short by a
//! kill. The run fails, with one line per reason, when that bound is broken,
//! when an update failed with anything but `Unavailable` or gave up, when
//! `--kill` killed nothing, or when the history check (`--check`) found a
//! violation.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metadatacache::testing::history::{self, Initial, RecordingStorage};
use metadatacache::{DownloadRequest, Error, ErrorKind, Options, RetryPolicy, Store};
use serde::{Deserialize, Serialize};

#[cfg(feature = "faults")]
mod faults;
mod metrics_report;
mod parent;
mod protocol;
#[cfg(feature = "metrics")]
mod recorder;
mod replica;
mod report;

#[cfg(feature = "faults")]
use faults::FaultArgs;

use parent::orchestrate;
pub use replica::replica;
use report::report;

type Result<T> = std::result::Result<T, Error>;

/// Options of `mdcache torture`.
#[derive(Debug, Args)]
pub struct TortureArgs {
    /// Replica processes.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// Tasks per replica.
    #[arg(long, default_value_t = 4)]
    tasks: usize,
    /// Shared keys (documents).
    #[arg(long, default_value_t = 4)]
    keys: usize,
    /// Updates per replica.
    #[arg(long, default_value_t = 1000)]
    updates: usize,
    /// SIGKILL replicas at random moments and restart them; after the last
    /// kill the remaining replicas are killed too and the run is checked. A
    /// run that ends before the first kill fails.
    #[arg(long)]
    kill: bool,
    /// How many kills with --kill.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Longest pause between two kills, in milliseconds (the pause is drawn
    /// uniformly from a tenth of this up to it).
    #[arg(long, default_value_t = 300, value_name = "MS")]
    kill_every: u64,
    /// Seed for key choice and kill timing.
    #[arg(long)]
    seed: Option<u64>,
    /// Turn group commit off in the replicas.
    #[arg(long)]
    no_batching: bool,
    /// Retry conflicts at once instead of backing off.
    #[arg(long)]
    no_backoff: bool,
    /// Attempts per update before it gives up on conflicts (a give-up fails
    /// the run).
    #[arg(long, default_value_t = DEFAULT_ATTEMPTS, value_name = "N")]
    max_attempts: usize,
    /// Record every storage call of every replica and check the history:
    /// one etag chain per key, no stale reads.
    #[arg(long, conflicts_with = "kill")]
    check: bool,
    /// Record the library's metrics in every replica and print them,
    /// summed, after the table (replicas killed by --kill count up to
    /// their last report, at most 200 ms before the kill).
    #[cfg_attr(feature = "metrics", arg(long))]
    #[cfg_attr(not(feature = "metrics"), arg(skip))]
    metrics: bool,
    #[cfg(feature = "faults")]
    #[command(flatten)]
    faults: FaultArgs,
    /// Where replicas record their history (set by `run` for --check).
    #[arg(skip)]
    history_dir: Option<std::path::PathBuf>,
}

impl TortureArgs {
    /// A run without kills, for `bench`.
    pub(crate) fn plain(replicas: usize, tasks: usize, keys: usize, updates: usize) -> Self {
        TortureArgs {
            replicas,
            tasks,
            keys,
            updates,
            kill: false,
            kills: 0,
            kill_every: 300,
            seed: None,
            no_batching: false,
            no_backoff: false,
            max_attempts: DEFAULT_ATTEMPTS,
            check: false,
            metrics: false,
            #[cfg(feature = "faults")]
            faults: FaultArgs::default(),
            history_dir: None,
        }
    }

    pub(crate) fn batching(mut self, on: bool) -> Self {
        self.no_batching = !on;
        self
    }

    pub(crate) fn backoff(mut self, on: bool) -> Self {
        self.no_backoff = !on;
        self
    }
}

/// Options of the hidden `mdcache replica`.
#[derive(Debug, Args)]
pub struct ReplicaArgs {
    #[arg(long)]
    id: usize,
    #[arg(long)]
    tasks: usize,
    #[arg(long)]
    keys: usize,
    #[arg(long)]
    ops: usize,
    #[arg(long)]
    seed: u64,
    #[arg(long)]
    no_batching: bool,
    #[arg(long)]
    no_backoff: bool,
    #[arg(long, default_value_t = DEFAULT_ATTEMPTS)]
    max_attempts: usize,
    /// Record storage calls into this file.
    #[arg(long)]
    history: Option<std::path::PathBuf>,
    /// Report the library's metrics.
    #[cfg_attr(feature = "metrics", arg(long))]
    #[cfg_attr(not(feature = "metrics"), arg(skip))]
    metrics: bool,
    #[cfg(feature = "faults")]
    #[command(flatten)]
    faults: FaultArgs,
}

/// Attempts per update unless `--max-attempts` says otherwise (the
/// library's default).
const DEFAULT_ATTEMPTS: usize = 100;

/// A torture document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    count: u64,
}

fn key_path(k: &usize) -> String {
    format!("torture/key-{k}.json")
}

fn counter_store(
    storage: Arc<dyn metadatacache::Storage>,
    batching: bool,
    backoff: bool,
    attempts: usize,
) -> Store<usize, Counter> {
    let policy = if backoff {
        RetryPolicy::default()
    } else {
        RetryPolicy::immediate()
    };
    Store::new(
        Options::new(storage, key_path)
            .init(Counter::default)
            .batching(batching)
            .retries(attempts)
            .retry_policy(policy),
    )
}

async fn read_counts(store: &Store<usize, Counter>, keys: usize) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(keys);
    for k in 0..keys {
        out.push(store.get(k).await?.map_or(0, |c| c.count));
    }
    Ok(out)
}

/// A new temporary directory, removed when dropped.
pub(crate) fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| {
            Error::new(ErrorKind::Other, "cannot create a temporary directory").with_source(e)
        })
}

/// The version of every torture key before a run, for the history check.
async fn initial_versions(
    storage: &Arc<dyn metadatacache::Storage>,
    keys: usize,
) -> Result<Initial> {
    let mut out = Initial::new();
    for k in 0..keys {
        let path = key_path(&k);
        let version = match storage.download(DownloadRequest::new(&path)).await {
            Ok(d) => Some((d.etag, String::from_utf8_lossy(&d.content).into_owned())),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        out.insert(path, version);
    }
    Ok(out)
}

/// Checks the replicas' recorded histories: one etag chain per key, fresh
/// reads, and counts that only grow.
fn check_history(dir: &std::path::Path, initial: &Initial) -> Result<history::CheckReport> {
    let files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::new(ErrorKind::Other, "cannot list history files").with_source(e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let events = history::read_events(&files)?;
    let count = |s: &str| serde_json::from_str::<Counter>(s).ok().map(|c| c.count);
    Ok(history::check(&events, initial, |prev, new| {
        match (prev.map(count), count(new)) {
            (None, Some(n)) => n >= 1,
            (Some(Some(p)), Some(n)) => n > p,
            _ => false,
        }
    }))
}

/// The parent: starts replicas, shows progress, verifies, prints the table.
pub async fn torture(url: &str, args: TortureArgs) -> Result<ExitCode> {
    let (run, finals) = run(url, args, true).await?;
    Ok(report(&run, &finals))
}

/// Runs a torture and returns its tallies and the final counts.
pub(crate) async fn run(
    url: &str,
    mut args: TortureArgs,
    show: bool,
) -> Result<(RunResult, Vec<u64>)> {
    let (_tmp, url) = if url.is_empty() {
        let dir = temp_dir("mdcache-torture-")?;
        let url = format!("disk:{}", dir.path().display());
        (Some(dir), url)
    } else {
        (None, url.to_owned())
    };
    if url.starts_with("memory:") {
        return Err(Error::invalid_input(
            "torture needs a storage shared between processes; memory: lives inside one process",
        ));
    }
    if args.replicas == 0 || args.keys == 0 || args.tasks == 0 || args.max_attempts == 0 {
        return Err(Error::invalid_input(
            "--replicas, --tasks, --keys and --max-attempts must be at least 1",
        ));
    }
    if args.kill && args.kills == 0 {
        return Err(Error::invalid_input("--kill needs --kills of at least 1"));
    }
    let limits = [
        ("--replicas", args.replicas, 1000),
        ("--tasks", args.tasks, 10_000),
        ("--keys", args.keys, 1_000_000),
        ("--updates", args.updates, 1_000_000_000),
        ("--kills", args.kills, 1_000_000),
    ];
    for (flag, value, most) in limits {
        if value > most {
            return Err(Error::invalid_input(format!(
                "{flag} {value} is more than this torture run takes (at most {most})"
            )));
        }
    }
    let storage = metadatacache::open(&url).await?;
    // Sets up the storage space: an object store's bucket or container is
    // created where the service allows it.
    storage.init("").await?;
    let checker = counter_store(Arc::clone(&storage), true, true, DEFAULT_ATTEMPTS);
    let initial = read_counts(&checker, args.keys).await?;
    let history_dir = if args.check {
        let dir = temp_dir("mdcache-history-")?;
        args.history_dir = Some(dir.path().to_owned());
        Some((dir, initial_versions(&storage, args.keys).await?))
    } else {
        None
    };
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    if show {
        eprintln!(
            "torture: {} replicas × {} tasks, {} updates each, on {} keys in {} (seed {seed})",
            args.replicas,
            args.tasks,
            args.updates,
            args.keys,
            metadatacache::redact_url(&url)
        );
    }

    let url2 = url.clone();
    let run = tokio::task::spawn_blocking(move || orchestrate(&url2, &args, seed, initial, show))
        .await
        .map_err(|e| {
            Error::new(ErrorKind::Other, "torture orchestration failed").with_source(e)
        })??;

    let mut run = run;
    if let Some((dir, initial)) = history_dir {
        run.history = Some(check_history(dir.path(), &initial)?);
    }
    checker.clear_cache();
    let finals = read_counts(&checker, run.keys).await?;
    Ok((run, finals))
}

/// What the replicas said about one key.
#[derive(Debug, Default, Clone, Copy)]
struct KeyTally {
    started: u64,
    acked: u64,
    unavailable: u64,
    failed: u64,
    gave_up: u64,
}

impl KeyTally {
    fn finished(&self) -> u64 {
        self.acked + self.unavailable + self.failed + self.gave_up
    }
}

/// Updates that failed with one error kind (other than `Unavailable` and
/// give-ups).
#[derive(Debug, Default, Clone)]
struct KindTally {
    count: u64,
    /// The first such error, as the replica printed it.
    first: String,
}

/// A replica incarnation that exited on its own without reporting an
/// outcome for every update it was given.
#[derive(Debug, Clone, Copy)]
struct ShortReport {
    replica: usize,
    incarnation: usize,
    reported: usize,
    planned: usize,
}

pub(crate) struct RunResult {
    keys: usize,
    replicas: usize,
    tasks: usize,
    max_attempts: usize,
    initial: Vec<u64>,
    tally: Vec<KeyTally>,
    /// Failed updates (`E` lines) by error kind.
    failures: BTreeMap<String, KindTally>,
    /// The first give-up error a replica reported.
    first_give_up: Option<String>,
    /// Replica lines the parent could not read, and the first of them.
    unreadable: (u64, Option<String>),
    short_reports: Vec<ShortReport>,
    /// Whether `--kill` was given.
    kill: bool,
    kills: usize,
    elapsed: Duration,
    conflicts: u64,
    retries: u64,
    give_ups: u64,
    /// Upload calls of the replicas' stores.
    uploads: u64,
    history: Option<history::CheckReport>,
    /// The replicas' metrics, summed (`--metrics`).
    metrics: Option<metrics_report::Merged>,
}

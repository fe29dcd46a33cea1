//! `mdcache torture`: replica processes hammering shared keys through
//! `Store::update`, and the check that no acknowledged update was lost.
//!
//! Each replica process runs `tasks` tasks that increment counters in `keys`
//! shared documents. It reports every operation on its standard output, one
//! line each: `S k` before an update of key `k` starts, then `A k`
//! (acknowledged: `Ok`), `U k` (`Unavailable`: maybe applied), `G k` (gave up
//! after conflicts: not applied) or `E k` (another error: not applied). The
//! parent counts these, optionally kills and restarts replicas, and at the end
//! checks for each key that
//! `acknowledged ≤ final − initial ≤ acknowledged + maybe`,
//! where `maybe` counts `U` answers and updates cut short by a kill.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metadatacache::testing::FaultyStorage;
use metadatacache::testing::history::{self, Initial, RecordingStorage};
use metadatacache::{DownloadRequest, Error, ErrorKind, Options, RetryPolicy, Store};
use serde::{Deserialize, Serialize};

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
    /// kill the remaining replicas are killed too and the run is checked.
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
    /// Record every storage call of every replica and check the history:
    /// one etag chain per key, no stale reads.
    #[arg(long, conflicts_with = "kill")]
    check: bool,
    /// Test aid: break compare-and-swap in the replicas (check, pause, write)
    /// to see the checks fail.
    #[arg(long, hide = true)]
    racy_cas: bool,
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
            check: false,
            racy_cas: false,
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
    /// Record storage calls into this file.
    #[arg(long)]
    history: Option<std::path::PathBuf>,
    #[arg(long)]
    racy_cas: bool,
}

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
            .retry_policy(policy),
    )
}

/// Runs in each replica process.
pub async fn replica(url: &str, args: ReplicaArgs) -> Result<ExitCode> {
    let mut storage = metadatacache::open(url).await?;
    if args.racy_cas {
        storage = Arc::new(FaultyStorage::new(storage, args.seed).racy_cas(true));
    }
    if let Some(file) = &args.history {
        storage = Arc::new(RecordingStorage::to_file(storage, file)?);
    }
    let store = counter_store(storage, !args.no_batching, !args.no_backoff);
    let remaining = Arc::new(AtomicUsize::new(args.ops));
    let mut tasks = Vec::new();
    for t in 0..args.tasks.max(1) {
        let store = store.clone();
        let remaining = Arc::clone(&remaining);
        let keys = args.keys.max(1);
        let seed = args.seed ^ ((args.id as u64) << 32) ^ t as u64;
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let k = rng.usize(..keys);
                println!("S {k}");
                let res = store
                    .update(k, true, |mut c| {
                        c.count += 1;
                        Ok((c, true))
                    })
                    .await;
                match res {
                    Ok(()) => println!("A {k}"),
                    Err(e) if e.kind() == ErrorKind::Unavailable => println!("U {k}"),
                    Err(e) if e.is_conflict() => println!("G {k}"),
                    Err(e) => {
                        println!("E {k}");
                        eprintln!("replica {}: {e}", std::process::id());
                    }
                }
            }
        }));
    }
    let reporter = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                print_stats(&store);
            }
        })
    };
    for t in tasks {
        t.await
            .map_err(|e| Error::new(ErrorKind::Other, "replica task failed").with_source(e))?;
    }
    reporter.abort();
    print_stats(&store);
    Ok(ExitCode::SUCCESS)
}

fn print_stats(store: &Store<usize, Counter>) {
    let s = store.stats();
    println!("T {} {} {}", s.conflicts, s.retries, s.give_ups);
}

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

/// Sent by a reader thread when its replica's output ends.
const EOF: &str = "EOF";

struct Line {
    replica: usize,
    incarnation: usize,
    text: String,
}

struct Replica {
    child: Child,
    incarnation: usize,
    done: usize,
    planned: usize,
}

fn spawn_replica(
    url: &str,
    id: usize,
    incarnation: usize,
    args: &TortureArgs,
    ops: usize,
    seed: u64,
    tx: &mpsc::Sender<Line>,
) -> Result<Child> {
    let exe = std::env::current_exe().map_err(|e| {
        Error::new(ErrorKind::Other, "cannot find the mdcache binary").with_source(e)
    })?;
    let mut child = Command::new(exe)
        .args(["--storage", url, "replica"])
        .args(["--id", &id.to_string()])
        .args(["--tasks", &args.tasks.to_string()])
        .args(["--keys", &args.keys.to_string()])
        .args(["--ops", &ops.to_string()])
        .args(["--seed", &(seed ^ (incarnation as u64) << 16).to_string()])
        .args(args.no_batching.then_some("--no-batching"))
        .args(args.no_backoff.then_some("--no-backoff"))
        .args(args.racy_cas.then_some("--racy-cas"))
        .args(args.history_dir.iter().flat_map(|dir| {
            let file = dir.join(format!("history-{id}-{incarnation}.jsonl"));
            [std::ffi::OsString::from("--history"), file.into_os_string()]
        }))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            Error::new(ErrorKind::Other, "cannot start a replica process").with_source(e)
        })?;
    let stdout = child.stdout.take();
    let tx = tx.clone();
    std::thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        let lines = BufReader::new(stdout)
            .lines()
            .map_while(std::io::Result::ok);
        for text in lines.chain(std::iter::once(EOF.to_owned())) {
            let line = Line {
                replica: id,
                incarnation,
                text,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(child)
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
    if args.replicas == 0 || args.keys == 0 || args.tasks == 0 {
        return Err(Error::invalid_input(
            "--replicas, --tasks and --keys must be at least 1",
        ));
    }
    let storage = metadatacache::open(&url).await?;
    let checker = counter_store(Arc::clone(&storage), true, true);
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
            "torture: {} replicas × {} tasks, {} updates each, on {} keys in {url} (seed {seed})",
            args.replicas, args.tasks, args.updates, args.keys
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

pub(crate) struct RunResult {
    keys: usize,
    replicas: usize,
    tasks: usize,
    initial: Vec<u64>,
    tally: Vec<KeyTally>,
    kills: usize,
    elapsed: Duration,
    conflicts: u64,
    retries: u64,
    give_ups: u64,
    history: Option<history::CheckReport>,
}

fn orchestrate(
    url: &str,
    args: &TortureArgs,
    seed: u64,
    initial: Vec<u64>,
    show: bool,
) -> Result<RunResult> {
    let (tx, rx) = mpsc::channel::<Line>();
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = (args.replicas * args.updates) as u64;
    let bar = if show {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} updates {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let mut replicas = Vec::new();
    for id in 0..args.replicas {
        let child = spawn_replica(url, id, 0, args, args.updates, seed, &tx)?;
        replicas.push(Some(Replica {
            child,
            incarnation: 0,
            done: 0,
            planned: args.updates,
        }));
    }
    let mut tally = vec![KeyTally::default(); args.keys];
    // Last reported (conflicts, retries, give-ups) per replica incarnation.
    let mut stats: HashMap<(usize, usize), (u64, u64, u64)> = HashMap::new();
    let mut kills = 0;
    let pause = |rng: &mut fastrand::Rng| {
        let max = args.kill_every.max(1);
        Duration::from_millis(rng.u64(max / 10..=max))
    };
    let mut next_kill = Instant::now() + pause(&mut rng);
    let mut live = args.replicas;
    let mut last_poll = Instant::now();
    let mut result = Ok(());
    while live > 0 {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(10)) {
            handle_line(&line, &mut tally, &mut stats, &mut replicas, &bar);
        }
        if last_poll.elapsed() < Duration::from_millis(5) {
            continue;
        }
        last_poll = Instant::now();
        if args.kill && kills < args.kills && Instant::now() >= next_kill {
            let id = rng.usize(..args.replicas);
            if let Some(r) = replicas[id].as_mut() {
                // SIGKILL: the process gets no chance to clean up.
                let _ = r.child.kill();
                let _ = r.child.wait();
                kills += 1;
                bar.set_message(format!("{kills} kills"));
                // Read what it said before dying, then restart it with the
                // work it has not finished.
                let incarnation = r.incarnation;
                drain_until_eof(
                    &rx,
                    id,
                    incarnation,
                    &mut tally,
                    &mut stats,
                    &mut replicas,
                    &bar,
                );
                if let Some(r) = replicas[id].as_mut() {
                    let left = r.planned.saturating_sub(r.done);
                    r.incarnation += 1;
                    r.planned = left;
                    r.done = 0;
                    match spawn_replica(url, id, r.incarnation, args, left, seed, &tx) {
                        Ok(child) => r.child = child,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
            }
            next_kill = Instant::now() + pause(&mut rng);
            if kills == args.kills {
                // The last kill: stop everyone at a random moment as well.
                for (id, slot) in replicas.iter_mut().enumerate() {
                    if let Some(mut r) = slot.take() {
                        let _ = r.child.kill();
                        let _ = r.child.wait();
                        live -= 1;
                        let incarnation = r.incarnation;
                        let mut none: [Option<Replica>; 0] = [];
                        drain_until_eof(
                            &rx,
                            id,
                            incarnation,
                            &mut tally,
                            &mut stats,
                            &mut none,
                            &bar,
                        );
                    }
                }
            }
        }
        for slot in replicas.iter_mut() {
            let exited = match slot.as_mut() {
                Some(r) => match r.child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            result = Err(Error::new(
                                ErrorKind::Other,
                                format!("a replica process exited with {status}"),
                            ));
                        }
                        true
                    }
                    Ok(None) => false,
                    Err(_) => true,
                },
                None => false,
            };
            if exited {
                *slot = None;
                live -= 1;
            }
        }
    }
    drop(tx);
    // Everything the replicas printed before exiting.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        handle_line(&line, &mut tally, &mut stats, &mut replicas, &bar);
    }
    bar.finish_and_clear();
    result?;
    let (conflicts, retries, give_ups) = stats
        .values()
        .fold((0, 0, 0), |a, s| (a.0 + s.0, a.1 + s.1, a.2 + s.2));
    Ok(RunResult {
        keys: args.keys,
        replicas: args.replicas,
        tasks: args.tasks,
        initial,
        tally,
        kills,
        elapsed: start.elapsed(),
        conflicts,
        retries,
        give_ups,
        history: None,
    })
}

/// Handles lines until the reader of `(id, incarnation)` reports the end of
/// that process's output, so nothing a killed replica said is missed.
fn drain_until_eof(
    rx: &mpsc::Receiver<Line>,
    id: usize,
    incarnation: usize,
    tally: &mut [KeyTally],
    stats: &mut HashMap<(usize, usize), (u64, u64, u64)>,
    replicas: &mut [Option<Replica>],
    bar: &ProgressBar,
) {
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        if line.text == EOF && line.replica == id && line.incarnation == incarnation {
            return;
        }
        handle_line(&line, tally, stats, replicas, bar);
    }
}

fn handle_line(
    line: &Line,
    tally: &mut [KeyTally],
    stats: &mut HashMap<(usize, usize), (u64, u64, u64)>,
    replicas: &mut [Option<Replica>],
    bar: &ProgressBar,
) {
    let mut parts = line.text.split_whitespace();
    let tag = parts.next();
    if tag == Some("T") {
        let nums: Vec<u64> = parts.filter_map(|p| p.parse().ok()).collect();
        if let [c, r, g] = nums[..] {
            stats.insert((line.replica, line.incarnation), (c, r, g));
        }
        return;
    }
    let Some(k) = parts.next().and_then(|p| p.parse::<usize>().ok()) else {
        return;
    };
    let Some(t) = tally.get_mut(k) else { return };
    match tag {
        Some("S") => t.started += 1,
        Some("A") => t.acked += 1,
        Some("U") => t.unavailable += 1,
        Some("G") => t.gave_up += 1,
        Some("E") => t.failed += 1,
        _ => return,
    }
    if tag != Some("S") {
        bar.inc(1);
        if let Some(Some(r)) = replicas.get_mut(line.replica)
            && r.incarnation == line.incarnation
        {
            r.done += 1;
        }
    }
}

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

fn report(run: &RunResult, finals: &[u64]) -> ExitCode {
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

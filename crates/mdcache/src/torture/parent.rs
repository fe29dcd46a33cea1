//! The parent side: starting, watching, killing and restarting replicas.

use std::collections::HashSet;

use super::protocol::Report;
use super::*;

/// A line a replica printed; `None` when its output has ended.
struct Line {
    replica: usize,
    incarnation: usize,
    text: Option<String>,
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
    let mut cmd = Command::new(exe);
    cmd.args(["--storage", url, "replica"])
        .args(["--id", &id.to_string()])
        .args(["--tasks", &args.tasks.to_string()])
        .args(["--keys", &args.keys.to_string()])
        .args(["--ops", &ops.to_string()])
        .args(["--seed", &(seed ^ (incarnation as u64) << 16).to_string()])
        .args(["--max-attempts", &args.max_attempts.to_string()])
        .args(args.no_batching.then_some("--no-batching"))
        .args(args.no_backoff.then_some("--no-backoff"))
        .args(args.metrics.then_some("--metrics"));
    #[cfg(feature = "faults")]
    cmd.args(args.faults.to_args());
    let mut child = cmd
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
        for text in lines.map(Some).chain(std::iter::once(None)) {
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

pub(super) fn orchestrate(
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
        let child = match spawn_replica(url, id, 0, args, args.updates, seed, &tx) {
            Ok(child) => child,
            Err(e) => {
                // None of them may go on writing after this returns.
                stop_all(replicas.iter_mut().flatten());
                return Err(e);
            }
        };
        replicas.push(Some(Replica {
            child,
            incarnation: 0,
            done: 0,
            planned: args.updates,
        }));
    }
    let mut books = Books {
        rx,
        tally: vec![KeyTally::default(); args.keys],
        failures: BTreeMap::new(),
        first_give_up: None,
        unreadable: (0, None),
        short_reports: Vec::new(),
        ended: HashSet::new(),
        stats: HashMap::new(),
        metrics: HashMap::new(),
        replicas,
        bar,
    };
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
        if let Ok(line) = books.rx.recv_timeout(Duration::from_millis(10)) {
            books.handle(&line);
        }
        if last_poll.elapsed() < Duration::from_millis(5) {
            continue;
        }
        last_poll = Instant::now();
        if args.kill && kills < args.kills && Instant::now() >= next_kill {
            let id = rng.usize(..args.replicas);
            if books.kill(id) {
                kills += 1;
                books.bar.set_message(format!("{kills} kills"));
                // Restart it with the work it has not finished.
                if let Some(r) = books.replicas[id].as_mut() {
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
                for id in 0..args.replicas {
                    if books.kill(id) {
                        books.replicas[id] = None;
                        live -= 1;
                    }
                }
            }
        }
        for id in 0..books.replicas.len() {
            let Some(r) = books.replicas[id].as_mut() else {
                continue;
            };
            let status = match r.child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
            let incarnation = r.incarnation;
            books.drain_until_eof(id, incarnation);
            live -= 1;
            let Some(r) = books.replicas[id].take() else {
                continue;
            };
            match status {
                Ok(status) if status.success() => {
                    // It ended on its own: it must have answered for every
                    // update it was given.
                    if r.done != r.planned {
                        books.short_reports.push(ShortReport {
                            replica: id,
                            incarnation,
                            reported: r.done,
                            planned: r.planned,
                        });
                    }
                }
                Ok(status) => {
                    result = Err(Error::new(
                        ErrorKind::Other,
                        format!("replica {id} exited with {status}"),
                    ));
                }
                Err(e) => {
                    result = Err(Error::new(
                        ErrorKind::Other,
                        format!("cannot wait for replica {id}"),
                    )
                    .with_source(e));
                }
            }
        }
    }
    if result.is_err() {
        stop_all(books.replicas.iter_mut().flatten());
    }
    drop(tx);
    // Everything the replicas printed before exiting.
    while let Ok(line) = books.rx.recv_timeout(Duration::from_millis(200)) {
        books.handle(&line);
    }
    books.bar.finish_and_clear();
    result?;
    let (conflicts, retries, give_ups, uploads) =
        books.stats.values().fold((0, 0, 0, 0), |a, s| {
            (a.0 + s.0, a.1 + s.1, a.2 + s.2, a.3 + s.3)
        });
    let metrics = args
        .metrics
        .then(|| metrics_report::Merged::of(books.metrics.values()));
    Ok(RunResult {
        keys: args.keys,
        replicas: args.replicas,
        tasks: args.tasks,
        max_attempts: args.max_attempts,
        initial,
        tally: books.tally,
        failures: books.failures,
        first_give_up: books.first_give_up,
        unreadable: books.unreadable,
        short_reports: books.short_reports,
        kill: args.kill,
        kills,
        elapsed: start.elapsed(),
        conflicts,
        retries,
        give_ups,
        uploads,
        history: None,
        metrics,
    })
}

/// Kills `replicas` and waits for them: a run that fails must leave no
/// replica writing to the storage after it ends.
fn stop_all<'a>(replicas: impl Iterator<Item = &'a mut Replica>) {
    for r in replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

/// What the parent learns from the replicas' output.
struct Books {
    rx: mpsc::Receiver<Line>,
    tally: Vec<KeyTally>,
    failures: BTreeMap<String, KindTally>,
    first_give_up: Option<String>,
    unreadable: (u64, Option<String>),
    short_reports: Vec<ShortReport>,
    /// Replica incarnations whose output has ended.
    ended: HashSet<(usize, usize)>,
    /// Last reported (conflicts, retries, give-ups, uploads) per replica
    /// incarnation.
    stats: HashMap<(usize, usize), (u64, u64, u64, u64)>,
    /// Last reported value of each metric per replica incarnation.
    metrics: HashMap<(usize, usize), BTreeMap<metrics_report::MetricKey, metrics_report::Value>>,
    replicas: Vec<Option<Replica>>,
    bar: ProgressBar,
}

impl Books {
    /// SIGKILLs replica `id` (no chance to clean up) and reads everything it
    /// said before dying; false when it is not running.
    fn kill(&mut self, id: usize) -> bool {
        let Some(r) = self.replicas[id].as_mut() else {
            return false;
        };
        let _ = r.child.kill();
        let _ = r.child.wait();
        let incarnation = r.incarnation;
        self.drain_until_eof(id, incarnation);
        true
    }

    /// Handles lines until the reader of `(id, incarnation)` reports the end
    /// of that process's output, so nothing a killed replica said is missed.
    fn drain_until_eof(&mut self, id: usize, incarnation: usize) {
        while !self.ended.contains(&(id, incarnation)) {
            let Ok(line) = self.rx.recv_timeout(Duration::from_secs(5)) else {
                return;
            };
            self.handle(&line);
        }
    }

    fn handle(&mut self, line: &Line) {
        let Some(text) = &line.text else {
            self.ended.insert((line.replica, line.incarnation));
            return;
        };
        let Some(report) = Report::parse(text) else {
            self.unreadable(text);
            return;
        };
        let key = match &report {
            Report::Stats {
                conflicts,
                retries,
                give_ups,
                uploads,
            } => {
                self.stats.insert(
                    (line.replica, line.incarnation),
                    (*conflicts, *retries, *give_ups, *uploads),
                );
                return;
            }
            Report::Metric(key, value) => {
                self.metrics
                    .entry((line.replica, line.incarnation))
                    .or_default()
                    .insert(key.clone(), *value);
                return;
            }
            Report::Start(k) | Report::Acked(k) | Report::Unavailable(k) => *k,
            Report::GaveUp { key, .. } | Report::Failed { key, .. } => *key,
        };
        let Some(t) = self.tally.get_mut(key) else {
            self.unreadable(text);
            return;
        };
        match report {
            Report::Start(_) => {
                t.started += 1;
                return;
            }
            Report::Acked(_) => t.acked += 1,
            Report::Unavailable(_) => t.unavailable += 1,
            Report::GaveUp { message, .. } => {
                t.gave_up += 1;
                self.first_give_up.get_or_insert(message);
            }
            Report::Failed { kind, message, .. } => {
                t.failed += 1;
                let k = self.failures.entry(kind).or_default();
                if k.count == 0 {
                    k.first = message;
                }
                k.count += 1;
            }
            Report::Stats { .. } | Report::Metric(..) => return,
        }
        self.bar.inc(1);
        if let Some(Some(r)) = self.replicas.get_mut(line.replica)
            && r.incarnation == line.incarnation
        {
            r.done += 1;
        }
    }

    /// Counts a line that is not a report (or names no torture key).
    fn unreadable(&mut self, text: &str) {
        self.unreadable.0 += 1;
        self.unreadable.1.get_or_insert_with(|| text.to_owned());
    }
}

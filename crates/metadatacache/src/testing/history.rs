//! Recording what a storage was asked and answered, and checking the record
//! the way Jepsen-style checkers do.
//!
//! [`RecordingStorage`] wraps a storage and records every upload and download
//! with its precondition, the etag it saw or made, the content and the wall
//! clock time of call and return. [`check`] then verifies, per path:
//!
//! - **one chain**: the successful writes, each conditional on the etag the
//!   previous one produced, form a single chain from the initial version: no
//!   two successful writes from the same etag (a lost update), no write from
//!   an etag nobody produced (a gap), and no later link that finished before
//!   an earlier one started;
//! - **fresh reads**: every read returns a version of that chain, and no
//!   older than the last write that completed before the read began;
//! - optionally, **values**: each write's content follows from its
//!   predecessor's (e.g. a counter plus one).
//!
//! A write whose outcome is unknown (`unavailable`) may have landed: each
//! one may explain one gap in the chain (its version, which the next write
//! replaced and reads may have returned), or one version that reads
//! returned and no later write built on.
//!
//! Records from several processes are merged by wall clock (all on one host).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// One recorded storage call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `"w"` for an upload, `"r"` for a download.
    pub op: String,
    /// Storage path.
    pub path: String,
    /// Writes: the `if_match` etag. Reads: the `if_none_match` etag.
    pub pre: Option<String>,
    /// Writes: create-only (`if_none_match: ["*"]`).
    pub create: bool,
    /// Writes: the new etag. Reads: the etag returned (for `NotModified`,
    /// the one asked about).
    pub etag: Option<String>,
    /// Content written or read, as text (lossy).
    pub value: Option<String>,
    /// `ok`, `not_modified`, `not_found`, `conflict`, `unavailable`, `error`.
    pub outcome: String,
    /// Call time, nanoseconds since the Unix epoch.
    pub t0: u128,
    /// Return time, nanoseconds since the Unix epoch.
    pub t1: u128,
}

pub(super) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub(super) fn outcome<T>(res: &Result<T>) -> &'static str {
    match res {
        Ok(_) => "ok",
        Err(e) => match e.kind() {
            ErrorKind::NotModified => "not_modified",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unavailable => "unavailable",
            _ if e.is_conflict() => "conflict",
            _ => "error",
        },
    }
}

enum Sink {
    Memory(Mutex<Vec<Event>>),
    File(Mutex<File>),
}

/// A storage that records every upload and download of the storage it wraps.
pub struct RecordingStorage {
    pub(super) inner: Arc<dyn Storage>,
    sink: Sink,
    /// Events that could not be written to the file.
    lost: AtomicU64,
}

impl fmt::Debug for RecordingStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingStorage")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl RecordingStorage {
    /// Records into memory; read them with [`events`](Self::events).
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        RecordingStorage {
            inner,
            sink: Sink::Memory(Mutex::new(Vec::new())),
            lost: AtomicU64::new(0),
        }
    }

    /// Records as JSON lines appended to `path`, one write per event, so
    /// that several processes can record side by side (one file each).
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn to_file(inner: Arc<dyn Storage>, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Other,
                    format!("cannot open history file {}", path.display()),
                )
                .with_source(e)
            })?;
        Ok(RecordingStorage {
            inner,
            sink: Sink::File(Mutex::new(file)),
            lost: AtomicU64::new(0),
        })
    }

    /// The events recorded in memory so far (empty for a file sink).
    pub fn events(&self) -> Vec<Event> {
        match &self.sink {
            Sink::Memory(v) => v.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            Sink::File(_) => Vec::new(),
        }
    }

    /// How many events could not be written to the file: a history with
    /// records missing must not be checked as if it were whole.
    pub fn lost_records(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    pub(super) fn record(&self, e: Event) {
        match &self.sink {
            Sink::Memory(v) => v.lock().unwrap_or_else(|p| p.into_inner()).push(e),
            Sink::File(f) => {
                let written = serde_json::to_vec(&e).map_err(drop).and_then(|mut line| {
                    line.push(b'\n');
                    // One write(2) per line on an O_APPEND file: lines from
                    // concurrent tasks never interleave.
                    let mut file = f.lock().unwrap_or_else(|p| p.into_inner());
                    file.write_all(&line).map_err(drop)
                });
                if written.is_err() {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Reads the events of history files written by [`RecordingStorage::to_file`]
/// (a torn last line, without its newline, is skipped: its process died
/// writing it).
///
/// # Errors
/// A file cannot be read, or a complete line of it is no event: a history
/// with records missing could hide a violation.
pub fn read_events(files: &[impl AsRef<Path>]) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    for f in files {
        let f = f.as_ref();
        let unreadable = |what: String| Error::new(ErrorKind::Other, what);
        let text = std::fs::read(f)
            .map_err(|e| unreadable(format!("cannot read {}", f.display())).with_source(e))?;
        let mut lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
        // After the last newline: empty, or a torn line.
        lines.pop();
        for (n, line) in lines.iter().enumerate() {
            let event = serde_json::from_slice(line).map_err(|e| {
                unreadable(format!(
                    "{} line {}: not a history event",
                    f.display(),
                    n + 1
                ))
                .with_source(e)
            })?;
            out.push(event);
        }
    }
    Ok(out)
}

/// The state of a path before the recorded run: its etag and content, or
/// `None` when absent.
pub type Initial = HashMap<String, Option<(String, String)>>;

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Successful writes checked.
    pub writes: usize,
    /// Successful reads (including `NotModified` and `NotFound`) checked.
    pub reads: usize,
    /// Writes whose outcome is unknown (`unavailable`); each may explain one
    /// gap in its path's chain.
    pub unknown_writes: usize,
    /// One line per violation.
    pub violations: Vec<String>,
}

/// Checks a recorded history; see the [module docs](self). `next_ok(prev,
/// new)` says whether content `new` may follow content `prev` (`None` when
/// the path was absent); pass `|_, _| true` to skip the value check.
pub fn check(
    events: &[Event],
    initial: &Initial,
    next_ok: impl Fn(Option<&str>, &str) -> bool,
) -> CheckReport {
    let mut report = CheckReport::default();
    let mut by_path: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in events {
        by_path.entry(e.path.as_str()).or_default().push(e);
    }
    for (path, evs) in by_path {
        let start = initial.get(path).cloned().flatten();
        check_path(path, &evs, start, &next_ok, &mut report);
    }
    report
}

fn check_path(
    path: &str,
    evs: &[&Event],
    start: Option<(String, String)>,
    next_ok: &impl Fn(Option<&str>, &str) -> bool,
    report: &mut CheckReport,
) {
    let v = &mut report.violations;
    // Successful writes by the version they replaced ("" = absent).
    let mut from: HashMap<&str, Vec<&Event>> = HashMap::new();
    // Writes whose outcome is unknown, each able to explain one version
    // nobody was told of (`true` once it did).
    let mut unknowns: Vec<(&Event, bool)> = Vec::new();
    for e in evs.iter().filter(|e| e.op == "w") {
        match e.outcome.as_str() {
            "ok" => {
                let pre = if e.create {
                    ""
                } else {
                    e.pre.as_deref().unwrap_or("?")
                };
                from.entry(pre).or_default().push(e);
                report.writes += 1;
            }
            "unavailable" => unknowns.push((e, false)),
            _ => {}
        }
    }
    report.unknown_writes += unknowns.len();
    for (pre, ws) in &from {
        if ws.len() > 1 {
            v.push(format!(
                "{path}: {} successful writes from version {pre:?} (lost update)",
                ws.len()
            ));
        }
        if *pre == "?" {
            v.push(format!("{path}: {} unconditional writes", ws.len()));
        }
    }
    // Walk the chain from the initial version.
    // `absent`: the chain's last version is the path's absence (not an
    // unknown value).
    let mut absent = start.is_none();
    let (mut cur, mut cur_value) = match &start {
        Some((etag, value)) => (etag.clone(), Some(value.clone())),
        None => (String::new(), None),
    };
    // chain[0] is the initial version, chain[i] the i-th write.
    let mut chain: Vec<Option<&Event>> = vec![None];
    let mut pos: HashMap<String, usize> = HashMap::from([(cur.clone(), 0)]);
    let mut max_t0 = 0u128;
    let mut walked = 0;
    loop {
        let next = from.get(cur.as_str()).and_then(|ws| ws.first().copied());
        let next = match next {
            Some(w) => w,
            None => {
                // Maybe an unknown-outcome write landed: resume from a
                // successful write whose version nobody produced (and that
                // is not on the chain already: after a second gap, the
                // write resumed from at the first is still such a write).
                let mut orphans: Vec<&Event> = from
                    .iter()
                    .filter(|(pre, _)| !pos.contains_key(**pre) && **pre != "?")
                    .flat_map(|(_, ws)| ws.first().copied())
                    .filter(|w| !pos.contains_key(w.etag.as_deref().unwrap_or_default()))
                    .collect();
                orphans.sort_by_key(|w| w.t0);
                // The unknown write that explains it: made from the chain's
                // last version, begun before the orphan ended, its value
                // following that version's and followed by the orphan's.
                let explained = orphans.iter().find_map(|w| {
                    let u = unknowns.iter_mut().find(|(u, used)| {
                        !*used
                            && u.pre.as_deref().unwrap_or_default() == cur
                            && u.create == cur.is_empty()
                            && u.t0 < w.t1
                            && follows(next_ok, cur_value.as_deref(), absent, u)
                            && u.value.as_deref().is_none_or(|uv| {
                                w.value.as_deref().is_none_or(|wv| next_ok(Some(uv), wv))
                            })
                    })?;
                    u.1 = true;
                    Some((*w, u.0))
                });
                match explained {
                    Some((w, u)) => {
                        cur_value.clone_from(&u.value);
                        absent = false;
                        // The version it replaced is the one the unknown
                        // write made: reads may have returned it.
                        if let Some(pre) = &w.pre {
                            pos.insert(pre.clone(), chain.len());
                            chain.push(None);
                        }
                        w
                    }
                    None => break,
                }
            }
        };
        if next.t1 < max_t0 {
            v.push(format!(
                "{path}: write to {:?} finished before an earlier link of the chain started",
                next.etag
            ));
        }
        max_t0 = max_t0.max(next.t0);
        if let Some(new) = &next.value
            && (cur_value.is_some() || absent)
            && !next_ok(cur_value.as_deref(), new)
        {
            v.push(format!(
                "{path}: value {new:?} does not follow {:?}",
                cur_value.as_deref().unwrap_or("(absent)")
            ));
        }
        cur = next.etag.clone().unwrap_or_default();
        cur_value.clone_from(&next.value);
        absent = false;
        if pos.contains_key(&cur) {
            // Keeps the version's first position, which the reads index.
            v.push(format!("{path}: version {cur:?} produced twice (cycle)"));
            break;
        }
        pos.insert(cur.clone(), chain.len());
        chain.push(Some(next));
        walked += 1;
    }
    let written: usize = from.values().map(Vec::len).sum();
    let dups: usize = from.values().map(|ws| ws.len().saturating_sub(1)).sum();
    if walked + dups < written {
        v.push(format!(
            "{path}: {} successful writes are not on the chain (gap)",
            written - walked - dups
        ));
    }
    // Reads: the version each returned, and where it lies on the chain.
    let mut unknown_versions: HashSet<String> = HashSet::new();
    let mut placed: Vec<(&Event, usize)> = Vec::new();
    for r in evs.iter().filter(|e| e.op == "r") {
        let seen = match r.outcome.as_str() {
            "ok" | "not_modified" => r.etag.clone().unwrap_or_default(),
            "not_found" => String::new(),
            _ => continue,
        };
        report.reads += 1;
        if let Some(&p) = pos.get(&seen) {
            placed.push((r, p));
            continue;
        }
        if seen.is_empty() && start.is_none() {
            continue;
        }
        // A version made by an unknown-outcome write that no later write
        // built on: one begun from a version of the chain before the read
        // ended, whose value is the one read (one such write explains one
        // version, which any number of reads may return).
        if unknown_versions.contains(&seen) {
            continue;
        }
        let explained = !seen.is_empty()
            && unknowns.iter_mut().any(|(u, used)| {
                let fits = !*used
                    && pos.contains_key(u.pre.as_deref().unwrap_or_default())
                    && u.t0 < r.t1
                    && (u.value.is_none() || r.value.is_none() || u.value == r.value);
                *used |= fits;
                fits
            });
        if explained {
            unknown_versions.insert(seen);
            continue;
        }
        v.push(format!(
            "{path}: read returned version {seen:?}, never written"
        ));
    }
    // Fresh reads: none older than a write that completed, or a version
    // another read returned, before it began.
    let links = chain
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (w.t1, i)));
    let done = Newest::of(links);
    let seen = Newest::of(placed.iter().map(|(r, p)| (r.t1, *p)));
    for &(r, p) in &placed {
        let (newest_done, newest_seen) = (done.before(r.t0), seen.before(r.t0));
        if p < newest_done {
            v.push(format!(
                "{path}: stale read: version #{p} returned, #{newest_done} completed before the read began"
            ));
        } else if p < newest_seen {
            v.push(format!(
                "{path}: stale read: version #{p} returned, #{newest_seen} read before the read began"
            ));
        }
        if let Some(w) = chain[p]
            && w.t0 > r.t1
        {
            v.push(format!(
                "{path}: read returned a version written after it finished"
            ));
        }
    }
}

/// The newest chain position among events that ended before a time.
struct Newest {
    /// `(end, newest position among the events ending up to it)`, by end.
    by_end: Vec<(u128, usize)>,
}

impl Newest {
    /// From `(end time, chain position)` pairs.
    fn of(events: impl Iterator<Item = (u128, usize)>) -> Newest {
        let mut by_end: Vec<(u128, usize)> = events.collect();
        by_end.sort_unstable();
        let mut newest = 0;
        for (_, p) in &mut by_end {
            newest = newest.max(*p);
            *p = newest;
        }
        Newest { by_end }
    }

    /// The newest position among the events that ended before `t` (0, the
    /// initial version, when none did).
    fn before(&self, t: u128) -> usize {
        let ended = self.by_end.partition_point(|&(end, _)| end < t);
        ended.checked_sub(1).map_or(0, |i| self.by_end[i].1)
    }
}

/// Whether unknown write `u`'s value may follow the chain's last value
/// `prev` (`absent`: the path is absent there, so `None` is a value).
fn follows(
    next_ok: &impl Fn(Option<&str>, &str) -> bool,
    prev: Option<&str>,
    absent: bool,
    u: &Event,
) -> bool {
    match (&u.value, prev.is_some() || absent) {
        (Some(new), true) => next_ok(prev, new),
        _ => true,
    }
}

//! `mdcache bench`: the library's cost measured side by side with the raw
//! operations it wraps, in one run, as ratios.
//!
//! Each comparison runs its two sides in alternating rounds and keeps each
//! side's best round, so drift on a busy machine hurts both alike.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use metadatacache::{DownloadRequest, Error, ErrorKind, Options, Storage, Store, UploadRequest};
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, Error>;

/// Options of `mdcache bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer iterations (a smoke run; ratios are noisier).
    #[arg(long)]
    quick: bool,
}

/// A document of roughly `size` bytes of JSON, shaped like real metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Doc {
    items: Vec<Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    id: u64,
    name: String,
    tags: Vec<String>,
    created: u64,
}

fn doc_of_size(size: usize) -> Doc {
    let mut doc = Doc { items: Vec::new() };
    let mut len = 12;
    let mut i = 0u64;
    while len < size {
        let item = Item {
            id: i,
            name: format!("app password {i} for device"),
            tags: vec!["laptop".into(), format!("t{}", i % 7)],
            created: 1_700_000_000 + i,
        };
        len += serde_json::to_vec(&item).map_or(64, |v| v.len() + 1);
        doc.items.push(item);
        i += 1;
    }
    doc
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    count: u64,
}

fn err(e: impl std::error::Error + Send + Sync + 'static, what: &str) -> Error {
    Error::new(ErrorKind::Other, what.to_owned()).with_source(e)
}

/// Best per-operation time of `rounds` rounds of `n` calls.
async fn per_op<F, Fut>(n: usize, mut f: F) -> Result<Duration>
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
async fn compare<A, AF, B, BF>(
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

struct Row {
    storage: String,
    what: String,
    ours: Duration,
    baseline: Duration,
    goal: Goal,
}

#[derive(Clone, Copy)]
enum Goal {
    /// ours / baseline at most this.
    AtMost(f64),
    /// baseline / ours at least this.
    SpeedupAtLeast(f64),
    None,
}

fn fmt_dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

impl Row {
    fn print(&self) {
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

struct Sizes {
    rounds: usize,
    updates: usize,
    gets: [(usize, usize); 3],
}

fn sizes(quick: bool, backend: &str) -> Sizes {
    let slow = backend != "memory";
    let scale = if quick { 10 } else { 1 };
    let updates = if slow { 300 } else { 20_000 } / scale;
    Sizes {
        rounds: if quick { 1 } else { 3 },
        updates: updates.max(5),
        gets: [
            (1024, (if slow { 5000 } else { 50_000 }) / scale),
            (64 * 1024, (if slow { 1000 } else { 2000 }) / scale),
            (1024 * 1024, (if slow { 60 } else { 100 }) / scale),
        ],
    }
}

/// `update` against the raw download + if-match upload loop it wraps.
async fn bench_update(storage: &Arc<dyn Storage>, s: &Sizes) -> Result<Row> {
    let store: Store<u8, Counter> = Store::new(
        Options::new(Arc::clone(storage), |_: &u8| "bench/update.json".to_owned())
            .init(Counter::default),
    );
    let raw_path = "bench/raw-cas.json";
    storage
        .simple_upload(raw_path, bytes::Bytes::from_static(b"{\"count\":0}"))
        .await?;
    let (ours, baseline) = compare(
        s.rounds,
        s.updates,
        |_| {
            store.update(0, true, |mut c| {
                c.count += 1;
                Ok((c, true))
            })
        },
        |_| async {
            let cur = storage.download(DownloadRequest::new(raw_path)).await?;
            let mut c: Counter = serde_json::from_slice(&cur.content).map_err(Error::from)?;
            c.count += 1;
            let body = serde_json::to_vec(&c).map_err(Error::from)?;
            storage
                .upload(UploadRequest {
                    if_match: Some(cur.etag),
                    ..UploadRequest::new(raw_path, body)
                })
                .await?;
            Ok(())
        },
    )
    .await?;
    Ok(Row {
        storage: storage.backend().to_owned(),
        what: "update vs raw CAS loop (download+if-match upload)".into(),
        ours,
        baseline,
        goal: Goal::AtMost(1.10),
    })
}

/// `update` on disk against a plain durable write: temp file, fsync,
/// rename, fsync of the directory, in the same directory.
async fn bench_update_vs_fs(storage: &Arc<dyn Storage>, dir: &Path, s: &Sizes) -> Result<Row> {
    let store: Store<u8, Counter> = Store::new(
        Options::new(Arc::clone(storage), |_: &u8| {
            "bench/update-fs.json".to_owned()
        })
        .init(Counter::default),
    );
    let target = dir.join("bench").join("raw-fs.json");
    let (ours, baseline) = compare(
        s.rounds,
        s.updates,
        |_| {
            store.update(0, true, |mut c| {
                c.count += 1;
                Ok((c, true))
            })
        },
        |i| {
            let target = target.clone();
            async move { durable_write(&target, format!("{{\"count\":{i}}}").as_bytes()) }
        },
    )
    .await?;
    Ok(Row {
        storage: "disk".into(),
        what: "update vs write+fsync+rename+fsync dir".into(),
        ours,
        baseline,
        goal: Goal::AtMost(1.10),
    })
}

fn durable_write(target: &Path, content: &[u8]) -> Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(".raw-fs.json.bench-tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(e, "bench: cannot create temp file"))?;
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .map_err(|e| err(e, "bench: cannot write temp file"))?;
    std::fs::rename(&tmp, target).map_err(|e| err(e, "bench: cannot rename"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(e, "bench: cannot sync directory"))
}

/// An unchanged `get` (conditional download answered `NotModified`) against
/// a full download and decode of the same document.
async fn bench_get(
    storage: &Arc<dyn Storage>,
    size: usize,
    n: usize,
    rounds: usize,
) -> Result<Row> {
    let path = format!("bench/get-{size}.json");
    let doc = doc_of_size(size);
    let body = serde_json::to_vec(&doc).map_err(Error::from)?;
    let actual = body.len();
    storage.simple_upload(&path, body.into()).await?;
    let store: Store<u8, Doc> = Store::new(Options::new(Arc::clone(storage), {
        let path = path.clone();
        move |_: &u8| path.clone()
    }));
    // Fill the cache once.
    store.get(0).await?;
    let (ours, baseline) = compare(
        rounds,
        n.max(2),
        |_| async {
            store.get(0).await?;
            Ok(())
        },
        |_| async {
            let resp = storage.download(DownloadRequest::new(&path)).await?;
            let d: Doc = serde_json::from_slice(&resp.content).map_err(Error::from)?;
            std::hint::black_box(d);
            Ok(())
        },
    )
    .await?;
    let label = if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    };
    debug_assert!(actual >= size);
    Ok(Row {
        storage: storage.backend().to_owned(),
        what: format!("unchanged get {label} vs download+decode"),
        ours,
        baseline,
        goal: if size == 64 * 1024 && storage.backend() == "disk" {
            Goal::SpeedupAtLeast(10.0)
        } else {
            Goal::None
        },
    })
}

pub async fn bench(url: Option<&str>, args: BenchArgs) -> Result<ExitCode> {
    let tmp = tempfile::Builder::new()
        .prefix("mdcache-bench-")
        .tempdir()
        .map_err(|e| err(e, "cannot create a temporary directory"))?;
    let targets: Vec<(String, Option<PathBuf>)> = match url {
        Some(u) => vec![(u.to_owned(), None)],
        None => vec![
            ("memory:".to_owned(), None),
            (
                format!("disk:{}", tmp.path().display()),
                Some(tmp.path().to_owned()),
            ),
        ],
    };
    println!(
        "{:<8} {:<44} {:>10} {:>10} {:>14} {:>14}",
        "storage", "benchmark", "ours", "baseline", "ratio", "goal"
    );
    for (url, dir) in targets {
        let storage = metadatacache::open(&url).await?;
        let s = sizes(args.quick, storage.backend());
        bench_update(&storage, &s).await?.print();
        if let Some(dir) = &dir {
            bench_update_vs_fs(&storage, dir, &s).await?.print();
        }
        for (size, n) in s.gets {
            bench_get(&storage, size, n, s.rounds).await?.print();
        }
    }
    Ok(ExitCode::SUCCESS)
}

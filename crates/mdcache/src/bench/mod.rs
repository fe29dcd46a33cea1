//! `mdcache bench`: the library's cost measured side by side with the raw
//! operations it wraps, in one run, as ratios.
//!
//! Each comparison runs its two sides in alternating rounds and keeps each
//! side's best round, so drift on a busy machine hurts both alike.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use crate::torture::{self, TortureArgs};
use metadatacache::{DownloadRequest, Error, ErrorKind, Options, Storage, Store, UploadRequest};
use serde::{Deserialize, Serialize};

mod group;
mod large;
mod memory;
mod paired;
mod report;
mod scale;
mod watch;

pub use self::memory::{MemProbeArgs, mem_probe};
use self::paired::{paired, rounds};
use self::report::{Goal, Row, compare};

type Result<T> = std::result::Result<T, Error>;

/// Options of `mdcache bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer iterations (a smoke run; ratios are noisier).
    #[arg(long)]
    quick: bool,
    /// Also time `list_dir` over a directory of this many documents
    /// (`bench/ls`, written on the first run and kept for the next).
    #[arg(long, value_name = "N")]
    ls: Option<usize>,
    /// Runs only these sections (comma-separated; all when not given).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION")]
    only: Vec<Section>,
}

/// A section of the `bench` report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// The library against the raw operations it wraps (and `--ls`).
    Raw,
    /// Group commit: T tasks of one process on one hot key.
    Group,
    /// One hot key, 1–8 replica processes.
    Replicas,
    /// 1 key vs 64 keys, 4 replica processes.
    Keys,
    /// Push invalidation.
    Watch,
    /// Memory after 1 000 000 distinct keys.
    Memory,
}

impl BenchArgs {
    fn runs(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }
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

fn increment(mut c: Counter) -> Result<(Counter, bool)> {
    c.count += 1;
    Ok((c, true))
}

fn err(e: impl std::error::Error + Send + Sync + 'static, what: &str) -> Error {
    Error::new(ErrorKind::Other, what.to_owned()).with_source(e)
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
        |_| store.update(0, true, increment),
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
        |_| store.update(0, true, increment),
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
) -> Result<Option<Row>> {
    let path = format!("bench/get-{size}.json");
    let doc = doc_of_size(size);
    let body = serde_json::to_vec(&doc).map_err(Error::from)?;
    let actual = body.len();
    let label = if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    };
    if let Err(e) = storage.simple_upload(&path, body.into()).await {
        // A storage with a document size limit (NATS: its message limit).
        if e.kind() == ErrorKind::InvalidInput {
            let backend = storage.backend();
            println!("{backend:<8} unchanged get {label}: not measured: {e}");
            return Ok(None);
        }
        return Err(e);
    }
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
    debug_assert!(actual >= size);
    Ok(Some(Row {
        storage: storage.backend().to_owned(),
        what: format!("unchanged get {label} vs download+decode"),
        ours,
        baseline,
        goal: if size == 64 * 1024 && storage.backend() == "disk" {
            Goal::SpeedupAtLeast(10.0)
        } else {
            Goal::None
        },
    }))
}

/// Section 3: one hot key, 1–8 replica processes × 8 tasks, in every mode;
/// then 4 replicas against 1 in alternating rounds.
async fn bench_hot_key(url: &str, quick: bool) -> Result<()> {
    println!();
    println!(
        "{:<8} {:<10} {:<22} {:>10} {:>10} {:>9} {:>6}",
        "replicas", "tasks", "mode", "goodput/s", "conflicts", "give-ups", "lost"
    );
    let per_replica = if quick { 40 } else { 300 };
    for replicas in [1, 2, 4, 8] {
        for (batching, backoff) in [(true, true), (false, true), (true, false), (false, false)] {
            let args = TortureArgs::plain(replicas, 8, 1, per_replica)
                .batching(batching)
                .backoff(backoff);
            let (run, finals) = torture::run(url, args, false).await?;
            let s = run.summary(&finals);
            let goodput = s.acked as f64 / s.secs;
            let mode = format!(
                "{} / {}",
                if batching { "batching" } else { "no batching" },
                if backoff { "backoff" } else { "no backoff" }
            );
            println!(
                "{replicas:<8} {:<10} {mode:<22} {goodput:>10.0} {:>10} {:>9} {:>6}",
                8,
                run.conflicts(),
                s.gave_up,
                s.lost
            );
        }
    }
    let per_replica = if quick { 40 } else { 1000 };
    let p = paired(
        url,
        rounds(quick),
        || TortureArgs::plain(1, 8, 1, per_replica),
        || TortureArgs::plain(4, 8, 1, per_replica),
    )
    .await?;
    p.print(
        "4 vs 1 replica, batching / backoff",
        "1 replica",
        "4 replicas",
        0.9,
    );
    Ok(())
}

/// Section 4: the same replicas and tasks on 1 key and on 64 keys, with and
/// without group commit, in alternating rounds.
async fn bench_keys(url: &str, quick: bool) -> Result<()> {
    let per_replica = if quick { 40 } else { 1000 };
    println!();
    for batching in [true, false] {
        let p = paired(
            url,
            rounds(quick),
            || TortureArgs::plain(4, 8, 1, per_replica).batching(batching),
            || TortureArgs::plain(4, 8, 64, per_replica).batching(batching),
        )
        .await?;
        // Batching makes one hot key fast; many keys must keep up with it.
        let (what, goal) = if batching {
            ("64 vs 1 key, 4 × 8, batching", 1.0)
        } else {
            ("64 vs 1 key, 4 × 8, no batching", 1.8)
        };
        p.print(what, "1 key", "64 keys", goal);
    }
    Ok(())
}

pub async fn bench(url: Option<&str>, args: BenchArgs) -> Result<ExitCode> {
    let tmp = torture::temp_dir("mdcache-bench-")?;
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
    // Storages that leave the process, for the group-commit section.
    let mut durable = Vec::new();
    for (url, dir) in targets {
        let storage = metadatacache::open(&url).await?;
        // The bucket or container, where the service lets us create it.
        storage.init("").await?;
        if storage.backend() != "memory" {
            durable.push(Arc::clone(&storage));
        }
        if !args.runs(Section::Raw) {
            continue;
        }
        let s = sizes(args.quick, storage.backend());
        bench_update(&storage, &s).await?.print();
        if let Some(dir) = &dir {
            bench_update_vs_fs(&storage, dir, &s).await?.print();
        }
        for (size, n) in s.gets {
            if let Some(row) = bench_get(&storage, size, n, s.rounds).await? {
                row.print();
            }
        }
        let large = s.gets[2].1 / 2;
        if let Some(row) = large::bench_update_large(&storage, s.rounds, large).await? {
            row.print();
        }
        if let Some(n) = args.ls {
            scale::bench_ls(&storage, n).await?;
        }
    }
    if args.runs(Section::Group) {
        for storage in &durable {
            group::bench_group_commit(storage, args.quick).await?;
        }
    }
    // Replica processes need a storage they can share.
    let shared = match url {
        Some(u) if !u.starts_with("memory:") => Some(u.to_owned()),
        Some(_) => None,
        None => Some(format!("disk:{}", tmp.path().join("replicas").display())),
    };
    if let Some(url) = shared {
        if args.runs(Section::Replicas) {
            bench_hot_key(&url, args.quick).await?;
        }
        if args.runs(Section::Keys) {
            bench_keys(&url, args.quick).await?;
        }
    }
    // Push invalidation, on each storage (replicas on separate handles).
    let watch_targets: Vec<String> = match url {
        Some(u) => vec![u.to_owned()],
        None => vec![
            "memory:".to_owned(),
            format!("disk:{}", tmp.path().join("watch").display()),
        ],
    };
    if args.runs(Section::Watch) {
        for url in watch_targets {
            watch::bench_watch(&url, args.quick).await?;
        }
    }
    if args.runs(Section::Memory) {
        memory::bench_memory(args.quick)?;
    }
    Ok(ExitCode::SUCCESS)
}

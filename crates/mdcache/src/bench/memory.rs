//! Section 5 of the report: what a store's cache and lock table hold after
//! 1 000 000 distinct keys, measured in fresh processes.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use metadatacache::{Options, Storage, Store};

use super::{Result, err};

/// Section 5: memory after touching 1,000,000 distinct keys, measured in
/// fresh processes (`mdcache mem-probe`).
pub(super) fn bench_memory(quick: bool) -> Result<()> {
    let keys = if quick { 100_000 } else { 1_000_000 };
    println!();
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>14}",
        "memory", "cache MiB", "lock table", "cached", "bytes/entry"
    );
    for capacity in [None, Some(10_000usize)] {
        let exe = std::env::current_exe().map_err(|e| err(e, "cannot find mdcache"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["mem-probe", "--keys", &keys.to_string()]);
        if let Some(c) = capacity {
            cmd.args(["--capacity", &c.to_string()]);
        }
        let out = cmd.output().map_err(|e| err(e, "cannot run mem-probe"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        let delta = field("cache_bytes");
        let cached = field("cached");
        println!(
            "{:<22} {:>12.1} {:>12} {:>12} {:>14}",
            match capacity {
                None => format!("{keys} keys, unbounded"),
                Some(c) => format!("{keys} keys, cap {c}"),
            },
            delta as f64 / (1 << 20) as f64,
            field("lock_table"),
            cached,
            if capacity.is_none() {
                (delta / cached.max(1)).to_string()
            } else {
                "-".to_owned()
            }
        );
    }
    Ok(())
}

/// Options of the hidden `mdcache mem-probe`.
#[derive(Debug, Args)]
pub struct MemProbeArgs {
    #[arg(long)]
    keys: u32,
    #[arg(long)]
    capacity: Option<usize>,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Fills a memory storage with `keys` small documents, then reads every key
/// through a store and reports how much the store's memory grew.
pub async fn mem_probe(args: MemProbeArgs) -> Result<ExitCode> {
    let storage: Arc<dyn Storage> = Arc::new(metadatacache::MemoryStorage::new());
    for k in 0..args.keys {
        storage
            .simple_upload(&format!("k/{k}"), bytes::Bytes::from_static(b"1"))
            .await?;
    }
    let mut opts = Options::new(Arc::clone(&storage), |k: &u32| format!("k/{k}"));
    if let Some(c) = args.capacity {
        opts = opts.capacity(c);
    }
    let store: Store<u32, u32> = Store::new(opts);
    let before = rss_bytes();
    for k in 0..args.keys {
        store.get(k).await?;
    }
    let after = rss_bytes();
    println!(
        "cache_bytes={} lock_table={} cached={}",
        after.saturating_sub(before),
        store.locked_keys(),
        store.cached_keys()
    );
    Ok(ExitCode::SUCCESS)
}

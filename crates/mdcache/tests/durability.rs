//! Crash durability of the disk backend, checked on the system calls an
//! acknowledged write makes (traced with strace).
//!
//! An acknowledged write survives power loss on a POSIX file system when,
//! before the acknowledgment, its bytes were fsynced in a temp file, the temp
//! file was renamed over the document, and the directory holding the new
//! name was fsynced. These tests trace `mdcache put` and `mdcache update`
//! and check exactly that order, ending before the command reports success.
//! Then they simulate a power loss after every single traced call: a model
//! of what survives (file data only once fsynced, directory entries only once
//! the directory is fsynced, anything not yet durable either kept or lost)
//! enumerates every state the document could be found in, and asserts it is
//! never torn or empty, and always the new version once acknowledged.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

#[path = "../../metadatacache/tests/common/servers.rs"]
mod servers;

fn strace() -> bool {
    let found = Command::new("strace").arg("-V").output().is_ok();
    if !found {
        servers::missing("strace (Debian package strace)");
    }
    found
}

/// The traced system calls of one `mdcache` run, one per line, without pids.
fn trace(dir: &Path, args: &[&str], stdin: &str) -> Vec<String> {
    let log = dir.join("strace.log");
    let mut child = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,write,fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_mdcache"))
        .arg("--storage")
        .arg(format!("disk:{}", dir.join("data").display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_once(' ')
                .map_or(l, |(_, rest)| rest.trim_start())
                .to_owned()
        })
        .collect()
}

fn fd_of(line: &str) -> Option<&str> {
    line.rsplit_once("= ").map(|(_, fd)| fd.trim())
}

/// Checks: temp created → written → fsynced → renamed over `name` → its
/// directory fsynced → only then the command's output (the acknowledgment).
fn assert_durable_order(calls: &[String], name: &str) {
    // The first matching call at or after `from` (descriptor numbers are
    // reused, so calls on the temp file are looked for after its open).
    let pos = |from: usize, pred: &dyn Fn(&String) -> bool, what: &str| {
        calls
            .iter()
            .skip(from)
            .position(pred)
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("no {what} in trace:\n{}", calls.join("\n")))
    };
    let open = pos(
        0,
        &|l| l.starts_with("openat(") && l.contains(".tmp.") && l.contains("O_CREAT"),
        "temp create",
    );
    let tmp_fd = fd_of(&calls[open]).unwrap().to_owned();
    let write = pos(
        open,
        &|l| l.starts_with(&format!("write({tmp_fd},")),
        "temp write",
    );
    let fsync = pos(
        open,
        &|l| l.starts_with(&format!("fsync({tmp_fd})")),
        "temp fsync",
    );
    let rename = pos(
        0,
        &|l| l.starts_with("renameat") && l.contains(".tmp.") && l.contains(&format!("\"{name}\"")),
        "rename over the document",
    );
    let dir_fd = calls[rename]
        .split_once('(')
        .and_then(|(_, args)| args.split(',').next())
        .unwrap_or("")
        .trim()
        .to_owned();
    let dir_sync = calls
        .iter()
        .enumerate()
        .skip(rename)
        .find(|(_, l)| l.starts_with(&format!("fsync({dir_fd})")))
        .map(|(i, _)| i)
        .unwrap_or_else(|| {
            panic!(
                "no fsync of directory fd {dir_fd} after the rename:\n{}",
                calls.join("\n")
            )
        });
    let ack = pos(
        0,
        &|l| l.starts_with("write(1,"),
        "acknowledgment on stdout",
    );
    assert!(
        open < write && write < fsync && fsync < rename,
        "{}",
        calls.join("\n")
    );
    assert!(rename < dir_sync && dir_sync < ack, "{}", calls.join("\n"));
}

/// One traced call that matters to durability, for the crash model.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    CreateTemp,
    WriteTemp,
    SyncTemp,
    Rename,
    SyncDir,
    Ack,
    Other,
}

/// What the document may be after a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Found {
    Old,
    New,
    /// The new name, but data that was never fsynced: empty or partial.
    Torn,
}

fn ops(calls: &[String], name: &str) -> Vec<Op> {
    let mut tmp_fd = String::new();
    let mut dir_fd = String::new();
    calls
        .iter()
        .map(|l| {
            if l.starts_with("openat(") && l.contains(".tmp.") && l.contains("O_CREAT") {
                tmp_fd = fd_of(l).unwrap_or("").to_owned();
                Op::CreateTemp
            } else if !tmp_fd.is_empty() && l.starts_with(&format!("write({tmp_fd},")) {
                Op::WriteTemp
            } else if !tmp_fd.is_empty() && l.starts_with(&format!("fsync({tmp_fd})")) {
                Op::SyncTemp
            } else if l.starts_with("renameat") && l.contains(&format!("\"{name}\"")) {
                dir_fd = l
                    .split_once('(')
                    .and_then(|(_, a)| a.split(',').next())
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                Op::Rename
            } else if !dir_fd.is_empty() && l.starts_with(&format!("fsync({dir_fd})")) {
                Op::SyncDir
            } else if l.starts_with("write(1,") {
                Op::Ack
            } else {
                Op::Other
            }
        })
        .collect()
}

/// Every state the document may be in after a power loss right after call
/// `k` (0 = before any call), given that it existed before (`Old`).
fn after_crash(ops: &[Op], k: usize) -> std::collections::HashSet<Found> {
    let done = &ops[..k];
    let after = |first: Op, then: Op| {
        done.iter()
            .position(|o| *o == first)
            .is_some_and(|i| done[i..].contains(&then))
    };
    let renamed = done.contains(&Op::Rename);
    let data_durable = after(Op::WriteTemp, Op::SyncTemp);
    let entry_durable = after(Op::Rename, Op::SyncDir);
    let new = if data_durable {
        Found::New
    } else {
        Found::Torn
    };
    match (renamed, entry_durable) {
        (false, _) => [Found::Old].into(),
        (true, true) => [new].into(),
        // The rename may or may not have reached the disk.
        (true, false) => [Found::Old, new].into(),
    }
}

fn simulate_power_loss(calls: &[String], name: &str) -> usize {
    let ops = ops(calls, name);
    let ack = ops.iter().position(|o| *o == Op::Ack).unwrap();
    for k in 0..=ops.len() {
        let states = after_crash(&ops, k);
        assert!(
            !states.contains(&Found::Torn),
            "a power loss after call {k} could leave a torn document: {ops:?}"
        );
        if k > ack {
            assert_eq!(
                states,
                [Found::New].into(),
                "a power loss after the acknowledgment (call {ack}) and call {k} could lose the write"
            );
        }
    }
    ops.len() + 1
}

#[test]
fn the_crash_model_catches_a_missing_fsync() {
    use Op::*;
    // Without the temp fsync the renamed document may be torn.
    let ops = [CreateTemp, WriteTemp, Rename, SyncDir, Ack];
    assert!(after_crash(&ops, 3).contains(&Found::Torn));
    // Without the directory fsync an acknowledged write may vanish.
    let ops = [CreateTemp, WriteTemp, SyncTemp, Rename, Ack];
    assert!(after_crash(&ops, 5).contains(&Found::Old));
    // The real order is safe at every point.
    let ops = [CreateTemp, WriteTemp, SyncTemp, Rename, SyncDir, Ack];
    for k in 0..=ops.len() {
        assert!(!after_crash(&ops, k).contains(&Found::Torn));
    }
    assert_eq!(after_crash(&ops, 6), [Found::New].into());
}

#[test]
fn acknowledged_writes_are_fsynced_renamed_and_dir_synced_first() {
    if !strace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let calls = trace(
        dir.path(),
        &["put", "users/a.json", "--create"],
        "{\"n\":1}",
    );
    assert_durable_order(&calls, "a.json");
    // For a create, "Old" stands for "absent".
    simulate_power_loss(&calls, "a.json");
    let calls = trace(dir.path(), &["update", "users/a.json", "--set", "n=2"], "");
    assert_durable_order(&calls, "a.json");
    let crash_points = simulate_power_loss(&calls, "a.json");
    eprintln!("power loss simulated at {crash_points} points of one update: 0 torn, 0 lost");
    // The document is whole and current.
    let doc = std::fs::read_to_string(dir.path().join("data/users/a.json")).unwrap();
    assert_eq!(doc, "{\"n\":2}");
}

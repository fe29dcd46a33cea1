//! Crash durability of disk writes, checked on the system calls a process
//! makes before it acknowledges them (traced with strace), and a model of
//! power loss after every traced call. Shared by the CLI's durability tests
//! and the disk backend's combined-write test.
//!
//! An acknowledged write survives power loss on a POSIX file system when,
//! before the acknowledgment, its bytes were fsynced in a temp file, the temp
//! file was renamed over the document, and the directory holding the new
//! name was fsynced. The model of what survives a power loss: file data
//! only once fsynced, directory entries only once the directory is fsynced,
//! anything not yet durable either kept or lost.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};

/// The system calls traced.
const TRACED: &str = "trace=openat,write,fsync,fdatasync,rename,renameat,renameat2";

/// Whether strace can be run; fails the test (saying what to install)
/// unless skipping is allowed.
pub fn strace() -> bool {
    let found = Command::new("strace").arg("-V").output().is_ok();
    if !found {
        super::servers::missing("strace (Debian package strace)");
    }
    found
}

/// Runs `cmd` under strace (following its threads and children) with
/// `stdin`; returns the traced calls, one per line, without pids. The
/// command must succeed.
pub fn trace(cmd: &Command, stdin: &str, log: &Path) -> Vec<String> {
    let mut traced = Command::new("strace");
    traced
        .args(["-f", "-qq", "-e", TRACED, "-o"])
        .arg(log)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => traced.env(k, v),
            None => traced.env_remove(k),
        };
    }
    let mut child = traced
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
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
    std::fs::read_to_string(log)
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

/// Whether `line` creates a temp file of document `name`.
fn creates_temp(line: &str, name: &str) -> bool {
    line.starts_with("openat(")
        && line.contains(&format!(".{name}.tmp."))
        && line.contains("O_CREAT")
}

/// Whether `line` renames a temp file over document `name`.
fn renames_over(line: &str, name: &str) -> bool {
    line.starts_with("renameat") && line.contains(".tmp.") && line.contains(&format!("\"{name}\""))
}

/// The directory descriptor of a `renameat` line.
fn dir_fd_of(line: &str) -> String {
    line.split_once('(')
        .and_then(|(_, args)| args.split(',').next())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Checks, for document `name`: temp created → written → fsynced → renamed
/// over `name` → its directory fsynced → only then the acknowledgment (the
/// first call for which `is_ack` holds).
pub fn assert_durable_order(calls: &[String], name: &str, is_ack: &dyn Fn(&str) -> bool) {
    // The first matching call at or after `from` (descriptor numbers are
    // reused, so calls on the temp file are looked for after its open).
    let pos = |from: usize, pred: &dyn Fn(&String) -> bool, what: &str| {
        calls
            .iter()
            .skip(from)
            .position(pred)
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("{name}: no {what} in trace:\n{}", calls.join("\n")))
    };
    let open = pos(0, &|l| creates_temp(l, name), "temp create");
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
    let rename = pos(0, &|l| renames_over(l, name), "rename over the document");
    let dir_fd = dir_fd_of(&calls[rename]);
    let dir_sync = pos(
        rename,
        &|l| l.starts_with(&format!("fsync({dir_fd})")),
        "fsync of the directory after the rename",
    );
    let ack = pos(0, &|l| is_ack(l), "acknowledgment");
    assert!(
        open < write && write < fsync && fsync < rename,
        "{name}: {}",
        calls.join("\n")
    );
    assert!(
        rename < dir_sync && dir_sync < ack,
        "{name}: {}",
        calls.join("\n")
    );
}

/// One traced call that matters to durability, for the crash model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
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
pub enum Found {
    Old,
    New,
    /// The new name, but data that was never fsynced: empty or partial.
    Torn,
}

/// The calls of `calls` that matter to document `name`.
fn ops(calls: &[String], name: &str, is_ack: &dyn Fn(&str) -> bool) -> Vec<Op> {
    let mut tmp_fd = String::new();
    let mut dir_fd = String::new();
    calls
        .iter()
        .map(|l| {
            if creates_temp(l, name) {
                tmp_fd = fd_of(l).unwrap_or("").to_owned();
                Op::CreateTemp
            } else if !tmp_fd.is_empty() && l.starts_with(&format!("write({tmp_fd},")) {
                Op::WriteTemp
            } else if !tmp_fd.is_empty() && l.starts_with(&format!("fsync({tmp_fd})")) {
                Op::SyncTemp
            } else if renames_over(l, name) {
                dir_fd = dir_fd_of(l);
                Op::Rename
            } else if !dir_fd.is_empty() && l.starts_with(&format!("fsync({dir_fd})")) {
                Op::SyncDir
            } else if is_ack(l) {
                Op::Ack
            } else {
                Op::Other
            }
        })
        .collect()
}

/// Every state the document may be in after a power loss right after call
/// `k` (0 = before any call), given that it existed before (`Old`).
pub fn after_crash(ops: &[Op], k: usize) -> HashSet<Found> {
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

/// Simulates a power loss after every call of `calls`: document `name` is
/// never torn, and is the new version at every point after the
/// acknowledgment. Returns the number of points.
pub fn simulate_power_loss(calls: &[String], name: &str, is_ack: &dyn Fn(&str) -> bool) -> usize {
    let ops = ops(calls, name, is_ack);
    let ack = ops.iter().position(|o| *o == Op::Ack).unwrap();
    for k in 0..=ops.len() {
        let states = after_crash(&ops, k);
        assert!(
            !states.contains(&Found::Torn),
            "{name}: a power loss after call {k} could leave a torn document: {ops:?}"
        );
        if k > ack {
            assert_eq!(
                states,
                [Found::New].into(),
                "{name}: a power loss after the acknowledgment (call {ack}) and call {k} could lose the write"
            );
        }
    }
    ops.len() + 1
}

//! Crash durability of the disk backend, checked on the system calls an
//! acknowledged write makes (traced with strace).
//!
//! An acknowledged write survives power loss on a POSIX file system when,
//! before the acknowledgment, its bytes were fsynced in a temp file, the temp
//! file was renamed over the document, and the directory holding the new
//! name was fsynced. These tests trace `mdcache put` and `mdcache update`
//! and check exactly that order, ending before the command reports success;
//! and that the documented opt-out (`fsync: false`) is the only way to skip
//! it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn strace() -> bool {
    let found = Command::new("strace").arg("-V").output().is_ok();
    assert!(
        found || std::env::var("MDCACHE_REQUIRE_SERVERS").map_or(true, |v| v != "1"),
        "strace is required (MDCACHE_REQUIRE_SERVERS=1) but missing"
    );
    if !found {
        eprintln!("SKIPPED: strace is not installed");
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
    let pos = |pred: &dyn Fn(&String) -> bool, what: &str| {
        calls
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("no {what} in trace:\n{}", calls.join("\n")))
    };
    let open = pos(
        &|l| l.starts_with("openat(") && l.contains(".tmp.") && l.contains("O_CREAT"),
        "temp create",
    );
    let tmp_fd = fd_of(&calls[open]).unwrap().to_owned();
    let write = pos(
        &|l| l.starts_with(&format!("write({tmp_fd},")),
        "temp write",
    );
    let fsync = pos(
        &|l| l.starts_with(&format!("fsync({tmp_fd})")),
        "temp fsync",
    );
    let rename = pos(
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
    let ack = pos(&|l| l.starts_with("write(1,"), "acknowledgment on stdout");
    assert!(
        open < write && write < fsync && fsync < rename,
        "{}",
        calls.join("\n")
    );
    assert!(rename < dir_sync && dir_sync < ack, "{}", calls.join("\n"));
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
    let calls = trace(dir.path(), &["update", "users/a.json", "--set", "n=2"], "");
    assert_durable_order(&calls, "a.json");
    // The document is whole and current.
    let doc = std::fs::read_to_string(dir.path().join("data/users/a.json")).unwrap();
    assert_eq!(doc, "{\"n\":2}");
}

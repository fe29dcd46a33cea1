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

#[path = "../../metadatacache/tests/common/durable.rs"]
mod durable;

use durable::{Found, Op, after_crash, assert_durable_order, simulate_power_loss, strace};

/// The traced system calls of one `mdcache` run on `dir`.
fn trace(dir: &Path, args: &[&str], stdin: &str) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mdcache"));
    cmd.arg("--storage")
        .arg(format!("disk:{}", dir.join("data").display()))
        .args(args);
    durable::trace(&cmd, stdin, &dir.join("strace.log"))
}

/// The command's output: its acknowledgment.
fn is_ack(line: &str) -> bool {
    line.starts_with("write(1,")
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
    assert_durable_order(&calls, "a.json", &is_ack);
    // For a create, "Old" stands for "absent".
    simulate_power_loss(&calls, "a.json", &is_ack);
    let calls = trace(dir.path(), &["update", "users/a.json", "--set", "n=2"], "");
    assert_durable_order(&calls, "a.json", &is_ack);
    let crash_points = simulate_power_loss(&calls, "a.json", &is_ack);
    eprintln!("power loss simulated at {crash_points} points of one update: 0 torn, 0 lost");
    // The document is whole and current.
    let doc = std::fs::read_to_string(dir.path().join("data/users/a.json")).unwrap();
    assert_eq!(doc, "{\"n\":2}");
}

/// A directory made by someone else (another process that may have died
/// before it synced the directory's name in its parent, or a tool that never
/// does): the first write into it syncs that parent before acknowledging, or
/// a power loss could take the directory, and the acknowledged document in
/// it, away.
#[test]
fn a_write_into_a_directory_made_elsewhere_syncs_its_entry() {
    if !strace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The storage exists (its internal folder made, synced), then a
    // directory appears in it that nobody synced.
    trace(dir.path(), &["put", "first.json", "--create"], "{}");
    std::fs::create_dir(dir.path().join("data/users")).unwrap();
    let calls = trace(dir.path(), &["put", "users/a.json", "--create"], "{}");
    // The root's descriptor: the one the internal folder is opened from.
    let root_fd = calls
        .iter()
        .find_map(|c| c.strip_prefix("openat(")?.split_once(", \".mdcache\""))
        .map(|(fd, _)| fd.to_owned())
        .unwrap_or_else(|| panic!("the internal folder is never opened: {calls:#?}"));
    let walked = format!("openat({root_fd}, \"users\"");
    let into = calls
        .iter()
        .position(|c| c.starts_with(&walked))
        .unwrap_or_else(|| panic!("users/ is never opened: {calls:#?}"));
    let ack = calls
        .iter()
        .position(|c| is_ack(c))
        .expect("no acknowledgment");
    let synced = format!("fsync({root_fd})");
    assert!(
        calls[into..ack].iter().any(|c| c.starts_with(&synced)),
        "the root (fd {root_fd}) was not synced before the acknowledgment: {calls:#?}"
    );
}

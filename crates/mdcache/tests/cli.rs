//! The real `mdcache` binary, run as an operator would.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod table;

use table::{assert_rows, row};

fn mdcache(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    mdcache_env(dir, args, stdin, &[])
}

fn mdcache_env(dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mdcache"));
    if !args.contains(&"--storage") {
        cmd.arg("--storage").arg(format!("disk:{}", dir.display()));
    }
    cmd.args(args)
        .env_remove("MDCACHE_STORAGE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failed command: non-zero exit and exactly one line on stderr, with no
/// panic or backtrace; returns that line.
#[track_caller]
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure, got {o:?}");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(err.starts_with("mdcache: "), "{err}");
    err
}

#[test]
fn put_get_update_ls_stat_rm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = mdcache(d, &["put", "users/a.json", "--create"], Some(r#"{"n":1}"#));
    assert!(out.status.success(), "{out:?}");
    let etag = stdout(&out).trim().to_owned();
    assert_eq!(etag.len(), 64);
    // The document is stored as plain JSON.
    assert_eq!(
        std::fs::read_to_string(d.join("users/a.json")).unwrap(),
        r#"{"n":1}"#
    );
    assert_eq!(
        stdout(&mdcache(d, &["get", "users/a.json"], None)),
        r#"{"n":1}"#
    );

    let out = mdcache(
        d,
        &["update", "users/a.json", "--set", "m.k=x", "--set", "n=2"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("users/a.json")).unwrap()).unwrap();
    assert_eq!(doc, serde_json::json!({"n": 2, "m": {"k": "x"}}));

    // A write with the old etag is refused.
    let out = mdcache(d, &["put", "users/a.json", "--if-match", &etag], Some("{}"));
    let err = one_line_error(&out);
    assert!(err.contains("users/a.json"), "{err}");
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(d.join("users/a.json")).unwrap()
        )
        .unwrap()
    );

    let ls = stdout(&mdcache(d, &["ls"], None));
    assert!(ls.contains("dir") && ls.contains("users"), "{ls}");
    let ls = stdout(&mdcache(d, &["ls", "users"], None));
    assert!(ls.contains("users/a.json"), "{ls}");
    assert!(!ls.contains(".tmp."), "{ls}");
    let st = stdout(&mdcache(d, &["stat", "users/a.json"], None));
    assert!(st.contains("kind:  file"), "{st}");

    assert!(mdcache(d, &["rm", "users/a.json"], None).status.success());
    let err = one_line_error(&mdcache(d, &["get", "users/a.json"], None));
    assert!(
        err.contains("users/a.json") && err.contains("no such"),
        "{err}"
    );
    let err = one_line_error(&mdcache(d, &["rm", "users/a.json"], None));
    assert!(err.contains("users/a.json"), "{err}");
}

#[test]
fn create_twice_fails_without_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        mdcache(d, &["put", "x.json", "--create"], Some("[1]"))
            .status
            .success()
    );
    let err = one_line_error(&mdcache(d, &["put", "x.json", "--create"], Some("[2]")));
    assert!(
        err.contains("x.json") && err.contains("already exists"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.join("x.json")).unwrap(), "[1]");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let err = one_line_error(&mdcache(d, &["put", "x.json"], Some("{not json")));
    assert!(
        err.contains("not valid JSON") && err.contains("standard input"),
        "{err}"
    );
    assert!(!d.join("x.json").exists(), "nothing written");

    let err = one_line_error(&mdcache(d, &["get", "../etc/passwd"], None));
    assert!(err.contains("../etc/passwd"), "{err}");

    let err = one_line_error(&mdcache(d, &["--storage", "ftp://host/x", "ls"], None));
    assert!(err.contains("ftp://host/x"), "{err}");

    // A storage directory that cannot exist (below a regular file).
    let file = d.join("plain-file");
    std::fs::write(&file, "x").unwrap();
    let url = format!("disk:{}/sub", file.display());
    let err = one_line_error(&mdcache(d, &["--storage", &url, "ls"], None));
    assert!(err.contains("plain-file"), "{err}");

    let err = one_line_error(&mdcache(d, &["put", "y.json", "/no/such/input.json"], None));
    assert!(err.contains("/no/such/input.json"), "{err}");

    let err = one_line_error(&mdcache(d, &["update", "y.json", "--set", "novalue"], None));
    assert!(err.contains("novalue"), "{err}");
}

#[test]
fn stored_document_that_is_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        mdcache(d, &["put", "bad.json", "--raw"], Some("garbage"))
            .status
            .success()
    );
    let err = one_line_error(&mdcache(d, &["update", "bad.json", "--set", "a=1"], None));
    assert!(err.contains("bad.json") && err.contains("JSON"), "{err}");
    let err = one_line_error(&mdcache(d, &["get", "bad.json", "--pretty"], None));
    assert!(err.contains("bad.json"), "{err}");
    let err = one_line_error(&mdcache_env(
        d,
        &["edit", "bad.json"],
        None,
        &[("EDITOR", "true")],
    ));
    assert!(err.contains("bad.json"), "{err}");
    // Untouched.
    assert_eq!(
        std::fs::read_to_string(d.join("bad.json")).unwrap(),
        "garbage"
    );
}

#[test]
fn edit_writes_back_and_refuses_to_overwrite_a_concurrent_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        mdcache(d, &["put", "doc.json"], Some(r#"{"v":"old"}"#))
            .status
            .success()
    );
    let out = mdcache_env(
        d,
        &["edit", "doc.json"],
        None,
        &[("EDITOR", "sed -i s/old/new/")],
    );
    assert!(out.status.success(), "{out:?}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("doc.json")).unwrap()).unwrap();
    assert_eq!(doc["v"], "new");

    // While the "editor" runs, another writer changes the document.
    let bin = env!("CARGO_BIN_EXE_mdcache");
    let editor = format!(
        "sh -c 'echo {{\\\"v\\\":\\\"theirs\\\"}} | {bin} --storage disk:{} put doc.json && sed -i s/new/mine/ \"$0\"'",
        d.display()
    );
    let out = mdcache_env(d, &["edit", "doc.json"], None, &[("EDITOR", &editor)]);
    let err = one_line_error(&out);
    assert!(
        err.contains("conflict") && err.contains("doc.json"),
        "{err}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("doc.json")).unwrap()).unwrap();
    assert_eq!(doc["v"], "theirs", "the concurrent change survives");
}

#[test]
fn torture_smoke_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = mdcache(
        d,
        &[
            "torture",
            "--replicas",
            "2",
            "--tasks",
            "2",
            "--keys",
            "2",
            "--updates",
            "100",
        ],
        None,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(&text, &[("lost", "0"), ("acknowledged", "200")]);
    // The counters are in the storage directory, as plain JSON.
    let total: u64 = (0..2)
        .map(|k| {
            let doc: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(d.join(format!("torture/key-{k}.json"))).unwrap(),
            )
            .unwrap();
            doc["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(total, 200);
}

#[test]
fn torture_with_kills_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = mdcache(
        dir.path(),
        &[
            "torture",
            "--kill",
            "--kills",
            "5",
            "--updates",
            "400",
            "--seed",
            "7",
        ],
        None,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(&text, &[("lost", "0"), ("result", "OK")]);
}

/// Four replica processes × four tasks × 250 `Store::update`s on four keys
/// in one directory (the reference run that loses 16–24 % of updates in the
/// original package).
#[test]
fn four_replica_processes_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let out = mdcache(
        dir.path(),
        &[
            "torture",
            "--replicas",
            "4",
            "--tasks",
            "4",
            "--keys",
            "4",
            "--updates",
            "1000",
        ],
        None,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(
        &text,
        &[
            ("acknowledged", "4000"),
            ("final − initial", "4000"),
            ("lost", "0"),
        ],
    );
}

/// 200 SIGKILLs of replica processes at random moments: every document still
/// decodes, no temp file is listed, and every count lies between the
/// acknowledged and the attempted increments (checked by torture itself).
#[test]
fn two_hundred_kills_tear_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = mdcache(
        d,
        &[
            "torture",
            "--kill",
            "--kills",
            "200",
            "--kill-every",
            "40",
            "--replicas",
            "4",
            "--updates",
            "100000",
            "--seed",
            "11",
        ],
        None,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(&text, &[("kills", "200"), ("result", "OK")]);
    let ls = stdout(&mdcache(d, &["ls", "torture"], None));
    assert!(!ls.contains(".tmp."), "{ls}");
    assert_eq!(ls.lines().count(), 4, "{ls}");
    for k in 0..4 {
        let out = mdcache(
            d,
            &["get", "--pretty", &format!("torture/key-{k}.json")],
            None,
        );
        assert!(out.status.success(), "key {k} does not decode: {out:?}");
    }
}

#[test]
fn torture_history_check_is_clean_and_catches_a_broken_storage() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["torture", "--check", "--replicas", "3", "--updates", "150"];
    let out = mdcache(dir.path(), &args, None);
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(&text, &[("history: violations", "0")]);
    assert_ne!(row(&text, "history: writes checked"), "0");

    // Compare-and-swap broken on purpose: the history check must say so.
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "torture",
        "--check",
        "--racy-cas",
        "--replicas",
        "3",
        "--keys",
        "1",
        "--updates",
        "100",
    ];
    let out = mdcache(dir.path(), &args, None);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    let violations: usize = row(&text, "history: violations").parse().unwrap();
    assert!(violations > 0, "{text}");
}

/// One hot key, 4 replica processes × 8 tasks, default retry policy: every
/// update gets through (no give-ups), none is lost.
#[test]
fn hot_key_across_four_processes_never_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "torture",
        "--replicas",
        "4",
        "--tasks",
        "8",
        "--keys",
        "1",
        "--updates",
        "300",
    ];
    let out = mdcache(dir.path(), &args, None);
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(
        &text,
        &[("give-ups", "0"), ("acknowledged", "1200"), ("lost", "0")],
    );
}

#[test]
fn torture_refuses_memory_storage() {
    let dir = tempfile::tempdir().unwrap();
    let err = one_line_error(&mdcache(
        dir.path(),
        &["--storage", "memory:", "torture"],
        None,
    ));
    assert!(err.contains("memory:"), "{err}");
}

//! The real `mdcache` binary, run as an operator would.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod table;
mod tree;

use table::{assert_rows, failures, row};

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

/// `mdcache torture ARGS` in a new directory: the output and its table.
fn torture(args: &[&str]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = mdcache(dir.path(), &[&["torture"], args].concat(), None);
    let text = stdout(&out);
    (out, text)
}

/// A torture run that failed for exactly one reason, starting with `reason`;
/// returns its table.
#[track_caller]
fn fails_for(args: &[&str], reason: &str) -> String {
    let (out, text) = torture(args);
    assert!(!out.status.success(), "expected failure: {out:?}");
    let why = failures(&text);
    assert_eq!(why.len(), 1, "one reason expected:\n{text}");
    assert!(why[0].starts_with(reason), "{:?} in:\n{text}", why[0]);
    assert_rows(&text, &[("result", "FAILED")]);
    text
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

/// A command line clap refuses, and numbers past what a run can take, fail
/// like every other error: one line, exit 1, naming what was wrong.
#[test]
fn bad_command_lines_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: [(&[&str], &str); 6] = [
        (&["torture", "--keys", "abc"], "--keys"),
        (&["frobnicate"], "frobnicate"),
        (&["get"], "PATH"),
        (&["torture", "--keys", "1000000000000"], "--keys"),
        (
            &[
                "torture",
                "--replicas",
                "2",
                "--updates",
                "9223372036854775808",
            ],
            "--updates",
        ),
        (&["torture", "--replicas", "100000"], "--replicas"),
    ];
    for (args, names) in cases {
        let out = mdcache(d, args, None);
        let err = one_line_error(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    // Help still prints, and succeeds.
    let out = mdcache(d, &["--help"], None);
    assert!(
        out.status.success() && stdout(&out).contains("Usage"),
        "{out:?}"
    );
}

/// A password never reaches the output: not for a misspelt scheme, not
/// in help showing the environment variable, not in migrate's refusals, not
/// where the password holds characters that end a URL's authority early.
#[test]
fn secrets_in_storage_urls_stay_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = "hunter2";
    let cases: [&[&str]; 4] = [
        &["--storage", "postgress://app:hunter2@db/app", "ls"],
        &["--storage", "etcd://u:hunt/er2x@h:1/x", "ls"],
        &[
            "migrate",
            "--from",
            "etcd://u:hunter2@127.0.0.1:1/app",
            "--to",
            "etcd://u:hunter2@127.0.0.1:1/app/v2",
        ],
        &["--storage", "s3://b/p?sig=hunter2&sv=1", "ls"],
    ];
    for args in cases {
        let out = mdcache(d, args, None);
        let all = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{args:?}");
        assert!(
            !all.contains(secret) && !all.contains("er2x"),
            "{args:?}: {all}"
        );
    }
    let out = mdcache_env(
        d,
        &["--help"],
        None,
        &[("MDCACHE_STORAGE", "postgres://app:hunter2@db/app")],
    );
    assert!(out.status.success());
    assert!(!stdout(&out).contains(secret), "{}", stdout(&out));
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
    // Edits that change nothing write nothing: the file is not replaced.
    let inode =
        || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(d.join("users/a.json")).unwrap());
    let before = inode();
    let out = mdcache(
        d,
        &["update", "users/a.json", "--set", "n=2", "--unset", "gone"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(inode(), before, "a no-op update rewrote the document");
    assert!(stdout(&out).contains("\"n\": 2"), "{out:?}");

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
    assert!(kept_edit(&err).contains("mine"), "{err}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("doc.json")).unwrap()).unwrap();
    assert_eq!(doc["v"], "theirs", "the concurrent change survives");
}

/// The file named by "your edit is in PATH" at the end of `err`.
fn kept_edit(err: &str) -> String {
    let (_, rest) = err
        .split_once("your edit is in ")
        .unwrap_or_else(|| panic!("no kept edit named: {err}"));
    // The temporary file's path, up to the error's source.
    let path = rest.split(": ").next().unwrap().trim_end();
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    std::fs::remove_file(path).unwrap();
    text
}

/// A write that fails for any reason keeps the edit in a file and names it.
#[test]
fn edit_keeps_the_edit_when_the_write_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(mdcache(d, &["put", "a"], Some("{}")).status.success());
    let mine = d.join("mine.json");
    std::fs::write(&mine, r#"{"mine":1}"#).unwrap();
    // A document cannot be created below a document.
    let editor = format!("cp {}", mine.display());
    let out = mdcache_env(
        d,
        &["edit", "--create", "a/b.json"],
        None,
        &[("EDITOR", &editor)],
    );
    let err = one_line_error(&out);
    assert!(err.contains("a/b.json"), "{err}");
    let kept: serde_json::Value = serde_json::from_str(&kept_edit(&err)).unwrap();
    assert_eq!(kept["mine"], 1, "{err}");
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
fn torture_history_check_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["torture", "--check", "--replicas", "3", "--updates", "150"];
    let out = mdcache(dir.path(), &args, None);
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert_rows(&text, &[("history: violations", "0"), ("result", "OK")]);
    assert_ne!(row(&text, "history: writes checked"), "0");
    assert_eq!(failures(&text), Vec::<&str>::new());
}

#[cfg(feature = "faults")]
#[test]
fn torture_history_check_catches_a_broken_storage() {
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
    let why = failures(&text);
    assert!(
        why.iter().any(|l| l.starts_with(&format!(
            "history: {violations} violations of one etag chain per key"
        ))),
        "{text}"
    );
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

/// `--kill` with a pause before the first kill (at least six minutes) far
/// longer than the run: no kill happens, and the run must not pass as a
/// kill test.
#[test]
fn torture_kill_without_a_kill_fails() {
    let args = [
        "--kill",
        "--kill-every",
        "3600000",
        "--replicas",
        "2",
        "--tasks",
        "2",
        "--updates",
        "20",
    ];
    let text = fails_for(&args, "no kill: --kill was given but the run ended");
    assert_rows(
        &text,
        &[("kills", "0"), ("lost", "0"), ("acknowledged", "40")],
    );
}

/// One attempt per update, no group commit, no backoff, four processes on
/// one key: conflicts exhaust the budget, and a give-up fails the run.
#[test]
fn torture_give_ups_fail_the_run() {
    let args = [
        "--max-attempts",
        "1",
        "--no-batching",
        "--no-backoff",
        "--replicas",
        "4",
        "--tasks",
        "4",
        "--keys",
        "1",
        "--updates",
        "300",
    ];
    let text = fails_for(&args, "give-ups: ");
    let why = failures(&text)[0];
    assert!(
        why.contains("ran out of attempts (--max-attempts 1)")
            && why.contains("gave up after 1 attempt"),
        "{why}"
    );
    let give_ups: u64 = row(&text, "give-ups").parse().unwrap();
    assert!(give_ups > 0, "{text}");
    assert_rows(
        &text,
        &[("retries", "0"), ("lost", "0"), ("applied twice", "0")],
    );
}

#[test]
fn torture_refuses_options_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let err = one_line_error(&mdcache(
        dir.path(),
        &["torture", "--max-attempts", "0"],
        None,
    ));
    assert!(err.contains("--max-attempts"), "{err}");
    let err = one_line_error(&mdcache(
        dir.path(),
        &["torture", "--kill", "--kills", "0"],
        None,
    ));
    assert!(err.contains("--kills"), "{err}");
}

/// The default (release) build has no fault injection; the history check,
/// which is evidence and not a fault, stays.
#[cfg(not(feature = "faults"))]
#[test]
fn default_build_has_no_fault_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = mdcache(dir.path(), &["torture", "--help"], None);
    assert!(out.status.success(), "{out:?}");
    let help = stdout(&out);
    assert!(
        help.contains("--check") && help.contains("--max-attempts"),
        "{help}"
    );
    for flag in ["--racy-cas", "--fault-"] {
        assert!(!help.contains(flag), "{flag} in:\n{help}");
    }
    // Rejected, not merely hidden (with `--help` after it, an accepted flag
    // would print the help and succeed).
    let out = mdcache(dir.path(), &["torture", "--racy-cas", "--help"], None);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--racy-cas"), "{err}");
}

#[cfg(feature = "faults")]
#[test]
fn faults_build_shows_fault_options() {
    let dir = tempfile::tempdir().unwrap();
    let help = stdout(&mdcache(dir.path(), &["torture", "--help"], None));
    for flag in [
        "--check",
        "--racy-cas",
        "--fault-unavailable",
        "--fault-ambiguous",
        "--fault-conflict",
        "--fault-error",
        "--fault-applied-conflict",
    ] {
        assert!(help.contains(flag), "{flag} missing in:\n{help}");
    }
}

/// Storage errors of kind `Other` (not applied, not ambiguous): an update
/// may not fail that way, so the run fails, counting them by kind.
#[cfg(feature = "faults")]
#[test]
fn torture_errors_other_than_unavailable_fail_the_run() {
    let args = [
        "--fault-error",
        "0.2",
        "--replicas",
        "2",
        "--tasks",
        "2",
        "--updates",
        "50",
        "--seed",
        "1",
    ];
    let text = fails_for(&args, "error Other: ");
    let why = failures(&text)[0];
    assert!(why.contains("injected: storage error"), "{why}");
    let failed = row(&text, "failed: Other");
    assert_ne!(failed, "0");
    assert!(
        why.starts_with(&format!("error Other: {failed} updates failed with Other")),
        "{why}"
    );
    assert_rows(
        &text,
        &[
            ("failed (not applied)", failed),
            ("lost", "0"),
            ("applied twice", "0"),
        ],
    );
}

/// A storage that applies an upload and then answers "conflict": the
/// retried update lands twice, above acknowledged + unavailable.
#[cfg(feature = "faults")]
#[test]
fn torture_updates_applied_twice_fail_the_run() {
    let args = [
        "--fault-applied-conflict",
        "0.2",
        "--replicas",
        "1",
        "--tasks",
        "1",
        "--keys",
        "1",
        "--updates",
        "50",
        "--seed",
        "1",
    ];
    let text = fails_for(
        &args,
        "applied twice: the final counts exceed acknowledged + unavailable by ",
    );
    let twice: u64 = row(&text, "applied twice").parse().unwrap();
    assert!(twice > 0, "{text}");
    assert_rows(&text, &[("acknowledged", "50"), ("lost", "0")]);
}

/// `Unavailable` answers (lost replies, refused calls) are what the promise
/// allows: such a run passes, its final count within the bound.
#[cfg(feature = "faults")]
#[test]
fn torture_unavailable_answers_are_allowed() {
    let args = [
        "--fault-ambiguous",
        "0.3",
        "--fault-unavailable",
        "0.1",
        "--replicas",
        "2",
        "--tasks",
        "2",
        "--updates",
        "100",
        "--seed",
        "5",
    ];
    let (out, text) = torture(&args);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(failures(&text), Vec::<&str>::new());
    assert_ne!(row(&text, "unavailable (maybe applied)"), "0");
    assert_rows(
        &text,
        &[("lost", "0"), ("applied twice", "0"), ("result", "OK")],
    );
}

/// `mdcache migrate --from disk:FROM --to disk:TO ARGS`: exit success, stdout
/// and stderr.
fn migrate(from: &Path, to: &Path, args: &[&str]) -> (bool, String, String) {
    let (f, t) = (
        format!("disk:{}", from.display()),
        format!("disk:{}", to.display()),
    );
    let out = mdcache(
        from,
        &[&["migrate", "--from", &f, "--to", &t], args].concat(),
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.success(), stdout(&out), err)
}

/// The copy summary's counts: copied, already there, differing, failed.
#[track_caller]
fn copy_summary(out: &str) -> [u64; 4] {
    let line = out
        .lines()
        .find(|l| l.starts_with("copied "))
        .unwrap_or_else(|| panic!("no summary in {out:?}"));
    let nums: Vec<u64> = line
        .split([',', '('])
        .take(4)
        .map(|part| part.trim().rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    nums.try_into().unwrap()
}

#[test]
fn migrate_copies_every_document_and_verifies() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let docs = tree::seed(src.path(), 40);
    let (ok, out, err) = migrate(src.path(), &dst.path().join("new"), &["--jobs", "3"]);
    assert!(ok, "{out}{err}");
    assert_eq!(copy_summary(&out), [40, 0, 0, 0], "{out}");
    assert!(
        out.contains("verified 40 documents: 40 identical, 0 differing, 0 missing, 0 failed"),
        "{out}"
    );
    assert_eq!(tree::read(&dst.path().join("new")), docs);
    assert_eq!(err, "", "no progress bar without a terminal");

    // --prefix: one directory only.
    let part = tempfile::tempdir().unwrap();
    let (ok, out, _) = migrate(src.path(), part.path(), &["--prefix", "shares/"]);
    assert!(ok, "{out}");
    let shares: std::collections::BTreeMap<_, _> = docs
        .iter()
        .filter(|(p, _)| p.starts_with("shares/"))
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    assert_eq!(copy_summary(&out), [shares.len() as u64, 0, 0, 0], "{out}");
    assert_eq!(tree::read(part.path()), shares);
}

#[test]
fn migrate_resumes_a_partial_copy() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let docs = tree::seed(src.path(), 30);
    // An earlier run that stopped half-way.
    for (path, content) in docs.iter().step_by(2) {
        tree::write(dst.path(), path, content);
    }
    let (ok, out, err) = migrate(src.path(), dst.path(), &[]);
    assert!(ok, "{out}{err}");
    assert_eq!(copy_summary(&out), [15, 15, 0, 0], "{out}");
    assert!(out.contains("30 identical"), "{out}");
    assert_eq!(tree::read(dst.path()), docs);
    // Once more: all there already.
    let (ok, out, _) = migrate(src.path(), dst.path(), &[]);
    assert!(ok, "{out}");
    assert_eq!(copy_summary(&out), [0, 30, 0, 0], "{out}");
}

#[test]
fn migrate_never_overwrites_a_document_on_the_target() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let docs = tree::seed(src.path(), 12);
    let newer = b"{\"doc\":\"changed on the target\"}";
    tree::write(dst.path(), "shares/g1/s1.json", newer);
    let (ok, out, err) = migrate(src.path(), dst.path(), &[]);
    assert!(!ok, "a difference fails the run: {out}");
    assert_eq!(copy_summary(&out), [11, 0, 1, 0], "{out}");
    assert!(
        out.contains("verified 12 documents: 11 identical, 1 differing"),
        "{out}"
    );
    let named: Vec<&str> = err.lines().collect();
    assert_eq!(
        named.len(),
        2,
        "the copy and the verification name it: {err}"
    );
    assert!(
        named
            .iter()
            .all(|l| l.starts_with("shares/g1/s1.json: differs")),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dst.path().join("shares/g1/s1.json")).unwrap(),
        newer
    );
    let mut want = docs;
    want.insert("shares/g1/s1.json".into(), newer.to_vec());
    assert_eq!(tree::read(dst.path()), want, "everything else copied");
}

#[test]
fn migrate_refuses_bad_input_in_one_line() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree::seed(src.path(), 2);
    let s = format!("disk:{}", src.path().display());
    let inside = format!("disk:{}/copy", src.path().display());
    let missing = format!("disk:{}/no-such-dir", dst.path().display());
    let d = dst.path().display().to_string();
    let cases: [(&[&str], &str); 8] = [
        (&["--from", "ftp://host/x", "--to", &d], "ftp://host/x"),
        (
            &[
                "--from",
                "etcd://127.0.0.1:1/app",
                "--to",
                "etcd://127.0.0.1:1/app/v2",
            ],
            "inside the other",
        ),
        (&["--from", "s3://b/p", "--to", "s3://b/p/"], "same storage"),
        (&["--from", &s, "--to", &s], "same storage"),
        (
            &["--from", &s, "--to", src.path().to_str().unwrap()],
            "same directory",
        ),
        (&["--from", &s, "--to", &inside], "inside the other"),
        (&["--from", &missing, "--to", &d], "no such directory"),
        (
            &["--from", &s, "--to", &d, "--prefix", "a//b"],
            "not a storage path",
        ),
    ];
    for (args, want) in cases {
        let err = one_line_error(&mdcache(dst.path(), &[&["migrate"], args].concat(), None));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = one_line_error(&mdcache(
        dst.path(),
        &["migrate", "--from", &s, "--to", "memory:"],
        None,
    ));
    assert!(err.contains("memory"), "{err}");
    assert!(!dst.path().join("no-such-dir").exists(), "nothing created");
    assert!(!src.path().join("copy").exists(), "nothing created");
    assert_eq!(tree::read(dst.path()).len(), 0, "nothing copied");
}

/// A source with nothing under the prefix (a misspelt one, say) is no
/// migration done: exit 1, saying so.
#[test]
fn migrate_of_nothing_fails() {
    let (src, dst) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tree::seed(src.path(), 2);
    let (ok, _, err) = migrate(
        src.path(),
        dst.path(),
        &["-q", "--prefix", "no-such-prefix"],
    );
    assert!(!ok, "{err}");
    assert!(err.contains("no documents"), "{err}");
}

/// The rows of the metrics table whose name (up to `}`) starts with
/// `prefix`: (name with labels, first number after it).
#[cfg(feature = "metrics")]
fn metric_rows<'a>(text: &'a str, prefix: &str) -> Vec<(&'a str, u64)> {
    let table = text
        .split_once("\nmetrics, summed over ")
        .unwrap_or_else(|| panic!("no metrics table in:\n{text}"))
        .1;
    table
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            let (name, rest) = l.split_once("} ").unwrap();
            let n = rest.split_whitespace().next().unwrap().parse().unwrap();
            (name, n)
        })
        .collect()
}

/// The sum of the first numbers of the rows `metric_rows` finds, filtered
/// by a label.
#[cfg(feature = "metrics")]
fn metric_sum(text: &str, prefix: &str, label: &str) -> u64 {
    metric_rows(text, prefix)
        .iter()
        .filter(|(name, _)| name.contains(label))
        .map(|(_, n)| n)
        .sum()
}

#[cfg(feature = "metrics")]
#[test]
fn torture_metrics_add_up_to_the_table() {
    let mut args = vec![
        "--metrics",
        "--replicas",
        "3",
        "--tasks",
        "3",
        "--keys",
        "2",
        "--updates",
        "80",
        "--seed",
        "11",
    ];
    // With faults, updates end every way they can: Ok, Unavailable, failed.
    if cfg!(feature = "faults") {
        args.extend([
            "--fault-ambiguous",
            "0.1",
            "--fault-unavailable",
            "0.05",
            "--fault-error",
            "0.02",
        ]);
    }
    let (out, text) = torture(&args);
    assert!(
        text.contains("metrics, summed over 3 replica processes"),
        "{text}"
    );
    let n = |name: &str| row(&text, name).parse::<u64>().unwrap();
    let uploads = metric_sum(&text, "metadatacache_uploads_total{", "");
    assert_eq!(uploads, n("uploads"), "{text}");
    // Fewer than the updates is possible: group commit writes several at once.
    assert!(uploads > 0, "{text}");
    // Every upload call is timed, whatever its outcome.
    let upload_calls = metric_sum(&text, "metadatacache_storage_seconds{", "op=\"upload\"");
    assert_eq!(upload_calls, uploads, "{text}");
    for counter in ["conflicts", "retries"] {
        let total = metric_sum(&text, &format!("metadatacache_{counter}_total{{"), "");
        assert_eq!(total, n(counter), "{counter} in:\n{text}");
    }
    // One `update` observation per update call, labelled with its outcome.
    let updates = metric_sum(&text, "metadatacache_operation_seconds{", "op=\"update\"");
    let ended = n("acknowledged")
        + n("unavailable (maybe applied)")
        + n("failed (not applied)")
        + n("give-ups");
    assert_eq!(updates, 240, "{text}");
    assert_eq!(updates, ended, "{text}");
    let ok = metric_sum(&text, "metadatacache_operation_seconds{", "outcome=\"ok\"");
    assert_eq!(ok, n("acknowledged"), "{text}");
    let unavailable = metric_sum(
        &text,
        "metadatacache_operation_seconds{",
        "outcome=\"unavailable\"",
    );
    assert_eq!(unavailable, n("unavailable (maybe applied)"), "{text}");
    if n("failed (not applied)") == 0 {
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn torture_without_metrics_prints_none() {
    let (out, text) = torture(&["--replicas", "1", "--tasks", "1", "--updates", "5"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!text.contains("metrics, summed"), "{text}");
    // A build without the feature refuses the flag.
    if cfg!(not(feature = "metrics")) {
        let (out, _) = torture(&["--metrics", "--help"]);
        assert!(!out.status.success(), "{out:?}");
    }
}

/// `bench --quick --only replicas,keys` on a directory: the replicas table,
/// and each ratio of replica runs (one round each when quick), with
/// nothing lost and nothing given up.
#[test]
fn bench_reports_ratios_of_replica_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = mdcache(
        dir.path(),
        &["bench", "--quick", "--only", "replicas,keys"],
        None,
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    for what in [
        "4 vs 1 replica, batching / backoff, 1 round:",
        "64 vs 1 key, 4 × 8, batching, 1 round:",
        "64 vs 1 key, 4 × 8, no batching, 1 round:",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what:?} in:\n{text}"));
        assert!(line.ends_with("lost 0, give-ups 0"), "{line}");
        assert!(!line.contains(" 0–0/s") && !line.contains("inf"), "{line}");
    }
    // The table has a row per replica count and mode; no group-commit or
    // raw section was asked for.
    assert_eq!(
        text.lines().filter(|l| l.starts_with("8 ")).count(),
        4,
        "{text}"
    );
    assert!(!text.contains("update vs raw CAS loop"), "{text}");
}

//! The disk backend through the raw `Storage` trait: semantics, races within
//! one process and across real processes, permissions, hostile paths, stale
//! temp files, and writers killed with SIGKILL.
//!
//! The cross-process tests re-execute this test binary: with
//! `MDCACHE_CHILD_DIR` set, `child_worker` is the child's body; without it,
//! `child_worker` returns at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::create;
use common::files::{temp_files, tree};
use metadatacache::{
    DiskOptions, DiskStorage, DownloadRequest, EntryKind, ErrorKind, Result, Storage, UploadRequest,
};

fn kind<T: std::fmt::Debug>(res: Result<T>) -> ErrorKind {
    match res {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => {
            assert_eq!(e.backend(), Some("disk"), "{e}");
            e.kind()
        }
    }
}

fn open(dir: &Path) -> DiskStorage {
    DiskStorage::open(dir).unwrap()
}

// ---------------------------------------------------------------- semantics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    metadatacache::conformance::run_all(Arc::new(open(dir.path())), "suite").await;
    metadatacache::conformance::run_all(Arc::new(open(dir.path())), "").await;
}

#[tokio::test]
async fn create_only_if_match_and_strong_etags() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert_eq!(s.backend(), "disk");
    let v1 = s.upload(create("a/doc.json", "{\"n\":1}")).await.unwrap();
    assert_eq!(v1.etag.len(), 64);
    assert!(v1.etag.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        kind(s.upload(create("a/doc.json", "{\"n\":2}")).await),
        ErrorKind::AlreadyExists
    );
    // Stored bytes are exactly the content.
    assert_eq!(
        std::fs::read(dir.path().join("a/doc.json")).unwrap(),
        b"{\"n\":1}"
    );

    let v2 = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("a/doc.json", "{\"n\":2}")
        })
        .await
        .unwrap();
    assert_ne!(v1.etag, v2.etag);
    let stale = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("a/doc.json", "{\"n\":3}")
        })
        .await;
    let e = stale.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PreconditionFailed);
    assert_eq!(e.path(), Some("a/doc.json"));
    assert_eq!(e.backend(), Some("disk"));
    let missing = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("a/missing.json", "x")
        })
        .await;
    assert_eq!(kind(missing), ErrorKind::NotFound);
    assert_eq!(kind(s.stat("a/missing.json").await), ErrorKind::NotFound);
    let missing_dir = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new("new/dir/x.json", "x")
        })
        .await;
    assert_eq!(kind(missing_dir), ErrorKind::NotFound);
    assert!(
        !dir.path().join("new").exists(),
        "a failed if_match created directories"
    );

    // Equal content, equal etag: also for another path and a rewrite.
    let again = s.simple_upload("b.json", "{\"n\":2}".into()).await.unwrap();
    assert_eq!(again.etag, v2.etag);
    let got = s
        .download(DownloadRequest::new("a/doc.json"))
        .await
        .unwrap();
    assert_eq!(got.content, "{\"n\":2}");
    assert_eq!(got.etag, v2.etag);

    // The etag survives reopening (it is the content's hash).
    let reopened = open(dir.path());
    assert_eq!(
        reopened.stat("a/doc.json").await.unwrap().etag,
        Some(v2.etag.clone())
    );
}

#[tokio::test]
async fn not_modified_not_found_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let v = s.simple_upload("x.json", "1".into()).await.unwrap();
    assert_eq!(
        kind(
            s.download(DownloadRequest::if_none_match("x.json", &v.etag))
                .await
        ),
        ErrorKind::NotModified
    );
    let other = s
        .download(DownloadRequest::if_none_match("x.json", "0123"))
        .await
        .unwrap();
    assert_eq!(other.content, "1");

    assert_eq!(
        kind(s.download(DownloadRequest::new("nope.json")).await),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(s.download(DownloadRequest::new("no/dir.json")).await),
        ErrorKind::NotFound
    );
    assert_eq!(
        kind(s.download(DownloadRequest::new("x.json/y")).await),
        ErrorKind::NotFound
    );
    assert_eq!(kind(s.delete("nope.json").await), ErrorKind::NotFound);
    assert_eq!(kind(s.delete("no/dir.json").await), ErrorKind::NotFound);
    assert_eq!(
        kind(s.delete_if_match("x.json", Some("stale")).await),
        ErrorKind::PreconditionFailed
    );
    assert!(dir.path().join("x.json").exists());
    s.delete_if_match("x.json", Some(&v.etag)).await.unwrap();
    assert!(!dir.path().join("x.json").exists());
    assert_eq!(kind(s.delete("x.json").await), ErrorKind::NotFound);
    // A directory is not a document.
    s.make_dir_if_not_exist("d").await.unwrap();
    assert_eq!(
        kind(s.download(DownloadRequest::new("d")).await),
        ErrorKind::NotFound
    );
    assert_eq!(kind(s.delete("d").await), ErrorKind::NotFound);
}

#[tokio::test]
async fn unmodified_since_and_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskOptions::new().fsync(false).open(dir.path()).unwrap();
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let v = s
        .upload(UploadRequest {
            mtime: Some(when),
            ..UploadRequest::new("t.json", "1")
        })
        .await
        .unwrap();
    assert_eq!(v.mtime, when);
    let meta = std::fs::metadata(dir.path().join("t.json")).unwrap();
    assert_eq!(meta.modified().unwrap(), when);
    assert_eq!(s.stat("t.json").await.unwrap().mtime, Some(when));
    let before = s
        .upload(UploadRequest {
            if_unmodified_since: Some(when - Duration::from_secs(1)),
            ..UploadRequest::new("t.json", "2")
        })
        .await;
    assert_eq!(kind(before), ErrorKind::PreconditionFailed);
    s.upload(UploadRequest {
        if_unmodified_since: Some(when),
        ..UploadRequest::new("t.json", "3")
    })
    .await
    .unwrap();
    assert_eq!(s.simple_download("t.json").await.unwrap(), "3");
}

#[tokio::test]
async fn list_dir_stat_and_make_dir() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert!(s.list_dir("missing").await.unwrap().is_empty());
    assert!(s.list_dir("missing/deeper").await.unwrap().is_empty());
    assert!(
        s.list_dir("").await.unwrap().is_empty(),
        "internal dir is hidden"
    );
    s.init("space").await.unwrap();
    s.init("space").await.unwrap();
    s.make_dir_if_not_exist("m/a/b").await.unwrap();
    s.make_dir_if_not_exist("m/a/b").await.unwrap();
    s.make_dir_if_not_exist("").await.unwrap();
    for p in ["m/z.json", "m/c.json", "m/a/deep.json"] {
        s.simple_upload(p, "[1,2]".into()).await.unwrap();
    }
    // Internal-looking files planted by someone else are never listed.
    std::fs::write(dir.path().join("m/.z.json.tmp.1.ab"), "tor").unwrap();
    std::fs::write(dir.path().join("m/.mdcache-x"), "x").unwrap();
    let listed = s.list_dir("m").await.unwrap();
    let names: Vec<&str> = listed.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(names, ["m/a", "m/c.json", "m/z.json"]);
    assert_eq!(listed[0].kind, EntryKind::Dir);
    assert!(listed[1].is_file() && listed[1].size == 5);
    assert_eq!(listed[1].etag.as_deref().map(str::len), Some(64));
    assert!(listed[1].mtime.is_some());
    assert_eq!(s.read_dir("").await.unwrap(), ["m", "space"]);
    // A document is not a directory to list.
    assert!(s.list_dir("m/c.json").await.unwrap().is_empty());

    let f = s.stat("m/c.json").await.unwrap();
    assert!(f.is_file() && f.size == 5 && f.etag == listed[1].etag);
    assert!(s.stat("m/a").await.unwrap().is_dir());
    assert!(s.stat("").await.unwrap().is_dir());
    assert_eq!(kind(s.stat("m/nope").await), ErrorKind::NotFound);
    for internal in [".mdcache", ".mdcache/locks", "m/.z.json.tmp.1.ab"] {
        assert_eq!(
            kind(s.stat(internal).await),
            ErrorKind::InvalidInput,
            "{internal}"
        );
        assert_eq!(
            kind(s.list_dir(internal).await),
            ErrorKind::InvalidInput,
            "{internal}"
        );
        let up = s.simple_upload(&format!("{internal}/x"), "1".into()).await;
        assert_eq!(kind(up), ErrorKind::InvalidInput, "{internal}");
    }
    let up = s.simple_upload(".a.json.tmp.1.2", "x".into()).await;
    assert_eq!(kind(up), ErrorKind::InvalidInput);

    // Documents and directories do not nest into each other.
    assert_eq!(
        kind(s.simple_upload("m/c.json/x", "1".into()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(s.simple_upload("m/a", "1".into()).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(s.make_dir_if_not_exist("m/c.json").await),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(s.make_dir_if_not_exist("m/c.json/d").await),
        ErrorKind::AlreadyExists
    );
    // No temp file is left behind by the failed uploads.
    assert_eq!(temp_files(dir.path()), ["m/.z.json.tmp.1.ab"]);
}

#[tokio::test]
async fn opened_from_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let s = metadatacache::open(&format!("disk:{}", a.display()))
        .await
        .unwrap();
    assert_eq!(s.backend(), "disk");
    s.simple_upload("x.json", "1".into()).await.unwrap();
    assert!(a.join("x.json").is_file());
    let s = metadatacache::open(b.to_str().unwrap()).await.unwrap();
    s.simple_upload("y.json", "2".into()).await.unwrap();
    assert!(b.join("y.json").is_file());
    let s = metadatacache::open(&format!("disk://{}", a.display()))
        .await
        .unwrap();
    assert_eq!(s.simple_download("x.json").await.unwrap(), "1");
    let e = metadatacache::open("disk:").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Parameters are refused, not taken as part of the directory name.
    let with_query = format!("disk:{}?fsync=false", dir.path().join("c").display());
    let e = metadatacache::open(&with_query).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("takes no parameters"), "{e}");
    assert!(!dir.path().join("c?fsync=false").exists());
    // A bare path is taken as it is.
    let odd = dir.path().join("d?e");
    let s = metadatacache::open(odd.to_str().unwrap()).await.unwrap();
    s.simple_upload("z.json", "3".into()).await.unwrap();
    assert!(odd.join("z.json").is_file());
}

// ---------------------------------------------------------------- races

/// Raw CAS increment: download, parse, upload with `if_match` (or create
/// with `if_none_match: *`), retrying on conflict. `attempt` runs right
/// before each upload.
async fn increment(s: &dyn Storage, path: &str, mut attempt: impl FnMut()) {
    loop {
        let req = match s.download(DownloadRequest::new(path)).await {
            Ok(cur) => {
                let text = std::str::from_utf8(&cur.content).expect("utf-8 counter");
                let n: u64 = text
                    .parse()
                    .unwrap_or_else(|_| panic!("torn counter {path}: {text:?}"));
                UploadRequest {
                    if_match: Some(cur.etag),
                    ..UploadRequest::new(path, (n + 1).to_string())
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => create(path, "1"),
            Err(e) => panic!("download {path}: {e}"),
        };
        attempt();
        match s.upload(req).await {
            Ok(_) => return,
            Err(e) if e.is_conflict() || e.kind() == ErrorKind::NotFound => {
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("upload {path}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_tasks_race_on_one_counter() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(dir.path()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0u64;
            for _ in 0..50 {
                increment(s.as_ref(), "race/counter", || attempts += 1).await;
            }
            attempts
        }));
    }
    let mut attempts = 0;
    for t in tasks {
        attempts += t.await.unwrap();
    }
    let total = s.simple_download("race/counter").await.unwrap();
    println!("in-process race: final {total:?}, attempts {attempts}");
    assert_eq!(total, "400");
    assert!(
        temp_files(dir.path()).is_empty(),
        "{:?}",
        temp_files(dir.path())
    );
}

// ---------------------------------------------------------------- permissions

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn default_permissions_are_0600_and_0700() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("new/store");
    let s = open(&root);
    s.simple_upload("a/b/doc.json", "{}".into()).await.unwrap();
    s.make_dir_if_not_exist("made").await.unwrap();
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(mode_of(&root.join("a")), 0o700);
    assert_eq!(mode_of(&root.join("a/b")), 0o700);
    assert_eq!(mode_of(&root.join("made")), 0o700);
    assert_eq!(mode_of(&root.join(".mdcache")), 0o700);
    assert_eq!(mode_of(&root.join("a/b/doc.json")), 0o600);
    // Rewriting keeps the mode; the format marker is private too.
    s.simple_upload("a/b/doc.json", "[]".into()).await.unwrap();
    assert_eq!(mode_of(&root.join("a/b/doc.json")), 0o600);
    assert_eq!(mode_of(&root.join(".mdcache/format")), 0o600);
}

#[tokio::test]
async fn custom_permissions_are_set_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // Wider than the usual umask 022 allows: only an explicit chmod gets there.
    let s = DiskOptions::new()
        .file_mode(0o660)
        .dir_mode(0o770)
        .open(dir.path().join("s"))
        .unwrap();
    assert_eq!(
        s.options(),
        &DiskOptions::new().file_mode(0o660).dir_mode(0o770)
    );
    s.simple_upload("d/e/doc.json", "{}".into()).await.unwrap();
    let root = s.dir().to_path_buf();
    assert_eq!(mode_of(&root), 0o770);
    assert_eq!(mode_of(&root.join("d")), 0o770);
    assert_eq!(mode_of(&root.join("d/e")), 0o770);
    assert_eq!(mode_of(&root.join("d/e/doc.json")), 0o660);
}

// ---------------------------------------------------------------- hostile paths

#[tokio::test]
async fn hostile_paths_never_leave_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.json");
    std::fs::write(&secret, "top secret").unwrap();
    let root = dir.path().join("store");
    let s = open(&root);
    let before = tree(&root);

    for bad in [
        "../x.json",
        "a/../../x.json",
        "/etc/passwd",
        "a\0b",
        "a\\..\\b",
        "a//b",
        "a/",
        ".",
    ] {
        assert_eq!(
            kind(s.simple_upload(bad, "x".into()).await),
            ErrorKind::InvalidInput,
            "{bad:?}"
        );
        assert_eq!(
            kind(s.download(DownloadRequest::new(bad)).await),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(s.delete(bad).await),
            ErrorKind::InvalidInput,
            "{bad:?}"
        );
        assert_eq!(
            kind(s.list_dir(bad).await),
            ErrorKind::InvalidInput,
            "{bad:?}"
        );
        assert_eq!(
            kind(s.make_dir_if_not_exist(bad).await),
            ErrorKind::InvalidInput
        );
        assert_eq!(kind(s.stat(bad).await), ErrorKind::InvalidInput, "{bad:?}");
    }
    assert_eq!(tree(&root), before, "bad paths created something");

    // A directory symlink inside the root, at the top and deeper down.
    symlink(outside.path(), root.join("evil")).unwrap();
    std::fs::create_dir(root.join("a")).unwrap();
    symlink(outside.path(), root.join("a/evil")).unwrap();
    // A document symlink.
    symlink(&secret, root.join("link.json")).unwrap();

    let denied = |res: Result<()>, what: &str| {
        let e = res.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
        assert_eq!(e.backend(), Some("disk"));
        assert!(e.path().is_some(), "{what}: error names the path");
    };
    for base in ["evil", "a/evil"] {
        let p = |name: &str| format!("{base}/{name}");
        denied(
            s.simple_upload(&p("new.json"), "x".into()).await.map(drop),
            "upload new",
        );
        denied(
            s.simple_upload(&p("secret.json"), "x".into())
                .await
                .map(drop),
            "overwrite",
        );
        denied(
            s.simple_upload(&p("sub/new.json"), "x".into())
                .await
                .map(drop),
            "upload deep",
        );
        denied(
            s.download(DownloadRequest::new(p("secret.json")))
                .await
                .map(drop),
            "download",
        );
        denied(s.delete(&p("secret.json")).await, "delete");
        denied(
            s.delete_if_match(&p("secret.json"), Some("x")).await,
            "delete_if_match",
        );
        denied(s.list_dir(base).await.map(drop), "list");
        denied(s.stat(&p("secret.json")).await.map(drop), "stat through");
        denied(s.stat(base).await.map(drop), "stat link");
        denied(s.make_dir_if_not_exist(&p("sub")).await, "make_dir");
        denied(s.init(&p("space")).await, "init");
    }
    denied(
        s.download(DownloadRequest::new("link.json"))
            .await
            .map(drop),
        "download link",
    );
    denied(
        s.simple_upload("link.json", "pwned".into()).await.map(drop),
        "upload link",
    );
    denied(s.delete("link.json").await, "delete link");
    denied(s.stat("link.json").await.map(drop), "stat link");

    let e = s
        .download(DownloadRequest::new("evil/secret.json"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("evil"), "{e}");
    assert_eq!(
        tree(outside.path()),
        ["secret.json"],
        "something was created outside"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret");
    assert!(
        std::fs::symlink_metadata(root.join("link.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Symlinks are not listed, and nothing was left behind.
    assert_eq!(s.read_dir("").await.unwrap(), ["a"]);
    assert!(s.list_dir("a").await.unwrap().is_empty());
    assert!(temp_files(&root).is_empty());
}

// ---------------------------------------------------------------- stale temp files

#[tokio::test]
async fn stale_temp_files_are_swept_and_never_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = open(root);
    s.simple_upload("x.json", "{}".into()).await.unwrap();
    s.simple_upload("sub/y.json", "[]".into()).await.unwrap();
    let plant = |rel: &str| {
        std::fs::write(root.join(rel), "{\"half").unwrap();
    };
    plant(".x.json.tmp.123.abc");
    plant("sub/.y.json.tmp.9.def");
    // An old mtime does not make a fresh temp file stale: ctime counts.
    let old = std::fs::File::options()
        .write(true)
        .open(root.join("sub/.y.json.tmp.9.def"))
        .unwrap();
    old.set_modified(SystemTime::now() - Duration::from_secs(86_400))
        .unwrap();
    drop(old);

    assert_eq!(s.read_dir("").await.unwrap(), ["sub", "x.json"]);
    assert_eq!(s.read_dir("sub").await.unwrap(), ["sub/y.json"]);
    assert_eq!(
        kind(s.stat(".x.json.tmp.123.abc").await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            s.download(DownloadRequest::new("sub/.y.json.tmp.9.def"))
                .await
        ),
        ErrorKind::InvalidInput
    );

    // Default grace (10 minutes): fresh temp files stay.
    let s = open(root);
    assert_eq!(
        temp_files(root),
        [".x.json.tmp.123.abc", "sub/.y.json.tmp.9.def"]
    );
    assert_eq!(s.read_dir("").await.unwrap(), ["sub", "x.json"]);

    // A short grace removes only those older than it.
    std::thread::sleep(Duration::from_millis(1100));
    plant("sub/.fresh.json.tmp.1.1");
    let _ = DiskOptions::new()
        .stale_temp_grace(Duration::from_secs(1))
        .open(root)
        .unwrap();
    assert_eq!(temp_files(root), ["sub/.fresh.json.tmp.1.1"]);

    // Zero grace removes all; documents are untouched.
    let s = DiskOptions::new()
        .stale_temp_grace(Duration::ZERO)
        .open(root)
        .unwrap();
    assert!(temp_files(root).is_empty());
    assert_eq!(s.simple_download("x.json").await.unwrap(), "{}");
    assert_eq!(s.simple_download("sub/y.json").await.unwrap(), "[]");
}

// ---------------------------------------------------------------- processes

const CHILD_DIR: &str = "MDCACHE_CHILD_DIR";
const CHILD_MODE: &str = "MDCACHE_CHILD_MODE";
const CHILD_ID: &str = "MDCACHE_CHILD_ID";
const KEYS: usize = 4;

fn key(i: usize) -> String {
    format!("counters/k{i}.txt")
}

fn spawn_child(dir: &Path, mode: &str, id: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .env(CHILD_ID, id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The child processes' body; a no-op in a normal test run.
#[test]
fn child_worker() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mode = std::env::var(CHILD_MODE).unwrap();
    let id: usize = std::env::var(CHILD_ID).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let s = Arc::new(DiskStorage::open(dir.join("store")).unwrap());
        match mode.as_str() {
            "counter" => child_counter(s, &dir, id).await,
            "crash" => child_crash(s, &dir, id).await,
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// 4 tasks × 50 increments over 4 keys; then writes its per-key
/// acknowledged counts to `ack-{id}`.
async fn child_counter(s: Arc<DiskStorage>, dir: &Path, id: usize) {
    let mut tasks = Vec::new();
    for t in 0..4 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            let mut acked = [0u64; KEYS];
            for j in 0..50 {
                let k = (t + j + id) % KEYS;
                increment(s.as_ref(), &key(k), || {}).await;
                acked[k] += 1;
            }
            acked
        }));
    }
    let mut acked = [0u64; KEYS];
    for t in tasks {
        for (total, n) in acked.iter_mut().zip(t.await.unwrap()) {
            *total += n;
        }
    }
    let line: Vec<String> = acked.iter().map(u64::to_string).collect();
    std::fs::write(dir.join(format!("ack-{id}")), line.join(" ")).unwrap();
}

/// Increments random keys until killed, logging each attempt before the
/// upload and each acknowledgement after it, one line (the key) each.
async fn child_crash(s: Arc<DiskStorage>, dir: &Path, id: usize) {
    let log = |name: String| {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .unwrap()
    };
    let mut attempts = log(format!("attempts-{id}"));
    let mut acks = log(format!("acks-{id}"));
    loop {
        let k = fastrand::usize(..KEYS);
        // One write(2) per line: a kill cannot split it.
        increment(s.as_ref(), &key(k), || {
            attempts.write_all(format!("{k}\n").as_bytes()).unwrap()
        })
        .await;
        acks.write_all(format!("{k}\n").as_bytes()).unwrap();
    }
}

fn count_lines(path: &Path) -> [u64; KEYS] {
    let mut out = [0; KEYS];
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            out[line.parse::<usize>().unwrap()] += 1;
        }
    }
    out
}

async fn final_counts(s: &DiskStorage) -> [u64; KEYS] {
    let mut out = [0; KEYS];
    for (k, n) in out.iter_mut().enumerate() {
        match s.simple_download(&key(k)).await {
            Ok(bytes) => {
                let text = std::str::from_utf8(&bytes).unwrap();
                *n = text
                    .parse()
                    .unwrap_or_else(|_| panic!("torn document {}: {text:?}", key(k)));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("{e}"),
        }
    }
    out
}

#[tokio::test]
async fn four_processes_share_counters_without_losing_updates() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let children: Vec<Child> = (0..4)
        .map(|id| spawn_child(dir.path(), "counter", id))
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a child process failed");
    }
    let mut acked = [0u64; KEYS];
    for id in 0..4 {
        let text = std::fs::read_to_string(dir.path().join(format!("ack-{id}"))).unwrap();
        for (total, n) in acked.iter_mut().zip(text.split(' ')) {
            *total += n.parse::<u64>().unwrap();
        }
    }
    let s = open(&dir.path().join("store"));
    let finals = final_counts(&s).await;
    println!(
        "cross-process counter: acknowledged {acked:?} (sum {}), final {finals:?} (sum {}), {:?}",
        acked.iter().sum::<u64>(),
        finals.iter().sum::<u64>(),
        started.elapsed()
    );
    assert_eq!(acked.iter().sum::<u64>(), 4 * 4 * 50);
    assert_eq!(finals, acked, "lost updates");
}

#[tokio::test]
async fn writers_killed_at_random_never_tear_or_lose_documents() {
    const CHILDREN: usize = 4;
    const KILLS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut children: Vec<Child> = (0..CHILDREN)
        .map(|id| spawn_child(dir.path(), "crash", id))
        .collect();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..=50))).await;
        let id = fastrand::usize(..CHILDREN);
        let child = &mut children[id];
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child {id} exited by itself: {status}");
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        *child = spawn_child(dir.path(), "crash", id);
    }
    // Let them run a little, then stop them all the same way.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (id, child) in children.iter_mut().enumerate() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child {id} exited by itself: {status}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }

    let root = dir.path().join("store");
    let s = open(&root);
    let listed = s.read_dir("counters").await.unwrap();
    assert!(listed.iter().all(|p| !p.contains(".tmp.")), "{listed:?}");
    let finals = final_counts(&s).await;
    let (mut acked, mut attempted) = ([0u64; KEYS], [0u64; KEYS]);
    for id in 0..CHILDREN {
        let (ack, att) = (
            count_lines(&dir.path().join(format!("acks-{id}"))),
            count_lines(&dir.path().join(format!("attempts-{id}"))),
        );
        for k in 0..KEYS {
            acked[k] += ack[k];
            attempted[k] += att[k];
        }
    }
    let leftover = temp_files(&root).len();
    let below: Vec<u64> = (0..KEYS)
        .map(|k| finals[k] - acked[k].min(finals[k]))
        .collect();
    let above: Vec<u64> = (0..KEYS)
        .map(|k| attempted[k].saturating_sub(finals[k]))
        .collect();
    println!(
        "crash test: kills {KILLS}, torn 0, final {finals:?}, acknowledged {acked:?}, \
         attempted {attempted:?}, unacknowledged-but-applied {below:?}, \
         attempted-not-applied {above:?}, leftover temp files {leftover}, {:?}",
        started.elapsed()
    );
    assert!(finals.iter().sum::<u64>() > 0, "no child made progress");
    for k in 0..KEYS {
        assert!(
            finals[k] >= acked[k],
            "key {k}: acknowledged increment lost"
        );
        assert!(
            finals[k] <= attempted[k],
            "key {k}: more increments than attempts"
        );
    }
    // Every document is intact after a stale-temp sweep, and no temp file remains.
    let s = DiskOptions::new()
        .stale_temp_grace(Duration::ZERO)
        .open(&root)
        .unwrap();
    assert!(temp_files(&root).is_empty());
    assert_eq!(final_counts(&s).await, finals);
}

/// A fault hook that fails `step` with `EINVAL` (which, before the point of
/// no return, reads as "invalid input": certainly not applied).
fn failing_at(step: metadatacache::DiskStep) -> DiskOptions {
    DiskOptions::new().fault_hook(move |at, _| {
        if at == step {
            Err(std::io::Error::from_raw_os_error(22))
        } else {
            Ok(())
        }
    })
}

/// Once the new version is renamed into place (or the document unlinked),
/// a failure is `Unavailable` — the change is visible — never an error
/// that says "not applied". Before that point, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_the_point_of_no_return_are_unavailable() {
    use metadatacache::DiskStep;
    let dir = tempfile::tempdir().unwrap();
    open(dir.path())
        .simple_upload("a/doc.json", "1".into())
        .await
        .unwrap();
    let current = |s: &DiskStorage| {
        let s = s.clone();
        async move { s.simple_download("a/doc.json").await.unwrap() }
    };

    let s = failing_at(DiskStep::TempWritten).open(dir.path()).unwrap();
    let e = s.simple_upload("a/doc.json", "2".into()).await.unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(current(&s).await, "1", "nothing visible before the rename");
    assert!(
        temp_files(dir.path()).is_empty(),
        "the temp file is removed"
    );

    let s = failing_at(DiskStep::Renamed).open(dir.path()).unwrap();
    let e = s.simple_upload("a/doc.json", "3".into()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(current(&s).await, "3", "the renamed version is visible");

    let s = failing_at(DiskStep::Removed).open(dir.path()).unwrap();
    let e = s.delete("a/doc.json").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(
        kind(s.download(DownloadRequest::new("a/doc.json")).await),
        ErrorKind::NotFound
    );

    // Through a store: the update is answered Unavailable and not re-run
    // (disk etags are content hashes, so nothing can settle it).
    let storage: Arc<dyn Storage> =
        Arc::new(failing_at(DiskStep::Renamed).open(dir.path()).unwrap());
    let store: metadatacache::Store<String, u64> = metadatacache::Store::new(
        metadatacache::Options::new(storage, |k: &String| format!("{k}.json")).init(|| 0),
    );
    let mut runs = 0;
    let e = store
        .update("n".into(), true, |n| {
            runs += 1;
            Ok((n + 1, true))
        })
        .await
        .unwrap_err();
    assert_eq!((e.kind(), runs), (ErrorKind::Unavailable, 1), "{e}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("n.json")).unwrap(),
        "1"
    );
}

/// The format marker: one being written by another opener (incomplete and
/// recent) is waited for, never clobbered; one left incomplete long ago (an
/// opener killed while writing it in place) is replaced whole, instead of
/// refusing every open of the directory for good; another format is
/// refused, naming the marker.
#[test]
fn format_markers_incomplete_abandoned_and_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let internal = dir.path().join(".mdcache");
    std::fs::create_dir(&internal).unwrap();
    let marker = internal.join("format");
    std::fs::write(&marker, "metadatacache disk").unwrap();
    let e = DiskStorage::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "metadatacache disk",
        "a marker being written was replaced"
    );
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for partial in ["", "metadatacache disk"] {
        std::fs::write(&marker, partial).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&marker)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let s = DiskStorage::open(dir.path()).unwrap_or_else(|e| panic!("{partial:?}: {e}"));
        drop(s);
        let text = std::fs::read_to_string(&marker).unwrap();
        assert!(text.contains("format 2"), "{text:?}");
        let names: Vec<_> = std::fs::read_dir(&internal).unwrap().collect();
        assert_eq!(names.len(), 1, "left beside the marker: {names:?}");
    }
    std::fs::write(&marker, "metadatacache disk storage\nformat 1\n").unwrap();
    let e = DiskStorage::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("format"), "{e}");
}

/// Two storages on one directory, opened before and after its internal
/// folder was renamed away, still exclude each other: the lock is the
/// document's directory itself, not a file that can be renamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_the_internal_folder_keeps_one_lock_per_document() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    a.simple_upload("n.json", "0".into()).await.unwrap();
    a.simple_upload("sub/n.json", "0".into()).await.unwrap();
    std::fs::rename(
        dir.path().join(".mdcache"),
        dir.path().join(".mdcache-moved"),
    )
    .unwrap();
    let b = open(dir.path());
    assert!(dir.path().join(".mdcache/format").exists());
    for path in ["n.json", "sub/n.json"] {
        let mut tasks = Vec::new();
        for s in [&a, &b, &a, &b] {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..150 {
                    loop {
                        let cur = s.download(DownloadRequest::new(path)).await.unwrap();
                        let n: u64 = std::str::from_utf8(&cur.content).unwrap().parse().unwrap();
                        let req = UploadRequest {
                            if_match: Some(cur.etag),
                            ..UploadRequest::new(path, (n + 1).to_string())
                        };
                        match s.upload(req).await {
                            Ok(_) => break,
                            Err(e) if e.is_conflict() => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            a.simple_download(path).await.unwrap(),
            "600",
            "{path}: lost updates"
        );
    }
}

/// A directory marked with another on-disk format is refused with a line
/// naming the marker; the marker of this version is accepted.
#[test]
fn a_foreign_format_marker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let marker = dir.path().join(".mdcache/format");
    let ours = std::fs::read_to_string(&marker).unwrap();
    assert!(ours.contains("format 2"), "{ours}");
    drop(open(dir.path()));
    std::fs::write(&marker, "metadatacache disk storage\nformat 3\n").unwrap();
    let e = DiskStorage::open(dir.path()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let text = e.to_string();
    assert!(
        text.contains(".mdcache/format") && text.contains("format 3"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);
}

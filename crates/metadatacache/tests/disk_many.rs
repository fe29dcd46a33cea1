//! The disk backend's combined uploads (`upload_many`), whose documents
//! share their syncs: documents in several directories, faults that hit
//! one document of a call, calls of hundreds of documents, and a store
//! whose updates of different keys go together. Two tests run a child
//! process (this test binary again, with `MDCACHE_DURABLE_CHILD` or
//! `MDCACHE_FD_CHILD` set): one traces with strace the system calls that
//! make each document durable before the call returns, the other writes
//! more documents in one call than its open-file limit allows at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::durable::{assert_durable_order, simulate_power_loss};
use common::files::temp_files;
use common::{cas, create};

use metadatacache::{
    DiskOptions, DiskStep, DiskStorage, ErrorKind, Options, Storage, Store, UploadRequest,
};

fn assert_no_temp_files(dir: &Path) {
    let left = temp_files(dir);
    assert!(left.is_empty(), "temp files left: {left:?}");
}

fn read(dir: &Path, path: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(path)).ok()
}

/// One call over three directories, one of them new: each request is
/// answered by its own precondition, a directory is created only for a
/// create, and no temp file is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_of_several_directories_are_answered_each_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStorage::open(dir.path()).unwrap();
    let a = s.simple_upload("x/a.json", "a0".into()).await.unwrap().etag;
    let b = s.simple_upload("y/b.json", "b0".into()).await.unwrap().etag;
    s.simple_upload("y/b.json", "b-moved".into()).await.unwrap();
    let c = s.simple_upload("c.json", "c0".into()).await.unwrap().etag;
    let res = s
        .upload_many(vec![
            cas("x/a.json", &a, "a1"),
            cas("y/b.json", &b, "b1"),
            create("z/new/n.json", "n1"),
            cas("w/missing.json", &a, "m1"),
            cas("c.json", &c, "c1"),
            UploadRequest::new("x/plain.json", "p1"),
            UploadRequest::new("x/../escape.json", "e1"),
        ])
        .await;
    let kinds: Vec<_> = res
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            None,
            Some(ErrorKind::PreconditionFailed),
            None,
            Some(ErrorKind::NotFound),
            None,
            None,
            Some(ErrorKind::InvalidInput),
        ],
        "{res:?}"
    );
    for (i, path, body) in [
        (0, "x/a.json", "a1"),
        (2, "z/new/n.json", "n1"),
        (4, "c.json", "c1"),
        (5, "x/plain.json", "p1"),
    ] {
        assert_eq!(read(dir.path(), path).as_deref(), Some(body), "{path}");
        let etag = &res[i].as_ref().unwrap().etag;
        assert_eq!(
            s.stat(path).await.unwrap().etag.as_ref(),
            Some(etag),
            "{path}"
        );
    }
    assert_eq!(read(dir.path(), "y/b.json").as_deref(), Some("b-moved"));
    assert!(
        !dir.path().join("w").exists(),
        "an update created a directory"
    );
    assert_no_temp_files(dir.path());
}

/// A call of more documents than are written together at once (several
/// chunks, a path named twice across them) answers every request and
/// leaves no temp file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_hundreds_of_documents_answers_each() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStorage::open(dir.path()).unwrap();
    let seeded = s
        .simple_upload("d/0.json", "seed".into())
        .await
        .unwrap()
        .etag;
    let mut reqs: Vec<UploadRequest> = (0..300)
        .map(|i| UploadRequest::new(format!("d/{}/{i}.json", i % 3), i.to_string()))
        .collect();
    // Both hold at the start; only the first may land.
    reqs.push(cas("d/0.json", &seeded, "first"));
    reqs.insert(10, cas("d/0.json", &seeded, "early"));
    let res = s.upload_many(reqs).await;
    assert_eq!(res.len(), 302);
    let failed: Vec<usize> = (0..res.len()).filter(|&i| res[i].is_err()).collect();
    assert_eq!(failed, [301], "{:?}", res[301]);
    assert_eq!(read(dir.path(), "d/0.json").as_deref(), Some("early"));
    for i in [0, 150, 299] {
        assert_eq!(
            read(dir.path(), &format!("d/{}/{i}.json", i % 3)),
            Some(i.to_string())
        );
    }
    assert_no_temp_files(dir.path());
}

/// A fault while one document's temp file is synced fails that document
/// alone (nothing of it visible, its temp file removed); a fault after one
/// document's rename makes that one `Unavailable` (it is visible). The
/// other documents of the call, in the same directories, land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_hits_only_its_own_document() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStorage::open(dir.path()).unwrap();
    let mut etags = Vec::new();
    for path in ["a/1.json", "a/2.json", "b/1.json", "b/2.json"] {
        etags.push(s.simple_upload(path, "0".into()).await.unwrap().etag);
    }
    let faulty = DiskOptions::new()
        .fault_hook(|step, path| match (step, path) {
            (DiskStep::TempWritten, "a/2.json") | (DiskStep::Renamed, "b/1.json") => {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            }
            _ => Ok(()),
        })
        .open(dir.path())
        .unwrap();
    let res = faulty
        .upload_many(vec![
            cas("a/1.json", &etags[0], "1"),
            cas("a/2.json", &etags[1], "1"),
            cas("b/1.json", &etags[2], "1"),
            cas("b/2.json", &etags[3], "1"),
        ])
        .await;
    assert!(res[0].is_ok(), "{:?}", res[0]);
    let e = res[1].as_ref().unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(e.path(), Some("a/2.json"));
    let e = res[2].as_ref().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(e.path(), Some("b/1.json"));
    assert!(res[3].is_ok(), "{:?}", res[3]);
    let stored: Vec<_> = ["a/1.json", "a/2.json", "b/1.json", "b/2.json"]
        .iter()
        .map(|p| read(dir.path(), p).unwrap())
        .collect();
    assert_eq!(stored, ["1", "0", "1", "1"]);
    assert_no_temp_files(dir.path());
}

/// Updates of different keys through one store go to disk together, and
/// every acknowledged update is counted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_combines_the_updates_of_different_keys() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(DiskStorage::open(dir.path()).unwrap());
    assert!(storage.capabilities().combined_calls);
    // Counts the documents of each combined call.
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counting: Arc<dyn Storage> = Arc::new(Counting {
        inner: Arc::clone(&storage),
        calls: Arc::clone(&calls),
    });
    let store: Store<u32, u64> =
        Store::new(Options::new(counting, |k: &u32| format!("k/{}/{k}.json", k % 4)).init(|| 0));
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                store.update(t, true, |n| Ok((n + 1, true))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let _ = store;
    let combined = calls.lock().unwrap().clone();
    assert!(
        combined.iter().any(|&n| n > 1),
        "no call carried more than one document: {combined:?}"
    );
    let mut total = 0;
    for k in 0..16 {
        total += read(dir.path(), &format!("k/{}/{k}.json", k % 4))
            .unwrap()
            .parse::<u64>()
            .unwrap();
    }
    assert_eq!(total, 16 * 40);
    assert_no_temp_files(dir.path());
}

/// Passes every call to the disk storage, noting the size of each
/// combined upload.
#[derive(Debug)]
struct Counting {
    inner: Arc<DiskStorage>,
    calls: Arc<std::sync::Mutex<Vec<usize>>>,
}

#[async_trait::async_trait]
impl Storage for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn capabilities(&self) -> metadatacache::Capabilities {
        self.inner.capabilities()
    }
    async fn init(&self, name: &str) -> metadatacache::Result<()> {
        self.inner.init(name).await
    }
    async fn upload(
        &self,
        req: UploadRequest,
    ) -> metadatacache::Result<metadatacache::UploadResponse> {
        self.inner.upload(req).await
    }
    async fn upload_many(
        &self,
        reqs: Vec<UploadRequest>,
    ) -> Vec<metadatacache::Result<metadatacache::UploadResponse>> {
        self.calls.lock().unwrap().push(reqs.len());
        self.inner.upload_many(reqs).await
    }
    async fn download(
        &self,
        req: metadatacache::DownloadRequest,
    ) -> metadatacache::Result<metadatacache::DownloadResponse> {
        self.inner.download(req).await
    }
    async fn delete_if_match(
        &self,
        path: &str,
        if_match: Option<&str>,
    ) -> metadatacache::Result<()> {
        self.inner.delete_if_match(path, if_match).await
    }
    async fn stat(&self, path: &str) -> metadatacache::Result<metadatacache::FileInfo> {
        self.inner.stat(path).await
    }
    async fn list_dir(&self, path: &str) -> metadatacache::Result<Vec<metadatacache::FileInfo>> {
        self.inner.list_dir(path).await
    }
    async fn make_dir_if_not_exist(&self, path: &str) -> metadatacache::Result<()> {
        self.inner.make_dir_if_not_exist(path).await
    }
}

/// A request that its precondition refuses at the start of the call is
/// answered without a temp file of its own: no sync is spent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_writes_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStorage::open(dir.path()).unwrap();
    let old = s.simple_upload("d/x.json", "0".into()).await.unwrap().etag;
    let now = s.simple_upload("d/x.json", "1".into()).await.unwrap().etag;
    s.simple_upload("d/y.json", "0".into()).await.unwrap();
    let synced = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&synced);
    let watched = DiskOptions::new()
        .fault_hook(move |step, path| {
            if step == DiskStep::TempWritten {
                seen.lock().unwrap().push(path.to_owned());
            }
            Ok(())
        })
        .open(dir.path())
        .unwrap();
    let res = watched
        .upload_many(vec![
            cas("d/x.json", &old, "stale"),
            create("d/y.json", "exists"),
            cas("d/x.json", &now, "2"),
        ])
        .await;
    let kinds: Vec<_> = res
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(ErrorKind::PreconditionFailed),
            Some(ErrorKind::AlreadyExists),
            None
        ]
    );
    assert_eq!(*synced.lock().unwrap(), ["d/x.json"]);
    assert_eq!(read(dir.path(), "d/x.json").as_deref(), Some("2"));
}

/// Where the traced child writes; unset in a normal test run.
const DURABLE_CHILD: &str = "MDCACHE_DURABLE_CHILD";

/// The documents the traced child rewrites in one combined upload.
const DURABLE_DOCS: [(&str, &str); 3] = [("a/x.json", "x"), ("a/y.json", "y"), ("b/z.json", "z")];

/// The traced child's body: one combined upload over existing documents
/// in two directories, then `ACK` on stdout. A no-op in a normal test run.
#[test]
fn durable_child() {
    let Some(dir) = std::env::var_os(DURABLE_CHILD) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = DiskStorage::open(&dir).unwrap();
        let reqs = DURABLE_DOCS
            .iter()
            .map(|(path, body)| UploadRequest::new(*path, format!("{body}1")))
            .collect();
        let res = s.upload_many(reqs).await;
        assert!(res.iter().all(Result::is_ok), "{res:?}");
    });
    let mut out = std::io::stdout();
    out.write_all(b"ACK\n").unwrap();
    out.flush().unwrap();
}

/// Each document of a combined upload is written to a temp file, fsynced,
/// renamed over the document, and its directory fsynced, all before the
/// call returns; a power loss after any traced call leaves every document
/// whole, and the new version once acknowledged. The temp files are all
/// written before the first rename: the call really shares its syncs.
#[test]
fn combined_writes_are_durable_before_their_reply() {
    if !common::durable::strace() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = DiskStorage::open(&data).unwrap();
        for (path, body) in DURABLE_DOCS {
            s.simple_upload(path, format!("{body}0").into())
                .await
                .unwrap();
        }
    });
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "durable_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DURABLE_CHILD, &data);
    let calls = common::durable::trace(&child, "", &dir.path().join("strace.log"));
    let is_ack = |l: &str| l.starts_with("write(1, \"ACK");
    for (path, _) in DURABLE_DOCS {
        let name = path.rsplit('/').next().unwrap();
        assert_durable_order(&calls, name, &is_ack);
        simulate_power_loss(&calls, name, &is_ack);
    }
    let last_temp = calls
        .iter()
        .rposition(|l| l.starts_with("openat(") && l.contains(".tmp.") && l.contains("O_CREAT"))
        .unwrap();
    let first_rename = calls
        .iter()
        .position(|l| l.starts_with("renameat") && l.contains(".tmp."))
        .unwrap();
    assert!(last_temp < first_rename, "{}", calls.join("\n"));
    for (path, body) in DURABLE_DOCS {
        assert_eq!(read(&data, path).unwrap(), format!("{body}1"));
    }
}

/// Where the open-file-limit child writes; unset in a normal test run.
const FD_CHILD: &str = "MDCACHE_FD_CHILD";

/// The child's body: with at most 128 open files, one combined upload of
/// 1000 new documents. A no-op in a normal test run.
#[test]
fn fd_limit_child() {
    let Some(dir) = std::env::var_os(FD_CHILD) else {
        return;
    };
    let limit = libc::rlimit {
        rlim_cur: 128,
        rlim_max: 128,
    };
    // SAFETY: setrlimit with a valid pointer to an initialized struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = DiskStorage::open(&dir).unwrap();
        let reqs = (0..1000)
            .map(|i| UploadRequest::new(format!("{}/{i}.json", i % 7), i.to_string()))
            .collect();
        let res = s.upload_many(reqs).await;
        let failed: Vec<_> = res.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} failed, first: {}",
            failed.len(),
            failed[0]
        );
    });
}

/// A combined upload far larger than the open-file limit still writes
/// every document: it holds only so many temp files open at once.
#[test]
fn a_large_call_stays_within_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fd_limit_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FD_CHILD, dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read(dir.path(), "5/999.json").as_deref(), Some("999"));
    assert_no_temp_files(dir.path());
}

//! The shared conformance suite every backend's tests run.
//!
//! Available with the cargo feature `conformance`. Each function takes a
//! storage and a directory to work in (so one storage can host several runs)
//! and panics with a message naming the case when the backend misbehaves.
//! [`run_all`] runs every case that the backend's
//! [`capabilities`](Storage::capabilities) call for: what a backend declares
//! is checked, and what it does not declare must be refused, never done
//! half-way.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use metadatacache::MemoryStorage;
//! metadatacache::conformance::run_all(Arc::new(MemoryStorage::new()), "suite").await;
//! # });
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::error::{ErrorKind, Result};
use crate::storage::{DownloadRequest, Storage, UploadRequest, UploadResponse};

/// Runs every case below in directory `dir` of `storage`.
pub async fn run_all(storage: Arc<dyn Storage>, dir: &str) {
    let s = storage.as_ref();
    let caps = s.capabilities();
    init_idempotent(s, dir).await;
    create_only(s, dir).await;
    if_match(s, dir).await;
    if_none_match_etag(s, dir).await;
    if_unmodified_since(s, dir).await;
    not_modified(s, dir).await;
    not_found(s, dir).await;
    current_on_conflict(s, dir).await;
    if caps.conditional_delete {
        delete_if_match(s, dir).await;
    } else {
        conditional_delete_refused(s, dir).await;
    }
    if caps.unique_etags {
        unique_etags(s, dir).await;
    }
    if caps.write_tokens {
        write_tokens(s, dir).await;
    }
    list_dir(s, dir).await;
    make_dir_idempotent(s, dir).await;
    stat(s, dir).await;
    invalid_paths(s, dir).await;
    simple_forms(s, dir).await;
    upload_many(s, dir).await;
    download_many(s, dir).await;
    race_raw_cas(Arc::clone(&storage), dir, 8, 50).await;
    if caps.conditional_delete {
        race_remove_recreate(Arc::clone(&storage), dir, 4, 50).await;
    }
    race_stores(storage, dir, 2, 4, 50).await;
}

mod current;
mod many;
mod races;

pub use self::current::current_on_conflict;
pub use self::many::{download_many, upload_many};
pub use self::races::{race_raw_cas, race_remove_recreate, race_stores};

fn p(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

#[track_caller]
fn expect_kind<T: std::fmt::Debug>(res: Result<T>, kinds: &[ErrorKind], case: &str) {
    match res {
        Err(e) if kinds.contains(&e.kind()) => {}
        other => panic!("{case}: expected one of {kinds:?}, got {other:?}"),
    }
}

/// `init` may be called repeatedly.
pub async fn init_idempotent(s: &dyn Storage, dir: &str) {
    let name = p(dir, "space");
    s.init(&name).await.expect("init");
    s.init(&name).await.expect("init again");
}

/// `if_none_match: ["*"]` creates once, then answers `AlreadyExists`.
pub async fn create_only(s: &dyn Storage, dir: &str) {
    let path = p(dir, "create.json");
    let create = |body: &'static str| UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new(path.clone(), body)
    };
    let first = s
        .upload(create("1"))
        .await
        .expect("create-only on absent path");
    assert!(!first.etag.is_empty(), "create returned an empty etag");
    expect_kind(
        s.upload(create("2")).await,
        &[ErrorKind::AlreadyExists],
        "create twice",
    );
    let got = s
        .download(DownloadRequest::new(&path))
        .await
        .expect("download");
    assert_eq!(
        got.content,
        Bytes::from_static(b"1"),
        "failed create changed content"
    );
    assert_eq!(got.etag, first.etag);
}

/// Writes "1" at `path`, then "2" over it with `if_match`: both versions.
async fn two_versions(s: &dyn Storage, path: &str) -> (UploadResponse, UploadResponse) {
    let v1 = s.simple_upload(path, "1".into()).await.expect("upload");
    let v2 = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new(path, "2")
        })
        .await
        .expect("if_match with the current etag");
    (v1, v2)
}

/// `if_match` writes only over the named etag.
pub async fn if_match(s: &dyn Storage, dir: &str) {
    let path = p(dir, "if-match.json");
    let (v1, v2) = two_versions(s, &path).await;
    assert_ne!(v1.etag, v2.etag, "etag must change when content changes");
    let stale = s
        .upload(UploadRequest {
            if_match: Some(v1.etag.clone()),
            ..UploadRequest::new(path.clone(), "3")
        })
        .await;
    expect_kind(
        stale,
        &[ErrorKind::PreconditionFailed],
        "if_match with a stale etag",
    );
    assert_eq!(s.simple_download(&path).await.expect("download"), "2");
    let missing = s
        .upload(UploadRequest {
            if_match: Some(v2.etag.clone()),
            ..UploadRequest::new(p(dir, "if-match-missing.json"), "x")
        })
        .await;
    expect_kind(
        missing,
        &[ErrorKind::NotFound, ErrorKind::PreconditionFailed],
        "if_match on a missing path",
    );
    expect_kind(
        s.download(DownloadRequest::new(p(dir, "if-match-missing.json")))
            .await,
        &[ErrorKind::NotFound],
        "failed if_match must not create",
    );
}

/// `if_none_match` with an etag refuses to overwrite that version.
pub async fn if_none_match_etag(s: &dyn Storage, dir: &str) {
    let path = p(dir, "if-none-match.json");
    let v1 = s.simple_upload(&path, "1".into()).await.expect("upload");
    let res = s
        .upload(UploadRequest {
            if_none_match: vec![v1.etag.clone()],
            ..UploadRequest::new(path.clone(), "2")
        })
        .await;
    expect_kind(
        res,
        &[ErrorKind::PreconditionFailed],
        "if_none_match current etag",
    );
    s.upload(UploadRequest {
        if_none_match: vec!["no-such-etag".into()],
        ..UploadRequest::new(path.clone(), "3")
    })
    .await
    .expect("if_none_match with another etag writes");
    assert_eq!(s.simple_download(&path).await.expect("download"), "3");
}

/// `if_unmodified_since` refuses documents modified later.
pub async fn if_unmodified_since(s: &dyn Storage, dir: &str) {
    let path = p(dir, "unmodified.json");
    s.simple_upload(&path, "1".into()).await.expect("upload");
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let res = s
        .upload(UploadRequest {
            if_unmodified_since: Some(long_ago),
            ..UploadRequest::new(path.clone(), "2")
        })
        .await;
    expect_kind(
        res,
        &[ErrorKind::PreconditionFailed],
        "if_unmodified_since in the past",
    );
    let later = SystemTime::now() + Duration::from_secs(3600);
    s.upload(UploadRequest {
        if_unmodified_since: Some(later),
        ..UploadRequest::new(path.clone(), "3")
    })
    .await
    .expect("if_unmodified_since in the future writes");
    assert_eq!(s.simple_download(&path).await.expect("download"), "3");
}

/// A conditional download of the current etag sends nothing.
pub async fn not_modified(s: &dyn Storage, dir: &str) {
    let path = p(dir, "not-modified.json");
    let v1 = s.simple_upload(&path, "1".into()).await.expect("upload");
    expect_kind(
        s.download(DownloadRequest::if_none_match(&path, &v1.etag))
            .await,
        &[ErrorKind::NotModified],
        "if_none_match current etag",
    );
    let v2 = s.simple_upload(&path, "22".into()).await.expect("upload");
    let got = s
        .download(DownloadRequest::if_none_match(&path, &v1.etag))
        .await
        .expect("if_none_match of an old etag downloads");
    assert_eq!(got.content, "22");
    assert_eq!(got.etag, v2.etag, "download etag equals upload etag");
}

/// Missing documents answer `NotFound` to download, delete and stat.
pub async fn not_found(s: &dyn Storage, dir: &str) {
    let path = p(dir, "never-written.json");
    expect_kind(
        s.download(DownloadRequest::new(&path)).await,
        &[ErrorKind::NotFound],
        "download missing",
    );
    expect_kind(
        s.delete(&path).await,
        &[ErrorKind::NotFound],
        "delete missing",
    );
    expect_kind(s.stat(&path).await, &[ErrorKind::NotFound], "stat missing");
}

/// Deletes honour `if_match`.
pub async fn delete_if_match(s: &dyn Storage, dir: &str) {
    let path = p(dir, "delete.json");
    let v1 = s.simple_upload(&path, "1".into()).await.expect("upload");
    let v2 = s.simple_upload(&path, "2".into()).await.expect("upload");
    expect_kind(
        s.delete_if_match(&path, Some(&v1.etag)).await,
        &[ErrorKind::PreconditionFailed],
        "delete with a stale etag",
    );
    assert_eq!(s.simple_download(&path).await.expect("still there"), "2");
    s.delete_if_match(&path, Some(&v2.etag))
        .await
        .expect("delete with the current etag");
    expect_kind(
        s.download(DownloadRequest::new(&path)).await,
        &[ErrorKind::NotFound],
        "download after delete",
    );
    s.simple_upload(&path, "3".into()).await.expect("upload");
    s.delete(&path).await.expect("unconditional delete");
    expect_kind(
        s.delete(&path).await,
        &[ErrorKind::NotFound],
        "delete twice",
    );
}

/// A backend without atomic conditional deletes refuses them: the document
/// is kept (a read followed by an unconditional delete would delete a
/// version written in between).
pub async fn conditional_delete_refused(s: &dyn Storage, dir: &str) {
    let path = p(dir, "delete-refused.json");
    let v = s.simple_upload(&path, "1".into()).await.expect("upload");
    assert!(
        s.delete_if_match(&path, Some(&v.etag)).await.is_err(),
        "a backend without conditional deletes must refuse them"
    );
    assert_eq!(s.simple_download(&path).await.expect("kept"), "1");
}

/// Every version gets an etag never seen before: also for unchanged
/// content, and after a delete and a re-create.
pub async fn unique_etags(s: &dyn Storage, dir: &str) {
    let path = p(dir, "unique.json");
    let mut seen = HashSet::new();
    for _ in 0..3 {
        let v = s.simple_upload(&path, "same".into()).await.expect("upload");
        assert!(seen.insert(v.etag), "an unchanged rewrite reused an etag");
    }
    s.delete(&path).await.expect("delete");
    let v = s
        .simple_upload(&path, "same".into())
        .await
        .expect("re-create");
    assert!(seen.insert(v.etag), "a re-created document reused an etag");
}

/// The write token of the write that made a version comes back with it.
pub async fn write_tokens(s: &dyn Storage, dir: &str) {
    let path = p(dir, "token.json");
    for _ in 0..2 {
        let token = crate::storage::new_write_token();
        let put = s
            .upload(UploadRequest {
                write_token: Some(token.clone()),
                ..UploadRequest::new(path.clone(), "x")
            })
            .await
            .expect("upload with a token");
        let got = s
            .download(DownloadRequest::new(&path))
            .await
            .expect("download");
        assert_eq!(got.etag, put.etag);
        assert_eq!(
            got.write_token.as_deref(),
            Some(token.as_str()),
            "stored token"
        );
    }
}

/// Listing shows direct children only, sorted; a missing dir is empty.
pub async fn list_dir(s: &dyn Storage, dir: &str) {
    let base = p(dir, "list");
    assert!(
        s.list_dir(&p(&base, "missing"))
            .await
            .expect("list missing")
            .is_empty(),
        "a missing directory lists empty"
    );
    s.make_dir_if_not_exist(&p(&base, "sub"))
        .await
        .expect("mkdir");
    for name in ["b.json", "a.json", "sub/c.json"] {
        s.simple_upload(&p(&base, name), "{}".into())
            .await
            .expect("upload");
    }
    let listed = s.list_dir(&base).await.expect("list");
    let names: Vec<&str> = listed.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        names,
        [p(&base, "a.json"), p(&base, "b.json"), p(&base, "sub")],
        "list_dir children"
    );
    assert!(listed[0].is_file() && listed[0].size == 2 && listed[0].etag.is_some());
    assert!(listed[2].is_dir(), "sub is a directory");
    let read = s.read_dir(&base).await.expect("read_dir");
    assert_eq!(read, names);
}

/// `make_dir_if_not_exist` may be called repeatedly and for nested paths.
pub async fn make_dir_idempotent(s: &dyn Storage, dir: &str) {
    let d = p(dir, "mk/a/b");
    s.make_dir_if_not_exist(&d).await.expect("mkdir");
    s.make_dir_if_not_exist(&d).await.expect("mkdir again");
    s.simple_upload(&p(&d, "x.json"), "1".into())
        .await
        .expect("upload into it");
}

/// `stat` tells documents from directories.
pub async fn stat(s: &dyn Storage, dir: &str) {
    let d = p(dir, "stat");
    let f = p(&d, "x.json");
    let v = s.simple_upload(&f, "abc".into()).await.expect("upload");
    let info = s.stat(&f).await.expect("stat file");
    assert!(info.is_file());
    assert_eq!(info.size, 3);
    assert_eq!(info.etag.as_deref(), Some(v.etag.as_str()));
    assert_eq!(info.path, f);
    let info = s.stat(&d).await.expect("stat dir");
    assert!(info.is_dir(), "a directory holding a document stats as Dir");
}

/// Bad paths are rejected with `InvalidInput` and create nothing.
pub async fn invalid_paths(s: &dyn Storage, dir: &str) {
    for bad in [
        "../escape.json",
        "/abs.json",
        "a//b.json",
        "nul\0.json",
        "trailing/",
    ] {
        let path = if bad.starts_with('/') || bad.starts_with("..") {
            bad.to_owned()
        } else {
            p(dir, bad)
        };
        expect_kind(
            s.simple_upload(&path, "x".into()).await,
            &[ErrorKind::InvalidInput],
            &format!("upload {path:?}"),
        );
        expect_kind(
            s.download(DownloadRequest::new(&path)).await,
            &[ErrorKind::InvalidInput],
            &format!("download {path:?}"),
        );
    }
}

/// The provided unconditional forms round-trip.
pub async fn simple_forms(s: &dyn Storage, dir: &str) {
    let path = p(dir, "simple.json");
    s.simple_upload(&path, Bytes::from_static(b"{\"a\":1}"))
        .await
        .expect("simple_upload");
    assert_eq!(
        s.simple_download(&path).await.expect("simple_download"),
        "{\"a\":1}"
    );
}

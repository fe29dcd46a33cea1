//! [`RecordingStorage`] as a [`Storage`]: every call passes to the storage
//! it wraps, and each upload and download (also within `upload_many` and
//! `download_many`) becomes an [`Event`]; so does the stored version a
//! refused upload brings back, as a read.

use async_trait::async_trait;

use super::history::{Event, RecordingStorage, now_ns, outcome};
use crate::error::{ErrorKind, Result};
use crate::storage::{
    Capabilities, ChangeStream, DownloadRequest, DownloadResponse, FileInfo, Storage,
    UploadRequest, UploadResponse,
};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An event of `op` on `path`, begun now.
fn begin(op: &str, path: &str, pre: Option<String>, create: bool, value: Option<String>) -> Event {
    let (op, path, outcome, t0) = (op.into(), path.to_owned(), String::new(), now_ns());
    Event {
        op,
        path,
        pre,
        create,
        etag: None,
        value,
        outcome,
        t0,
        t1: 0,
    }
}

fn write_event(req: &UploadRequest) -> Event {
    let value = Some(text(&req.content));
    begin(
        "w",
        &req.path,
        req.if_match.clone(),
        req.is_create_only(),
        value,
    )
}

fn read_event(req: &DownloadRequest) -> Event {
    begin(
        "r",
        &req.path,
        req.if_none_match.first().cloned(),
        false,
        None,
    )
}

impl RecordingStorage {
    /// Records the write; a refusal that brought back the stored version
    /// (see [`Error::current`](crate::Error::current)) also counts as a read
    /// of it within the write's call.
    fn end_write(&self, mut e: Event, res: &Result<UploadResponse>) {
        e.t1 = now_ns();
        e.outcome = outcome(res).into();
        e.etag = res.as_ref().ok().map(|r| r.etag.clone());
        let found = res
            .as_ref()
            .err()
            .and_then(|err| err.current())
            .map(|c| Event {
                op: "r".into(),
                pre: None,
                create: false,
                etag: Some(c.etag.clone()),
                value: Some(text(&c.content)),
                outcome: "ok".into(),
                ..e.clone()
            });
        self.record(e);
        if let Some(read) = found {
            self.record(read);
        }
    }

    fn end_read(&self, mut e: Event, res: &Result<DownloadResponse>) {
        e.t1 = now_ns();
        e.outcome = outcome(res).into();
        match res {
            Ok(r) => {
                e.etag = Some(r.etag.clone());
                e.value = Some(text(&r.content));
            }
            Err(err) if err.kind() == ErrorKind::NotModified => e.etag.clone_from(&e.pre),
            Err(_) => {}
        }
        self.record(e);
    }
}

#[async_trait]
impl Storage for RecordingStorage {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    /// The inner storage's changes (not recorded: they are no calls).
    async fn watch(&self, prefix: &str) -> Result<ChangeStream> {
        self.inner.watch(prefix).await
    }

    async fn init(&self, name: &str) -> Result<()> {
        self.inner.init(name).await
    }

    async fn upload(&self, req: UploadRequest) -> Result<UploadResponse> {
        let e = write_event(&req);
        let res = self.inner.upload(req).await;
        self.end_write(e, &res);
        res
    }

    /// Recorded as one write per request, all spanning the whole call.
    async fn upload_many(&self, reqs: Vec<UploadRequest>) -> Vec<Result<UploadResponse>> {
        let events: Vec<Event> = reqs.iter().map(write_event).collect();
        let res = self.inner.upload_many(reqs).await;
        for (e, r) in events.into_iter().zip(&res) {
            self.end_write(e, r);
        }
        res
    }

    async fn download(&self, req: DownloadRequest) -> Result<DownloadResponse> {
        let e = read_event(&req);
        let res = self.inner.download(req).await;
        self.end_read(e, &res);
        res
    }

    /// Recorded as one read per request, all spanning the whole call.
    async fn download_many(&self, reqs: Vec<DownloadRequest>) -> Vec<Result<DownloadResponse>> {
        let events: Vec<Event> = reqs.iter().map(read_event).collect();
        let res = self.inner.download_many(reqs).await;
        for (e, r) in events.into_iter().zip(&res) {
            self.end_read(e, r);
        }
        res
    }

    async fn delete_if_match(&self, path: &str, if_match: Option<&str>) -> Result<()> {
        self.inner.delete_if_match(path, if_match).await
    }

    async fn stat(&self, path: &str) -> Result<FileInfo> {
        self.inner.stat(path).await
    }

    async fn list_dir(&self, path: &str) -> Result<Vec<FileInfo>> {
        self.inner.list_dir(path).await
    }

    async fn make_dir_if_not_exist(&self, path: &str) -> Result<()> {
        self.inner.make_dir_if_not_exist(path).await
    }
}

//! Walking a storage directory by directory, with a bounded number of
//! documents in flight, and retrying what the backend may answer later.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metadatacache::{Error, ErrorKind, FileInfo, Storage};
use tokio::task::JoinSet;

use super::Outcome;

/// Attempts of one storage call that keeps answering `Unavailable` or
/// `TooEarly`.
pub(super) const ATTEMPTS: u32 = 6;

/// True for the errors worth trying again: the backend did not answer, or
/// asked to be asked later.
pub(super) fn transient(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::TooEarly)
}

/// Sleeps before attempt `attempt + 1`: 50 ms doubled each time, with
/// jitter, at most 1.6 s.
pub(super) async fn pause(attempt: u32) {
    let base = 50u64 << attempt.saturating_sub(1).min(5);
    let ms = base / 2 + fastrand::u64(0..=base / 2);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Runs `f` until it answers something other than a transient error, at
/// most [`ATTEMPTS`] times. For calls that change nothing (reads, listings,
/// creating a directory).
pub(super) async fn retrying<T, Fut>(mut f: impl FnMut() -> Fut) -> metadatacache::Result<T>
where
    Fut: Future<Output = metadatacache::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if transient(&e) && attempt < ATTEMPTS => {
                pause(attempt).await;
                attempt += 1;
            }
            res => return res,
        }
    }
}

/// Visits every document below `prefix` in `storage` (or the one document
/// `prefix` names), running `visit` on up to `jobs` of them at once; `done`
/// gets each path and outcome as it completes.
///
/// The tree is walked depth first, one directory listing at a time: what
/// is held in memory is the current listing, the paths of the directories
/// still to visit and the documents in flight, never the whole tree. A
/// directory that cannot be listed is reported to `done` as a failure at
/// its path.
pub(super) async fn walk<F, Fut>(
    storage: &Arc<dyn Storage>,
    prefix: &str,
    jobs: usize,
    mut visit: F,
    mut done: impl FnMut(String, Outcome),
) where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let mut running: JoinSet<(String, Outcome)> = JoinSet::new();
    let mut finish =
        |joined: Option<Result<(String, Outcome), tokio::task::JoinError>>| match joined {
            Some(Ok((path, outcome))) => done(path, outcome),
            Some(Err(e)) => done(
                "(unknown document)".to_owned(),
                Outcome::Failed(Error::new(ErrorKind::Other, "a copy task failed").with_source(e)),
            ),
            None => {}
        };
    if !prefix.is_empty()
        && let Ok(info) = retrying(|| storage.stat(prefix)).await
        && info.is_file()
    {
        let fut = visit(info.path.clone());
        running.spawn(async move { (info.path, fut.await) });
        while let Some(joined) = running.join_next().await {
            finish(Some(joined));
        }
        return;
    }
    let mut dirs = vec![prefix.to_owned()];
    while let Some(dir) = dirs.pop() {
        let listing: Vec<FileInfo> = match retrying(|| storage.list_dir(&dir)).await {
            Ok(listing) => listing,
            Err(e) => {
                let shown = if dir.is_empty() { "/" } else { dir.as_str() };
                finish(Some(Ok((
                    shown.to_owned(),
                    Outcome::Failed(Error::new(e.kind(), format!("cannot list it: {e}"))),
                ))));
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for info in listing {
            if info.is_dir() {
                subdirs.push(info.path);
                continue;
            }
            while running.len() >= jobs.max(1) {
                finish(running.join_next().await);
            }
            let fut = visit(info.path.clone());
            running.spawn(async move { (info.path, fut.await) });
        }
        // Sorted listings, popped from the end: the walk goes in path order.
        dirs.extend(subdirs.into_iter().rev());
    }
    while let Some(joined) = running.join_next().await {
        finish(Some(joined));
    }
}

//! Change streams: inotify (through the `notify` crate) on the whole tree,
//! so changes made by any process on this host are reported.
//!
//! `notify` calls back from a thread of its own; the callback only queues
//! the event (it never blocks). A bridge thread per stream turns queued
//! events into changes: a document renamed into place or written in place
//! is reported changed, an unlinked one deleted (both with an unknown
//! etag); temp files and the internal `.mdcache` folder are ignored.
//!
//! A directory created (or moved in) later is watched by `notify` only
//! after the event that announced it was handled, so a document renamed
//! into it before then would go unseen. The bridge therefore adds the
//! watch itself and then scans the directory, reporting every document in
//! it: what landed before the watch stood is found by the scan, what lands
//! after by the watch.
//!
//! A full kernel queue (`notify` flags a rescan), a full bridge queue, or a
//! failing watch is reported as a gap; the whole watch is then set up
//! afresh (directories created meanwhile may lack a watch) and the stream
//! reports that it is in sync again.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use super::{check_path, tag};
use crate::backend::util::Backoff;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::{Change, ChangeSender, ChangeStream, is_within};

/// Events waiting for the bridge thread; past this they are dropped and
/// the stream reports a gap.
const QUEUE: usize = 16 * 1024;

/// How often an idle bridge checks whether the consumer dropped the
/// stream.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// What one change stream watches.
struct Tree {
    /// The storage root, canonical (event paths start with it).
    root: PathBuf,
    /// The storage path below which documents are reported ("" for all).
    prefix: String,
}

/// A running `notify` watch and the events it queued.
struct Watch {
    watcher: RecommendedWatcher,
    events: mpsc::Receiver<notify::Result<Event>>,
    /// The queue was full: events were dropped.
    overflowed: Arc<AtomicBool>,
}

/// What the bridge does after an event.
enum Flow {
    Continue,
    /// The consumer dropped the stream.
    Gone,
    /// Changes may have been missed, and watches may be missing: set up the
    /// watch afresh.
    Broken(String),
}

/// [`Storage::watch`](crate::Storage::watch) on the tree at `dir`: sets up
/// the watch of every directory (blocking), then hands it to a bridge
/// thread.
pub(super) fn subscribe(dir: &Path, prefix: &str) -> Result<ChangeStream> {
    let root = std::fs::canonicalize(dir).map_err(|e| {
        tag(Error::new(
            ErrorKind::Unavailable,
            format!("cannot watch {}: {e}", dir.display()),
        )
        .with_source(e))
    })?;
    let tree = Tree {
        root,
        prefix: prefix.to_owned(),
    };
    let watch = tree.open().map_err(|e| {
        tag(Error::new(
            ErrorKind::Unavailable,
            format!("cannot watch {}: {e}", tree.root.display()),
        )
        .with_source(e))
    })?;
    let (tx, rx) = ChangeStream::channel();
    tx.send(Change::InSync);
    std::thread::Builder::new()
        .name("mdcache-disk-watch".to_owned())
        .spawn(move || tree.run(&tx, watch))
        .map_err(|e| {
            tag(Error::new(ErrorKind::Unavailable, "cannot start the watch thread").with_source(e))
        })?;
    Ok(rx)
}

impl Tree {
    /// Watches the whole tree; returns once every directory in it is
    /// watched.
    fn open(&self) -> notify::Result<Watch> {
        let (queue, events) = mpsc::sync_channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&overflowed);
        let handler = move |event| {
            if queue.try_send(event).is_err() {
                flag.store(true, Ordering::SeqCst);
            }
        };
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut watcher = RecommendedWatcher::new(handler, config)?;
        watcher.watch(&self.root, RecursiveMode::Recursive)?;
        Ok(Watch {
            watcher,
            events,
            overflowed,
        })
    }

    /// The bridge thread: reports changes, and sets the watch up afresh
    /// after a gap, until the consumer drops the stream.
    fn run(&self, tx: &ChangeSender, mut watch: Watch) {
        loop {
            let reason = match self.report(tx, &mut watch) {
                Some(reason) => reason,
                None => return,
            };
            drop(watch);
            tracing::debug!(%reason, root = %self.root.display(), "disk watch: broken");
            if !tx.send(Change::Gap { reason }) {
                return;
            }
            watch = match self.reopen(tx) {
                Some(watch) => watch,
                None => return,
            };
            if !tx.send(Change::InSync) {
                return;
            }
        }
    }

    /// Reports queued events until the watch breaks; returns why, or
    /// `None` once the consumer is gone.
    fn report(&self, tx: &ChangeSender, watch: &mut Watch) -> Option<String> {
        loop {
            // Checked on every event too: reads of the tree (opens, which
            // send nothing) may never leave the watch idle.
            if tx.is_closed() {
                return None;
            }
            if watch.overflowed.load(Ordering::SeqCst) {
                return Some("file system events came faster than they were read".to_owned());
            }
            let flow = match watch.events.recv_timeout(IDLE_CHECK) {
                Ok(Ok(event)) => self.on_event(tx, &mut watch.watcher, event),
                Ok(Err(e)) => Flow::Broken(format!("the file system watch failed: {e}")),
                Err(RecvTimeoutError::Timeout) if tx.is_closed() => Flow::Gone,
                Err(RecvTimeoutError::Timeout) => Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => {
                    Flow::Broken("the file system watch stopped".to_owned())
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Gone => return None,
                Flow::Broken(reason) => return Some(reason),
            }
        }
    }

    /// Sets the watch up again, retrying with backoff; `None` once the
    /// consumer is gone.
    fn reopen(&self, tx: &ChangeSender) -> Option<Watch> {
        let mut backoff = Backoff::new();
        loop {
            if tx.is_closed() {
                return None;
            }
            match self.open() {
                Ok(watch) => return Some(watch),
                Err(e) => tracing::debug!(error = %e, "disk watch: cannot set up again yet"),
            }
            std::thread::sleep(backoff.next_delay());
        }
    }

    /// Turns one `notify` event into changes.
    fn on_event(&self, tx: &ChangeSender, watcher: &mut RecommendedWatcher, event: Event) -> Flow {
        if event.need_rescan() {
            return Flow::Broken("the kernel's queue of file system events overflowed".to_owned());
        }
        let paths = event.paths.iter();
        match event.kind {
            EventKind::Create(CreateKind::Folder) => {
                for dir in paths {
                    let flow = self.added_dir(tx, watcher, dir);
                    if !matches!(flow, Flow::Continue) {
                        return flow;
                    }
                }
                Flow::Continue
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for path in paths {
                    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
                    let flow = if is_dir {
                        self.added_dir(tx, watcher, path)
                    } else {
                        self.changed(tx, path)
                    };
                    if !matches!(flow, Flow::Continue) {
                        return flow;
                    }
                }
                Flow::Continue
            }
            // Reported as its two halves.
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => Flow::Continue,
            // A document or a directory renamed away (not by this
            // backend, which renames only temp files): what lay below a
            // directory cannot be told any more.
            EventKind::Modify(ModifyKind::Name(_)) => {
                match paths.filter_map(|p| self.document(p)).next() {
                    None => Flow::Continue,
                    Some(path) => {
                        let reason = format!("{path:?} was renamed away");
                        if tx.send(Change::Gap { reason }) && tx.send(Change::InSync) {
                            Flow::Continue
                        } else {
                            Flow::Gone
                        }
                    }
                }
            }
            // An empty directory removed: no document changed.
            EventKind::Remove(RemoveKind::Folder)
            | EventKind::Modify(ModifyKind::Metadata(_))
            | EventKind::Access(
                AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read),
            ) => Flow::Continue,
            // Deletes, and writes in place by other tools (a file created
            // and written where it stands; this backend renames).
            _ => {
                for path in paths {
                    if let Flow::Gone = self.changed(tx, path) {
                        return Flow::Gone;
                    }
                }
                Flow::Continue
            }
        }
    }

    /// Watches a directory that appeared in the tree, then reports every
    /// document in it.
    fn added_dir(&self, tx: &ChangeSender, watcher: &mut RecommendedWatcher, dir: &Path) -> Flow {
        if self.relative(dir).is_none() {
            return Flow::Continue;
        }
        if let Err(e) = watcher.watch(dir, RecursiveMode::Recursive) {
            if std::fs::symlink_metadata(dir).is_err() {
                // Gone again; its removal is reported by its own events.
                return Flow::Continue;
            }
            return Flow::Broken(format!("cannot watch {}: {e}", dir.display()));
        }
        let mut pending = vec![dir.to_owned()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() && self.relative(&path).is_some() => pending.push(path),
                    Ok(t) if t.is_file() && matches!(self.changed(tx, &path), Flow::Gone) => {
                        return Flow::Gone;
                    }
                    _ => {}
                }
            }
        }
        Flow::Continue
    }

    /// Reports `path` changed (etag unknown) if it is a document path
    /// under the prefix.
    fn changed(&self, tx: &ChangeSender, path: &Path) -> Flow {
        let Some(path) = self.document(path) else {
            return Flow::Continue;
        };
        if tx.send(Change::Changed { path, etag: None }) {
            Flow::Continue
        } else {
            Flow::Gone
        }
    }

    /// The storage path of a file below the prefix; `None` for the root,
    /// internal files and folders, names that are no valid path, and paths
    /// outside the prefix.
    fn document(&self, path: &Path) -> Option<String> {
        self.relative(path).filter(|p| is_within(p, &self.prefix))
    }

    /// The storage path of `path` below the root; `None` where
    /// [`check_path`] refuses it (internal and temp names, the root).
    fn relative(&self, path: &Path) -> Option<String> {
        let rest = path.strip_prefix(&self.root).ok()?;
        let mut out = String::new();
        for part in rest.components() {
            let Component::Normal(name) = part else {
                return None;
            };
            if !out.is_empty() {
                out.push('/');
            }
            out.push_str(name.to_str()?);
        }
        check_path(&out, false).is_ok().then_some(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tree(dir: &Path) -> Tree {
        Tree {
            root: std::fs::canonicalize(dir).unwrap(),
            prefix: String::new(),
        }
    }

    /// The next change, waiting at most a minute (a hang guard).
    fn next(rx: &mut ChangeStream) -> Change {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), rx.next())
                .await
                .expect("no change within a minute")
                .expect("the stream ended")
        })
    }

    #[test]
    fn internal_names_are_no_documents() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let doc = |p: &str| t.document(&t.root.join(p));
        assert_eq!(doc("a/b.json"), Some("a/b.json".to_owned()));
        assert_eq!(doc("a/.b.json.tmp.1.2"), None);
        assert_eq!(doc(".mdcache/format"), None);
        assert_eq!(doc(""), None);
        assert_eq!(t.document(Path::new("/elsewhere/a.json")), None);
        let below = Tree {
            prefix: "a".to_owned(),
            ..tree(dir.path())
        };
        assert_eq!(below.document(&t.root.join("ab.json")), None);
        assert_eq!(below.document(&t.root.join("a/x")), Some("a/x".to_owned()));
    }

    /// A rescan flag (the kernel queue overflowed) and a full bridge queue
    /// are each a gap; the watch is set up afresh and reports again.
    #[test]
    fn overflows_are_gaps_then_in_sync() {
        let dir = tempfile::tempdir().unwrap();
        let t = tree(dir.path());
        let (queue, events) = mpsc::sync_channel(4);
        let watch = Watch {
            watcher: RecommendedWatcher::new(|_| {}, notify::Config::default()).unwrap(),
            events,
            overflowed: Arc::new(AtomicBool::new(false)),
        };
        let (tx, mut rx) = ChangeStream::channel();
        let root = t.root.clone();
        let bridge = std::thread::spawn(move || t.run(&tx, watch));
        let rescan = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        queue.send(Ok(rescan)).unwrap();
        let gap = next(&mut rx);
        assert!(
            matches!(&gap, Change::Gap { reason } if reason.contains("overflow")),
            "{gap:?}"
        );
        assert_eq!(next(&mut rx), Change::InSync);
        // The watch set up afresh reports changes.
        std::fs::write(root.join("x.json"), "1").unwrap();
        assert_eq!(
            next(&mut rx),
            Change::Changed {
                path: "x.json".to_owned(),
                etag: None
            }
        );
        drop(rx);
        bridge.join().unwrap();
        // The flag of a full queue, on a watch of its own.
        let t = tree(dir.path());
        let watch = t.open().unwrap();
        watch.overflowed.store(true, Ordering::SeqCst);
        let (tx, mut rx) = ChangeStream::channel();
        let bridge = std::thread::spawn(move || t.run(&tx, watch));
        assert!(matches!(next(&mut rx), Change::Gap { .. }));
        assert_eq!(next(&mut rx), Change::InSync);
        drop(rx);
        bridge.join().unwrap();
    }
}

/// The kind of shared file system `root` lies on (network or cluster file
/// systems, and FUSE, which most of them use), whose changes made on other
/// hosts inotify never reports; `None` for a local one, or when it cannot
/// be told.
pub(super) fn shared_fs(root: &std::os::fd::OwnedFd) -> Option<&'static str> {
    let kind = rustix::fs::fstatfs(root).ok()?.f_type;
    // `f_type`'s width differs between platforms.
    #[allow(clippy::useless_conversion)]
    shared_fs_kind(i64::from(kind))
}

/// The name of the shared file system with magic number `kind`.
fn shared_fs_kind(kind: i64) -> Option<&'static str> {
    Some(match kind {
        0x6969 => "NFS",
        0x517B | 0xFF53_4D42 | 0xFE53_4D42 => "SMB/CIFS",
        0x00C3_6400 => "Ceph",
        0x0102_1997 => "9P",
        0x5346_414F => "AFS",
        0x0116_1970 => "GFS2",
        0x7461_636F => "OCFS2",
        0x0BD0_0BD0 => "Lustre",
        0x6573_5546 => "FUSE",
        _ => return None,
    })
}

#[cfg(test)]
mod shared_tests {
    use super::*;

    #[test]
    fn shared_file_systems_are_named() {
        assert_eq!(shared_fs_kind(0x6969), Some("NFS"));
        assert_eq!(shared_fs_kind(0xFF53_4D42), Some("SMB/CIFS"));
        assert_eq!(shared_fs_kind(0x6573_5546), Some("FUSE"));
        // ext4, xfs, btrfs, tmpfs, overlayfs.
        for local in [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x794C_7630] {
            assert_eq!(shared_fs_kind(local), None, "{local:#x}");
        }
    }
}

//! Which directories' entries are known to be on disk. A write into a
//! directory is durable only once the directory's own name in its parent
//! is: a directory made by another process that died before it synced the
//! parent, or by a tool that never does, could vanish with an acknowledged
//! document in it at the next power loss. So the first write through each
//! directory, per storage handle, syncs its parent, and opening syncs the
//! root's entry (and those of the root's ancestors that it creates).

use std::collections::HashSet;
use std::fs::{DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use super::config::DiskOptions;
use super::fs::io_error;
use crate::error::Result;

/// How many directories are remembered; past it the set starts afresh
/// (which costs one more sync per directory, never a missing one).
const MAX: usize = 65_536;

/// The storage paths of directories whose entry in their parent was synced
/// by this handle (or created and synced by it).
#[derive(Debug, Default)]
pub(super) struct SyncedDirs(Mutex<HashSet<Box<str>>>);

impl SyncedDirs {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<Box<str>>> {
        // A set of names cannot be left half changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `dir`'s entry is known synced.
    pub(super) fn contains(&self, dir: &str) -> bool {
        self.set().contains(dir)
    }

    /// Records that `dir`'s entry was synced.
    pub(super) fn insert(&self, dir: &str) {
        let mut set = self.set();
        if set.len() >= MAX {
            set.clear();
        }
        set.insert(dir.into());
    }
}

/// Creates the storage root `dir` and its missing ancestors with the
/// configured mode, and (with fsync on) syncs the parent of each one
/// created, or of the root itself when it was there: whoever made it may
/// not have.
pub(super) fn create_root(dir: &Path, shown: &str, opts: &DiskOptions) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    if missing.is_empty() {
        if opts.fsync {
            sync_parent(dir, shown)?;
        }
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(opts.dir_mode)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, Permissions::from_mode(opts.dir_mode)))
        .map_err(|e| io_error(e, shown, "cannot create the storage directory"))?;
    if !opts.fsync {
        return Ok(());
    }
    missing
        .iter()
        .try_for_each(|created| sync_parent(created, shown))
}

/// Syncs the directory holding `dir`'s entry (the current directory for a
/// relative name without one). A parent this process may pass through but
/// not read cannot be opened to sync: it is left as it is.
fn sync_parent(dir: &Path, shown: &str) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::File::open(parent).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        res => res.map_err(|e| io_error(e, shown, "cannot sync the storage directory's parent")),
    }
}

//! What a disk storage left in its directory.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

/// Every name below `dir`, recursively, relative to it (symlinks not followed).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The temp files below `dir`, relative to it.
pub fn temp_files(dir: &Path) -> Vec<String> {
    tree(dir)
        .into_iter()
        .filter(|p| p.rsplit('/').next().unwrap().contains(".tmp."))
        .collect()
}

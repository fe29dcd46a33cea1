//! Document trees in a directory, for the `migrate` tests: writing one, and
//! reading one back byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

/// Writes `n` documents of assorted shapes and sizes below `dir` (nested
/// directories, a top-level one, one that is not JSON); returns them by
/// storage path.
pub fn seed(dir: &Path, n: usize) -> BTreeMap<String, Vec<u8>> {
    let mut docs = BTreeMap::new();
    for i in 0..n {
        let path = match i % 4 {
            0 => format!("users/u{i}/settings.json"),
            1 => format!("shares/g{}/s{i}.json", i % 7),
            2 => format!("top-{i}.json"),
            _ => format!("users/u{}/passwords/p{i}.bin", i - 3),
        };
        let content = if i % 4 == 3 {
            // Not JSON, not UTF-8: bytes are copied as they are.
            (0..=255u8).cycle().skip(i).take(300 + i).collect()
        } else {
            format!(
                "{{\"doc\":{i},\"pad\":\"{}\"}}\n",
                "x".repeat(i * 37 % 2000)
            )
            .into_bytes()
        };
        write(dir, &path, &content);
        docs.insert(path, content);
    }
    docs
}

/// Writes one document below `dir`, creating its directories.
pub fn write(dir: &Path, path: &str, content: &[u8]) {
    let file = dir.join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, content).unwrap();
}

/// Every document below `dir` by storage path, without the storage's own
/// files (`.mdcache/`).
pub fn read(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
            if rel.starts_with(".mdcache") {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

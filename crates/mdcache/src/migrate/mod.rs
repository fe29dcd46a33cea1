//! `mdcache migrate`: copies every document from one storage to another,
//! create-only, then verifies the copy byte for byte.
//!
//! The promise: a document already on the target is never overwritten (each
//! copy is an upload with `if_none_match: ["*"]`, checked by the target
//! atomically with the write). One holding the source's bytes counts as
//! already there, so a run cut short is resumed by running it again; one
//! holding other bytes is reported as a difference. At the end every source
//! document is read again from both sides and compared; the exit status is
//! 1 when anything differs, is missing or failed. Documents on the target
//! that the source does not have are left alone and not reported.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metadatacache::{Error, Storage};

mod copy;
mod overlap;
mod walk;

type Result<T> = std::result::Result<T, Error>;

/// Options of `mdcache migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Storage to copy from (a URL, as for --storage).
    #[arg(long, value_name = "URL")]
    from: String,
    /// Storage to copy to; documents already there are never overwritten.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Copy only this directory (or this one document) [default: everything].
    #[arg(long, default_value = "", hide_default_value = true)]
    prefix: String,
    /// Documents copied or verified at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    jobs: usize,
    /// No progress bar (it is also hidden when standard error is not a
    /// terminal).
    #[arg(long, short)]
    quiet: bool,
}

/// What happened to one document.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Written to the target by this run.
    Copied,
    /// The target already held the same bytes.
    AlreadyThere,
    /// Verified: the target holds the same bytes.
    Identical,
    /// The target holds other bytes (left as they are).
    Differs,
    /// Verified: the target has no document there.
    Missing,
    /// Deleted from the source while the run went on: nothing to copy.
    Vanished,
    /// A storage error, after retries.
    Failed(Error),
}

/// How many documents are named on standard error, per pass.
const SHOWN: usize = 20;

/// The counts of one pass, and the documents it names.
#[derive(Debug, Default)]
struct Tally {
    copied: u64,
    already: u64,
    identical: u64,
    differing: u64,
    missing: u64,
    vanished: u64,
    failed: u64,
    shown: usize,
    unshown: u64,
}

impl Tally {
    fn add(&mut self, bar: &ProgressBar, verifying: bool, path: &str, outcome: Outcome) {
        bar.inc(1);
        let problem = match outcome {
            Outcome::Copied => return self.copied += 1,
            Outcome::AlreadyThere => return self.already += 1,
            Outcome::Identical => return self.identical += 1,
            Outcome::Vanished => return self.vanished += 1,
            Outcome::Differs => {
                self.differing += 1;
                if verifying {
                    "differs: the target holds other bytes".to_owned()
                } else {
                    "differs: the target already holds other bytes; not overwritten".to_owned()
                }
            }
            Outcome::Missing => {
                self.missing += 1;
                "missing on the target".to_owned()
            }
            Outcome::Failed(e) => {
                self.failed += 1;
                format!("failed: {e}")
            }
        };
        if self.shown < SHOWN {
            self.shown += 1;
            bar.suspend(|| eprintln!("{path}: {problem}"));
        } else {
            self.unshown += 1;
        }
    }

    fn problems(&self) -> u64 {
        self.differing + self.missing + self.failed
    }

    /// The pass's last words on standard error: how many were not named.
    fn close(&self, pass: &str) {
        if self.unshown > 0 {
            eprintln!(
                "… and {} more from the {pass} (first {SHOWN} shown)",
                self.unshown
            );
        }
    }
}

fn bar(quiet: bool, what: &'static str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {what} {{pos}} documents {{per_sec}}"))
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Runs `mdcache migrate`.
pub async fn migrate(args: MigrateArgs) -> Result<ExitCode> {
    let prefix = check_prefix(&args.prefix)?;
    check_urls(&args.from, &args.to)?;
    if args.jobs == 0 {
        return Err(Error::invalid_input("--jobs must be at least 1"));
    }
    let from = metadatacache::open(&args.from).await?;
    let to = metadatacache::open(&args.to).await?;
    to.init("").await?;

    let started = Instant::now();
    let copy = pass(&from, &to, &prefix, &args, false).await;
    let copy_secs = started.elapsed().as_secs_f64();
    println!(
        "copied {}, already there {}, differing {}, failed {}{} ({} documents in {copy_secs:.2} s)",
        copy.copied,
        copy.already,
        copy.differing,
        copy.failed,
        vanished(copy.vanished),
        copy.copied + copy.already + copy.differing + copy.failed,
    );
    let started = Instant::now();
    let verify = pass(&from, &to, &prefix, &args, true).await;
    let verified = verify.identical + verify.differing + verify.missing + verify.failed;
    println!(
        "verified {verified} documents: {} identical, {} differing, {} missing, {} failed{} ({:.2} s)",
        verify.identical,
        verify.differing,
        verify.missing,
        verify.failed,
        vanished(verify.vanished),
        started.elapsed().as_secs_f64(),
    );
    if verified == 0 && copy.problems() == 0 {
        let under = if prefix.is_empty() {
            String::new()
        } else {
            format!(" under {prefix:?}")
        };
        // A misspelt prefix or URL finds nothing: not a migration done.
        let from = metadatacache::redact_url(&args.from);
        eprintln!("mdcache: migrate: no documents in {from}{under}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(if copy.problems() + verify.problems() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn vanished(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", vanished from the source {n}")
    }
}

/// One walk over the source: the copy, or the verification.
async fn pass(
    from: &Arc<dyn Storage>,
    to: &Arc<dyn Storage>,
    prefix: &str,
    args: &MigrateArgs,
    verifying: bool,
) -> Tally {
    let bar = bar(args.quiet, if verifying { "verified" } else { "copied" });
    let mut tally = Tally::default();
    let visit = |path: String| {
        let (from, to) = (Arc::clone(from), Arc::clone(to));
        async move {
            if verifying {
                copy::verify_one(from, to, path).await
            } else {
                copy::copy_one(from, to, path).await
            }
        }
    };
    walk::walk(from, prefix, args.jobs, visit, |path, outcome| {
        tally.add(&bar, verifying, &path, outcome);
    })
    .await;
    bar.finish_and_clear();
    tally.close(if verifying { "verification" } else { "copy" });
    tally
}

/// The prefix as a storage path: `""` for everything; one trailing `/` is
/// allowed.
fn check_prefix(prefix: &str) -> Result<String> {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    metadatacache::validate_path(p, true).map_err(|e| {
        Error::invalid_input(format!(
            "--prefix {prefix:?} is not a storage path: {}",
            e.message()
        ))
    })?;
    Ok(p.to_owned())
}

/// Refuses what cannot be a migration: one storage twice, one inside the
/// other (disk directories, key prefixes of one server), a source directory that does not exist (opening it
/// would create an empty one), and `memory:`, which lives and dies with
/// this process.
fn check_urls(from: &str, to: &str) -> Result<()> {
    let (from_raw, to_raw) = (from, to);
    let (from, to) = (
        &metadatacache::redact_url(from),
        &metadatacache::redact_url(to),
    );
    for (flag, url) in [("--from", from), ("--to", to)] {
        if url.trim().is_empty() {
            return Err(Error::invalid_input(format!("{flag} needs a storage URL")));
        }
        if url.starts_with("memory:") {
            return Err(Error::invalid_input(format!(
                "{flag} {url}: a memory storage lives only inside one process; nothing to migrate"
            )));
        }
    }
    if from_raw.trim() == to_raw.trim() {
        return Err(Error::invalid_input(format!(
            "--from and --to name the same storage ({from}); nothing to migrate"
        )));
    }
    if let Some(why) = overlap::overlap(from_raw, to_raw) {
        return Err(Error::invalid_input(why));
    }
    let Some(source) = disk_dir(from_raw) else {
        return Ok(());
    };
    let source = std::fs::canonicalize(&source)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "--from {from}: no such directory {}",
                source.display()
            ))
        })?;
    if let Some(target) = disk_dir(to_raw).map(|t| resolve(&t)) {
        if target == source {
            return Err(Error::invalid_input(format!(
                "--from {from} and --to {to} are the same directory; nothing to migrate"
            )));
        }
        if target.starts_with(&source) || source.starts_with(&target) {
            return Err(Error::invalid_input(format!(
                "--from {from} and --to {to}: one directory lies inside the other"
            )));
        }
    }
    Ok(())
}

/// The directory of a disk URL (`disk:PATH`, `disk://PATH` or a bare
/// path, as `metadatacache::open` reads them); `None` for other backends.
fn disk_dir(url: &str) -> Option<PathBuf> {
    if let Some(path) = url.strip_prefix("disk:") {
        return Some(PathBuf::from(path.strip_prefix("//").unwrap_or(path)));
    }
    let is_scheme = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    };
    match url.split_once(':') {
        Some((scheme, _)) if is_scheme(scheme) => None,
        _ => Some(PathBuf::from(url)),
    }
}

/// `path` made absolute with symbolic links resolved, as far as it exists.
fn resolve(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    loop {
        if let Ok(real) = std::fs::canonicalize(&at) {
            return rest.iter().rev().fold(real, |p, name| p.join(name));
        }
        match (at.file_name().map(ToOwned::to_owned), at.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                at = parent.to_owned();
            }
            _ => return at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(check_prefix("").unwrap(), "");
        assert_eq!(check_prefix("users/").unwrap(), "users");
        for bad in ["/abs", "a//b", "../x", "a/./b", "a\\b"] {
            let e = check_prefix(bad).unwrap_err();
            assert!(
                e.to_string().contains("is not a storage path"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn disk_urls() {
        assert_eq!(disk_dir("disk:./d"), Some(PathBuf::from("./d")));
        assert_eq!(disk_dir("disk:///abs"), Some(PathBuf::from("/abs")));
        assert_eq!(disk_dir("/abs/x"), Some(PathBuf::from("/abs/x")));
        assert_eq!(disk_dir("etcd://h:2379/p"), None);
        assert_eq!(disk_dir("s3://b/p"), None);
    }
}

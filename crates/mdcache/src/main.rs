//! `mdcache`: operate on any metadatacache storage, and watch the library
//! keep replicas consistent.

mod bench;
mod commands;
mod json_edit;
mod migrate;
mod torture;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Read, write and stress-test metadatacache storages.
#[derive(Debug, Parser)]
#[command(name = "mdcache", version, about)]
struct Cli {
    /// Storage URL: memory:, disk:DIR (or a plain path), etcd://…, postgres://…,
    /// s3://…, az://…, gs://…, nats://… [default: disk:./mdcache-data; for
    /// torture, a new temporary directory]
    #[arg(
        long,
        short,
        global = true,
        env = "MDCACHE_STORAGE",
        hide_env_values = true
    )]
    storage: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a document exactly as stored.
    Get {
        /// Storage path of the document.
        path: String,
        /// Parse as JSON and pretty-print.
        #[arg(long)]
        pretty: bool,
        /// Print the etag on standard error.
        #[arg(long)]
        etag: bool,
    },
    /// Write a document (JSON, checked) from a file or standard input.
    Put {
        /// Storage path of the document.
        path: String,
        /// File to read; `-` or absent for standard input.
        file: Option<PathBuf>,
        /// Create only: fail if the document exists.
        #[arg(long, conflicts_with = "if_match")]
        create: bool,
        /// Write only if the current etag is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
        /// Store the bytes without checking they are JSON.
        #[arg(long)]
        raw: bool,
    },
    /// Change fields of a JSON document (read-modify-write, retried on conflict).
    Update {
        /// Storage path of the document.
        path: String,
        /// Set a field: `a.b=value` (value parsed as JSON, else taken as a string).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        sets: Vec<String>,
        /// Remove a field: `a.b`.
        #[arg(long = "unset", value_name = "FIELD")]
        unsets: Vec<String>,
        /// Start from `{}` if the document does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Edit a JSON document in $EDITOR; refuses to overwrite a concurrent change.
    Edit {
        /// Storage path of the document.
        path: String,
        /// Start from `{}` if the document does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Delete a document.
    Rm {
        /// Storage path of the document.
        path: String,
        /// Delete only if the current etag is this one.
        #[arg(long, value_name = "ETAG")]
        if_match: Option<String>,
    },
    /// List a directory.
    Ls {
        /// Directory path (default: the root).
        #[arg(default_value = "")]
        path: String,
    },
    /// Show kind, size, modification time and etag.
    Stat {
        /// Storage path.
        path: String,
    },
    /// Copy every document to another storage, create-only (never
    /// overwriting), then verify the copy; exit status 1 on any difference.
    Migrate(migrate::MigrateArgs),
    /// Start replica processes hammering shared keys; verify nothing is lost.
    Torture(torture::TortureArgs),
    /// Measure the library against the raw operations it wraps (memory and a
    /// temporary directory, or the --storage given).
    Bench(bench::BenchArgs),
    /// Memory use of a store after many keys (started by `bench`).
    #[command(hide = true)]
    MemProbe(bench::MemProbeArgs),
    /// One replica of a torture run (started by `torture`).
    #[command(hide = true)]
    Replica(torture::ReplicaArgs),
}

/// Where commands other than `torture` work when no storage is given.
const DEFAULT_STORAGE: &str = "disk:./mdcache-data";

fn main() -> ExitCode {
    // A bug must still end in one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("mdcache: internal error{at}: {msg}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version (stdout, exit 0), and the help shown for a
        // missing subcommand.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("mdcache: {} (see mdcache --help)", usage_error(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mdcache: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mdcache: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, metadatacache::Error> {
    let url = match (&cli.storage, &cli.command) {
        (Some(url), _) => url.clone(),
        (None, Command::Torture(_) | Command::Bench(_)) => String::new(),
        (None, _) => DEFAULT_STORAGE.to_owned(),
    };
    match cli.command {
        Command::Get { path, pretty, etag } => commands::get(&url, &path, pretty, etag).await,
        Command::Put {
            path,
            file,
            create,
            if_match,
            raw,
        } => commands::put(&url, &path, file, create, if_match, raw).await,
        Command::Update {
            path,
            sets,
            unsets,
            create,
        } => commands::update(&url, &path, &sets, &unsets, create).await,
        Command::Edit { path, create } => commands::edit(&url, &path, create).await,
        Command::Rm { path, if_match } => commands::rm(&url, &path, if_match).await,
        Command::Ls { path } => commands::ls(&url, &path).await,
        Command::Stat { path } => commands::stat(&url, &path).await,
        Command::Migrate(args) => migrate::migrate(args).await,
        Command::Torture(args) => torture::torture(&url, args).await,
        Command::Bench(args) => {
            bench::bench(Some(url.as_str()).filter(|u| !u.is_empty()), args).await
        }
        Command::Replica(args) => torture::replica(&url, args).await,
        Command::MemProbe(args) => bench::mem_probe(args).await,
    }
}

/// Clap's message for a bad command line on one line, without its
/// `error: ` prefix: its first paragraph (a missing argument's name is on
/// the line after the message), not the usage and tips after it.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let line = first.join(" ");
    match line.strip_prefix("error: ") {
        Some(rest) => rest.to_owned(),
        None if line.is_empty() => "bad command line".to_owned(),
        None => line,
    }
}

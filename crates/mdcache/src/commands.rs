//! The document commands: get, put, update, edit, rm, ls, stat.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use metadatacache::{
    DownloadRequest, Error, ErrorKind, FileInfo, Options, Storage, Store, UploadRequest,
};
use serde_json::Value;

use crate::json_edit;

type Result<T> = std::result::Result<T, Error>;

async fn open(url: &str) -> Result<Arc<dyn Storage>> {
    metadatacache::open(url).await
}

fn io_error(what: String, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Other,
    };
    Error::new(kind, what).with_source(e)
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| io_error("cannot write to standard output".into(), e))
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::new(ErrorKind::Codec, format!("{what} is not valid JSON")).with_source(e)
    })
}

pub async fn get(url: &str, path: &str, pretty: bool, show_etag: bool) -> Result<ExitCode> {
    let storage = open(url).await?;
    let resp = storage.download(DownloadRequest::new(path)).await?;
    if show_etag {
        eprintln!("etag: {}", resp.etag);
    }
    if pretty {
        let value = parse_json(&resp.content, &format!("stored document {path:?}"))?;
        let mut text = serde_json::to_string_pretty(&value).map_err(Error::from)?;
        text.push('\n');
        write_stdout(text.as_bytes())?;
    } else {
        write_stdout(&resp.content)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn read_input(file: Option<&Path>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    match file {
        None => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| io_error("cannot read standard input".into(), e))?;
        }
        Some(p) if p == Path::new("-") => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| io_error("cannot read standard input".into(), e))?;
        }
        Some(p) => {
            buf = std::fs::read(p)
                .map_err(|e| io_error(format!("cannot read {}", p.display()), e))?;
        }
    }
    Ok(buf)
}

pub async fn put(
    url: &str,
    path: &str,
    file: Option<PathBuf>,
    create: bool,
    if_match: Option<String>,
    raw: bool,
) -> Result<ExitCode> {
    let content = read_input(file.as_deref())?;
    if !raw {
        let source = file
            .as_ref()
            .filter(|p| *p != Path::new("-"))
            .map_or_else(|| "standard input".to_owned(), |p| p.display().to_string());
        parse_json(&content, &format!("input from {source}"))?;
    }
    let storage = open(url).await?;
    let req = UploadRequest {
        if_match,
        if_none_match: if create { vec!["*".into()] } else { Vec::new() },
        ..UploadRequest::new(path, Bytes::from(content))
    };
    let resp = storage.upload(req).await?;
    println!("{}", resp.etag);
    Ok(ExitCode::SUCCESS)
}

pub async fn update(
    url: &str,
    path: &str,
    sets: &[String],
    unsets: &[String],
    create: bool,
) -> Result<ExitCode> {
    let mut edits = Vec::new();
    for s in sets {
        edits.push(json_edit::parse_set(s)?);
    }
    for u in unsets {
        edits.push(json_edit::parse_unset(u)?);
    }
    if edits.is_empty() {
        return Err(Error::invalid_input(
            "nothing to do: give --set FIELD=VALUE or --unset FIELD",
        ));
    }
    let storage = open(url).await?;
    let store: Store<String, Value> = Store::new(
        Options::new(storage, |p: &String| p.clone()).init(|| Value::Object(Default::default())),
    );
    let mut result = Value::Null;
    store
        .update(path.to_owned(), create, |doc| {
            let old = doc.clone();
            let new = json_edit::apply(doc, &edits).map_err(|e| e.with_path(path))?;
            result.clone_from(&new);
            // Edits that change nothing write nothing (no new version).
            let changed = new != old;
            Ok((new, changed))
        })
        .await?;
    let text = serde_json::to_string_pretty(&result).map_err(Error::from)?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

pub async fn edit(url: &str, path: &str, create: bool) -> Result<ExitCode> {
    let storage = open(url).await?;
    let (original, etag) = match storage.download(DownloadRequest::new(path)).await {
        Ok(resp) => (resp.content, Some(resp.etag)),
        Err(e) if e.kind() == ErrorKind::NotFound && create => (Bytes::from_static(b"{}\n"), None),
        Err(e) => return Err(e),
    };
    let value = parse_json(&original, &format!("stored document {path:?}"))
        .map_err(|e| e.with_path(path))?;
    let mut text = serde_json::to_string_pretty(&value).map_err(Error::from)?;
    text.push('\n');

    let mut tmp = tempfile::Builder::new()
        .prefix("mdcache-edit-")
        .suffix(".json")
        .tempfile()
        .map_err(|e| io_error("cannot create a temporary file".into(), e))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.flush())
        .map_err(|e| io_error(format!("cannot write {}", tmp.path().display()), e))?;
    run_editor(tmp.path())?;
    let edited = std::fs::read(tmp.path())
        .map_err(|e| io_error(format!("cannot read {}", tmp.path().display()), e))?;
    let keep = |tmp: tempfile::NamedTempFile| match tmp.keep() {
        Ok((_, p)) => p.display().to_string(),
        Err(_) => "(lost)".to_owned(),
    };
    let new_value = match parse_json(&edited, "the edited document") {
        Ok(v) => v,
        Err(e) => {
            let saved = keep(tmp);
            return Err(e.with_message(format!(
                "the edited document is not valid JSON; nothing written, your edit is in {saved}"
            )));
        }
    };
    if new_value == value && etag.is_some() {
        eprintln!("no changes");
        return Ok(ExitCode::SUCCESS);
    }
    let mut body = serde_json::to_vec_pretty(&new_value).map_err(Error::from)?;
    body.push(b'\n');
    let req = UploadRequest {
        if_none_match: if etag.is_none() {
            vec!["*".into()]
        } else {
            Vec::new()
        },
        if_match: etag.clone(),
        ..UploadRequest::new(path, body)
    };
    match storage.upload(req).await {
        Ok(resp) => {
            eprintln!("saved {path} (etag {})", resp.etag);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_conflict() || e.kind() == ErrorKind::NotFound => {
            let saved = keep(tmp);
            Err(Error::new(
                e.kind(),
                format!(
                    "conflict: {path:?} changed since the editor opened it; \
                     not overwritten, your edit is in {saved}"
                ),
            )
            .with_source(e))
        }
        Err(e) => {
            let saved = keep(tmp);
            let message = format!("{}; your edit is in {saved}", e.message());
            Err(e.with_message(message))
        }
    }
}

fn run_editor(file: &Path) -> Result<()> {
    let editor = std::env::var("VISUAL")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| {
            std::env::var("EDITOR")
                .ok()
                .filter(|e| !e.trim().is_empty())
        })
        .unwrap_or_else(|| "vi".to_owned());
    // Through the shell, so that EDITOR="code --wait" works.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("mdcache-editor")
        .arg(file)
        .status()
        .map_err(|e| io_error(format!("cannot start editor {editor:?}"), e))?;
    if !status.success() {
        return Err(Error::new(
            ErrorKind::Aborted,
            format!("editor {editor:?} exited with {status}; nothing written"),
        ));
    }
    Ok(())
}

pub async fn rm(url: &str, path: &str, if_match: Option<String>) -> Result<ExitCode> {
    let storage = open(url).await?;
    storage.delete_if_match(path, if_match.as_deref()).await?;
    Ok(ExitCode::SUCCESS)
}

fn format_time(t: Option<SystemTime>) -> String {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(
            || "-".to_owned(),
            |d| format!("{}.{:03}", d.as_secs(), d.subsec_millis()),
        )
}

fn info_line(info: &FileInfo) -> String {
    let kind = if info.is_dir() { "dir " } else { "file" };
    format!(
        "{kind} {:>10} {:>15} {:<34} {}",
        info.size,
        format_time(info.mtime),
        info.etag.as_deref().unwrap_or("-"),
        info.path
    )
}

pub async fn ls(url: &str, path: &str) -> Result<ExitCode> {
    let storage = open(url).await?;
    let mut out = String::new();
    for info in storage.list_dir(path).await? {
        out.push_str(&info_line(&info));
        out.push('\n');
    }
    write_stdout(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

pub async fn stat(url: &str, path: &str) -> Result<ExitCode> {
    let storage = open(url).await?;
    let info = storage.stat(path).await?;
    println!("path:  {}", info.path);
    println!("kind:  {}", if info.is_dir() { "dir" } else { "file" });
    println!("size:  {}", info.size);
    println!("mtime: {}", format_time(info.mtime));
    println!("etag:  {}", info.etag.as_deref().unwrap_or("-"));
    Ok(ExitCode::SUCCESS)
}

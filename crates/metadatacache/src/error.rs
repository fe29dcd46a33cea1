//! The one error type of the crate.

use std::borrow::Cow;
use std::fmt;

use crate::storage::download::DownloadResponse;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as a decision for the caller.
///
/// The kinds are deliberately coarse: each one asks the caller to do something
/// different (retry, create, give up, fix the input, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The path or key does not exist.
    NotFound,
    /// A conditional download found the etag unchanged; no content was sent.
    NotModified,
    /// An `if_match` / `if_unmodified_since` precondition did not hold.
    PreconditionFailed,
    /// A create-only write (`if_none_match: ["*"]`) found the path present.
    AlreadyExists,
    /// The operation was aborted by a concurrent one; retrying may succeed.
    Aborted,
    /// The backend asks to be called again later.
    TooEarly,
    /// The backend refused access (credentials, file permissions, a path
    /// leaving the storage root).
    PermissionDenied,
    /// The caller passed something unusable: a bad path, key, URL or option.
    InvalidInput,
    /// A stored document could not be decoded, or a value could not be encoded.
    Codec,
    /// The backend could not be reached or timed out. For a write this means
    /// the write may or may not have been applied.
    Unavailable,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short lower-case name, as used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not found",
            ErrorKind::NotModified => "not modified",
            ErrorKind::PreconditionFailed => "precondition failed",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Aborted => "aborted",
            ErrorKind::TooEarly => "too early",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Codec => "codec error",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Other => "error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every operation in this crate.
///
/// It carries a [`kind`](Error::kind), a message, and — where known — the
/// storage path and the backend that produced it, plus the underlying error as
/// its [`source`](std::error::Error::source). Its `Display` form is a single
/// line: `backend: path: message: source`.
pub struct Error {
    kind: ErrorKind,
    message: Cow<'static, str>,
    path: Option<String>,
    backend: Option<&'static str>,
    source: Option<Source>,
    /// The stored version a refused compare-and-swap brought back.
    current: Option<Box<DownloadResponse>>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            backend: None,
            source: None,
            current: None,
        }
    }

    /// A [`ErrorKind::NotFound`] error.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// A [`ErrorKind::InvalidInput`] error.
    pub fn invalid_input(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// A [`ErrorKind::Unavailable`] error.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// An [`ErrorKind::Other`] error wrapping `source`.
    pub fn other(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::new(ErrorKind::Other, "").with_source(source)
    }

    /// Sets the storage path the error is about.
    #[must_use]
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets the backend name (see [`Storage::backend`](crate::Storage::backend)).
    #[must_use]
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Sets the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Sets the underlying cause from an already boxed error.
    #[must_use]
    pub fn with_boxed_source(mut self, source: Source) -> Self {
        self.source = Some(source);
        self
    }

    /// Replaces the message, keeping kind, path, backend and source.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without path, backend or source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The storage path the error is about, if known.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// The backend that produced the error, if known.
    pub fn backend(&self) -> Option<&'static str> {
        self.backend
    }

    /// Attaches the stored version, as a download would return it, to the
    /// refusal of a compare-and-swap: a backend that reads it with the
    /// refusal (see
    /// [`Capabilities::current_on_conflict`](crate::Capabilities::current_on_conflict))
    /// spares the writer the read it would make next. It must be the version
    /// that refused the write, or one stored after it.
    pub fn with_current(mut self, current: DownloadResponse) -> Self {
        self.current = Some(Box::new(current));
        self
    }

    /// The version attached by [`with_current`](Self::with_current): what
    /// storage held when it refused this compare-and-swap, or later.
    pub fn current(&self) -> Option<&DownloadResponse> {
        self.current.as_deref()
    }

    /// Takes the version attached by [`with_current`](Self::with_current).
    pub fn take_current(&mut self) -> Option<DownloadResponse> {
        self.current.take().map(|c| *c)
    }

    /// A copy for a second recipient: same kind, message, path, backend and
    /// attached version; the source is kept as text (sources cannot be
    /// cloned).
    pub fn duplicate(&self) -> Error {
        let mut e = Error::new(self.kind, self.message.clone());
        e.path.clone_from(&self.path);
        e.backend = self.backend;
        if let Some(source) = &self.source {
            e.source = Some(source.to_string().into());
        }
        e.current.clone_from(&self.current);
        e
    }

    /// True for the kinds a compare-and-swap loop retries:
    /// [`Aborted`](ErrorKind::Aborted),
    /// [`PreconditionFailed`](ErrorKind::PreconditionFailed),
    /// [`AlreadyExists`](ErrorKind::AlreadyExists) and
    /// [`TooEarly`](ErrorKind::TooEarly).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Aborted
                | ErrorKind::PreconditionFailed
                | ErrorKind::AlreadyExists
                | ErrorKind::TooEarly
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(backend) = self.backend {
            write!(f, "{backend}: ")?;
        }
        if let Some(path) = &self.path {
            write!(f, "{path:?}: ")?;
        }
        if self.message.is_empty() {
            f.write_str(self.kind.as_str())?;
        } else {
            f.write_str(&self.message)?;
        }
        if let Some(source) = &self.source {
            // Keep the one-line promise even if a driver's message spans lines.
            let text = source.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            if let Some(first) = lines.next() {
                write!(f, ": {first}")?;
                for line in lines {
                    write!(f, " {line}")?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(path) = &self.path {
            d.field("path", path);
        }
        if let Some(backend) = self.backend {
            d.field("backend", &backend);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        if let Some(current) = &self.current {
            d.field("current", current);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(ErrorKind::Codec, "invalid JSON").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_one_line_with_backend_path_and_source() {
        let io = std::io::Error::other("disk on fire\nsecond line");
        let e = Error::new(ErrorKind::Unavailable, "cannot write")
            .with_backend("disk")
            .with_path("users/alice.json")
            .with_source(io);
        let text = e.to_string();
        assert_eq!(
            text,
            "disk: \"users/alice.json\": cannot write: disk on fire second line"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn conflict_kinds() {
        for (kind, conflict) in [
            (ErrorKind::Aborted, true),
            (ErrorKind::PreconditionFailed, true),
            (ErrorKind::AlreadyExists, true),
            (ErrorKind::TooEarly, true),
            (ErrorKind::NotFound, false),
            (ErrorKind::Unavailable, false),
            (ErrorKind::Codec, false),
        ] {
            assert_eq!(Error::new(kind, "x").is_conflict(), conflict, "{kind:?}");
        }
    }
}

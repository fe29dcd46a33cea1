//! Hostile storage paths, property-based.
//!
//! Generated paths mix `..`, `.`, empty segments, leading and trailing `/`,
//! NUL and other control characters, backslashes, over-long segments (> 255
//! bytes) and paths (> 1024 bytes, also right at the limit), unicode (RTL and
//! bidi override marks, combining characters, emoji, BOM, line separators),
//! `%2e%2e`, names starting with `.mdcache` or containing `.tmp.`, the names
//! of the planted symlinks, and ordinary names.
//!
//! Each path is thrown at [`MemoryStorage`] and at a [`DiskStorage`] whose
//! root sits in an outer temp dir next to `outside/secret.txt`, with the
//! symlinks `root/link -> ../outside` and `root/filelink ->
//! ../outside/secret.txt` planted inside the root. Every operation is also
//! tried on `link/<path>` and on `filelink`. The test checks that nothing
//! panics, that errors have only the kinds a bad path may produce, that a bad
//! path is always `InvalidInput` and a path through a symlink always
//! `PermissionDenied`, that a successful upload reads back byte-identical,
//! and that nothing outside the root is ever created, changed or removed.
//!
//! The same strings are then used as [`Store`] keys (path
//! `docs/{key}.json`).
//!
//! Case generation is deterministic: a fixed ChaCha seed, no failure
//! persistence. The numbers of cases run and escapes found are printed with
//! `eprintln!` (`cargo test --test hostile_paths -- --nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use metadatacache::{
    DiskStorage, DownloadRequest, EntryKind, Error, ErrorKind, MemoryStorage, Options, RetryPolicy,
    Storage, Store, UploadRequest, parent, validate_path,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases of the storage-path property (each runs against both backends, on
/// the path, on `link/<path>` and on `filelink`).
const PATH_CASES: u32 = 2000;
/// Cases of the store-key property (each against both backends).
const KEY_CASES: u32 = 2000;
const SECRET: &[u8] = b"top secret: must never be read, changed or removed\n";

/// Error kinds a hostile path may produce. Never `Other` or `Unavailable`.
const ALLOWED: &[ErrorKind] = &[
    ErrorKind::InvalidInput,
    ErrorKind::PermissionDenied,
    ErrorKind::NotFound,
    ErrorKind::AlreadyExists,
    ErrorKind::PreconditionFailed,
];

fn runner(cases: u32, seed: u8) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: None,
        // Shrinking runs against shared, mutated storage; keep it bounded.
        max_shrink_iters: 256,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

// ---------------------------------------------------------------------------
// Strategies

fn ascii_name() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,10}(\\.json)?"
}

fn pick(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(items).prop_map(str::to_owned)
}

/// A control character: C0, DEL or C1 (everything `char::is_control`).
fn control_char() -> impl Strategy<Value = char> {
    prop_oneof![
        Just('\0'),
        prop::char::range('\u{1}', '\u{1f}'),
        Just('\u{7f}'),
        prop::char::range('\u{80}', '\u{9f}'),
    ]
}

fn unicode_piece() -> impl Strategy<Value = String> {
    pick(&[
        "\u{200f}",         // RIGHT-TO-LEFT MARK
        "\u{202e}",         // RIGHT-TO-LEFT OVERRIDE
        "\u{2066}",         // LEFT-TO-RIGHT ISOLATE
        "e\u{301}",         // e + COMBINING ACUTE
        "\u{301}",          // a lone combining mark
        "é",                // precomposed
        "😀",               // emoji (4 bytes)
        "👩\u{200d}💻",     // ZWJ sequence
        "\u{feff}",         // BOM / zero width no-break space
        "\u{2028}",         // LINE SEPARATOR
        "\u{ff0e}\u{ff0e}", // FULLWIDTH FULL STOPs
        "\u{2024}\u{2024}", // ONE DOT LEADERs
        "日本語",
        "ä ö",
        "\u{fffd}",
    ])
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => ascii_name(),
        2 => pick(&["..", ".", "", "...", ". .", " ..", ".. "]),
        2 => pick(&[
            "%2e%2e", "%2E%2E", "%2e", "..%2f..", "%2f", "%00", "%2e%2e%5c", "..;",
        ]),
        2 => (ascii_name(), control_char(), "[a-z]{0,3}")
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        1 => (prop::collection::vec(control_char(), 1..3))
            .prop_map(|cs| cs.into_iter().collect()),
        2 => pick(&["\\", "..\\..", "a\\b", "\\..", "C:\\x", "C:"]),
        // Around and over the 255-byte segment limit.
        1 => (250usize..262).prop_map(|n| "s".repeat(n)),
        1 => (126usize..130).prop_map(|n| "é".repeat(n)),
        1 => (62usize..66).prop_map(|n| "😀".repeat(n)),
        3 => (prop::collection::vec(unicode_piece(), 1..4), "[a-z]{0,3}")
            .prop_map(|(ps, s)| format!("{}{s}", ps.concat())),
        2 => ("[a-z._-]{0,6}")
            .prop_map(|s| format!(".mdcache{s}")),
        2 => ("\\.?[a-z]{0,5}", "[0-9a-z.]{0,8}")
            .prop_map(|(a, b)| format!("{a}.tmp.{b}")),
        2 => pick(&[
            "link", "filelink", "outside", "secret.txt", ".mdcache", "locks", "00",
            ".hidden", "a.mdcache", "x.tmp.y", " ", "a ", "-", "~", "*", "?", ":",
        ]),
    ]
}

/// A path built from hostile segments, or an over-long one.
fn hostile_path() -> impl Strategy<Value = String> {
    let joined = (
        prop::bool::weighted(0.1),
        prop::collection::vec(segment(), 1..6),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(lead, segs, trail)| {
            let mut p = segs.join("/");
            if lead {
                p.insert(0, '/');
            }
            if trail {
                p.push('/');
            }
            p
        });
    prop_oneof![
        12 => joined,
        1 => pick(&["", "/", "//", "./", "../", "a/./b", "a/../b", "../outside/secret.txt",
                    "link/secret.txt", "link/../outside/secret.txt", "filelink/x",
                    "link", "filelink", "outside/secret.txt"]),
        // Valid segments adding up to just under, at and over 1024 bytes.
        1 => (1010usize..1040).prop_map(|n| {
            let mut p = String::new();
            while p.len() + 101 < n {
                p.push_str(&"d".repeat(100));
                p.push('/');
            }
            p.push_str(&"f".repeat(n - p.len()));
            p
        }),
        // Many short segments, far over the limit.
        1 => (520usize..700).prop_map(|n| "a/".repeat(n) + "b"),
    ]
}

// ---------------------------------------------------------------------------
// The environment: both storages, the planted symlinks, the escape check

struct Env {
    rt: tokio::runtime::Runtime,
    memory: Arc<dyn Storage>,
    disk: Arc<dyn Storage>,
    _outer_guard: tempfile::TempDir,
    outer: PathBuf,
    root: PathBuf,
    outside: PathBuf,
    /// Per-case escape check results: (case label, what was wrong).
    escapes: RefCell<Vec<(String, String)>>,
}

impl Env {
    fn new() -> Env {
        let outer_guard = tempfile::tempdir().unwrap();
        let outer = outer_guard.path().to_path_buf();
        let root = outer.join("root");
        let outside = outer.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
        let disk = DiskStorage::open(&root).unwrap();
        symlink("../outside", root.join("link")).unwrap();
        symlink("../outside/secret.txt", root.join("filelink")).unwrap();
        // The symlinks do lead outside when followed.
        assert_eq!(std::fs::read(root.join("filelink")).unwrap(), SECRET);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Env {
            rt,
            memory: Arc::new(MemoryStorage::new()),
            disk: Arc::new(disk),
            _outer_guard: outer_guard,
            outer,
            root,
            outside,
            escapes: RefCell::new(Vec::new()),
        }
    }

    /// Cheap check after every case: the outer dir holds exactly `root` and
    /// `outside`, `outside` exactly the unchanged `secret.txt`, and the
    /// planted symlinks are still the same symlinks.
    fn check_confined(&self, label: &str) {
        let mut problems = Vec::new();
        let names = |dir: &Path| -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let outer = names(&self.outer);
        if outer != BTreeSet::from(["outside".to_owned(), "root".to_owned()]) {
            problems.push(format!("outer dir holds {outer:?}"));
        }
        let outside = names(&self.outside);
        if outside != BTreeSet::from(["secret.txt".to_owned()]) {
            problems.push(format!("outside/ holds {outside:?}"));
        }
        match std::fs::read(self.outside.join("secret.txt")) {
            Ok(c) if c == SECRET => {}
            Ok(_) => problems.push("secret.txt changed".into()),
            Err(e) => problems.push(format!("secret.txt unreadable: {e}")),
        }
        for (link, target) in [
            ("link", "../outside"),
            ("filelink", "../outside/secret.txt"),
        ] {
            match std::fs::read_link(self.root.join(link)) {
                Ok(t) if t == Path::new(target) => {}
                other => problems.push(format!("root/{link} is now {other:?}")),
            }
        }
        if !problems.is_empty() {
            self.escapes
                .borrow_mut()
                .push((label.to_owned(), problems.join("; ")));
        }
    }

    /// The full walk at the end: every entry of the outer dir outside the
    /// root, without following symlinks.
    fn entries_outside_root(&self) -> BTreeSet<PathBuf> {
        fn walk(dir: &Path, base: &Path, skip: &Path, out: &mut BTreeSet<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                out.insert(path.strip_prefix(base).unwrap().to_path_buf());
                if path == skip {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    walk(&path, base, skip, out);
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.outer, &self.outer, &self.root, &mut out);
        out
    }
}

// ---------------------------------------------------------------------------
// Checking one path against one storage

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Memory,
    Disk,
}

/// The disk backend's reserved-name rule (see `DiskStorage`'s docs).
fn reserved_on_disk(path: &str) -> bool {
    path.split('/')
        .any(|s| s.starts_with(".mdcache") || (s.starts_with('.') && s.contains(".tmp.")))
}

/// What an operation on `path` must answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// `InvalidInput`, nothing else.
    Invalid,
    /// `PermissionDenied`: the path runs into a planted symlink.
    Symlink,
    /// Success or one of [`ALLOWED`].
    Allowed,
}

fn expectation(backend: Backend, path: &str, allow_root: bool) -> Expect {
    if validate_path(path, allow_root).is_err()
        || (backend == Backend::Disk && reserved_on_disk(path))
    {
        return Expect::Invalid;
    }
    let first = path.split('/').next().unwrap_or("");
    if backend == Backend::Disk && (first == "link" || first == "filelink") {
        return Expect::Symlink;
    }
    Expect::Allowed
}

/// Checks `res` of operation `op` on `path` against `expect`; `Ok(true)` when
/// the operation succeeded.
fn check<T>(
    backend: Backend,
    op: &str,
    path: &str,
    expect: Expect,
    res: &Result<T, Error>,
) -> Result<bool, TestCaseError> {
    let ctx = || format!("{backend:?} {op}({path:?})");
    match (expect, res) {
        (Expect::Invalid, Err(e)) => {
            prop_assert_eq!(e.kind(), ErrorKind::InvalidInput, "{}: {}", ctx(), e);
            Ok(false)
        }
        (Expect::Symlink, Err(e)) => {
            prop_assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{}: {}", ctx(), e);
            Ok(false)
        }
        (Expect::Allowed, Err(e)) => {
            prop_assert!(
                ALLOWED.contains(&e.kind()),
                "{}: unexpected kind {:?}: {}",
                ctx(),
                e.kind(),
                e
            );
            Ok(false)
        }
        (Expect::Invalid | Expect::Symlink, Ok(_)) => Err(TestCaseError::fail(format!(
            "{}: succeeded, expected {expect:?}",
            ctx()
        ))),
        (Expect::Allowed, Ok(_)) => Ok(true),
    }
}

/// Which hostile features generated paths had, to show the mix is real.
#[derive(Default, Debug)]
struct Mix {
    over_1024: u64,
    segment_over_255: u64,
    control: u64,
    nul: u64,
    backslash: u64,
    dot_segment: u64,
    empty_segment: u64,
    absolute: u64,
    non_ascii: u64,
    bidi_or_combining: u64,
    percent: u64,
    reserved: u64,
    symlink_name: u64,
    valid: u64,
}

impl Mix {
    fn add(&mut self, p: &str) {
        let segs: Vec<&str> = p.split('/').collect();
        let mut count = |hit: bool, c: fn(&mut Mix) -> &mut u64| {
            if hit {
                *c(self) += 1;
            }
        };
        count(p.len() > 1024, |m| &mut m.over_1024);
        count(segs.iter().any(|s| s.len() > 255), |m| {
            &mut m.segment_over_255
        });
        count(p.chars().any(char::is_control), |m| &mut m.control);
        count(p.contains('\0'), |m| &mut m.nul);
        count(p.contains('\\'), |m| &mut m.backslash);
        count(segs.iter().any(|s| *s == "." || *s == ".."), |m| {
            &mut m.dot_segment
        });
        count(!p.is_empty() && segs.iter().any(|s| s.is_empty()), |m| {
            &mut m.empty_segment
        });
        count(p.starts_with('/'), |m| &mut m.absolute);
        count(!p.is_ascii(), |m| &mut m.non_ascii);
        count(
            p.chars()
                .any(|c| matches!(c, '\u{200f}' | '\u{202e}' | '\u{2066}' | '\u{301}')),
            |m| &mut m.bidi_or_combining,
        );
        count(p.contains('%'), |m| &mut m.percent);
        count(reserved_on_disk(p), |m| &mut m.reserved);
        count(matches!(segs[0], "link" | "filelink"), |m| {
            &mut m.symlink_name
        });
        count(validate_path(p, false).is_ok(), |m| &mut m.valid);
    }

    fn all_hit(&self) -> bool {
        let s = format!("{self:?}");
        !s.contains(": 0,") && !s.contains(": 0 ")
    }
}

#[derive(Default)]
struct Tally {
    ops: Cell<u64>,
    round_trips: Cell<u64>,
    invalid: Cell<u64>,
    symlink: Cell<u64>,
}

impl Tally {
    fn bump(c: &Cell<u64>) {
        c.set(c.get() + 1);
    }
}

/// Every operation on `path`; a successful upload must read back
/// byte-identical and be listed.
async fn exercise(
    storage: &dyn Storage,
    backend: Backend,
    path: &str,
    content: &Bytes,
    mkdir: bool,
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let file_exp = expectation(backend, path, false);
    let dir_exp = expectation(backend, path, true);
    match file_exp {
        Expect::Invalid => Tally::bump(&tally.invalid),
        Expect::Symlink => Tally::bump(&tally.symlink),
        Expect::Allowed => {}
    }
    let op = |ok: Result<bool, TestCaseError>| {
        Tally::bump(&tally.ops);
        ok
    };

    let up = storage
        .upload(UploadRequest::new(path, content.clone()))
        .await;
    let uploaded = op(check(backend, "upload", path, file_exp, &up))?;
    if let Ok(up) = &up {
        prop_assert!(validate_path(path, false).is_ok());
        let down = storage.download(DownloadRequest::new(path)).await;
        let down = match down {
            Ok(d) => d,
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "{backend:?}: uploaded {path:?} but download failed: {e}"
                )));
            }
        };
        prop_assert_eq!(
            &down.content,
            content,
            "{:?} {:?} read back differs",
            backend,
            path
        );
        prop_assert_eq!(
            &down.etag,
            &up.etag,
            "{:?} {:?} etag differs",
            backend,
            path
        );
        let info = storage.stat(path).await;
        let info = info.map_err(|e| TestCaseError::fail(format!("stat after upload: {e}")))?;
        prop_assert_eq!(info.kind, EntryKind::File);
        prop_assert_eq!(info.size, content.len() as u64);
        prop_assert_eq!(info.etag.as_deref(), Some(up.etag.as_str()));
        let listed = storage.list_dir(parent(path)).await;
        let listed = listed.map_err(|e| TestCaseError::fail(format!("list after upload: {e}")))?;
        prop_assert!(
            listed.iter().any(|i| i.path == path && i.is_file()),
            "{:?}: {:?} not listed in its parent",
            backend,
            path
        );
        Tally::bump(&tally.round_trips);
    }

    let create_only = UploadRequest {
        if_none_match: vec!["*".into()],
        ..UploadRequest::new(path, content.clone())
    };
    let res = storage.upload(create_only).await;
    op(check(backend, "upload(create)", path, file_exp, &res))?;
    if uploaded {
        prop_assert_eq!(
            res.as_ref().err().map(Error::kind),
            Some(ErrorKind::AlreadyExists),
            "{:?} create-only over an existing {:?}",
            backend,
            path
        );
    }

    let if_match = UploadRequest {
        if_match: Some("no-such-etag".into()),
        ..UploadRequest::new(path, "x")
    };
    let res = storage.upload(if_match).await;
    op(check(backend, "upload(if_match)", path, file_exp, &res))?;
    prop_assert!(
        res.is_err(),
        "{:?}: if_match a bogus etag succeeded on {:?}",
        backend,
        path
    );

    let res = storage.download(DownloadRequest::new(path)).await;
    op(check(backend, "download", path, file_exp, &res))?;
    let res = storage.stat(path).await;
    op(check(backend, "stat", path, dir_exp, &res))?;
    let res = storage.list_dir(path).await;
    op(check(backend, "list_dir", path, dir_exp, &res))?;
    let res = storage.read_dir(path).await;
    op(check(backend, "read_dir", path, dir_exp, &res))?;

    let res = storage.delete_if_match(path, Some("no-such-etag")).await;
    op(check(backend, "delete_if_match", path, file_exp, &res))?;
    prop_assert!(res.is_err());
    let res = storage.delete(path).await;
    op(check(backend, "delete", path, file_exp, &res))?;
    if uploaded {
        prop_assert!(
            res.is_ok(),
            "{:?}: delete of uploaded {:?}: {:?}",
            backend,
            path,
            res
        );
        let gone = storage.download(DownloadRequest::new(path)).await;
        prop_assert_eq!(gone.err().map(|e| e.kind()), Some(ErrorKind::NotFound));
    }

    if mkdir || !matches!(dir_exp, Expect::Allowed) {
        let res = storage.make_dir_if_not_exist(path).await;
        let made = op(check(backend, "make_dir_if_not_exist", path, dir_exp, &res))?;
        if made {
            let info = storage.stat(path).await;
            let info = info.map_err(|e| TestCaseError::fail(format!("stat after mkdir: {e}")))?;
            prop_assert_eq!(info.kind, EntryKind::Dir, "{:?} {:?}", backend, path);
            // Idempotent.
            prop_assert!(storage.make_dir_if_not_exist(path).await.is_ok());
        }
    }
    Ok(())
}

#[test]
fn hostile_storage_paths() {
    let env = Env::new();
    let tally = Tally::default();
    let mix = RefCell::new(Mix::default());
    let cases = Cell::new(0u32);
    let started = Instant::now();
    let strategy = (
        hostile_path(),
        prop::collection::vec(any::<u8>(), 0..48),
        prop::bool::weighted(0.3),
    );
    let result = runner(PATH_CASES, 0x5a).run(&strategy, |(path, content, mkdir)| {
        cases.set(cases.get() + 1);
        mix.borrow_mut().add(&path);
        let content = Bytes::from(content);
        let label = format!("case {} {path:?}", cases.get());
        let res = env.rt.block_on(async {
            let linked = format!("link/{path}");
            for (storage, backend) in [(&env.memory, Backend::Memory), (&env.disk, Backend::Disk)] {
                for p in [path.as_str(), linked.as_str(), "filelink"] {
                    exercise(storage.as_ref(), backend, p, &content, mkdir, &tally).await?;
                }
            }
            Ok::<_, TestCaseError>(())
        });
        env.check_confined(&label);
        res
    });

    // Whatever happened, nothing may have left the root.
    let outside = env.entries_outside_root();
    let expected: BTreeSet<PathBuf> = ["root", "outside", "outside/secret.txt"]
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let escapes = env.escapes.borrow();
    eprintln!(
        "hostile_paths: {} path cases ({} configured) in {:.1?}: {} operations, \
         {} byte-identical round trips, {} invalid-path and {} through-symlink \
         checks; escapes found: {}",
        cases.get(),
        PATH_CASES,
        started.elapsed(),
        tally.ops.get(),
        tally.round_trips.get(),
        tally.invalid.get(),
        tally.symlink.get(),
        escapes.len(),
    );
    let mix = mix.into_inner();
    eprintln!("hostile_paths: generated mix: {mix:?}");
    assert_eq!(outside, expected, "entries outside the root changed");
    assert!(escapes.is_empty(), "escapes: {escapes:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        tally.round_trips.get() > 100,
        "too few valid paths generated"
    );
    assert!(tally.invalid.get() > 100, "too few invalid paths generated");
    assert!(
        mix.all_hit(),
        "a kind of hostile path was never generated: {mix:?}"
    );
}

// ---------------------------------------------------------------------------
// The same strings as Store keys

fn key_expectation(backend: Backend, path: &str) -> Expect {
    if validate_path(path, false).is_err() || (backend == Backend::Disk && reserved_on_disk(path)) {
        Expect::Invalid
    } else {
        Expect::Allowed
    }
}

async fn exercise_store(
    store: &Store<String, u64>,
    backend: Backend,
    key: &str,
    retried: &RefCell<Vec<String>>,
) -> Result<(), TestCaseError> {
    let path = format!("docs/{key}.json");
    let exp = key_expectation(backend, &path);
    let k = key.to_owned();
    // One task, one key: nothing can conflict, so any retry means an error
    // was taken for a conflict (a key that can never be written retried
    // until the attempts ran out).
    let retries = store.stats().retries;
    let res = store.update(k.clone(), true, |n| Ok((n + 1, true))).await;
    let updated = check(backend, "Store::update", &path, exp, &res)?;
    if store.stats().retries != retries {
        retried.borrow_mut().push(format!(
            "{backend:?} update({key:?}): {} retries, {res:?}",
            store.stats().retries - retries
        ));
    }
    let got = store.get(k.clone()).await;
    check(backend, "Store::get", &path, exp, &got)?;
    if updated {
        prop_assert!(matches!(&got, Ok(Some(n)) if **n >= 1), "{:?}", got);
    }
    let mut g = store.lock(k.clone()).await;
    let got = g.get().await;
    check(backend, "KeyGuard::get", &path, exp, &got)?;
    drop(g);
    let removed = store.remove(k.clone()).await;
    check(backend, "Store::remove", &path, exp, &removed)?;
    if updated {
        prop_assert!(matches!(removed, Ok(true)), "{:?}", removed);
    }
    prop_assert_eq!(
        store.locked_keys(),
        0,
        "lock table not empty after {:?}",
        key
    );
    Ok(())
}

#[test]
fn hostile_store_keys() {
    let env = Env::new();
    // Few, immediate retries: see the report on keys below a document.
    let options = |storage: &Arc<dyn Storage>| {
        Options::new(Arc::clone(storage), |k: &String| format!("docs/{k}.json"))
            .init(|| 0u64)
            .retries(3)
            .retry_policy(RetryPolicy::immediate())
    };
    let memory = Store::new(options(&env.memory));
    let disk = Store::new(options(&env.disk));
    let cases = Cell::new(0u32);
    let retried = RefCell::new(Vec::new());
    let started = Instant::now();
    let result = runner(KEY_CASES, 0xa5).run(&hostile_path(), |key| {
        cases.set(cases.get() + 1);
        let label = format!("key case {} {key:?}", cases.get());
        let res = env.rt.block_on(async {
            exercise_store(&memory, Backend::Memory, &key, &retried).await?;
            exercise_store(&disk, Backend::Disk, &key, &retried).await
        });
        env.check_confined(&label);
        res
    });
    let escapes = env.escapes.borrow();
    eprintln!(
        "hostile_paths: {} store-key cases ({} configured) in {:.1?}; escapes found: {}",
        cases.get(),
        KEY_CASES,
        started.elapsed(),
        escapes.len(),
    );
    assert!(escapes.is_empty(), "escapes: {escapes:#?}");
    if let Err(e) = result {
        panic!("{e}");
    }
    let retried = retried.borrow();
    assert!(
        retried.is_empty(),
        "updates retried without a conflict: {retried:#?}"
    );
}

/// A key whose path runs below an existing document (`docs/a` is a document,
/// the key `a/b` maps to `docs/a/b`) can never be created. Today that fails
/// with `AlreadyExists` from `make_dir_if_not_exist`, which `update` treats
/// as a conflict: it retried `retries` times (100 by default, ~7 s with the
/// default backoff). It must fail at once with a non-conflict kind, the way
/// `Storage::upload` answers `InvalidInput` ("parent is a document").
#[test]
fn key_below_a_document_is_not_a_conflict() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let disk: Arc<dyn Storage> = Arc::new(DiskStorage::open(dir.path()).unwrap());
        let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        for storage in [memory, disk] {
            let backend = storage.backend();
            let store: Store<String, u64> = Store::new(
                Options::new(storage, |k: &String| format!("docs/{k}"))
                    .init(|| 0)
                    .retries(5)
                    .retry_policy(RetryPolicy::immediate()),
            );
            store
                .update("a".into(), true, |n| Ok((n + 1, true)))
                .await
                .unwrap();
            let err = store
                .update("a/b".into(), true, |n| Ok((n + 1, true)))
                .await
                .unwrap_err();
            assert!(!err.is_conflict(), "{backend}: {:?}: {err}", err.kind());
            assert_eq!(store.stats().conflicts, 0, "{backend}: {err}");
        }
    });
}

//! Real servers for the backend tests, started on 127.0.0.1 with free ports
//! in a temporary directory and stopped by PID.
//!
//! A missing server binary fails the test with a message saying what to
//! install, so that no run can pass by skipping. A user who cannot install
//! a server opts out explicitly with `MDCACHE_SKIP_SERVERS=1`: then the
//! tests that need it print that they skipped.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// moto's S3 server on 127.0.0.1:PORT (argv[1]), without threads.
const MOTO_SINGLE_THREADED: &str = "import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Etcd,
    Postgres,
    Moto,
    Azurite,
    Nats,
}

/// A running (or stopped) test server.
#[derive(Debug)]
pub struct Server {
    kind: Kind,
    addr: String,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    pid: Option<u32>,
    /// More command-line arguments for the server (NATS: credentials).
    args: Vec<String>,
    /// TLS on the client port, when the server speaks it.
    tls: Option<ServerTls>,
    /// etcd: this member's name and `--initial-cluster`, for one member of
    /// a cluster (`None`: a cluster of its own).
    member: Option<(String, String)>,
    /// How long the log was when the server last started: what it says
    /// after that is about this run.
    log_start: usize,
}

/// What a TLS server presents and whom it accepts: it requires a client
/// certificate signed by `ca`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA that client certificates must chain to.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// True when the user opted out of tests whose server is missing.
pub fn skipping_allowed() -> bool {
    std::env::var("MDCACHE_SKIP_SERVERS").is_ok_and(|v| v == "1")
}

/// A server (or tool) is missing: fail, naming what to install, unless the
/// user opted out with `MDCACHE_SKIP_SERVERS=1`.
pub fn missing(what: &str) {
    assert!(
        skipping_allowed(),
        "{what} is not installed: install it (scripts/test does, as root on Debian), or set \
         MDCACHE_SKIP_SERVERS=1 to skip the tests that need it"
    );
    eprintln!("SKIPPED (MDCACHE_SKIP_SERVERS=1): {what} is not installed");
}

fn skip(what: &str) -> Option<Server> {
    missing(what);
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn which(bin: &str) -> Option<PathBuf> {
    if bin.contains('/') {
        return Path::new(bin).is_file().then(|| PathBuf::from(bin));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    // SAFETY-free check: root owns /proc/self when we are root.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
}

/// Starts etcd, or skips.
pub fn etcd() -> Option<Server> {
    if which("etcd").is_none() {
        return skip("etcd (Debian package etcd-server)");
    }
    let mut s = Server::new(Kind::Etcd);
    s.start();
    Some(s)
}

/// Starts etcd speaking only TLS on its client port (`--client-cert-auth`:
/// every client must show a certificate signed by `tls.ca`), or skips.
pub fn etcd_tls(tls: &ServerTls) -> Option<Server> {
    if which("etcd").is_none() {
        return skip("etcd (Debian package etcd-server)");
    }
    let mut s = Server::new(Kind::Etcd);
    s.tls = Some(tls.clone());
    s.start();
    Some(s)
}

/// Starts a cluster of `n` etcd members (plain HTTP), or skips. The
/// members start together and are ready once they have elected a leader.
pub fn etcd_cluster(n: usize) -> Option<Vec<Server>> {
    if which("etcd").is_none() {
        skip("etcd (Debian package etcd-server)");
        return None;
    }
    let mut members: Vec<Server> = (0..n).map(|_| Server::new(Kind::Etcd)).collect();
    let cluster = members
        .iter()
        .enumerate()
        .map(|(i, m)| format!("m{i}=http://127.0.0.1:{}", m.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    for (i, m) in members.iter_mut().enumerate() {
        m.member = Some((format!("m{i}"), cluster.clone()));
        m.spawn();
    }
    for m in &mut members {
        m.wait_ready();
    }
    Some(members)
}

/// Starts PostgreSQL 15 (user postgres, trust auth), or skips.
pub fn postgres() -> Option<Server> {
    postgres_with(None)
}

/// Starts PostgreSQL 15 with `ssl=on` that accepts only TLS connections
/// from 127.0.0.1 with a client certificate signed by `tls.ca` (user
/// postgres, no password), or skips.
pub fn postgres_tls(tls: &ServerTls) -> Option<Server> {
    postgres_with(Some(tls))
}

fn postgres_with(tls: Option<&ServerTls>) -> Option<Server> {
    if which(&format!("{PG_BIN}/initdb")).is_none() {
        return skip("PostgreSQL 15 (Debian package postgresql)");
    }
    let mut s = Server::new(Kind::Postgres);
    let data = s.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // The server runs as user postgres when we are root (initdb refuses root).
    if is_root() {
        chmod(s.dir.path(), 0o755);
        chown_postgres(&data);
    }
    let status = pg_command("initdb")
        .args([
            "-D",
            data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
        ])
        .stdout(Stdio::null())
        .stderr(log_file(s.dir.path(), "initdb.log"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "initdb failed: see {}",
        s.dir.path().display()
    );
    if let Some(tls) = tls {
        s.tls = Some(postgres_tls_files(&data, tls));
    }
    s.start();
    Some(s)
}

/// Copies the server's TLS files into its data directory, owned by the
/// server's user with the modes PostgreSQL insists on, and lets in only
/// TLS connections with a client certificate.
fn postgres_tls_files(data: &Path, tls: &ServerTls) -> ServerTls {
    let copy = |from: &Path, name: &str| {
        let to = data.join(name);
        std::fs::copy(from, &to).unwrap();
        chmod(&to, 0o600);
        to
    };
    let files = ServerTls {
        ca: copy(&tls.ca, "tls-ca.pem"),
        cert: copy(&tls.cert, "tls-cert.pem"),
        key: copy(&tls.key, "tls-key.pem"),
    };
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n\
         hostnossl all all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    if is_root() {
        chown_postgres(data);
    }
    files
}

/// Starts the moto S3 server, or skips.
pub fn moto() -> Option<Server> {
    if which("moto_server").is_none() {
        return skip("moto_server (PyPI moto[server])");
    }
    let mut s = Server::new(Kind::Moto);
    s.start();
    Some(s)
}

/// Azurite's well-known development account, which every Azurite serves.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";

/// The key of [`AZURITE_ACCOUNT`], published with Azurite.
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Starts Azurite's blob service, or skips.
pub fn azurite() -> Option<Server> {
    if which("azurite-blob").is_none() {
        return skip("azurite-blob (npm package azurite)");
    }
    let mut s = Server::new(Kind::Azurite);
    s.start();
    Some(s)
}

/// Starts nats-server with JetStream (its store in the server's temporary
/// directory), or skips.
pub fn nats() -> Option<Server> {
    nats_with(&[])
}

/// Starts nats-server with JetStream and the extra command-line `args`
/// (`--user u --pass p`, `--auth token`), or skips.
pub fn nats_with(args: &[&str]) -> Option<Server> {
    if which("nats-server").is_none() {
        return skip("nats-server (Debian package nats-server)");
    }
    let mut s = Server::new(Kind::Nats);
    s.args = args.iter().map(|a| (*a).to_owned()).collect();
    s.start();
    Some(s)
}

/// Creates a bucket on a moto server (moto accepts unsigned requests).
pub fn create_bucket(addr: &str, bucket: &str) {
    let (status, body) = http(addr, "PUT", &format!("/{bucket}"));
    assert!(
        status == 200 || body.contains("BucketAlreadyOwnedByYou"),
        "create bucket {bucket}: HTTP {status}: {body}"
    );
}

fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    let _ = conn.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_postgres(p: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(status.success(), "chown postgres {}", p.display());
}

fn pg_command(tool: &str) -> Command {
    let bin = format!("{PG_BIN}/{tool}");
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &bin]);
        c
    } else {
        Command::new(bin)
    }
}

impl Server {
    fn new(kind: Kind) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("mdcache-server-")
            .tempdir()
            .unwrap();
        Server {
            kind,
            addr: format!("127.0.0.1:{}", free_port()),
            peer_port: free_port(),
            dir,
            child: None,
            pid: None,
            args: Vec::new(),
            tls: None,
            member: None,
            log_start: 0,
        }
    }

    /// `127.0.0.1:PORT` of the client port.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether documents survive [`stop`](Server::stop) and
    /// [`start`](Server::start): moto keeps them in memory and loses them;
    /// Azurite keeps them in its `--location` directory.
    pub fn keeps_data(&self) -> bool {
        self.kind != Kind::Moto
    }

    /// The port alone.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Starts the server (again, on the same port and data) and waits until
    /// it accepts connections.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Starts the server without waiting for it.
    fn spawn(&mut self) {
        assert!(self.pid.is_none(), "already running");
        let dir = self.dir.path().to_owned();
        self.log_start = std::fs::read(dir.join("etcd.log")).map_or(0, |log| log.len());
        match self.kind {
            Kind::Etcd => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let client = format!("{scheme}://{}", self.addr);
                let peer = format!("http://127.0.0.1:{}", self.peer_port);
                let (name, cluster) = self
                    .member
                    .clone()
                    .unwrap_or_else(|| ("test".to_owned(), format!("test={peer}")));
                let mut command = Command::new("etcd");
                if let Some(tls) = &self.tls {
                    command
                        .arg("--cert-file")
                        .arg(&tls.cert)
                        .arg("--key-file")
                        .arg(&tls.key)
                        .arg("--trusted-ca-file")
                        .arg(&tls.ca)
                        .arg("--client-cert-auth");
                }
                let child = command
                    .args(["--name", &name, "--data-dir"])
                    .arg(dir.join("etcd"))
                    .args([
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                    ])
                    .args([
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                    ])
                    .args(["--initial-cluster", &cluster])
                    .stdin(Stdio::null())
                    .stdout(log_file(&dir, "etcd.log"))
                    .stderr(log_file(&dir, "etcd.log"))
                    .spawn()
                    .expect("start etcd");
                self.pid = Some(child.id());
                self.child = Some(child);
            }
            Kind::Moto => {
                // One request at a time: moto checks If-Match and then
                // writes without a lock, so its threaded server (what
                // `moto_server` runs) lets two conditional puts on one etag
                // both win now and then.
                let child = Command::new("python3")
                    .args(["-c", MOTO_SINGLE_THREADED, &self.port().to_string()])
                    .stdin(Stdio::null())
                    .stdout(log_file(&dir, "moto.log"))
                    .stderr(log_file(&dir, "moto.log"))
                    .spawn()
                    .expect("start moto_server");
                self.pid = Some(child.id());
                self.child = Some(child);
            }
            Kind::Azurite => {
                // No telemetry (it would leave the machine); path-style
                // URLs only (the account is the first path segment).
                let child = Command::new("azurite-blob")
                    .args(["--blobHost", "127.0.0.1", "--blobPort"])
                    .arg(self.port().to_string())
                    .arg("--location")
                    .arg(dir.join("azurite"))
                    .args([
                        "--silent",
                        "--disableTelemetry",
                        "--disableProductStyleUrl",
                        "--skipApiVersionCheck",
                    ])
                    .stdin(Stdio::null())
                    .stdout(log_file(&dir, "azurite.log"))
                    .stderr(log_file(&dir, "azurite.log"))
                    .spawn()
                    .expect("start azurite-blob");
                self.pid = Some(child.id());
                self.child = Some(child);
            }
            Kind::Nats => {
                // The monitoring port (`-m`) answers the readiness check.
                let child = Command::new("nats-server")
                    .args(["-js", "-a", "127.0.0.1", "-p", &self.port().to_string()])
                    .args(["-m", &self.peer_port.to_string(), "-sd"])
                    .arg(dir.join("jetstream"))
                    .args(&self.args)
                    .stdin(Stdio::null())
                    .stdout(log_file(&dir, "nats.log"))
                    .stderr(log_file(&dir, "nats.log"))
                    .spawn()
                    .expect("start nats-server");
                self.pid = Some(child.id());
                self.child = Some(child);
            }
            Kind::Postgres => {
                let data = dir.join("data");
                let mut opts = format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                    self.port(),
                    data.display()
                );
                if let Some(tls) = &self.tls {
                    opts += &format!(
                        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={}",
                        tls.cert.display(),
                        tls.key.display(),
                        tls.ca.display()
                    );
                }
                let status = pg_command("pg_ctl")
                    .args(["-D", data.to_str().unwrap(), "-o", &opts, "-l"])
                    .arg(data.join("server.log"))
                    .args(["-w", "-t", "60", "start"])
                    .stdout(Stdio::null())
                    .stderr(log_file(&dir, "pg_ctl.log"))
                    .status()
                    .unwrap();
                assert!(
                    status.success(),
                    "pg_ctl start failed: see {}",
                    dir.display()
                );
                let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
                self.pid = pidfile.lines().next().and_then(|l| l.trim().parse().ok());
            }
        }
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up =
                TcpStream::connect_timeout(&self.addr.parse().unwrap(), Duration::from_millis(200))
                    .is_ok();
            let healthy = up
                && match self.kind {
                    // Plain HTTP cannot ask a TLS server; its log says it.
                    Kind::Etcd if self.tls.is_some() => {
                        std::fs::read(self.dir.path().join("etcd.log")).is_ok_and(|log| {
                            String::from_utf8_lossy(&log[self.log_start.min(log.len())..])
                                .contains("ready to serve client requests")
                        })
                    }
                    Kind::Etcd => http(&self.addr, "GET", "/health").1.contains("true"),
                    Kind::Moto => http(&self.addr, "GET", "/").0 != 0,
                    Kind::Azurite => http(&self.addr, "GET", "/devstoreaccount1?comp=list").0 != 0,
                    Kind::Nats => {
                        let monitor = format!("127.0.0.1:{}", self.peer_port);
                        TcpStream::connect(&monitor).is_ok()
                            && http(&monitor, "GET", "/healthz").1.contains("ok")
                    }
                    Kind::Postgres => true,
                };
            if healthy {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{:?} exited with {status} while starting; logs in {}",
                    self.kind,
                    self.dir.path().display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{:?} not ready after 60 s; logs in {}",
                self.kind,
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the server at once with SIGKILL, as a crash would, and waits
    /// until it is gone.
    pub fn crash(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        self.stop();
    }

    /// Stops the server by PID (its data stays, except moto's, which lives
    /// in memory) and waits until it is gone.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        // SIGINT is PostgreSQL's "fast" shutdown; etcd, moto, nats-server and
        // Azurite (saving its data) exit on it too.
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if Path::new(&format!("/proc/{pid}")).exists() && self.child.is_none() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The port must be free before a restart.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&self.addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Server {
    /// Kills the server with SIGKILL (no shutdown of its own; what it
    /// acknowledged is in its files) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        self.stop();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

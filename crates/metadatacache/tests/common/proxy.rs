//! A TCP proxy that injects the faults of a real network between a client
//! and a real server, on 127.0.0.1 with a free port.
//!
//! The storage wrappers of the `testing` feature fail calls before or after
//! they reach a backend; they cannot make a request reach the server *after*
//! the client gave up on it, nor lose a reply of a statement the server did
//! run. This proxy does both, at the byte level, against the real servers:
//!
//! * [`Proxy::stall_writes`]: on an HTTP/2 (gRPC, etcd) connection, holds
//!   back the DATA frames of a request and drops its RST_STREAM, so the
//!   client times out while the request is still on its way and later lands
//!   at the server anyway.
//! * [`Proxy::hold_replies`]: holds everything the server sends on the
//!   connections open now, so statements run but their replies never come
//!   (PostgreSQL); [`Proxy::release_replies`] delivers or discards them.
//! * [`Proxy::cut`]: resets the connections open now.
//!
//! A connection that starts with the HTTP/2 preface is read frame by frame;
//! any other is forwarded as plain bytes. Server→client bytes are never
//! parsed. Dropping the proxy stops it: its listener and every connection
//! task are dropped with the accept task.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// What an HTTP/2 client sends before its first frame.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length (3 bytes), type, flags, stream id (4 bytes).
const FRAME_HEADER: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// What [`Proxy::release_replies`] does with the replies it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Forward them, late, and carry on: the connection stays usable.
    Deliver,
    /// Throw them away and reset the connections: the replies are lost.
    Cut,
}

/// A running proxy; see the module documentation.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    accept: JoinHandle<()>,
}

/// What the proxy did so far, for tests to check that a fault happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections accepted (the next one's id: "open now" is "id below").
    pub connections: u64,
    /// Requests stalled, and stalled requests forwarded since.
    pub stalls: u64,
    pub releases: u64,
    /// RST_STREAM frames of stalled requests dropped.
    pub dropped_resets: u64,
    /// Reply bytes held back (delivered or not).
    pub held_reply_bytes: u64,
    /// PostgreSQL ReadyForQuery messages from the server: one per round
    /// trip of the extended protocol (counted by their bytes, so replies
    /// must not contain `Z\0\0\0\x05`).
    pub ready_for_query: u64,
}

/// State every connection task reads or counts into.
#[derive(Debug, Default)]
struct Shared {
    stall: Mutex<Option<Stall>>,
    counts: Mutex<Counts>,
}

impl Shared {
    fn count<T>(&self, f: impl FnOnce(&mut Counts) -> T) -> T {
        f(&mut self.counts.lock().unwrap())
    }
}

/// The armed write stall.
#[derive(Debug)]
struct Stall {
    marker: Vec<u8>,
    /// Requests still to stall; the marker keeps triggering releases at 0.
    remaining: usize,
    max_hold: Duration,
}

/// Per-connection switches, watched by every connection task so that a
/// change takes effect at once, even on a connection with no traffic.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Replies of connections with a lower id are held.
    hold_below: u64,
    /// Connections with a lower id are reset.
    cut_below: u64,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to
    /// `target` (`host:port`).
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (control, watcher) = watch::channel(Control::default());
        let (target, tasks_shared) = (target.to_owned(), Arc::clone(&shared));
        let accept = tokio::spawn(async move {
            // Owned here so that aborting this task drops every connection.
            let mut conns = JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let id = tasks_shared.count(|c| {
                    c.connections += 1;
                    c.connections - 1
                });
                let (target, shared) = (target.clone(), Arc::clone(&tasks_shared));
                conns.spawn(serve(id, client, target, shared, watcher.clone()));
            }
        });
        Proxy {
            addr,
            shared,
            control,
            accept,
        }
    }

    /// `127.0.0.1:PORT` to connect the client to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> Counts {
        *self.shared.counts.lock().unwrap()
    }

    /// Arms a stall of the next `count` HTTP/2 requests whose DATA frame
    /// contains `marker` (it must lie within one frame, as it does in a
    /// small request).
    ///
    /// A stalled request's DATA frames are held back and its RST_STREAM
    /// (sent when the client gives up) is dropped, while every other frame
    /// passes at once: the client's other calls on the same connection go
    /// on, and the HPACK state stays in step because HEADERS frames are
    /// never held or reordered. The held frames go to the server just
    /// before the next DATA frame containing `marker` on that connection (a
    /// late request landing right ahead of the client's next one), after
    /// `max_hold`, or when the client closes the connection, whichever
    /// comes first. Replaces an earlier stall; a stall in progress stays.
    pub fn stall_writes(&self, marker: &[u8], count: usize, max_hold: Duration) {
        assert!(
            !marker.is_empty(),
            "an empty marker would match every frame"
        );
        *self.shared.stall.lock().unwrap() = Some(Stall {
            marker: marker.to_vec(),
            remaining: count,
            max_hold,
        });
    }

    /// Holds back, from now on, whatever the server sends on the connections
    /// open now, while their requests still pass: the server runs a
    /// statement, the client never hears of it. Connections opened later
    /// pass both ways.
    pub fn hold_replies(&self) {
        let open = self.counts().connections;
        self.control.send_modify(|c| c.hold_below = open);
    }

    /// Ends [`hold_replies`](Self::hold_replies).
    pub fn release_replies(&self, how: Release) {
        let open = self.counts().connections;
        self.control.send_modify(|c| {
            c.hold_below = 0;
            if how == Release::Cut {
                c.cut_below = open;
            }
        });
    }

    /// Resets every connection open now (both ways, bytes in flight lost);
    /// later ones pass.
    pub fn cut(&self) {
        let open = self.counts().connections;
        self.control.send_modify(|c| c.cut_below = open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Forwards one connection until both sides close, an error, or a cut.
async fn serve(
    id: u64,
    mut client: TcpStream,
    target: String,
    shared: Arc<Shared>,
    control: watch::Receiver<Control>,
) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    // Small frames must not wait for Nagle's algorithm.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (from_client, to_client) = client.split();
    let (from_server, to_server) = server.split();
    let watcher = control.clone();
    let both = async {
        tokio::try_join!(
            requests(from_client, to_server, &shared),
            replies(id, from_server, to_client, &shared, watcher),
        )
    };
    tokio::select! {
        _ = both => {}
        () = cut(id, control) => {
            // A reset rather than an orderly close, as when a link dies.
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
    }
}

/// Returns once the connection `id` is to be cut (or the proxy is gone).
async fn cut(id: u64, mut control: watch::Receiver<Control>) {
    while id >= control.borrow_and_update().cut_below {
        if control.changed().await.is_err() {
            return;
        }
    }
}

/// Client→server: HTTP/2 frame by frame, anything else as bytes.
async fn requests(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shared: &Shared,
) -> io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    // Until the bytes stop looking like the preface (a PostgreSQL startup
    // message differs at the first byte, so nothing waits here).
    while buf.len() < PREFACE.len() {
        let n = from.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || !PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
            to.write_all(&buf).await?;
            if n > 0 {
                tokio::io::copy(&mut from, &mut to).await?;
            }
            return to.shutdown().await;
        }
    }
    to.write_all(PREFACE).await?;
    buf.drain(..PREFACE.len());
    let mut h2 = Http2::default();
    loop {
        let out = h2.frames(&mut buf, shared);
        to.write_all(&out).await?;
        tokio::select! {
            n = from.read(&mut chunk) => {
                let n = n?;
                if n == 0 {
                    // Sent bytes reach the server before the close does.
                    to.write_all(&h2.release(shared)).await?;
                    return to.shutdown().await;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            () = sleep_until(h2.release_at()) => to.write_all(&h2.release(shared)).await?,
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The client→server HTTP/2 state of one connection.
#[derive(Debug, Default)]
struct Http2 {
    /// The stalled stream, its held frames, and when they go at the latest.
    stalled: Option<u32>,
    held: Vec<u8>,
    deadline: Option<Instant>,
    /// Inside a HEADERS..CONTINUATION block, where no other frame may go.
    in_header_block: bool,
}

impl Http2 {
    /// Takes the complete frames off `buf` and returns the bytes to send
    /// now; a partial frame waits in `buf` for the rest.
    fn frames(&mut self, buf: &mut Vec<u8>, shared: &Shared) -> Vec<u8> {
        let (mut out, mut at) = (Vec::new(), 0);
        while buf.len() - at >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            let end = at + FRAME_HEADER + len;
            if buf.len() < end {
                break;
            }
            self.route(&buf[at..end], shared, &mut out);
            at = end;
        }
        buf.drain(..at);
        out
    }

    /// Appends `frame` to `out`, or holds or drops it.
    fn route(&mut self, frame: &[u8], shared: &Shared, out: &mut Vec<u8>) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let stalled = self.stalled == Some(stream);
        match kind {
            HEADERS | CONTINUATION => self.in_header_block = flags & END_HEADERS == 0,
            RST_STREAM if stalled => {
                shared.count(|c| c.dropped_resets += 1);
                return;
            }
            DATA if stalled => {
                self.held.extend_from_slice(frame);
                return;
            }
            DATA => {
                let mut stall = shared.stall.lock().unwrap();
                let payload = &frame[FRAME_HEADER..];
                if let Some(s) = stall.as_mut().filter(|s| contains(payload, &s.marker)) {
                    out.extend(self.release(shared));
                    if s.remaining > 0 {
                        s.remaining -= 1;
                        shared.count(|c| c.stalls += 1);
                        self.stalled = Some(stream);
                        self.deadline = Some(Instant::now() + s.max_hold);
                        self.held.extend_from_slice(frame);
                        return;
                    }
                }
            }
            _ => {}
        }
        out.extend_from_slice(frame);
    }

    /// When the held frames go unless the marker shows up first; never in
    /// the middle of a header block.
    fn release_at(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.in_header_block)
    }

    /// Ends the stall; returns the held frames.
    fn release(&mut self, shared: &Shared) -> Vec<u8> {
        if self.stalled.take().is_some() {
            shared.count(|c| c.releases += 1);
        }
        self.deadline = None;
        std::mem::take(&mut self.held)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Server→client, as bytes; held while the connection's replies are held
/// (its close too, behind them).
async fn replies(
    id: u64,
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shared: &Shared,
    mut control: watch::Receiver<Control>,
) -> io::Result<()> {
    let mut held = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    let mut eof = false;
    // The last bytes seen, for a message split between two reads.
    let mut tail = Vec::new();
    loop {
        if id >= control.borrow_and_update().hold_below {
            to.write_all(&held).await?;
            held.clear();
            if eof {
                return to.shutdown().await;
            }
        }
        tokio::select! {
            n = from.read(&mut chunk), if !eof => {
                let n = n?;
                eof = n == 0;
                held.extend_from_slice(&chunk[..n]);
                tail.extend_from_slice(&chunk[..n]);
                let ready = ready_messages(&tail);
                tail.drain(..tail.len().saturating_sub(READY.len()));
                if ready > 0 {
                    shared.count(|c| c.ready_for_query += ready);
                }
                if id < control.borrow().hold_below {
                    shared.count(|c| c.held_reply_bytes += n as u64);
                }
            }
            changed = control.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// A PostgreSQL ReadyForQuery message without its status byte.
const READY: &[u8] = b"Z\0\0\0\x05";

/// ReadyForQuery messages that end in `bytes` (the status byte is the
/// last one of each), so that none is counted twice when `bytes` keeps
/// the previous read's last [`READY`] bytes.
fn ready_messages(bytes: &[u8]) -> u64 {
    let found = bytes
        .windows(READY.len() + 1)
        .filter(|w| w.starts_with(READY) && matches!(w[READY.len()], b'I' | b'T' | b'E'))
        .count();
    found as u64
}

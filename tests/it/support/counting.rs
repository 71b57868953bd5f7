//! A counting HTTP/1.1 proxy of our own between fastpull and a real server (the registry, or
//! nginx playing a CDN). Unlike [`super::FaultProxy`] it keeps connections alive (one
//! upstream connection per client connection, many requests on each), so connection reuse,
//! requests in flight and ranges cut short can be observed from the server side.
//!
//! It records, per connection, when it was opened, and per request the method, path, `Range`,
//! status, `Content-Range`, the body bytes relayed to the client and whether the whole body
//! was relayed (`complete`) or the client went away first (`cut`). It can cap the rate of a
//! connection's responses (smooth, or "the first K bytes of each response fast, then capped"),
//! for every connection, the Nth one, or the one carrying the first request for a path. It can
//! also *hold* responses: relay the first K body bytes of each response to matching paths,
//! then nothing until the test releases them, so a test can stop a pull at a point it
//! chooses by an event rather than by a clock.
//!
//! # Ordering without clocks
//! Every event takes a stamp from one process-wide counter, so orderings are exact and do not
//! depend on timer resolution or machine speed. A request's *measured* in-flight interval is
//! chosen to lie inside the interval in which fastpull had it in flight, so a measured peak is
//! never higher than fastpull's real one (upper-bound assertions cannot fail spuriously):
//! - it starts when its head has been read (fastpull sent it before);
//! - a response relayed in full ends at the stamp taken *before* its last write (fastpull
//!   cannot have read the last byte before that write began);
//! - a response cut short because a later request of the same blob took over its range from
//!   byte `stop` (work stealing, a raced straggler) ends at the stamp taken before the write
//!   that carried byte `stop - 1` (fastpull drops it only after reading that byte);
//! - any other cut-short response counts as ending where it started (never in flight).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The process-wide event counter (shared by every proxy, so logs of two proxies merge).
static CLOCK: AtomicU64 = AtomicU64::new(1);

fn stamp() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

/// A rate cap on response bodies: the first `burst` bytes of each response unpaced, the rest
/// at `rate` bytes/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    pub rate: u64,
    pub burst: u64,
}

impl Cap {
    /// Every byte at `rate` bytes/s.
    pub fn smooth(rate: u64) -> Cap {
        Cap { rate, burst: 0 }
    }

    /// The first `burst` bytes of each response at full speed, then `rate` bytes/s (what
    /// token-bucket limiters and nginx's `limit_rate_after` do).
    pub fn bursty(burst: u64, rate: u64) -> Cap {
        Cap { rate, burst }
    }
}

/// Which connections or responses a [`Cap`] applies to.
#[derive(Debug, Clone)]
pub enum Which {
    /// Every response (not sticky: a later [`Which::FirstRequestFor`] may still pick the
    /// connection).
    All,
    /// The Nth connection accepted (1-based), for its whole life.
    Nth(usize),
    /// The connection that carries the first request whose path contains this, from that
    /// request on, for its whole life.
    FirstRequestFor(String),
    /// Every response to a request whose path contains this.
    PathContains(String),
}

/// One accepted connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// 1-based, in accept order.
    pub id: usize,
    pub opened: Instant,
    pub opened_stamp: u64,
    /// The cap this connection got for good, if any.
    pub cap: Option<Cap>,
}

/// One request as relayed.
#[derive(Debug, Clone)]
pub struct Req {
    /// The connection it came on ([`Conn::id`]) and its 1-based place there.
    pub conn: usize,
    pub nth_on_conn: usize,
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    /// The upstream's status (0: none came).
    pub status: u16,
    /// `Content-Range: bytes a-b/total` of the response, as (a, b).
    pub content_range: Option<(u64, u64)>,
    pub content_length: Option<u64>,
    /// Body bytes written to the client.
    pub relayed: u64,
    /// The whole body was written to the client.
    pub complete: bool,
    /// The client went away (or the proxy gave up) before the body was all written.
    pub cut: bool,
    /// The proxy is done with it.
    pub done: bool,
    /// The cap its response was paced with.
    pub cap: Option<Cap>,
    pub at: Instant,
    /// Stamp when its head had been read.
    pub start: u64,
    /// Stamp before the response head was written.
    pub head_stamp: u64,
    /// (body offset, stamp) before each body write.
    pub writes: Vec<(u64, u64)>,
}

impl Req {
    /// The 64-hex digest in the path (registry `/blobs/sha256:<hex>` or CDN
    /// `…/sha256/ab/<hex>/data`), if any.
    pub fn hex(&self) -> Option<&str> {
        let b = self.path.as_bytes();
        let mut run = 0;
        let mut last = None;
        for (i, c) in b.iter().enumerate() {
            if c.is_ascii_hexdigit() && !c.is_ascii_uppercase() {
                run += 1;
                if run == 64 && (i + 1 == b.len() || !b[i + 1].is_ascii_hexdigit()) {
                    last = Some(&self.path[i + 1 - 64..=i]);
                }
            } else {
                run = 0;
            }
        }
        last
    }

    /// Whether this is a request for blob `digest` (`sha256:<hex>` or just the hex).
    pub fn is_for(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.hex() == Some(hex)
    }

    /// A GET answered with a blob body (200 or 206).
    pub fn is_body_get(&self) -> bool {
        self.method == "GET" && (self.status == 200 || self.status == 206)
    }

    /// `Range: bytes=a-b` as (a, Some(b)); `bytes=a-` as (a, None).
    pub fn range_bounds(&self) -> Option<(u64, Option<u64>)> {
        let r = self.range.as_deref()?.strip_prefix("bytes=")?;
        let (a, b) = r.split_once('-')?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()))
    }

    /// Bytes `[a, b)` of the blob this response carries: `Content-Range` of a 206, everything
    /// of a 200.
    pub fn span(&self) -> Option<(u64, u64)> {
        match self.status {
            206 => self.content_range.map(|(a, b)| (a, b + 1)),
            200 => Some((0, self.content_length?)),
            _ => None,
        }
    }

    /// Expected body length (from `Content-Length`).
    fn body_len(&self) -> Option<u64> {
        self.content_length
    }
}

/// A snapshot of everything the proxy saw; see the module docs for how intervals are chosen.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub conns: Vec<Conn>,
    pub reqs: Vec<Req>,
}

/// How the body GETs of one blob covered it (see [`Log::coverage`]).
#[derive(Debug, Clone)]
pub struct Coverage {
    /// Per body GET (same order as [`Log::body_gets`]): span `[a, b)`, the byte where a
    /// later request took over (`stop`, = b if none), bytes relayed, complete.
    pub pieces: Vec<Piece>,
    /// Violations: bytes fetched twice, holes, ranges not closed.
    pub problems: Vec<String>,
    /// Body bytes relayed for the blob in all.
    pub relayed: u64,
    /// Body bytes relayed past the `stop` of responses that were cut there.
    pub overrun: u64,
    /// Responses cut short at a `stop` set by a later request.
    pub cuts: usize,
    /// Bytes fetched twice because a response the proxy relayed whole within its cap's
    /// burst (at line speed, before the client could read a byte of it), or had relayed
    /// whole before the later request was even made, had its tail cut or raced by that
    /// request: the bytes sat in the client's socket while the client, starved of CPU (seen
    /// under qemu and in full parallel runs), read that connection slowly. No client can see
    /// them there; they are allowed, and counted. A response still being relayed when the
    /// later request came is a scheduler fault.
    pub burst_dup: u64,
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub req: usize,
    pub start: u64,
    pub end: u64,
    pub stop: u64,
    pub relayed: u64,
    pub complete: bool,
    pub cut: bool,
}

/// The most of a response's tail a client can have in its socket, unread, when it hands that
/// tail to another request (loopback socket buffers of a loaded machine; see `coverage`).
const IN_SOCKET_MAX: u64 = 2 << 20;

impl Log {
    /// Requests for blob `digest` (any method and status).
    pub fn for_blob(&self, digest: &str) -> Vec<&Req> {
        self.reqs.iter().filter(|r| r.is_for(digest)).collect()
    }

    /// GETs of blob `digest` answered with a body (200/206), in arrival order.
    pub fn body_gets(&self, digest: &str) -> Vec<&Req> {
        self.reqs
            .iter()
            .filter(|r| r.is_for(digest) && r.is_body_get())
            .collect()
    }

    /// Body bytes relayed for blob `digest`, over all its GETs (bytes relayed twice count
    /// twice): what the server sent for it.
    pub fn relayed_for(&self, digest: &str) -> u64 {
        self.body_gets(digest).iter().map(|r| r.relayed).sum()
    }

    /// Bytes of blob `digest` relayed at least once: the union of `[a, a + relayed)` over
    /// its body GETs, each clipped where a later request took its span over (see
    /// [`Log::coverage`]), so that what a cut response relayed past its cut, which the
    /// client drops, does not count. What the client can have received of the blob.
    pub fn delivered(&self, digest: &str) -> u64 {
        let mut got: Vec<(u64, u64)> = Vec::new();
        for (i, r) in self.reqs.iter().enumerate() {
            if !(r.is_for(digest) && r.is_body_get()) {
                continue;
            }
            let Some((a, b)) = r.span() else { continue };
            let stop = self.stop(i).unwrap_or(b);
            let end = a + r.relayed.min(stop - a);
            if end > a {
                got.push((a, end));
            }
        }
        got.sort();
        let (mut total, mut at) = (0, 0);
        for (a, b) in got {
            let a = a.max(at);
            if b > a {
                total += b - a;
                at = b;
            }
        }
        total
    }

    /// Two proxies' logs as one (stamps are process-wide, so they interleave correctly).
    pub fn merged(logs: &[&Log]) -> Log {
        let mut out = Log::default();
        for l in logs {
            out.conns.extend(l.conns.iter().cloned());
            out.reqs.extend(l.reqs.iter().cloned());
        }
        out.reqs.sort_by_key(|r| r.start);
        out
    }

    /// For request `i`: the byte from which a later body GET of the same blob took over its
    /// span (the smallest start of a later GET lying strictly inside it), or its end.
    fn stop(&self, i: usize) -> Option<u64> {
        let r = &self.reqs[i];
        let (a, b) = r.span()?;
        let hex = r.hex()?;
        let mut stop = b;
        for q in &self.reqs {
            if q.start <= r.start || q.hex() != Some(hex) || !q.is_body_get() {
                continue;
            }
            if let Some((qa, _)) = q.span() {
                if qa > a && qa < stop {
                    stop = qa;
                }
            }
        }
        Some(stop)
    }

    /// The measured in-flight interval `[start, end)` of request `i` (module docs).
    pub fn interval(&self, i: usize) -> (u64, u64) {
        let r = &self.reqs[i];
        if !r.done {
            // Still being relayed when the snapshot was taken: in flight until now.
            return (r.start, u64::MAX);
        }
        if r.complete {
            let end = r.writes.last().map_or(r.head_stamp, |w| w.1);
            return (r.start, end.max(r.start));
        }
        // Cut short: explained only by a later request taking over from `stop`.
        if let (Some((a, _)), Some(stop)) = (r.span(), self.stop(i)) {
            let needed = stop - a;
            if needed > 0 && r.relayed >= needed {
                if let Some(w) = r.writes.iter().rev().find(|w| w.0 < needed) {
                    return (r.start, w.1.max(r.start));
                }
            }
        }
        (r.start, r.start)
    }

    /// The most requests among those `keep` selects that were in flight at once.
    pub fn peak_in_flight(&self, keep: impl Fn(&Req) -> bool) -> usize {
        let mut events: Vec<(u64, i32)> = Vec::new();
        for (i, r) in self.reqs.iter().enumerate() {
            if !keep(r) {
                continue;
            }
            let (s, e) = self.interval(i);
            if e > s {
                events.push((s, 1));
                events.push((e, -1));
            }
        }
        // Ends before starts at the same stamp (stamps are unique, but u64::MAX may repeat).
        events.sort_by_key(|&(t, d)| (t, d));
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, d) in events {
            now += d;
            peak = peak.max(now);
        }
        peak as usize
    }

    /// Peak in flight over every request.
    pub fn peak(&self) -> usize {
        self.peak_in_flight(|_| true)
    }

    /// Peak in flight among the requests for blob `digest`.
    pub fn peak_for_blob(&self, digest: &str) -> usize {
        self.peak_in_flight(|r| r.is_for(digest))
    }

    /// Connections accepted.
    pub fn connections_opened(&self) -> usize {
        self.conns.len()
    }

    /// Requests per connection id (connections that carried none included, as 0).
    pub fn requests_per_connection(&self) -> BTreeMap<usize, usize> {
        let mut m: BTreeMap<usize, usize> = self.conns.iter().map(|c| (c.id, 0)).collect();
        for r in &self.reqs {
            *m.entry(r.conn).or_default() += 1;
        }
        m
    }

    /// How the body GETs of blob `digest` (of `size` bytes) covered it: a request cut at the
    /// start of a later one counts up to there; the rest must be disjoint, cover the blob
    /// exactly, use closed ranges, and no response relayed in full may overlap another.
    pub fn coverage(&self, digest: &str, size: u64) -> Coverage {
        let mut pieces = Vec::new();
        let mut problems = Vec::new();
        for (i, r) in self.reqs.iter().enumerate() {
            if !(r.is_for(digest) && r.is_body_get()) {
                continue;
            }
            if let Some((_, None)) = r.range_bounds() {
                problems.push(format!("open range {:?} (#{i})", r.range));
            }
            let Some((a, b)) = r.span() else {
                problems.push(format!("#{i} status {} without a span", r.status));
                continue;
            };
            let stop = self.stop(i).unwrap_or(b);
            pieces.push(Piece {
                req: i,
                start: a,
                end: b,
                stop,
                relayed: r.relayed,
                complete: r.complete,
                cut: r.cut,
            });
        }
        let mut relayed = 0;
        let mut overrun = 0;
        let mut cuts = 0;
        let mut burst_dup = 0;
        let mut useful: Vec<(u64, u64, usize)> = Vec::new();
        let in_burst = |p: &Piece| {
            self.reqs[p.req]
                .cap
                .is_some_and(|c| p.complete && p.end - p.start <= c.burst)
        };
        // The proxy had relayed all of `p` before request `q` was made on another connection,
        // and `p`'s connection had asked for nothing since (so the client had not finished
        // reading `p`): the bytes were in the client's socket, unread, when it decided to
        // fetch them again.
        let relayed_before = |p: &Piece, q: usize| {
            let (r, rq) = (&self.reqs[p.req], &self.reqs[q]);
            let conn_moved_on = self
                .reqs
                .iter()
                .any(|o| o.conn == r.conn && o.start > r.start && o.start < rq.start);
            p.complete
                && rq.conn != r.conn
                && !conn_moved_on
                && r.writes.last().is_some_and(|w| w.1 < rq.start)
        };
        // `p` was being relayed on another connection when request `q` took over its tail,
        // and that tail is no more than socket buffers hold: the client had not read those
        // bytes yet (it reads `p` in order up to the cut, then drops the connection), and
        // cannot see them behind its HTTP stack; the proxy went on filling the socket
        // meanwhile. Seen in full parallel runs: 720 KiB of a 3 MiB piece.
        let in_flight = |p: &Piece, q: usize| {
            let (r, rq) = (&self.reqs[p.req], &self.reqs[q]);
            p.complete
                && rq.conn != r.conn
                && r.head_stamp < rq.start
                && p.end - p.stop <= IN_SOCKET_MAX
        };
        let taker = |p: &Piece| {
            pieces
                .iter()
                .filter(|q| q.req > p.req && q.start == p.stop)
                .map(|q| q.req)
                .next()
        };
        for p in &pieces {
            relayed += p.relayed;
            if p.complete
                && p.stop < p.end
                && (in_burst(p)
                    || taker(p).is_some_and(|q| relayed_before(p, q) || in_flight(p, q)))
            {
                burst_dup += p.end - p.stop;
            } else if p.complete && p.stop < p.end {
                problems.push(format!(
                    "#{} [{}, {}) was relayed in full although a later request took over from {}: \
                     bytes {}..{} fetched twice",
                    p.req, p.start, p.end, p.stop, p.stop, p.end
                ));
            }
            if p.cut && p.stop < p.end {
                cuts += 1;
                overrun += p.relayed.saturating_sub(p.stop - p.start);
            }
            let got = p.start + p.relayed.min(p.stop - p.start);
            if got > p.start {
                useful.push((p.start, got, p.req));
            }
        }
        // No two complete responses overlap.
        let complete: Vec<&Piece> = pieces.iter().filter(|p| p.complete).collect();
        for (x, p) in complete.iter().enumerate() {
            for q in &complete[x + 1..] {
                let in_socket = relayed_before(p, q.req)
                    || relayed_before(q, p.req)
                    || (q.start == p.stop && in_flight(p, q.req))
                    || (p.start == q.stop && in_flight(q, p.req));
                if p.start < q.end && q.start < p.end && !in_burst(p) && !in_burst(q) && !in_socket
                {
                    problems.push(format!(
                        "complete responses #{} [{}, {}) and #{} [{}, {}) overlap",
                        p.req, p.start, p.end, q.req, q.start, q.end
                    ));
                }
            }
        }
        // Useful parts disjoint and covering [0, size).
        useful.sort();
        let mut at = 0;
        for &(a, b, i) in &useful {
            if a < at {
                problems.push(format!(
                    "#{i} [{a}, {b}) overlaps bytes already fetched up to {at}"
                ));
            } else if a > at {
                problems.push(format!("hole [{at}, {a})"));
            }
            at = at.max(b);
        }
        if at < size {
            problems.push(format!("hole [{at}, {size})"));
        }
        Coverage {
            pieces,
            problems,
            relayed,
            overrun,
            cuts,
            burst_dup,
        }
    }

    /// One line per request, for assertion messages.
    pub fn describe(&self) -> String {
        let t0 = self.conns.iter().map(|c| c.opened).min();
        let mut s = String::new();
        for (i, r) in self.reqs.iter().enumerate() {
            let (a, e) = self.interval(i);
            s.push_str(&format!(
                "#{i} +{:.3}s conn {} ({}.) {} {} range={:?} -> {} cr={:?} relayed={} {}{} cap={:?} stamps {}..{}\n",
                t0.map_or(0.0, |t| r.at.duration_since(t).as_secs_f64()),
                r.conn,
                r.nth_on_conn,
                r.method,
                short(&r.path),
                r.range,
                r.status,
                r.content_range,
                r.relayed,
                if r.complete { "complete" } else { "" },
                if r.cut { "CUT" } else { "" },
                r.cap,
                a,
                if e == u64::MAX { "open".to_string() } else { e.to_string() },
            ));
        }
        s
    }
}

fn short(path: &str) -> String {
    if path.len() > 60 {
        format!("…{}", &path[path.len() - 40..])
    } else {
        path.to_string()
    }
}

struct State {
    upstream: String,
    conns: Mutex<Vec<Conn>>,
    reqs: Mutex<Vec<Req>>,
    caps: Mutex<Vec<(Which, Cap)>>,
    /// Responses to paths containing `.0` stop after `.1` body bytes until `released`.
    holds: Mutex<Vec<(String, u64)>>,
    released: AtomicBool,
    /// Responses waiting at their hold now.
    held: AtomicUsize,
    active: AtomicUsize,
}

/// The proxy; stops accepting when dropped.
pub struct CountingProxy {
    addr: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl CountingProxy {
    /// A proxy on 127.0.0.1 forwarding to `upstream` (`IP:PORT`).
    pub fn start(upstream: &str) -> CountingProxy {
        CountingProxy::start_on("127.0.0.1", upstream)
    }

    /// A proxy on `ip` (a free port) forwarding to `upstream`.
    pub fn start_on(ip: &str, upstream: &str) -> CountingProxy {
        let listener = TcpListener::bind((ip, 0)).expect("bind counting proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            conns: Mutex::new(Vec::new()),
            reqs: Mutex::new(Vec::new()),
            caps: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            released: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stop2) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let id = {
                    let mut conns = st.conns.lock().expect("conns");
                    let id = conns.len() + 1;
                    conns.push(Conn {
                        id,
                        opened: Instant::now(),
                        opened_stamp: stamp(),
                        cap: None,
                    });
                    id
                };
                st.active.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, id, &st);
                    st.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingProxy { addr, state, stop }
    }

    /// `IP:PORT`
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Caps the responses `which` selects (rules are looked at in the order added; the first
    /// that matches wins).
    pub fn cap(&self, which: Which, cap: Cap) {
        self.state.caps.lock().expect("caps").push((which, cap));
    }

    /// Holds responses to requests whose path contains `path_contains`: the first `after`
    /// body bytes of each are relayed, then nothing more until [`CountingProxy::release`]
    /// (or the proxy is dropped). Add holds before the client starts.
    pub fn hold(&self, path_contains: &str, after: u64) {
        self.state
            .holds
            .lock()
            .expect("holds")
            .push((path_contains.to_string(), after));
    }

    /// Lets every held response (and every later one) go on.
    pub fn release(&self) {
        self.state.released.store(true, Ordering::SeqCst);
    }

    /// What [`CountingProxy::release`] does, to be called from another thread (a test's
    /// watchdog).
    pub fn releaser(&self) -> impl FnOnce() + Send + 'static {
        let state = self.state.clone();
        move || state.released.store(true, Ordering::SeqCst)
    }

    /// How many responses are waiting at their hold right now.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Everything seen so far, possibly with requests still being relayed.
    pub fn snapshot(&self) -> Log {
        // Both held at once, taken in the order `serve` takes them (requests, then
        // connections): the other order deadlocks with a request being recorded.
        let reqs = self.state.reqs.lock().expect("reqs");
        let conns = self.state.conns.lock().expect("conns");
        Log {
            conns: conns.clone(),
            reqs: reqs.clone(),
        }
    }

    /// Waits (at most 60 s) until no connection is open any more (call it after the client
    /// exited: its sockets are closed, so every connection ends), then the log.
    pub fn settle(&self) -> Log {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.state.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.snapshot()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.state.released.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// A request or response head: first line and headers.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.get(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn bytes(&self) -> Vec<u8> {
        let mut s = self.first.clone();
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

/// Reads a head; `None` at a clean end of stream before its first byte.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head { first, headers }))
}

fn update(st: &State, idx: usize, f: impl FnOnce(&mut Req)) {
    f(&mut st.reqs.lock().expect("reqs")[idx]);
}

/// Serves one client connection: request after request until either side closes.
fn serve(client: TcpStream, id: usize, st: &State) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    // Small send buffer: bytes relayed past the point where fastpull stops reading stay few.
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(client.as_fd(), 64 * 1024);
    let _ = client.set_nodelay(true);
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_w = client;
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut nth = 0;
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        nth += 1;
        let mut parts = head.first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let range = head.get("range").map(str::to_string);
        let client_close = head.has_token("connection", "close");
        let req_body: u64 = head
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; req_body as usize];
        reader.read_exact(&mut body)?;

        // Which cap applies, and record the request (atomically with the "first request"
        // check of FirstRequestFor).
        let (idx, cap) = {
            let caps = st.caps.lock().expect("caps").clone();
            let mut reqs = st.reqs.lock().expect("reqs");
            let mut conns = st.conns.lock().expect("conns");
            let conn = &mut conns[id - 1];
            let mut cap = conn.cap;
            if cap.is_none() {
                for (which, c) in &caps {
                    let hit = match which {
                        Which::All => true,
                        Which::Nth(n) => {
                            if *n == id {
                                conn.cap = Some(*c);
                            }
                            *n == id
                        }
                        Which::FirstRequestFor(s) => {
                            let first = path.contains(s.as_str())
                                && !reqs.iter().any(|r| r.path.contains(s.as_str()));
                            if first {
                                conn.cap = Some(*c);
                            }
                            first
                        }
                        Which::PathContains(s) => path.contains(s.as_str()),
                    };
                    if hit {
                        cap = Some(*c);
                        break;
                    }
                }
            }
            reqs.push(Req {
                conn: id,
                nth_on_conn: nth,
                method: method.clone(),
                path: path.clone(),
                range,
                status: 0,
                content_range: None,
                content_length: None,
                relayed: 0,
                complete: false,
                cut: false,
                done: false,
                cap,
                at: Instant::now(),
                start: stamp(),
                head_stamp: 0,
                writes: Vec::new(),
            });
            (reqs.len() - 1, cap)
        };

        let hold = st
            .holds
            .lock()
            .expect("holds")
            .iter()
            .find(|(p, _)| path.contains(p.as_str()))
            .map(|(_, after)| *after);
        let result = relay_one(
            st,
            idx,
            &head,
            &body,
            &method,
            (cap, hold),
            &mut upstream,
            &mut client_w,
        );
        let keep = match result {
            Ok(keep) => keep,
            Err(e) => {
                update(st, idx, |r| {
                    r.cut = !r.complete;
                    r.done = true;
                });
                let _ = client_w.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        update(st, idx, |r| r.done = true);
        if !keep || client_close {
            let _ = client_w.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// Sends one request upstream (reconnecting once if a kept connection was closed) and relays
/// the response. Returns whether both connections stay usable.
#[allow(clippy::too_many_arguments)]
fn relay_one(
    st: &State,
    idx: usize,
    head: &Head,
    body: &[u8],
    method: &str,
    (cap, hold): (Option<Cap>, Option<u64>),
    upstream: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    client: &mut TcpStream,
) -> std::io::Result<bool> {
    let mut out = head.bytes();
    out.extend_from_slice(body);
    let mut resp = None;
    for attempt in 0..2 {
        if upstream.is_none() {
            let s = TcpStream::connect(&st.upstream)?;
            let _ = s.set_nodelay(true);
            let r = BufReader::new(s.try_clone()?);
            *upstream = Some((s, r));
        }
        let (w, r) = upstream.as_mut().expect("upstream");
        let sent = w.write_all(&out);
        let got = match sent {
            Ok(()) => read_head(r),
            Err(e) => Err(e),
        };
        match got {
            Ok(Some(h)) => {
                resp = Some(h);
                break;
            }
            // A kept-alive upstream connection closed meanwhile: once more on a new one.
            Ok(None) | Err(_) if attempt == 0 => *upstream = None,
            Ok(None) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(e),
        }
    }
    let resp = resp.expect("response head");
    let status: u16 = resp
        .first
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_length: Option<u64> = resp.get("content-length").and_then(|v| v.parse().ok());
    let content_range = resp.get("content-range").and_then(|v| {
        let (a, b) = v
            .strip_prefix("bytes ")?
            .split('/')
            .next()?
            .split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let chunked = resp.has_token("transfer-encoding", "chunked");
    let upstream_close = resp.has_token("connection", "close");
    let no_body = method == "HEAD" || status < 200 || status == 204 || status == 304;
    update(st, idx, |r| {
        r.status = status;
        r.content_length = if no_body { Some(0) } else { content_length };
        r.content_range = content_range;
        r.head_stamp = stamp();
    });
    client.write_all(&resp.bytes())?;

    let (_, up) = upstream.as_mut().expect("upstream");
    let mut pacer = Pacer::new(cap);
    pacer.hold = hold;
    let mut relayed = 0u64;
    let mut to_eof = false;
    if no_body {
    } else if chunked {
        loop {
            let mut line = String::new();
            if up.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let n = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            client.write_all(line.as_bytes())?;
            if n == 0 {
                loop {
                    let mut t = String::new();
                    if up.read_line(&mut t)? == 0 {
                        break;
                    }
                    client.write_all(t.as_bytes())?;
                    if t == "\r\n" || t == "\n" {
                        break;
                    }
                }
                break;
            }
            relay_body(st, idx, up, client, Some(n), &mut relayed, &mut pacer)?;
            let mut crlf = [0u8; 2];
            up.read_exact(&mut crlf)?;
            client.write_all(&crlf)?;
        }
    } else if let Some(n) = content_length {
        relay_body(st, idx, up, client, Some(n), &mut relayed, &mut pacer)?;
    } else {
        relay_body(st, idx, up, client, None, &mut relayed, &mut pacer)?;
        to_eof = true;
    }
    client.flush()?;
    update(st, idx, |r| {
        r.complete = true;
        let _ = r.body_len();
    });
    let keep = !to_eof && !upstream_close;
    if !keep {
        *upstream = None;
    }
    Ok(keep)
}

/// Paces one response's body per its [`Cap`], and holds it where a hold says.
struct Pacer {
    cap: Option<Cap>,
    sent: u64,
    capped_since: Option<Instant>,
    /// Where the capped part is counted from (the end of the burst, or of a hold).
    paced_from: Option<u64>,
    /// Body bytes relayed before the response waits for [`CountingProxy::release`].
    hold: Option<u64>,
}

impl Pacer {
    fn new(cap: Option<Cap>) -> Pacer {
        Pacer {
            cap,
            sent: 0,
            capped_since: None,
            paced_from: None,
            hold: None,
        }
    }

    /// How many bytes to write next (at most `want`), after waiting as the hold and the
    /// cap say.
    fn next(&mut self, st: &State, want: usize) -> usize {
        let mut want = want;
        if let Some(after) = self.hold {
            if st.released.load(Ordering::SeqCst) {
                self.hold = None;
            } else if self.sent >= after {
                st.held.fetch_add(1, Ordering::SeqCst);
                while !st.released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                st.held.fetch_sub(1, Ordering::SeqCst);
                self.hold = None;
                // The cap is counted again from here: a release is not a burst.
                self.capped_since = None;
                self.paced_from = Some(self.sent);
            } else {
                want = want.min((after - self.sent) as usize);
            }
        }
        let Some(cap) = self.cap else { return want };
        if self.sent < cap.burst {
            return want.min((cap.burst - self.sent) as usize);
        }
        let since = *self.capped_since.get_or_insert_with(Instant::now);
        let from = self.paced_from.unwrap_or(cap.burst);
        let due = since
            + Duration::from_secs_f64(self.sent.saturating_sub(from) as f64 / cap.rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let piece = (cap.rate / 32).clamp(512, 16 * 1024) as usize;
        want.min(piece)
    }

    fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }
}

/// Relays `len` body bytes (or up to EOF when `None`), recording each write.
fn relay_body(
    st: &State,
    idx: usize,
    up: &mut BufReader<TcpStream>,
    client: &mut TcpStream,
    len: Option<u64>,
    relayed: &mut u64,
    pacer: &mut Pacer,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left != Some(0) {
        let want = left.map_or(buf.len(), |l| l.min(buf.len() as u64) as usize);
        let want = pacer.next(st, want);
        let n = up.read(&mut buf[..want])?;
        if n == 0 {
            if left.is_none() {
                return Ok(());
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let at = *relayed;
        let s = stamp();
        update(st, idx, |r| r.writes.push((at, s)));
        // Counted as the socket takes them, not per chunk: a client that reads part of a
        // chunk and hangs up has those bytes (write_all's error would leave them uncounted,
        // and the log would show a hole the client never saw).
        let mut off = 0;
        while off < n {
            match client.write(&buf[off..n]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    off += k;
                    *relayed += k as u64;
                    update(st, idx, |r| r.relayed = *relayed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        pacer.sent(n);
        if let Some(l) = left.as_mut() {
            *l -= n as u64;
        }
    }
    Ok(())
}

//! A TCP proxy that adds round-trip time, for perf/world.sh's far-registry worlds, and caps
//! what the server sends, for its shared-link world.
//!
//!     delay-proxy RTT_MS LISTEN_HOST:PORT=TARGET_HOST:PORT[,conn=RATE][,link=RATE]...
//!
//! `conn=RATE` caps each connection's server-to-client bytes with a token bucket of its own (a
//! CDN's per-connection shaper; nginx's `limit_rate` starts over with each request instead);
//! `link=RATE` caps the sum over every connection of that listener (a shared link).
//! RATE is bytes per second with an optional k/m/g suffix (KiB, MiB, GiB, as nginx reads them).
//! A bucket holds at most 128 KiB (or 4 ms of its rate, if more), so a connection idle for a
//! while sends no more than that at once.
//!
//! Why a proxy: this machine's kernel has no `sch_netem` (no qdiscs at all), so `tc ... netem
//! delay` is not available. Every byte is delayed by RTT/2 in each direction, in order, so a
//! request/response exchange costs one RTT more than on loopback. The TCP handshake is modelled
//! too: the client's connect() to the proxy returns at once (and the proxy connects to the
//! target at once), but bytes the client sends in the first RTT after connecting are held until
//! one RTT after the connect (the moment a real client would have its SYN-ACK) and then delayed
//! by RTT/2 like any others: a fresh connection and one request cost 2 RTT more. TLS runs end to
//! end through the proxy, so its handshake round trips are delayed as well.
//!
//! Each direction of a connection is one task: a reader stamps what it reads with the time it
//! arrived and queues it; a writer sends each piece once its stamp + RTT/2 has passed. At most
//! WINDOW bytes (4 MiB, like an autotuned TCP window; enough for 25 MiB/s per connection at
//! 100 ms RTT) are queued per direction; beyond that the reader stops reading that side until
//! the writer has sent some, so a fast sender is throttled to WINDOW per RTT/2 as TCP would
//! throttle it. (The Python proxy also stopped reading while the destination's socket buffer was
//! full; here only the window bounds it, as bytes in flight keep arriving on a real path.)
//!
//! The bytes never enter this process: the reader splice(2)s them from the socket into a pipe
//! and the writer from the pipe into the other socket, so the kernel passes page references
//! instead of copying, and everything runs on one thread (tokio's current-thread runtime, which
//! costs less CPU than waking two). That is under half the CPU per byte of copying through
//! user space (perf/README.md). The queue holds (pipe, length, stamp); a direction uses as
//! many pipes as its window needs.
//!
//! End of stream and errors, as a network would carry them: a FIN (EOF) from one side is queued
//! like data and passed on as a half-close (shutdown(SHUT_WR)) when it is due; the other
//! direction keeps flowing. A side that is lost (a read or write error such as a reset, or
//! closed by the proxy) is closed, and a close is queued towards the other side: what was queued
//! before it is delivered, then that side is closed too, RTT/2 later; what the other side sends
//! meanwhile is read and dropped. If the target refuses the connection, the client's connection
//! is closed at once. A connection is done (both sockets closed) when both half-closes have been
//! delivered, or both sides are closed. These are the semantics of the Python proxy this
//! replaced (perf/delay_proxy.py), which copied every byte through user space.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Bytes queued per direction of a connection, at most (see the module docs).
const WINDOW: usize = 4 << 20;
/// The pipes' size (the default /proc/sys/fs/pipe-max-size; a smaller one is fine, see `Pipe`).
const PIPE_SIZE: usize = 1 << 20;
/// Most bytes one splice moves (one queued piece).
const MAX_SPLICE: usize = 1 << 20;
/// What a rate cap's bucket holds at least (what an idle connection may send at once).
const BURST: f64 = 128.0 * 1024.0;
/// A bucket holds at least this long's worth of its rate too: the timer wakes a waiting
/// writer up to a millisecond late, and what would refill meanwhile must not spill over.
const BURST_TIME: f64 = 0.004;
/// Most bytes one splice moves under a rate cap (a writer pays after sending).
const CAPPED_SPLICE: usize = 64 << 10;

/// A token bucket: `rate` bytes a second, at most `burst` saved up ([`BURST`], or
/// [`BURST_TIME`] of the rate if more). A writer waits until the
/// bucket is not in debt, sends at most [`CAPPED_SPLICE`], and pays for what it sent; several
/// writers sharing one bucket (a link) overdraw it by at most one splice each.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Bucket {
        let burst = BURST.max(rate * BURST_TIME);
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// How long until the bucket is out of debt (zero: now).
    fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    fn pay(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

type Caps = Vec<Arc<Mutex<Bucket>>>;

/// Waits until every bucket in `caps` is out of debt.
async fn await_caps(caps: &Caps) {
    loop {
        let now = Instant::now();
        let wait = caps
            .iter()
            .map(|b| b.lock().expect("not poisoned").wait(now))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// A RATE argument: bytes per second, optional k/m/g suffix (binary, as nginx reads sizes).
fn parse_rate(v: &str) -> Option<f64> {
    let v = v.trim().to_ascii_lowercase();
    let (num, mul) = match v.chars().last()? {
        'k' => (&v[..v.len() - 1], 1024.0),
        'm' => (&v[..v.len() - 1], 1024.0 * 1024.0),
        'g' => (&v[..v.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (&v[..], 1.0),
    };
    let r = num.parse::<f64>().ok()? * mul;
    (r.is_finite() && r > 0.0).then_some(r)
}

enum Item {
    /// `len` bytes at the head of `pipe`.
    Data(Arc<Pipe>, usize),
    /// The source half-closed: half-close the destination.
    Eof,
    /// The source is gone: close the destination.
    Close,
}

/// What the two directions of one connection share.
struct Conn {
    client_lost: CancellationToken,
    server_lost: CancellationToken,
    /// Both half-closes were delivered: nothing more can flow.
    done: CancellationToken,
    eofs: AtomicU8,
}

/// A pipe that holds a direction's bytes while they wait.
struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Bytes in the pipe (spliced in, not yet out).
    held: AtomicUsize,
}

/// The size pipes get (F_SETPIPE_SZ may be refused above pipe-max-size without privileges).
static PIPE_CAP: OnceLock<usize> = OnceLock::new();

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into `fds`, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        PIPE_CAP.get_or_init(|| cap.max(4096) as usize);
        Ok(Pipe {
            rd,
            wr,
            held: AtomicUsize::new(0),
        })
    }

    fn cap() -> usize {
        *PIPE_CAP.get().expect("a pipe was made")
    }
}

/// The reader's splice found the pipe full (the socket has data): another pipe is needed.
#[derive(Debug)]
struct PipeFull;
impl std::fmt::Display for PipeFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("pipe full")
    }
}
impl std::error::Error for PipeFull {}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds owned by the caller; null offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Bytes waiting in a socket's receive queue.
fn inq(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n.max(0) as usize
}

/// One direction: what `src` sends is written to `dst` `delay` after it arrived, and not before
/// `not_before + delay`.
struct Dir {
    conn: Arc<Conn>,
    src_lost: CancellationToken,
    dst_lost: CancellationToken,
    delay: Duration,
    not_before: Instant,
    /// Bytes queued (in pipes, not yet written).
    queued: AtomicUsize,
    /// The writer wrote something (the window or a pipe has room again).
    progress: Notify,
    /// Empty pipes to reuse, and how many this direction has made.
    pool: Mutex<Vec<Pipe>>,
    pipes: AtomicUsize,
    /// Rate caps on what this direction writes (none: only the delay).
    caps: Caps,
}

impl Dir {
    fn new(
        conn: &Arc<Conn>,
        src_lost: &CancellationToken,
        dst_lost: &CancellationToken,
        delay: Duration,
        not_before: Instant,
        caps: Caps,
    ) -> Dir {
        Dir {
            caps,
            conn: conn.clone(),
            src_lost: src_lost.clone(),
            dst_lost: dst_lost.clone(),
            delay,
            not_before,
            queued: AtomicUsize::new(0),
            progress: Notify::new(),
            pool: Mutex::new(Vec::new()),
            pipes: AtomicUsize::new(0),
        }
    }

    fn due(&self, arrived: Instant) -> Instant {
        arrived.max(self.not_before) + self.delay
    }

    async fn run(
        &self,
        src: impl Future<Output = Option<Arc<TcpStream>>>,
        dst: impl Future<Output = Option<Arc<TcpStream>>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::join!(self.reader(src, tx), self.writer(dst, rx));
    }

    /// Makes `cur` a pipe with room to splice into and returns the room, or None if every pipe
    /// this direction may have is in use (wait for the writer).
    fn pick(&self, cur: &mut Option<Arc<Pipe>>, full: &mut bool) -> io::Result<Option<usize>> {
        let cap = Pipe::cap();
        if let Some(p) = cur {
            let held = p.held.load(Ordering::Acquire);
            if held == 0 {
                *full = false;
                return Ok(Some(cap));
            }
            // A slot can hold more than a page (a large fragment), so `held` may exceed `cap`.
            let room = cap.saturating_sub(held);
            if !*full && room >= cap / 4 {
                return Ok(Some(room));
            }
        }
        let pooled = self.pool.lock().expect("not poisoned").pop();
        let next = match pooled {
            Some(p) => p,
            None if self.pipes.load(Ordering::Relaxed) < WINDOW.div_ceil(cap) + 2 => {
                self.pipes.fetch_add(1, Ordering::Relaxed);
                Pipe::new()?
            }
            None => return Ok(None),
        };
        if let Some(old) = cur.replace(Arc::new(next)) {
            self.recycle(old);
        }
        *full = false;
        Ok(Some(cap))
    }

    /// Drops a reference to a pipe; the last one puts it (empty by then) back in the pool.
    fn recycle(&self, pipe: Arc<Pipe>) {
        if let Some(p) = Arc::into_inner(pipe) {
            if p.held.load(Ordering::Acquire) == 0 {
                self.pool.lock().expect("not poisoned").push(p);
            }
        }
    }

    async fn reader(
        &self,
        src: impl Future<Output = Option<Arc<TcpStream>>>,
        tx: mpsc::UnboundedSender<(Instant, Item)>,
    ) {
        let Some(src) = src.await else { return };
        let fd = src.as_raw_fd();
        let done = &self.conn.done;
        let lost = &self.src_lost;
        // The source is gone: close the destination after what is queued.
        let close = || {
            let _ = tx.send((self.due(Instant::now()), Item::Close));
        };
        let mut cur: Option<Arc<Pipe>> = None;
        let mut full = false;
        loop {
            if self.dst_lost.is_cancelled() {
                // Nowhere to send to any more: read and drop, until the close reaches the source.
                drop(cur.take());
                return self.discard(&src, &tx).await;
            }
            let queued = self.queued.load(Ordering::Acquire);
            let pick = if queued < WINDOW {
                self.pick(&mut cur, &mut full)
            } else {
                Ok(None)
            };
            let room = match pick {
                Ok(Some(room)) => room.min(WINDOW - queued).min(MAX_SPLICE),
                Ok(None) => {
                    tokio::select! {
                        biased;
                        _ = done.cancelled() => return,
                        _ = lost.cancelled() => return close(),
                        _ = self.dst_lost.cancelled() => {}
                        _ = self.progress.notified() => {}
                    }
                    continue;
                }
                Err(e) => {
                    eprintln!("delay-proxy: pipe: {e}");
                    lost.cancel();
                    return close();
                }
            };
            let pipe = cur.clone().expect("picked");
            let ready = tokio::select! {
                biased;
                _ = done.cancelled() => return,
                _ = lost.cancelled() => return close(),
                _ = self.dst_lost.cancelled() => continue,
                r = src.readable() => r,
            };
            let read = ready.and_then(|()| {
                src.try_io(Interest::READABLE, || {
                    match splice(fd, pipe.wr.as_raw_fd(), room) {
                        // EAGAIN with bytes waiting: the pipe is out of slots (small segments), not
                        // the socket out of data. Not WouldBlock, so the readiness is kept.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && inq(fd) > 0 => {
                            Err(io::Error::other(PipeFull))
                        }
                        r => r,
                    }
                })
            });
            let now = Instant::now();
            match read {
                Ok(0) => {
                    let _ = tx.send((self.due(now), Item::Eof));
                    drop(cur.take());
                    // Half-closed: the other direction goes on. Wait for the end.
                    tokio::select! {
                        biased;
                        _ = done.cancelled() => return,
                        _ = lost.cancelled() => return close(),
                    }
                }
                Ok(n) => {
                    pipe.held.fetch_add(n, Ordering::AcqRel);
                    self.queued.fetch_add(n, Ordering::AcqRel);
                    let _ = tx.send((self.due(now), Item::Data(pipe, n)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.get_ref().is_some_and(|e| e.is::<PipeFull>()) => full = true,
                Err(_) => {
                    lost.cancel();
                    return close();
                }
            }
        }
    }

    /// The reader once the destination is gone.
    async fn discard(&self, src: &TcpStream, tx: &mpsc::UnboundedSender<(Instant, Item)>) {
        let done = &self.conn.done;
        let lost = &self.src_lost;
        let close = || {
            let _ = tx.send((self.due(Instant::now()), Item::Close));
        };
        let mut scratch = vec![0; 64 << 10];
        loop {
            let ready = tokio::select! {
                biased;
                _ = done.cancelled() => return,
                _ = lost.cancelled() => return close(),
                r = src.readable() => r,
            };
            match ready.and_then(|()| src.try_read(&mut scratch)) {
                Ok(0) => {
                    tokio::select! {
                        biased;
                        _ = done.cancelled() => return,
                        _ = lost.cancelled() => return close(),
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    lost.cancel();
                    return close();
                }
            }
        }
    }

    async fn writer(
        &self,
        dst: impl Future<Output = Option<Arc<TcpStream>>>,
        mut rx: mpsc::UnboundedReceiver<(Instant, Item)>,
    ) {
        let Some(dst) = dst.await else { return };
        let fd = dst.as_raw_fd();
        let done = &self.conn.done;
        let lost = &self.dst_lost;
        loop {
            let (due, item) = tokio::select! {
                biased;
                _ = done.cancelled() => return,
                _ = lost.cancelled() => return,
                it = rx.recv() => match it {
                    Some(it) => it,
                    None => return,
                },
            };
            if due > Instant::now() {
                tokio::select! {
                    biased;
                    _ = lost.cancelled() => return,
                    _ = sleep_until(due) => {}
                }
            }
            match item {
                Item::Data(pipe, len) => {
                    let mut left = len;
                    while left > 0 {
                        let most = if self.caps.is_empty() {
                            left
                        } else {
                            tokio::select! {
                                biased;
                                _ = lost.cancelled() => return,
                                _ = await_caps(&self.caps) => {}
                            }
                            left.min(CAPPED_SPLICE)
                        };
                        let ready = tokio::select! {
                            biased;
                            _ = lost.cancelled() => return,
                            r = dst.writable() => r,
                        };
                        match ready.and_then(|()| {
                            dst.try_io(Interest::WRITABLE, || splice(pipe.rd.as_raw_fd(), fd, most))
                        }) {
                            Ok(0) => {
                                eprintln!("delay-proxy: a queued pipe was empty");
                                lost.cancel();
                                return;
                            }
                            Ok(n) => {
                                for b in &self.caps {
                                    b.lock().expect("not poisoned").pay(n);
                                }
                                left -= n;
                                pipe.held.fetch_sub(n, Ordering::AcqRel);
                                self.queued.fetch_sub(n, Ordering::AcqRel);
                                self.progress.notify_one();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(_) => {
                                lost.cancel();
                                return;
                            }
                        }
                    }
                    self.recycle(pipe);
                }
                Item::Eof => {
                    // SAFETY: shutdown on the socket's fd, which `dst` keeps open.
                    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
                        lost.cancel();
                        return;
                    }
                    if self.conn.eofs.fetch_add(1, Ordering::AcqRel) + 1 == 2 {
                        done.cancel();
                        return;
                    }
                }
                Item::Close => {
                    lost.cancel();
                    return;
                }
            }
        }
        // Returning drops `dst` (its other reference, the other direction's reader, goes when it
        // sees `lost`: then the socket is closed) and whatever is still queued.
    }
}

/// What one listener forwards to, and the caps on what comes back.
struct Route {
    target: String,
    /// Each connection's own cap (bytes/s).
    conn: Option<f64>,
    /// The cap every connection of this listener shares.
    link: Option<Arc<Mutex<Bucket>>>,
}

async fn handle(client: TcpStream, route: Arc<Route>, half: Duration) {
    let t0 = Instant::now();
    let _ = client.set_nodelay(true);
    let client = Arc::new(client);
    let conn = Arc::new(Conn {
        client_lost: CancellationToken::new(),
        server_lost: CancellationToken::new(),
        done: CancellationToken::new(),
        eofs: AtomicU8::new(0),
    });
    // Client -> server: held until one RTT after the connect, then RTT/2 like any bytes.
    let up = Dir::new(
        &conn,
        &conn.client_lost,
        &conn.server_lost,
        half,
        t0 + 2 * half,
        Vec::new(),
    );
    let mut caps: Caps = Vec::new();
    if let Some(rate) = route.conn {
        caps.push(Arc::new(Mutex::new(Bucket::new(rate))));
    }
    if let Some(link) = &route.link {
        caps.push(link.clone());
    }
    let down = Dir::new(&conn, &conn.server_lost, &conn.client_lost, half, t0, caps);
    let (server_tx, server_rx) = oneshot::channel::<Arc<TcpStream>>();
    let client_lost = conn.client_lost.clone();
    let connect = async move {
        match TcpStream::connect(route.target.as_str()).await {
            Ok(server) => {
                if client_lost.is_cancelled() {
                    return None; // the client went away meanwhile: close the server at once
                }
                let _ = server.set_nodelay(true);
                let server = Arc::new(server);
                let _ = server_tx.send(server.clone());
                Some(server)
            }
            Err(_) => {
                client_lost.cancel(); // closes the client at once
                None
            }
        }
    };
    let client2 = client.clone();
    tokio::spawn(async move {
        down.run(async { server_rx.await.ok() }, async { Some(client2) })
            .await
    });
    up.run(async { Some(client) }, connect).await;
}

async fn serve(listener: TcpListener, route: Arc<Route>, half: Duration) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(handle(client, route.clone(), half));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                eprintln!("delay-proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: delay-proxy RTT_MS LISTEN_HOST:PORT=TARGET_HOST:PORT[,conn=RATE][,link=RATE]..."
    );
    std::process::exit(2)
}

/// Up to 2 sockets and a few pipes (2 fds each) per connection: raise the soft fd limit.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        usage();
    }
    let rtt_ms: f64 = args[0].parse().unwrap_or_else(|_| usage());
    if !(rtt_ms >= 0.0 && rtt_ms.is_finite()) {
        usage();
    }
    raise_fd_limit();
    // Find out the pipe size now, and that pipes can be made at all.
    if let Err(e) = Pipe::new() {
        eprintln!("delay-proxy: pipe: {e}");
        std::process::exit(1)
    }
    let half = Duration::from_secs_f64(rtt_ms / 2000.0);
    let mut servers = Vec::new();
    for spec in &args[1..] {
        let Some((listen, rest)) = spec.split_once('=') else {
            usage()
        };
        let mut parts = rest.split(',');
        let mut route = Route {
            target: parts.next().unwrap_or_default().to_string(),
            conn: None,
            link: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("conn", r)) => route.conn = Some(parse_rate(r).unwrap_or_else(|| usage())),
                Some(("link", r)) => {
                    let rate = parse_rate(r).unwrap_or_else(|| usage());
                    route.link = Some(Arc::new(Mutex::new(Bucket::new(rate))));
                }
                _ => usage(),
            }
        }
        let listener = TcpListener::bind(listen).await.unwrap_or_else(|e| {
            eprintln!("delay-proxy: listen on {listen}: {e}");
            std::process::exit(1)
        });
        servers.push(tokio::spawn(serve(listener, Arc::new(route), half)));
    }
    for s in servers {
        let _ = s.await;
    }
}

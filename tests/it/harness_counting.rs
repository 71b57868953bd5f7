//! Self-tests of the counting proxy (`support/counting.rs`): connection reuse, in-flight
//! overlap, cut-short responses and the byte-coverage check, driven by hand over raw TCP so
//! every interleaving is forced, not timed. None of these start fastpull.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::cli::sized_blob;
use crate::support::*;

/// A raw HTTP/1.1 client connection that reads exactly what it is told to.
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: &str, rcvbuf: Option<usize>) -> Raw {
        let s = TcpStream::connect(addr).expect("connect to proxy");
        if let Some(n) = rcvbuf {
            use std::os::fd::AsFd;
            rustix::net::sockopt::set_socket_recv_buffer_size(s.as_fd(), n).expect("SO_RCVBUF");
        }
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        Raw {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        }
    }

    /// Sends a GET; reads the response head; returns status and Content-Length.
    fn get(&mut self, path: &str, range: Option<&str>) -> (u16, u64) {
        let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
        write!(self.w, "GET {path} HTTP/1.1\r\nHost: x\r\n{range}\r\n").expect("send");
        let mut status = String::new();
        self.r.read_line(&mut status).expect("status line");
        let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0;
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        (code, len)
    }

    fn read(&mut self, n: u64) -> Vec<u8> {
        let mut v = vec![0; n as usize];
        self.r.read_exact(&mut v).expect("body");
        v
    }
}

fn blob_path(digest: &str) -> String {
    format!("/v2/harness/counting/blobs/{digest}")
}

/// Waits (bounded) until `cond` holds for the proxy's snapshot.
fn wait_for(proxy: &CountingProxy, cond: impl Fn(&counting::Log) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond(&proxy.snapshot()) {
        assert!(Instant::now() < deadline, "{}", proxy.snapshot().describe());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn counting_proxy_keeps_connections_alive() {
    let reg = Registry::start();
    let blob = sized_blob(1, 100_000);
    push_blob(&reg, "harness/counting", &blob);
    let proxy = CountingProxy::start(&reg.addr());
    let mut c = Raw::connect(proxy.addr(), None);
    let (s, n) = c.get("/v2/", None);
    assert_eq!(s, 200);
    c.read(n);
    let (s, n) = c.get(&blob_path(&blob.digest), None);
    assert_eq!((s, n), (200, 100_000));
    assert_eq!(c.read(n), blob.bytes);
    drop(c);
    let log = proxy.settle();
    assert_eq!(log.connections_opened(), 1, "{}", log.describe());
    assert_eq!(log.reqs.len(), 2, "{}", log.describe());
    assert_eq!(log.reqs[1].nth_on_conn, 2);
    assert!(
        log.reqs.iter().all(|r| r.complete && !r.cut),
        "{}",
        log.describe()
    );
    assert_eq!(log.peak(), 1);
    assert_eq!(log.body_gets(&blob.digest).len(), 1);
    assert!(log.coverage(&blob.digest, blob.size()).problems.is_empty());
}

/// A transfer of the whole blob is held after 1 MiB, a second connection fetches the upper
/// half, then the first reads up to that half and hangs up: two in flight, the first cut at
/// the second's start, every byte once.
#[test]
fn counting_proxy_sees_a_split_transfer() {
    let reg = Registry::start();
    let size = 8 << 20;
    let blob = sized_blob(2, size);
    push_blob(&reg, "harness/counting", &blob);
    let proxy = CountingProxy::start(&reg.addr());
    let path = blob_path(&blob.digest);
    let half = (size / 2) as u64;

    // Small receive buffer: the proxy cannot run ahead of what this client reads by much.
    let mut a = Raw::connect(proxy.addr(), Some(64 * 1024));
    let (s, _) = a.get(&path, Some(&format!("bytes=0-{}", size - 1)));
    assert_eq!(s, 206);
    assert_eq!(a.read(1 << 20), blob.bytes[..1 << 20]);
    wait_for(&proxy, |l| l.reqs.first().is_some_and(|r| r.relayed > 0));

    let mut b = Raw::connect(proxy.addr(), None);
    let (s, n) = b.get(&path, Some(&format!("bytes={half}-{}", size - 1)));
    assert_eq!((s, n), (206, size as u64 - half));
    assert_eq!(b.read(n), blob.bytes[half as usize..]);
    drop(b);

    assert_eq!(a.read(half - (1 << 20)), blob.bytes[1 << 20..half as usize]);
    drop(a);
    let log = proxy.settle();
    let cov = log.coverage(&blob.digest, blob.size());
    assert!(
        cov.problems.is_empty(),
        "{:?}\n{}",
        cov.problems,
        log.describe()
    );
    assert_eq!(cov.cuts, 1, "{}", log.describe());
    assert!(
        log.reqs[0].cut && !log.reqs[0].complete,
        "{}",
        log.describe()
    );
    assert!(cov.overrun < 1 << 20, "{}", log.describe());
    assert_eq!(log.peak_for_blob(&blob.digest), 2, "{}", log.describe());
    assert_eq!(log.connections_opened(), 2);
}

/// The coverage check flags two complete responses sharing bytes, and a hole.
#[test]
fn counting_proxy_flags_bytes_fetched_twice_and_holes() {
    let reg = Registry::start();
    let blob = sized_blob(3, 1_000_000);
    push_blob(&reg, "harness/counting", &blob);
    let path = blob_path(&blob.digest);

    let proxy = CountingProxy::start(&reg.addr());
    let mut c = Raw::connect(proxy.addr(), None);
    for range in ["bytes=0-599999", "bytes=500000-999999"] {
        let (s, n) = c.get(&path, Some(range));
        assert_eq!(s, 206);
        c.read(n);
    }
    drop(c);
    let log = proxy.settle();
    let cov = log.coverage(&blob.digest, blob.size());
    assert!(
        cov.problems.iter().any(|p| p.contains("overlap")),
        "{:?}",
        cov.problems
    );
    assert_eq!(log.peak(), 1, "one after the other on one connection");

    let proxy = CountingProxy::start(&reg.addr());
    let mut c = Raw::connect(proxy.addr(), None);
    let (_, n) = c.get(&path, Some("bytes=0-99"));
    c.read(n);
    drop(c);
    let log = proxy.settle();
    let cov = log.coverage(&blob.digest, blob.size());
    assert!(
        cov.problems
            .iter()
            .any(|p| p.contains("hole [100, 1000000)")),
        "{:?}",
        cov.problems
    );
}

/// A cap on the Nth connection paces only that one; a bursty cap lets its first bytes
/// through unpaced.
#[test]
fn counting_proxy_caps_what_it_is_told_to() {
    let reg = Registry::start();
    let blob = sized_blob(4, 200_000);
    push_blob(&reg, "harness/counting", &blob);
    let proxy = CountingProxy::start(&reg.addr());
    proxy.cap(Which::Nth(2), Cap::bursty(100_000, 1_000_000));
    for _ in 0..2 {
        let mut c = Raw::connect(proxy.addr(), None);
        let (_, n) = c.get(&blob_path(&blob.digest), None);
        assert_eq!(c.read(n), blob.bytes);
    }
    let log = proxy.settle();
    assert_eq!(log.reqs[0].cap, None);
    assert_eq!(log.reqs[1].cap, Some(Cap::bursty(100_000, 1_000_000)));
}

/// A hold relays the first bytes of each matching response and nothing more until it is
/// released; per blob, `relayed_for` counts every byte relayed and `delivered` each byte
/// once, none past the point where a later request took a response's span over.
#[test]
fn counting_proxy_holds_responses_and_counts_bytes_per_blob() {
    let reg = Registry::start();
    let size = 1u64 << 20;
    let blob = sized_blob(5, size as usize);
    push_blob(&reg, "harness/counting", &blob);
    let proxy = CountingProxy::start(&reg.addr());
    proxy.hold(hex(&blob.digest), 100_000);
    let path = blob_path(&blob.digest);

    let mut a = Raw::connect(proxy.addr(), None);
    let (s, n) = a.get(&path, None);
    assert_eq!((s, n), (200, size));
    assert_eq!(a.read(100_000), blob.bytes[..100_000]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.held() != 1 {
        assert!(Instant::now() < deadline, "{}", proxy.snapshot().describe());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        proxy.snapshot().reqs[0].relayed,
        100_000,
        "nothing past the hold"
    );
    proxy.release();
    assert_eq!(a.read(size - 100_000), blob.bytes[100_000..]);
    assert_eq!(proxy.held(), 0);

    // The upper half again, on a second connection: relayed twice, delivered once.
    let mut b = Raw::connect(proxy.addr(), None);
    let (s, m) = b.get(&path, Some(&format!("bytes={}-{}", size / 2, size - 1)));
    assert_eq!((s, m), (206, size / 2));
    assert_eq!(b.read(m), blob.bytes[size as usize / 2..]);
    drop((a, b));
    let log = proxy.settle();
    assert_eq!(log.relayed_for(&blob.digest), size + size / 2);
    assert_eq!(log.delivered(&blob.digest), size, "{}", log.describe());
}

//! A forwarding HTTP/1.1 proxy (fastpull talks to it as if it were the registry) that paces
//! all response bodies together to a byte rate, so a pull lasts long enough for tokens to
//! expire during it, and logs each request with the `Authorization` scheme it carried and
//! the status the upstream answered (which [`super::FaultProxy`] does not record).
//!
//! One request per connection (`Connection: close` both ways); requests with bodies are not
//! supported (pulls send none).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as forwarded.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    /// `Authorization` scheme (`Bearer`, `Basic`), if the request had the header.
    pub auth_scheme: Option<String>,
    /// The upstream's status (0 if none came).
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
}

/// The proxy; stops accepting when dropped.
pub struct ThrottleProxy {
    addr: String,
    log: Arc<Mutex<Vec<Exchange>>>,
    stop: Arc<AtomicBool>,
}

/// When the bytes handed out so far have been paid for.
struct Pace {
    next: Instant,
}

impl ThrottleProxy {
    /// Forwards to `upstream` (`127.0.0.1:PORT`), all response bodies together at most
    /// `bytes_per_sec`.
    pub fn start(upstream: &str, bytes_per_sec: u64) -> ThrottleProxy {
        assert!(bytes_per_sec > 0);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind throttle proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let pace = Arc::new(Mutex::new(Pace {
            next: Instant::now(),
        }));
        let (log2, stop2, upstream) = (log.clone(), stop.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (log, pace, upstream) = (log2.clone(), pace.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = forward(conn, &upstream, &log, &pace, bytes_per_sec);
                });
            }
        });
        ThrottleProxy { addr, log, stop }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Every request so far (logged when the upstream's status line arrived).
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log.lock().expect("throttle log").clone()
    }

    /// Requests that carried a bearer token and were answered 401.
    pub fn bearer_rejections(&self) -> usize {
        self.exchanges()
            .iter()
            .filter(|e| e.status == 401 && e.auth_scheme.as_deref() == Some("Bearer"))
            .count()
    }

    /// The log, one line per request, for assertion messages.
    pub fn describe(&self) -> String {
        let ex = self.exchanges();
        let t0 = ex.iter().map(|e| e.at).min();
        ex.iter()
            .map(|e| {
                format!(
                    "+{:.2}s {} {} auth={:?} -> {}",
                    t0.map_or(0.0, |t| e.at.duration_since(t).as_secs_f64()),
                    e.method,
                    e.path,
                    e.auth_scheme,
                    e.status
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn forward(
    mut client: TcpStream,
    upstream: &str,
    log: &Mutex<Vec<Exchange>>,
    pace: &Mutex<Pace>,
    rate: u64,
) -> std::io::Result<()> {
    let at = Instant::now();
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut head = request_line.clone();
    let mut auth_scheme = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if lower.starts_with("authorization:") {
            auth_scheme = line[14..].split_whitespace().next().map(str::to_string);
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();

    let mut up = TcpStream::connect(upstream)?;
    up.write_all(head.as_bytes())?;
    let mut up = BufReader::new(up);
    let mut status_line = String::new();
    up.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    log.lock().expect("throttle log").push(Exchange {
        method,
        path,
        auth_scheme,
        status,
        at,
    });
    super::proxy::relay_response_head(&mut up, &mut client, status_line)?;

    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let now = Instant::now();
        let due = {
            let mut p = pace.lock().expect("pace");
            p.next = p.next.max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
            p.next
        };
        if due > now {
            std::thread::sleep(due - now);
        }
        client.write_all(&buf[..n])?;
    }
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

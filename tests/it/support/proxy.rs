//! A fault-injecting HTTP/1.1 proxy of our own, between fastpull and the real registry (or
//! CDN): it forwards requests and, when a rule matches, resets, truncates, stalls, corrupts,
//! ignores `Range`, or answers with a status (5xx, 429 + Retry-After) instead. It can also
//! play a token-protected registry front (401 + bearer challenge, a token endpoint).
//! Every request is logged so tests can assert what fastpull asked for.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Send this many body bytes, then reset the connection (RST).
    Reset { after: usize },
    /// Send this many body bytes, then close cleanly (a short body).
    Truncate { after: usize },
    /// Send this many body bytes, then send nothing for this long (then close).
    Stall { after: usize, pause: Duration },
    /// Flip the body byte at this offset.
    Corrupt { at: usize },
    /// Drop the `Range` header before forwarding (the upstream answers 200 with everything).
    IgnoreRange,
    /// Drop `Range`, then reset after this many body bytes (a 200 cut off).
    IgnoreRangeReset { after: usize },
    /// Ask upstream for this many bytes from where the range asked for starts (from 0 for
    /// a request without one): an honest 206 of a shorter range than requested (a server
    /// that answers each request with a little).
    ShortRange { len: u64 },
    /// Answer with this status (and `Retry-After`) without forwarding.
    Status { code: u16, retry_after: Option<u64> },
    /// The same, with `Retry-After` as an HTTP date this many seconds after the answer.
    StatusUntil { code: u16, in_secs: u64 },
}

/// A fault for requests whose path contains `path_contains` and, if set, whose `Range`
/// starts at `range_start`; applied to the first `times` matches.
#[derive(Debug, Clone)]
pub struct Rule {
    pub path_contains: String,
    pub range_start: Option<u64>,
    pub fault: Fault,
    pub times: usize,
}

impl Rule {
    pub fn new(path_contains: &str, fault: Fault) -> Rule {
        Rule {
            path_contains: path_contains.to_string(),
            range_start: None,
            fault,
            times: usize::MAX,
        }
    }

    pub fn range_start(mut self, start: u64) -> Rule {
        self.range_start = Some(start);
        self
    }

    pub fn times(mut self, n: usize) -> Rule {
        self.times = n;
        self
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub authorization: bool,
    /// Which fault was applied, if any.
    pub fault: Option<String>,
    /// When the request's head arrived.
    pub at: std::time::Instant,
}

impl Seen {
    /// The start of `Range: bytes=a-b`.
    pub fn range_start(&self) -> Option<u64> {
        self.range
            .as_deref()?
            .strip_prefix("bytes=")?
            .split('-')
            .next()?
            .parse()
            .ok()
    }
}

/// The proxy; stops accepting when dropped.
pub struct FaultProxy {
    addr: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

/// A bearer-token front: requests without `Authorization: Bearer <token>` get a 401
/// challenge pointing at the proxy's own `/token` endpoint, which hands out `token`.
#[derive(Debug, Clone)]
pub struct TokenFront {
    pub token: String,
}

struct Shared {
    upstream: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    token: Option<TokenFront>,
    addr: String,
}

impl FaultProxy {
    /// A proxy on 127.0.0.1 forwarding to `upstream` ("127.0.0.1:PORT").
    pub fn start(upstream: &str) -> FaultProxy {
        FaultProxy::start_with(upstream, None)
    }

    /// As [`FaultProxy::start`], demanding a bearer token first.
    pub fn start_with(upstream: &str, token: Option<TokenFront>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let rules = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            rules: rules.clone(),
            seen: seen.clone(),
            token,
            addr: addr.clone(),
        });
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &shared);
                });
            }
        });
        FaultProxy {
            addr,
            rules,
            seen,
            stop,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn add(&self, rule: Rule) {
        self.rules.lock().expect("rules").push(rule);
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Blob GETs seen for `digest` ("sha256:…").
    pub fn blob_requests(&self, digest: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "GET" && s.path.ends_with(&format!("/blobs/{digest}")))
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn handle(mut client: TcpStream, sh: &Shared) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let range = get("range");
    let auth = get("authorization");

    if let Some(front) = &sh.token {
        if path.starts_with("/token") {
            log(
                sh,
                &method,
                &path,
                &range,
                auth.is_some(),
                Some("token".into()),
            );
            let body = format!("{{\"token\":\"{}\",\"expires_in\":300}}", front.token);
            return respond(
                &mut client,
                200,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            );
        }
        if auth.as_deref() != Some(&format!("Bearer {}", front.token)) {
            log(
                sh,
                &method,
                &path,
                &range,
                auth.is_some(),
                Some("401".into()),
            );
            let challenge = format!(
                "Bearer realm=\"http://{}/token\",service=\"fault-proxy\"",
                sh.addr
            );
            return respond(
                &mut client,
                401,
                &[
                    ("WWW-Authenticate", &challenge),
                    ("Content-Type", "application/json"),
                ],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
        }
    }

    let range_start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|r| r.parse::<u64>().ok());
    let fault = {
        let mut rules = sh.rules.lock().expect("rules");
        rules
            .iter_mut()
            .find(|r| {
                r.times > 0
                    && path.contains(&r.path_contains)
                    && (r.range_start.is_none() || r.range_start == range_start)
            })
            .map(|r| {
                r.times -= 1;
                r.fault.clone()
            })
    };
    log(
        sh,
        &method,
        &path,
        &range,
        auth.is_some(),
        fault.as_ref().map(|f| format!("{f:?}")),
    );

    let status = match &fault {
        Some(Fault::Status { code, retry_after }) => {
            Some((*code, retry_after.map(|s| s.to_string())))
        }
        Some(Fault::StatusUntil { code, in_secs }) => Some((
            *code,
            Some(httpdate::fmt_http_date(
                std::time::SystemTime::now() + Duration::from_secs(*in_secs),
            )),
        )),
        _ => None,
    };
    if let Some((code, ra)) = status {
        let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        if let Some(ra) = &ra {
            h.push(("Retry-After", ra));
        }
        return respond(
            &mut client,
            code,
            &h,
            br#"{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}"#,
        );
    }

    let mut upstream = TcpStream::connect(&sh.upstream)?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if let Some(Fault::ShortRange { len }) = &fault {
        // A request for the whole blob gets its first bytes too.
        let start = range_start.unwrap_or(0);
        head.push_str(&format!("Range: bytes={start}-{}\r\n", start + len - 1));
    }
    for (k, v) in &headers {
        if k.eq_ignore_ascii_case("connection")
            || (k.eq_ignore_ascii_case("range")
                && matches!(
                    fault,
                    Some(Fault::IgnoreRange)
                        | Some(Fault::IgnoreRangeReset { .. })
                        | Some(Fault::ShortRange { .. })
                ))
        {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    upstream.write_all(head.as_bytes())?;

    let mut up = BufReader::new(upstream);
    relay_response_head(&mut up, &mut client, String::new())?;

    let mut sent = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &mut buf[..n];
        match &fault {
            Some(Fault::Corrupt { at }) if *at >= sent && *at < sent + n => {
                chunk[*at - sent] ^= 0x5a;
            }
            Some(Fault::Reset { after })
            | Some(Fault::IgnoreRangeReset { after })
            | Some(Fault::Truncate { after })
            | Some(Fault::Stall { after, .. })
                if sent + n > *after =>
            {
                let keep = after.saturating_sub(sent);
                client.write_all(&chunk[..keep])?;
                client.flush()?;
                match &fault {
                    Some(Fault::Reset { .. }) | Some(Fault::IgnoreRangeReset { .. }) => {
                        // SO_LINGER 0: close sends RST.
                        set_linger_zero(&client);
                    }
                    Some(Fault::Stall { pause, .. }) => std::thread::sleep(*pause),
                    _ => {
                        let _ = client.shutdown(Shutdown::Write);
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        client.write_all(chunk)?;
        sent += n;
    }
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads the rest of an upstream response head (after `head`, which may already hold its
/// status line) and sends it to the client with `Connection: close` instead of the
/// upstream's own.
pub fn relay_response_head(
    up: &mut impl BufRead,
    client: &mut impl Write,
    mut head: String,
) -> std::io::Result<()> {
    loop {
        let mut line = String::new();
        if up.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        head.push_str(&line);
    }
    head.push_str("Connection: close\r\n\r\n");
    client.write_all(head.as_bytes())
}

fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsFd;
    let _ = rustix::net::sockopt::set_socket_linger(s.as_fd(), Some(Duration::ZERO));
}

fn log(
    sh: &Shared,
    method: &str,
    path: &str,
    range: &Option<String>,
    auth: bool,
    fault: Option<String>,
) {
    sh.seen.lock().expect("seen").push(Seen {
        method: method.to_string(),
        path: path.to_string(),
        range: range.clone(),
        authorization: auth,
        fault,
        at: std::time::Instant::now(),
    });
}

fn respond(
    c: &mut TcpStream,
    code: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {code} X\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    let _ = c.shutdown(Shutdown::Write);
    Ok(())
}

//! Integration-test support: a throw-away local registry, in-memory image building and
//! pushing through the registry's upload API. Everything is blocking.
#![allow(dead_code)]

pub mod canned;
pub mod cdn;
pub mod cli;
pub mod counting;
pub mod credhelper;
pub mod fstree;
pub mod htpasswd;
pub mod image;
pub mod microsocks;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod runner;
pub mod throttle;
pub mod tinyproxy;
pub mod tls;
pub mod token;

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

pub use canned::{Canned, CannedServer};
pub use cdn::{
    registry_with_cdn, registry_with_counted_cdn, registry_with_counted_cdn_http,
    registry_with_tls_cdn,
};
pub use counting::{Cap, CountingProxy, Which};
#[allow(unused_imports)]
pub use image::{
    build_index, empty_layer, gzip, random_layer, random_tar, sha256_digest, zero_byte_blob, Blob,
    Flavor, Image, ImageBuilder, EMPTY_SHA256,
};
pub use proxy::{Fault, FaultProxy, Rule, TokenFront};
#[allow(unused_imports)]
pub use push::{
    corrupt_blob_in_storage, fetch_blob, fetch_manifest, push_blob, push_blob_chunked,
    push_blob_monolithic, push_image, push_image_blobs, push_image_by_digest, push_index,
    push_manifest, truncate_blob_in_storage, try_push_manifest, Fetched, HttpFailure,
    CHUNKED_THRESHOLD, CHUNK_SIZE,
};
pub use registry::Registry;
pub use runner::{command_for, fastpull_command};
pub use tls::TestPki;

/// A fresh temp dir and a DEST path inside it (not yet created).
pub fn dest() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out");
    (dir, out)
}

/// A finished command's exit code and output, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The hex part of "sha256:<hex>" (a blob's file name).
pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A TCP port on `ip` that was free a moment ago (bound to port 0, then released).
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).expect("bind port 0 to find a free port");
    listener
        .local_addr()
        .expect("local address of the probe listener")
        .port()
}

/// A port on 127.0.0.1 that refuses connections for as long as this lives: bound, so no
/// server of another test can take it, but never listening. (A port that was free a moment
/// ago may be some other test's server by the time fastpull connects.)
pub struct ClosedPort {
    _socket: std::os::fd::OwnedFd,
    port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socket");
        rustix::net::bind(
            &socket,
            &std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
        )
        .expect("bind 127.0.0.1:0");
        let addr = rustix::net::getsockname(&socket).expect("getsockname");
        let port = std::net::SocketAddrV4::try_from(addr)
            .expect("an IPv4 address")
            .port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

/// Whether process `pid` holds a TCP socket listening on `ip:port` (from `/proc/net/tcp` and
/// `/proc/PID/fd`): the server answering there is that process, not another one that took
/// the port first.
pub fn listens_on(pid: u32, ip: Ipv4Addr, port: u16) -> bool {
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // sl local_address rem_address st … inode; st 0A is LISTEN.
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == want && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// A helper server started on a free port of `ip`, trying up to five ports: another test's
/// server may take a port between the moment it was found free and the moment ours binds it.
/// `spawn(port, attempt)` starts it and returns the child and its log file. An attempt
/// succeeds once the child itself listens on the port ([`listens_on`]); it fails when the
/// child exits (a bind error) or does not listen within 10 s.
/// Returns the child, the port and the log; panics with every attempt's story.
pub fn start_on_free_port(
    what: &str,
    ip: Ipv4Addr,
    spawn: impl FnMut(u16, u32) -> (std::process::Child, std::path::PathBuf),
) -> (std::process::Child, u16, std::path::PathBuf) {
    start_on_ports(
        what,
        ip,
        std::iter::repeat_with(|| free_port_on(ip)).take(5),
        spawn,
    )
}

/// [`start_on_free_port`] trying `ports` in turn.
pub fn start_on_ports(
    what: &str,
    ip: Ipv4Addr,
    ports: impl IntoIterator<Item = u16>,
    mut spawn: impl FnMut(u16, u32) -> (std::process::Child, std::path::PathBuf),
) -> (std::process::Child, u16, std::path::PathBuf) {
    let mut failures = Vec::new();
    for (port, attempt) in ports.into_iter().zip(1..) {
        let (mut child, log) = spawn(port, attempt);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                failures.push(format!(
                    "attempt {attempt} on port {port}: exited {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
                break;
            }
            if listens_on(child.id(), ip, port) {
                return (child, port, log);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!(
                    "attempt {attempt} on port {port}: not listening after 10 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{what} did not start:\n{}", failures.join("\n"));
}

/// A ureq agent for talking to the test registry: HTTP status codes are returned rather than
/// turned into errors, no proxy from the environment, no redirects, no transparent
/// decompression, 60 s overall timeout per request.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .accept_encoding("identity")
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent()
}

/// What a stopped or failed pull may leave in DEST's scratch directory: partial downloads with
/// their resume journals, nothing else. Returns the digests (hex) kept, sorted.
pub fn assert_only_resumable(dest: &std::path::Path) -> Vec<String> {
    let names: Vec<String> = std::fs::read_dir(dest.join(".fastpull-tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut kept = vec![];
    for n in &names {
        let (hex, ext) = n.split_once('.').unwrap_or((n, ""));
        let other = match ext {
            "partial" => format!("{hex}.journal"),
            "journal" => format!("{hex}.partial"),
            _ => panic!("left in .fastpull-tmp: {n} (of {names:?})"),
        };
        assert!(names.contains(&other), "{n} without {other}: {names:?}");
        if ext == "partial" {
            kept.push(hex.to_string());
        }
    }
    kept.sort();
    kept
}

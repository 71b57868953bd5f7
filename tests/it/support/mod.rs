//! Integration-test support: a throw-away local registry, in-memory image building and
//! pushing through the registry's upload API. Everything is blocking.
#![allow(dead_code)]

pub mod canned;
pub mod cdn;
pub mod cli;
pub mod counting;
pub mod credhelper;
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

use std::net::TcpListener;
use std::time::Duration;

pub use canned::{Canned, CannedServer};
pub use cdn::{registry_with_cdn, registry_with_counted_cdn, registry_with_tls_cdn};
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
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of the probe listener")
        .port()
}

/// A helper server started on a free 127.0.0.1 port: [`start_on_free_port`] tries up to five
/// ports. `spawn(port, attempt)` starts it and returns the child and its log file;
/// `ready(port, log, child)` says it is up and is ours (not another server that took the
/// port).
/// Returns the child, the port and the log; panics with every attempt's story.
pub fn start_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16, u32) -> (std::process::Child, std::path::PathBuf),
    ready: impl Fn(u16, &std::path::Path, &mut std::process::Child) -> bool,
) -> (std::process::Child, u16, std::path::PathBuf) {
    let mut failures = Vec::new();
    for attempt in 1..=5 {
        let port = free_port();
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
            if ready(port, &log, &mut child) {
                return (child, port, log);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                failures.push(format!(
                    "attempt {attempt} on port {port}: not ready in 10 s"
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

//! Integration-test support: a throw-away local registry, in-memory image building and
//! pushing through the registry's upload API. Everything is blocking.
#![allow(dead_code)]

pub mod canned;
pub mod cdn;
pub mod cli;
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
pub use cdn::{registry_with_cdn, registry_with_tls_cdn};
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

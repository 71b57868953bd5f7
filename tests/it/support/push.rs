//! Pushing blobs, manifests and images through the registry's own upload API, fetching them
//! back, and damaging blobs behind the registry's back.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};

use ureq::http::Response;
use ureq::Body;

use super::http_agent;
use super::image::{build_index, Blob, Flavor, Image};
use super::registry::Registry;

/// Blobs larger than this are pushed with chunked (`PATCH`) uploads, smaller ones monolithically.
pub const CHUNKED_THRESHOLD: usize = 1024 * 1024;

/// Size of each `PATCH` in a chunked upload.
pub const CHUNK_SIZE: usize = 512 * 1024;

/// Largest response body the helpers will read.
const MAX_BODY: u64 = 1 << 30;

/// A non-2xx (or otherwise unexpected) answer from the registry.
#[derive(Debug, Clone)]
pub struct HttpFailure {
    /// HTTP method.
    pub method: String,
    /// Request URL.
    pub url: String,
    /// Response status (0 for a transport error).
    pub status: u16,
    /// Response body (or the transport error text).
    pub body: String,
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}: {}",
            self.method, self.url, self.status, self.body
        )
    }
}

/// A response read in full.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// `Docker-Content-Digest` header, if any.
    pub digest: Option<String>,
    /// `Content-Length` header, if any.
    pub content_length: Option<u64>,
    /// Body bytes.
    pub body: Vec<u8>,
}

fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Reads a whole response into a [`Fetched`].
fn read_response(method: &str, url: &str, mut resp: Response<Body>) -> Fetched {
    let status = resp.status().as_u16();
    let content_type = header(&resp, "Content-Type");
    let digest = header(&resp, "Docker-Content-Digest");
    let content_length = header(&resp, "Content-Length").and_then(|v| v.parse().ok());
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .unwrap_or_else(|e| panic!("{method} {url}: reading response body: {e}"));
    Fetched {
        status,
        content_type,
        digest,
        content_length,
        body,
    }
}

/// Panics unless `resp` has status `want`; returns it otherwise.
fn expect_status(method: &str, url: &str, resp: Response<Body>, want: u16) -> Response<Body> {
    if resp.status().as_u16() == want {
        return resp;
    }
    let got = read_response(method, url, resp);
    panic!(
        "{method} {url}: expected {want}, registry answered {} with body: {}",
        got.status,
        String::from_utf8_lossy(&got.body)
    );
}

fn send_err(method: &str, url: &str, e: ureq::Error) -> ! {
    panic!("{method} {url}: request failed: {e}")
}

/// Resolves a `Location` header (absolute, absolute-path or relative) against `request_url`.
fn resolve_location(reg: &Registry, request_url: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{}", reg.url(), location)
    } else {
        let base = request_url.split('?').next().unwrap_or(request_url);
        let dir = &base[..base.rfind('/').map_or(base.len(), |i| i + 1)];
        format!("{dir}{location}")
    }
}

fn location(reg: &Registry, method: &str, url: &str, resp: &Response<Body>) -> String {
    let loc = header(resp, "Location")
        .unwrap_or_else(|| panic!("{method} {url}: response has no Location header"));
    resolve_location(reg, url, &loc)
}

/// Appends `digest=<digest>` to an upload URL, with `?` or `&` as appropriate.
fn with_digest(url: &str, digest: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}digest={digest}")
}

/// Uploads `blob` into `repo` (monolithic `PUT`, or `PATCH` chunks above
/// [`CHUNKED_THRESHOLD`]). Panics on any unexpected answer.
pub fn push_blob(reg: &Registry, repo: &str, blob: &Blob) {
    if blob.bytes.len() > CHUNKED_THRESHOLD {
        push_blob_chunked(reg, repo, blob, CHUNK_SIZE);
    } else {
        push_blob_monolithic(reg, repo, blob);
    }
}

/// Starts an upload session; returns the absolute upload URL.
fn start_upload(reg: &Registry, repo: &str) -> String {
    let url = format!("{}/v2/{repo}/blobs/uploads/", reg.url());
    let resp = http_agent()
        .post(&url)
        .send_empty()
        .unwrap_or_else(|e| send_err("POST", &url, e));
    let resp = expect_status("POST", &url, resp, 202);
    location(reg, "POST", &url, &resp)
}

/// `POST` + single `PUT ?digest=` carrying the whole body.
pub fn push_blob_monolithic(reg: &Registry, repo: &str, blob: &Blob) {
    let upload = start_upload(reg, repo);
    let url = with_digest(&upload, &blob.digest);
    let resp = http_agent()
        .put(&url)
        .header("Content-Type", "application/octet-stream")
        .send(&blob.bytes[..])
        .unwrap_or_else(|e| send_err("PUT", &url, e));
    expect_status("PUT", &url, resp, 201);
}

/// `POST`, then `PATCH` chunks of `chunk_size` bytes (following each returned `Location`),
/// then `PUT ?digest=` with an empty body.
pub fn push_blob_chunked(reg: &Registry, repo: &str, blob: &Blob, chunk_size: usize) {
    assert!(chunk_size > 0, "chunk_size must be positive");
    let mut upload = start_upload(reg, repo);
    let mut start = 0usize;
    for chunk in blob.bytes.chunks(chunk_size) {
        let end = start + chunk.len() - 1;
        let resp = http_agent()
            .patch(&upload)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Range", format!("{start}-{end}"))
            .send(chunk)
            .unwrap_or_else(|e| send_err("PATCH", &upload, e));
        let resp = expect_status("PATCH", &upload, resp, 202);
        let range = header(&resp, "Range");
        assert_eq!(
            range.as_deref(),
            Some(format!("0-{end}").as_str()),
            "PATCH {upload}: unexpected Range after uploading bytes {start}-{end}"
        );
        upload = location(reg, "PATCH", &upload, &resp);
        start = end + 1;
    }
    let url = with_digest(&upload, &blob.digest);
    let resp = http_agent()
        .put(&url)
        .send_empty()
        .unwrap_or_else(|e| send_err("PUT", &url, e));
    expect_status("PUT", &url, resp, 201);
}

/// `PUT /v2/<repo>/manifests/<reference>`; returns the `Docker-Content-Digest` header, or the
/// failure (status and registry body) instead of panicking.
pub fn try_push_manifest(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<String, HttpFailure> {
    let url = format!("{}/v2/{repo}/manifests/{reference}", reg.url());
    let failure = |status: u16, body: String| HttpFailure {
        method: "PUT".to_string(),
        url: url.clone(),
        status,
        body,
    };
    let resp = http_agent()
        .put(&url)
        .header("Content-Type", media_type)
        .send(bytes)
        .map_err(|e| failure(0, e.to_string()))?;
    let got = read_response("PUT", &url, resp);
    if got.status != 201 {
        return Err(failure(
            got.status,
            String::from_utf8_lossy(&got.body).into_owned(),
        ));
    }
    got.digest
        .ok_or_else(|| failure(201, "201 without Docker-Content-Digest header".to_string()))
}

/// `PUT /v2/<repo>/manifests/<reference>` expecting 201; returns `Docker-Content-Digest`.
pub fn push_manifest(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    try_push_manifest(reg, repo, reference, media_type, bytes).unwrap_or_else(|f| {
        panic!(
            "pushing manifest failed: {f}\n--- registry log ---\n{}",
            reg.log()
        )
    })
}

/// Pushes the config and every layer of `image`.
pub fn push_image_blobs(reg: &Registry, repo: &str, image: &Image) {
    for blob in image.blobs() {
        push_blob(reg, repo, blob);
    }
}

/// Pushes config, layers and the manifest under `tag`.
pub fn push_image(reg: &Registry, repo: &str, tag: &str, image: &Image) {
    push_image_blobs(reg, repo, image);
    push_manifest(reg, repo, tag, image.manifest_media_type(), &image.manifest);
}

/// Pushes config, layers and the manifest by its digest only (no tag).
pub fn push_image_by_digest(reg: &Registry, repo: &str, image: &Image) {
    push_image_blobs(reg, repo, image);
    push_manifest(
        reg,
        repo,
        &image.manifest_digest,
        image.manifest_media_type(),
        &image.manifest,
    );
}

/// Pushes every image by digest, then their index (see [`build_index`]) under `tag`.
/// Returns the index `(bytes, digest)`.
pub fn push_index(
    reg: &Registry,
    repo: &str,
    tag: &str,
    flavor: Flavor,
    images: &[&Image],
) -> (Vec<u8>, String) {
    for image in images {
        push_image_by_digest(reg, repo, image);
    }
    let (bytes, digest) = build_index(flavor, images);
    push_manifest(reg, repo, tag, flavor.index_media_type(), &bytes);
    (bytes, digest)
}

/// `GET /v2/<repo>/manifests/<reference>` with `Accept: accept`; any status is returned.
pub fn fetch_manifest(reg: &Registry, repo: &str, reference: &str, accept: &str) -> Fetched {
    let url = format!("{}/v2/{repo}/manifests/{reference}", reg.url());
    let resp = http_agent()
        .get(&url)
        .header("Accept", accept)
        .call()
        .unwrap_or_else(|e| send_err("GET", &url, e));
    read_response("GET", &url, resp)
}

/// `GET /v2/<repo>/blobs/<digest>`; any status is returned.
pub fn fetch_blob(reg: &Registry, repo: &str, digest: &str) -> Fetched {
    let url = format!("{}/v2/{repo}/blobs/{digest}", reg.url());
    let resp = http_agent()
        .get(&url)
        .call()
        .unwrap_or_else(|e| send_err("GET", &url, e));
    read_response("GET", &url, resp)
}

/// Flips one byte in the middle of the stored blob (size unchanged), so the registry serves
/// bytes that no longer match `digest`.
pub fn corrupt_blob_in_storage(reg: &Registry, digest: &str) {
    let path = reg.blob_data_path(digest);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open blob data {}: {e}", path.display()));
    let len = f
        .metadata()
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len();
    assert!(len > 0, "cannot corrupt empty blob {digest}");
    let pos = len / 2;
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(pos))
        .and_then(|_| f.read_exact(&mut byte))
        .unwrap_or_else(|e| panic!("read {} at {pos}: {e}", path.display()));
    byte[0] ^= 0xff;
    f.seek(SeekFrom::Start(pos))
        .and_then(|_| f.write_all(&byte))
        .and_then(|_| f.sync_all())
        .unwrap_or_else(|e| panic!("write {} at {pos}: {e}", path.display()));
}

/// Drops the last byte of the stored blob, so the registry serves a short body for `digest`.
pub fn truncate_blob_in_storage(reg: &Registry, digest: &str) {
    let path = reg.blob_data_path(digest);
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open blob data {}: {e}", path.display()));
    let len = f
        .metadata()
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len();
    assert!(len > 0, "cannot truncate empty blob {digest}");
    f.set_len(len - 1)
        .and_then(|_| f.sync_all())
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
}

//! The registry HTTP API (OCI distribution spec): ping, manifests, blobs.
//!
//! Every request goes through [`Registry::send`], which adds authorization for the registry's
//! own host, answers a 401 through [`crate::auth`], and follows redirects — never carrying
//! `Authorization` to another host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{Auth, TokenCache};
use crate::credentials::CredentialStore;
use crate::digest::Digest;
use crate::error::{redact_url, Error, Result};
use crate::http::{
    header_str, https_may_be_plain_http, is_redirect, read_body, RoundTrips, Transport,
};
use crate::manifest::{self, Document, ACCEPT, MAX_MANIFEST_BYTES};
use crate::reference::Reference;
use crate::retry::RetryPolicy;

pub(crate) const MAX_REDIRECTS: usize = 10;
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A manifest as received, checked against every digest we know for it.
#[derive(Debug, Clone)]
pub(crate) struct FetchedManifest {
    /// Exactly the bytes the registry sent.
    pub bytes: Bytes,
    /// Its media type.
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
    /// What it is.
    pub document: Document,
}

/// What a blob GET answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlobBody {
    /// `200`: the whole blob from byte 0 (the server was not asked for, or ignored, a range).
    Whole {
        /// Its `Content-Length`, if sent.
        length: Option<u64>,
    },
    /// `206`: bytes `start..=end` of a blob of `total` bytes (`None`: `*`).
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
        /// The blob's size, as the server says.
        total: Option<u64>,
    },
}

/// A blob response whose body is still to be read.
pub(crate) struct BlobResponse {
    /// What the body holds.
    pub body: BlobBody,
    /// The response (headers read, body not).
    pub response: Response<Incoming>,
    /// The URL that answered (after redirects).
    pub url: String,
    /// HTTP requests it took (redirect hops and re-sends after a 401 included).
    pub exchanges: u32,
}

/// Where a pull goes: a registry's API host, or one of its mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// `host[:port]` that serves the API.
    pub host: String,
    /// Speak plain HTTP to it.
    pub plain_http: bool,
    /// A mirror (tried before the origin, abandoned on failure).
    pub mirror: bool,
}

/// What a registry connection needs besides its endpoint.
pub(crate) struct Access<'a> {
    pub transport: Transport,
    pub retry: RetryPolicy,
    pub credentials: &'a CredentialStore,
    pub tokens: Arc<TokenCache>,
}

/// One repository on one registry, for the length of a pull.
pub(crate) struct Registry {
    transport: Transport,
    /// `scheme://host[:port]`; the scheme may fall back to plain HTTP at the first request.
    base: std::sync::RwLock<String>,
    host: String,
    repository: String,
    auth: Auth,
    retry: RetryPolicy,
    /// HTTPS first, plain HTTP if the server does not speak TLS (loopback, `--insecure`).
    may_fall_back: bool,
    /// A mirror: a failed first request is not retried (the next source is tried instead).
    mirror: bool,
    /// The first request has been answered: the scheme is settled.
    contacted: AtomicBool,
    /// The registry has answered over HTTP/2 (see [`Registry::get_blob`]).
    speaks_h2: AtomicBool,
    /// The registry answered a blob GET with the bytes itself over HTTP/2 (no redirect):
    /// its blob GETs go on their own lanes from then on (see [`Registry::get_blob`]).
    serves_blobs_over_h2: AtomicBool,
    /// The transport's round trips when this registry was opened.
    opened: RoundTrips,
}

impl Registry {
    /// Prepares a repository on an endpoint: scheme (HTTPS; plain HTTP when asked for, or as
    /// the fallback, decided at the first request, for a loopback or `--insecure` registry
    /// that does not speak TLS) and authorization with the credentials stored for the
    /// endpoint's host (for Docker Hub's API host, those of `docker.io`). No request is sent:
    /// the first one is the manifest's, and its 401 (if any) says how to authenticate, so no
    /// separate `/v2/` ping costs a round trip.
    pub(crate) fn connect(
        access: Access<'_>,
        endpoint: &Endpoint,
        reference: &Reference,
    ) -> Registry {
        let host = endpoint.host.clone();
        let credentials_for = if host == reference.api_host() {
            reference.registry().to_string()
        } else {
            host.clone()
        };
        let may_fall_back =
            !endpoint.plain_http && (is_loopback(&host) || access.transport.is_insecure(&host));
        Registry {
            base: std::sync::RwLock::new(format!(
                "{}://{host}",
                if endpoint.plain_http { "http" } else { "https" }
            )),
            auth: Auth::new(
                &credentials_for,
                reference.repository(),
                access.credentials.clone(),
                access.tokens,
                endpoint.plain_http || may_fall_back,
            ),
            opened: access.transport.round_trips(),
            transport: access.transport,
            host,
            repository: reference.repository().to_string(),
            retry: access.retry,
            may_fall_back,
            mirror: endpoint.mirror,
            contacted: AtomicBool::new(false),
            speaks_h2: AtomicBool::new(false),
            serves_blobs_over_h2: AtomicBool::new(false),
        }
    }

    /// The URL scheme and host in use (`http://127.0.0.1:5000`).
    pub(crate) fn base(&self) -> String {
        self.base.read().map(|b| b.clone()).unwrap_or_default()
    }

    /// Round trips taken since this registry was opened (by every pull sharing the client's
    /// transport meanwhile).
    pub(crate) fn round_trips(&self) -> RoundTrips {
        self.transport.round_trips().since(self.opened)
    }

    /// Runs `op` with retries. Until a first answer has come, HTTPS that meets a server not
    /// speaking TLS falls back to plain HTTP where allowed, and a mirror gets no retries, as
    /// docker and containerd leave a mirror that cannot answer for the next source at once
    /// (rather than after every retry: minutes, when it drops packets).
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        if self.contacted.load(Ordering::Acquire) {
            return self.retry.run(what, op).await;
        }
        if self.may_fall_back {
            // One HTTPS attempt: a server that does not speak TLS fails at once, and then
            // plain HTTP gets the retries.
            match op().await {
                Ok(v) => {
                    self.contacted.store(true, Ordering::Release);
                    return Ok(v);
                }
                Err(e) if https_may_be_plain_http(&e) => {
                    tracing::debug!(error = %e, "HTTPS failed on a loopback or insecure registry; trying plain HTTP");
                    if let Ok(mut b) = self.base.write() {
                        *b = format!("http://{}", self.host);
                    }
                }
                Err(e) if e.is_transient() && !self.mirror => {}
                Err(e) => return Err(e),
            }
        }
        let policy = if self.mirror {
            RetryPolicy {
                retries: 0,
                ..self.retry
            }
        } else {
            self.retry
        };
        let result = policy.run(what, op).await;
        if result.is_ok() {
            self.contacted.store(true, Ordering::Release);
        }
        result
    }

    /// Fetches a manifest by tag or digest. The sha256 of the exact bytes must equal
    /// `expected` (when pulling by digest) and the `Docker-Content-Digest` header (when sent).
    pub(crate) async fn manifest(
        &self,
        reference: &str,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<FetchedManifest> {
        self.call("manifest", || {
            self.manifest_once(reference, expected, expected_size)
        })
        .await
    }

    async fn manifest_once(
        &self,
        reference: &str,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<FetchedManifest> {
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.base(),
            self.repository
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
        let (resp, url) = self.send(Method::GET, &url, headers).await?;
        if !resp.status().is_success() {
            return Err(self.error_for(resp, &url, true).await);
        }
        let too_large = || Error::ManifestTooLarge {
            url: redact_url(&url),
            limit: MAX_MANIFEST_BYTES,
        };
        if content_length(resp.headers()).is_some_and(|n| n > MAX_MANIFEST_BYTES) {
            return Err(too_large());
        }
        let content_type = header_str(resp.headers(), header::CONTENT_TYPE).map(str::to_string);
        let header_digest = header_str(resp.headers(), "docker-content-digest").map(str::to_string);
        let bytes = match read_body(resp, MAX_MANIFEST_BYTES as usize, &url).await {
            Ok(b) => b,
            Err(Error::Network { source, .. })
                if source.to_string().contains("length limit exceeded") =>
            {
                return Err(too_large())
            }
            Err(e) => return Err(e),
        };
        let digest = Digest::of(&bytes);
        let what = format!("manifest {}", redact_url(&url));
        if let Some(want) = expected {
            if digest != *want {
                return Err(Error::DigestMismatch {
                    what,
                    expected: *want,
                    actual: digest,
                });
            }
        }
        if let Some(size) = expected_size {
            if bytes.len() as u64 != size {
                return Err(Error::SizeMismatch {
                    what,
                    expected: size,
                    actual: bytes.len() as u64,
                });
            }
        }
        if let Some(h) = header_digest {
            // Only sha256 headers can be checked; others are ignored, as docker does.
            if h.starts_with("sha256:") {
                let claimed: Digest = h.parse().map_err(|e| Error::InvalidManifest {
                    what: what.clone(),
                    reason: format!("bad Docker-Content-Digest header: {e}"),
                })?;
                if claimed != digest {
                    return Err(Error::DigestMismatch {
                        what: format!("{what} (Docker-Content-Digest header)"),
                        expected: claimed,
                        actual: digest,
                    });
                }
            }
        }
        let (media_type, document) = manifest::parse(&bytes, content_type.as_deref(), &what)?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
            document,
        })
    }

    /// The registry's URL for a blob.
    pub(crate) fn blob_url(&self, digest: &Digest) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base(), self.repository)
    }

    /// The repository's tags (`GET /v2/<name>/tags/list`), every page (`Link: <…>;
    /// rel="next"`, as distribution paginates), in the order the registry lists them.
    pub(crate) async fn tags(&self) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let mut url = format!("{}/v2/{}/tags/list", self.base(), self.repository);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let (resp, final_url) = self
                .call("tags", || self.send(Method::GET, &url, HeaderMap::new()))
                .await?;
            if !resp.status().is_success() {
                return Err(self.error_for(resp, &final_url, true).await);
            }
            let next = header_str(resp.headers(), header::LINK).and_then(next_link);
            let bytes = read_body(resp, MAX_MANIFEST_BYTES as usize, &final_url).await?;
            let page: Page = serde_json::from_slice(&bytes).map_err(|e| Error::Protocol {
                url: redact_url(&final_url),
                message: format!("tags list is not the expected JSON: {e}"),
            })?;
            out.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) if n.starts_with('/') => url = format!("{}{n}", self.base()),
                Some(n) => url = n,
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    /// A blob's whole body (the registry's URL, redirects followed), for streaming.
    pub(crate) async fn blob_body(&self, digest: &Digest) -> Result<Incoming> {
        let url = self.blob_url(digest);
        let resp = self
            .call("blob", || self.get_blob(&url, None, 0, true))
            .await?;
        Ok(resp.response.into_body())
    }

    /// A small blob (a config) read whole into memory, at most `limit` bytes, its sha256
    /// checked against `digest`.
    pub(crate) async fn small_blob(&self, digest: &Digest, limit: usize) -> Result<Bytes> {
        let url = self.blob_url(digest);
        self.call("blob", || async {
            let resp = self.get_blob(&url, None, 0, true).await?;
            let bytes = read_body(resp.response, limit, &url).await?;
            let actual = Digest::of(&bytes);
            if actual != *digest {
                return Err(Error::DigestMismatch {
                    what: format!("blob {digest}"),
                    expected: *digest,
                    actual,
                });
            }
            Ok(bytes)
        })
        .await
    }

    /// GETs (part of) a blob from `url` — the registry's blob URL or where it redirected
    /// to — on connection lane `lane`, with `Range: bytes=from-to` (inclusive) when given.
    /// A `206` must name the bytes it holds in a valid `Content-Range`; other statuses than
    /// 200 and 206 become errors.
    ///
    /// A registry that speaks HTTP/2 gets the request on lane 0, where the manifest came
    /// (when `share` allows: a retry goes on its own lane, so that a stale or broken shared
    /// connection cannot hold every try):
    /// most registries answer a blob GET with a redirect to a CDN, and those answers then
    /// share the connection already open (as Go's and reqwest's clients share it) instead
    /// of each blob opening one of its own, two round trips at least with TLS. A registry
    /// that answers with the bytes itself would put every blob on that one connection (and
    /// a cap per connection on all of them): that answer is dropped, the request sent
    /// again on `lane`, and the registry's blob GETs go on their own lanes from then on.
    /// Over HTTP/1.1 every request goes on `lane` as before (a connection per request in
    /// flight either way, and each lane's pool keeps the connections its own requests
    /// opened, for the next pieces on that lane).
    pub(crate) async fn get_blob(
        &self,
        url: &str,
        range: Option<(u64, u64)>,
        lane: usize,
        share: bool,
    ) -> Result<BlobResponse> {
        let mut headers = HeaderMap::new();
        if let Some((from, to)) = range {
            let v = HeaderValue::from_str(&format!("bytes={from}-{to}"))
                .map_err(|e| Error::network("build request for", url, e))?;
            headers.insert(header::RANGE, v);
        }
        let mut exchanges = 0;
        let registry_lane = if share
            && self.speaks_h2.load(Ordering::Relaxed)
            && !self.serves_blobs_over_h2.load(Ordering::Relaxed)
        {
            0
        } else {
            lane
        };
        let (mut resp, mut final_url) = self
            .send_counted(
                (registry_lane, lane),
                Method::GET,
                url,
                &headers,
                &mut exchanges,
            )
            .await?;
        if !self.transport.same_pool(registry_lane, lane)
            && resp.version() == http::Version::HTTP_2
            && matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT)
            && origin_of(&final_url) == origin_of(&self.base())
        {
            if !self.serves_blobs_over_h2.swap(true, Ordering::Relaxed) {
                tracing::debug!(
                    registry = %self.host,
                    "the registry serves blobs itself over HTTP/2: their GETs go on connections of their own"
                );
            }
            drop(resp); // resets that stream
            (resp, final_url) = self
                .send_counted((lane, lane), Method::GET, url, &headers, &mut exchanges)
                .await?;
        }
        let body = match resp.status() {
            StatusCode::OK => BlobBody::Whole {
                length: content_length(resp.headers()),
            },
            StatusCode::PARTIAL_CONTENT => {
                let parsed =
                    header_str(resp.headers(), header::CONTENT_RANGE).and_then(parse_content_range);
                let Some((start, end, total)) = parsed.filter(|(s, e, _)| s <= e) else {
                    return Err(Error::Registry {
                        url: redact_url(&final_url),
                        status: 206,
                        code: None,
                        message: "206 without a valid Content-Range".into(),
                        retry_after: None,
                        retries: 0,
                    });
                };
                BlobBody::Partial { start, end, total }
            }
            _ => return Err(self.error_for(resp, &final_url, false).await),
        };
        Ok(BlobResponse {
            body,
            response: resp,
            url: final_url,
            exchanges,
        })
    }

    /// Sends a request: authorization for our host, a re-send after a 401, redirects
    /// followed (http/https only, at most [`MAX_REDIRECTS`], no credentials to other hosts).
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<(Response<Incoming>, String)> {
        self.send_on(0, method, url, headers).await
    }

    async fn send_on(
        &self,
        lane: usize,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<(Response<Incoming>, String)> {
        self.send_counted((lane, lane), method, url, &headers, &mut 0)
            .await
    }

    /// [`Registry::send_on`], adding to `exchanges` each request it sends (redirect hops and
    /// re-sends after a 401 included); requests to the registry's own origin go on the first
    /// of `lanes`, the others (a CDN it redirected to) on the second.
    async fn send_counted(
        &self,
        (registry_lane, lane): (usize, usize),
        method: Method,
        url: &str,
        headers: &HeaderMap,
        exchanges: &mut u32,
    ) -> Result<(Response<Incoming>, String)> {
        let mut url = url.to_string();
        let mut auth_rounds = 0;
        let base_origin = origin_of(&self.base());
        for _ in 0..=MAX_REDIRECTS {
            // Credentials go only to the registry's own origin: same scheme, host and port
            // (no token over a plain-HTTP downgrade, none to a CDN).
            let same_host = origin_of(&url) == base_origin;
            let mut h = headers.clone();
            let (generation, auth) = self.auth.header(&self.transport).await?;
            if let (true, Some(v)) = (same_host, auth) {
                h.insert(header::AUTHORIZATION, v);
            }
            *exchanges += 1;
            let resp = self
                .transport
                .send_on(
                    if same_host { registry_lane } else { lane },
                    method.clone(),
                    &url,
                    h,
                    Bytes::new(),
                )
                .await?;
            let status = resp.status();
            if same_host && resp.version() == http::Version::HTTP_2 {
                self.speaks_h2.store(true, Ordering::Relaxed);
            }
            // A 401 gets one new `Authorization`; a second only when the refused one was a
            // token from the client's cache that this registry had not accepted yet (it
            // may have stopped taking it before the lifetime it was issued with).
            if status == StatusCode::UNAUTHORIZED
                && same_host
                && (auth_rounds == 0 || auth_rounds == 1 && self.auth.was_cached(generation).await)
            {
                auth_rounds += 1;
                let challenge = challenges(resp.headers());
                self.auth
                    .on_unauthorized(&self.transport, generation, challenge.as_deref())
                    .await?;
                continue;
            }
            if is_redirect(status) {
                let next = redirect_target(&url, &resp)?;
                tracing::debug!(from = %redact_url(&url), to = %redact_url(&next), "redirect");
                url = next;
                continue;
            }
            return Ok((resp, url));
        }
        Err(Error::Protocol {
            url: redact_url(&url),
            message: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// Turns an error response into a typed error, decoding the registry's JSON `errors`.
    async fn error_for(&self, resp: Response<Incoming>, url: &str, is_manifest: bool) -> Error {
        let status = resp.status();
        let retry_after = crate::http::retry_after(resp.headers());
        let body = read_body(resp, MAX_ERROR_BODY, url)
            .await
            .unwrap_or_default();
        let (code, message) = decode_errors(&body);
        if origin_of(url) != origin_of(&self.base()) {
            // A host the registry redirected to (a CDN, object storage): its answer says
            // nothing about our registry credentials, and its body may echo signed URLs.
            return Error::Registry {
                url: redact_url(url),
                status: status.as_u16(),
                code,
                message: "refused by the host the registry redirected to".into(),
                retry_after,
                retries: 0,
            };
        }
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized {
                registry: self.host.clone(),
                repository: self.repository.clone(),
                code,
                message,
            },
            StatusCode::NOT_FOUND
                if is_manifest
                    && matches!(
                        code.as_deref(),
                        None | Some("MANIFEST_UNKNOWN" | "NAME_UNKNOWN")
                    ) =>
            {
                let wanted = wanted_manifest(url);
                let sep = if wanted.starts_with("sha256:") {
                    '@'
                } else {
                    ':'
                };
                Error::ManifestNotFound {
                    reference: format!("{}{sep}{wanted}", self.repository),
                    registry: self.host.clone(),
                    code,
                }
            }
            _ => Error::Registry {
                url: redact_url(url),
                status: status.as_u16(),
                code,
                message,
                retry_after,
                retries: 0,
            },
        }
    }
}

/// Decodes `{"errors":[{"code":…,"message":…}]}`; falls back to the body's first line.
fn decode_errors(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        if let Some(first) = e.errors.first() {
            let mut message = first.message.clone().unwrap_or_default();
            for more in e.errors.iter().skip(1) {
                if let Some(m) = &more.message {
                    message.push_str("; ");
                    message.push_str(m);
                }
            }
            return (first.code.as_deref().map(one_line), one_line(&message));
        }
    }
    let text = String::from_utf8_lossy(body);
    let line: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    (None, one_line(&line))
}

/// What a server said, as one line of text: control characters (an escape sequence, a
/// newline that would fake another line of ours) shown as `?`.
fn one_line(said: &str) -> String {
    said.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Every `WWW-Authenticate` of a response as one list (a server may send one challenge per
/// header: `Basic` in one, `Bearer` in the next).
fn challenges(h: &HeaderMap) -> Option<String> {
    let all: Vec<&str> = h
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!all.is_empty()).then(|| all.join(", "))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    header_str(h, header::CONTENT_LENGTH).and_then(|v| v.parse().ok())
}

/// `bytes start-end/total` (total may be `*`).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

/// The tag or digest a manifest URL asks for: its path's last segment. Never its query
/// (a same-origin redirect may have signed one) or fragment, which go to the user's screen
/// otherwise.
fn wanted_manifest(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    path.rsplit('/').next().unwrap_or_default()
}

/// The `host[:port]` of an absolute URL.
pub(crate) fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    Some(crate::http::without_userinfo(authority))
}

/// `scheme://host[:port]`, lower-cased: what must match for credentials to be sent.
pub(crate) fn origin_of(url: &str) -> Option<String> {
    let scheme = url.split_once("://")?.0;
    Some(format!("{}://{}", scheme, host_of(url)?).to_ascii_lowercase())
}

/// Where the redirect `resp` (to a request for `url`) sends us: its `Location` resolved
/// against `url`, refused unless http(s).
pub(crate) fn redirect_target(url: &str, resp: &Response<Incoming>) -> Result<String> {
    let location = header_str(resp.headers(), header::LOCATION).ok_or_else(|| Error::Protocol {
        url: redact_url(url),
        message: format!(
            "HTTP {} redirect without a Location",
            resp.status().as_u16()
        ),
    })?;
    let next = resolve(url, location);
    let lower = next.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return Err(Error::Protocol {
            url: redact_url(url),
            message: format!(
                "refusing a redirect to a non-http(s) URL {}",
                redact_url(&next)
            ),
        });
    }
    Ok(next)
}

/// Whether a `Location` is absolute (`scheme:` before any `/`, `?` or `#`).
fn has_scheme(location: &str) -> bool {
    match location.find(':') {
        Some(i) => {
            let scheme = &location[..i];
            !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}

/// Resolves a `Location` against the URL it came from.
fn resolve(base: &str, location: &str) -> String {
    if has_scheme(location) {
        return location.to_string();
    }
    let Some((scheme, rest)) = base.split_once("://") else {
        return location.to_string();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(l) = location.strip_prefix("//") {
        return format!("{scheme}://{l}");
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let path = &rest[authority.len()..];
    let path = path.split('?').next().unwrap_or(path);
    let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
    format!("{scheme}://{authority}{dir}{location}")
}

/// Docker's default insecure range: loopback may speak plain HTTP.
pub(crate) fn is_loopback(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// The `rel="next"` target of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| target.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a "manifest unknown" error names: the tag or digest asked for, never a query a
    /// redirect added (red when the last segment was taken from the whole URL).
    #[test]
    fn the_manifest_asked_for_is_named_without_the_query() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        for (url, wanted) in [
            ("https://r.example/v2/team/app/manifests/1.2", "1.2"),
            (
                "https://r.example/v2/team/app/manifests/latest?X-Amz-Signature=s3cr3t#f",
                "latest",
            ),
            (
                &*format!("https://r.example/v2/team/app/manifests/{digest}?sig=s3cr3t"),
                digest.as_str(),
            ),
        ] {
            assert_eq!(wanted_manifest(url), wanted, "{url}");
        }
    }

    #[test]
    fn decodes_registry_errors() {
        let (c, m) = decode_errors(
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#,
        );
        assert_eq!(c.as_deref(), Some("MANIFEST_UNKNOWN"));
        assert_eq!(m, "manifest unknown");
        let (c, m) = decode_errors(b"<html>bad gateway</html>\nmore");
        assert_eq!(c, None);
        assert_eq!(m, "<html>bad gateway</html>");
        // Control characters a registry sends (an escape sequence through JSON's \u001b, a
        // newline) reach no terminal (red when the message was taken as sent).
        let (c, m) = decode_errors(
            br#"{"errors":[{"code":"X\u001b]0;t\u0007","message":"a\u001b[2Jb\nfastpull: ok"}]}"#,
        );
        assert_eq!(c.as_deref(), Some("X?]0;t?"));
        assert_eq!(m, "a?[2Jb?fastpull: ok");
        let (_, m) = decode_errors(b"\x1b[31mred\x1b[0m");
        assert_eq!(m, "?[31mred?[0m");
    }

    #[test]
    fn parses_content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn resolves_locations() {
        assert_eq!(
            resolve("http://a:1/v2/x/blobs/y", "/other"),
            "http://a:1/other"
        );
        assert_eq!(
            resolve("http://a:1/v2/x/blobs/y", "https://cdn/z?s=1"),
            "https://cdn/z?s=1"
        );
        assert_eq!(
            resolve("https://a/v2/x/blobs/y?q", "z"),
            "https://a/v2/x/blobs/z"
        );
        assert_eq!(resolve("https://a/v2/", "//b/c"), "https://b/c");
        assert_eq!(
            resolve("http://a/v2/x", "/cdn/x?next=http://y"),
            "http://a/cdn/x?next=http://y",
            "a relative Location with :// in its query"
        );
        assert_eq!(resolve("http://a/v2/x", "ftp://b/c"), "ftp://b/c");
    }

    /// A registry on loopback that sends its `Basic` and `Bearer` challenges in two
    /// `WWW-Authenticate` headers and serves `/token` itself. Pings with the token succeed.
    #[tokio::test]
    async fn challenges_in_several_headers_are_all_read() {
        const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let realm = format!("http://{addr}/token");
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let realm = realm.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let (status, extra, body) = if head.starts_with("get /token") {
                        ("200 OK", String::new(), r#"{"token":"abc"}"#)
                    } else if head.contains("authorization: bearer abc\r\n") {
                        (
                            "200 OK",
                            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                                .to_string(),
                            MANIFEST,
                        )
                    } else {
                        (
                            "401 Unauthorized",
                            format!(
                                "WWW-Authenticate: Basic realm=\"r\"\r\n\
                                 WWW-Authenticate: Bearer realm=\"{realm}\",service=\"s\"\r\n"
                            ),
                            "",
                        )
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        let t = std::time::Duration::from_secs(10);
        let transport = Transport::new("test", t, t, 1, Default::default(), false).unwrap();
        let reference: Reference = format!("{addr}/team/app:v1").parse().unwrap();
        let endpoint = Endpoint {
            host: addr,
            plain_http: true,
            mirror: false,
        };
        let access = Access {
            transport,
            retry: RetryPolicy {
                retries: 0,
                base_delay: t,
            },
            credentials: &CredentialStore::none(),
            tokens: Arc::default(),
        };
        let registry = Registry::connect(access, &endpoint, &reference);
        let fetched = registry.manifest("v1", None, None).await;
        assert!(fetched.is_ok(), "{:?}", fetched.err());
        // No ping: the manifest request, its 401, the token, the manifest again.
        assert_eq!(registry.round_trips().requests, 3);
    }

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(host_of("http://127.0.0.1:5000/v2/"), Some("127.0.0.1:5000"));
        assert_eq!(host_of("https://u:p@h/x?y"), Some("h"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.8.9.1"));
        assert!(is_loopback("localhost:80"));
        assert!(is_loopback("[::1]:5000"));
        assert!(is_loopback("LOCALHOST:5000"));
        assert_eq!(
            origin_of("HTTPS://Reg:5000/v2/x"),
            Some("https://reg:5000".into())
        );
        assert_ne!(origin_of("http://reg/v2/"), origin_of("https://reg/v2/"));
        assert!(!is_loopback("10.0.0.1:5000"));
        assert!(!is_loopback("registry-1.docker.io"));
    }
}

//! The HTTP transport: one pooled hyper client (HTTP/1.1 and HTTP/2, rustls with the `ring`
//! provider) shared by every request of a pull.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::{BoxError, Error, Result};

/// Request bodies are small (token POSTs) or empty.
pub(crate) type Body = Full<Bytes>;

/// Shared HTTP client. It has several *lanes*, each its own connection pool: over HTTP/2
/// one pool multiplexes every request on one connection, and a CDN caps each connection,
/// so chunk requests are spread over lanes to get as many connections as requests.
#[derive(Clone)]
pub(crate) struct Transport {
    lanes: Vec<Client<HttpsConnector<HttpConnector>, Body>>,
    user_agent: http::HeaderValue,
    /// How long a response (headers, or the next body bytes) may take before we give up.
    stall_timeout: Duration,
}

impl Transport {
    pub(crate) fn new(
        user_agent: &str,
        connect_timeout: Duration,
        stall_timeout: Duration,
        lanes: usize,
    ) -> Result<Self> {
        let tls = tls_config()?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let lanes = (0..lanes.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(https.clone())
            })
            .collect();
        let user_agent = http::HeaderValue::from_str(user_agent)
            .map_err(|_| Error::InvalidOption(format!("bad user agent {user_agent:?}")))?;
        Ok(Transport {
            lanes,
            user_agent,
            stall_timeout,
        })
    }

    /// Sends one request on lane 0 (no redirects followed, no auth added).
    pub(crate) async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        self.send_on(0, method, url, headers, body).await
    }

    /// Sends one request on lane `lane` (modulo the lane count).
    pub(crate) async fn send_on(
        &self,
        lane: usize,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(url)
            .body(Full::new(body))
            .map_err(|e| Error::Protocol {
                url: crate::error::redact_url(url),
                message: format!("cannot build a request: {e}"),
            })?;
        *req.headers_mut() = headers;
        req.headers_mut()
            .insert(http::header::USER_AGENT, self.user_agent.clone());
        let what = if method == Method::HEAD {
            "HEAD"
        } else if method == Method::POST {
            "POST"
        } else {
            "GET"
        };
        match tokio::time::timeout(
            self.stall_timeout,
            self.lanes[lane % self.lanes.len()].request(req),
        )
        .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(e, what, url)),
            Err(_) => Err(Error::network(
                what,
                url,
                format!("no response within {}s", self.stall_timeout.as_secs()),
            )),
        }
    }
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub(crate) async fn read_body(resp: Response<Incoming>, limit: usize, url: &str) -> Result<Bytes> {
    Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| Error::network("read body of", url, e))
}

/// Whether a status is a redirect we follow.
pub(crate) fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// Whether HTTPS failed in a way that plain HTTP may fix: the server answered the TLS
/// handshake with something that is not TLS, or nothing listens on the port. Certificate
/// problems are not such a case.
pub(crate) fn https_may_be_plain_http(err: &Error) -> bool {
    match err {
        Error::Tls { not_tls, .. } => *not_tls,
        Error::Network { what, .. } => *what == CONNECT,
        _ => false,
    }
}

const CONNECT: &str = "connect to";

/// Turns hyper's error into ours: TLS failures are their own (permanent) kind, connection
/// set-up failures are marked, the rest is a transient network error.
fn classify(e: hyper_util::client::legacy::Error, what: &'static str, url: &str) -> Error {
    if let Some(tls) = find_rustls_error(&e) {
        let not_tls = matches!(tls, rustls::Error::InvalidMessage(_));
        let message = if not_tls {
            "the server does not speak TLS (use --plain-http for a plain-HTTP registry)".to_string()
        } else {
            tls.to_string()
        };
        return Error::Tls {
            url: crate::error::redact_url(url),
            message,
            not_tls,
        };
    }
    if e.is_connect() {
        Error::network(CONNECT, url, flatten(e))
    } else {
        Error::network(what, url, flatten(e))
    }
}

/// rustls errors hide inside `io::Error`s, whose `source()` skips the wrapped error itself.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                    return Some(t);
                }
            }
        }
        cur = err.source();
    }
    None
}

/// hyper-util's error hides its cause behind `source()`; keep the whole chain in the text.
fn flatten(e: hyper_util::client::legacy::Error) -> BoxError {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text.into()
}

fn tls_config() -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidOption(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

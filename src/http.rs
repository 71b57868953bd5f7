//! The HTTP transport: pooled hyper clients (HTTP/1.1, and HTTP/2 by ALPN) over rustls with
//! the `ring` provider, shared by every request of a pull.
//!
//! One connector serves every host: it picks each host's TLS settings (system roots plus
//! `--ca-file`s; docker's `certs.d/<host>/` CA and client-certificate files; no verification
//! for a host named by `--insecure`) and goes through the proxy the environment names
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, curl's rules): for an HTTP proxy a
//! CONNECT tunnel for https and absolute-form requests for plain http; for a SOCKS5 proxy
//! (`socks5://`, `socks5h://`, as curl reads them) a tunnel for both.
//!
//! A connection to a near host (loopback, or one that opened within [`NEAR_CONNECT`]: the same
//! machine, a LAN) asks for a [`NEAR_RECV_BUFFER`] receive buffer ([`Direct`]); every other
//! keeps the kernel's autotuning, which does the right thing over distance. Likewise over
//! HTTP/2, whose windows hold in our memory what the kernel would hold over HTTP/1.1: once a
//! connection to an origin was near (its TLS handshake too, [`H2_NEAR_HANDSHAKE`]) and spoke
//! HTTP/2, that origin's later requests go to a second set of lanes whose windows are
//! [`H2_NEAR_WINDOW`] (connections opened before stay in the first set, idle); others keep
//! hyper's defaults.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector, HttpInfo};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tower_service::Service;

use crate::error::{BoxError, Error, Result};

/// Request bodies are small (token POSTs) or empty.
pub(crate) type Body = Full<Bytes>;

/// Where docker, podman and containerd users keep per-registry certificates, in the order
/// they are searched (`<dir>/<host[:port]>/`).
pub const DEFAULT_CERT_DIRS: &[&str] = &["/etc/containers/certs.d", "/etc/docker/certs.d"];

/// TLS settings beyond the system's roots.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsOptions {
    /// Extra trusted roots (PEM files), for every host.
    pub ca_files: Vec<PathBuf>,
    /// Directories of per-host directories (`<host[:port]>/`) holding `*.crt` CA roots and
    /// `*.cert` + `*.key` client certificate pairs, docker's `certs.d` convention.
    pub cert_dirs: Vec<PathBuf>,
    /// Hosts (`host` for any port, or `host:port`) whose certificates are not verified.
    pub insecure: Vec<String>,
}

impl TlsOptions {
    /// Whether `authority` (`host[:port]`) was named insecure. A user part
    /// (`reg.lab:@elsewhere`, which a redirect may carry) is not the host: the connection
    /// goes to what follows it.
    pub(crate) fn is_insecure(&self, authority: &str) -> bool {
        let authority = without_userinfo(authority).to_ascii_lowercase();
        let host = host_part(&authority);
        self.insecure.iter().any(|i| {
            let i = i.to_ascii_lowercase();
            i == authority || (i == host && !has_port(&i))
        })
    }
}

/// Shared HTTP client. It has several *lanes*, each its own connection pool: over HTTP/2
/// one pool multiplexes every request on one connection, and a CDN caps each connection,
/// so chunk requests are spread over lanes to get as many connections as requests.
#[derive(Clone)]
pub(crate) struct Transport {
    lanes: Vec<Client<Connector, Body>>,
    /// The same lanes for origins whose connections are near and speak HTTP/2: their
    /// flow-control windows are [`H2_NEAR_WINDOW`] instead of hyper's defaults.
    near_lanes: Vec<Client<Connector, Body>>,
    /// Origins (see [`origin_key`]) a connection found near and speaking HTTP/2.
    near_h2: Arc<Mutex<std::collections::HashSet<String>>>,
    counters: Arc<Counters>,
    user_agent: http::HeaderValue,
    /// How long a response (headers, or the next body bytes) may take before we give up.
    stall_timeout: Duration,
    proxy: Arc<Matcher>,
    tls: Arc<TlsProfiles>,
    /// The local address of every connection a response came on: a response on one not
    /// seen before came on a connection opened for its request.
    seen: Arc<std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>>,
}

/// How one exchange went, in the extensions of the response [`Transport::send_on`] returns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    /// From sending the request to its response's headers.
    pub took: Duration,
    /// Whether the connection was opened for this request (None: not known, as through a
    /// tunnel).
    pub fresh: Option<bool>,
    /// On a direct TLS connection: from its handshake's end (or the sending, if later) to
    /// the response's headers.
    pub since_handshake: Option<Duration>,
}

impl Exchange {
    /// The round trip this exchange shows, the server's think time included, and whether
    /// it is exact. A request on a connection already open waited one round trip: exact. On
    /// a direct TLS connection the time is counted from the later of sending and the
    /// handshake's end (hyper writes a request at once when its connection is ready), so a
    /// request that waited for a new connection's handshake, its own or another's, is
    /// exact too, whatever the handshake cost (TCP's round trip, TLS 1.3's one or 1.2's
    /// two, a retried hello, a middlebox's own handshake hidden from the connect time). A
    /// plain connection opened for it waited for the TCP handshake, which a middlebox may
    /// hide in its first bytes: that counts half, which errs low by half the server's think
    /// time, so it is not exact. Unknown (through a tunnel): the whole time, not exact.
    pub(crate) fn round_trip(&self) -> (Duration, bool) {
        match (self.fresh, self.since_handshake) {
            // Also for a request that waited for another's new HTTP/2 connection (not the
            // first response on it, so not "fresh"): counted from the handshake's end too.
            (_, Some(since)) => (since.min(self.took), true),
            (Some(true), None) => (self.took / 2, false),
            (Some(false), None) => (self.took, true),
            (None, None) => (self.took, false),
        }
    }
}

/// When a direct TLS connection's handshake ended: an extra of its [`Connected`], so in the
/// extensions of every response on it.
#[derive(Debug, Clone, Copy)]
struct Handshaken(std::time::Instant);

/// Local addresses remembered at most (one per connection; a long-lived client forgets
/// them all past this, and a reused connection then counts as fresh once).
const SEEN_CONNECTIONS: usize = 1 << 16;

impl Transport {
    pub(crate) fn new(
        user_agent: &str,
        connect_timeout: Duration,
        stall_timeout: Duration,
        lanes: usize,
        tls: TlsOptions,
        proxy_from_env: bool,
    ) -> Result<Self> {
        let tls = Arc::new(TlsProfiles::new(tls)?);
        let proxy = Arc::new(if proxy_from_env {
            proxy_matcher_from_env()?
        } else {
            Matcher::builder().build()
        });
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let counters = Arc::new(Counters::default());
        let near_h2 = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let connector = Connector {
            http,
            tls: tls.clone(),
            proxy: proxy.clone(),
            counters: counters.clone(),
            near_h2: near_h2.clone(),
        };
        // `lanes` pools, each with these HTTP/2 windows (None: hyper's defaults).
        let pools = |window: Option<u32>| -> Vec<Client<Connector, Body>> {
            (0..lanes.max(1))
                .map(|_| {
                    Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(Duration::from_secs(90))
                        .http2_initial_stream_window_size(window)
                        .http2_initial_connection_window_size(window)
                        .build(connector.clone())
                })
                .collect()
        };
        let near_lanes = pools(Some(H2_NEAR_WINDOW));
        let lanes = pools(None);
        let user_agent = http::HeaderValue::from_str(user_agent)
            .map_err(|_| Error::InvalidOption(format!("bad user agent {user_agent:?}")))?;
        Ok(Transport {
            lanes,
            near_lanes,
            near_h2,
            counters,
            user_agent,
            stall_timeout,
            proxy,
            tls,
            seen: Default::default(),
        })
    }

    /// Whether lanes `a` and `b` are the same pool (lanes wrap around their number).
    pub(crate) fn same_pool(&self, a: usize, b: usize) -> bool {
        a % self.lanes.len() == b % self.lanes.len()
    }

    /// Whether `authority` was named by `--insecure` (no certificate checks; plain HTTP
    /// allowed as a fallback, as docker's insecure registries).
    pub(crate) fn is_insecure(&self, authority: &str) -> bool {
        self.tls.options.is_insecure(authority)
    }

    /// Round trips taken so far by this transport (all pulls of its client).
    pub(crate) fn round_trips(&self) -> RoundTrips {
        use std::sync::atomic::Ordering::Relaxed;
        RoundTrips {
            requests: self.counters.requests.load(Relaxed),
            connections: self.counters.connections.load(Relaxed),
            tls: self.counters.tls.load(Relaxed),
        }
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
        if req.uri().scheme_str() == Some("http") {
            // Plain http through a proxy is forwarded, not tunnelled: the proxy's
            // credentials ride on the request itself.
            if let Some(auth) = self
                .proxy
                .intercept(req.uri())
                .and_then(|i| i.basic_auth().cloned())
            {
                req.headers_mut()
                    .insert(http::header::PROXY_AUTHORIZATION, auth);
            }
        }
        self.counters
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let what = if method == Method::HEAD {
            "HEAD"
        } else if method == Method::POST {
            "POST"
        } else {
            "GET"
        };
        // Only TLS connections negotiate HTTP/2, so only https origins are ever noted.
        let near_h2 = req.uri().scheme_str() == Some("https")
            && origin_key(req.uri()).is_some_and(|k| {
                self.near_h2
                    .lock()
                    .is_ok_and(|near| near.contains(k.as_str()))
            });
        let pool = if near_h2 {
            &self.near_lanes
        } else {
            &self.lanes
        };
        let sent = std::time::Instant::now();
        match tokio::time::timeout(self.stall_timeout, pool[lane % pool.len()].request(req)).await {
            Ok(Ok(mut resp)) => {
                let took = sent.elapsed();
                let fresh = resp.extensions().get::<HttpInfo>().and_then(|info| {
                    let mut seen = self.seen.lock().ok()?;
                    if seen.len() >= SEEN_CONNECTIONS {
                        seen.clear();
                    }
                    Some(seen.insert(info.local_addr()))
                });
                let since_handshake = resp
                    .extensions()
                    .get::<Handshaken>()
                    .map(|h| h.0.max(sent).elapsed());
                resp.extensions_mut().insert(Exchange {
                    took,
                    fresh,
                    since_handshake,
                });
                Ok(resp)
            }
            Ok(Err(e)) => Err(classify(e, what, url)),
            Err(_) => Err(Error::network(
                what,
                url,
                format!("no response within {}s", self.stall_timeout.as_secs()),
            )),
        }
    }
}

/// The TLS client configuration of each host: one default, and per-host ones built on
/// first use for hosts with `certs.d` files or named insecure.
struct TlsProfiles {
    options: TlsOptions,
    roots: Arc<RootCertStore>,
    default: Arc<ClientConfig>,
    per_host: Mutex<HashMap<String, Arc<ClientConfig>>>,
}

impl TlsProfiles {
    fn new(options: TlsOptions) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for file in &options.ca_files {
            let added = add_pem_roots(&mut roots, file)
                .map_err(|e| Error::InvalidOption(format!("--ca-file {}: {e}", file.display())))?;
            if added == 0 {
                return Err(Error::InvalidOption(format!(
                    "--ca-file {}: no certificates in it",
                    file.display()
                )));
            }
        }
        let roots = Arc::new(roots);
        let default = Arc::new(verified_config(roots.clone(), None)?);
        Ok(TlsProfiles {
            options,
            roots,
            default,
            per_host: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration for `authority` (`host[:port]` as in the URL).
    fn for_authority(&self, authority: &str) -> std::result::Result<Arc<ClientConfig>, BoxError> {
        let key = authority.to_ascii_lowercase();
        let mut cache = self
            .per_host
            .lock()
            .map_err(|_| "TLS settings lock poisoned")?;
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let config = self
            .build_for(&key)
            .map_err(|e| -> BoxError { Box::new(CertFilesError(e.to_string())) })?;
        cache.insert(key, config.clone());
        Ok(config)
    }

    fn build_for(&self, authority: &str) -> std::result::Result<Arc<ClientConfig>, BoxError> {
        if self.options.is_insecure(authority) {
            tracing::debug!(
                host = authority,
                "TLS certificate verification is off (--insecure)"
            );
            return Ok(Arc::new(insecure_config()?));
        }
        // docker: certs.d/<host:port>/ when a port is given, else certs.d/<host>/.
        let dirs: Vec<PathBuf> = self
            .options
            .cert_dirs
            .iter()
            .map(|d| d.join(authority))
            .filter(|d| d.is_dir())
            .collect();
        if dirs.is_empty() {
            return Ok(self.default.clone());
        }
        let mut roots = (*self.roots).clone();
        let mut client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> = None;
        for dir in &dirs {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| format!("reading {}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            for path in entries {
                match path.extension().and_then(|e| e.to_str()) {
                    Some("crt") => {
                        add_pem_roots(&mut roots, &path)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                    }
                    Some("cert") if client.is_none() => {
                        let key_path = path.with_extension("key");
                        let certs = CertificateDer::pem_file_iter(&path)
                            .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
                            format!(
                                "{}: {e} (a client certificate needs its key beside it)",
                                key_path.display()
                            )
                        })?;
                        tracing::debug!(cert = %path.display(), "client certificate");
                        client = Some((certs, key));
                    }
                    _ => {}
                }
            }
        }
        Ok(Arc::new(
            verified_config(Arc::new(roots), client).map_err(|e| e.to_string())?,
        ))
    }
}

/// Adds every certificate of a PEM file to `roots`; returns how many.
fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> std::result::Result<usize, String> {
    let mut n = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| e.to_string())? {
        let cert = cert.map_err(|e| e.to_string())?;
        roots.add(cert).map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verified_config(
    roots: Arc<RootCertStore>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidOption(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| Error::InvalidOption(format!("client certificate: {e}"))),
    }
}

fn insecure_config() -> Result<ClientConfig> {
    let provider = provider();
    Ok(ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidOption(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
        .with_no_client_auth())
}

/// `--insecure`: any certificate is accepted (the handshake's signatures are still checked,
/// so the connection is encrypted to whoever holds the presented key).
#[derive(Debug)]
struct NoCertificateCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to any host: direct or through the environment's proxy, with that host's TLS
/// settings.
#[derive(Clone)]
pub(crate) struct Connector {
    http: HttpConnector,
    tls: Arc<TlsProfiles>,
    proxy: Arc<Matcher>,
    counters: Arc<Counters>,
    /// Where a direct TLS connection that is near and negotiated HTTP/2 notes its origin.
    near_h2: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// Round trips the transport has taken: requests sent, connections opened (TCP, and TLS
/// handshakes on top), for the log.
#[derive(Default)]
pub(crate) struct Counters {
    requests: std::sync::atomic::AtomicU64,
    connections: std::sync::atomic::AtomicU64,
    tls: std::sync::atomic::AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RoundTrips {
    /// Requests sent (each waits a round trip for its response).
    pub requests: u64,
    /// Connections opened (a round trip each for TCP).
    pub connections: u64,
    /// TLS handshakes (a round trip each, with TLS 1.3).
    pub tls: u64,
}

impl RoundTrips {
    /// Round trips in all.
    pub(crate) fn total(&self) -> u64 {
        self.requests + self.connections + self.tls
    }

    /// What happened since `earlier`.
    pub(crate) fn since(&self, earlier: RoundTrips) -> RoundTrips {
        RoundTrips {
            requests: self.requests - earlier.requests,
            connections: self.connections - earlier.connections,
            tls: self.tls - earlier.tls,
        }
    }
}

impl std::fmt::Display for RoundTrips {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} requests, {} connections, {} TLS handshakes)",
            self.total(),
            self.requests,
            self.connections,
            self.tls
        )
    }
}

/// A connection: plain TCP or TLS; marked when it goes to a forwarding HTTP proxy (so
/// requests on it carry absolute URIs).
pub(crate) struct Conn {
    inner: MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>,
    forwarded: bool,
    /// When the handshake of a direct TLS connection ended (see [`Exchange::round_trip`]).
    handshaken: Option<std::time::Instant>,
}

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = ConnectFuture<Conn>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        this.counters
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if dst.scheme_str() == Some("https") {
            this.counters
                .tls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Box::pin(async move {
            let intercept = this.proxy.intercept(&dst);
            // Only scheme, host and port: never what a malformed user or password left in it.
            let via = intercept.as_ref().map(|i| {
                let u = i.uri();
                let host = u.host().unwrap_or("?");
                match u.port_u16() {
                    Some(port) => format!("{}://{host}:{port}", u.scheme_str().unwrap_or("http")),
                    None => format!("{}://{host}", u.scheme_str().unwrap_or("http")),
                }
            });
            let with_proxy = |e: BoxError| -> BoxError {
                match &via {
                    Some(p) => Box::new(ViaProxy {
                        proxy: p.clone(),
                        source: e,
                    }),
                    None => e,
                }
            };
            let socks = intercept.as_ref().and_then(Socks::of);
            if let Some(socks) = socks {
                let mut tunnel = socks.connector(this.http.clone());
                let inner = if dst.scheme_str() == Some("https") {
                    let authority = dst
                        .authority()
                        .map(|a| without_userinfo(a.as_str()).to_string())
                        .ok_or("URL without a host")?;
                    let config = this.tls.for_authority(&authority)?;
                    HttpsConnectorBuilder::new()
                        .with_tls_config((*config).clone())
                        .https_only()
                        .enable_http1()
                        .enable_http2()
                        .wrap_connector(tunnel)
                        .call(dst)
                        .await
                        .map_err(with_proxy)?
                } else {
                    MaybeHttpsStream::Http(tunnel.call(dst).await.map_err(with_proxy)?)
                };
                return Ok(Conn {
                    inner,
                    forwarded: false,
                    handshaken: None,
                });
            }
            if dst.scheme_str() != Some("https") {
                let mut http = Direct::new(this.http.clone());
                let (target, forwarded) = match &intercept {
                    Some(i) => (i.uri().clone(), true),
                    None => (dst, false),
                };
                let tcp = http.call(target).await.map_err(with_proxy)?;
                return Ok(Conn {
                    inner: MaybeHttpsStream::Http(tcp),
                    forwarded,
                    handshaken: None,
                });
            }
            let authority = dst
                .authority()
                .map(|a| without_userinfo(a.as_str()).to_string())
                .ok_or("URL without a host")?;
            let config = this.tls.for_authority(&authority)?;
            let builder = HttpsConnectorBuilder::new()
                .with_tls_config((*config).clone())
                .https_only()
                .enable_http1()
                .enable_http2();
            let mut handshaken = None;
            let stream = match &intercept {
                Some(i) => {
                    let mut tunnel = Tunnel::new(i.uri().clone(), this.http.clone());
                    if let Some(auth) = i.basic_auth() {
                        tunnel = tunnel.with_auth(auth.clone());
                    }
                    builder
                        .wrap_connector(tunnel)
                        .call(dst)
                        .await
                        .map_err(with_proxy)?
                }
                None => {
                    let direct = Direct::new(this.http.clone());
                    let near = direct.near.clone();
                    let key = origin_key(&dst);
                    let started = std::time::Instant::now();
                    let stream = builder.wrap_connector(direct).call(dst).await?;
                    let ended = std::time::Instant::now();
                    handshaken = Some(ended);
                    // Near by its address or connect time, and the TLS handshake's round
                    // trip short too (a proxy or tunnel on this machine may front a far
                    // server: its connect is instant, its handshake is not).
                    let near = near.load(std::sync::atomic::Ordering::Relaxed)
                        && ended - started <= H2_NEAR_HANDSHAKE;
                    let h2 = match &stream {
                        MaybeHttpsStream::Https(tls) => {
                            tls.inner().get_ref().1.alpn_protocol() == Some(b"h2")
                        }
                        MaybeHttpsStream::Http(_) => false,
                    };
                    if let Some(key) = key.filter(|_| near && h2) {
                        let new = this
                            .near_h2
                            .lock()
                            .is_ok_and(|mut set| set.insert(key.clone()));
                        if new {
                            tracing::debug!(
                                origin = %key,
                                window_kib = H2_NEAR_WINDOW >> 10,
                                "near HTTP/2 origin: its next requests go to lanes with small flow-control windows"
                            );
                        }
                    }
                    stream
                }
            };
            Ok(Conn {
                inner: stream,
                forwarded: false,
                handshaken,
            })
        })
    }
}

/// The HTTP/2 flow-control window (a stream's, and its connection's) on a near host's
/// connections. What an HTTP/2 server may send before we read it waits in our memory (over
/// HTTP/1.1 it waits in the kernel's socket buffer), one connection per lane: hyper's default
/// windows (2 MiB a stream, 5 MiB a connection) took the peak RssAnon to 190-200 MiB in
/// perf/'s HTTP/2 world (j), 512 KiB to 62 MiB in the same time. Far hosts keep hyper's
/// defaults: a window is what one round trip can carry, and a smaller one (or hyper's
/// adaptive window, which grows from a small start too slowly) made a +100 ms HTTP/2 pull take
/// 1.3-2x as long (perf/README.md, "HTTP/2 and Connection: close").
const H2_NEAR_WINDOW: u32 = 512 << 10;
/// A connection is near enough for [`H2_NEAR_WINDOW`] if its DNS lookup, connect and TLS
/// handshake took at most this long (a round trip of a few ms at most, over which the window still carries
/// 100+ MiB/s).
const H2_NEAR_HANDSHAKE: Duration = Duration::from_millis(10);

/// `scheme://host:port` of a URL, the port filled in from the scheme: which origin a request
/// goes to, as the connector sees it.
fn origin_key(uri: &Uri) -> Option<String> {
    let scheme = uri.scheme_str()?;
    let host = uri.host()?;
    let port = uri.port_u16().or(match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    })?;
    Some(format!("{scheme}://{host}:{port}").to_ascii_lowercase())
}

/// A connection that opened within this time (DNS included) is to a near host: loopback,
/// the same machine, a LAN.
const NEAR_CONNECT: Duration = Duration::from_millis(1);
/// The receive buffer (`SO_RCVBUF`) a connection to a near host asks for; the kernel caps it
/// at `net.core.rmem_max`.
const NEAR_RECV_BUFFER: usize = 4 << 20;

/// A TCP connection made directly (not through a tunnel), its receive buffer set by how near
/// the host is.
///
/// Why: Linux sizes a TCP receive buffer by the bytes the reader takes per round trip. Over
/// distance that grows the window to what the path holds, but with a round trip of a few
/// microseconds the window stays near its 128 KiB start while a fast or bursty server
/// (nginx sends `sendfile_max_chunk` at a time) has more to send. The server then waits on
/// our window, and every window update we send runs its pending transmit in our process (on
/// loopback both ends' network stacks run wherever the packet is handled). Measured on perf/'s
/// worlds: with a fixed 4 MiB buffer, the time in `recvfrom` halved, and the capped 1 GiB
/// pull went from 1.66 to 1.38 s (medians of 5). A fixed buffer turns autotuning off, which
/// would cap a far connection at buffer / RTT, so only a near one gets it: a loopback peer, or
/// one whose connect took at most [`NEAR_CONNECT`] (a clock that a busy runtime can only make
/// slower, so a far host never passes for near). There 4 MiB (or a default `rmem_max`'s 416
/// KiB) is many times what a round trip holds.
#[derive(Clone)]
struct Direct {
    http: HttpConnector,
    /// Set when the connection made is to a near host and got the near receive buffer.
    near: Arc<std::sync::atomic::AtomicBool>,
}

impl Direct {
    fn new(http: HttpConnector) -> Direct {
        Direct {
            http,
            near: Arc::default(),
        }
    }
}

impl Service<Uri> for Direct {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let near = self.near.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let tcp = http.call(dst).await?;
            if tune_receive_buffer(tcp.inner(), started.elapsed()) {
                near.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::trace!(
                    peer = ?tcp.inner().peer_addr().ok(),
                    bytes = NEAR_RECV_BUFFER,
                    "near host: fixed receive buffer"
                );
            }
            Ok(tcp)
        })
    }
}

/// Gives a connection to a near host (a loopback peer, or a connect within [`NEAR_CONNECT`])
/// a [`NEAR_RECV_BUFFER`] receive buffer; leaves any other to autotuning. Says whether it
/// set one.
fn tune_receive_buffer(tcp: &tokio::net::TcpStream, connect: Duration) -> bool {
    tcp.peer_addr().is_ok_and(|a| is_near(a.ip(), connect))
        && rustix::net::sockopt::set_socket_recv_buffer_size(tcp, NEAR_RECV_BUFFER).is_ok()
}

/// Whether a host is near: a loopback peer, or a connect (DNS included) within
/// [`NEAR_CONNECT`].
fn is_near(peer: std::net::IpAddr, connect: Duration) -> bool {
    peer.is_loopback() || connect <= NEAR_CONNECT
}

/// The proxies the environment names, read as curl reads them (`ALL_PROXY`, `HTTPS_PROXY`,
/// `HTTP_PROXY`, `NO_PROXY`, upper case first, then lower case; none at all in a CGI
/// program, as hyper-util decides). hyper-util's matcher silently skips a value it cannot
/// use, which would send the pull past the proxy: such values are refused here instead,
/// naming the variable and never its value.
fn proxy_matcher_from_env() -> Result<Matcher> {
    if std::env::var_os("REQUEST_METHOD").is_some() {
        return Ok(Matcher::builder().build());
    }
    fn first(names: [&'static str; 2]) -> Option<(&'static str, String)> {
        names
            .into_iter()
            .find_map(|n| std::env::var(n).ok().map(|v| (n, v)))
    }
    let proxy = |names: [&'static str; 2]| -> Result<String> {
        match first(names) {
            Some((var, value)) => usable_proxy(var, &value),
            None => Ok(String::new()),
        }
    };
    Ok(Matcher::builder()
        .all(proxy(["ALL_PROXY", "all_proxy"])?)
        .http(proxy(["HTTP_PROXY", "http_proxy"])?)
        .https(proxy(["HTTPS_PROXY", "https_proxy"])?)
        .no(first(["NO_PROXY", "no_proxy"]).map_or(String::new(), |(_, v)| v))
        .build())
}

/// The proxy URL in `var`, its scheme lower-cased (curl reads `SOCKS5H://` too), or why it
/// cannot be used. SOCKS4 (`socks4`, `socks4a`, and curl's `socks`) has no authentication
/// and is not tested here against a real server, so it is refused rather than half
/// supported.
fn usable_proxy(var: &str, value: &str) -> Result<String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(String::new());
    }
    let bad = |why: String| Err(Error::InvalidOption(format!("{var}: {why}")));
    let (scheme, rest) = match value.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        // curl: no scheme means http.
        None => ("http".to_string(), value),
    };
    match scheme.as_str() {
        "http" | "socks5" | "socks5h" => {}
        // hyper-util would speak plain HTTP to it, and fail in ways that name no cause.
        "https" => {
            return bad(
                "https:// proxies (TLS to the proxy itself) are not supported; use http:// \
                 (https registries still get TLS end to end through its CONNECT tunnel)"
                    .into(),
            )
        }
        "socks4" | "socks4a" | "socks" => {
            return bad(format!(
                "{scheme}:// proxies are not supported; use socks5:// (names resolved here) \
                 or socks5h:// (names resolved by the proxy)"
            ))
        }
        _ => {
            return bad(format!(
                "unsupported proxy scheme {scheme}:// (use http://, socks5:// or socks5h://)"
            ))
        }
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.matches('@').count() > 1 {
        return bad("the proxy's user or password holds an '@': write it as %40".into());
    }
    let url = format!("{scheme}://{rest}");
    match url.parse::<Uri>() {
        Ok(u) if u.host().is_some_and(|h| !h.is_empty()) && !rest.contains('#') => Ok(url),
        _ => bad(
            "not a proxy URL fastpull can use (characters such as # / ? @ : in a user or \
             password must be %-encoded)"
                .into(),
        ),
    }
}

/// A SOCKS5 proxy from the environment, read as curl reads it: `socks5` resolves the
/// registry's name here, `socks5h` lets the proxy resolve it; user and password from the URL;
/// port 1080 when none is given.
struct Socks {
    proxy: Uri,
    proxy_dns: bool,
    auth: Option<(String, String)>,
}

impl Socks {
    fn of(i: &hyper_util::client::proxy::matcher::Intercept) -> Option<Socks> {
        let uri = i.uri();
        // Other SOCKS schemes are refused when the transport is made.
        let proxy_dns = match uri.scheme_str()?.to_ascii_lowercase().as_str() {
            "socks5" => false,
            "socks5h" => true,
            _ => return None,
        };
        let proxy = if uri.port().is_some() {
            uri.clone()
        } else {
            let host = uri.host()?;
            Uri::builder()
                .scheme(uri.scheme_str()?)
                .authority(format!("{host}:1080"))
                .path_and_query("/")
                .build()
                .ok()?
        };
        let auth = i
            .raw_auth()
            .map(|(user, pass)| (user.to_string(), pass.to_string()));
        Some(Socks {
            proxy,
            proxy_dns,
            auth,
        })
    }

    /// The connector that tunnels through the proxy.
    fn connector(self, http: HttpConnector) -> SocksConnector {
        let failure = FailureSlot::default();
        let to_proxy = ToProxy {
            http,
            failure: failure.clone(),
        };
        // Names are resolved in `SocksConnector` for `socks5` (hyper-util's own lookup would
        // block the runtime and use only the first address); with `socks5h` they go to the
        // proxy as they are.
        let mut tunnel = SocksV5::new(self.proxy, to_proxy).local_dns(false);
        if let Some((user, pass)) = self.auth {
            tunnel = tunnel.with_auth(user, pass);
        }
        SocksConnector {
            tunnel,
            resolve_here: !self.proxy_dns,
            failure,
        }
    }
}

/// A tunnel through a SOCKS5 proxy to a destination: the plain TCP stream to the proxy, after
/// the handshake. A destination without a port gets its scheme's (80 or 443; hyper-util
/// would use 443 for both). With `resolve_here` the name is looked up here, without
/// blocking, and each address tried in turn.
#[derive(Clone)]
struct SocksConnector {
    tunnel: SocksV5<ToProxy>,
    resolve_here: bool,
    failure: FailureSlot,
}

/// Scheme, host (without IPv6 brackets) and port of a destination, the port defaulting to
/// the scheme's.
fn socks_destination(dst: &Uri) -> std::result::Result<(String, String, u16), BoxError> {
    let scheme = dst.scheme_str().unwrap_or("http").to_ascii_lowercase();
    let host = dst
        .host()
        .ok_or("URL without a host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = dst
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Ok((scheme, host, port))
}

type ConnectFuture<T> = Pin<Box<dyn Future<Output = std::result::Result<T, BoxError>> + Send>>;

impl Service<Uri> for SocksConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // Its ToProxy is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut tunnel = self.tunnel.clone();
        let resolve_here = self.resolve_here;
        let failure = self.failure.clone();
        Box::pin(async move {
            let (scheme, host, port) = socks_destination(&dst)?;
            let authorities: Vec<String> = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![std::net::SocketAddr::new(ip, port).to_string()],
                Err(_) if resolve_here => tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| format!("cannot resolve {host}: {e}"))?
                    .map(|a| a.to_string())
                    .collect(),
                // socks5h: the proxy resolves the name.
                Err(_) => vec![format!("{host}:{port}")],
            };
            let mut last: Option<BoxError> = None;
            for authority in authorities {
                let uri = Uri::builder()
                    .scheme(scheme.as_str())
                    .authority(authority.as_str())
                    .path_and_query("/")
                    .build()?;
                match tunnel.call(uri).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => {
                        // The proxy itself unreachable: no other address will do better.
                        if let Some(cause) = failure.take() {
                            return Err(cause);
                        }
                        last = Some(e.into());
                    }
                }
            }
            Err(last.unwrap_or_else(|| format!("{host} has no address").into()))
        })
    }
}

/// The TCP connection to the SOCKS proxy itself. hyper-util's SOCKS error does not keep its
/// cause, so a failure to reach the proxy (e.g. "connection refused") is kept here for the
/// message.
#[derive(Clone)]
struct ToProxy {
    http: HttpConnector,
    failure: FailureSlot,
}

/// Where [`ToProxy`] leaves why it could not reach the proxy.
#[derive(Clone, Default)]
struct FailureSlot(Arc<Mutex<Option<BoxError>>>);

impl FailureSlot {
    fn set(&self, e: BoxError) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(e);
        }
    }

    /// The proxy connection's own error, if that is what failed.
    fn take(&self) -> Option<BoxError> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }
}

impl Service<Uri> for ToProxy {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, proxy: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let failure = self.failure.clone();
        Box::pin(async move {
            http.call(proxy).await.map_err(|e| {
                failure.set(Box::new(e));
                BoxError::from("could not connect to the SOCKS proxy")
            })
        })
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let mut c = self.inner.connected();
        if let Some(at) = self.handshaken {
            c = c.extra(Handshaken(at));
        }
        if self.forwarded {
            c.proxy(true)
        } else {
            c
        }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}

/// A connection failure through a proxy: names the proxy, keeps the cause (a TLS error
/// inside stays findable).
#[derive(Debug)]
struct ViaProxy {
    proxy: String,
    source: BoxError,
}

impl std::fmt::Display for ViaProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "via proxy {}", self.proxy)
    }
}

impl std::error::Error for ViaProxy {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A host's `certs.d` files that cannot be used: a configuration problem, which neither a
/// retry nor plain HTTP may paper over.
#[derive(Debug)]
struct CertFilesError(String);

impl std::fmt::Display for CertFilesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unusable certificate files: {}", self.0)
    }
}

impl std::error::Error for CertFilesError {}

/// `host[:port]` of an authority that may start with a user part (`user:pass@`): where a
/// connection goes, which is what TLS settings are chosen by.
pub(crate) fn without_userinfo(authority: &str) -> &str {
    authority.rsplit('@').next().unwrap_or(authority)
}

/// `host` of `host[:port]` (IPv6 in brackets kept).
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn has_port(authority: &str) -> bool {
    host_part(authority).len() < authority.len()
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub(crate) async fn read_body(resp: Response<Incoming>, limit: usize, url: &str) -> Result<Bytes> {
    Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| Error::network("read body of", url, e))
}

/// A header's value as text; None if missing or not visible ASCII.
pub(crate) fn header_str(h: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The `Retry-After` of a response, in seconds. A date is measured from the response's own
/// `Date` when it has one (a server whose clock is off from ours still means "in N seconds"),
/// else from our clock.
pub(crate) fn retry_after(h: &HeaderMap) -> Option<u64> {
    let value = header_str(h, http::header::RETRY_AFTER)?;
    let now = header_str(h, http::header::DATE)
        .and_then(|d| httpdate::parse_http_date(d.trim()).ok())
        .unwrap_or_else(SystemTime::now);
    retry_after_secs(value, now)
}

/// A `Retry-After` value as seconds from `now`: delay-seconds, or an HTTP date (RFC 9110
/// §10.2.3; object stores and CDNs send either). A date already past is 0 (ask again now);
/// anything unreadable is `None`, as if the header were missing.
fn retry_after_secs(value: &str, now: SystemTime) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse() {
        return Some(secs);
    }
    let when = httpdate::parse_http_date(value).ok()?;
    // HTTP dates have whole seconds: round up, so a wait never ends before the date.
    Some(
        when.duration_since(now)
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
    )
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
    if let Some(files) = find_error::<CertFilesError>(&e) {
        return Error::Tls {
            url: crate::error::redact_url(url),
            message: files.to_string(),
            not_tls: false,
        };
    }
    if let Some(tls) = find_error::<rustls::Error>(&e) {
        let not_tls = matches!(tls, rustls::Error::InvalidMessage(_));
        let message = if not_tls {
            "the server does not speak TLS (use --plain-http for a plain-HTTP registry)".to_string()
        } else if matches!(tls, rustls::Error::InvalidCertificate(_)) {
            format!(
                "{tls} (trust its CA with --ca-file or certs.d/<host:port>/ca.crt, \
                 or skip verification for this registry with --insecure HOST:PORT)"
            )
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
        let refused = find_error::<std::io::Error>(&e)
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let text = flatten(e).to_string();
        // hyper-util's resolver says "dns error"; ours (for socks5) "cannot resolve".
        let unresolved = text.contains("dns error") || text.contains("cannot resolve");
        if refused || unresolved {
            return Error::Unreachable {
                url: crate::error::redact_url(url),
                reason: text,
            };
        }
        Error::network(CONNECT, url, text)
    } else {
        Error::network(what, url, flatten(e))
    }
}

/// An error of type `T` in the chain. rustls errors hide inside `io::Error`s (sometimes one
/// inside another), whose `source()` skips the wrapped error itself: walk both ways down.
fn find_error<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut todo: Vec<&(dyn std::error::Error + 'static)> = vec![e];
    while let Some(err) = todo.pop() {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            todo.push(inner);
        }
        if let Some(s) = err.source() {
            todo.push(s);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_retry_after_as_seconds_or_an_http_date() {
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(retry_after_secs("120", now), Some(120));
        assert_eq!(retry_after_secs(" 0 ", now), Some(0));
        assert_eq!(
            retry_after_secs("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(30)
        );
        // Rounded up: half a second before the date is a wait of 1 s, not 0.
        assert_eq!(
            retry_after_secs(
                "Sun, 06 Nov 1994 08:49:38 GMT",
                now + Duration::from_millis(500)
            ),
            Some(1)
        );
        // The obsolete forms RFC 9110 still asks recipients to read.
        assert_eq!(
            retry_after_secs("Sunday, 06-Nov-94 08:49:47 GMT", now),
            Some(10)
        );
        assert_eq!(retry_after_secs("Sun Nov  6 08:49:57 1994", now), Some(20));
        // A date already past: ask again now.
        assert_eq!(
            retry_after_secs("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(0)
        );
        assert_eq!(retry_after_secs("soon", now), None);
        // A date is measured from the response's own Date, whatever our clock says.
        let mut h = HeaderMap::new();
        h.insert(
            http::header::DATE,
            http::HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("Sun, 06 Nov 1994 08:50:07 GMT"),
        );
        assert_eq!(retry_after(&h), Some(30));
        h.remove(http::header::DATE);
        assert_eq!(retry_after(&h), Some(0), "long past by our clock");
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("7"),
        );
        assert_eq!(retry_after(&h), Some(7));
        assert_eq!(retry_after_secs("-5", now), None);
    }

    #[test]
    fn only_near_hosts_get_a_fixed_receive_buffer() {
        let ms = Duration::from_millis;
        let lan: std::net::IpAddr = "192.168.1.20".parse().unwrap();
        assert!(is_near(lan, Duration::from_micros(300)), "a LAN connect");
        assert!(!is_near(lan, ms(2)), "2 ms away keeps autotuning");
        assert!(!is_near("203.0.113.9".parse().unwrap(), ms(40)));
        // Loopback is near however long a busy runtime took to see the connect finish.
        assert!(is_near("127.0.0.1".parse().unwrap(), ms(50)));
        assert!(is_near("127.0.0.3".parse().unwrap(), ms(50)));
        assert!(is_near("::1".parse().unwrap(), ms(50)));
    }

    #[tokio::test]
    async fn a_loopback_connection_gets_the_larger_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tcp, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (tcp, _server) = (tcp.unwrap(), accepted.unwrap());
        let before = rustix::net::sockopt::socket_recv_buffer_size(&tcp).unwrap();
        assert!(tune_receive_buffer(&tcp, Duration::from_millis(50)));
        let after = rustix::net::sockopt::socket_recv_buffer_size(&tcp).unwrap();
        // The kernel doubles what is asked for and caps it at twice `net.core.rmem_max`
        // (208 KiB by default, so at least 416 KiB), more than autotuning's 128 KiB start.
        assert!(after > before, "receive buffer {before} -> {after}");
        assert!(after >= 416 << 10, "receive buffer {after}");
    }

    #[tokio::test]
    async fn a_reused_connection_gives_an_exact_round_trip() {
        // A keep-alive HTTP/1.1 server that thinks 30 ms before each answer.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/x", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let t = Duration::from_secs(5);
        let transport = Transport::new("test", t, t, 1, Default::default(), false).unwrap();
        let mut exchanges = Vec::new();
        for _ in 0..2 {
            let resp = transport
                .send(Method::GET, &url, HeaderMap::new(), Bytes::new())
                .await
                .unwrap();
            exchanges.push(*resp.extensions().get::<Exchange>().unwrap());
            // Read the body, so the connection goes back to the pool.
            resp.into_body().collect().await.unwrap();
        }
        assert_eq!(exchanges[0].fresh, Some(true), "{exchanges:?}");
        assert_eq!(exchanges[1].fresh, Some(false), "{exchanges:?}");
        let (first, exact) = exchanges[0].round_trip();
        assert!(!exact);
        assert_eq!(first, exchanges[0].took / 2);
        let (second, exact) = exchanges[1].round_trip();
        assert!(exact);
        assert!(second >= Duration::from_millis(30), "{second:?}");
    }

    #[test]
    fn socks_proxy_read_as_curl_reads_it() {
        let dst: Uri = "https://registry.example/v2/".parse().unwrap();
        let socks = |value: &str| {
            let m = Matcher::builder().all(value).build();
            m.intercept(&dst).as_ref().and_then(Socks::of)
        };
        let s = socks("socks5://proxy.example").unwrap();
        assert_eq!(s.proxy.port_u16(), Some(1080), "curl's default port");
        assert!(!s.proxy_dns);
        assert!(s.auth.is_none());
        let s = socks("socks5h://u%40x:p%23w@proxy.example:9050").unwrap();
        assert_eq!(s.proxy.port_u16(), Some(9050));
        assert!(s.proxy_dns);
        assert_eq!(s.auth, Some(("u@x".to_string(), "p#w".to_string())));
        assert!(socks("http://proxy.example:3128").is_none(), "not SOCKS");
    }

    #[test]
    fn socks_destinations_get_their_scheme_port() {
        let d = |u: &str| socks_destination(&u.parse().unwrap()).unwrap();
        assert_eq!(
            d("http://reg.example/v2/"),
            ("http".into(), "reg.example".into(), 80)
        );
        assert_eq!(
            d("https://reg.example/"),
            ("https".into(), "reg.example".into(), 443)
        );
        assert_eq!(d("http://[::1]:5000/"), ("http".into(), "::1".into(), 5000));
    }

    #[test]
    fn proxy_values_that_would_be_skipped_are_refused() {
        assert_eq!(usable_proxy("ALL_PROXY", "").unwrap(), "");
        assert_eq!(
            usable_proxy("ALL_PROXY", "SOCKS5H://127.0.0.1:1080").unwrap(),
            "socks5h://127.0.0.1:1080"
        );
        assert_eq!(
            usable_proxy("HTTP_PROXY", "proxy.lan:3128").unwrap(),
            "http://proxy.lan:3128"
        );
        assert_eq!(
            usable_proxy("HTTPS_PROXY", "http://u:p%40ss@proxy.lan:3128").unwrap(),
            "http://u:p%40ss@proxy.lan:3128"
        );
        for (value, why) in [
            ("socks4://h:1080", "socks4:// proxies are not supported"),
            ("socks://h:1080", "socks:// proxies are not supported"),
            ("ftp://h:21", "unsupported proxy scheme ftp://"),
            (
                "HTTPS://h:3128",
                "https:// proxies (TLS to the proxy itself) are not supported",
            ),
            ("http://u:p@ss@h:3128", "write it as %40"),
            ("socks5h://u:p#ss@h:1080", "must be %-encoded"),
            ("http://:3128", "must be %-encoded"),
        ] {
            let e = usable_proxy("ALL_PROXY", value).unwrap_err().to_string();
            assert!(e.contains("ALL_PROXY: ") && e.contains(why), "{value}: {e}");
            assert!(
                !e.contains("ss@") && !e.contains("#ss"),
                "{value}: secret in {e}"
            );
        }
    }

    #[test]
    fn insecure_names_a_host_or_a_host_and_port() {
        let o = TlsOptions {
            insecure: vec![
                "reg.lab".into(),
                "127.0.0.1:5000".into(),
                "[::1]:443".into(),
            ],
            ..Default::default()
        };
        assert!(o.is_insecure("reg.lab"));
        assert!(
            o.is_insecure("REG.lab:8443"),
            "a bare host covers every port"
        );
        assert!(o.is_insecure("127.0.0.1:5000"));
        assert!(
            !o.is_insecure("127.0.0.1:5001"),
            "a port names only that port"
        );
        assert!(!o.is_insecure("127.0.0.1"));
        assert!(o.is_insecure("[::1]:443"));
        assert!(!o.is_insecure("reg.lab.evil.com"));
        assert!(!o.is_insecure("other"));
        // A user part is not the host: a redirect to `https://reg.lab:@evil.example/`
        // connects to evil.example, which stays verified (red when the host was read as what
        // comes before the first `:`).
        assert!(!o.is_insecure("reg.lab:@evil.example"));
        assert!(!o.is_insecure("reg.lab@evil.example:443"));
        assert!(o.is_insecure("user:pass@reg.lab"));
    }

    /// Accepts `n` TLS connections on 127.0.0.1 (ALPN h2) and reads from each the flow-control
    /// window its client announced in its first SETTINGS frame (SETTINGS_INITIAL_WINDOW_SIZE;
    /// None: not announced), then closes it. In-process because no real server logs what a
    /// client announces. Returns the CA file to trust, the port and the reader.
    fn h2_window_reader(
        dir: &Path,
        n: usize,
    ) -> (PathBuf, u16, std::thread::JoinHandle<Vec<Option<u32>>>) {
        use std::io::Read;
        let (ca, config) = tls_server_config(dir, &[b"h2"]);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let reader = std::thread::spawn(move || {
            (0..n)
                .map(|_| {
                    let (tcp, _) = listener.accept().unwrap();
                    let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut preface = [0u8; 24];
                    tls.read_exact(&mut preface).unwrap();
                    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                    let mut head = [0u8; 9];
                    tls.read_exact(&mut head).unwrap();
                    assert_eq!(head[3], 0x4, "the first frame is SETTINGS");
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut body = vec![0u8; len];
                    tls.read_exact(&mut body).unwrap();
                    body.chunks(6)
                        .find(|e| e.len() == 6 && e[..2] == [0, 4])
                        .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
                })
                .collect()
        });
        (ca, port, reader)
    }

    /// A throw-away CA (written to `dir`, its path returned) and a server configuration
    /// with a certificate of it for 127.0.0.1, offering `alpn`.
    fn tls_server_config(dir: &Path, alpn: &[&[u8]]) -> (PathBuf, Arc<rustls::ServerConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (ca, Arc::new(config))
    }

    /// A fresh TLS connection's first response gives an exact round trip, the time since
    /// the handshake ended, however long the handshake took (here a server that waits
    /// 400 ms before its part of it, then answers at once). (Red when a fresh connection's
    /// time counts half: 200 ms and more, not exact.)
    #[tokio::test]
    async fn a_fresh_tls_connection_gives_an_exact_round_trip() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let (ca, config) = tls_server_config(dir.path(), &[b"http/1.1"]);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early");
                seen.extend_from_slice(&buf[..n]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            tls.flush().unwrap();
            // Hold the connection until the client is done with it.
            let _ = tls.read(&mut buf);
        });
        let t = Duration::from_secs(10);
        let tls = TlsOptions {
            ca_files: vec![ca],
            ..Default::default()
        };
        let transport = Transport::new("test", t, t, 1, tls, false).unwrap();
        let url = format!("https://127.0.0.1:{port}/x");
        let resp = transport
            .send(Method::GET, &url, HeaderMap::new(), Bytes::new())
            .await
            .unwrap();
        let exchange = *resp.extensions().get::<Exchange>().unwrap();
        assert_eq!(exchange.fresh, Some(true), "{exchange:?}");
        assert!(exchange.took >= Duration::from_millis(400), "{exchange:?}");
        let (rtt, exact) = exchange.round_trip();
        assert!(exact, "{exchange:?}");
        assert!(rtt < Duration::from_millis(150), "{rtt:?} ({exchange:?})");
    }

    /// A near HTTP/2 origin's later connections announce small windows; its first, made
    /// before anything was known of it, hyper's default. (Four, one per lane, one after the
    /// other: a handshake slowed by other tests running may miss the near bound, the next
    /// ones do not.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_near_http2_origin_gets_small_windows() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, port, reader) = h2_window_reader(dir.path(), 4);
        let transport = Transport::new(
            "fastpull-test",
            Duration::from_secs(10),
            Duration::from_secs(10),
            4,
            TlsOptions {
                ca_files: vec![ca],
                ..Default::default()
            },
            false,
        )
        .unwrap();
        let url = format!("https://127.0.0.1:{port}/");
        for lane in 0..4 {
            // The server closes after reading the SETTINGS: the request itself fails.
            let _ = transport
                .send_on(lane, Method::GET, &url, HeaderMap::new(), Bytes::new())
                .await;
        }
        let windows = reader.join().unwrap();
        assert_eq!(windows[0], Some(2 << 20), "hyper's default stream window");
        // Under qemu a loopback TLS handshake takes longer than a near one may.
        if std::env::var_os("FASTPULL_TEST_RUNNER").is_some_and(|v| !v.is_empty()) {
            return;
        }
        assert_eq!(windows[3], Some(H2_NEAR_WINDOW), "{windows:?}");
    }

    #[test]
    fn origin_key_fills_in_the_port() {
        let key = |u: &str| origin_key(&u.parse::<Uri>().unwrap());
        assert_eq!(
            key("https://CDN.example/a?b").as_deref(),
            Some("https://cdn.example:443")
        );
        assert_eq!(
            key("http://cdn.example/").as_deref(),
            Some("http://cdn.example:80")
        );
        assert_eq!(
            key("https://127.0.0.2:15089/x").as_deref(),
            Some("https://127.0.0.2:15089")
        );
        assert_eq!(key("/relative"), None);
    }

    #[test]
    fn ca_file_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsProfiles::new(TlsOptions {
            ca_files: vec![empty],
            ..Default::default()
        })
        .err()
        .expect("an empty CA file is refused");
        assert!(err.to_string().contains("no certificates"), "{err}");
        let missing = TlsProfiles::new(TlsOptions {
            ca_files: vec![dir.path().join("missing.pem")],
            ..Default::default()
        });
        assert!(missing.is_err());
    }
}

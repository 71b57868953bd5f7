//! Registry authentication as a layer the rest of fastpull never sees: requests carry
//! whatever `Authorization` this holds; a 401 hands its `WWW-Authenticate` here, and the
//! request is sent again once (twice when the refused token came from the shared cache).
//! Requests refused together share one attempt to replace what they sent, failed or not.
//!
//! - Bearer (the docker token protocol, which Docker Hub, GHCR, ECR, Quay and Harbor use,
//!   even for public pulls): a token for the repository's pull scope is fetched from the
//!   challenge's realm, anonymously, with `Basic` credentials, or by an OAuth2
//!   refresh-token POST when the credential is an identity token. Tokens are cached per
//!   realm, service, scope and account in a [`TokenCache`] the whole client shares, so one
//!   token serves every blob and chunk; it is renewed shortly before `expires_in` runs out,
//!   and at once when a 401 comes back mid-pull.
//! - Basic: the credential itself, for registries (htpasswd) that ask for it.
//!
//! Credentials come from a [`CredentialStore`] and are looked up once per pull, on the
//! first challenge (so anonymous pulls never run credential helpers). Nothing here logs a
//! secret; header values are marked sensitive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response};
use hyper::body::Incoming;
use tokio::sync::{Mutex, OnceCell, RwLock};

use crate::credentials::{Credential, CredentialStore, Secret};
use crate::error::{Error, Result};
use crate::http::{is_redirect, read_body, Transport};

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lower-cased scheme (`bearer`, `basic`).
    pub scheme: String,
    /// Parameters with lower-cased names (`realm`, `service`, `scope`).
    pub params: HashMap<String, String>,
}

/// Parses a `WWW-Authenticate` value: several challenges, quoted values with commas and
/// escapes, any case.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let s = header.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && (s[*i] == b' ' || s[*i] == b'\t' || s[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let start = *i;
        while *i < s.len() && !matches!(s[*i], b' ' | b'\t' | b',' | b'=') {
            *i += 1;
        }
        header[start..*i].to_string()
    };
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        let word = token(&mut i);
        // Look past spaces: '=' makes `word` a parameter name of the current challenge.
        let mut j = i;
        while j < s.len() && (s[j] == b' ' || s[j] == b'\t') {
            j += 1;
        }
        if j < s.len() && s[j] == b'=' && !out.is_empty() {
            i = j + 1;
            while i < s.len() && (s[i] == b' ' || s[i] == b'\t') {
                i += 1;
            }
            let value = if i < s.len() && s[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    // Copy whole UTF-8 sequences.
                    let ch_len = header[i..].chars().next().map(char::len_utf8).unwrap_or(1);
                    v.push_str(&header[i..i + ch_len]);
                    i += ch_len;
                }
                i += 1;
                v
            } else {
                token(&mut i)
            };
            if let Some(c) = out.last_mut() {
                c.params.insert(word.to_ascii_lowercase(), value);
            }
        } else if !word.is_empty() {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: HashMap::new(),
            });
        } else {
            i += 1;
        }
    }
    out
}

/// Bearer tokens shared by every pull of a client, keyed by the registry they are for,
/// realm, service, scope and credential (see [`Auth::bearer_token`]).
#[derive(Default)]
pub(crate) struct TokenCache {
    tokens: std::sync::Mutex<HashMap<String, CachedToken>>,
}

#[derive(Clone)]
struct CachedToken {
    header: HeaderValue,
    /// When to fetch a new one (a little before it expires).
    renew_at: Instant,
    /// An OAuth2 refresh token the token service handed out with it.
    refresh_token: Option<Secret>,
}

impl TokenCache {
    fn get(&self, key: &str) -> Option<CachedToken> {
        self.tokens.lock().ok()?.get(key).cloned()
    }

    fn put(&self, key: String, token: CachedToken) {
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(key, token);
        }
    }
}

/// The `Authorization` in use and what it takes to renew it.
#[derive(Clone, Default)]
struct State {
    /// Bumped at every change, so a request that got a 401 can tell whether someone else
    /// already renewed what it sent.
    generation: u64,
    header: Option<HeaderValue>,
    /// When the bearer token must be renewed.
    renew_at: Option<Instant>,
    /// The bearer challenge the token answers, to renew it without waiting for a 401.
    challenge: Option<Challenge>,
    /// The last generation whose token came from the client's shared cache rather than
    /// from the token service: the registry may already have stopped taking it.
    cached_generation: Option<u64>,
}

/// A failed attempt to replace an `Authorization`, kept for the requests that were waiting
/// for that attempt, so they share its outcome instead of each asking the token service
/// again (wrong or expired credentials would otherwise become a burst of failed logins).
struct Failure {
    /// Which attempt it was (see [`Auth::attempts`]).
    attempt: u64,
    /// The generation it was meant to replace.
    generation: u64,
    error: Error,
}

/// Authorization state for one repository on one registry.
pub(crate) struct Auth {
    /// `host[:port]`: for messages and for finding credentials.
    registry: String,
    repository: String,
    store: CredentialStore,
    credential: OnceCell<Option<Credential>>,
    tokens: Arc<TokenCache>,
    /// Credentials may go to a plain-HTTP token realm (the registry itself is plain HTTP
    /// or loopback).
    plain_http_ok: bool,
    state: RwLock<State>,
    /// Held while the `Authorization` is being replaced; holds the last failure.
    refresh: Mutex<Option<Failure>>,
    /// Attempts to replace the `Authorization` finished so far (bumped under `refresh`).
    attempts: AtomicU64,
}

impl Auth {
    pub(crate) fn new(
        registry: &str,
        repository: &str,
        store: CredentialStore,
        tokens: Arc<TokenCache>,
        plain_http_ok: bool,
    ) -> Self {
        Auth {
            registry: registry.to_string(),
            repository: repository.to_string(),
            store,
            credential: OnceCell::new(),
            tokens,
            plain_http_ok,
            state: RwLock::new(State::default()),
            refresh: Mutex::new(None),
            attempts: AtomicU64::new(0),
        }
    }

    /// The header to send now, with its generation (to tell a stale token from a fresh one).
    /// A bearer token about to expire is renewed first.
    pub(crate) async fn header(&self, transport: &Transport) -> Result<(u64, Option<HeaderValue>)> {
        // Every request comes here: copy only what it needs, not the challenge.
        let (generation, header, renew_at) = {
            let st = self.state.read().await;
            (st.generation, st.header.clone(), st.renew_at)
        };
        if renew_at.is_some_and(|at| Instant::now() >= at) {
            let arrived = self.attempts.load(Ordering::SeqCst);
            let mut failure = self.refresh.lock().await;
            let cur = self.state.read().await.clone();
            if cur.generation == generation {
                if let Some(c) = &cur.challenge {
                    shared_failure(&failure, cur.generation, arrived)?;
                    tracing::debug!(registry = %self.registry, "bearer token about to expire; renewing");
                    let renewed = async {
                        let (token, _) = self.bearer_token(transport, c, true).await?;
                        let (header, at) = (Some(token.header), Some(token.renew_at));
                        self.set(header, at, Some(c.clone()), false).await;
                        Ok(())
                    }
                    .await;
                    self.finish_attempt(&mut failure, cur.generation, renewed)?;
                }
            }
            let now = self.state.read().await;
            return Ok((now.generation, now.header.clone()));
        }
        Ok((generation, header))
    }

    async fn set(
        &self,
        header: Option<HeaderValue>,
        renew_at: Option<Instant>,
        challenge: Option<Challenge>,
        from_cache: bool,
    ) {
        let mut st = self.state.write().await;
        st.generation += 1;
        st.header = header;
        st.renew_at = renew_at;
        st.challenge = challenge;
        if from_cache {
            st.cached_generation = Some(st.generation);
        }
    }

    /// Records the end of an attempt to replace generation `generation`; a failure is kept
    /// for the requests that waited for it.
    fn finish_attempt(
        &self,
        failure: &mut Option<Failure>,
        generation: u64,
        result: Result<()>,
    ) -> Result<()> {
        let attempt = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
        *failure = result.as_ref().err().map(|e| Failure {
            attempt,
            generation,
            error: e.duplicate(),
        });
        result
    }

    /// Whether the header of generation `generation` was a token from the client's shared
    /// cache that this registry had not yet accepted: when it is refused, a freshly fetched
    /// token deserves a try.
    pub(crate) async fn was_cached(&self, generation: u64) -> bool {
        self.state.read().await.cached_generation == Some(generation)
    }

    /// Handles a 401 for a request sent with generation `seen`. Afterwards the caller sends
    /// its request again with [`Auth::header`].
    pub(crate) async fn on_unauthorized(
        &self,
        transport: &Transport,
        seen: u64,
        www_authenticate: Option<&str>,
    ) -> Result<()> {
        let arrived = self.attempts.load(Ordering::SeqCst);
        let mut failure = self.refresh.lock().await;
        let (generation, had_header) = {
            let st = self.state.read().await;
            (st.generation, st.header.is_some())
        };
        if generation != seen {
            return Ok(()); // another request already renewed
        }
        shared_failure(&failure, seen, arrived)?;
        let result = self
            .answer_challenge(transport, had_header, www_authenticate)
            .await;
        self.finish_attempt(&mut failure, seen, result)
    }

    /// Replaces the `Authorization` as the 401's challenges ask (called under `refresh`).
    async fn answer_challenge(
        &self,
        transport: &Transport,
        had_header: bool,
        www_authenticate: Option<&str>,
    ) -> Result<()> {
        let challenges = www_authenticate.map(parse_challenges).unwrap_or_default();
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            // What we sent was refused: never the cached token again.
            let (token, from_cache) = self.bearer_token(transport, c, had_header).await?;
            let (header, at) = (Some(token.header), Some(token.renew_at));
            self.set(header, at, Some(c.clone()), from_cache).await;
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            return match self.credential().await? {
                Some(Credential::Basic { username, password }) => {
                    if had_header {
                        return Err(self.unauthorized("the registry rejected the credentials"));
                    }
                    let header = basic_header(&username, &password)
                        .ok_or_else(|| self.unauthorized("credentials unusable in a header"))?;
                    self.set(Some(header), None, None, false).await;
                    Ok(())
                }
                Some(Credential::IdentityToken { .. }) => Err(self.unauthorized(
                    "the registry asks for a password (Basic auth), but only an identity token is stored",
                )),
                None => Err(self.unauthorized(
                    "the registry requires credentials (docker login, or --username with --password-stdin)",
                )),
            };
        }
        Err(self.unauthorized("the registry refused access and named no usable auth scheme"))
    }

    fn unauthorized(&self, message: &str) -> Error {
        Error::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            code: None,
            message: message.to_string(),
        }
    }

    /// The stored credential for this registry, looked up once (it may run a helper).
    async fn credential(&self) -> Result<Option<Credential>> {
        self.credential
            .get_or_try_init(|| async {
                let store = self.store.clone();
                let registry = self.registry.clone();
                let repository = self.repository.clone();
                let found =
                    tokio::task::spawn_blocking(move || store.lookup(&registry, &repository))
                        .await
                        .map_err(|e| Error::Internal(format!("credential lookup: {e}")))??;
                tracing::debug!(
                    registry = %self.registry,
                    found = match &found {
                        Some(Credential::Basic { .. }) => "username and password",
                        Some(Credential::IdentityToken { .. }) => "identity token",
                        None => "none",
                    },
                    "credentials"
                );
                Ok(found)
            })
            .await
            .cloned()
    }

    /// A token for the challenge: from the cache unless `fresh`, else from the token service.
    /// `true` with it when it came from the cache.
    async fn bearer_token(
        &self,
        transport: &Transport,
        c: &Challenge,
        fresh: bool,
    ) -> Result<(CachedToken, bool)> {
        let realm = c
            .params
            .get("realm")
            .ok_or_else(|| self.unauthorized("bearer challenge without a realm"))?;
        let lower = realm.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
            return Err(self.unauthorized("token realm is not an http(s) URL"));
        }
        let ours = format!("repository:{}:pull", self.repository);
        let mut scopes = vec![ours.clone()];
        if let Some(scope) = c.params.get("scope") {
            for s in scope.split(' ').filter(|s| !s.is_empty() && *s != ours) {
                scopes.push(s.to_string());
            }
        }
        let service = c.params.get("service").cloned();
        let credential = self.credential().await?;
        let account = match &credential {
            Some(Credential::Basic { username, .. }) => format!("basic {username}"),
            Some(Credential::IdentityToken { username, .. }) => {
                format!("identity {}", username.as_deref().unwrap_or(""))
            }
            None => "anonymous".to_string(),
        };
        // The registry first: a token goes only to the registry it was asked for, even when
        // another one names the same realm, service and scope in its challenge (a registry
        // can name any realm; reusing the token there would hand it one it was never given,
        // and an identity token's refresh with it).
        let key = format!(
            "{}\n{realm}\n{}\n{}\n{account}",
            self.registry,
            service.as_deref().unwrap_or(""),
            scopes.join(" "),
        );
        let cached = self.tokens.get(&key);
        if let Some(t) = &cached {
            if !fresh && Instant::now() < t.renew_at {
                return Ok((t.clone(), true));
            }
        }
        if credential.is_some() && lower.starts_with("http://") && !self.plain_http_ok {
            // The host the request goes to: a user part (`http://localhost@elsewhere/`) is
            // not where it goes.
            let host = crate::registry::host_of(realm).unwrap_or_default();
            if !crate::registry::is_loopback(host) {
                return Err(self.unauthorized(
                    "the token realm is plain HTTP; refusing to send credentials over it",
                ));
            }
        }
        let refresh_token = cached
            .and_then(|t| t.refresh_token)
            .or_else(|| match &credential {
                Some(Credential::IdentityToken { token, .. }) => Some(token.clone()),
                _ => None,
            });
        let req = TokenRequest {
            realm,
            service: service.as_deref(),
            scopes: &scopes,
        };
        let token = match refresh_token {
            Some(rt) => match self.oauth_token(transport, &req, &rt).await? {
                Some(t) => t,
                // No OAuth2 POST there: the plain GET, with a password if we have one.
                None => self.get_token(transport, &req, credential.as_ref()).await?,
            },
            None => self.get_token(transport, &req, credential.as_ref()).await?,
        };
        self.tokens.put(key, token.clone());
        Ok((token, false))
    }

    /// The docker token GET: anonymous, or `Basic` with a username and password.
    async fn get_token(
        &self,
        transport: &Transport,
        req: &TokenRequest<'_>,
        credential: Option<&Credential>,
    ) -> Result<CachedToken> {
        let mut query = Vec::new();
        if let Some(service) = req.service {
            query.push(format!("service={}", encode(service)));
        }
        for s in req.scopes {
            query.push(format!("scope={}", encode(s)));
        }
        let mut headers = HeaderMap::new();
        // As docker: an empty username or password means ask anonymously.
        let basic = credential.filter(|c| {
            matches!(c, Credential::Basic { username, password }
                if !username.is_empty() && !password.expose().is_empty())
        });
        if let Some(Credential::Basic { username, password }) = basic {
            query.push(format!("account={}", encode(username)));
            let h = basic_header(username, password)
                .ok_or_else(|| self.unauthorized("credentials unusable in a header"))?;
            headers.insert(http::header::AUTHORIZATION, h);
        }
        let sep = if req.realm.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}{}", req.realm, query.join("&"));
        tracing::debug!(
            realm = %crate::error::redact_url(req.realm),
            scope = %req.scopes.join(" "),
            with_credentials = basic.is_some(),
            "fetching bearer token"
        );
        let started = Instant::now();
        let (resp, url) = self
            .send_following(transport, Method::GET, &url, headers, Bytes::new())
            .await?;
        self.token_reply(resp, &url, started, basic.is_some(), None)
            .await
    }

    /// The OAuth2 refresh-token POST. `None` when the service has no such endpoint.
    async fn oauth_token(
        &self,
        transport: &Transport,
        req: &TokenRequest<'_>,
        refresh_token: &Secret,
    ) -> Result<Option<CachedToken>> {
        let mut form = vec![
            "grant_type=refresh_token".to_string(),
            format!("refresh_token={}", encode(refresh_token.expose())),
            "client_id=fastpull".to_string(),
            format!("scope={}", encode(&req.scopes.join(" "))),
        ];
        if let Some(service) = req.service {
            form.push(format!("service={}", encode(service)));
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        tracing::debug!(
            realm = %crate::error::redact_url(req.realm),
            scope = %req.scopes.join(" "),
            "fetching bearer token with a refresh token (OAuth2)"
        );
        let started = Instant::now();
        let (resp, url) = self
            .send_following(
                transport,
                Method::POST,
                req.realm,
                headers,
                Bytes::from(form.join("&")),
            )
            .await?;
        // Token services without the OAuth2 endpoint answer 404 (GCR), 401 (Artifactory),
        // 400 (ACR) or 405, as containerd notes; the GET still works there.
        if matches!(resp.status().as_u16(), 400 | 401 | 404 | 405) {
            tracing::debug!(
                status = resp.status().as_u16(),
                "the token service refused the OAuth2 POST; using GET"
            );
            return Ok(None);
        }
        self.token_reply(resp, &url, started, true, Some(refresh_token))
            .await
            .map(Some)
    }

    /// Sends a token request and follows the realm's redirects as docker's and skopeo's HTTP
    /// client does: at most [`MAX_REDIRECTS`] hops, http(s) only; after a 301, 302 or 303 a
    /// POST becomes a bodiless GET, after a 307 or 308 it is sent again as it was. Credentials
    /// (`Authorization`, a refresh token in a POST body) go only to the realm's own scheme,
    /// host and port: a GET loses its `Authorization` on the way to another origin, and a
    /// POST to another origin is refused. Returns the response and the URL that gave it.
    async fn send_following(
        &self,
        transport: &Transport,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(Response<Incoming>, String)> {
        use crate::error::redact_url;
        use crate::registry::{origin_of, redirect_target, MAX_REDIRECTS};
        let realm_origin = origin_of(url);
        let (mut method, mut url, mut headers, mut body) = (method, url.to_string(), headers, body);
        for _ in 0..=MAX_REDIRECTS {
            let resp = transport
                .send(method.clone(), &url, headers.clone(), body.clone())
                .await?;
            let status = resp.status();
            if !is_redirect(status) {
                return Ok((resp, url));
            }
            let next = redirect_target(&url, &resp)?;
            if method == Method::POST && matches!(status.as_u16(), 301..=303) {
                method = Method::GET;
                body = Bytes::new();
                headers.remove(http::header::CONTENT_TYPE);
            }
            if origin_of(&next) != realm_origin {
                if method == Method::POST {
                    return Err(self.unauthorized(&format!(
                        "the token service redirected a request carrying credentials to another host ({})",
                        redact_url(&next)
                    )));
                }
                headers.remove(http::header::AUTHORIZATION);
            }
            tracing::debug!(from = %redact_url(&url), to = %redact_url(&next), "token service redirect");
            url = next;
        }
        Err(Error::Protocol {
            url: redact_url(&url),
            message: format!("token service: more than {MAX_REDIRECTS} redirects"),
        })
    }

    async fn token_reply(
        &self,
        resp: Response<Incoming>,
        url: &str,
        started: Instant,
        with_credentials: bool,
        refresh_token: Option<&Secret>,
    ) -> Result<CachedToken> {
        let status = resp.status();
        let retry_after = crate::http::retry_after(resp.headers());
        let body = read_body(resp, 1 << 20, url).await?;
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return Err(self.unauthorized(if with_credentials {
                "the token service rejected the credentials"
            } else {
                "the token service refused anonymous access (docker login, or --username with --password-stdin)"
            }));
        }
        if !status.is_success() {
            return Err(Error::Registry {
                url: crate::error::redact_url(url),
                status: status.as_u16(),
                code: None,
                message: "token request failed".into(),
                retry_after,
                retries: 0,
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
            // Any JSON number (a value too large for an integer type must not make the whole
            // reply unreadable), or a number in a string, as some token services send it;
            // anything else counts as absent.
            expires_in: Option<serde_json::Value>,
            refresh_token: Option<String>,
        }
        let reply: TokenReply = serde_json::from_slice(&body)
            .map_err(|e| self.unauthorized(&format!("unreadable token reply: {e}")))?;
        let token = reply
            .token
            .filter(|t| !t.is_empty())
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized("token reply has no token"))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| self.unauthorized("token has characters not allowed in a header"))?;
        header.set_sensitive(true);
        Ok(CachedToken {
            header,
            renew_at: renew_at(started, reply.expires_in.as_ref().and_then(seconds)),
            refresh_token: reply
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new)
                .or_else(|| refresh_token.cloned()),
        })
    }
}

/// `expires_in` as seconds: a JSON number, or a string holding one.
fn seconds(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// The spec's lifetime of a token whose reply gives none.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longer lifetimes are taken as this (it keeps the arithmetic far from overflowing).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// When to renew a token asked for at `started` whose reply said `expires_in` (seconds):
/// a tenth early (at most 30 s), timed from when we asked, so clock skew cannot matter. A
/// missing, zero, negative or non-finite `expires_in` is the spec's default of 60 s (taking
/// zero literally would fetch a token before every request); a huge one is capped.
fn renew_at(started: Instant, expires_in: Option<f64>) -> Instant {
    let lifetime = match expires_in {
        Some(secs) if secs.is_finite() && secs >= 1.0 => {
            Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
        }
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    let early = (lifetime / 10).min(Duration::from_secs(30));
    started + (lifetime - early)
}

/// The failure of an attempt that finished after a request arrived (its attempt count
/// was `arrived`) to replace the generation it saw: that request shares it.
fn shared_failure(failure: &Option<Failure>, generation: u64, arrived: u64) -> Result<()> {
    match failure {
        Some(f) if f.generation == generation && f.attempt > arrived => {
            tracing::debug!("sharing the outcome of the token request this one waited for");
            Err(f.error.duplicate())
        }
        _ => Ok(()),
    }
}

struct TokenRequest<'a> {
    realm: &'a str,
    service: Option<&'a str>,
    scopes: &'a [String],
}

/// `Basic base64(user:password)`, marked sensitive.
fn basic_header(username: &str, password: &Secret) -> Option<HeaderValue> {
    use base64::Engine;
    let raw = format!("{username}:{}", password.expose());
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
    .ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Percent-encodes a query value (keeps unreserved characters and `:` `/`).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:library/alpine:pull");
    }

    #[test]
    fn parses_several_challenges_quoted_commas_and_case() {
        let c = parse_challenges(
            r#"Basic realm="Registry, the \"best\" one", BEARER Realm=https://h/t , Service = "a,b", scope="x y""#,
        );
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "Registry, the \"best\" one");
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["realm"], "https://h/t");
        assert_eq!(c[1].params["service"], "a,b");
        assert_eq!(c[1].params["scope"], "x y");
    }

    /// A token service on loopback answering every request, once `gate` says `true`, with
    /// `status` (a token when 200); returns its realm and how many requests it got.
    async fn token_service(
        status: u16,
        gate: tokio::sync::watch::Receiver<bool>,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counter = counter.clone();
                let mut gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    let body = if status == 200 {
                        r#"{"token":"t0k3n","expires_in":300}"#
                    } else {
                        ""
                    };
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        (realm, count)
    }

    fn transport() -> Transport {
        let t = Duration::from_secs(10);
        Transport::new("test", t, t, 1, Default::default(), false).unwrap()
    }

    fn auth_with_password() -> Arc<Auth> {
        let store = CredentialStore::none().with(
            "reg.test",
            Credential::Basic {
                username: "me".into(),
                password: Secret::new("wrong"),
            },
        );
        Arc::new(Auth::new(
            "reg.test",
            "team/app",
            store,
            Arc::default(),
            false,
        ))
    }

    type Pending<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

    /// Polls each of `requests` once, in order, while the token service holds its answer:
    /// each has then arrived (noted the attempts finished so far, the first statement of
    /// `on_unauthorized` and `header` past their state read) before any attempt can end, at
    /// any speed. Opens `gate` and returns their outcomes.
    async fn arrive_then_answer<T>(
        mut requests: Vec<Pending<T>>,
        gate: tokio::sync::watch::Sender<bool>,
    ) -> Vec<T> {
        // Unconstrained: tokio's cooperative budget must not make a first poll stop early.
        tokio::task::unconstrained(async {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for r in &mut requests {
                assert!(
                    r.as_mut().poll(&mut cx).is_pending(),
                    "answered before the gate"
                );
            }
        })
        .await;
        gate.send(true).unwrap();
        futures::future::join_all(requests).await
    }

    /// Eight requests refused at once with the same token: one token request answers all
    /// of them, even when it fails (wrong credentials must not become eight failed logins).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_401s_share_one_failed_token_request() {
        let (gate, closed) = tokio::sync::watch::channel(false);
        let (realm, count) = token_service(401, closed).await;
        let transport = transport();
        let auth = auth_with_password();
        let challenge = format!(r#"Bearer realm="{realm}",service="svc""#);
        let requests: Vec<Pending<Result<()>>> = (0..8)
            .map(|_| {
                let (auth, transport, challenge) =
                    (auth.clone(), transport.clone(), challenge.clone());
                Box::pin(async move { auth.on_unauthorized(&transport, 0, Some(&challenge)).await })
                    as Pending<_>
            })
            .collect();
        for r in arrive_then_answer(requests, gate).await {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "token requests");
        // A request refused later (a retry after its back-off) asks again.
        let err = auth.on_unauthorized(&transport, 0, Some(&challenge)).await;
        assert!(err.is_err());
        assert_eq!(count.load(Ordering::SeqCst), 2, "token requests");
    }

    /// The same when a token runs out: the requests due to renew it share one attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_renewals_share_one_failed_token_request() {
        let (gate, closed) = tokio::sync::watch::channel(false);
        let (realm, count) = token_service(503, closed).await;
        let transport = transport();
        let auth = auth_with_password();
        let challenge = parse_challenges(&format!(r#"Bearer realm="{realm}""#)).remove(0);
        let expired = HeaderValue::from_static("Bearer old");
        auth.set(Some(expired), Some(Instant::now()), Some(challenge), false)
            .await;
        type Header = (u64, Option<HeaderValue>);
        let requests: Vec<Pending<Result<Header>>> = (0..8)
            .map(|_| {
                let (auth, transport) = (auth.clone(), transport.clone());
                Box::pin(async move { auth.header(&transport).await }) as Pending<_>
            })
            .collect();
        for r in arrive_then_answer(requests, gate).await {
            let err = r.unwrap_err();
            assert!(err.is_transient(), "{err}");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1, "token requests");
    }

    /// An HTTPS registry's credentials never go to a plain-HTTP token realm on another host,
    /// also when the realm's user part names a loopback host (`http://localhost:1@host/`
    /// goes to `host`; red when the check read the host as what follows `//`).
    #[tokio::test]
    async fn credentials_stay_off_a_plain_http_realm() {
        for realm in [
            "http://auth.invalid/token",
            "http://localhost:1@auth.invalid/token",
            "http://[::1]@auth.invalid/token",
        ] {
            let auth = auth_with_password();
            let challenge = format!(r#"Bearer realm="{realm}",service="svc""#);
            let err = auth
                .on_unauthorized(&transport(), 0, Some(&challenge))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, Error::Unauthorized { message, .. } if message.contains("plain HTTP")),
                "{realm}: {err}"
            );
        }
    }

    /// A token goes only to the registry it was asked for: a second registry whose challenge
    /// names the first one's realm, service and scope (any registry can) gets its own, though
    /// both share the client's token cache and the same user name. (Red when the cache was
    /// keyed by realm, service, scope and user name: one token request, the first
    /// registry's token handed to the second.)
    #[tokio::test]
    async fn a_token_goes_only_to_the_registry_it_was_asked_for() {
        let (_open, gate) = tokio::sync::watch::channel(true);
        let (realm, count) = token_service(200, gate).await;
        let transport = transport();
        let tokens: Arc<TokenCache> = Arc::default();
        let auth = |registry: &str| {
            let store = CredentialStore::none().with(
                registry,
                Credential::Basic {
                    username: "me".into(),
                    password: Secret::new(registry),
                },
            );
            Auth::new(registry, "team/app", store, tokens.clone(), false)
        };
        let (x, y) = (auth("x.test"), auth("y.test"));
        let challenge =
            parse_challenges(&format!(r#"Bearer realm="{realm}",service="x.test""#)).remove(0);
        let (_, cached) = x.bearer_token(&transport, &challenge, false).await.unwrap();
        assert!(!cached);
        let (_, cached) = x.bearer_token(&transport, &challenge, false).await.unwrap();
        assert!(
            cached,
            "the same registry's second ask comes from the cache"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1, "token requests");
        let (_, cached) = y.bearer_token(&transport, &challenge, false).await.unwrap();
        assert!(!cached, "the other registry got the first one's token");
        assert_eq!(count.load(Ordering::SeqCst), 2, "token requests");
    }

    #[test]
    fn renewal_time_from_expires_in() {
        let t0 = Instant::now();
        let secs = |e: Option<f64>| renew_at(t0, e).duration_since(t0).as_secs_f64();
        assert_eq!(secs(Some(300.0)), 270.0);
        assert_eq!(secs(Some(2.0)), 1.8, "short lifetimes are honoured");
        for default in [
            None,
            Some(0.0),
            Some(-5.0),
            Some(0.5),
            Some(f64::NAN),
            Some(f64::INFINITY),
        ] {
            assert_eq!(secs(default), 54.0, "{default:?}");
        }
        for huge in [Some(i64::MAX as f64), Some(1e300)] {
            assert_eq!(secs(huge), 24.0 * 3600.0 - 30.0, "{huge:?}");
        }
    }

    #[test]
    fn expires_in_as_number_or_string() {
        let v = |j: &str| seconds(&serde_json::from_str::<serde_json::Value>(j).unwrap());
        assert_eq!(v("300"), Some(300.0));
        assert_eq!(v("1e30"), Some(1e30));
        assert_eq!(v(r#""300""#), Some(300.0));
        assert_eq!(v(r#"" 42 ""#), Some(42.0));
        for absent in [r#""soon""#, "null", "true", "[1]", "{}"] {
            assert_eq!(v(absent), None, "{absent}");
        }
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("repository:a/b:pull"), "repository:a/b:pull");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}

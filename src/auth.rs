//! Registry authentication as a layer the rest of fastpull never sees: requests carry
//! whatever `Authorization` this holds; a 401 hands its `WWW-Authenticate` here, and the
//! request is sent again once.
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response};
use hyper::body::Incoming;
use tokio::sync::{Mutex, OnceCell, RwLock};

use crate::credentials::{Credential, CredentialStore, Secret};
use crate::error::{Error, Result};
use crate::http::{read_body, Transport};

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

/// Bearer tokens shared by every pull of a client, keyed by realm, service, scope and
/// account.
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
    refresh: Mutex<()>,
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
            refresh: Mutex::new(()),
        }
    }

    /// The header to send now, with its generation (to tell a stale token from a fresh one).
    /// A bearer token about to expire is renewed first.
    pub(crate) async fn header(&self, transport: &Transport) -> Result<(u64, Option<HeaderValue>)> {
        let st = self.state.read().await.clone();
        if st.renew_at.is_some_and(|at| Instant::now() >= at) {
            let _guard = self.refresh.lock().await;
            let cur = self.state.read().await.clone();
            if cur.generation == st.generation {
                if let Some(c) = &cur.challenge {
                    tracing::debug!(registry = %self.registry, "bearer token about to expire; renewing");
                    let token = self.bearer_token(transport, c, true).await?;
                    self.set(Some(token.header), Some(token.renew_at), Some(c.clone()))
                        .await;
                }
            }
            let now = self.state.read().await;
            return Ok((now.generation, now.header.clone()));
        }
        Ok((st.generation, st.header))
    }

    async fn set(
        &self,
        header: Option<HeaderValue>,
        renew_at: Option<Instant>,
        challenge: Option<Challenge>,
    ) {
        let mut st = self.state.write().await;
        st.generation += 1;
        st.header = header;
        st.renew_at = renew_at;
        st.challenge = challenge;
    }

    /// Handles a 401 for a request sent with generation `seen`. Afterwards the caller sends
    /// its request again with [`Auth::header`].
    pub(crate) async fn on_unauthorized(
        &self,
        transport: &Transport,
        seen: u64,
        www_authenticate: Option<&str>,
    ) -> Result<()> {
        let _guard = self.refresh.lock().await;
        let (generation, had_header) = {
            let st = self.state.read().await;
            (st.generation, st.header.is_some())
        };
        if generation != seen {
            return Ok(()); // another request already renewed
        }
        let challenges = www_authenticate.map(parse_challenges).unwrap_or_default();
        if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
            // What we sent was refused: never the cached token again.
            let token = self.bearer_token(transport, c, had_header).await?;
            self.set(Some(token.header), Some(token.renew_at), Some(c.clone()))
                .await;
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
                    self.set(Some(header), None, None).await;
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
    async fn bearer_token(
        &self,
        transport: &Transport,
        c: &Challenge,
        fresh: bool,
    ) -> Result<CachedToken> {
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
            Some(Credential::Basic { username, .. }) => Some(username.clone()),
            Some(Credential::IdentityToken { username, .. }) => username.clone(),
            None => None,
        };
        let key = format!(
            "{realm}\n{}\n{}\n{}",
            service.as_deref().unwrap_or(""),
            scopes.join(" "),
            account.as_deref().unwrap_or("")
        );
        let cached = self.tokens.get(&key);
        if let Some(t) = &cached {
            if !fresh && Instant::now() < t.renew_at {
                return Ok(t.clone());
            }
        }
        if credential.is_some() && lower.starts_with("http://") && !self.plain_http_ok {
            let host = realm.split('/').nth(2).unwrap_or_default();
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
        Ok(token)
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
        if let Some(Credential::Basic { username, password }) = credential {
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
            with_credentials = credential.is_some(),
            "fetching bearer token"
        );
        let started = Instant::now();
        let resp = transport
            .send(Method::GET, &url, headers, Bytes::new())
            .await?;
        self.token_reply(resp, &url, started, credential.is_some(), None)
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
        let resp = transport
            .send(
                Method::POST,
                req.realm,
                headers,
                Bytes::from(form.join("&")),
            )
            .await?;
        if matches!(resp.status().as_u16(), 404 | 405) {
            tracing::debug!("the token service has no OAuth2 endpoint; using GET");
            return Ok(None);
        }
        self.token_reply(resp, req.realm, started, true, Some(refresh_token))
            .await
            .map(Some)
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
                retry_after: None,
                retries: 0,
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<i64>,
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
        // The spec's default lifetime is 60 s. Renew a tenth early (at most 30 s), timed
        // from when we asked, so clock skew cannot matter.
        let lifetime = Duration::from_secs(reply.expires_in.unwrap_or(60).max(0) as u64);
        let early = (lifetime / 10).min(Duration::from_secs(30));
        Ok(CachedToken {
            header,
            renew_at: started + lifetime - early,
            refresh_token: reply
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new)
                .or_else(|| refresh_token.cloned()),
        })
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

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("repository:a/b:pull"), "repository:a/b:pull");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}

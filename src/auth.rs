//! Registry authentication as a layer the rest of fastpull never sees: requests carry
//! whatever `Authorization` this holds; a 401 hands its `WWW-Authenticate` here, and the
//! request is sent again once.
//!
//! Anonymous bearer tokens (the docker token protocol, which Docker Hub, GHCR and others
//! require even for public pulls) are fetched for the repository's pull scope and shared by
//! every request of the pull.

use std::collections::HashMap;

use http::{HeaderMap, HeaderValue, Method};
use tokio::sync::{Mutex, RwLock};

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

/// Authorization state for one repository on one registry.
pub(crate) struct Auth {
    registry: String,
    repository: String,
    current: RwLock<(u64, Option<HeaderValue>)>,
    refresh: Mutex<()>,
}

impl Auth {
    pub(crate) fn new(registry: &str, repository: &str) -> Self {
        Auth {
            registry: registry.to_string(),
            repository: repository.to_string(),
            current: RwLock::new((0, None)),
            refresh: Mutex::new(()),
        }
    }

    /// The header to send now, with its generation (to tell a stale token from a fresh one).
    pub(crate) async fn header(&self) -> (u64, Option<HeaderValue>) {
        self.current.read().await.clone()
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
        if self.current.read().await.0 != seen {
            return Ok(()); // another request already refreshed
        }
        let challenges = www_authenticate.map(parse_challenges).unwrap_or_default();
        let header = match challenges.iter().find(|c| c.scheme == "bearer") {
            Some(c) => Some(self.fetch_token(transport, c).await?),
            None => return Err(self.unauthorized("credentials are required")),
        };
        let mut cur = self.current.write().await;
        *cur = (cur.0 + 1, header);
        Ok(())
    }

    fn unauthorized(&self, message: &str) -> Error {
        Error::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            code: None,
            message: message.to_string(),
        }
    }

    async fn fetch_token(&self, transport: &Transport, c: &Challenge) -> Result<HeaderValue> {
        let realm = c
            .params
            .get("realm")
            .ok_or_else(|| self.unauthorized("bearer challenge without a realm"))?;
        if !(realm.starts_with("https://") || realm.starts_with("http://")) {
            return Err(self.unauthorized("token realm is not an http(s) URL"));
        }
        let mut query = Vec::new();
        if let Some(service) = c.params.get("service") {
            query.push(format!("service={}", encode(service)));
        }
        let ours = format!("repository:{}:pull", self.repository);
        query.push(format!("scope={}", encode(&ours)));
        if let Some(scope) = c.params.get("scope") {
            for s in scope.split(' ').filter(|s| !s.is_empty() && *s != ours) {
                query.push(format!("scope={}", encode(s)));
            }
        }
        let sep = if realm.contains('?') { '&' } else { '?' };
        let url = format!("{realm}{sep}{}", query.join("&"));
        tracing::debug!(realm = %crate::error::redact_url(realm), scope = %ours, "fetching bearer token");
        let resp = transport
            .send(Method::GET, &url, HeaderMap::new(), bytes::Bytes::new())
            .await?;
        let status = resp.status();
        let body = read_body(resp, 1 << 20, &url).await?;
        if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
            return Err(self.unauthorized("the token service refused anonymous access"));
        }
        if !status.is_success() {
            return Err(Error::Registry {
                url: crate::error::redact_url(&url),
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
        }
        let reply: TokenReply = serde_json::from_slice(&body)
            .map_err(|e| self.unauthorized(&format!("unreadable token reply: {e}")))?;
        let token = reply
            .token
            .or(reply.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.unauthorized("token reply has no token"))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| self.unauthorized("token has characters not allowed in a header"))?;
        value.set_sensitive(true);
        Ok(value)
    }
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

//! A token issuer of our own (the docker token protocol), in-process, on 127.0.0.1: it signs
//! ES256 JWTs that the real registry (`auth: token`) validates, and logs every request so
//! tests can count token requests and see how fastpull authenticated.
//!
//! How the registry (distribution 2.8) checks a token: `iss` must equal the configured
//! issuer, `aud` the configured service; the signing key is taken from the `x5c` header
//! (a certificate that must chain to `rootcertbundle`: ours is a self-signed certificate that
//! *is* the bundle); `exp` and `nbf` are checked with a 60 s leeway
//! ([`REGISTRY_LEEWAY_SECS`]), which [`IssuerOptions::lifetime`] compensates for so that the
//! registry really stops accepting a token after the lifetime asked for.
//!
//! The endpoint (`/token`) answers:
//! - `GET` without `Authorization`: anonymous, as [`Anonymous`] says;
//! - `GET` with `Authorization: Basic`: checked against [`IssuerOptions::users`];
//! - `POST` form `grant_type=refresh_token&refresh_token=…`: checked against
//!   [`IssuerOptions::refresh_tokens`] (docker's identity tokens);
//! - `POST` form `grant_type=password&username=…&password=…`: as Basic.
//!
//! Refusals are `401` with a JSON error body.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tempfile::TempDir;

use super::registry::{Registry, RegistryOptions};

/// The registry's clock-skew allowance on `exp` and `nbf` (distribution's `token.Leeway`).
pub const REGISTRY_LEEWAY_SECS: u64 = 60;

/// The `service` our registries are configured with (and tokens' `aud`).
pub const SERVICE: &str = "fastpull-test-registry";

/// The `issuer` our registries trust (and tokens' `iss`).
pub const ISSUER: &str = "fastpull-test-issuer";

/// What an anonymous token request (no credentials) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// A token granting `pull` on the requested repositories (public images).
    Pull,
    /// A token granting nothing (Docker Hub's answer for private repositories): the
    /// registry then refuses it with `insufficient_scope`.
    EmptyAccess,
    /// `401` from the token endpoint.
    Deny,
}

/// Which JSON field carries the token in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    /// `{"token": …}` only.
    Token,
    /// `{"access_token": …}` only (OAuth2 style).
    AccessToken,
    /// Both fields, same value.
    Both,
}

/// How the issuer behaves.
#[derive(Debug, Clone)]
pub struct IssuerOptions {
    /// Anonymous requests.
    pub anonymous: Anonymous,
    /// Accepted `(username, password)` for Basic and the password grant; they get the
    /// actions they ask for (pull, push).
    pub users: Vec<(String, String)>,
    /// Accepted identity (refresh) tokens for the `refresh_token` grant; they get the
    /// actions they ask for.
    pub refresh_tokens: Vec<String>,
    /// Reply field of the token.
    pub field: TokenField,
    /// `expires_in` reported in replies (`None`: field left out).
    pub expires_in: Option<u64>,
    /// Send `expires_in` as a JSON string (`"300"`), as some token services do.
    pub expires_in_as_string: bool,
    /// How long the registry really accepts an issued token (whole seconds; at least this
    /// long, less than a second more).
    pub lifetime: Duration,
    /// `refresh_token` to include in replies to authenticated requests, if any.
    pub reply_refresh_token: Option<String>,
    /// Answer every POST with this status, as token services without the OAuth2 endpoint
    /// do (GCR 404, Artifactory 401, ACR 400, others 405).
    pub post_status: Option<u16>,
}

impl Default for IssuerOptions {
    /// Anonymous pulls allowed, no users, `token` field, honest `expires_in` of 300 s.
    fn default() -> IssuerOptions {
        IssuerOptions {
            anonymous: Anonymous::Pull,
            users: Vec::new(),
            refresh_tokens: Vec::new(),
            field: TokenField::Token,
            expires_in: Some(300),
            expires_in_as_string: false,
            lifetime: Duration::from_secs(300),
            reply_refresh_token: None,
            post_status: None,
        }
    }
}

impl IssuerOptions {
    /// Private registry: anonymous requests refused (`401`), `user`/`password` accepted.
    pub fn private(user: &str, password: &str) -> IssuerOptions {
        IssuerOptions {
            anonymous: Anonymous::Deny,
            users: vec![(user.to_string(), password.to_string())],
            ..IssuerOptions::default()
        }
    }

    /// Also accept identity token `token` (refresh_token grant).
    pub fn refresh_token(mut self, token: &str) -> IssuerOptions {
        self.refresh_tokens.push(token.to_string());
        self
    }

    /// Reported `expires_in` and real lifetime.
    pub fn expiry(mut self, expires_in: Option<u64>, lifetime: Duration) -> IssuerOptions {
        self.expires_in = expires_in;
        self.lifetime = lifetime;
        self
    }

    /// `expires_in` as a JSON string.
    pub fn expires_in_as_string(mut self) -> IssuerOptions {
        self.expires_in_as_string = true;
        self
    }

    /// Every POST answered with `status`.
    pub fn no_oauth_post(mut self, status: u16) -> IssuerOptions {
        self.post_status = Some(status);
        self
    }

    /// Reply field.
    pub fn field(mut self, field: TokenField) -> IssuerOptions {
        self.field = field;
        self
    }
}

/// How a token request authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAuth {
    /// No credentials at all.
    Anonymous,
    /// `Authorization: Basic` with this user (`ok`: the password was right).
    Basic { user: String, ok: bool },
    /// `POST grant_type=refresh_token` (`ok`: a known refresh token).
    RefreshToken { ok: bool },
    /// `POST grant_type=password` with this user.
    Password { user: String, ok: bool },
    /// Something else (another `Authorization` scheme, an unknown grant).
    Other(String),
}

impl TokenAuth {
    /// Whether the credentials were accepted (anonymous counts as accepted).
    pub fn accepted(&self) -> bool {
        match self {
            TokenAuth::Anonymous => true,
            TokenAuth::Basic { ok, .. }
            | TokenAuth::RefreshToken { ok }
            | TokenAuth::Password { ok, .. } => *ok,
            TokenAuth::Other(_) => false,
        }
    }
}

/// One request to the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// How it authenticated.
    pub auth: TokenAuth,
    /// `service` parameter.
    pub service: Option<String>,
    /// `scope` parameters (a space-separated POST `scope` is split).
    pub scopes: Vec<String>,
    /// `grant_type` (POST).
    pub grant_type: Option<String>,
    /// `client_id`.
    pub client_id: Option<String>,
    /// Status answered.
    pub status: u16,
    /// The token handed out, if any.
    pub token: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// The running issuer; stops accepting when dropped.
pub struct TokenIssuer {
    addr: String,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    state: Arc<State>,
    root_pem: PathBuf,
    _dir: TempDir,
}

struct State {
    /// `127.0.0.1:PORT`.
    addr: String,
    /// Redirects answered (see [`TokenIssuer::redirecting_realm`]).
    redirects: AtomicU64,
    opts: Mutex<IssuerOptions>,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    rng: SystemRandom,
    serial: AtomicU64,
    log: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenIssuer {
    /// Starts an issuer on 127.0.0.1 with a fresh signing key.
    pub fn start(opts: IssuerOptions) -> TokenIssuer {
        let key = KeyPair::generate().expect("token signing key (P-256)");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("signer params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fastpull test token signer");
        let cert = params.self_signed(&key).expect("self-sign token signer");
        let dir = tempfile::Builder::new()
            .prefix("fastpull-token-issuer-")
            .tempdir()
            .expect("issuer temp dir");
        let root_pem = dir.path().join("token-signer.pem");
        std::fs::write(&root_pem, cert.pem()).expect("write token signer certificate");
        let rng = SystemRandom::new();
        let signing =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key.serialize_der(), &rng)
                .expect("ring accepts rcgen's PKCS#8 P-256 key");
        let log = Arc::new(Mutex::new(Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token issuer");
        let addr = listener.local_addr().expect("issuer addr").to_string();
        let state = Arc::new(State {
            addr: addr.clone(),
            redirects: AtomicU64::new(0),
            opts: Mutex::new(opts),
            key: signing,
            cert_der: cert.der().to_vec(),
            rng,
            serial: AtomicU64::new(0),
            log: log.clone(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, state2) = (stop.clone(), state.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let state = state2.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &state);
                });
            }
        });
        TokenIssuer {
            addr,
            log,
            stop,
            state,
            root_pem,
            _dir: dir,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// A realm on this issuer that answers `status` (301, 302, 303, 307, 308) with a
    /// `Location` to its `/token` endpoint, keeping the query: a relative one (same origin),
    /// or with `other_origin` the absolute `http://localhost:PORT/token?…` (same server,
    /// another origin: credentials must not follow).
    pub fn redirecting_realm(&self, status: u16, other_origin: bool) -> String {
        let kind = if other_origin { "other" } else { "same" };
        format!("http://{}/redirect/{status}/{kind}/token", self.addr)
    }

    /// How many redirects the issuer has answered.
    pub fn redirects(&self) -> u64 {
        self.state.redirects.load(Ordering::SeqCst)
    }

    /// PEM of the signing certificate (the registry's `rootcertbundle`).
    pub fn root_pem(&self) -> &Path {
        &self.root_pem
    }

    /// The registry's `auth:` section trusting this issuer.
    pub fn auth_yaml(&self) -> String {
        self.auth_yaml_with_realm(&self.realm())
    }

    /// [`TokenIssuer::auth_yaml`] sending clients to `realm` (e.g. a redirecting one).
    pub fn auth_yaml_with_realm(&self, realm: &str) -> String {
        format!(
            "auth:\n  token:\n    realm: \"{realm}\"\n    service: \"{SERVICE}\"\n    issuer: \"{ISSUER}\"\n    rootcertbundle: \"{}\"\n",
            self.root_pem.display()
        )
    }

    /// Changes the behaviour from now on.
    pub fn set_options(&self, opts: IssuerOptions) {
        *self.state.opts.lock().expect("issuer options") = opts;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().expect("issuer log").clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.log.lock().expect("issuer log").len()
    }

    /// Every token handed out so far.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.token)
            .collect()
    }

    /// The log, one line per request, for assertion messages.
    pub fn describe(&self) -> String {
        let reqs = self.requests();
        let t0 = reqs.first().map(|r| r.at);
        reqs.iter()
            .map(|r| {
                format!(
                    "+{:.2}s {} {} auth={:?} grant={:?} client_id={:?} scopes={:?} -> {}",
                    t0.map_or(0.0, |t| r.at.duration_since(t).as_secs_f64()),
                    r.method,
                    r.target,
                    r.auth,
                    r.grant_type,
                    r.client_id,
                    r.scopes,
                    r.status
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A token for `access` (`(repository, actions)`), valid for `lifetime`, signed like
    /// the endpoint's (for harness self-tests and for pushing).
    pub fn mint(&self, subject: &str, access: &[(&str, &[&str])], lifetime: Duration) -> String {
        let access: Vec<(String, Vec<String>)> = access
            .iter()
            .map(|(name, actions)| {
                (
                    name.to_string(),
                    actions.iter().map(|a| a.to_string()).collect(),
                )
            })
            .collect();
        self.state.sign(subject, &access, lifetime)
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

impl State {
    fn sign(&self, subject: &str, access: &[(String, Vec<String>)], lifetime: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970");
        let now_floor = now.as_secs();
        let now_ceil = now_floor + u64::from(now.subsec_nanos() > 0);
        // The registry accepts until exp + leeway: make that at least `lifetime` from now.
        let exp = (now_ceil + lifetime.as_secs()) as i64 - REGISTRY_LEEWAY_SECS as i64;
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64_std(&self.cert_der)],
        });
        let jti = format!(
            "{}-{}",
            now.as_nanos(),
            self.serial.fetch_add(1, Ordering::SeqCst)
        );
        let access: Vec<serde_json::Value> = access
            .iter()
            .map(|(name, actions)| {
                serde_json::json!({"type": "repository", "name": name, "actions": actions})
            })
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": exp,
            "nbf": now_floor as i64 - 1,
            "iat": now_floor as i64,
            "jti": jti,
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            base64_url(header.to_string().as_bytes()),
            base64_url(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("ES256 signature");
        format!("{signing_input}.{}", base64_url(sig.as_ref()))
    }
}

/// Reads one request, answers it, closes.
fn serve(mut conn: TcpStream, state: &State) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let body_len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; body_len.min(1 << 20)];
    reader.read_exact(&mut body)?;

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    if let Some(rest) = path.strip_prefix("/redirect/") {
        let mut it = rest.split('/');
        let (Some(code), Some(kind)) = (it.next(), it.next()) else {
            return respond(&mut conn, 404, br#"{"errors":"not found"}"#);
        };
        let code: u16 = code.parse().unwrap_or(307);
        let location = match kind {
            "other" => format!(
                "http://localhost:{}/token?{query}",
                state.addr.rsplit(':').next().unwrap_or("")
            ),
            _ => format!("/token?{query}"),
        };
        state.redirects.fetch_add(1, Ordering::SeqCst);
        let head = format!(
            "HTTP/1.1 {code} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes())?;
        conn.flush()?;
        let _ = conn.shutdown(Shutdown::Write);
        return Ok(());
    }
    if path != "/token" {
        return respond(&mut conn, 404, br#"{"errors":"not found"}"#);
    }
    let mut params = parse_form(query);
    if method == "POST" {
        params.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let first = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let grant_type = first("grant_type");
    let opts = state.opts.lock().expect("issuer options").clone();
    let user_ok = |u: &str, p: &str| opts.users.iter().any(|(uu, pp)| uu == u && pp == p);

    let auth = match (method.as_str(), grant_type.as_deref()) {
        ("POST", Some("refresh_token")) => {
            let t = first("refresh_token").unwrap_or_default();
            TokenAuth::RefreshToken {
                ok: opts.refresh_tokens.contains(&t),
            }
        }
        ("POST", Some("password")) => {
            let u = first("username").unwrap_or_default();
            let p = first("password").unwrap_or_default();
            TokenAuth::Password {
                ok: user_ok(&u, &p),
                user: u,
            }
        }
        ("POST", g) => TokenAuth::Other(format!("POST grant_type={g:?}")),
        _ => match header("authorization") {
            None => TokenAuth::Anonymous,
            Some(a) => match a.split_once(' ') {
                Some((scheme, cred)) if scheme.eq_ignore_ascii_case("basic") => {
                    let decoded = base64_decode(cred.trim())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let (u, p) = decoded.split_once(':').unwrap_or((&decoded, ""));
                    TokenAuth::Basic {
                        ok: user_ok(u, p),
                        user: u.to_string(),
                    }
                }
                _ => TokenAuth::Other(format!(
                    "Authorization scheme {:?}",
                    a.split(' ').next().unwrap_or("")
                )),
            },
        },
    };

    // What to grant: requested repository actions, limited by who asks.
    let allowed: &[&str] = match &auth {
        TokenAuth::Anonymous => match opts.anonymous {
            Anonymous::Pull => &["pull"],
            Anonymous::EmptyAccess => &[],
            Anonymous::Deny => &["<deny>"],
        },
        a if a.accepted() => &["pull", "push"],
        _ => &["<deny>"],
    };
    let record = |status: u16, token: Option<String>| TokenRequest {
        method: method.clone(),
        target: target.clone(),
        auth: auth.clone(),
        service: first("service"),
        scopes: scopes.clone(),
        grant_type: grant_type.clone(),
        client_id: first("client_id"),
        status,
        token,
        at: Instant::now(),
    };
    if let (Some(status), "POST") = (opts.post_status, method.as_str()) {
        state
            .log
            .lock()
            .expect("issuer log")
            .push(record(status, None));
        return respond(&mut conn, status, br#"{"error":"unsupported"}"#);
    }
    if allowed == ["<deny>"] {
        state
            .log
            .lock()
            .expect("issuer log")
            .push(record(401, None));
        return respond(
            &mut conn,
            401,
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication failed"}],"details":"incorrect username or password"}"#,
        );
    }
    let mut access: Vec<(String, Vec<String>)> = Vec::new();
    for scope in &scopes {
        let mut it = scope.splitn(3, ':');
        let (Some("repository"), Some(name), Some(actions)) = (it.next(), it.next(), it.next())
        else {
            continue;
        };
        let granted: Vec<String> = actions
            .split(',')
            .filter(|a| allowed.contains(a))
            .map(str::to_string)
            .collect();
        if !granted.is_empty() {
            access.push((name.to_string(), granted));
        }
    }
    let subject = match &auth {
        TokenAuth::Basic { user, .. } | TokenAuth::Password { user, .. } => user.clone(),
        TokenAuth::RefreshToken { .. } => "identity-token-user".to_string(),
        _ => String::new(),
    };
    let token = state.sign(&subject, &access, opts.lifetime);
    let mut reply = serde_json::Map::new();
    if matches!(opts.field, TokenField::Token | TokenField::Both) {
        reply.insert("token".into(), token.clone().into());
    }
    if matches!(opts.field, TokenField::AccessToken | TokenField::Both) {
        reply.insert("access_token".into(), token.clone().into());
    }
    if let Some(e) = opts.expires_in {
        let v: serde_json::Value = if opts.expires_in_as_string {
            e.to_string().into()
        } else {
            e.into()
        };
        reply.insert("expires_in".into(), v);
    }
    reply.insert("issued_at".into(), rfc3339_now().into());
    if let (Some(rt), false) = (&opts.reply_refresh_token, auth == TokenAuth::Anonymous) {
        reply.insert("refresh_token".into(), rt.clone().into());
    }
    state
        .log
        .lock()
        .expect("issuer log")
        .push(record(200, Some(token)));
    respond(
        &mut conn,
        200,
        serde_json::Value::Object(reply).to_string().as_bytes(),
    )
}

fn respond(c: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "X",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body)?;
    c.flush()?;
    let _ = c.shutdown(Shutdown::Write);
    Ok(())
}

/// `a=b&c=d` with `+` and `%XX` decoded.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (as in docker's `auth` field and `x5c`).
pub fn base64_std(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// base64url without padding (JWT segments).
pub fn base64_url(data: &[u8]) -> String {
    base64_std(data)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// Decodes standard or url-safe base64, padded or not.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

/// `docker`'s `auth` value: base64 of `user:password`.
pub fn basic_auth_value(user: &str, password: &str) -> String {
    base64_std(format!("{user}:{password}").as_bytes())
}

/// A registry protected by `issuer`, serving what was pushed to `seed` (see
/// [`RegistryOptions::serve_storage_of`]); `extra` is appended to the config (e.g. a
/// `middleware:` section).
pub fn token_registry(issuer: &TokenIssuer, seed: Registry, extra: &str) -> Registry {
    token_registry_with_realm(issuer, seed, &issuer.realm(), extra)
}

/// [`token_registry`] whose challenges name `realm` (e.g.
/// [`TokenIssuer::redirecting_realm`]) instead of the issuer's own endpoint.
pub fn token_registry_with_realm(
    issuer: &TokenIssuer,
    seed: Registry,
    realm: &str,
    extra: &str,
) -> Registry {
    RegistryOptions::new()
        .extra_config(&format!("{}{extra}", issuer.auth_yaml_with_realm(realm)))
        .serve_storage_of(seed)
        .start()
}

/// [`token_registry`] whose redirect middleware sends blob GETs to an nginx CDN on
/// 127.0.0.2 (which refuses any request carrying `Authorization`).
pub fn token_registry_with_cdn(
    issuer: &TokenIssuer,
    seed: Registry,
) -> (Registry, super::cdn::Cdn) {
    super::cdn::seeded_registry_with_cdn(seed, None, |seed, redirect| {
        token_registry(issuer, seed, redirect)
    })
}

/// The registry's `WWW-Authenticate` challenge for a request, parsed into its parameters
/// (for self-tests).
pub fn challenge_params(header: &str) -> HashMap<String, String> {
    let rest = header.split_once(' ').map_or("", |(_, r)| r);
    let mut out = HashMap::new();
    let mut s = rest;
    while let Some((k, v)) = s.split_once("=\"") {
        let Some((val, tail)) = v.split_once('"') else {
            break;
        };
        out.insert(
            k.trim_start_matches(',').trim().to_string(),
            val.to_string(),
        );
        s = tail;
    }
    out
}

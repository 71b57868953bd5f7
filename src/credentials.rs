//! Registry credentials, found where docker, podman/skopeo and crane users keep them.
//!
//! Both docker's `config.json` and containers' `auth.json` are read:
//! `{"auths": {KEY: {"auth": base64("user:pass"), "identitytoken": …}}, "credsStore": NAME,
//! "credHelpers": {KEY: NAME}}`. Keys are normalised (scheme and `/v1/`-style paths dropped,
//! host lower-cased, Docker Hub's aliases folded into `docker.io`); `auth.json`'s namespaced
//! keys (`host/ns`, `host/ns/repo`) are honoured, the most specific one first.
//!
//! Within one file the order is docker's: `credHelpers[registry]`, else `credsStore`, else
//! `auths`. Like docker/cli (whose native store only keeps e-mail addresses in `auths`), a
//! credential helper's answer is final for its file: when the helper has nothing, the file's
//! `auths` entry is *not* consulted and the search moves on to the next file.
//!
//! Secrets never reach an error, a log line or `Debug` output.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use std::{collections::HashMap, io};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::Deserialize;

use crate::error::Error;

const DOCKER_HUB: &str = "docker.io";
/// The server URL docker uses for Docker Hub in `auths` and with credential helpers.
const DOCKER_HUB_SERVER_URL: &str = "https://index.docker.io/v1/";
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
const HELPER_OUTPUT_LIMIT: u64 = 1 << 20;
/// Standard base64 that accepts missing padding (some tools write it without).
const AUTH_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A secret (password, token). `Debug` and `Display` print `<redacted>`; never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for putting on the wire. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A credential for one registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Username and password (or a personal access token used as the password).
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: Secret,
    },
    /// An OAuth2 refresh token (docker config's `identitytoken`, or a helper's `<token>` user).
    IdentityToken {
        /// The user name stored next to the token, if any.
        username: Option<String>,
        /// The refresh token.
        token: Secret,
    },
}

/// Where credentials are looked up. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CredentialStore {
    inner: Arc<Inner>,
}

#[derive(Clone, Debug)]
struct Inner {
    /// Explicit credentials, keyed by normalised registry (or namespace).
    explicit: Vec<(String, Credential)>,
    /// Auth files in search order.
    files: Vec<AuthFileSource>,
    /// The `PATH` credential helpers are looked up on.
    search_path: Option<OsString>,
    helper_timeout: Duration,
}

#[derive(Clone, Debug)]
struct AuthFileSource {
    path: PathBuf,
    /// A missing file is an error (`from_file`) rather than skipped (`from_env`).
    required: bool,
}

impl CredentialStore {
    fn with_files(files: Vec<AuthFileSource>, search_path: Option<OsString>) -> Self {
        CredentialStore {
            inner: Arc::new(Inner {
                explicit: Vec::new(),
                files,
                search_path,
                helper_timeout: HELPER_TIMEOUT,
            }),
        }
    }

    /// No stored credentials (explicit ones can still be added with [`with`](Self::with)).
    pub fn none() -> Self {
        Self::with_files(Vec::new(), std::env::var_os("PATH"))
    }

    /// The usual places, first match wins: `$REGISTRY_AUTH_FILE`; `$DOCKER_CONFIG/config.json`
    /// (else `~/.docker/config.json`); `$XDG_RUNTIME_DIR/containers/auth.json`;
    /// `$XDG_CONFIG_HOME/containers/auth.json` (else `~/.config/containers/auth.json`).
    ///
    /// Reads the environment (including `PATH`, for credential helpers) now; files are read
    /// at lookup time. Missing files are skipped silently.
    pub fn from_env() -> Self {
        Self::from_env_with(|name| std::env::var_os(name))
    }

    fn from_env_with(get: impl Fn(&str) -> Option<OsString>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home = var("HOME").or_else(|| var("USERPROFILE"));
        let mut paths = Vec::new();
        paths.extend(var("REGISTRY_AUTH_FILE"));
        match var("DOCKER_CONFIG") {
            Some(dir) => paths.push(dir.join("config.json")),
            None => paths.extend(home.as_ref().map(|h| h.join(".docker").join("config.json"))),
        }
        paths.extend(var("XDG_RUNTIME_DIR").map(|d| d.join("containers").join("auth.json")));
        match var("XDG_CONFIG_HOME") {
            Some(dir) => paths.push(dir.join("containers").join("auth.json")),
            None => paths.extend(
                home.as_ref()
                    .map(|h| h.join(".config").join("containers").join("auth.json")),
            ),
        }
        let mut files: Vec<AuthFileSource> = Vec::new();
        for path in paths {
            if !files.iter().any(|f| f.path == path) {
                files.push(AuthFileSource {
                    path,
                    required: false,
                });
            }
        }
        Self::with_files(files, get("PATH"))
    }

    /// Only this file (docker `config.json` or containers `auth.json` format), like skopeo's
    /// `--authfile`. A missing file is an error at lookup.
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        let file = AuthFileSource {
            path: path.into(),
            required: true,
        };
        Self::with_files(vec![file], std::env::var_os("PATH"))
    }

    /// An explicit credential for `registry` (`host[:port]`; `docker.io` for Docker Hub); it
    /// wins over every file.
    pub fn with(mut self, registry: &str, credential: Credential) -> Self {
        let key = normalize_key(registry);
        let inner = Arc::make_mut(&mut self.inner);
        inner.explicit.retain(|(k, _)| *k != key);
        inner.explicit.push((key, credential));
        self
    }

    /// The credential for `registry` (as [`Reference::registry`](crate::Reference::registry)
    /// gives it: `docker.io` for Docker Hub, else `host[:port]`) and `repository`
    /// (`library/ubuntu`), or `Ok(None)` when no source has one.
    ///
    /// Blocking (it may run a credential helper, for up to 30 s): async callers use
    /// `spawn_blocking`. A malformed auth file, or a credential helper that is missing or
    /// fails, is an [`Error::Credentials`].
    pub fn lookup(&self, registry: &str, repository: &str) -> Result<Option<Credential>, Error> {
        let registry = normalize_host(registry);
        let target = format!("{registry}/{}", repository.trim_matches('/'));
        let explicit = self.inner.explicit.iter().map(|(k, c)| (k.as_str(), c));
        if let Some(credential) = ranked(explicit, &registry, &target, true).first() {
            return Ok(Some((*credential).clone()));
        }
        for file in &self.inner.files {
            let Some(contents) = read_auth_file(file)? else {
                continue;
            };
            if let Some(credential) =
                self.lookup_in_file(&file.path, &contents, &registry, &target)?
            {
                tracing::debug!(registry = %registry, file = %file.path.display(), "using stored credentials");
                return Ok(Some(credential));
            }
        }
        tracing::debug!(registry = %registry, "no stored credentials");
        Ok(None)
    }

    fn lookup_in_file(
        &self,
        path: &Path,
        contents: &AuthFile,
        registry: &str,
        target: &str,
    ) -> Result<Option<Credential>, Error> {
        let helpers = contents.cred_helpers.iter().flatten();
        let helpers = helpers.map(|(k, v)| (k.as_str(), v.as_str()));
        let helper = ranked(helpers, registry, target, false).into_iter();
        let store = contents.creds_store.as_deref();
        if let Some(name) = helper.chain(store).find(|name| !name.is_empty()) {
            tracing::debug!(registry, helper = name, file = %path.display(), "asking credential helper");
            return self.run_helper(name, registry);
        }
        let entries = contents.auths.iter().flatten();
        let entries = entries.map(|(k, v)| (k.as_str(), (k.as_str(), v)));
        for (key, entry) in ranked(entries, registry, target, true) {
            if let Some(entry) = entry {
                if let Some(credential) = entry.credential(path, key)? {
                    return Ok(Some(credential));
                }
            }
        }
        Ok(None)
    }

    /// Runs `docker-credential-NAME get` with the server URL on stdin.
    fn run_helper(&self, name: &str, registry: &str) -> Result<Option<Credential>, Error> {
        let program = format!("docker-credential-{name}");
        let fail = |message: String| Error::Credentials {
            origin: format!("credential helper {program}"),
            message,
        };
        if name.contains(['/', '\\']) {
            return Err(fail(
                "a helper name must not contain a path separator".into(),
            ));
        }
        let exe = find_program(&program, self.inner.search_path.as_deref())
            .ok_or_else(|| fail(format!("{program} is not installed (not found on PATH)")))?;
        let server_url = if registry == DOCKER_HUB {
            DOCKER_HUB_SERVER_URL
        } else {
            registry
        };
        let out = run_with_timeout(&exe, server_url, self.inner.helper_timeout).map_err(&fail)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let not_found = |s: &str| s.to_ascii_lowercase().contains("credentials not found");
        if !out.status.success() {
            if not_found(&stdout) || not_found(&stderr) {
                return Ok(None);
            }
            let mut message = format!("`{program} get` failed ({})", out.status);
            // stdout carries the secret on success, so only show it when it is not JSON.
            let detail = excerpt(&stderr)
                .or_else(|| excerpt(&stdout).filter(|s| !s.contains('{') && !s.contains('"')));
            if let Some(detail) = detail {
                message.push_str(": ");
                message.push_str(&detail);
            }
            return Err(fail(message));
        }
        let response: HelperResponse = match serde_json::from_slice(&out.stdout) {
            Ok(response) => response,
            Err(_) if not_found(&stdout) => return Ok(None),
            // The serde message could quote a value, so say only where it broke.
            Err(e) => {
                return Err(fail(format!(
                    "`{program} get` printed invalid JSON (line {} column {})",
                    e.line(),
                    e.column()
                )))
            }
        };
        let HelperResponse { username, secret } = response;
        Ok(match (username.as_str(), secret.is_empty()) {
            (_, true) if username.is_empty() || username == "<token>" => None,
            ("<token>", false) => Some(Credential::IdentityToken {
                username: None,
                token: Secret(secret),
            }),
            _ => Some(Credential::Basic {
                username,
                password: Secret(secret),
            }),
        })
    }

    #[cfg(test)]
    fn with_search_path(mut self, path: impl Into<OsString>, timeout: Duration) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        inner.search_path = Some(path.into());
        inner.helper_timeout = timeout;
        self
    }
}

/// An auth file, docker `config.json` or containers `auth.json`. Unknown fields are ignored.
#[derive(Default, Deserialize)]
#[serde(default)]
struct AuthFile {
    auths: Option<HashMap<String, Option<AuthEntry>>>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers")]
    cred_helpers: Option<HashMap<String, String>>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct AuthEntry {
    auth: Option<String>,
    identitytoken: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
struct HelperResponse {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

impl AuthEntry {
    /// The credential in this entry; `None` for an empty entry (docker writes `{}` when the
    /// real credential lives in a credential store).
    fn credential(&self, path: &Path, key: &str) -> Result<Option<Credential>, Error> {
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let mut username = non_empty(&self.username);
        let mut password = non_empty(&self.password);
        if let Some(auth) = self
            .auth
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let fail = |what: &str| Error::Credentials {
                origin: path.display().to_string(),
                message: format!("the \"auth\" field of the auths entry {key:?} {what}"),
            };
            let decoded = AUTH_BASE64
                .decode(auth)
                .map_err(|_| fail("is not valid base64"))?;
            let decoded = String::from_utf8(decoded).map_err(|_| fail("is not UTF-8 text"))?;
            let (user, pass) = decoded
                .split_once(':')
                .ok_or_else(|| fail("does not decode to user:password"))?;
            username = Some(user.to_string()).filter(|u| !u.is_empty());
            password = Some(pass.trim_matches('\0').to_string()).filter(|p| !p.is_empty());
        }
        if let Some(token) = non_empty(&self.identitytoken) {
            return Ok(Some(Credential::IdentityToken {
                username,
                token: Secret(token),
            }));
        }
        if username.is_none() && password.is_none() {
            return Ok(None);
        }
        Ok(Some(Credential::Basic {
            username: username.unwrap_or_default(),
            password: Secret(password.unwrap_or_default()),
        }))
    }
}

/// Reads and parses an auth file; `Ok(None)` when it is missing and optional.
fn read_auth_file(file: &AuthFileSource) -> Result<Option<AuthFile>, Error> {
    let fail = |message: String| Error::Credentials {
        origin: file.path.display().to_string(),
        message,
    };
    let bytes = match std::fs::read(&file.path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !file.required => return Ok(None),
        Err(e) => return Err(fail(format!("cannot read the file: {e}"))),
    };
    // docker accepts an empty config.json.
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Some(AuthFile::default()));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        fail(match e.classify() {
            // A type error's message may quote the offending value, which may be a secret.
            serde_json::error::Category::Data => format!(
                "unexpected JSON structure at line {} column {} (a field of the wrong type?)",
                e.line(),
                e.column()
            ),
            _ => format!("malformed JSON: {e}"),
        })
    })
}

/// Docker Hub's names fold into `docker.io`; other hosts are lower-cased.
fn normalize_host(host: &str) -> String {
    let host = host.trim().trim_end_matches('/').to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.into(),
        _ => host,
    }
}

/// Normalises an `auths`/`credHelpers` key to `host[:port]`, or `host[:port]/namespace` for
/// containers' namespaced keys. A URL key (`https://index.docker.io/v1/`) keeps only its host,
/// as docker does; so does a bare key whose path is just an API version (`host/v2/`).
fn normalize_key(key: &str) -> String {
    let key = key.trim();
    let mut rest = key;
    for scheme in ["https://", "http://"] {
        if key.len() >= scheme.len() && key[..scheme.len()].eq_ignore_ascii_case(scheme) {
            rest = &key[scheme.len()..];
        }
    }
    let had_scheme = rest.len() != key.len();
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = normalize_host(host);
    let path = path.trim_matches('/');
    if had_scheme || path.is_empty() || path == "v1" || path == "v2" {
        host
    } else {
        format!("{host}/{path}")
    }
}

/// The values whose key applies to `target` (`registry/repository`), best first: the most
/// specific namespaced key, then the plain host key; among keys that normalise alike, an
/// already-normal key first, then by key (for determinism).
fn ranked<'a, V>(
    entries: impl Iterator<Item = (&'a str, V)>,
    registry: &str,
    target: &str,
    namespaced: bool,
) -> Vec<V> {
    let mut hits: Vec<(usize, bool, &str, V)> = entries
        .filter_map(|(raw, value)| {
            let key = normalize_key(raw);
            let specificity = if key == registry {
                0
            } else if namespaced
                && key.contains('/')
                && (target == key
                    || target.starts_with(&key) && target.as_bytes().get(key.len()) == Some(&b'/'))
            {
                key.len()
            } else {
                return None;
            };
            Some((specificity, raw != key, raw, value))
        })
        .collect();
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(b.2)));
    hits.into_iter().map(|hit| hit.3).collect()
}

/// `program` in a directory of `search_path`. Only absolute directories are searched: an
/// empty entry means ".", and it or any other relative one would run whatever program of
/// that name the current directory holds (Go's `exec.LookPath`, which docker uses, refuses
/// those too).
fn find_program(program: &str, search_path: Option<&OsStr>) -> Option<PathBuf> {
    let names: Vec<String> = if cfg!(windows) {
        vec![format!("{program}.exe"), program.to_string()]
    } else {
        vec![program.to_string()]
    };
    std::env::split_paths(search_path?)
        .filter(|dir| dir.is_absolute())
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

struct HelperOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `exe get` with `input` on stdin; killed when it outlives `timeout`.
fn run_with_timeout(exe: &Path, input: &str, timeout: Duration) -> Result<HelperOutput, String> {
    let mut command = Command::new(exe);
    command
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child =
        spawn(&mut command).map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    if let Some(mut stdin) = child.stdin.take() {
        // A helper may exit without reading its input; its exit status tells.
        let _ = stdin.write_all(input.as_bytes());
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match other {
                    Err(e) => format!("waiting for it failed: {e}"),
                    _ => format!("no answer within {timeout:?}; killed it"),
                });
            }
        }
    };
    // A grandchild may still hold the pipes open: do not wait for it past the deadline.
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(grace)
            .map_err(|_| "it exited but its output did not end".to_string())
    };
    Ok(HelperOutput {
        status,
        stdout: collect(stdout)?,
        stderr: collect(stderr)?,
    })
}

/// Spawns, retrying briefly on ETXTBSY (a helper just written while another thread forked).
fn spawn(command: &mut Command) -> io::Result<Child> {
    let mut attempt = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20 * attempt));
            }
            result => return result,
        }
    }
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(pipe) = pipe {
            let _ = pipe.take(HELPER_OUTPUT_LIMIT).read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

/// The first non-empty line, at most 200 characters.
fn excerpt(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut short: String = line.chars().take(200).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    Some(short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn write(dir: &Path, name: &str, json: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, json).unwrap();
        path
    }

    fn basic(user: &str, pass: &str) -> Credential {
        Credential::Basic {
            username: user.into(),
            password: Secret::new(pass),
        }
    }

    fn lookup_in(json: &str, registry: &str, repo: &str) -> Result<Option<Credential>, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "auth.json", json);
        CredentialStore::from_file(path).lookup(registry, repo)
    }

    #[test]
    fn nothing_prints_a_secret() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        let token = Credential::IdentityToken {
            username: Some("u".into()),
            token: Secret::new("tok3n"),
        };
        let store = CredentialStore::none()
            .with("ghcr.io", basic("me", "hunter2"))
            .with("quay.io", token.clone());
        let debug = format!("{:?} {token:?} {store:?}", basic("me", "hunter2"));
        assert!(
            !debug.contains("hunter2") && !debug.contains("tok3n"),
            "{debug}"
        );
        assert!(
            debug.contains("me") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn keys_normalise() {
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
            "https://registry-1.docker.io",
            "http://Docker.IO/v2/",
            "index.docker.io/v1/",
        ] {
            assert_eq!(normalize_key(key), "docker.io", "{key}");
        }
        assert_eq!(
            normalize_key("https://LocalHost:5000/v2/"),
            "localhost:5000"
        );
        assert_eq!(normalize_key("localhost:5000"), "localhost:5000");
        assert_eq!(normalize_key("quay.io/ns/repo/"), "quay.io/ns/repo");
        assert_eq!(normalize_key("https://quay.io/ns/repo"), "quay.io");
    }

    #[test]
    fn docker_hub_and_port_keys_match() {
        for key in [
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
            "docker.io",
        ] {
            let json = format!(r#"{{"auths": {{"{key}": {{"auth": "{}"}}}}}}"#, b64("u:p"));
            let got = lookup_in(&json, "docker.io", "library/ubuntu").unwrap();
            assert_eq!(got, Some(basic("u", "p")), "{key}");
        }
        let json = format!(
            r#"{{"auths": {{"http://127.0.0.1:5000/v2/": {{"auth": "{}"}}}}}}"#,
            b64("u:p")
        );
        assert_eq!(
            lookup_in(&json, "127.0.0.1:5000", "a/b").unwrap(),
            Some(basic("u", "p"))
        );
        assert_eq!(lookup_in(&json, "127.0.0.1:5001", "a/b").unwrap(), None);
        assert_eq!(lookup_in(&json, "127.0.0.1", "a/b").unwrap(), None);
    }

    #[test]
    fn auth_field_decodes() {
        // Split at the first ':'; missing padding tolerated; plain username/password fields too.
        let unpadded = b64("me:pa:ss=").trim_end_matches('=').to_string();
        let json = format!(
            r#"{{"auths": {{"a.io": {{"auth": "{unpadded}", "email": "x"}},
               "b.io": {{"username": "bob", "password": "pw"}}, "c.io": {{}}, "d.io": null}},
               "unknown": [1, 2]}}"#
        );
        assert_eq!(
            lookup_in(&json, "a.io", "r").unwrap(),
            Some(basic("me", "pa:ss="))
        );
        assert_eq!(
            lookup_in(&json, "b.io", "r").unwrap(),
            Some(basic("bob", "pw"))
        );
        assert_eq!(lookup_in(&json, "c.io", "r").unwrap(), None);
        assert_eq!(lookup_in(&json, "d.io", "r").unwrap(), None);
    }

    #[test]
    fn bad_auth_fields_are_loud_but_discreet() {
        let dir = tempfile::tempdir().unwrap();
        for (auth, what) in [
            ("c2VjcmV0!!!", "not valid base64"),
            (&*b64("nocolonsecret"), "does not decode to user:password"),
        ] {
            let json = format!(r#"{{"auths": {{"quay.io": {{"auth": "{auth}"}}}}}}"#);
            let path = write(dir.path(), "config.json", &json);
            let err = CredentialStore::from_file(&path)
                .lookup("quay.io", "r")
                .unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("\"quay.io\"") && msg.contains(what), "{msg}");
            assert!(!msg.contains(auth) && !msg.contains("secret"), "{msg}");
            assert_eq!(err.category().exit_code(), 2);
        }
        // Malformed JSON, including a type error next to a secret value.
        for json in [
            r#"{"auths": {"#,
            r#"{"auths": {"q.io": {"auth": 12345678}}}"#,
        ] {
            let path = write(dir.path(), "config.json", json);
            let msg = CredentialStore::from_file(&path)
                .lookup("q.io", "r")
                .unwrap_err()
                .to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains("12345678"), "{msg}");
        }
    }

    #[test]
    fn identity_token() {
        let json = format!(
            r#"{{"auths": {{"a.io": {{"auth": "{}", "identitytoken": "tok"}},
                           "b.io": {{"identitytoken": "tok"}}}}}}"#,
            b64("me:")
        );
        let token = |username: Option<&str>| Credential::IdentityToken {
            username: username.map(String::from),
            token: Secret::new("tok"),
        };
        assert_eq!(
            lookup_in(&json, "a.io", "r").unwrap(),
            Some(token(Some("me")))
        );
        assert_eq!(lookup_in(&json, "b.io", "r").unwrap(), Some(token(None)));
    }

    #[test]
    fn most_specific_namespace_wins() {
        let json = format!(
            r#"{{"auths": {{"quay.io": {{"auth": "{}"}}, "quay.io/ns": {{"auth": "{}"}},
                 "quay.io/ns/app": {{"auth": "{}"}}, "quay.io/n": {{"auth": "{}"}},
                 "docker.io/library": {{"auth": "{}"}}}}}}"#,
            b64("host:1"),
            b64("ns:2"),
            b64("app:3"),
            b64("n:4"),
            b64("lib:5")
        );
        let user = |registry, repo| match lookup_in(&json, registry, repo).unwrap() {
            Some(Credential::Basic { username, .. }) => username,
            other => panic!("{other:?}"),
        };
        assert_eq!(user("quay.io", "ns/app"), "app");
        assert_eq!(user("quay.io", "ns/app2"), "ns");
        assert_eq!(user("quay.io", "ns/app/sub"), "app");
        assert_eq!(user("quay.io", "nsx/app"), "host");
        assert_eq!(user("quay.io", "n/x"), "n");
        assert_eq!(user("docker.io", "library/ubuntu"), "lib");
        assert_eq!(lookup_in(&json, "docker.io", "me/app").unwrap(), None);
    }

    #[test]
    fn sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("home/.docker")).unwrap();
        std::fs::create_dir_all(d.join("run/containers")).unwrap();
        let entry = |u: &str| format!(r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#, b64(u));
        write(&d.join("home/.docker"), "config.json", &entry("docker:p"));
        write(&d.join("run/containers"), "auth.json", &entry("podman:p"));
        write(&d.join("run/containers"), "other.json", "{}");
        let env = |vars: &[(&str, PathBuf)]| {
            let map: HashMap<String, OsString> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone().into_os_string()))
                .collect();
            CredentialStore::from_env_with(move |k| map.get(k).cloned())
        };
        let store = env(&[
            ("HOME", d.join("home")),
            ("XDG_RUNTIME_DIR", d.join("run")),
            ("REGISTRY_AUTH_FILE", d.join("run/containers/other.json")),
        ]);
        let files: Vec<_> = store.inner.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            files,
            [
                d.join("run/containers/other.json"),
                d.join("home/.docker/config.json"),
                d.join("run/containers/auth.json"),
                d.join("home/.config/containers/auth.json"),
            ]
        );
        assert_eq!(
            store.lookup("r.io", "x").unwrap(),
            Some(basic("docker", "p"))
        );
        // DOCKER_CONFIG points elsewhere (missing): skipped, podman's file answers.
        let store = env(&[
            ("HOME", d.join("home")),
            ("DOCKER_CONFIG", d.join("nowhere")),
            ("XDG_RUNTIME_DIR", d.join("run")),
        ]);
        assert_eq!(
            store.lookup("r.io", "x").unwrap(),
            Some(basic("podman", "p"))
        );
        assert_eq!(store.lookup("s.io", "x").unwrap(), None);
        // An explicit credential wins over every file.
        let store = store.with("R.io", basic("explicit", "p"));
        assert_eq!(
            store.lookup("r.io", "x").unwrap(),
            Some(basic("explicit", "p"))
        );
        // A broken file is loud; a missing --authfile too.
        write(&d.join("home/.docker"), "config.json", "{not json");
        let err = env(&[("HOME", d.join("home"))])
            .lookup("r.io", "x")
            .unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        let err = CredentialStore::from_file(d.join("missing.json"))
            .lookup("r.io", "x")
            .unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
        assert_eq!(CredentialStore::none().lookup("r.io", "x").unwrap(), None);
    }

    #[cfg(unix)]
    mod helpers {
        use super::*;

        /// A dir with fake `docker-credential-*` scripts.
        fn helpers(scripts: &[(&str, &str)]) -> tempfile::TempDir {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            for (name, body) in scripts {
                let path = dir.path().join(format!("docker-credential-{name}"));
                std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            dir
        }

        fn store(bin: &Path, json: &str) -> (tempfile::TempDir, CredentialStore) {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "config.json", json);
            let search = std::env::join_paths([bin, Path::new("/usr/bin"), Path::new("/bin")]);
            let store = CredentialStore::from_file(path)
                .with_search_path(search.unwrap(), Duration::from_secs(10));
            (dir, store)
        }

        /// Echoes the server URL it was given as the username.
        const ECHO: &str = r#"read -r url || true
printf '{"ServerURL":"%s","Username":"%s","Secret":"s3cret"}' "$url" "$url""#;

        /// A helper is looked for in the search path's absolute directories only: one in a
        /// relative directory (as "." or "bin" in PATH) is never run. (Red when only empty
        /// entries were skipped.)
        #[test]
        fn helpers_are_not_found_in_relative_directories() {
            use std::os::unix::fs::PermissionsExt;
            let here = tempfile::tempdir_in(".").unwrap();
            let name = "docker-credential-fastpull-test-relative";
            let exe = here.path().join(name);
            std::fs::write(&exe, "#!/bin/sh\nexit 0\n").unwrap();
            std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
            // Its name alone: relative to the current directory, where it was made.
            let relative = Path::new(here.path().file_name().unwrap());
            assert!(relative.is_relative(), "{}", relative.display());
            let search = std::env::join_paths([relative, Path::new("/usr/bin")]).unwrap();
            assert_eq!(find_program(name, Some(&search)), None);
            let absolute = std::fs::canonicalize(here.path()).unwrap();
            let search = std::env::join_paths([absolute.as_path()]).unwrap();
            assert_eq!(find_program(name, Some(&search)), Some(absolute.join(name)));
        }

        #[test]
        fn helper_gets_the_server_url() {
            let bin = helpers(&[("echo", ECHO)]);
            let (_d, store) = store(bin.path(), r#"{"credsStore": "echo"}"#);
            let hub = store.lookup("docker.io", "library/ubuntu").unwrap();
            assert_eq!(hub, Some(basic("https://index.docker.io/v1/", "s3cret")));
            let local = store.lookup("localhost:5000", "a").unwrap();
            assert_eq!(local, Some(basic("localhost:5000", "s3cret")));
        }

        #[test]
        fn cred_helpers_then_creds_store_then_auths() {
            let bin = helpers(&[
                ("a", r#"echo '{"Username":"from-a","Secret":"x"}'"#),
                ("b", r#"echo '{"Username":"<token>","Secret":"tok"}'"#),
                (
                    "none",
                    "echo 'credentials not found in native keychain'; exit 1",
                ),
            ]);
            let auths = format!(r#""auths": {{"r.io": {{"auth": "{}"}}}}"#, b64("file:x"));
            let get = |json: String| store(bin.path(), &json).1.lookup("r.io", "x").unwrap();
            let both = format!(
                r#"{{{auths}, "credsStore": "b", "credHelpers": {{"https://R.io/v2/": "a"}}}}"#
            );
            assert_eq!(get(both), Some(basic("from-a", "x")));
            let token = Credential::IdentityToken {
                username: None,
                token: Secret::new("tok"),
            };
            let store_only =
                format!(r#"{{{auths}, "credsStore": "b", "credHelpers": {{"q.io": "a"}}}}"#);
            assert_eq!(get(store_only), Some(token));
            assert_eq!(get(format!("{{{auths}}}")), Some(basic("file", "x")));
            // As docker: a helper with nothing ends the search in this file.
            assert_eq!(get(format!(r#"{{{auths}, "credsStore": "none"}}"#)), None);
            assert_eq!(
                get(format!(r#"{{{auths}, "credHelpers": {{"r.io": "none"}}}}"#)),
                None
            );
        }

        #[test]
        fn helper_failures_name_the_helper_not_the_secret() {
            let bin = helpers(&[
                (
                    "fail",
                    r#"echo '{"Secret":"s3cret"}'; echo 'keychain locked' >&2; exit 3"#,
                ),
                ("garbage", "echo 'not json s3cret'"),
                ("slow", "exec sleep 10"),
            ]);
            let (_d, s) = store(bin.path(), r#"{"credsStore": "fail"}"#);
            let msg = s.lookup("r.io", "x").unwrap_err().to_string();
            assert!(msg.contains("docker-credential-fail"), "{msg}");
            assert!(msg.contains("keychain locked"), "{msg}");
            assert!(!msg.contains("s3cret"), "{msg}");

            let (_d, s) = store(bin.path(), r#"{"credsStore": "garbage"}"#);
            let msg = s.lookup("r.io", "x").unwrap_err().to_string();
            assert!(
                msg.contains("docker-credential-garbage") && !msg.contains("s3cret"),
                "{msg}"
            );

            let (_d, s) = store(bin.path(), r#"{"credHelpers": {"r.io": "missing"}}"#);
            let err = s.lookup("r.io", "x").unwrap_err();
            assert!(
                err.to_string().contains("docker-credential-missing"),
                "{err}"
            );
            assert_eq!(err.category().exit_code(), 2);

            let (_d, s) = store(bin.path(), r#"{"credsStore": "slow"}"#);
            let s = s.with_search_path(
                std::env::join_paths([bin.path()]).unwrap(),
                Duration::from_millis(300),
            );
            let started = Instant::now();
            let msg = s.lookup("r.io", "x").unwrap_err().to_string();
            assert!(
                msg.contains("docker-credential-slow") && msg.contains("killed"),
                "{msg}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    }
}

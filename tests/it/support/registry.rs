//! A throw-away CNCF distribution registry (`docker-registry serve`) on 127.0.0.1.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rand::RngCore;
use tempfile::TempDir;

use super::{free_port, http_agent};

/// Environment variable that overrides the registry binary (default: `docker-registry` on `PATH`).
pub const REGISTRY_BIN_ENV: &str = "FASTPULL_TEST_REGISTRY_BIN";

/// Response header (set through the registry's `http.headers` config) carrying a per-instance
/// token, so the readiness probe can tell *our* registry from another one that grabbed the port.
const ID_HEADER: &str = "X-Fastpull-Registry-Id";

/// How many ports to try before giving up.
const START_ATTEMPTS: usize = 5;

/// How long one start attempt may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `docker-registry` listening on 127.0.0.1 with filesystem storage in a temp dir.
///
/// The process is killed (and reaped) when the value is dropped; the temp dir goes with it.
pub struct Registry {
    child: Child,
    port: u16,
    storage_root: PathBuf,
    log_path: PathBuf,
    tls: bool,
    /// A stopped registry whose storage this one serves (see [`RegistryOptions::serve_storage_of`]).
    seed: Option<Box<Registry>>,
    // Declared last so it is removed after the child has been killed in `Drop`.
    dir: TempDir,
}

/// HTTPS settings of a registry (`http.tls`).
#[derive(Debug, Clone)]
pub struct RegistryTls {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
    /// Demand client certificates signed by this CA (PEM) (`http.tls.clientcas`).
    pub client_ca: Option<PathBuf>,
    /// Client certificate + key (PEM) the readiness probe presents when `client_ca` is set.
    pub probe_client: Option<(PathBuf, PathBuf)>,
}

/// How to start a [`Registry`]: extra YAML, HTTPS, and whose storage to serve.
#[derive(Default)]
pub struct RegistryOptions {
    extra: String,
    tls: Option<RegistryTls>,
    seed: Option<Registry>,
    storage: Option<PathBuf>,
}

impl RegistryOptions {
    /// Default options: plain HTTP, fresh storage, no extra config.
    pub fn new() -> RegistryOptions {
        RegistryOptions::default()
    }

    /// Top-level YAML appended to the config, as for [`Registry::start_with_extra_config`].
    pub fn extra_config(mut self, yaml_fragment: &str) -> RegistryOptions {
        self.extra = yaml_fragment.to_string();
        self
    }

    /// Serve HTTPS with this certificate and key (PEM).
    pub fn tls(mut self, cert: &Path, key: &Path) -> RegistryOptions {
        self.tls = Some(RegistryTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            probe_client: None,
        });
        self
    }

    /// With [`RegistryOptions::tls`]: require a client certificate signed by `ca`; the
    /// readiness probe presents `probe_cert` + `probe_key`.
    pub fn client_ca(mut self, ca: &Path, probe_cert: &Path, probe_key: &Path) -> RegistryOptions {
        let tls = self
            .tls
            .as_mut()
            .expect("RegistryOptions::client_ca needs RegistryOptions::tls first");
        tls.client_ca = Some(ca.to_path_buf());
        tls.probe_client = Some((probe_cert.to_path_buf(), probe_key.to_path_buf()));
        self
    }

    /// Serve the storage of `seed` (typically a plain registry that images were pushed to):
    /// `seed` is stopped and kept (with its temp dir) until the new registry is dropped. This
    /// is how auth- or TLS-protected registries get their content.
    pub fn serve_storage_of(mut self, seed: Registry) -> RegistryOptions {
        self.seed = Some(seed);
        self
    }

    /// Keep the storage in `dir` (which the caller owns and keeps until the registry is
    /// dropped) rather than in the registry's temp dir: for a server started before the
    /// registry that serves its storage (the CDN of `support::cdn`).
    pub fn storage_root(mut self, dir: &Path) -> RegistryOptions {
        self.storage = Some(dir.to_path_buf());
        self
    }

    /// Starts the registry.
    pub fn start(self) -> Registry {
        Registry::start_with(self)
    }
}

impl Registry {
    /// Starts a registry with the default configuration (no auth, deletes enabled).
    pub fn start() -> Registry {
        Self::start_with_extra_config("")
    }

    /// Starts a registry whose config gets `yaml_fragment` appended verbatim as top-level YAML
    /// (e.g. an `auth:` or `middleware:` section).
    ///
    /// The fragment must not repeat the keys this harness writes itself: `version`, `log`,
    /// `storage` and `http`. When the fragment enables auth, a `401` on `GET /v2/` also counts as
    /// "ready".
    pub fn start_with_extra_config(yaml_fragment: &str) -> Registry {
        RegistryOptions::new().extra_config(yaml_fragment).start()
    }

    /// Starts a registry as `opts` say (see [`RegistryOptions`]).
    pub fn start_with(opts: RegistryOptions) -> Registry {
        let RegistryOptions {
            extra: yaml_fragment,
            tls,
            seed,
            storage,
        } = opts;
        assert!(
            seed.is_none() || storage.is_none(),
            "serve_storage_of and storage_root both name the storage"
        );
        let yaml_fragment = yaml_fragment.as_str();
        // The registry silently lets a repeated top-level key replace ours, which would break
        // the readiness probe in confusing ways; refuse early instead.
        for key in ["version:", "log:", "storage:", "http:"] {
            assert!(
                !yaml_fragment.lines().any(|l| l.starts_with(key)),
                "extra registry config must not contain the top-level key `{key}` \
                 (the harness writes it): {yaml_fragment}"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("fastpull-registry-")
            .tempdir()
            .expect("create temp dir for the test registry");
        let seed = seed.map(|mut seed| {
            seed.stop();
            Box::new(seed)
        });
        let storage_root = match (&seed, storage) {
            (Some(seed), _) => seed.storage_root.clone(),
            (None, Some(storage)) => storage,
            (None, None) => dir.path().join("storage"),
        };
        fs::create_dir_all(&storage_root).expect("create registry storage dir");
        let config_path = dir.path().join("config.yml");
        let bin = std::env::var(REGISTRY_BIN_ENV).unwrap_or_else(|_| "docker-registry".to_string());

        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_port();
            let token = format!("{:016x}", rand::rng().next_u64());
            let log_path = dir.path().join(format!("registry-{attempt}.log"));
            let config = render_config(&storage_root, port, &token, tls.as_ref(), yaml_fragment);
            fs::write(&config_path, config).expect("write registry config");

            let log = File::create(&log_path).expect("create registry log file");
            let log_err = log.try_clone().expect("clone registry log file handle");
            let spawned = Command::new(&bin)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                .spawn();
            let mut child = match spawned {
                Ok(child) => child,
                Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                    "`{bin}` not found: the integration tests need the CNCF distribution registry \
                     (Debian package docker-registry). Run `scripts/test`, which installs it, \
                     or point {REGISTRY_BIN_ENV} at the binary."
                ),
                Err(e) => panic!(
                    "failed to spawn `{bin} serve {}`: {e}",
                    config_path.display()
                ),
            };

            match wait_ready(&mut child, port, &token, tls.as_ref()) {
                Ok(()) => {
                    return Registry {
                        child,
                        port,
                        storage_root,
                        log_path,
                        tls: tls.is_some(),
                        seed,
                        dir,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    failures.push(format!(
                        "attempt {attempt} on port {port}: {why}\n--- log ---\n{log}"
                    ));
                }
            }
        }
        panic!(
            "docker-registry did not start after {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` when serving TLS)
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the process (the storage stays until drop).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Root directory of the filesystem storage driver (the seed's, when serving a seed's).
    pub fn storage_root(&self) -> &Path {
        &self.storage_root
    }

    /// The temp dir holding config, log and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the filesystem driver keeps the bytes of blob `digest` (`sha256:<hex>`):
    /// `<root>/docker/registry/v2/blobs/sha256/<first 2 hex>/<hex>/data`.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let (algo, hex) = digest
            .split_once(':')
            .unwrap_or_else(|| panic!("digest without algorithm prefix: {digest:?}"));
        assert!(hex.len() > 2, "digest too short: {digest:?}");
        self.storage_root
            .join("docker/registry/v2/blobs")
            .join(algo)
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Contents of the registry's stdout/stderr log (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the registry config YAML.
fn render_config(
    storage_root: &Path,
    port: u16,
    token: &str,
    tls: Option<&RegistryTls>,
    extra: &str,
) -> String {
    let tls = match tls {
        None => String::new(),
        Some(t) => {
            let mut s = format!(
                "  tls:\n    certificate: \"{}\"\n    key: \"{}\"\n",
                t.cert.display(),
                t.key.display()
            );
            if let Some(ca) = &t.client_ca {
                s.push_str(&format!("    clientcas:\n      - \"{}\"\n", ca.display()));
            }
            s
        }
    };
    format!(
        "version: 0.1\n\
         log:\n  level: error\n\
         storage:\n  filesystem:\n    rootdirectory: \"{root}\"\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  headers:\n    {ID_HEADER}: [\"{token}\"]\n\
         {tls}\
         {extra}\n",
        root = storage_root.display(),
    )
}

/// A ureq agent for the readiness probe of an HTTPS registry: no verification (the probe
/// only looks for our id header), presenting the probe client certificate if there is one.
fn tls_probe_agent(tls: &RegistryTls) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, TlsConfig};
    let client_cert = tls.probe_client.as_ref().map(|(cert, key)| {
        let cert_pem = fs::read(cert).expect("read probe client certificate");
        let key_pem = fs::read(key).expect("read probe client key");
        let cert = Certificate::from_pem(&cert_pem).expect("parse probe client certificate");
        let key = PrivateKey::from_pem(&key_pem).expect("parse probe client key");
        ClientCert::new_with_certs(&[cert], key)
    });
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .tls_config(
            TlsConfig::builder()
                .disable_verification(true)
                .client_cert(client_cert)
                .build(),
        )
        .build()
        .new_agent()
}

/// Polls `GET /v2/` until our instance answers (200, or 401 when auth is configured).
fn wait_ready(
    child: &mut Child,
    port: u16,
    token: &str,
    tls: Option<&RegistryTls>,
) -> Result<(), String> {
    let (agent, scheme) = match tls {
        Some(tls) => (tls_probe_agent(tls), "https"),
        None => (http_agent(), "http"),
    };
    let url = format!("{scheme}://127.0.0.1:{port}/v2/");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let last;
        match child.try_wait() {
            Ok(Some(status)) => return Err(format!("registry exited early with {status}")),
            Ok(None) => {}
            Err(e) => return Err(format!("cannot poll registry process: {e}")),
        }
        match agent
            .get(&url)
            .config()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .call()
        {
            Ok(resp) => {
                let ours = resp
                    .headers()
                    .get(ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v == token);
                let status = resp.status().as_u16();
                if !ours {
                    last = format!("port {port} answered {status} but it is another server");
                } else if status == 200 || status == 401 {
                    return Ok(());
                } else {
                    last = format!("GET {url} returned {status}");
                }
            }
            Err(e) => last = format!("GET {url}: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready within {START_TIMEOUT:?}: {last}"));
        }
        sleep(Duration::from_millis(50));
    }
}

//! A CDN-like server: nginx on 127.0.0.2 serving the registry's storage root (the target of
//! the registry's redirect middleware), refusing any request that carries `Authorization`,
//! optionally capping each connection's rate as real CDNs do. nginx starts first and the
//! registry's `baseurl` names the port it got, so a port taken by another test is retried
//! before anything depends on it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::support::counting::CountingProxy;
use crate::support::registry::RegistryOptions;
use crate::support::{free_port_on, start_on_ports, Registry, TestPki};

/// Where the CDN listens.
const CDN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// nginx, stopped on drop.
pub struct Cdn {
    child: Child,
    addr: String,
    root: PathBuf,
    dir: tempfile::TempDir,
}

/// The `middleware:` YAML of a registry whose blob GETs redirect to `baseurl`.
fn redirect_to(baseurl: &str) -> String {
    format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {baseurl}/\n"
    )
}

/// A registry whose blob GETs redirect to a CDN, and the CDN. The CDN starts first, on
/// the storage it will serve, so that its port is known (and held) when the registry's
/// `baseurl` names it.
pub fn registry_with_cdn(rate: Option<&str>) -> (Registry, Cdn) {
    let cdn = Cdn::start(None, &limit(rate), None);
    let reg = RegistryOptions::new()
        .storage_root(cdn.root())
        .extra_config(&redirect_to(&format!("http://{}", cdn.addr())))
        .start();
    (reg, cdn)
}

/// A registry whose blob GETs redirect to a [`CountingProxy`] on 127.0.0.3 (its `baseurl`),
/// which relays to nginx on 127.0.0.2 with `directives` in its `server` block (e.g.
/// `limit_rate 4m;`, `limit_rate_after 2m;`, `max_ranges 0;`): the CDN's connections and
/// requests as the proxy counts them.
pub fn registry_with_counted_cdn(directives: &str) -> (Registry, Cdn, CountingProxy) {
    registry_with_counted_cdn_http("", directives)
}

/// As [`registry_with_counted_cdn`], with `http` in nginx's `http` block as well (what only
/// goes there, such as a `limit_conn_zone`).
pub fn registry_with_counted_cdn_http(
    http: &str,
    directives: &str,
) -> (Registry, Cdn, CountingProxy) {
    let ports = std::iter::repeat_with(|| free_port_on(CDN_IP)).take(5);
    let cdn = Cdn::start_on_ports(None, http, directives, None, ports);
    let proxy = CountingProxy::start_on("127.0.0.3", cdn.addr());
    let reg = RegistryOptions::new()
        .storage_root(cdn.root())
        .extra_config(&redirect_to(&format!("http://{}", proxy.addr())))
        .start();
    (reg, cdn, proxy)
}

/// As [`registry_with_cdn`], the CDN speaking HTTPS (HTTP/2 by ALPN) with a certificate of
/// `pki`'s CA.
pub fn registry_with_tls_cdn(rate: Option<&str>, pki: &TestPki) -> (Registry, Cdn) {
    let cdn = Cdn::start(None, &limit(rate), Some(pki));
    let reg = RegistryOptions::new()
        .storage_root(cdn.root())
        .extra_config(&redirect_to(&format!("https://{}", cdn.addr())))
        .start();
    (reg, cdn)
}

/// A CDN serving the storage of `seed` (over HTTPS with `tls`), and the registry `start`
/// makes from `seed` and the `middleware:` YAML that redirects its blob GETs there (e.g.
/// with auth or TLS of its own, serving `seed`'s storage).
pub fn seeded_registry_with_cdn(
    seed: Registry,
    tls: Option<&TestPki>,
    start: impl FnOnce(Registry, &str) -> Registry,
) -> (Registry, Cdn) {
    let cdn = Cdn::start(Some(seed.storage_root()), "", tls);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let reg = start(seed, &redirect_to(&format!("{scheme}://{}", cdn.addr())));
    (reg, cdn)
}

/// nginx on 127.0.0.2 in front of the plain-HTTP registry at `upstream`, speaking HTTPS and
/// HTTP/2 (by ALPN) with a certificate of `pki`'s CA, as registries behind a TLS-terminating
/// proxy or load balancer are reached: `/v2/` is the registry's; its access log has the
/// connection each request came on (`conn=`), the protocol and the `Range` asked for.
pub fn h2_front(upstream: &str, pki: &TestPki) -> Cdn {
    let directives = format!(
        "location /v2/ {{ proxy_pass http://{upstream}; proxy_set_header Host $http_host; \
         proxy_buffering off; }}"
    );
    Cdn::start(None, &directives, Some(pki))
}

/// `limit_rate RATE;`, or nothing.
fn limit(rate: Option<&str>) -> String {
    rate.map(|r| format!("limit_rate {r};")).unwrap_or_default()
}

impl Cdn {
    /// Starts nginx on a free port of 127.0.0.2 serving `root` (None: a fresh directory of
    /// its own, [`Cdn::root`], for a registry's storage), over HTTPS + HTTP/2 when `tls`,
    /// with `directives` (any nginx directives) in the `server` block. A port another test
    /// took first is retried with another (see [`super::start_on_free_port`]).
    pub fn start(root: Option<&Path>, directives: &str, tls: Option<&TestPki>) -> Cdn {
        let ports = std::iter::repeat_with(|| free_port_on(CDN_IP)).take(5);
        Cdn::start_on_ports(root, "", directives, tls, ports)
    }

    /// [`Cdn::start`] trying `ports` in turn, with `http` in the `http` block.
    pub fn start_on_ports(
        root: Option<&Path>,
        http: &str,
        directives: &str,
        tls: Option<&TestPki>,
        ports: impl IntoIterator<Item = u16>,
    ) -> Cdn {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("nginx is required: run scripts/test, which installs it");
        let dir = tempfile::tempdir().expect("nginx dir");
        let p = dir.path().to_path_buf();
        for d in ["logs", "tmp", "storage"] {
            std::fs::create_dir_all(p.join(d)).expect("mkdir");
        }
        let root = root.map_or_else(|| p.join("storage"), Path::to_path_buf);
        let certs = match tls {
            Some(pki) => format!(
                "ssl_certificate {}; ssl_certificate_key {};",
                pki.server_cert.display(),
                pki.server_key.display()
            ),
            None => String::new(),
        };
        let (child, port, _) = start_on_ports("nginx", CDN_IP, ports, |port, attempt| {
            let listen = match tls {
                Some(_) => format!("listen {CDN_IP}:{port} ssl http2;"),
                None => format!("listen {CDN_IP}:{port};"),
            };
            let error_log = p.join(format!("logs/error-{attempt}.log"));
            let conf = format!(
                r#"daemon off;
worker_processes 1;
error_log {error_log} warn;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format conn '$remote_addr "$request" $status $body_bytes_sent conn=$connection proto=$server_protocol range=$http_range';
  access_log {p}/logs/access.log conn;
  client_body_temp_path {p}/tmp;
  proxy_temp_path {p}/tmp;
  fastcgi_temp_path {p}/tmp;
  uwsgi_temp_path {p}/tmp;
  scgi_temp_path {p}/tmp;
  sendfile on;
  {http}
  server {{
    {listen}
    {certs}
    root {root};
    {directives}
    location / {{
      if ($http_authorization) {{ return 403; }}
    }}
  }}
}}
"#,
                p = p.display(),
                error_log = error_log.display(),
                root = root.display(),
            );
            let conf_path = p.join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let child = Command::new(&nginx)
                .arg("-p")
                .arg(&p)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            (child, error_log)
        });
        Cdn {
            child,
            addr: format!("{CDN_IP}:{port}"),
            root,
            dir,
        }
    }

    /// The directory it serves.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// nginx's access log: one line per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/access.log")).unwrap_or_default()
    }
}

impl Drop for Cdn {
    /// SIGTERM: nginx's master stops its workers and then exits (a SIGKILL would leave the
    /// workers running as orphans). SIGKILL only if it has not gone within 5 s.
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

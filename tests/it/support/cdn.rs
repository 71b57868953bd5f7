//! A CDN-like server: nginx on 127.0.0.2 serving the registry's storage root (the target of
//! the registry's redirect middleware), refusing any request that carries `Authorization`,
//! optionally capping each connection's rate as real CDNs do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::counting::CountingProxy;
use crate::support::{Registry, TestPki};

/// nginx, stopped on drop.
pub struct Cdn {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

/// A free port on 127.0.0.2.
pub fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind to find a free port")
        .local_addr()
        .expect("addr")
        .port()
}

/// A registry whose blob GETs redirect to a CDN, and the CDN.
pub fn registry_with_cdn(rate: Option<&str>) -> (Registry, Cdn) {
    let port = free_port_on("127.0.0.2");
    let reg = Registry::start_with_extra_config(&format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://127.0.0.2:{port}/\n"
    ));
    let cdn = Cdn::start_with(reg.storage_root(), port, rate, None);
    (reg, cdn)
}

/// A registry whose blob GETs redirect to a [`CountingProxy`] on 127.0.0.3 (its `baseurl`),
/// which relays to nginx on 127.0.0.2 with `directives` in its `server` block (e.g.
/// `limit_rate 4m;`, `limit_rate_after 2m;`, `max_ranges 0;`): the CDN's connections and
/// requests as the proxy counts them.
pub fn registry_with_counted_cdn(directives: &str) -> (Registry, Cdn, CountingProxy) {
    let port = free_port_on("127.0.0.2");
    let proxy = CountingProxy::start_on("127.0.0.3", &format!("127.0.0.2:{port}"));
    let reg = Registry::start_with_extra_config(&format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://{}/\n",
        proxy.addr()
    ));
    let cdn = Cdn::start_conf(reg.storage_root(), port, directives, None);
    (reg, cdn, proxy)
}

/// As [`registry_with_cdn`], the CDN speaking HTTPS (HTTP/2 by ALPN) with a certificate of
/// `pki`'s CA.
pub fn registry_with_tls_cdn(rate: Option<&str>, pki: &TestPki) -> (Registry, Cdn) {
    let port = free_port_on("127.0.0.2");
    let reg = Registry::start_with_extra_config(&format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: https://127.0.0.2:{port}/\n"
    ));
    let cdn = Cdn::start_with(reg.storage_root(), port, rate, Some(pki));
    (reg, cdn)
}

impl Cdn {
    /// Starts nginx on 127.0.0.2:`port` serving `root`, over HTTPS + HTTP/2 when `tls`.
    pub fn start_with(root: &Path, port: u16, rate: Option<&str>, tls: Option<&TestPki>) -> Cdn {
        let limit = rate.map(|r| format!("limit_rate {r};")).unwrap_or_default();
        Cdn::start_conf(root, port, &limit, tls)
    }

    /// As [`Cdn::start_with`], with `limit` (any nginx directives) in the `server` block.
    pub fn start_conf(root: &Path, port: u16, limit: &str, tls: Option<&TestPki>) -> Cdn {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("nginx is required: run scripts/test, which installs it");
        let dir = tempfile::tempdir().expect("nginx dir");
        let p = dir.path();
        for d in ["logs", "tmp"] {
            std::fs::create_dir_all(p.join(d)).expect("mkdir");
        }
        let (listen, certs) = match tls {
            Some(pki) => (
                format!("listen 127.0.0.2:{port} ssl http2;"),
                format!(
                    "ssl_certificate {}; ssl_certificate_key {};",
                    pki.server_cert.display(),
                    pki.server_key.display()
                ),
            ),
            None => (format!("listen 127.0.0.2:{port};"), String::new()),
        };
        let conf = format!(
            r#"daemon off;
worker_processes 1;
error_log {p}/logs/error.log warn;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format conn '$remote_addr "$request" $status $body_bytes_sent conn=$connection proto=$server_protocol';
  access_log {p}/logs/access.log conn;
  client_body_temp_path {p}/tmp;
  proxy_temp_path {p}/tmp;
  fastcgi_temp_path {p}/tmp;
  uwsgi_temp_path {p}/tmp;
  scgi_temp_path {p}/tmp;
  sendfile on;
  server {{
    {listen}
    {certs}
    root {root};
    {limit}
    location / {{
      if ($http_authorization) {{ return 403; }}
    }}
  }}
}}
"#,
            p = p.display(),
            root = root.display(),
        );
        let conf_path = p.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(p)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr = format!("127.0.0.2:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(p.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Cdn { child, addr, dir }
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

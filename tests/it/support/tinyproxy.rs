//! A real forward proxy: Debian's `tinyproxy` on 127.0.0.1 (random port), in the foreground
//! with a config of our own, allowing `CONNECT` to any port and logging (level `Info`) every
//! request (`Request (file descriptor N): CONNECT 127.0.0.1:PORT HTTP/1.1`,
//! `… GET http://127.0.0.1:PORT/v2/… HTTP/1.1`) to a file the tests read.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::start_on_free_port;

/// A running tinyproxy; killed (and reaped) on drop.
pub struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy on a free 127.0.0.1 port.
    pub fn start() -> Tinyproxy {
        let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("tinyproxy is required: run scripts/deps, which installs it");
        let dir = tempfile::Builder::new()
            .prefix("fastpull-tinyproxy-")
            .tempdir()
            .expect("tinyproxy temp dir");
        let (child, port, log) =
            start_on_free_port("tinyproxy", Ipv4Addr::LOCALHOST, |port, attempt| {
                let log = dir.path().join(format!("tinyproxy-{attempt}.log"));
                let conf = dir.path().join("tinyproxy.conf");
                // No ConnectPort line: CONNECT to every port is allowed.
                std::fs::write(
                    &conf,
                    format!(
                        "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\n\
                         MaxClients 200\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
                        log.display()
                    ),
                )
                .expect("write tinyproxy.conf");
                let child = Command::new(&bin)
                    .arg("-d")
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn tinyproxy");
                (child, log)
            });
        Tinyproxy {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT` (for `HTTPS_PROXY` and friends).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The request lines proxied so far (`CONNECT 127.0.0.1:5000 HTTP/1.1`,
    /// `GET http://127.0.0.1:5000/v2/ HTTP/1.1`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("Request (file descriptor "))
            .filter_map(|(_, rest)| rest.split_once("): "))
            .map(|(_, req)| req.trim().to_string())
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

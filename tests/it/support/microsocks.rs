//! A real SOCKS5 proxy: Debian's `microsocks` on 127.0.0.1 (random port), optionally
//! requiring a username and password. It logs every tunnel it opens
//! (`client[N] 127.0.0.1: connected to 127.0.0.1:PORT`) to a file the tests read.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_port;

/// A running microsocks; killed (and reaped) on drop.
pub struct Microsocks {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl Microsocks {
    /// Starts microsocks on a free 127.0.0.1 port; with `auth`, it accepts only that
    /// username and password.
    pub fn start(auth: Option<(&str, &str)>) -> Microsocks {
        let bin = PathBuf::from("/usr/bin/microsocks");
        assert!(
            bin.exists(),
            "microsocks is required: run scripts/deps, which installs it"
        );
        let dir = tempfile::Builder::new()
            .prefix("fastpull-microsocks-")
            .tempdir()
            .expect("microsocks temp dir");
        let mut failures = Vec::new();
        for attempt in 1..=5 {
            let port = free_port();
            let log = dir.path().join(format!("microsocks-{attempt}.log"));
            let out = std::fs::File::create(&log).expect("microsocks log file");
            let mut cmd = Command::new(&bin);
            cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
            if let Some((user, pass)) = auth {
                cmd.args(["-u", user, "-P", pass]);
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("dup log file"))
                .stderr(out)
                .spawn()
                .expect("spawn microsocks");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    failures.push(format!(
                        "attempt {attempt} on port {port}: exited {status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ));
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Still alive after a connection: it is ours listening, not a bind
                    // failure on a port another server took.
                    std::thread::sleep(Duration::from_millis(50));
                    if let Ok(None) = child.try_wait() {
                        return Microsocks {
                            child,
                            port,
                            log,
                            _dir: dir,
                        };
                    }
                    continue;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push(format!(
                        "attempt {attempt} on port {port}: not ready in 10 s"
                    ));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("microsocks did not start:\n{}", failures.join("\n"));
    }

    /// `127.0.0.1:PORT`, for `SCHEME://[USER:PASS@]` + this.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many tunnels it opened to `addr` (`HOST:PORT`).
    pub fn tunnels_to(&self, addr: &str) -> usize {
        let needle = format!(": connected to {addr}");
        self.log().lines().filter(|l| l.ends_with(&needle)).count()
    }
}

impl Drop for Microsocks {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

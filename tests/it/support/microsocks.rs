//! A real SOCKS5 proxy: Debian's `microsocks` on 127.0.0.1 (random port), optionally
//! requiring a username and password. It logs every tunnel it opens
//! (`client[N] 127.0.0.1: connected to 127.0.0.1:PORT`) to a file the tests read.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use super::start_on_free_port;

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
        let (child, port, log) =
            start_on_free_port("microsocks", Ipv4Addr::LOCALHOST, |port, attempt| {
                let log = dir.path().join(format!("microsocks-{attempt}.log"));
                let out = std::fs::File::create(&log).expect("microsocks log file");
                let mut cmd = Command::new(&bin);
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                if let Some((user, pass)) = auth {
                    cmd.args(["-u", user, "-P", pass]);
                }
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(out.try_clone().expect("dup log file"))
                    .stderr(out)
                    .spawn()
                    .expect("spawn microsocks");
                (child, log)
            });
        Microsocks {
            child,
            port,
            log,
            _dir: dir,
        }
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

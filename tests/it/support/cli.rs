//! Running the fastpull binary with a controlled environment: a temp `HOME` of the test's own,
//! none of the caller's credential, proxy or TLS variables (see
//! [`super::runner::fastpull_command`]), and a `bin/` directory first on `PATH` (for fake
//! `docker-credential-*` helpers). The auth / TLS / network-path / scheduler tests start
//! fastpull through [`fastpull_cmd`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::image::Image;
use super::push::push_image;
use super::registry::Registry;

pub use super::runner::SCRUBBED_ENV;

/// How long one fastpull run may take before the test kills it and fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The fastpull binary with `HOME=home`, `bin_dir` (if any) first on `PATH`, and every
/// variable of [`SCRUBBED_ENV`] removed. Stdin is null unless the caller changes it.
pub fn fastpull_cmd(home: &Path, bin_dir: Option<&Path>) -> Command {
    let mut cmd = super::runner::fastpull_command();
    cmd.env("HOME", home);
    if let Some(bin) = bin_dir {
        let mut path = OsString::from(bin);
        if let Some(old) = std::env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        cmd.env("PATH", path);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A temp `HOME` (with `bin/` first on `PATH`) for one test's fastpull runs.
pub struct Sandbox {
    dir: TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("fastpull-home-")
            .tempdir()
            .expect("temp HOME");
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir HOME/bin");
        Sandbox { dir }
    }

    /// The `HOME` of spawned runs.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// `HOME/bin`, first on `PATH` of spawned runs.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// A fresh path `HOME/<name>` (parent directories created).
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir in sandbox");
        }
        p
    }

    /// Writes `contents` to `HOME/<name>` (parents created); returns the path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Writes `~/.docker/config.json`.
    pub fn docker_config(&self, json: &serde_json::Value) -> PathBuf {
        self.write(".docker/config.json", &json.to_string())
    }

    /// The command (see [`fastpull_cmd`]), without arguments.
    pub fn cmd(&self) -> Command {
        fastpull_cmd(self.home(), Some(&self.bin_dir()))
    }

    /// `fastpull ARGS… IMAGE DEST` with `env` set; output after at most [`RUN_TIMEOUT`].
    pub fn pull(&self, args: &[&str], env: &[(&str, &str)], image: &str, dest: &Path) -> Output {
        self.pull_stdin(args, env, image, dest, None)
    }

    /// As [`Sandbox::pull`], writing `stdin` to the process first.
    pub fn pull_stdin(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        image: &str,
        dest: &Path,
        stdin: Option<&[u8]>,
    ) -> Output {
        let mut cmd = self.cmd();
        cmd.args(args).arg(image).arg(dest);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, stdin)
    }
}

/// How long a test waits for an event of a pull running in the background ([`Run::until`])
/// before it fails.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(120);

/// A fastpull process started in the background, its output drained by two threads.
pub struct Run {
    child: Child,
    readers: Option<Readers>,
    /// When it was started.
    pub started: Instant,
    /// What the process has written to stderr so far (the reader thread appends).
    pub err_so_far: Arc<Mutex<Vec<u8>>>,
}

impl Run {
    pub fn start(mut cmd: Command) -> Run {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn fastpull");
        let started = Instant::now();
        let mut so = child.stdout.take().expect("stdout");
        let mut se = child.stderr.take().expect("stderr");
        let err_so_far = Arc::new(Mutex::new(Vec::new()));
        let sink = err_so_far.clone();
        let readers = (
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = so.read_to_end(&mut v);
                v
            }),
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match se.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => sink
                            .lock()
                            .expect("stderr buffer")
                            .extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let v = sink.lock().expect("stderr buffer").clone();
                v
            }),
        );
        Run {
            child,
            readers: Some(readers),
            started,
            err_so_far,
        }
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("poll fastpull").is_some()
    }

    /// Sends `sig` to the process (ours, by its id); nothing if it has been reaped.
    pub fn signal(&mut self, sig: rustix::process::Signal) {
        if self.exited() {
            return;
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        // It may exit between the check and the kill (it is not reaped yet, so the pid is
        // still ours): then the signal finds a zombie, which is fine.
        let _ = rustix::process::kill_process(pid, sig);
    }

    /// Polls `cond` every 2 ms until it holds (true) or the process exits first (false);
    /// fails after [`EVENT_DEADLINE`].
    pub fn until(&mut self, what: &str, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            if cond() {
                return true;
            }
            if self.exited() {
                return cond();
            }
            if Instant::now() >= deadline {
                self.signal(rustix::process::Signal::KILL);
                let o = self.wait();
                panic!("waited {EVENT_DEADLINE:?} for {what}\n{}", super::text(&o));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// As [`Run::until`], failing if the process exits first.
    pub fn expect(&mut self, what: &str, cond: impl FnMut() -> bool) {
        if !self.until(what, cond) {
            let o = self.wait();
            panic!("fastpull exited before {what}\n{}", super::text(&o));
        }
    }

    /// Waits for the process (killing it, and failing, after [`RUN_TIMEOUT`]).
    pub fn wait(&mut self) -> Output {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("poll fastpull") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("fastpull still running after {RUN_TIMEOUT:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (stdout, stderr) = collect(self.readers.take().expect("waited twice"));
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.readers.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion, feeding `stdin` if given, killing it after [`RUN_TIMEOUT`].
pub fn run(cmd: Command, stdin: Option<&[u8]>) -> Output {
    run_for(cmd, stdin, RUN_TIMEOUT)
}

/// As [`run`], killing it (and failing) after `timeout`.
pub fn run_for(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn fastpull");
    let out = drain(&mut child);
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("child stdin");
        // The child may exit without reading (e.g. a usage error): ignore EPIPE.
        let _ = pipe.write_all(input);
        // Dropping `pipe` closes the child's stdin.
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("poll fastpull") {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let (stdout, stderr) = collect(out);
                panic!(
                    "fastpull still running after {timeout:?}; killed.\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let (stdout, stderr) = collect(out);
    Output {
        status,
        stdout,
        stderr,
    }
}

/// The threads reading a process's stdout and stderr.
type Readers = (JoinHandle<Vec<u8>>, JoinHandle<Vec<u8>>);

fn drain(child: &mut Child) -> Readers {
    let mut so = child.stdout.take().expect("child stdout");
    let mut se = child.stderr.take().expect("child stderr");
    (
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        }),
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        }),
    )
}

fn collect((a, b): Readers) -> (Vec<u8>, Vec<u8>) {
    (
        a.join().expect("stdout reader"),
        b.join().expect("stderr reader"),
    )
}

/// A plain registry holding each `(repo, tag, image)`: the content for a protected registry
/// made with [`super::registry::RegistryOptions::serve_storage_of`].
pub fn seeded(images: &[(&str, &str, &Image)]) -> Registry {
    let reg = Registry::start();
    for (repo, tag, image) in images {
        push_image(&reg, repo, tag, image);
    }
    reg
}

/// Asserts `out` holds every blob of `image` with the right bytes.
pub fn assert_pulled(out: &Path, image: &Image, o: &Output) {
    assert!(o.status.success(), "fastpull failed:\n{}", super::text(o));
    for b in image.blobs() {
        let p = out.join("blobs/sha256").join(super::hex(&b.digest));
        let got = std::fs::read(&p)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", p.display(), super::text(o)));
        assert!(got == b.bytes, "blob {} differs", b.digest);
    }
    let manifest = out
        .join("blobs/sha256")
        .join(super::hex(&image.manifest_digest));
    assert!(
        manifest.exists(),
        "manifest {} missing\n{}",
        image.manifest_digest,
        super::text(o)
    );
}

/// Asserts `o` failed with exit code `code`.
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}:\n{}",
        super::text(o)
    );
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A layer of exactly `size` pseudo-random bytes (content need not be a tar for a pull).
pub fn sized_blob(seed: u64, size: usize) -> super::image::Blob {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    super::image::Blob::new("", bytes)
}

/// An OCI image of layers of `sizes` bytes.
pub fn image_of(seed: u64, sizes: &[usize]) -> Image {
    let mut b = super::image::ImageBuilder::new(super::image::Flavor::Oci);
    for (i, &size) in sizes.iter().enumerate() {
        let blob = sized_blob(seed + i as u64, size);
        let diff = blob.digest.clone();
        b = b.raw_layer(blob, diff);
    }
    b.build()
}

/// A multi-layer image with one layer over 4 MiB (5 MiB + 37 bytes: 6 range chunks of 1 MiB)
/// and two small ones.
pub fn big_image(seed: u64) -> Image {
    image_of(seed, &[(5 << 20) + 37, 3000, 300 << 10])
}

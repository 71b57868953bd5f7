//! Running the fastpull binary with a controlled environment: a temp `HOME` of the test's own,
//! none of the caller's credential, proxy or TLS variables (see
//! [`super::runner::fastpull_command`]), and a `bin/` directory first on `PATH` (for fake
//! `docker-credential-*` helpers). The auth / TLS / network-path / scheduler tests start
//! fastpull through [`fastpull_cmd`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

type Readers = (
    std::thread::JoinHandle<Vec<u8>>,
    std::thread::JoinHandle<Vec<u8>>,
);

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

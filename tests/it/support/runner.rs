//! Spawning the fastpull binary under test: through `FASTPULL_TEST_RUNNER` when that is set,
//! and always in a scrubbed environment (an empty `HOME`, none of the caller's credential,
//! proxy, TLS or logging variables), so that no test depends on the machine it runs on.
//!
//! scripts/test also runs this suite for aarch64 under qemu: cargo's runner starts the test
//! binary under emulation, but what the tests spawn goes through the host kernel, which cannot
//! run an aarch64 fastpull by itself. Native helpers (registry, nginx, skopeo…) need nothing.

use std::env::VarError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Environment variable holding a command line that runs the fastpull binary under test, such
/// as `qemu-aarch64-static`; empty or unset runs it directly.
pub const RUNNER_ENV: &str = "FASTPULL_TEST_RUNNER";

/// Set, under a runner, to the name of the test that started fastpull.
pub const TEST_NAME_ENV: &str = "FASTPULL_TEST_NAME";

/// The fastpull binary cargo built for these tests.
pub const FASTPULL_BIN: &str = env!("CARGO_BIN_EXE_fastpull");

/// Variables that change where credentials, proxies, trust or logging come from: removed from
/// every spawned fastpull unless the test sets them again.
pub const SCRUBBED_ENV: &[&str] = &[
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "USERPROFILE",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUEST_METHOD",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "FASTPULL_LOG",
    "RUST_LOG",
];

/// The `HOME` of a fastpull started by [`fastpull_command`]: an empty directory under cargo's
/// scratch dir for tests, shared by the tests of this build (fastpull only reads `HOME`).
/// Panics if something was written there, which would make tests depend on each other.
pub fn empty_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fastpull-empty-home");
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("create {}: {e}", home.display()));
        let left: Vec<_> = std::fs::read_dir(&home)
            .unwrap_or_else(|e| panic!("read {}: {e}", home.display()))
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("read {}: {e}", home.display()));
        assert!(
            left.is_empty(),
            "{} must stay empty (a fastpull run wrote to its HOME?): {left:?}",
            home.display()
        );
        home
    })
}

/// A `Command` that runs the fastpull binary under test, with `HOME` set to [`empty_home`] and
/// every variable of [`SCRUBBED_ENV`] removed: every test that spawns fastpull starts it
/// through here (or [`command_for`], or `support::cli`, which sets its own `HOME`).
pub fn fastpull_command() -> Command {
    let runner = match std::env::var(RUNNER_ENV) {
        Ok(v) => v,
        Err(VarError::NotPresent) => String::new(),
        Err(e) => panic!("{RUNNER_ENV}: {e}"),
    };
    fastpull_command_through(&runner)
}

/// [`fastpull_command`] with `runner` (a command line, empty for none) instead of what
/// [`RUNNER_ENV`] says.
pub fn fastpull_command_through(runner: &str) -> Command {
    let mut cmd = runner_command(runner);
    cmd.env("HOME", empty_home());
    // Each run its own index of partial downloads (src/partials.rs), so that no test takes
    // over another's; a test that wants two runs to share one sets XDG_STATE_HOME itself.
    cmd.env("XDG_STATE_HOME", own_state_dir());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// A state directory no other fastpull run of these tests uses (created by fastpull if it
/// writes there), under cargo's scratch dir for tests.
fn own_state_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fastpull-state")
        .join(format!("{}-{n}", std::process::id()))
}

/// The fastpull binary, through `runner` if there is one.
fn runner_command(runner: &str) -> Command {
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(FASTPULL_BIN);
            // scripts/test-aarch64 reads it from a child of this fastpull that qemu left
            // deadlocked, to run that test again (libtest names a test's thread after it).
            if let Some(test) = std::thread::current().name() {
                cmd.env(TEST_NAME_ENV, test);
            }
            cmd
        }
        None => Command::new(FASTPULL_BIN),
    }
}

/// A `Command` for `program`: [`fastpull_command`] when it is the fastpull binary under test.
pub fn command_for(program: &str) -> Command {
    if program == FASTPULL_BIN {
        fastpull_command()
    } else {
        Command::new(program)
    }
}

/// Whether fastpull runs under an emulator (the aarch64 stage: qemu-user). There the client is
/// many times slower than the servers on the same machine, so what depends on the client's
/// speed (how many requests the scheduler makes, bytes a cut transfer already had in its
/// socket) is checked natively only; correctness is checked everywhere.
pub fn under_emulation() -> bool {
    std::env::var_os(RUNNER_ENV).is_some_and(|v| !v.is_empty())
}

//! Spawning the fastpull binary under test, through `FASTPULL_TEST_RUNNER` when that is set.
//!
//! scripts/test also runs this suite for aarch64 under qemu: cargo's runner starts the test
//! binary under emulation, but what the tests spawn goes through the host kernel, which cannot
//! run an aarch64 fastpull by itself. Native helpers (registry, nginx, skopeo…) need nothing.

use std::env::VarError;
use std::process::Command;

/// Environment variable holding a command line that runs the fastpull binary under test, such
/// as `qemu-aarch64-static`; empty or unset runs it directly.
pub const RUNNER_ENV: &str = "FASTPULL_TEST_RUNNER";

/// The fastpull binary cargo built for these tests.
pub const FASTPULL_BIN: &str = env!("CARGO_BIN_EXE_fastpull");

/// A `Command` that runs the fastpull binary under test: every test that spawns fastpull
/// starts it through here (or [`command_for`]).
pub fn fastpull_command() -> Command {
    let runner = match std::env::var(RUNNER_ENV) {
        Ok(v) => v,
        Err(VarError::NotPresent) => String::new(),
        Err(e) => panic!("{RUNNER_ENV}: {e}"),
    };
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(FASTPULL_BIN);
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

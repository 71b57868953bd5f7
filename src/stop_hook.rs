//! A test-only pause at a named phase of a pull, so that a test can `kill -9` fastpull
//! exactly there (feature `bench-internals` only; without it [`reached`] is empty and the
//! code paths are those of a release build). With `FASTPULL_TEST_STOP=PHASE[@TEXT]`, the
//! first time the process reaches PHASE with a file whose path holds TEXT (any file
//! without it) it prints `fastpull-test-stop: PHASE` to stderr and sleeps for good. Phases:
//! `fresh` (a new partial file created, its journal not yet), `hash` (every byte of a blob
//! written, its digest pending), `fsync` (a verified blob about to be flushed), `rename`
//! (flushed, about to get its final name), `index` (`index.json` about to be written).

use std::path::Path;

/// Pauses here if the test asked for `phase` at `file` (see the module docs).
#[cfg(feature = "bench-internals")]
pub(crate) fn reached(phase: &str, file: &Path) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRED: AtomicBool = AtomicBool::new(false);
    let Ok(wanted) = std::env::var("FASTPULL_TEST_STOP") else {
        return;
    };
    let (want, text) = wanted.split_once('@').unwrap_or((&wanted, ""));
    if want == phase && file.to_string_lossy().contains(text) && !FIRED.swap(true, Ordering::SeqCst)
    {
        eprintln!("fastpull-test-stop: {phase}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Pauses here if the test asked for `phase`: never, without `bench-internals`.
#[cfg(not(feature = "bench-internals"))]
#[inline(always)]
pub(crate) fn reached(_phase: &str, _file: &Path) {}

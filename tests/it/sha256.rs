//! Which sha256 implementation runs: the CPU's SHA extensions wherever the kernel says the CPU
//! has them (SHA-NI on x86_64, the ARMv8 SHA2 instructions on aarch64), else software; and
//! `fastpull --version` names it. The CPU's capabilities come from the kernel (/proc/cpuinfo,
//! the auxiliary vector), not from the run-time detection that fastpull and sha2 share, so a
//! detection that always said "software" (or always "hardware") fails here.
//!
//! scripts/test also proves that sha2 really executes those instructions: under qemu it traces
//! a hashing test and looks for `sha256h`.

use std::env::VarError;

use crate::support::*;

/// Environment variable: the implementation this run must find, e.g. `hardware (ARMv8 SHA2)`
/// when scripts/test runs the suite under qemu, whose emulated CPU has the SHA2 extensions.
const EXPECT_ENV: &str = "FASTPULL_EXPECT_SHA256";

/// The implementation fastpull must pick, from the CPU flags the kernel reports.
#[cfg(target_arch = "x86_64")]
fn expected_from_kernel() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .expect("a flags line in /proc/cpuinfo");
    // sha2 (and fastpull's check) wants SHA plus the SSE levels its SHA-NI code uses.
    if ["sha_ni", "sse2", "ssse3", "sse4_1"]
        .iter()
        .all(|f| flags.contains(f))
    {
        "hardware (SHA-NI)"
    } else {
        "software"
    }
}

/// The implementation fastpull must pick, from AT_HWCAP in the auxiliary vector (what the
/// kernel, or qemu-user for its emulated CPU, tells the process).
#[cfg(target_arch = "aarch64")]
fn expected_from_kernel() -> &'static str {
    // (type, value) pairs of native-endian u64; arch/arm64/include/uapi/asm/hwcap.h.
    const AT_HWCAP: u64 = 16;
    const HWCAP_SHA2: u64 = 1 << 6;
    let auxv = std::fs::read("/proc/self/auxv").expect("read /proc/self/auxv");
    let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
    let hwcap = auxv
        .chunks_exact(16)
        .map(|pair| (word(&pair[..8]), word(&pair[8..])))
        .find(|&(kind, _)| kind == AT_HWCAP)
        .map(|(_, value)| value)
        .expect("AT_HWCAP in /proc/self/auxv");
    if hwcap & HWCAP_SHA2 != 0 {
        "hardware (ARMv8 SHA2)"
    } else {
        "software"
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn expected_from_kernel() -> &'static str {
    "software"
}

#[test]
fn sha256_is_the_hardware_one_where_the_cpu_has_it_and_version_names_it() {
    let want = expected_from_kernel();
    assert_eq!(fastpull::sha256_backend(), want);
    match std::env::var(EXPECT_ENV) {
        Ok(expected) => assert_eq!(want, expected, "{EXPECT_ENV}"),
        Err(VarError::NotPresent) => {}
        Err(e) => panic!("{EXPECT_ENV}: {e}"),
    }
    let o = fastpull_command()
        .arg("--version")
        .output()
        .expect("run fastpull --version");
    assert!(o.status.success(), "{}", text(&o));
    let version = String::from_utf8_lossy(&o.stdout);
    let line = format!("sha256: {want}");
    assert!(
        version.lines().any(|l| l == line),
        "want {line:?}: {version}"
    );
}

//! Crash-safe resume and self-repair (issue 12), against the real registry: a pull stopped
//! by `kill -9` or Ctrl-C at any point is finished by the next one, which fetches only what
//! is missing; a blob that fails its digest is fetched again; a journal or partial file that
//! lies never puts a wrong byte under a final name; a second pull into the same destination
//! is refused; a full disk stops the pull with what it wrote kept.
//!
//! Bytes are counted on the server's side, by the counting proxy (`support/counting.rs`):
//! what it relayed of each blob, per request. Points in a pull are reached by events the test
//! can see (the journal growing, a file appearing, a response held by the proxy until the
//! test lets it go), or, for the `kill -9` points, by a share of a measured unkilled pull's
//! time: any point is a valid place to kill, so that clock only spreads them out and no
//! assertion depends on it.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::Digest as _;

use crate::support::cli::{assert_exit, fastpull_cmd, image_of, Run, Sandbox};
use crate::support::counting::Log;
use crate::support::runner::under_emulation;
use crate::support::*;

const TAG: &str = "v";
const MIB: u64 = 1 << 20;
/// Pieces a repaired blob is compared in (src/fetch/mod.rs `REPAIR_PIECE`).
const REPAIR_PIECE: u64 = MIB;

// ---------------------------------------------------------------------------------------------
// Running fastpull in the background (support::cli::Run)
// ---------------------------------------------------------------------------------------------

/// `fastpull ARGS… IMAGE DEST`, with a scrubbed environment (support/cli.rs).
fn pull_cmd(sb: &Sandbox, image: &str, dest: &Path, args: &[&str]) -> Command {
    let mut cmd = fastpull_cmd(sb.home(), None);
    cmd.args(args).arg(image).arg(dest);
    cmd
}

fn image_at(addr: &str, repo: &str) -> String {
    format!("{addr}/{repo}:{TAG}")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The destination: scratch files, journals, verification
// ---------------------------------------------------------------------------------------------

fn scratch(dest: &Path) -> PathBuf {
    dest.join(".fastpull-tmp")
}

fn partial(dest: &Path, digest: &str) -> PathBuf {
    scratch(dest).join(format!("{}.partial", hex(digest)))
}

fn journal(dest: &Path, digest: &str) -> PathBuf {
    scratch(dest).join(format!("{}.journal", hex(digest)))
}

fn final_path(dest: &Path, digest: &str) -> PathBuf {
    dest.join("blobs/sha256").join(hex(digest))
}

/// The check that ends a journal line, computed as src/resume.rs does: the first 8 hex
/// digits of the sha256 of the rest of the line.
fn check(body: &str) -> String {
    hex::encode(&sha2::Sha256::digest(body.as_bytes())[..4])
}

/// A journal line with its check.
fn journal_line(body: &str) -> String {
    format!("{body} {}\n", check(body))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("boot id")
        .trim()
        .to_string()
}

/// Ranges, sorted and merged.
fn merged(mut rs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    rs.sort_by_key(|r| (r.start, r.end));
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in rs.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn total(rs: &[Range<u64>]) -> u64 {
    rs.iter().map(|r| r.end - r.start).sum()
}

/// What the journal `text` claims is in the partial file of blob `digest` (`size` bytes),
/// read as src/resume.rs reads it: a header for this blob, then records up to the first
/// line that does not check; `W` records only in the boot that wrote them. `kinds` picks
/// the records ("WD", or "D" for what is durable).
fn claims_in(text: &str, digest: &str, size: u64, kinds: &str) -> Vec<Range<u64>> {
    let mut lines = text.split_inclusive('\n');
    let Some(head) = lines.next().and_then(|l| l.strip_suffix('\n')) else {
        return vec![];
    };
    let Some((body, sum)) = head.rsplit_once(' ') else {
        return vec![];
    };
    let f: Vec<&str> = body.split(' ').collect();
    if check(body) != sum
        || f.len() != 5
        || f[0] != "fastpull-journal"
        || f[1] != "1"
        || f[2] != digest
        || f[3] != size.to_string()
    {
        return vec![];
    }
    let same_boot = f[4] == boot_id();
    let mut out = vec![];
    for l in lines {
        let Some((body, sum)) = l.strip_suffix('\n').and_then(|l| l.rsplit_once(' ')) else {
            break;
        };
        let f: Vec<&str> = body.split(' ').collect();
        let (Ok(a), Ok(b)) = (
            f.get(1).unwrap_or(&"").parse::<u64>(),
            f.get(2).unwrap_or(&"").parse::<u64>(),
        ) else {
            break;
        };
        if check(body) != sum || f.len() != 3 || a >= b || b > size {
            break;
        }
        let believed = match f[0] {
            "D" => true,
            "W" => same_boot,
            _ => break,
        };
        if believed && kinds.contains(f[0]) {
            out.push(a..b);
        }
    }
    merged(out)
}

/// What blob `digest`'s journal in `dest` claims (nothing if it or its partial is missing).
fn claims(dest: &Path, digest: &str, size: u64) -> Vec<Range<u64>> {
    if !partial(dest, digest).exists() {
        return vec![];
    }
    std::fs::read_to_string(journal(dest, digest))
        .map(|t| claims_in(&t, digest, size, "WD"))
        .unwrap_or_default()
}

/// Bytes blob `digest`'s journal in `dest` claims.
fn claimed(dest: &Path, digest: &str, size: u64) -> u64 {
    total(&claims(dest, digest, size))
}

/// The sha256 digest of `bytes`, as `sha256:<hex>`.
fn digest_of(bytes: &[u8]) -> String {
    sha256_digest(bytes)
}

/// Every file under a final name in `dest` holds what its name says: for the blobs of
/// `image` (and its manifest) the bytes are compared with what was pushed, anything else is
/// hashed.
fn assert_final_names_verify(dest: &Path, image: &Image) {
    let known: Vec<(&str, &[u8])> = image
        .blobs()
        .map(|b| (hex(&b.digest), &b.bytes[..]))
        .chain(std::iter::once((
            hex(&image.manifest_digest),
            &image.manifest[..],
        )))
        .collect();
    let Ok(rd) = std::fs::read_dir(dest.join("blobs/sha256")) else {
        return;
    };
    for e in rd {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        // A final name is 64 hex digits; a kill during an atomic write (the config, a
        // manifest) may leave its `.<hex>.<pid>.tmp`, which is no final name.
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let bytes = std::fs::read(e.path()).expect("read blob");
        let ok = match known.iter().find(|(h, _)| *h == name) {
            Some((_, want)) => bytes == *want,
            None => digest_of(&bytes) == format!("sha256:{name}"),
        };
        assert!(
            ok,
            "{} under its final name does not hold what its name says",
            e.path().display()
        );
    }
}

/// `skopeo inspect oci:DEST:TAG` reads the image: it finds the tag, the manifest and the
/// config, and lists the layers pushed. skopeo is required (scripts/deps installs it).
/// `dest` as seen in `fs`'s namespace, if given (skopeo then runs there too).
fn assert_skopeo_reads(dest: &Path, image: &Image, fs: Option<&Tmpfs>) {
    let src = format!("oci:{}:{TAG}", dest.display());
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "inspect", &src]);
    let mut cmd = match fs {
        Some(fs) => fs.inside(&cmd),
        None => cmd,
    };
    let o = cmd.output().unwrap_or_else(|e| {
        panic!("`skopeo` is required by these tests ({e}); scripts/deps installs it")
    });
    assert!(o.status.success(), "skopeo inspect {src}:\n{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("skopeo's JSON");
    assert_eq!(
        v["Digest"].as_str(),
        Some(image.manifest_digest.as_str()),
        "skopeo inspect {src}: {v}"
    );
    let layers: Vec<&str> = v["Layers"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    let want: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, want, "skopeo inspect {src}: {v}");
}

/// A successful pull left the whole image in `dest`: every blob under its final name with
/// the bytes pushed (and nothing under a final name that does not match it), index.json
/// naming the manifest under the tag, no scratch files, and skopeo reads it.
fn assert_complete(dest: &Path, image: &Image, o: &Output) {
    assert_complete_in(dest, image, o, None)
}

/// As [`assert_complete`], for a destination in `fs` (seen as `dest` from here, as the path
/// it has inside from skopeo, which runs there).
fn assert_complete_in(dest: &Path, image: &Image, o: &Output, fs: Option<(&Tmpfs, &Path)>) {
    assert!(o.status.success(), "fastpull failed:\n{}", text(o));
    for b in image.blobs() {
        let p = final_path(dest, &b.digest);
        assert!(p.exists(), "{} missing\n{}", p.display(), text(o));
    }
    assert!(
        final_path(dest, &image.manifest_digest).exists(),
        "manifest missing\n{}",
        text(o)
    );
    assert_final_names_verify(dest, image);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let entries = index["manifests"].as_array().expect("manifests");
    assert!(
        entries.iter().any(
            |m| m["digest"].as_str() == Some(image.manifest_digest.as_str())
                && m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(TAG)
        ),
        "index.json does not name {} as {TAG}: {index}",
        image.manifest_digest
    );
    assert!(
        !scratch(dest).exists(),
        "scratch left after a complete pull: {:?}",
        std::fs::read_dir(scratch(dest)).map(|rd| rd.count())
    );
    // A kill during an atomic write left `.NAME.PID.tmp`: the next pull removes it.
    for dir in [dest.to_path_buf(), dest.join("blobs/sha256")] {
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .expect("read dest")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left in {}: {leftovers:?}",
            dir.display()
        );
    }
    match fs {
        Some((fs, inside)) => assert_skopeo_reads(inside, image, Some(fs)),
        None => assert_skopeo_reads(dest, image, None),
    }
}

/// `bytes` with the bytes in `r` replaced by `fill`.
fn with_range(bytes: &[u8], r: Range<u64>, fill: impl Fn(u64) -> u8) -> Vec<u8> {
    let mut v = bytes.to_vec();
    for i in r {
        v[i as usize] = fill(i);
    }
    v
}

/// How the console names the pieces of a repaired blob that differed when the bytes in `r` did:
/// the REPAIR_PIECE pieces overlapping it, merged, as `first-last`.
fn differing_pieces(r: Range<u64>, size: u64) -> String {
    let a = r.start / REPAIR_PIECE * REPAIR_PIECE;
    let b = (r.end.div_ceil(REPAIR_PIECE) * REPAIR_PIECE).min(size);
    format!("{a}-{}", b - 1)
}

/// The console lines (default flags) saying which pieces two fetches of a blob that failed
/// its digest differed in, as (earlier, later, ranges): `"-"` for ranges when they were the
/// same.
fn differed(o: &Output) -> Vec<(u32, u32, String)> {
    stdout(o)
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(": Fetches ")?.1;
            let (earlier, rest) = rest.split_once(" and ")?;
            let (later, rest) = rest.split_once(' ')?;
            let ranges = match rest.strip_prefix("differed in bytes ") {
                Some(r) => r.split(' ').next()?.to_string(),
                None if rest.starts_with("were the same") => "-".to_string(),
                None => return None,
            };
            Some((earlier.parse().ok()?, later.parse().ok()?, ranges))
        })
        .collect()
}

/// Copies the tree at `from` to `to` (regular files and directories).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let t = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).expect("copy");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bound on a rerun's bytes
// ---------------------------------------------------------------------------------------------

/// What a rerun may fetch of a blob of `size` bytes of which the stopped run had `delivered`
/// (the proxy relayed them at least once: [`Log::delivered`]).
///
/// Ideally the rerun fetches exactly what the stopped run did not write and journal. The
/// proxy cannot see what was written, only what it relayed, and a relayed byte may never
/// have been written: it was still in a socket buffer (the proxy's send buffer, the
/// client's receive buffer) when the process died, or the process died after writing it
/// into the map but before the next `W` record claimed it (they are appended every 50 ms;
/// Ctrl-C claims everything written, `kill -9` cannot). Both are what arrived in the last
/// moment before the stop: with each connection's rate capped and the proxy's send buffer
/// small (64 KiB, paced writes of at most 16 KiB), that is the pull's rate times some tens
/// of milliseconds. 5% of the blob is allowed for it, which is fair as long as the pull
/// takes seconds: 5% of a 4.5 s pull is 225 ms of its average rate (seen natively: at most
/// 52% of the allowance used, at the pull's peak rate, on a loaded machine). Bytes the
/// stopped run relayed twice (a transfer cut by work stealing relays on past its cut) are
/// not counted as delivered: the client drops them. On the rerun's side every byte relayed
/// counts (see [`rerun_proxy`] for why the rerun is capped too).
fn rerun_bound(size: u64, delivered: u64) -> u64 {
    size.saturating_sub(delivered) + size / 20
}

// ---------------------------------------------------------------------------------------------
// kill -9 and Ctrl-C, then a rerun
// ---------------------------------------------------------------------------------------------

/// Where a pull is stopped.
#[derive(Debug, Clone, Copy)]
enum Point {
    /// This share of an unkilled pull's time after the start (any moment is a valid point:
    /// the clock only spreads the points over the pull).
    Time(f64),
    /// When the big blob's journal first claims this share of it.
    Journaled(f64),
    /// When the big blob's partial file appears (preallocated, nothing written).
    PartialAppears,
    /// When the pull stops itself at a phase (`FASTPULL_TEST_STOP`, src/stop_hook.rs): the
    /// big blob written whole, its digest pending (`hash`); verified, about to be flushed
    /// (`fsync`) or renamed (`rename`); `index.json` about to be written (`index`).
    /// These moments are too short to hit by the clock.
    Stop(&'static str),
    /// After the pull exited by itself.
    AfterExit,
}

/// A pull's stop point and the seed it was drawn with.
#[derive(Debug, Clone, Copy)]
struct KillPoint {
    seed: u64,
    point: Point,
    /// How long after the event the signal goes.
    after: Duration,
}

/// The seed of the first point (each point `i` uses `base + i`): `FASTPULL_TEST_SEED`, or a
/// fixed one, so a failure is reproduced by running again.
fn base_seed() -> u64 {
    std::env::var("FASTPULL_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("FASTPULL_TEST_SEED: a number"))
        .unwrap_or(0x1212_2024)
}

/// `kinds` stop points drawn from `base`: each `t` a time point, spread evenly over the pull
/// (one in each of as many strata of `[0, 1)`, at a seeded place in it), each `j` a share
/// of the blob journaled, the other letters the events of [`Point`]: `p` partial file, `x`
/// exited, and the phases a pull stops itself at ([`Point::Stop`]): `h` hash, `s` fsync,
/// `r` rename, `n` index.json. The signal follows an event after a seeded 0–20 ms (`j`,
/// `p`), at once at a stop.
fn kill_points(base: u64, kinds: &str) -> Vec<KillPoint> {
    let times = kinds.matches('t').count() as f64;
    let mut k = 0.0;
    kinds
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let seed = base + i as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            let u: f64 = rng.random();
            let early = rng.random_range(0..20);
            let (point, after) = match c {
                't' => {
                    k += 1.0;
                    (Point::Time((k - 1.0 + u) / times), 0)
                }
                'j' => (Point::Journaled(0.05 + 0.9 * u), early),
                'p' => (Point::PartialAppears, early),
                'h' => (Point::Stop("hash"), 0),
                's' => (Point::Stop("fsync"), 0),
                'r' => (Point::Stop("rename"), 0),
                'n' => (Point::Stop("index"), 0),
                'x' => (Point::AfterExit, 0),
                _ => unreachable!("kind {c}"),
            };
            KillPoint {
                seed,
                point,
                after: Duration::from_millis(after),
            }
        })
        .collect()
}

/// The image of the kill and Ctrl-C tests: a 32 MiB layer (many pieces at the capped rate;
/// 8 MiB under qemu) and a small one.
fn stop_image(seed: u64) -> Image {
    let big = if under_emulation() { 8 * MIB } else { 32 * MIB };
    image_of(seed, &[big as usize + 123, 200 << 10])
}

/// Each connection's rate in the kill and Ctrl-C tests: with default flags the pull fans
/// out to many connections, and takes a few seconds. Under qemu fastpull is many times
/// slower, so the rate is lower, for the lag of its reads and journal to stay as small a
/// share of the blob.
fn per_connection_rate() -> u64 {
    if under_emulation() {
        192 << 10
    } else {
        512 << 10
    }
}

/// A throttled proxy in front of `reg` for one stopped pull.
fn throttled(reg: &Registry) -> CountingProxy {
    let p = CountingProxy::start(&reg.addr());
    p.cap(Which::All, Cap::smooth(per_connection_rate()));
    p
}

/// A proxy in front of `reg` for one rerun: capped too, at eight times the rate, because
/// its bytes are checked against a bound. When fastpull cuts a running transfer to hand its
/// upper part to a free connection (work stealing), the server goes on sending past the
/// cut until fastpull drops the connection, and those bytes count as fetched. Unthrottled
/// on loopback, with a debug build reading slower than the server writes, that is whatever
/// the socket buffers held (seen: 6.6% of a 24 MiB blob); that is the cost of a cut, not
/// of resuming, and chunks.rs bounds it for an uncapped pull. Capped, the buffers stay
/// nearly empty.
fn rerun_proxy(reg: &Registry) -> CountingProxy {
    let p = CountingProxy::start(&reg.addr());
    p.cap(Which::All, Cap::smooth(8 * per_connection_rate()));
    p
}

/// What one stopped pull and its rerun measured.
struct StopResult {
    /// When the signal went (or the pull exited), from its start.
    stopped_at: Duration,
    /// The signal stopped the pull (it had not exited by itself).
    stopped: bool,
    delivered: u64,
    claimed: u64,
    rerun: u64,
    bound: u64,
}

/// Starts a throttled pull of `image` into a fresh DEST, stops it with `sig` at `kp`,
/// checks what it left, reruns it (default flags, through [`rerun_proxy`]) and checks the
/// rerun: the image is complete and readable, and the big blob took at most
/// [`rerun_bound`] bytes.
fn stop_and_rerun(
    reg: &Registry,
    sb: &Sandbox,
    repo: &str,
    image: &Image,
    kp: KillPoint,
    pull_time: Duration,
    sig: rustix::process::Signal,
) -> StopResult {
    let big = &image.layers[0];
    let size = big.size();
    let ctx = format!("seed {} point {:?} +{:?}", kp.seed, kp.point, kp.after);
    let slow = throttled(reg);
    let (_d, out) = dest();
    let mut cmd = pull_cmd(sb, &image_at(slow.addr(), repo), &out, &[]);
    if let Point::Stop(phase) = kp.point {
        // At the big blob (index.json is one file).
        let at = if phase == "index" {
            "index.json"
        } else {
            hex(&big.digest)
        };
        cmd.env("FASTPULL_TEST_STOP", format!("{phase}@{at}"));
    }
    let mut run = Run::start(cmd);
    let err = run.err_so_far.clone();
    let reached = match kp.point {
        Point::Time(f) => {
            let at = run.started + pull_time.mul_f64(f);
            run.until("the time point", || Instant::now() >= at)
        }
        Point::Journaled(f) => run.until("the journal to grow", || {
            claimed(&out, &big.digest, size) as f64 >= f * size as f64
        }),
        Point::PartialAppears => {
            run.until("the partial file", || partial(&out, &big.digest).exists())
        }
        Point::Stop(phase) => {
            run.expect(&stop_marker(phase), || {
                has_line(&err, &stop_marker(phase), "")
            });
            true
        }
        Point::AfterExit => run.until("the exit", || false),
    };
    if reached {
        std::thread::sleep(kp.after);
    }
    let since = run.started.elapsed();
    run.signal(sig);
    let first = run.wait();
    let log1 = slow.settle();
    let delivered = log1.delivered(&big.digest);
    use std::os::unix::process::ExitStatusExt;
    let stopped = first.status.signal() == Some(sig.as_raw())
        || (sig == rustix::process::Signal::INT && first.status.code() == Some(130));
    assert!(
        stopped || first.status.success(),
        "{ctx}: the stopped pull neither stopped nor succeeded:\n{}",
        text(&first)
    );
    // Whatever the point: nothing unverified under a final name. After Ctrl-C the scratch
    // directory holds only resumable pairs; `kill -9` may leave anything there (a partial
    // file created a moment before its journal, a temporary file), which the rerun clears.
    assert_final_names_verify(&out, image);
    let kept = if sig == rustix::process::Signal::INT {
        assert_only_resumable(&out)
    } else {
        image
            .blobs()
            .filter(|b| partial(&out, &b.digest).exists() && journal(&out, &b.digest).exists())
            .map(|b| hex(&b.digest).to_string())
            .collect()
    };
    let claimed_before = claimed(&out, &big.digest, size);
    assert!(
        claimed_before <= delivered,
        "{ctx}: the journal claims {claimed_before} bytes, more than the {delivered} relayed"
    );
    if sig == rustix::process::Signal::INT && stopped {
        let err = stderr(&first);
        assert!(
            err.contains("fastpull: interrupted") && err.contains("resumes them"),
            "{ctx}: {err}"
        );
        if !kept.is_empty() {
            assert!(
                err.contains(&scratch(&out).display().to_string()),
                "{ctx}: the message names where partial downloads are: {err}"
            );
        }
        // Ctrl-C flushes what every unfinished blob wrote and claims it durably (D).
        for h in &kept {
            let b = image
                .blobs()
                .find(|b| hex(&b.digest) == h)
                .expect("a kept partial of the image");
            let text = std::fs::read_to_string(journal(&out, &b.digest)).expect("journal");
            assert_eq!(
                claims_in(&text, &b.digest, b.size(), "D"),
                claims_in(&text, &b.digest, b.size(), "WD"),
                "{ctx}: after Ctrl-C everything written is on disk and claimed by D records:\n{text}"
            );
        }
    }

    let was_final = final_path(&out, &big.digest).exists();
    let fast = rerun_proxy(reg);
    let rerun_started = Instant::now();
    // The rerun reaches the registry through another proxy, so at another address: for a
    // first run that completed, its index.json entry names the image at the first address,
    // and taking the tag over needs --replace.
    let second = sb.pull(&["--replace"], &[], &image_at(fast.addr(), repo), &out);
    let rerun_took = rerun_started.elapsed();
    let log2 = fast.settle();
    assert_complete(&out, image, &second);
    let rerun = log2.relayed_for(&big.digest);
    let bound = rerun_bound(size, delivered);
    println!(
        "{ctx}: stopped at {:.3}s ({}); first run delivered {delivered} of {size}, journal \
         claimed {claimed_before}; rerun fetched {rerun} in {:.3}s (bound {bound}, ideal {})",
        since.as_secs_f64(),
        if stopped { "stopped" } else { "had exited" },
        rerun_took.as_secs_f64(),
        if was_final { 0 } else { size - claimed_before }
    );
    assert!(
        rerun <= bound,
        "{ctx}: the rerun fetched {rerun} bytes of the {size}-byte blob; the stopped run had \
         delivered {delivered} (its journal claimed {claimed_before}), so at most {bound} \
         were due\nrerun:\n{}\n{}\nstopped run:\n{}\n{}",
        text(&second),
        log2.describe(),
        text(&first),
        log1.describe()
    );
    if claimed_before > 0 && kept.contains(&hex(&big.digest).to_string()) {
        assert!(
            stdout(&second).contains(&format!("{}: Resuming", &hex(&big.digest)[..12])),
            "{ctx}: the journal claimed {claimed_before} bytes, yet the rerun did not resume:\n{}",
            text(&second)
        );
    }
    StopResult {
        stopped_at: since,
        stopped,
        delivered,
        claimed: claimed_before,
        rerun,
        bound,
    }
}

/// `kill -9` at 20 seeded points spread over a throttled multi-piece pull (download,
/// hashing, fsync, rename, index.json), then a rerun with default flags: it exits 0, the
/// image verifies and skopeo reads it, and it fetches at most what the killed run had not
/// delivered of the big blob, plus 5% of it (see [`rerun_bound`]). The short phases at the
/// end are reached by the pull stopping itself there ([`Point::Stop`]), so nearly every
/// point is a real kill (checked), not a signal to a pull that had already exited.
#[test]
fn kill_9_anywhere_then_the_rerun_fetches_only_what_is_missing() {
    let reg = Registry::start();
    let image = stop_image(12_001);
    push_image(&reg, "resume/kill", TAG, &image);
    let sb = Sandbox::new();
    // Natively 20 points; under qemu (where a pull takes far longer) 8, each kind once. The
    // first (`x`) lets the pull finish: its time places the time points.
    let kinds = if under_emulation() {
        "xtjphsrn"
    } else {
        "xtttjttpthsrtjtnttjt"
    };
    let base = base_seed();
    println!("kill -9 points from seed {base} (FASTPULL_TEST_SEED={base} reproduces them)");
    let size = image.layers[0].size();
    let mut pull_time = Duration::ZERO;
    let mut worst: Option<(u64, String)> = None;
    let mut killed = 0;
    let points = kill_points(base, kinds);
    for (i, kp) in points.iter().copied().enumerate() {
        println!("point {i}: {kp:?}");
        let r = stop_and_rerun(
            &reg,
            &sb,
            "resume/kill",
            &image,
            kp,
            pull_time,
            rustix::process::Signal::KILL,
        );
        if i == 0 {
            assert!(matches!(kp.point, Point::AfterExit));
            pull_time = r.stopped_at;
        }
        if matches!(kp.point, Point::Stop(_)) {
            assert!(
                r.stopped,
                "point {i}: the pull stopped at {kp:?} was not killed there"
            );
        }
        killed += usize::from(r.stopped);
        // How much of the 5% allowance the rerun used.
        let used = (r.rerun + r.delivered).saturating_sub(size);
        let line = format!(
            "point {i} (seed {}, {:?}): rerun fetched {} bytes, bound {}: {used} bytes over \
             what the killed run had not delivered ({:.0}% of the allowance)",
            kp.seed,
            kp.point,
            r.rerun,
            r.bound,
            used as f64 * 100.0 / (size / 20) as f64
        );
        if worst.as_ref().is_none_or(|(w, _)| used >= *w) {
            worst = Some((used, line));
        }
    }
    if let Some((_, w)) = worst {
        println!("closest to the bound: {w}");
    }
    // Every point but the first (which lets the pull finish) is meant to kill it; a time
    // point late in the pull may come after the exit, but few may.
    let meant = points.len() - 1;
    println!("{killed} of {meant} points were real kills");
    assert!(
        killed * 4 >= meant * 3,
        "only {killed} of {meant} points killed the pull; the others came after it exited"
    );
}

/// Ctrl-C at three seeded points of the download, then a rerun: the first run exits 130
/// saying the partial downloads are kept and how to resume, having flushed and durably
/// claimed what it wrote; the rerun completes within the same bound as after `kill -9`.
#[test]
fn ctrl_c_then_the_rerun_fetches_only_what_is_missing() {
    let reg = Registry::start();
    let image = stop_image(12_101);
    push_image(&reg, "resume/int", TAG, &image);
    let sb = Sandbox::new();
    let base = base_seed() + 1000;
    for (i, kp) in kill_points(base, "jjj").into_iter().enumerate() {
        println!("Ctrl-C point {i}: {kp:?}");
        let r = stop_and_rerun(
            &reg,
            &sb,
            "resume/int",
            &image,
            kp,
            Duration::ZERO,
            rustix::process::Signal::INT,
        );
        assert!(
            r.claimed > 0,
            "stopped once the journal claimed a share of the blob, yet nothing was kept"
        );
    }
}

/// A pull stopped (Ctrl-C) in one destination keeps its partial download; a pull needing
/// the blob into another destination takes it over (src/partials.rs): it resumes, fetches at
/// most what the first had not delivered plus 5%, and the first destination no longer holds
/// the pair. While the first destination is locked (a pull running there), its files are
/// left alone and the other pull fetches the blob in full.
#[test]
fn another_destination_takes_over_a_kept_partial_download() {
    let reg = Registry::start();
    let repo = "resume/elsewhere";
    let image = stop_image(12_301);
    push_image(&reg, repo, TAG, &image);
    let sb = Sandbox::new();
    // The runs share one index of partial downloads, as one user's runs do.
    let state = tempfile::tempdir().expect("state dir");
    let state_env = [("XDG_STATE_HOME", state.path().to_str().expect("utf-8 path"))];
    let big = &image.layers[0];
    let size = big.size();

    let slow = throttled(&reg);
    let (_a_dir, a) = dest();
    let mut cmd = pull_cmd(&sb, &image_at(slow.addr(), repo), &a, &[]);
    cmd.env("XDG_STATE_HOME", state.path());
    let mut run = Run::start(cmd);
    assert!(
        run.until("a third of the blob journaled", || {
            claimed(&a, &big.digest, size) >= size / 3
        }),
        "the first pull ended before a third of the blob was journaled"
    );
    run.signal(rustix::process::Signal::INT);
    let first = run.wait();
    let delivered = slow.settle().delivered(&big.digest);
    assert_exit(&first, 130);
    let claimed_a = claimed(&a, &big.digest, size);
    assert!(claimed_a >= size / 3, "kept {claimed_a} of {size}");
    let pair = |dest: &Path| {
        (
            partial(dest, &big.digest).exists(),
            journal(dest, &big.digest).exists(),
        )
    };
    assert_eq!(pair(&a), (true, true), "the stopped pull keeps its pair");

    // A pull running in A (here: its lock held) keeps its files: B fetches in full.
    {
        let held = std::fs::File::open(&a).expect("open A");
        held.lock().expect("lock A");
        let (_b_dir, b) = dest();
        let fast = rerun_proxy(&reg);
        let o = sb.pull(&[], &state_env, &image_at(fast.addr(), repo), &b);
        let relayed = fast.settle().relayed_for(&big.digest);
        assert_complete(&b, &image, &o);
        assert!(
            !stdout(&o).contains("Resuming"),
            "took over a locked destination's download:\n{}",
            text(&o)
        );
        assert!(relayed >= size, "B fetched {relayed} of {size} bytes");
        assert_eq!(
            pair(&a),
            (true, true),
            "a locked destination's pair was touched"
        );
        assert_eq!(claimed(&a, &big.digest, size), claimed_a);
    }

    // Unlocked: C takes the pair over and fetches only what is missing.
    let (_c_dir, c) = dest();
    let fast = rerun_proxy(&reg);
    let o = sb.pull(&[], &state_env, &image_at(fast.addr(), repo), &c);
    let relayed = fast.settle().relayed_for(&big.digest);
    assert_complete(&c, &image, &o);
    assert!(
        stdout(&o).contains(&format!("{}: Resuming", &hex(&big.digest)[..12])),
        "C did not resume A's partial download:\n{}",
        text(&o)
    );
    let bound = rerun_bound(size, delivered);
    assert!(
        relayed <= bound,
        "C fetched {relayed} bytes of the {size}-byte blob; A had delivered {delivered} \
         (claimed {claimed_a}), so at most {bound} were due\n{}",
        text(&o)
    );
    assert_eq!(pair(&a), (false, false), "the pair moved out of A");
}

/// A pull of `image` into `dest` over one connection, its big blob's response held by a
/// proxy after `hold_after` bytes, stopped by Ctrl-C once those are journaled: it leaves
/// the pair (partial file, journal) of the big blob holding `0..hold_after`.
fn interrupted_at(
    reg: &Registry,
    sb: &Sandbox,
    repo: &str,
    image: &Image,
    dest: &Path,
    hold_after: u64,
) {
    let big = &image.layers[0];
    let held = CountingProxy::start(&reg.addr());
    held.hold(hex(&big.digest), hold_after);
    let mut run = Run::start(pull_cmd(
        sb,
        &image_at(held.addr(), repo),
        dest,
        &["-j", "1", "--stall-timeout", "300"],
    ));
    run.expect("the held bytes journaled", || {
        held.held() == 1 && claimed(dest, &big.digest, big.size()) == hold_after
    });
    run.signal(rustix::process::Signal::INT);
    let o = run.wait();
    held.release();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert_eq!(
        claims(dest, &big.digest, big.size()),
        vec![0..hold_after],
        "the interrupted pull kept its prefix"
    );
}

/// A resumed blob's bytes already there are hashed while the missing ones download, not
/// after: with every response for the rest held at its first byte by the proxy, the
/// in-order hasher still reaches the end of the resumed prefix (said at `-vvv`).
#[test]
fn a_resumed_prefix_is_hashed_while_the_rest_is_still_on_the_wire() {
    let reg = Registry::start();
    let image = image_of(12_051, &[8 * MIB as usize + 3, 3000]);
    let repo = "resume/overlap";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let sb = Sandbox::new();
    let (_d, out) = dest();
    let prefix = 3 * MIB;
    interrupted_at(&reg, &sb, repo, &image, &out, prefix);

    let held = CountingProxy::start(&reg.addr());
    held.hold(hex(&big.digest), 0);
    let mut run = Run::start(pull_cmd(
        &sb,
        &image_at(held.addr(), repo),
        &out,
        &["-vvv", "--stall-timeout", "300"],
    ));
    let line = format!("hashed={prefix} of={}", big.size());
    let err = run.err_so_far.clone();
    run.expect("the resumed prefix hashed while the rest is held", || {
        held.held() >= 1 && has_line(&err, "hashed up to the written prefix", &line)
    });
    assert_eq!(
        held.snapshot().relayed_for(&big.digest),
        0,
        "no byte of the rest had come yet"
    );
    held.release();
    let o = run.wait();
    assert_complete(&out, &image, &o);
    assert!(
        stdout(&o).contains(&format!("{}: Resuming", &hex(&big.digest)[..12])),
        "{}",
        text(&o)
    );
}

/// Whether a line of a process's stderr so far ([`Run::err_so_far`]) holds both `a` and `b`.
fn has_line(err: &Mutex<Vec<u8>>, a: &str, b: &str) -> bool {
    let err = err.lock().expect("stderr buffer");
    String::from_utf8_lossy(&err)
        .lines()
        .any(|l| l.contains(a) && l.contains(b))
}

/// The marker a pull stopped by `FASTPULL_TEST_STOP=PHASE` prints (src/stop_hook.rs;
/// feature `bench-internals`, which the tests are built with).
fn stop_marker(phase: &str) -> String {
    format!("fastpull-test-stop: {phase}")
}

/// A partial file that cannot be resumed (here: of the wrong length) is created again from
/// scratch; its old journal, which checks and claims bytes, is removed before the file is
/// truncated, so a `kill -9` between the new file and its new journal leaves no journal
/// claiming bytes of a zeroed file.
#[test]
fn a_partial_started_over_never_sits_under_its_old_journal() {
    let reg = Registry::start();
    let image = image_of(12_061, &[6 * MIB as usize + 3, 3000]);
    let repo = "resume/fresh";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let sb = Sandbox::new();
    let (_d, out) = dest();
    interrupted_at(&reg, &sb, repo, &image, &out, 2 * MIB);
    // The partial file loses its last byte: the journal still checks, the file does not fit.
    let p = partial(&out, &big.digest);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len(big.size() - 1))
        .expect("shorten the partial file");

    let mut cmd = pull_cmd(&sb, &image_at(&reg.addr(), repo), &out, &["-j", "1"]);
    cmd.env("FASTPULL_TEST_STOP", format!("fresh@{}", hex(&big.digest)));
    let mut run = Run::start(cmd);
    let err = run.err_so_far.clone();
    run.expect(
        "the stop between the new partial file and its journal",
        || has_line(&err, &stop_marker("fresh"), ""),
    );
    run.signal(rustix::process::Signal::KILL);
    let o = run.wait();
    assert_eq!(
        std::fs::metadata(&p).map(|m| m.len()).ok(),
        Some(big.size()),
        "the partial file was created again\n{}",
        text(&o)
    );
    assert!(
        !journal(&out, &big.digest).exists(),
        "killed between the new partial file and its journal, the old journal is still there: {:?}",
        claims(&out, &big.digest, big.size())
    );
    let o = sb.pull(&[], &[], &image_at(&reg.addr(), repo), &out);
    assert_complete(&out, &image, &o);
    assert!(
        !stdout(&o).contains("Resuming") && !stdout(&o).contains("did not verify"),
        "{}",
        text(&o)
    );
}

/// `journal`'s text as if written in another boot: its header's boot id replaced (and the
/// header's check made again), so that only its `D` records are believed, as after a power
/// cut (src/resume.rs).
fn as_after_reboot(text: &str) -> String {
    let (head, rest) = text.split_once('\n').expect("a journal header");
    let (body, _check) = head.rsplit_once(' ').expect("a header check");
    let (before, boot) = body.rsplit_once(' ').expect("a boot id");
    assert_eq!(boot, boot_id(), "the header names this boot");
    let other = "00000000-0000-4000-8000-000000000000";
    format!("{}{rest}", journal_line(&format!("{before} {other}")))
}

/// A blob of a few MiB on a slow link gets durable checkpoints (`D` records: data flushed,
/// then the journal) every 5 s like a big one, so a power cut costs it at most those 5 s:
/// `kill -9` once one is there, make the journal look written in another boot (only `D`
/// records count then), and the rerun resumes the `D` bytes and fetches only the rest.
#[test]
fn a_small_slow_blob_survives_a_power_cut_with_its_durable_bytes() {
    let reg = Registry::start();
    let image = image_of(12_071, &[4 * MIB as usize + 7, 3000]);
    let repo = "resume/powercut";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let size = big.size();
    let sb = Sandbox::new();
    let (_d, out) = dest();
    let slow = CountingProxy::start(&reg.addr());
    // 16 s for the blob over one connection: a checkpoint comes after 5 s.
    slow.cap(Which::All, Cap::smooth(256 << 10));
    let mut run = Run::start(pull_cmd(
        &sb,
        &image_at(slow.addr(), repo),
        &out,
        &["-j", "1"],
    ));
    let durable = || {
        std::fs::read_to_string(journal(&out, &big.digest))
            .map(|t| total(&claims_in(&t, &big.digest, size, "D")))
            .unwrap_or(0)
    };
    run.expect("a D record for the slow blob", || durable() > 0);
    run.signal(rustix::process::Signal::KILL);
    let o = run.wait();
    slow.settle();
    assert!(
        !o.status.success(),
        "the pull finished before it was killed\n{}",
        text(&o)
    );
    let text0 = std::fs::read_to_string(journal(&out, &big.digest)).expect("journal");
    let rebooted = as_after_reboot(&text0);
    std::fs::write(journal(&out, &big.digest), &rebooted).expect("write journal");
    let kept = claims_in(&rebooted, &big.digest, size, "WD");
    assert_eq!(
        kept,
        claims_in(&text0, &big.digest, size, "D"),
        "only D records count now"
    );
    let kept = total(&kept);
    assert!(kept > 0 && kept < size, "{text0}");

    let fast = rerun_proxy(&reg);
    let o = sb.pull(&[], &[], &image_at(fast.addr(), repo), &out);
    let log = fast.settle();
    assert_complete(&out, &image, &o);
    assert!(
        stdout(&o).contains(&format!("{}: Resuming", &hex(&big.digest)[..12])),
        "{}",
        text(&o)
    );
    let fetched = log.relayed_for(&big.digest);
    assert!(
        fetched <= rerun_bound(size, kept),
        "with {kept} durable bytes of {size}, the rerun fetched {fetched}\n{}",
        log.describe()
    );
}

/// `--no-resume` keeps nothing and uses nothing: Ctrl-C leaves no scratch directory (its
/// partial download removed, no journal); and a pair an earlier pull kept is ignored and
/// removed by a pull with `--no-resume`, which fetches the whole blob.
#[test]
fn no_resume_keeps_nothing_and_ignores_what_was_kept() {
    let reg = Registry::start();
    let image = image_of(12_081, &[6 * MIB as usize + 3, 3000]);
    let repo = "resume/no-resume";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let sb = Sandbox::new();

    // Ctrl-C with --no-resume, once the held response's bytes are in the partial file.
    let (_d, out) = dest();
    let held = CountingProxy::start(&reg.addr());
    held.hold(hex(&big.digest), MIB);
    let mut run = Run::start(pull_cmd(
        &sb,
        &image_at(held.addr(), repo),
        &out,
        &["--no-resume", "-j", "1", "--stall-timeout", "300"],
    ));
    run.expect("the response held with the partial file there", || {
        held.held() == 1 && partial(&out, &big.digest).exists()
    });
    assert!(
        !journal(&out, &big.digest).exists(),
        "a journal without resume"
    );
    run.signal(rustix::process::Signal::INT);
    let o = run.wait();
    held.release();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(
        !scratch(&out).exists(),
        "--no-resume stopped by Ctrl-C left {:?}",
        std::fs::read_dir(scratch(&out)).map(|rd| rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect::<Vec<_>>())
    );

    // A pair kept by a pull with resume; the next pull with --no-resume fetches it all.
    let (_d, out) = dest();
    interrupted_at(&reg, &sb, repo, &image, &out, 2 * MIB);
    let counting = CountingProxy::start(&reg.addr());
    let o = sb.pull(
        &["--no-resume"],
        &[],
        &image_at(counting.addr(), repo),
        &out,
    );
    let log = counting.settle();
    assert_complete(&out, &image, &o);
    assert!(!stdout(&o).contains("Resuming"), "{}", text(&o));
    assert!(
        log.relayed_for(&big.digest) >= big.size(),
        "--no-resume fetched only {} of the {} bytes\n{}",
        log.relayed_for(&big.digest),
        big.size(),
        log.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Self-repair
// ---------------------------------------------------------------------------------------------

/// A registry with a 6 MiB layer (several pieces) and a small one, and a fault proxy in
/// front of it that flips byte `at` of the first response for the big layer's range from 0,
/// `times` times.
fn corrupting(repo: &str, seed: u64, at: u64, times: usize) -> (Registry, FaultProxy, Image) {
    let reg = Registry::start();
    let image = image_of(seed, &[6 * MIB as usize + 5, 3000]);
    push_image(&reg, repo, TAG, &image);
    let proxy = FaultProxy::start(&reg.addr());
    proxy.add(
        Rule::new(
            &format!("/blobs/{}", image.layers[0].digest),
            Fault::Corrupt { at: at as usize },
        )
        .range_start(0)
        .times(times),
    );
    (reg, proxy, image)
}

/// Within the first MiB: no cut ever takes it from the first request (a cut leaves the
/// running transfer at least the minimum piece), so the flipped byte is always written.
const FLIP_AT: u64 = 777_777;

/// A hop that corrupts one range once: the blob fails its digest, is fetched again (one
/// repair, said on the console) and the pull succeeds; the console names the piece that
/// differed between the bad fetch and the good one.
#[test]
fn a_blob_corrupted_once_is_fetched_again_and_the_pull_succeeds() {
    let (_reg, proxy, image) = corrupting("resume/corrupt1", 12_201, FLIP_AT, 1);
    let big = &image.layers[0];
    let bad = digest_of(&with_range(&big.bytes, FLIP_AT..FLIP_AT + 1, |i| {
        big.bytes[i as usize] ^ 0x5a
    }));
    let sb = Sandbox::new();
    let (_d, out) = dest();
    let o = sb.pull(&[], &[], &image_at(proxy.addr(), "resume/corrupt1"), &out);
    assert_complete(&out, &image, &o);
    let faulted = proxy
        .blob_requests(&big.digest)
        .iter()
        .filter(|s| s.fault.is_some())
        .count();
    assert_eq!(faulted, 1, "the proxy corrupted one response");
    let console = stdout(&o);
    let line = format!(
        "{}: Digest mismatch (got {bad}); fetching it again (repair 1)",
        &hex(&big.digest)[..12]
    );
    assert_eq!(
        console.matches("Digest mismatch").count(),
        1,
        "exactly one repair:\n{}",
        text(&o)
    );
    assert!(console.contains(&line), "{line:?} missing:\n{}", text(&o));
    let ranges = differing_pieces(FLIP_AT..FLIP_AT + 1, big.size());
    assert_eq!(
        differed(&o),
        vec![(1, 2, ranges)],
        "the console names the piece holding byte {FLIP_AT}\n{}",
        text(&o)
    );
}

/// A hop that corrupts the blob every time (the first time elsewhere): after its repairs
/// the pull fails (exit 4) naming both digests, with nothing under the blob's final name
/// and no partial kept; the console says which pieces each failed fetch differed in from
/// the next (fetches 1 and 2: the piece holding both flipped bytes; 2 and 3: none, the same
/// bytes came twice), and so does the error, for the last two.
#[test]
fn a_blob_corrupted_every_time_fails_with_both_digests_and_leaves_nothing() {
    let (_reg, proxy, image) = corrupting("resume/corrupt-all", 12_301, FLIP_AT, usize::MAX);
    let big = &image.layers[0];
    // The first fetch is corrupted at another byte (the rule added first is used first).
    let first_flip = 100_000;
    let proxy = {
        let p = FaultProxy::start(&_reg.addr());
        p.add(
            Rule::new(
                &format!("/blobs/{}", big.digest),
                Fault::Corrupt { at: first_flip },
            )
            .range_start(0)
            .times(1),
        );
        p.add(
            Rule::new(
                &format!("/blobs/{}", big.digest),
                Fault::Corrupt {
                    at: FLIP_AT as usize,
                },
            )
            .range_start(0),
        );
        drop(proxy);
        p
    };
    let bad = digest_of(&with_range(&big.bytes, FLIP_AT..FLIP_AT + 1, |i| {
        big.bytes[i as usize] ^ 0x5a
    }));
    let sb = Sandbox::new();
    let (_d, out) = dest();
    let o = sb.pull(
        &[],
        &[],
        &image_at(proxy.addr(), "resume/corrupt-all"),
        &out,
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("digest mismatch") && err.contains(&big.digest) && err.contains(&bad),
        "the error names the expected ({}) and the received ({bad}) digest:\n{err}",
        big.digest
    );
    // The default: two repairs, each said once, then the failure.
    let console = stdout(&o);
    assert_eq!(
        console.matches("Digest mismatch").count(),
        2,
        "{}",
        text(&o)
    );
    assert!(console.contains("(repair 2)"), "{}", text(&o));
    let piece = differing_pieces(first_flip as u64..FLIP_AT + 1, big.size());
    assert_eq!(
        differed(&o),
        vec![(1, 2, piece), (2, 3, "-".to_string())],
        "{}",
        text(&o)
    );
    assert!(
        err.contains("fetched 3 times; fetches 2 and 3 were the same, byte for byte"),
        "the error says the last two fetches were the same:\n{err}"
    );
    assert!(
        !final_path(&out, &big.digest).exists(),
        "a blob that never matched is under its final name"
    );
    assert!(!out.join("index.json").exists());
    assert_final_names_verify(&out, &image);
    let left: Vec<String> = std::fs::read_dir(scratch(&out))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(hex(&big.digest)))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "kept for a blob that never matched: {left:?}"
    );
    assert_only_resumable(&out);
}

// ---------------------------------------------------------------------------------------------
// Journals and partial files that lie
// ---------------------------------------------------------------------------------------------

/// A journal that claims bytes never written, a torn journal, a journal line that does not
/// check, and a partial file changed behind its journal's back, each made from the state a
/// real pull left when interrupted:
/// every pull ends with the right digest, and nothing wrong is ever put under a final name.
/// A resumed blob that fails its digest is fetched again from scratch without using a
/// repair (the journal lied, not the registry), so it succeeds with `--repair-attempts 0`
/// too, and the console names the pieces the lie covered.
#[test]
fn lying_journals_and_partials_never_put_a_wrong_blob_in_place() {
    let reg = Registry::start();
    let image = image_of(12_401, &[8 * MIB as usize + 3, 3000]);
    let repo = "resume/lies";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let size = big.size();
    let sb = Sandbox::new();
    let work = tempfile::tempdir().expect("temp dir");

    // The starting state: a pull whose big-blob responses are held after 1 MiB each (the
    // first, and those of the pieces cut from it for idle connections), interrupted once
    // two of them are held and what they brought is journaled.
    let held = CountingProxy::start(&reg.addr());
    held.hold(hex(&big.digest), MIB);
    let start = work.path().join("start");
    let mut run = Run::start(pull_cmd(
        &sb,
        &image_at(held.addr(), repo),
        &start,
        &["--stall-timeout", "300"],
    ));
    run.expect("two held responses journaled", || {
        held.held() >= 2 && claimed(&start, &big.digest, size) >= 2 * MIB
    });
    run.signal(rustix::process::Signal::INT);
    let o = run.wait();
    held.release();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(assert_only_resumable(&start).contains(&hex(&big.digest).to_string()));
    let text0 = std::fs::read_to_string(journal(&start, &big.digest)).expect("journal");
    let written = claims_in(&text0, &big.digest, size, "WD");
    let gaps: Vec<Range<u64>> = {
        let mut g = vec![];
        let mut at = 0;
        for r in &written {
            if r.start > at {
                g.push(at..r.start);
            }
            at = r.end;
        }
        if at < size {
            g.push(at..size);
        }
        g
    };
    println!("interrupted with {written:?} journaled; gaps {gaps:?}; journal:\n{text0}");
    assert!(!gaps.is_empty(), "the held pull wrote everything?");
    let pull_into = |dest: &Path, args: &[&str]| -> (Output, Log) {
        let p = rerun_proxy(&reg);
        let o = sb.pull(args, &[], &image_at(p.addr(), repo), dest);
        (o, p.settle())
    };
    let short = &hex(&big.digest)[..12];

    // 1. The journal claims a range the file never got (garbage there), with valid checks.
    let lie = {
        let g = &gaps[gaps.len() / 2];
        let len = (g.end - g.start).min(300 << 10);
        let a = g.start + (g.end - g.start - len) / 2;
        a..a + len
    };
    let garbage = |i: u64| (i.wrapping_mul(0x9E37_79B9) >> 7) as u8 | 1;
    let claim_garbage = |dest: &Path| {
        copy_tree(&start, dest);
        let p = partial(dest, &big.digest);
        let mut bytes = std::fs::read(&p).expect("partial");
        for i in lie.clone() {
            bytes[i as usize] = garbage(i);
        }
        std::fs::write(&p, &bytes).expect("write partial");
        let mut j = std::fs::read_to_string(journal(dest, &big.digest)).expect("journal");
        j.push_str(&journal_line(&format!("D {} {}", lie.start, lie.end)));
        std::fs::write(journal(dest, &big.digest), j).expect("write journal");
        assert!(
            claimed(dest, &big.digest, size) >= total(&written) + lie.end - lie.start,
            "the edited journal claims the garbage"
        );
    };
    let lied_digest = digest_of(&with_range(&big.bytes, lie.clone(), garbage));
    // 1a. Without repairs, and 1b. with the default: resumed, caught, fetched again from
    // scratch (no repair used), in place.
    for (name, args) in [
        ("lie-no-repair", &["--repair-attempts", "0"][..]),
        ("lie", &[][..]),
    ] {
        let d = work.path().join(name);
        claim_garbage(&d);
        let (o, log) = pull_into(&d, args);
        assert_complete(&d, &image, &o);
        let console = stdout(&o);
        assert!(
            console.contains(&format!("{short}: Resuming"))
                && console.contains(&format!(
                    "{short}: Resumed bytes did not verify (got {lied_digest}); fetching it again from scratch"
                ))
                && !console.contains("Digest mismatch"),
            "{name}: {}",
            text(&o)
        );
        assert!(
            log.relayed_for(&big.digest) >= size,
            "{name}: the blob was fetched whole again\n{}",
            log.describe()
        );
        assert_eq!(
            differed(&o),
            vec![(1, 2, differing_pieces(lie.clone(), size))],
            "{name}: the console names the pieces the lie {lie:?} covered"
        );
    }

    // 2 and 3. A journal edited so that its records up to some line are believed and
    // nothing after: the rerun resumes what they claim, fetches exactly the rest (at least
    // every byte not claimed; at most 5% more), and never has to repair.
    // Where to edit: after a line up to which the records claim some of what was
    // written, not all.
    let lines: Vec<&str> = text0.split_inclusive('\n').collect();
    let cuts: Vec<usize> = (2..lines.len())
        .filter(|&k| {
            let c = total(&claims_in(&lines[..k].concat(), &big.digest, size, "WD"));
            c > 0 && c < total(&written)
        })
        .collect();
    assert!(!cuts.is_empty(), "no record claims only part: {text0}");
    let keep = cuts[cuts.len() / 2];
    let resume_from = |name: &str, edited: &str| {
        let d = work.path().join(name);
        copy_tree(&start, &d);
        std::fs::write(journal(&d, &big.digest), edited).expect("write journal");
        let believed = total(&claims_in(edited, &big.digest, size, "WD"));
        assert!(
            believed > 0 && believed < total(&written),
            "{name}: the whole lines before the edit claim some, not all: {edited}"
        );
        let (o, log) = pull_into(&d, &[]);
        assert_complete(&d, &image, &o);
        let console = stdout(&o);
        assert!(
            console.contains(&format!("{short}: Resuming")) && !console.contains("Digest mismatch"),
            "{name}: {}",
            text(&o)
        );
        let fetched = log.relayed_for(&big.digest);
        assert!(
            fetched >= size - believed && fetched <= rerun_bound(size, believed),
            "{name}: with {believed} bytes believed, {fetched} bytes of {size} were fetched \
             (due: {} plus at most 5%)\n{edited}\n{}",
            size - believed,
            log.describe()
        );
    };
    // 2. Torn: cut in the middle of a line (and nothing after it).
    let mut torn: String = lines[..keep].concat();
    torn.push_str(&lines[keep][..lines[keep].len() / 2]);
    resume_from("torn", &torn);
    // 3. A line that does not check, claiming a range never written, with the rest of the
    // journal after it: neither it nor what follows it is believed.
    let bad = {
        let g = &gaps[0];
        let body = format!("W {} {}", g.start, g.end);
        let wrong = check(&format!("W {} {}", g.start, g.end - 1));
        format!("{body} {wrong}\n")
    };
    let edited = format!("{}{bad}{}", lines[..keep].concat(), lines[keep..].concat());
    resume_from("bad-check", &edited);

    // 4. A partial file changed behind its journal's back, inside a journaled range.
    let d = work.path().join("flipped");
    copy_tree(&start, &d);
    let at = written[0].start + (written[0].end - written[0].start) / 2;
    let p = partial(&d, &big.digest);
    let mut bytes = std::fs::read(&p).expect("partial");
    bytes[at as usize] ^= 0xff;
    std::fs::write(&p, &bytes).expect("write partial");
    let flipped = digest_of(&with_range(&big.bytes, at..at + 1, |i| {
        big.bytes[i as usize] ^ 0xff
    }));
    let (o, _) = pull_into(&d, &[]);
    assert_complete(&d, &image, &o);
    let console = stdout(&o);
    assert!(
        console.contains(&format!("{short}: Resuming"))
            && console.contains(&format!(
                "{short}: Resumed bytes did not verify (got {flipped}); fetching it again from scratch"
            ))
            && !console.contains("Digest mismatch"),
        "{}",
        text(&o)
    );
    assert_eq!(
        differed(&o),
        vec![(1, 2, differing_pieces(at..at + 1, size))],
        "the console names the piece holding byte {at}"
    );
}

// ---------------------------------------------------------------------------------------------
// Two pulls into one destination
// ---------------------------------------------------------------------------------------------

/// A second pull into a destination another one is writing is refused (exit 5, "in use by
/// another fastpull process") without touching the first one's partial download or
/// journal, and the first completes with a verified image.
#[test]
fn a_second_pull_into_the_same_destination_is_refused_and_the_first_completes() {
    let reg = Registry::start();
    let image = image_of(12_501, &[8 * MIB as usize + 3, 3000]);
    let repo = "resume/twice";
    push_image(&reg, repo, TAG, &image);
    let big = &image.layers[0];
    let sb = Sandbox::new();
    let held = CountingProxy::start(&reg.addr());
    held.hold(hex(&big.digest), MIB);
    let (_d, out) = dest();
    // One connection: while its response is held nothing else moves, so the partial file
    // and journal stay exactly as they are until the hold is released.
    let mut first = Run::start(pull_cmd(
        &sb,
        &image_at(held.addr(), repo),
        &out,
        &["-j", "1", "--stall-timeout", "300"],
    ));
    first.expect("the first pull's held bytes journaled", || {
        held.held() == 1 && claimed(&out, &big.digest, big.size()) == MIB
    });
    let before = (
        std::fs::read(partial(&out, &big.digest)).expect("partial"),
        std::fs::read(journal(&out, &big.digest)).expect("journal"),
    );
    let second = sb.pull(&[], &[], &image_at(&reg.addr(), repo), &out);
    assert_eq!(second.status.code(), Some(5), "{}", text(&second));
    assert!(
        stderr(&second).contains("in use by another fastpull process"),
        "{}",
        text(&second)
    );
    let after = (
        std::fs::read(partial(&out, &big.digest)).expect("partial after the second pull"),
        std::fs::read(journal(&out, &big.digest)).expect("journal after the second pull"),
    );
    assert!(
        before.0 == after.0,
        "the refused pull changed the first one's partial file"
    );
    assert_eq!(
        String::from_utf8_lossy(&before.1),
        String::from_utf8_lossy(&after.1),
        "the refused pull changed the first one's journal"
    );
    held.release();
    let o = first.wait();
    assert_complete(&out, &image, &o);
    assert!(!stdout(&o).contains("Digest mismatch"), "{}", text(&o));
}

// ---------------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------------

/// A tmpfs of a given size, mounted in a mount namespace of its own (a user namespace too
/// when not root), so that nothing is mounted on the host and it goes away with its holder
/// process. fastpull runs inside with `nsenter`; the test reads the files through
/// `/proc/<holder>/root`.
struct Tmpfs {
    holder: Child,
    userns: bool,
    /// The mount point (as seen inside; an empty directory outside).
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_kib: u64) -> Tmpfs {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("fs");
        std::fs::create_dir(&dir).expect("mkdir");
        let script = "mount -t tmpfs -o size=\"$1\"k tmpfs \"$2\" && echo mounted && exec cat";
        let mut tries = vec![];
        // A mount namespace needs root (CI); else a user namespace mapping us to root.
        for userns in [false, true] {
            let mut cmd = Command::new("unshare");
            if userns {
                cmd.args(["--user", "--map-root-user"]);
            }
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(size_kib.to_string())
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            let mut holder = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tries.push(format!("{cmd:?}: {e}"));
                    continue;
                }
            };
            let mut line = String::new();
            let mut so = std::io::BufReader::new(holder.stdout.take().expect("stdout"));
            let _ = std::io::BufRead::read_line(&mut so, &mut line);
            if line.trim() == "mounted" {
                return Tmpfs {
                    holder,
                    userns,
                    dir,
                    _tmp: tmp,
                };
            }
            let _ = holder.kill();
            let o = holder.wait_with_output().expect("wait");
            tries.push(format!("{cmd:?}: {}", text(&o)));
        }
        panic!(
            "cannot mount a tmpfs for the disk-full test (as root: a private mount namespace; \
             otherwise: a user namespace with --map-root-user):\n{}",
            tries.join("\n")
        );
    }

    /// `path` (inside the mount) as this process reaches it.
    fn outside(&self, rel: &str) -> PathBuf {
        let inner = self.dir.join(rel);
        Path::new(&format!("/proc/{}/root", self.holder.id()))
            .join(inner.strip_prefix("/").expect("absolute temp dir"))
    }

    /// `cmd`, run inside the namespace (same program, arguments and environment).
    fn inside(&self, cmd: &Command) -> Command {
        let mut n = Command::new("nsenter");
        n.arg("--target")
            .arg(self.holder.id().to_string())
            .arg("--mount");
        if self.userns {
            n.args(["--user", "--preserve-credentials"]);
        }
        n.arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .stdin(Stdio::null());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => n.env(k, v),
                None => n.env_remove(k),
            };
        }
        n
    }

    fn resize(&self, size_kib: u64) {
        let mut m = Command::new("mount");
        // With the source named: without it, mount(8) run by a non-root user in a user
        // namespace fails ("mount point not mounted or bad option").
        m.arg("-o")
            .arg(format!("remount,size={size_kib}k"))
            .arg("tmpfs")
            .arg(&self.dir);
        let o = self.inside(&m).output().expect("nsenter mount");
        assert!(o.status.success(), "remount: {}", text(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A disk that fills up mid-pull: the blob that does not fit is set aside, the blobs already
/// under way are finished, verified and kept, and the pull then fails with exit 5 saying
/// where and how much more was needed; with space freed the rerun completes and fetches only
/// what is missing (plus 5%), and nothing of the verified blobs.
#[test]
fn a_full_disk_stops_the_pull_keeping_its_work_and_the_rerun_completes() {
    // Largest first, two connections: A and B start; when B is done C starts; when A or C
    // ends a piece, D starts and does not fit. A and C are held by the proxy (after 1 MiB,
    // 256 KiB) until B is verified, so the disk fills with B in place and A, C half there.
    let sizes = [
        24 * MIB as usize + 11,
        3 * MIB as usize + 7,
        2 * MIB as usize + 5,
        (3 * MIB / 2) as usize + 3,
    ];
    let image = image_of(12_601, &sizes);
    let [a, b, c, d] = [
        &image.layers[0],
        &image.layers[1],
        &image.layers[2],
        &image.layers[3],
    ];
    let reg = Registry::start();
    let repo = "resume/full";
    push_image(&reg, repo, TAG, &image);
    // Room for A, B and C (29 MiB and a few pages of journals), not for D as well.
    let fs = Tmpfs::mount(30 * 1024);
    let out_inside = fs.dir.join("out");
    let out = fs.outside("out");
    let sb = Sandbox::new();

    let proxy = CountingProxy::start(&reg.addr());
    for blob in [a, c] {
        // Capped too, so that few bytes are in flight when the pull stops.
        proxy.cap(
            Which::PathContains(hex(&blob.digest).to_string()),
            Cap::smooth(MIB),
        );
    }
    proxy.hold(hex(&a.digest), MIB);
    proxy.hold(hex(&c.digest), 256 << 10);
    let mut run = Run::start(fs.inside(&pull_cmd(
        &sb,
        &image_at(proxy.addr(), repo),
        &out_inside,
        &["-j", "2", "--stall-timeout", "300"],
    )));
    run.expect("B verified while A and C are held", || {
        final_path(&out, &b.digest).exists()
            && proxy.held() == 2
            && claimed(&out, &a.digest, a.size()) >= MIB
            && claimed(&out, &c.digest, c.size()) >= 256 << 10
    });
    proxy.release();
    let o = run.wait();
    let log1 = proxy.settle();
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}\n{}",
        text(&o),
        log1.describe()
    );
    let err = stderr(&o);
    assert!(
        err.contains(&format!("no space left in {}:", out_inside.display()))
            && err.contains("more needed")
            && err.contains(&format!("({} bytes)", d.size())),
        "the error names the destination and what D needed ({} bytes):\n{err}",
        d.size()
    );
    // B verified; A and C, already under way, finished and verified too; D never started
    // (nothing of it kept); no image yet.
    for x in [a, b, c] {
        assert!(
            final_path(&out, &x.digest).exists(),
            "{} was not finished and kept",
            x.digest
        );
    }
    assert!(!final_path(&out, &d.digest).exists());
    assert_final_names_verify(&out, &image);
    assert_eq!(
        assert_only_resumable(&out),
        Vec::<String>::new(),
        "nothing but resumable pairs, and no blob is half there"
    );
    assert!(!out.join("index.json").exists());
    let delivered: Vec<u64> = image.blobs().map(|x| log1.delivered(&x.digest)).collect();

    // Free space, and pull again.
    fs.resize(64 * 1024);
    let fast = rerun_proxy(&reg);
    let rerun = fs.inside(&pull_cmd(
        &sb,
        &image_at(fast.addr(), repo),
        &out_inside,
        &[],
    ));
    let o = crate::support::cli::run(rerun, None);
    let log2 = fast.settle();
    assert_complete_in(&out, &image, &o, Some((&fs, &out_inside)));
    assert!(
        log2.body_gets(&b.digest).is_empty(),
        "the verified blob was fetched again:\n{}",
        log2.describe()
    );
    // Each blob the full-disk run had started (A, C) within the bound of a stopped pull;
    // all of them together within what was missing plus 5%.
    let mut missing = 0;
    let mut fetched_all = 0;
    for (x, got) in image.blobs().zip(delivered) {
        let fetched = log2.relayed_for(&x.digest);
        missing += x.size().saturating_sub(got);
        fetched_all += fetched;
        assert!(
            got == 0 || fetched <= rerun_bound(x.size(), got),
            "{}: the rerun fetched {fetched} of {} bytes; the full-disk run had delivered \
             {got}\n{}",
            x.digest,
            x.size(),
            log2.describe()
        );
    }
    let all: u64 = image.blobs().map(|x| x.size()).sum();
    println!("disk full: rerun fetched {fetched_all} bytes; missing were {missing} of {all}");
    assert!(
        fetched_all <= missing + all / 20,
        "the rerun fetched {fetched_all} bytes; {missing} of {all} were missing\n{}",
        log2.describe()
    );
}

/// A disk that is full when `index.json` is written (every blob already in place): the pull
/// fails with exit 5 and the disk-full message naming the destination and the bytes
/// needed, not a bare I/O error; with space freed, the same command completes.
#[test]
fn a_full_disk_at_index_json_names_the_destination() {
    let image = image_of(12_651, &[MIB as usize + 3, 3000]);
    let reg = Registry::start();
    let repo = "resume/full-index";
    push_image(&reg, repo, TAG, &image);
    let fs = Tmpfs::mount(8 * 1024);
    let out_inside = fs.dir.join("out");
    let out = fs.outside("out");
    let sb = Sandbox::new();
    let pull = || {
        crate::support::cli::run(
            fs.inside(&pull_cmd(
                &sb,
                &image_at(&reg.addr(), repo),
                &out_inside,
                &[],
            )),
            None,
        )
    };
    let o = pull();
    assert_complete_in(&out, &image, &o, Some((&fs, &out_inside)));
    std::fs::remove_file(out.join("index.json")).expect("remove index.json");
    // Fill the filesystem to its last page.
    let fill = fs.dir.join("fill");
    let mut cat = Command::new("sh");
    cat.args(["-c", "cat /dev/zero > \"$1\"; true", "sh"])
        .arg(&fill);
    let f = fs.inside(&cat).output().expect("fill the tmpfs");
    assert!(f.status.success(), "{}", text(&f));
    let o = pull();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("no space left in {}:", out_inside.display()))
            && err.contains("more needed"),
        "the error names the destination and what was needed:\n{err}"
    );
    assert!(!out.join("index.json").exists());
    std::fs::remove_file(fs.outside("fill")).expect("free space");
    let o = pull();
    assert_complete_in(&out, &image, &o, Some((&fs, &out_inside)));
}

//! What users and programs read: `--json` lines (their schema is a promise), `--digestfile`,
//! progress lines without a terminal, and the live display in a real terminal (tmux, 40 rows
//! by 60 columns, 48 layers).

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::counting::{Cap, CountingProxy, Which};
use crate::support::runner::{fastpull_command, FASTPULL_BIN, RUNNER_ENV};
use crate::support::*;

fn many_layers(seed: u64, n: usize, bytes: usize) -> Image {
    let mut b = ImageBuilder::new(Flavor::Oci);
    for i in 0..n {
        b = b.layer(random_layer(seed * 1000 + i as u64, 1, bytes));
    }
    b.build()
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(k: &[&str]) -> BTreeSet<String> {
    k.iter().map(|s| s.to_string()).collect()
}

/// The `--json` schema (README, "Machine-readable output"): every line one object with
/// `event` and `schema: 1`, the documented fields exactly, in an order a consumer can rely
/// on; `--digestfile` holds the stored manifest's digest.
#[test]
fn json_output_follows_the_documented_schema() {
    let reg = Registry::start();
    let image = many_layers(1, 3, 300_000);
    push_image(&reg, "json/img", "v1", &image);
    let (_d, out) = dest();
    let digestfile = out.with_extension("digest");
    let o = fastpull_command()
        .arg("--json")
        .arg("--digestfile")
        .arg(&digestfile)
        .arg(format!("{}/json/img:v1", reg.addr()))
        .arg(&out)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    let lines = json_lines(&o);
    let want: &[(&str, &[&str])] = &[
        ("start", &["event", "schema", "reference"]),
        (
            "resolved",
            &["event", "schema", "digest", "manifest_digest", "platform"],
        ),
        (
            "blob_started",
            &["event", "schema", "digest", "size", "kind"],
        ),
        (
            "blob_skipped",
            &["event", "schema", "digest", "size", "kind"],
        ),
        (
            "blob_progress",
            &["event", "schema", "digest", "downloaded", "size"],
        ),
        ("blob_done", &["event", "schema", "digest"]),
        (
            "layer_applied",
            &[
                "event",
                "schema",
                "index",
                "digest",
                "uncompressed",
                "entries",
            ],
        ),
        (
            "layer_staged",
            &["event", "schema", "index", "digest", "entries"],
        ),
        (
            "done",
            &[
                "event",
                "schema",
                "reference",
                "digest",
                "manifest_digest",
                "manifests",
                "size",
                "downloaded",
                "seconds",
                "dest",
                "format",
                "unpacked",
            ],
        ),
    ];
    for l in &lines {
        assert_eq!(l["schema"], 1, "{l}");
        let ev = l["event"]
            .as_str()
            .unwrap_or_else(|| panic!("no event: {l}"));
        let fields = want
            .iter()
            .find(|(e, _)| *e == ev)
            .unwrap_or_else(|| panic!("undocumented event {ev}: {l}"))
            .1;
        assert_eq!(keys(l), set(fields), "fields of {ev}");
    }
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    assert_eq!(events.first(), Some(&"start"));
    assert_eq!(events.get(1), Some(&"resolved"));
    assert_eq!(events.last(), Some(&"done"));
    // Every blob: started, its last progress is its size, then done.
    for b in image.blobs() {
        let of_blob: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["digest"] == b.digest.as_str())
            .collect();
        let evs: Vec<&str> = of_blob.iter().filter_map(|l| l["event"].as_str()).collect();
        assert_eq!(evs.first(), Some(&"blob_started"), "{evs:?}");
        assert_eq!(evs.last(), Some(&"blob_done"), "{evs:?}");
        let last_progress = of_blob
            .iter()
            .rfind(|l| l["event"] == "blob_progress")
            .expect("progress");
        assert_eq!(last_progress["downloaded"], b.bytes.len());
        assert_eq!(last_progress["size"], b.bytes.len());
    }
    let done = lines.last().expect("lines");
    assert_eq!(done["manifest_digest"], image.manifest_digest.as_str());
    assert_eq!(
        done["size"],
        image.blobs().map(|b| b.bytes.len()).sum::<usize>()
    );
    assert_eq!(done["format"], "OCI image layout");
    assert_eq!(
        std::fs::read_to_string(&digestfile).expect("digestfile"),
        image.manifest_digest
    );

    // Again: everything is there, so every blob is skipped.
    let o = fastpull_command()
        .arg("--json")
        .arg(format!("{}/json/img:v1", reg.addr()))
        .arg(&out)
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    let lines = json_lines(&o);
    let skipped = lines
        .iter()
        .filter(|l| l["event"] == "blob_skipped")
        .count();
    assert_eq!(skipped, image.blobs().count());
    for l in &lines {
        let ev = l["event"].as_str().unwrap_or_default();
        let fields = want.iter().find(|(e, _)| *e == ev).expect("documented").1;
        assert_eq!(keys(l), set(fields), "fields of {ev}");
    }

    // A failure ends with an error line: category and exit code, and nothing else after.
    let (_d2, out2) = dest();
    let o = fastpull_command()
        .arg("--json")
        .arg(format!("{}/json/missing:v1", reg.addr()))
        .arg(&out2)
        .output()
        .expect("run fastpull");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let lines = json_lines(&o);
    let last = lines.last().expect("an error line");
    assert_eq!(
        keys(last),
        set(&["event", "schema", "category", "exit_code", "message"])
    );
    assert_eq!(last["event"], "error");
    assert_eq!(last["category"], "registry");
    assert_eq!(last["exit_code"], 3);
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("json/missing")),
        "{last}"
    );
}

/// Without a terminal (CI logs), a long pull is not silent: a progress line comes every few
/// seconds while bytes flow.
#[test]
fn without_a_terminal_long_pulls_print_progress_lines() {
    let reg = Registry::start();
    let image = many_layers(2, 1, 6 << 20);
    push_image(&reg, "lines/img", "v1", &image);
    let proxy = CountingProxy::start(&reg.addr());
    // About 12 s for the layer on one connection, whatever the machine.
    proxy.cap(
        Which::PathContains("/blobs/".into()),
        Cap::smooth(512 << 10),
    );
    let (_d, out) = dest();
    let o = fastpull_command()
        .args(["--connections", "1"])
        .arg(format!("{}/lines/img:v1", proxy.addr()))
        .arg(&out)
        .env_remove("TERM")
        .output()
        .expect("run fastpull");
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let progress: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("Downloading: "))
        .collect();
    assert!(!progress.is_empty(), "no progress line in:\n{stdout}");
    // The image's size, as the line gives it (gzip's output for random data depends on the
    // flate2 backend: zlib-rs's fast level stores it in fixed-Huffman blocks, ~5% larger).
    let total: u64 = image.blobs().map(|b| b.size()).sum();
    let total = format!(" of {:.1} MiB (", total as f64 / (1u64 << 20) as f64);
    assert!(
        progress[0].contains(&total) && progress[0].contains("/s"),
        "{progress:?} should say{total}"
    );
    assert!(
        !stdout.contains('\r') && !stdout.contains('\x1b'),
        "{stdout:?}"
    );
}

/// A tmux server of our own (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cols: u16, rows: u16, command: &str) -> Tmux {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = format!("fastpull-test-{}-{n}", std::process::id());
        let o = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", &cols.to_string(), "-y", &rows.to_string()])
            .arg(command)
            .output()
            .expect("run tmux (scripts/deps installs it)");
        assert!(o.status.success(), "tmux: {}", text(&o));
        Tmux { socket }
    }

    /// The screen, one string per row (trailing blanks trimmed).
    fn screen(&self) -> Vec<String> {
        let o = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim_end().to_string())
            .collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The fastpull command line for a shell in tmux (through the emulator when there is one),
/// with a clean environment and `TERM` as given.
fn terminal_command(term: &str, args: &[String]) -> String {
    let runner = std::env::var(RUNNER_ENV).unwrap_or_default();
    let home = tempfile::tempdir().expect("home").keep();
    let mut cmd = format!(
        "env -i PATH=/usr/bin:/bin HOME={} TERM={term} {runner} {}",
        shell_quote(&home.display().to_string()),
        shell_quote(FASTPULL_BIN)
    );
    for a in args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    }
    // Keep the pane after fastpull ends, and say how it ended.
    format!("{cmd}; echo FASTPULL-EXIT=$?; sleep 600")
}

/// A bar row as the display draws it at 60 columns: `<12 hex> [bar] NN%`, whole (a row cut
/// by wrapping would not match).
fn is_bar_row(row: &str) -> bool {
    bar_after_id(row).is_some_and(|rest| rest.ends_with('%'))
}

/// What follows a short layer id and a space, if it starts a bar (`[`).
fn bar_after_id(row: &str) -> Option<&str> {
    let (id, rest) = row.split_once(' ')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && rest.starts_with('['))
        .then_some(rest)
}

/// The pane, captured again (up to 5 times, 20 ms apart) while its last non-empty row is an
/// unfinished bar row with nothing below: tmux captured the frame while it was being drawn
/// (seen once in CI, under full load: a bar row cut short after its `[====`). A row that
/// wrapped leaves a row of its own below, in every capture, and is still caught.
fn untorn_screen(tmux: &Tmux) -> Vec<String> {
    let mut screen = tmux.screen();
    for _ in 0..5 {
        let torn = screen
            .iter()
            .rev()
            .find(|r| !r.is_empty())
            .is_some_and(|last| bar_after_id(last).is_some_and(|rest| !rest.ends_with('%')));
        if !torn {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        screen = tmux.screen();
    }
    screen
}

fn wait_for_end(tmux: &Tmux, deadline: Instant) -> Vec<String> {
    loop {
        let screen = tmux.screen();
        if screen.iter().any(|r| r.starts_with("FASTPULL-EXIT=")) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "fastpull never ended:\n{}",
            screen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// In a real terminal of 40 rows by 60 columns, 48 layers: bars never wrap, never take
/// more rows than the terminal has (the rest fold into the totals line, which counts them),
/// and the summary comes after the bars, which are gone. With `TERM=dumb`, no bars.
#[test]
fn terminal_display_fits_40_rows_by_60_columns_with_48_layers() {
    let reg = Registry::start();
    let image = many_layers(3, 48, 96 << 10);
    push_image(&reg, "tty/img", "v1", &image);
    let proxy = CountingProxy::start(&reg.addr());
    // Slow enough to be watched (each layer ~1.5 s on its connection), on any machine.
    proxy.cap(Which::PathContains("/blobs/".into()), Cap::smooth(64 << 10));
    let (_d, out) = dest();
    let args = vec![
        "--connections".to_string(),
        "16".to_string(),
        format!("{}/tty/img:v1", proxy.addr()),
        out.display().to_string(),
    ];
    let tmux = Tmux::start(60, 40, &terminal_command("xterm-256color", &args));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen_bars = 0usize;
    let mut seen_totals = false;
    let end = loop {
        let screen = untorn_screen(&tmux);
        // The summary (which may wrap at 60 columns, as docker's does) ends the live
        // display; the pane may be captured after it is printed and before the shell says
        // how fastpull ended.
        if screen
            .iter()
            .any(|r| r.starts_with("FASTPULL-EXIT=") || r.starts_with("Digest: "))
        {
            break wait_for_end(&tmux, deadline);
        }
        let bars = screen.iter().filter(|r| is_bar_row(r)).count();
        assert!(
            bars <= 40 - 4,
            "{bars} bars on a 40-row screen:\n{}",
            screen.join("\n")
        );
        for row in screen.iter().filter(|r| !r.is_empty()) {
            let known = is_bar_row(row)
                || row.starts_with("Total ")
                || row.starts_with("v1: Pulling from ");
            assert!(
                known,
                "a row that is no bar (wrapped?): {row:?}\n{}",
                screen.join("\n")
            );
        }
        if let Some(t) = screen.iter().find(|r| r.starts_with("Total ")) {
            seen_totals = true;
            assert!(t.ends_with("/48 layers"), "{t:?}");
        }
        seen_bars = seen_bars.max(bars);
        assert!(
            Instant::now() < deadline,
            "fastpull never ended:\n{}",
            screen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        end.iter().any(|r| r == "FASTPULL-EXIT=0"),
        "{}",
        end.join("\n")
    );
    assert!(
        seen_bars > 0 && seen_totals,
        "the live display was never seen"
    );
    // After the end: no bars left, the summary below the header.
    assert!(!end.iter().any(|r| is_bar_row(r)), "{}", end.join("\n"));
    let pos = |p: &str| end.iter().position(|r| r.starts_with(p));
    let (Some(head), Some(digest), Some(saved)) =
        (pos("v1: Pulling from"), pos("Digest: "), pos("Saved to "))
    else {
        panic!("summary lines missing:\n{}", end.join("\n"));
    };
    assert!(head < digest && digest < saved, "{}", end.join("\n"));
    drop(tmux);

    // TERM=dumb: docker's plain lines, no bars, no escape sequences drawn.
    let (_d2, out2) = dest();
    let args = vec![
        format!("{}/tty/img:v1", reg.addr()),
        out2.display().to_string(),
    ];
    let tmux = Tmux::start(60, 40, &terminal_command("dumb", &args));
    let end = wait_for_end(&tmux, Instant::now() + Duration::from_secs(300));
    assert!(
        end.iter().any(|r| r == "FASTPULL-EXIT=0"),
        "{}",
        end.join("\n")
    );
    assert!(
        end.iter().any(|r| r.ends_with(": Pull complete")),
        "{}",
        end.join("\n")
    );
    assert!(
        !end.iter().any(|r| r.starts_with("Total ")),
        "{}",
        end.join("\n")
    );
}

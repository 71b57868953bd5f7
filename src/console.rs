//! What a person (or a program) sees. Four modes:
//!
//! - **bars** (stdout is a terminal, `TERM` is not `dumb`): a live bar per layer in flight,
//!   as many as the terminal has rows for, finished layers collapsed into the totals line
//!   (bytes, speed, ETA) at the bottom; bars fit the terminal's width; the summary comes
//!   after the bars are gone.
//! - **lines** (no terminal, or `TERM=dumb`): docker's lines (`<id>: Pull complete`), and
//!   for long pulls a progress line every [`PROGRESS_EVERY`], so CI logs are never silent.
//! - **json** (`--json`): one JSON object per line on stdout, nothing else there (schema in
//!   README.md, "Machine-readable output").
//! - **quiet** (`-q`): only the image name when done.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fastpull::{
    BlobKind, Digest, Error, Event, EventKind, Format, PullReport, Reference, Reporter,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// Without a terminal, a progress line this often while bytes flow.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// In `--json`, a blob's progress at most this often (and when it completes).
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The version of the `--json` schema; bumped only when a field changes meaning or goes.
pub const JSON_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quiet,
    Json,
    Lines,
    Bars,
}

/// Progress and summary on stdout.
pub struct Console {
    mode: Mode,
    bars: Option<MultiProgress>,
    /// Bars are on screen: lines go above them (cut to the width).
    drawing: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    layers: HashMap<Digest, Layer>,
    /// Bytes to fetch (blobs not present), and received so far (this run and resumed).
    total: u64,
    received: u64,
    /// Layers verified and in place / to fetch.
    done_layers: usize,
    fetch_layers: usize,
    started: Option<Instant>,
    last_line: Option<Instant>,
    totals: Option<ProgressBar>,
    /// The layer bars on screen, as many as the terminal has rows for: each shows one
    /// layer, and a finished layer's bar is handed to the next one (bars are never removed
    /// one by one, so the drawn height only grows, then everything is cleared at once).
    slots: Vec<(ProgressBar, Option<Digest>)>,
}

impl State {
    /// A blob is fetched again from its first byte: what it had received no longer counts.
    fn fetch_again(&mut self, digest: &Digest) {
        if let Some(l) = self.layers.get_mut(digest) {
            self.received = self.received.saturating_sub(l.received);
            l.resumed = 0;
            l.received = 0;
        }
    }
}

struct Layer {
    is_layer: bool,
    size: u64,
    /// Which slot shows it.
    slot: Option<usize>,
    /// Bytes an earlier pull left.
    resumed: u64,
    /// Bytes received (including `resumed`).
    received: u64,
    last_json: Option<Instant>,
    done: bool,
}

impl Console {
    pub fn new(quiet: bool, json: bool) -> Console {
        let tty =
            std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let mode = if json {
            Mode::Json
        } else if quiet {
            Mode::Quiet
        } else if tty {
            Mode::Bars
        } else {
            Mode::Lines
        };
        let bars = (mode == Mode::Bars)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Console {
            mode,
            bars,
            drawing: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn line(&self, text: &str) {
        let text = &printable(text);
        match self.mode {
            Mode::Quiet | Mode::Json => {}
            Mode::Bars if self.drawing.load(Ordering::Acquire) => {
                if let Some(m) = &self.bars {
                    let _ = m.println(fit(text, term_cols()));
                }
            }
            Mode::Lines | Mode::Bars => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
            }
        }
    }

    fn json(&self, value: serde_json::Value) {
        let mut v = value;
        v["schema"] = JSON_SCHEMA.into();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
    }

    /// `TAG: Pulling from REPO`, as docker says it.
    pub fn start(&self, reference: &Reference) {
        if self.mode == Mode::Json {
            self.json(json!({"event": "start", "reference": reference.to_string()}));
            return;
        }
        let what = reference.manifest_reference();
        self.line(&format!(
            "{what}: Pulling from {}",
            reference.familiar_repository()
        ));
    }

    /// Removes every bar (before the summary, or after an error).
    pub fn clear(&self) {
        if let Ok(mut st) = self.state.lock() {
            for (b, _) in st.slots.drain(..) {
                b.finish_and_clear();
            }
            for l in st.layers.values_mut() {
                l.slot = None;
            }
            if let Some(t) = st.totals.take() {
                t.finish_and_clear();
            }
        }
        if let Some(m) = &self.bars {
            let _ = m.clear();
        }
        self.drawing.store(false, Ordering::Release);
    }

    /// A pull that failed: in `--json`, its error line (the message goes to stderr too).
    pub fn fail(&self, e: &Error, message: &str) {
        self.clear();
        if self.mode == Mode::Json {
            self.json(json!({
                "event": "error",
                "category": format!("{:?}", e.category()).to_lowercase(),
                "exit_code": e.category().exit_code(),
                "message": message,
            }));
        }
    }

    /// A pull stopped by a signal.
    pub fn interrupted(&self) {
        self.clear();
        if self.mode == Mode::Json {
            self.json(json!({"event": "interrupted", "exit_code": fastpull::Category::Cancelled.exit_code()}));
        }
    }

    /// The closing lines: digest, status, where the image is.
    pub fn finish(&self, report: &PullReport) {
        self.clear();
        match self.mode {
            Mode::Quiet => {
                // A closed stdout (`| head`) is not a failed pull.
                let _ = writeln!(std::io::stdout().lock(), "{}", report.reference);
                return;
            }
            Mode::Json => {
                let manifests: Vec<serde_json::Value> = report
                    .manifests
                    .iter()
                    .map(|m| {
                        json!({
                            "digest": m.digest.to_string(),
                            "media_type": m.media_type,
                            "platform": m.platform.as_ref().map(|p| p.to_string()),
                        })
                    })
                    .collect();
                self.json(json!({
                    "event": "done",
                    "reference": report.reference.to_string(),
                    "digest": report.digest.to_string(),
                    "manifest_digest": report.manifest_digest.to_string(),
                    "manifests": manifests,
                    "size": report.bytes_total,
                    "downloaded": report.bytes_downloaded,
                    "seconds": report.elapsed.as_secs_f64(),
                    "dest": report.dest.display().to_string(),
                    "format": report.format.to_string(),
                    "unpacked": report.unpacked.as_ref().map(|u| json!({
                        "path": report.rootfs.as_ref().map(|p| p.display().to_string()),
                        "layers": u.layers,
                        "merged": u.layers_merged,
                        "direct": u.layers_direct,
                        "entries": u.entries,
                        "devices_emulated": u.devices_emulated,
                        "xattrs_skipped": u.xattrs_skipped,
                    })),
                }));
                return;
            }
            Mode::Lines | Mode::Bars => {}
        }
        let all_present = report.blobs.iter().all(|b| b.skipped);
        self.line(&format!("Digest: {}", report.digest));
        if report.manifest_digest != report.digest {
            if let Some(p) = &report.platform {
                self.line(&format!(
                    "Platform: {p} (manifest {})",
                    report.manifest_digest
                ));
            }
        }
        if report.manifests.len() > 1 {
            let platforms: Vec<String> = report
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
                .collect();
            self.line(&format!(
                "Platforms: {} ({} manifests)",
                platforms.join(", "),
                report.manifests.len()
            ));
        }
        if all_present {
            self.line(&format!(
                "Status: Image is up to date for {}",
                report.reference
            ));
        } else {
            self.line(&format!(
                "Status: Downloaded newer image for {} ({} in {:.2}s)",
                report.reference,
                human_bytes(report.bytes_downloaded),
                report.elapsed.as_secs_f64()
            ));
        }
        if let Some(source) = &report.source_manifest_digest {
            self.line(&format!(
                "Converted: Docker manifest {source} → OCI manifest {} (new digest; config and \
                 layers unchanged; the registry's digest is kept in the \
                 io.fastpull.source.digest annotation)",
                report.manifest_digest
            ));
        }
        let named = match (&report.name, report.format) {
            (Some(n), Format::Oci | Format::OciArchive) => format!(" as {n}"),
            _ => String::new(),
        };
        self.line(&format!(
            "Saved to {} ({}){named}",
            report.dest.display(),
            report.format
        ));
        if let (Some(rootfs), Some(u)) = (&report.rootfs, &report.unpacked) {
            if report.format != Format::Rootfs {
                self.line(&format!(
                    "Unpacked to {} (root filesystem: {} layers, {} entries)",
                    rootfs.display(),
                    u.layers,
                    u.entries
                ));
            }
        }
        if let Some(u) = report.unpacked.as_ref().filter(|u| u.devices_emulated > 0) {
            self.line(&format!(
                "Note: {} device node(s) written as empty regular files: mknod needs root \
                 outside a user namespace (umoci's rootless behaviour)",
                u.devices_emulated
            ));
        }
        if matches!(report.format, Format::Oci | Format::OciArchive)
            && report.manifest_media_type.contains("docker")
        {
            self.line(
                "Note: the manifest keeps its Docker media type, as received (like `docker save`); \
                 skopeo's oci: transport and umoci read only OCI media types. \
                 Use --convert oci for them (or --format dir for skopeo).",
            );
        }
    }
}

impl Reporter for Console {
    fn report(&self, event: &Event) {
        if self.mode == Mode::Quiet {
            return;
        }
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let st = &mut *st;
        let now = Instant::now();
        match &event.kind {
            EventKind::Resolved {
                digest,
                manifest_digest,
                platform,
            } if self.mode == Mode::Json => {
                self.json(json!({
                    "event": "resolved",
                    "digest": digest.to_string(),
                    "manifest_digest": manifest_digest.to_string(),
                    "platform": platform.as_ref().map(|p| p.to_string()),
                }));
            }
            EventKind::BlobPlanned {
                digest,
                size,
                kind,
                present,
            } => {
                let is_layer = *kind == BlobKind::Layer;
                if !*present {
                    st.total += size;
                    st.fetch_layers += usize::from(is_layer);
                }
                st.layers.insert(
                    *digest,
                    Layer {
                        is_layer,
                        size: *size,
                        slot: None,
                        resumed: 0,
                        received: 0,
                        last_json: None,
                        done: *present,
                    },
                );
                match self.mode {
                    Mode::Json => self.json(json!({
                        "event": if *present { "blob_skipped" } else { "blob_started" },
                        "digest": digest.to_string(),
                        "size": size,
                        "kind": if is_layer { "layer" } else { "config" },
                    })),
                    // Like docker, show layers; the config is fetched quietly.
                    _ if !is_layer => {}
                    _ if *present => self.line(&format!("{}: Already exists", digest.short())),
                    Mode::Lines => self.line(&format!("{}: Pulling fs layer", digest.short())),
                    _ => {}
                }
            }
            EventKind::BlobProgress { digest, downloaded } => {
                st.started.get_or_insert(now);
                let Some(l) = st.layers.get_mut(digest) else {
                    return;
                };
                let received = l.resumed + *downloaded;
                let delta = received.saturating_sub(l.received);
                l.received = received;
                st.received += delta;
                match self.mode {
                    Mode::Json => {
                        let Some(l) = st.layers.get_mut(digest) else {
                            return;
                        };
                        let due = l
                            .last_json
                            .is_none_or(|t| now.duration_since(t) >= JSON_PROGRESS_EVERY);
                        if due || l.received >= l.size {
                            l.last_json = Some(now);
                            self.json(json!({
                                "event": "blob_progress",
                                "digest": digest.to_string(),
                                "downloaded": l.received,
                                "size": l.size,
                            }));
                        }
                    }
                    Mode::Lines => {
                        let since = st.last_line.or(st.started).unwrap_or(now);
                        if now.duration_since(since) >= PROGRESS_EVERY {
                            st.last_line = Some(now);
                            self.line(&progress_text(st, now));
                        }
                    }
                    Mode::Bars => self.draw(st, Some(*digest)),
                    Mode::Quiet => {}
                }
            }
            EventKind::BlobResumed { digest, present } => {
                if let Some(l) = st.layers.get_mut(digest) {
                    l.resumed = *present;
                    l.received = *present;
                    st.received += present;
                    if self.mode == Mode::Json {
                        self.json(json!({
                            "event": "blob_resumed",
                            "digest": digest.to_string(),
                            "present": present,
                        }));
                    } else if l.is_layer && self.mode == Mode::Lines {
                        self.line(&format!(
                            "{}: Resuming ({} already here)",
                            digest.short(),
                            human_bytes(*present)
                        ));
                    }
                }
            }
            EventKind::BlobRepairing {
                digest,
                actual,
                attempt,
            } => {
                st.fetch_again(digest);
                if self.mode == Mode::Json {
                    self.json(json!({
                        "event": "blob_repairing",
                        "digest": digest.to_string(),
                        "actual": actual.to_string(),
                        "attempt": attempt,
                    }));
                } else {
                    self.line(&format!(
                        "{}: Digest mismatch (got {actual}); fetching it again (repair {attempt})",
                        digest.short()
                    ));
                }
            }
            EventKind::BlobRestarting { digest, actual } => {
                st.fetch_again(digest);
                if self.mode == Mode::Json {
                    self.json(json!({
                        "event": "blob_restarting",
                        "digest": digest.to_string(),
                        "actual": actual.to_string(),
                    }));
                } else {
                    self.line(&format!(
                        "{}: Resumed bytes did not verify (got {actual}); fetching it again from scratch",
                        digest.short()
                    ));
                }
            }
            EventKind::BlobDiffered {
                digest,
                earlier,
                later,
                ranges,
            } => {
                let list: Vec<String> = ranges
                    .iter()
                    .map(|r| format!("{}-{}", r.start, r.end.saturating_sub(1)))
                    .collect();
                let bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
                if self.mode == Mode::Json {
                    self.json(json!({
                        "event": "blob_differed",
                        "digest": digest.to_string(),
                        "earlier": earlier,
                        "later": later,
                        "ranges": list,
                        "bytes": bytes,
                    }));
                } else if list.is_empty() {
                    self.line(&format!(
                        "{}: Fetches {earlier} and {later} were the same, byte for byte",
                        digest.short()
                    ));
                } else {
                    self.line(&format!(
                        "{}: Fetches {earlier} and {later} differed in bytes {} ({})",
                        digest.short(),
                        list.join(","),
                        human_bytes(bytes)
                    ));
                }
            }
            EventKind::BlobRetrying {
                digest,
                attempt,
                error,
            } => {
                if self.mode == Mode::Json {
                    self.json(json!({
                        "event": "retry",
                        "digest": digest.to_string(),
                        "attempt": attempt,
                        "error": error,
                    }));
                } else {
                    self.line(&format!(
                        "{}: Retrying ({attempt}): {error}",
                        digest.short()
                    ));
                }
            }
            EventKind::EndpointFailed { host, error } => {
                if self.mode == Mode::Json {
                    self.json(json!({
                        "event": "endpoint_failed",
                        "host": host,
                        "error": error,
                    }));
                } else {
                    self.line(&format!(
                        "Mirror {host} failed, trying the next source: {error}"
                    ));
                }
                // The next source starts over.
                for (b, shows) in st.slots.iter_mut() {
                    *shows = None;
                    b.set_position(0);
                    b.set_prefix("");
                }
                st.layers.clear();
                st.total = 0;
                st.received = 0;
                st.fetch_layers = 0;
                st.done_layers = 0;
            }
            EventKind::BlobDone { digest } => {
                let Some(l) = st.layers.get_mut(digest) else {
                    return;
                };
                l.done = true;
                let delta = l.size.saturating_sub(l.received);
                l.received = l.size;
                st.received += delta;
                let is_layer = l.is_layer;
                st.done_layers += usize::from(is_layer);
                match self.mode {
                    Mode::Json => self.json(json!({
                        "event": "blob_done",
                        "digest": digest.to_string(),
                    })),
                    Mode::Lines if is_layer => {
                        self.line(&format!("{}: Pull complete", digest.short()))
                    }
                    Mode::Bars => self.draw(st, None),
                    _ => {}
                }
            }
            EventKind::LayerApplied {
                index,
                digest,
                uncompressed,
                entries,
            } => match self.mode {
                Mode::Json => self.json(json!({
                    "event": "layer_applied",
                    "index": index,
                    "digest": digest.to_string(),
                    "uncompressed": uncompressed,
                    "entries": entries,
                })),
                Mode::Lines => self.line(&format!("{}: Unpacked", digest.short())),
                _ => {}
            },
            EventKind::LayerStaged {
                index,
                digest,
                entries,
            } if self.mode == Mode::Json => self.json(json!({
                "event": "layer_staged",
                "index": index,
                "digest": digest.to_string(),
                "entries": entries,
            })),
            _ => {}
        }
    }
}

impl Console {
    /// Bars mode: a bar per layer in flight while the terminal has rows for it (finished
    /// layers hand their bar on), and the totals line at the bottom.
    fn draw(&self, st: &mut State, active: Option<Digest>) {
        let Some(m) = &self.bars else {
            return;
        };
        let (cols, rows) = term_size();
        // Rows for layer bars: leave the totals line, the header and a margin.
        let room = rows.saturating_sub(4).max(1);
        if st.totals.is_none() {
            // Styled and labelled before it is added: its first frame is already whole.
            let t = m.add(
                ProgressBar::new(st.total.max(1))
                    .with_style(totals_style(cols))
                    .with_message(totals_message(st, cols)),
            );
            st.totals = Some(t);
            self.drawing.store(true, Ordering::Release);
        }
        if let Some(d) = active {
            let wants = st
                .layers
                .get(&d)
                .is_some_and(|l| l.is_layer && !l.done && l.slot.is_none());
            if wants {
                // A free slot: one showing a finished layer, else a new one if rows allow.
                let free = st.slots.iter().position(|(_, shows)| {
                    shows.is_none_or(|o| st.layers.get(&o).is_none_or(|l| l.done))
                });
                let slot = match free {
                    Some(i) => Some(i),
                    None if st.slots.len() < room => {
                        let bar = ProgressBar::new(1);
                        bar.set_style(layer_style(cols));
                        let bar = match &st.totals {
                            Some(t) => m.insert_before(t, bar),
                            None => m.add(bar),
                        };
                        st.slots.push((bar, None));
                        Some(st.slots.len() - 1)
                    }
                    None => None,
                };
                if let Some(i) = slot {
                    if let Some(old) = st.slots[i].1.take() {
                        if let Some(l) = st.layers.get_mut(&old) {
                            l.slot = None;
                        }
                    }
                    if let Some(l) = st.layers.get_mut(&d) {
                        l.slot = Some(i);
                        let b = &st.slots[i].0;
                        b.set_prefix(d.short());
                        b.set_length(l.size.max(1));
                        b.set_message("Downloading");
                        b.reset_eta();
                    }
                    st.slots[i].1 = Some(d);
                }
            }
            if let Some(l) = st.layers.get(&d) {
                if let Some(i) = l.slot {
                    st.slots[i].0.set_position(l.received);
                }
            }
        }
        // Finished layers show complete until their bar is handed on.
        for (b, shows) in &st.slots {
            if let Some(l) = shows.and_then(|d| st.layers.get(&d)).filter(|l| l.done) {
                b.set_position(l.size);
                b.set_message("Pull complete");
            }
        }
        if let Some(t) = &st.totals {
            t.set_length(st.total.max(1));
            t.set_position(st.received.min(st.total));
            t.set_message(totals_message(st, cols));
        }
    }
}

/// The totals line's label: layers done of those fetched, and on a wide terminal how many
/// more are downloading without a bar.
fn totals_message(st: &State, cols: usize) -> String {
    let hidden = st
        .layers
        .values()
        .filter(|l| l.is_layer && !l.done && l.slot.is_none() && l.received > 0)
        .count();
    let mut msg = format!("{}/{} layers", st.done_layers, st.fetch_layers);
    if hidden > 0 && cols >= 100 {
        msg.push_str(&format!(", {hidden} more in flight"));
    }
    msg
}

/// A line for logs: received of total, percent, rate.
fn progress_text(st: &State, now: Instant) -> String {
    let secs = st
        .started
        .map_or(0.0, |s| now.duration_since(s).as_secs_f64())
        .max(1e-3);
    let pct = if st.total > 0 {
        st.received as f64 * 100.0 / st.total as f64
    } else {
        100.0
    };
    format!(
        "Downloading: {} of {} ({pct:.0}%), {}/s, {}/{} layers complete",
        human_bytes(st.received),
        human_bytes(st.total),
        human_bytes((st.received as f64 / secs) as u64),
        st.done_layers,
        st.fetch_layers
    )
}

fn layer_style(cols: usize) -> ProgressStyle {
    // Wide terminals get docker's layout; narrower ones shorter ones whose fixed parts never
    // outgrow the line (a wrapped line breaks every redraw below it).
    let template = if cols >= 100 {
        "{prefix}: {msg:<12} [{bar:30}] {bytes:>11}/{total_bytes:<11} {bytes_per_sec}"
    } else if cols >= 80 {
        "{prefix} [{wide_bar}] {bytes:>11}/{total_bytes:<11}"
    } else {
        "{prefix} [{wide_bar}] {percent:>3}%"
    };
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn totals_style(cols: usize) -> ProgressStyle {
    let template = if cols >= 100 {
        "Total: [{bar:30}] {bytes:>11}/{total_bytes:<11} {bytes_per_sec} ETA {eta} ({msg})"
    } else if cols >= 80 {
        "Total {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
    } else {
        "Total {percent:>3}% {bytes_per_sec} ETA {eta} {msg}"
    };
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn term_size() -> (usize, usize) {
    terminal_size::terminal_size()
        .map(|(w, h)| (w.0 as usize, h.0 as usize))
        .unwrap_or((80, 24))
}

fn term_cols() -> usize {
    term_size().0
}

/// `text` cut to `cols` characters (a line that wraps breaks the bars below it).
fn fit(text: &str, cols: usize) -> String {
    if text.chars().count() <= cols || cols < 4 {
        return text.to_string();
    }
    let mut s: String = text.chars().take(cols - 1).collect();
    s.push('…');
    s
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
/// `text` with every control character but newlines and tabs shown as `?`: what a
/// registry says (an error message, a platform of its index) reaches the terminal through
/// here, and an escape sequence in it must not move the cursor, retitle the window or
/// hide what came before.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reaches the terminal has no escape sequence a registry put in it (red when
    /// lines were printed as given); newlines and tabs of our own messages stay.
    #[test]
    fn lines_show_control_characters_as_question_marks() {
        assert_eq!(
            printable("linux/\u{1b}]0;owned\u{7}amd64\r\n\tnext"),
            "linux/?]0;owned?amd64?\n\tnext"
        );
        assert_eq!(printable("caf\u{e9} \u{9b}31m"), "caf\u{e9} ?31m");
    }
}

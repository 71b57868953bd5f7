//! What a person sees: docker-style lines (`<id>: Pull complete`) when output is not a
//! terminal, live progress bars when it is.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use fastpull::{BlobKind, Digest, Event, Format, PullReport, Reference, Reporter};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress and summary on stdout.
pub struct Console {
    quiet: bool,
    bars: Option<MultiProgress>,
    state: Mutex<HashMap<Digest, Layer>>,
}

struct Layer {
    is_layer: bool,
    bar: Option<ProgressBar>,
    /// Bytes an earlier pull left (the bar starts there).
    resumed: u64,
}

impl Console {
    pub fn new(quiet: bool) -> Console {
        let bars = (!quiet && std::io::stdout().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Console {
            quiet,
            bars,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some(m) => {
                let _ = m.println(text);
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{text}");
            }
        }
    }

    /// `TAG: Pulling from REPO`, as docker says it.
    pub fn start(&self, reference: &Reference) {
        let what = reference.manifest_reference();
        self.line(&format!(
            "{what}: Pulling from {}",
            reference.familiar_repository()
        ));
    }

    /// Removes bars that are still drawn (after an error).
    pub fn clear(&self) {
        if let Some(m) = &self.bars {
            let _ = m.clear();
        }
    }

    /// The closing lines: digest, status, where the image is.
    pub fn finish(&self, report: &PullReport) {
        if self.quiet {
            // A closed stdout (`| head`) is not a failed pull.
            let _ = writeln!(std::io::stdout().lock(), "{}", report.reference);
            return;
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
        if self.quiet {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match event {
            Event::BlobPlanned {
                digest,
                size,
                kind,
                present,
            } => {
                // Like docker, show layers; the config is fetched quietly.
                let is_layer = *kind == BlobKind::Layer;
                let id = digest.short();
                if is_layer && *present {
                    self.line(&format!("{id}: Already exists"));
                }
                let bar = match (&self.bars, is_layer && !*present) {
                    (Some(m), true) => Some(self.add_bar(m, &id, *size)),
                    (None, true) => {
                        self.line(&format!("{id}: Pulling fs layer"));
                        None
                    }
                    _ => None,
                };
                state.insert(
                    *digest,
                    Layer {
                        is_layer,
                        bar,
                        resumed: 0,
                    },
                );
            }
            Event::BlobProgress { digest, downloaded } => {
                if let Some(l) = state.get(digest) {
                    if let Some(bar) = l.bar.as_ref() {
                        bar.set_message("Downloading");
                        bar.set_position(l.resumed + *downloaded);
                    }
                }
            }
            Event::BlobResumed { digest, present } => {
                if let Some(l) = state.get_mut(digest) {
                    l.resumed = *present;
                    if let Some(bar) = l.bar.as_ref() {
                        bar.set_position(*present);
                    }
                    if l.is_layer {
                        self.line(&format!(
                            "{}: Resuming ({} already here)",
                            digest.short(),
                            human_bytes(*present)
                        ));
                    }
                }
            }
            Event::BlobRepairing {
                digest,
                actual,
                attempt,
            } => {
                self.line(&format!(
                    "{}: Digest mismatch (got {actual}); fetching it again (repair {attempt})",
                    digest.short()
                ));
                if let Some(l) = state.get_mut(digest) {
                    l.resumed = 0;
                    if let Some(bar) = l.bar.as_ref() {
                        bar.set_position(0);
                    }
                }
            }
            Event::BlobRetrying {
                digest,
                attempt,
                error,
            } => {
                self.line(&format!(
                    "{}: Retrying ({attempt}): {error}",
                    digest.short()
                ));
                if let Some(bar) = state.get(digest).and_then(|l| l.bar.as_ref()) {
                    bar.set_position(0);
                }
            }
            Event::EndpointFailed { host, error } => {
                for (_, layer) in state.drain() {
                    if let Some(bar) = layer.bar {
                        bar.finish_and_clear();
                    }
                }
                self.line(&format!(
                    "Mirror {host} failed, trying the next source: {error}"
                ));
            }
            Event::BlobDone { digest } => match state.get(digest) {
                Some(Layer { bar: Some(bar), .. }) => {
                    bar.set_position(bar.length().unwrap_or(0));
                    bar.finish_with_message("Pull complete");
                }
                Some(Layer { is_layer: true, .. }) => {
                    self.line(&format!("{}: Pull complete", digest.short()));
                }
                _ => {}
            },
            _ => {}
        }
    }
}

impl Console {
    fn add_bar(&self, m: &MultiProgress, id: &str, size: u64) -> ProgressBar {
        let bar = m.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix}: {msg:<12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(id.to_string());
        bar.set_message("Waiting");
        bar
    }
}

fn human_bytes(n: u64) -> String {
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

//! The concurrent stage. Every blob's bytes come over HTTP into its mapped partial file while
//! its in-order hasher follows on the hashing pool; a blob is renamed into place once its
//! digest matches.
//!
//! Three rooms: [`scheduler`] owns the range policy (how many connections each origin gets,
//! which transfer is cut for an idle connection, and where); [`transfer`] carries out one
//! span's requests (retried, resumed, stopped where a cut put its end); this file runs the
//! pull's loop: it starts blobs largest first, asks the scheduler what a free connection
//! should do, measures on a short tick, and finishes verified blobs.
//!
//! Each byte is written once: a span has one writer, and a cut only hands the part its
//! writer has not reached to a new one ([`crate::write::BlobFile::split`]).

mod scheduler;
mod transfer;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;

pub use scheduler::FanOut;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::manifest::BlobDescriptor;
use crate::progress::{Event, Reporter};
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::verify::{HashPool, InOrderHasher};
use crate::write::{BlobFile, SpanRef, SpanWriter};
use scheduler::{BlobInfo, Decision, FlowInfo, Scheduler};
use transfer::{internal, BlobState, Flow, FlowStats};

/// Knobs of the fetch stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchOptions {
    /// Requests in flight for the whole pull.
    pub connections: usize,
    /// Requests in flight for one blob.
    pub connections_per_blob: usize,
    /// No cut leaves a piece smaller than this; blobs under twice this are one request.
    pub min_piece: u64,
    /// How eagerly blobs are split over connections.
    pub fan_out: FanOut,
    /// Retries per request.
    pub retry: RetryPolicy,
    /// No bytes for this long and the request is re-issued.
    pub stall_timeout: Duration,
}

/// What the fetch stage needs from the pull.
pub(crate) struct Fetcher<'a> {
    pub registry: &'a Registry,
    pub layout: &'a Layout,
    pub reporter: &'a dyn Reporter,
    pub hash_pool: &'a Arc<HashPool>,
    pub options: FetchOptions,
}

/// How often the scheduler measures.
const TICK: Duration = Duration::from_millis(10);

/// A blob of the pull, as the loop sees it.
struct BlobRun {
    desc: BlobDescriptor,
    state: Option<Arc<BlobState>>,
    digest_rx: Option<tokio::sync::oneshot::Receiver<std::io::Result<Digest>>>,
    running: usize,
    splits: u32,
    races: u32,
}

/// A running transfer, as the loop sees it.
struct FlowRun {
    id: u64,
    blob: usize,
    span: SpanRef,
    stats: Arc<FlowStats>,
    lane: usize,
    rtt_noted: bool,
}

impl FlowRun {
    fn info(&self) -> FlowInfo<'_> {
        FlowInfo {
            id: self.id,
            blob: self.blob,
            span: &self.span,
            origin: self.stats.origin.get().map(String::as_str),
            bytes: self.stats.bytes.load(Ordering::Relaxed),
            first_byte: self.stats.first_response.get().map(|(at, _)| *at),
            splittable: self
                .stats
                .splittable
                .load(std::sync::atomic::Ordering::Acquire),
        }
    }
}

impl Fetcher<'_> {
    /// Downloads and verifies every blob; stops at the first failure (in-flight requests are
    /// dropped and partial files removed). Returns bytes downloaded.
    pub(crate) async fn fetch_all(&self, blobs: &[BlobDescriptor]) -> Result<u64> {
        let mut runs: Vec<BlobRun> = blobs
            .iter()
            .map(|d| BlobRun {
                desc: d.clone(),
                state: None,
                digest_rx: None,
                running: 0,
                splits: 0,
                races: 0,
            })
            .collect();
        let result = self.fetch_runs(&mut runs).await;
        if result.is_err() {
            // Partial files go now, not when the last hashing thread lets go of them.
            for s in runs.iter().filter_map(|r| r.state.as_ref()) {
                s.file.discard();
            }
        }
        result
    }

    async fn fetch_runs(&self, runs: &mut [BlobRun]) -> Result<u64> {
        let o = &self.options;
        let mut sched = Scheduler::new(
            o.fan_out,
            o.connections,
            o.connections_per_blob,
            o.min_piece,
        );
        let max = o.connections.max(1);
        let mut lanes = vec![false; max];
        let mut flows: Vec<FlowRun> = Vec::new();
        let mut jobs = FuturesUnordered::new();
        let mut finishing = FuturesUnordered::new();
        let mut next_blob = 0usize;
        let mut next_id = 0u64;
        let mut finished = 0usize;
        let mut downloaded = 0u64;
        let mut first_byte_logged = false;
        let started = Instant::now();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Give free connections work: a new blob (largest first); a blob that has no
            // transfer left but bytes nobody fetches (it keeps its connection); then what
            // the scheduler picks (more pieces, a cut, a raced tail).
            while flows.len() < max {
                let infos: Vec<FlowInfo<'_>> = flows.iter().map(FlowRun::info).collect();
                let (blob, writer, first) = if next_blob < runs.len() {
                    let b = next_blob;
                    next_blob += 1;
                    let size = runs[b].desc.size;
                    let len = if sched.whole_request(size) {
                        size
                    } else {
                        sched.fit(sched.piece_len(None, &infos), size)
                    };
                    (
                        b,
                        self.open(&mut runs[b], sched.whole_request(size), len)?,
                        true,
                    )
                } else if let Some((b, state)) = runs.iter().enumerate().find_map(|(i, r)| {
                    r.state
                        .as_ref()
                        .filter(|s| r.running == 0 && s.file.unassigned() > 0)
                        .map(|s| (i, s.clone()))
                }) {
                    let len = sched.fit(
                        sched.piece_len(state.origin(), &infos),
                        state.file.unassigned(),
                    );
                    let writer = state
                        .file
                        .take(len)
                        .ok_or_else(|| internal("no bytes left to take"))?;
                    (b, writer, false)
                } else {
                    let blob_infos: Vec<BlobInfo<'_>> = runs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| {
                            let s = r.state.as_ref()?;
                            Some(BlobInfo {
                                blob: i,
                                unassigned: s.file.unassigned(),
                                running: r.running,
                                origin: s.origin(),
                            })
                        })
                        .collect();
                    let decision = sched.pick(&infos, &blob_infos, |origin| {
                        flows
                            .iter()
                            .filter(|f| f.stats.origin.get().is_some_and(|o| o == origin))
                            .count()
                    });
                    match decision {
                        None => break,
                        Some(Decision::Piece { blob, len }) => {
                            let state = runs[blob]
                                .state
                                .as_ref()
                                .ok_or_else(|| internal("piece of an unopened blob"))?;
                            let Some(writer) = state.file.take(len) else {
                                break;
                            };
                            (blob, writer, false)
                        }
                        Some(Decision::Cut(cut)) => {
                            let Some(victim) = flows.iter().find(|f| f.id == cut.victim) else {
                                break;
                            };
                            let b = victim.blob;
                            let state = runs[b]
                                .state
                                .as_ref()
                                .ok_or_else(|| internal("cut of an unopened blob"))?;
                            let Some(writer) = state.file.split(&victim.span, cut.at) else {
                                // The victim got there first; look again next time.
                                break;
                            };
                            if cut.race {
                                runs[b].races += 1;
                            } else {
                                runs[b].splits += 1;
                            }
                            tracing::debug!(blob = %runs[b].desc.digest, at = cut.at, end = writer.range().end, victim_at = victim.span.position(), race = cut.race, "split");
                            (b, writer, false)
                        }
                    }
                };
                let Some(lane) = lanes.iter().position(|used| !used) else {
                    return Err(internal("no free lane"));
                };
                lanes[lane] = true;
                let state = runs[blob]
                    .state
                    .clone()
                    .ok_or_else(|| internal("blob scheduled before it was opened"))?;
                let origin = if first {
                    None
                } else {
                    state.origin().map(str::to_string)
                };
                let stats = Arc::new(FlowStats::new(origin));
                let id = next_id;
                next_id += 1;
                flows.push(FlowRun {
                    id,
                    blob,
                    span: writer.span(),
                    stats: stats.clone(),
                    lane,
                    rtt_noted: false,
                });
                runs[blob].running += 1;
                jobs.push(self.run_flow(id, state, stats, writer, lane, first));
            }
            if jobs.is_empty() && finishing.is_empty() {
                break;
            }
            tokio::select! {
                Some((id, result)) = jobs.next() => {
                    let i = flows.iter().position(|f| f.id == id).ok_or_else(|| internal("unknown flow"))?;
                    let flow = flows.swap_remove(i);
                    lanes[flow.lane] = false;
                    sched.flow_ended(id, flow.stats.origin.get().map(String::as_str), flow.stats.bytes.load(Ordering::Relaxed));
                    result?;
                    let run = &mut runs[flow.blob];
                    run.running -= 1;
                    let state = run.state.clone().ok_or_else(|| internal("finished blob without file"))?;
                    if run.running == 0 && state.file.unassigned() == 0 {
                        // Every byte of the blob is written.
                        let rx = run.digest_rx.take().ok_or_else(|| internal("blob finished twice"))?;
                        state.hasher.poke();
                        let (splits, races) = (run.splits, run.races);
                        finishing.push(finish(state, rx, splits, races));
                    }
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    for f in flows.iter_mut().filter(|f| !f.rtt_noted) {
                        if let (Some((_, ttfb)), Some(origin)) = (f.stats.first_response.get(), f.stats.origin.get()) {
                            f.rtt_noted = true;
                            sched.first_byte(origin, *ttfb, now);
                        }
                    }
                    if !first_byte_logged && flows.iter().any(|f| f.stats.bytes.load(Ordering::Relaxed) > 0) {
                        first_byte_logged = true;
                        let rt = self.registry.round_trips();
                        tracing::info!(
                            round_trips = rt.total(),
                            requests = rt.requests,
                            connections = rt.connections,
                            tls_handshakes = rt.tls,
                            after_ms = started.elapsed().as_millis() as u64,
                            "first blob byte"
                        );
                    }
                    sched.tick(now, flows.iter().map(FlowRun::info));
                }
                Some(result) = finishing.next() => {
                    let (digest, bytes) = result?;
                    downloaded += bytes;
                    finished += 1;
                    self.reporter.report(&Event::BlobDone { digest });
                }
            }
        }
        if finished != runs.len() {
            return Err(internal("fetch ended with blobs unfinished"));
        }
        tracing::info!(connections = %sched.summary(), "fan-out");
        Ok(downloaded)
    }

    /// Creates a blob's partial file and hasher; returns the writer of its first `len` bytes.
    fn open(&self, run: &mut BlobRun, whole_request: bool, len: u64) -> Result<SpanWriter> {
        let d = &run.desc;
        let file = BlobFile::create(
            &self.layout.partial_path(&d.digest),
            &self.layout.blob_path(&d.digest),
            d.size,
        )?;
        let writer = file
            .take(len)
            .ok_or_else(|| internal("new blob already started"))?;
        let (hasher, rx) = InOrderHasher::new(file.clone(), self.hash_pool.clone());
        run.state = Some(Arc::new(BlobState {
            desc: d.clone(),
            file,
            hasher,
            url: Mutex::new(self.registry.blob_url(&d.digest)),
            downloaded: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            whole_request,
            origin: OnceLock::new(),
        }));
        run.digest_rx = Some(rx);
        Ok(writer)
    }

    async fn run_flow(
        &self,
        id: u64,
        state: Arc<BlobState>,
        stats: Arc<FlowStats>,
        writer: SpanWriter,
        lane: usize,
        first: bool,
    ) -> (u64, Result<()>) {
        let flow = Flow {
            blob: &state,
            stats: &stats,
            first,
            lane,
        };
        (id, self.transfer(flow, writer).await)
    }
}

/// Waits for the digest, compares it, and gives a verified blob its final name.
async fn finish(
    s: Arc<BlobState>,
    rx: tokio::sync::oneshot::Receiver<std::io::Result<Digest>>,
    splits: u32,
    races: u32,
) -> Result<(Digest, u64)> {
    let path = s.file.final_path().to_path_buf();
    let actual = rx
        .await
        .map_err(|_| internal("hasher went away"))?
        .map_err(|e| Error::io("hash", &path, e))?;
    if actual != s.desc.digest {
        return Err(Error::DigestMismatch {
            what: format!("blob {}", s.desc.digest),
            expected: s.desc.digest,
            actual,
        });
    }
    let file = s.file.clone();
    tokio::task::spawn_blocking(move || file.persist())
        .await
        .map_err(|e| Error::io("persist", &path, std::io::Error::other(e.to_string())))??;
    let bytes = s.downloaded.load(Ordering::Relaxed);
    tracing::info!(
        blob = %s.desc.digest,
        bytes,
        requests = s.requests.load(Ordering::Relaxed),
        splits,
        races,
        "verified and in place"
    );
    Ok((s.desc.digest, bytes))
}

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
//!
//! Resume and repair live here too, as the loop's part of them: a blob whose partial file
//! has a believable journal ([`crate::resume`]) is reopened and only its missing bytes are
//! handed out, by the same scheduler; the loop appends to each blob's journal as bytes land
//! (and flushes it with the data every [`DURABLE_EVERY`]); a pull that stops for any reason
//! (error, Ctrl-C, a dropped future) keeps what it wrote, flushed and journaled, for the next
//! one. A blob whose digest does not match is fetched again, from scratch, up to
//! [`FetchOptions::repair_attempts`] times; a resumed blob that does not match (a journal
//! or partial file that lied) is first fetched again from scratch without counting as a
//! repair. Each failed fetch is hashed in pieces and compared with the next fetch, and the
//! pieces that differed are reported ([`EventKind::BlobDiffered`]): a corrupting hop shows
//! where.

mod scheduler;
mod transfer;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, Shared};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

pub use scheduler::FanOut;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::manifest::BlobDescriptor;
use crate::prefix::{PrefixConsumer, Watchers};
use crate::progress::{EventKind, PullReporter};
use crate::registry::Registry;
use crate::resume::{Journal, RangeSet};
use crate::retry::RetryPolicy;
use crate::verify::{HashPool, InOrderHasher};
use crate::write::{BlobFile, SpanRef, SpanWriter};
use scheduler::{BlobInfo, Decision, FlowInfo, Scheduler};
use transfer::{internal, Answering, BlobState, Flow, FlowStats};

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
    /// Keep partial downloads (with a journal) for the next pull, and resume them.
    pub resume: bool,
    /// Times a blob whose digest does not match is fetched again before the pull fails.
    pub repair_attempts: u32,
    /// The blobs are scratch, deleted when the pull ends (`--format rootfs`): not kept
    /// for resume and never made durable ([`BlobFile::create_scratch`]).
    pub scratch: bool,
}

/// What the fetch stage needs from the pull.
pub(crate) struct Fetcher<'a> {
    pub registry: &'a Registry,
    pub layout: &'a Layout,
    pub reporter: &'a PullReporter,
    pub hash_pool: &'a Arc<HashPool>,
    pub options: FetchOptions,
    /// Blobs followed by another in-order consumer (the rootfs unpacker): told when a
    /// fetch of one opens its file, is abandoned for a repair, or verifies.
    pub watch: Option<&'a Watchers>,
}

/// How often the scheduler measures.
const TICK: Duration = Duration::from_millis(10);

/// How often each blob's journal gets `W` records for what was written since.
const JOURNAL_EVERY: Duration = Duration::from_millis(50);

/// How often each unfinished blob that grew since its last checkpoint has its data flushed
/// (fdatasync) and its journal given `D` records: what a power cut may cost, whatever the
/// blob's size or rate (a blob that finishes within the first period needs none). Not more
/// often: an fdatasync of a file that is still mapped and written write-protects its dirty
/// pages one by one (measured: every second on a 1 GiB layer at ~500 MB/s cost 0.2-1.5 s
/// of CPU per GB and ~25% of the time). `kill -9` and crashes of fastpull are covered by
/// the `W` records in between; a stop (Ctrl-C, error) flushes everything.
pub(crate) const DURABLE_EVERY: Duration = Duration::from_secs(5);

/// Piece size for telling which parts of a blob differed between a bad and a good fetch.
const REPAIR_PIECE: u64 = 1 << 20;

/// The [`REPAIR_PIECE`] hashes of one fetch of a blob, being computed (`None`: they could
/// not be). Shared: a failed fetch is compared with the one before it and the one after.
type PieceHashes = Shared<BoxFuture<'static, Option<Arc<Vec<[u8; 32]>>>>>;

/// Which fetch of a blob (1-based) and its piece hashes.
struct Pieces {
    fetch: u32,
    hashes: PieceHashes,
}

/// Two fetches of a blob compared piece by piece: (blob, earlier fetch, later fetch, the
/// byte ranges that differed, if both could be hashed).
type Comparison = BoxFuture<'static, (usize, u32, u32, Option<RangeSet>)>;

/// A blob of the pull, as the loop sees it.
struct BlobRun {
    desc: BlobDescriptor,
    state: Option<Arc<BlobState>>,
    digest_rx: Option<tokio::sync::oneshot::Receiver<std::io::Result<Digest>>>,
    running: usize,
    splits: u32,
    races: u32,
    /// Fetches started (the current one included).
    fetches: u32,
    /// The current fetch reopened bytes an earlier pull left.
    resumed: bool,
    /// A resumed fetch did not verify: the blob is fetched from scratch (never resumed).
    restarted: bool,
    /// Fetches of this blob that ended in a digest mismatch and counted as repairs.
    repairs: u32,
    /// The piece hashes of the last fetch that did not verify.
    pieces: Option<Pieces>,
    /// Verified and in place.
    done: bool,
}

impl BlobRun {
    fn new(desc: BlobDescriptor) -> BlobRun {
        BlobRun {
            desc,
            state: None,
            digest_rx: None,
            running: 0,
            splits: 0,
            races: 0,
            fetches: 0,
            resumed: false,
            restarted: false,
            repairs: 0,
            pieces: None,
            done: false,
        }
    }
}

/// The pull's blobs. However the fetch ends (an error, or its future dropped: Ctrl-C),
/// dropping this keeps every unfinished blob's bytes for the next pull — flushed, with
/// their journal — or, without resume, removes its partial file.
struct Runs {
    list: Vec<BlobRun>,
    resume: bool,
}

impl Drop for Runs {
    fn drop(&mut self) {
        for run in self.list.iter().filter(|r| !r.done) {
            let Some(state) = run.state.as_ref() else {
                continue;
            };
            let kept = self.resume && keep_for_resume(state);
            if !kept {
                state.file.discard();
                if let Some(j) = &state.journal {
                    if let Ok(j) = j.lock() {
                        let _ = std::fs::remove_file(j.path());
                    }
                }
            }
        }
    }
}

/// Flushes what a stopped blob has written and journals it (`D`). Returns whether there is
/// anything worth keeping.
fn keep_for_resume(state: &BlobState) -> bool {
    let Some(journal) = &state.journal else {
        return false;
    };
    let written = state.file.written();
    if written.is_empty() {
        return false;
    }
    let flushed = state
        .file
        .flush_data(true)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            journal
                .lock()
                .map_err(|_| "journal lock poisoned".to_string())?
                .record_durable(&written)
                .map_err(|e| e.to_string())
        });
    match flushed {
        Ok(()) => {
            tracing::info!(blob = %state.desc.digest, kept = written.len(), of = state.desc.size, partial = %state.file.partial_path().display(), "partial download kept for resume");
            true
        }
        // The W records (if any) still hold in this boot; the rest is not claimed.
        Err(e) => {
            tracing::warn!(blob = %state.desc.digest, error = %e, "could not flush a partial download; keeping what its journal already says");
            true
        }
    }
}

/// How a blob's fetch ended once its bytes were all written.
enum Finished {
    Verified(Digest, u64),
    /// The digest did not match.
    Mismatch(usize, Digest),
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
            first_byte: self.stats.first_response.get().map(|(at, _, _)| *at),
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
        let mut runs = Runs {
            list: blobs.iter().cloned().map(BlobRun::new).collect(),
            resume: self.options.resume,
        };
        self.fetch_runs(&mut runs.list).await
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
        // Before the transfers, which borrow it.
        let answering = Answering::default();
        let mut lanes = vec![false; max];
        let mut flows: Vec<FlowRun> = Vec::new();
        let mut jobs = FuturesUnordered::new();
        let mut finishing = FuturesUnordered::new();
        let mut comparing: FuturesUnordered<Comparison> = FuturesUnordered::new();
        let mut to_open: VecDeque<usize> = (0..runs.len()).collect();
        let mut no_space: Option<Error> = None;
        let mut last_journal = Instant::now();
        let mut last_durable = Instant::now();
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
                let free: Vec<usize> = (0..lanes.len()).filter(|&l| !lanes[l]).collect();
                let on_origin = |origin: &str| {
                    flows
                        .iter()
                        .filter(|f| f.stats.origin.get().is_some_and(|o| o == origin))
                        .count()
                };
                // An origin that refused requests as too many bounds what goes out before
                // its origin is known, and what a blob's own next piece adds.
                let room = sched.room_for(
                    flows
                        .iter()
                        .filter(|f| f.stats.origin.get().is_none())
                        .count(),
                    on_origin,
                );
                let next_blob = if room { to_open.pop_front() } else { None };
                let (blob, writer, first, lane) = if let Some(b) = next_blob {
                    let size = runs[b].desc.size;
                    let (lane, _) = sched.lane_for(None, &free);
                    let len = if sched.whole_request(size) {
                        size
                    } else {
                        sched.fit(sched.piece_len(None, &infos, None), size)
                    };
                    let opened = match self.open(&mut runs[b], sched.whole_request(size), len) {
                        Err(Error::NoSpace {
                            path,
                            needed,
                            available,
                        }) => {
                            // The others go on (what fits is fetched and kept); the pull
                            // fails at the end, saying how much more was needed.
                            tracing::warn!(blob = %runs[b].desc.digest, needed, "no space for this blob");
                            no_space = Some(match no_space.take() {
                                Some(Error::NoSpace { needed: before, .. }) => Error::NoSpace {
                                    path,
                                    needed: before + needed,
                                    available,
                                },
                                _ => Error::NoSpace {
                                    path,
                                    needed,
                                    available,
                                },
                            });
                            continue;
                        }
                        other => other?,
                    };
                    match opened {
                        Some(writer) => (b, writer, true, lane),
                        None => {
                            // A resumed blob with every byte there already: hash it.
                            let run = &mut runs[b];
                            let state = run
                                .state
                                .clone()
                                .ok_or_else(|| internal("opened blob without state"))?;
                            let rx = run
                                .digest_rx
                                .take()
                                .ok_or_else(|| internal("blob finished twice"))?;
                            state.hasher.poke();
                            finishing.push(finish(b, state, rx, 0, 0));
                            continue;
                        }
                    }
                } else if let Some((b, state)) = runs.iter().enumerate().find_map(|(i, r)| {
                    r.state
                        .as_ref()
                        .filter(|s| room && r.running == 0 && s.file.unassigned() > 0)
                        .map(|s| (i, s.clone()))
                }) {
                    let (lane, lane_rate) = sched.lane_for(state.origin(), &free);
                    let len = sched.fit(
                        sched.piece_len(state.origin(), &infos, lane_rate),
                        state.file.unassigned(),
                    );
                    let writer = state
                        .file
                        .take(len)
                        .ok_or_else(|| internal("no bytes left to take"))?;
                    (b, writer, false, lane)
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
                                races: r.races,
                                prefix: s.file.contiguous_prefix(),
                            })
                        })
                        .collect();
                    let decision = sched.pick(&infos, &blob_infos, on_origin, &free);
                    match decision {
                        None => break,
                        Some(Decision::Piece { blob, len, lane }) => {
                            let state = runs[blob]
                                .state
                                .as_ref()
                                .ok_or_else(|| internal("piece of an unopened blob"))?;
                            let Some(writer) = state.file.take(len) else {
                                break;
                            };
                            (blob, writer, false, lane)
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
                                sched.raced(cut.victim);
                            } else {
                                runs[b].splits += 1;
                            }
                            tracing::debug!(blob = %runs[b].desc.digest, at = cut.at, end = writer.range().end, victim_at = victim.span.position(), race = cut.race, lane = cut.lane, "split");
                            (b, writer, false, cut.lane)
                        }
                    }
                };
                if lanes.get(lane) != Some(&false) {
                    return Err(internal("no free lane"));
                }
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
                jobs.push(self.run_flow((id, lane, first), state, stats, writer, &answering));
            }
            if jobs.is_empty() && finishing.is_empty() && comparing.is_empty() {
                break;
            }
            tokio::select! {
                Some((id, result)) = jobs.next() => {
                    let i = flows.iter().position(|f| f.id == id).ok_or_else(|| internal("unknown flow"))?;
                    let flow = flows.swap_remove(i);
                    lanes[flow.lane] = false;
                    let lane = (!flow.stats.moved.load(Ordering::Relaxed)).then_some(flow.lane);
                    sched.flow_ended(id, flow.stats.origin.get().map(String::as_str), flow.stats.bytes.load(Ordering::Relaxed), lane);
                    result?;
                    let run = &mut runs[flow.blob];
                    run.running -= 1;
                    let state = run.state.clone().ok_or_else(|| internal("finished blob without file"))?;
                    if run.running == 0 && state.file.unassigned() == 0 {
                        // Every byte of the blob is written.
                        let rx = run.digest_rx.take().ok_or_else(|| internal("blob finished twice"))?;
                        state.hasher.poke();
                        let (splits, races) = (run.splits, run.races);
                        finishing.push(finish(flow.blob, state, rx, splits, races));
                    }
                }
                _ = ticker.tick() => {
                    let now = Instant::now();
                    for f in flows.iter_mut().filter(|f| !f.rtt_noted) {
                        if let (Some((_, rtt, exact)), Some(origin)) = (f.stats.first_response.get(), f.stats.origin.get()) {
                            f.rtt_noted = true;
                            sched.first_byte(origin, *rtt, *exact, now);
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
                    for f in &flows {
                        let refusal = f.stats.refused.lock().ok().and_then(|mut r| r.take());
                        if let Some(r) = refusal {
                            sched.refused(&r.origin, r.answering, now);
                        }
                    }
                    sched.tick(now, flows.iter().map(FlowRun::info));
                    if now.duration_since(last_journal) >= JOURNAL_EVERY {
                        last_journal = now;
                        journal_written(runs)?;
                    }
                    if now.duration_since(last_durable) >= DURABLE_EVERY {
                        last_durable = now;
                        journal_durable(runs);
                    }
                }
                Some(result) = finishing.next() => {
                    match result? {
                        Finished::Verified(digest, bytes) => {
                            downloaded += bytes;
                            finished += 1;
                            let b = runs.iter().position(|r| r.desc.digest == digest && !r.done).ok_or_else(|| internal("unknown blob verified"))?;
                            runs[b].done = true;
                            self.layout.forget_partial(&digest, runs[b].desc.size);
                            // Compared with the last fetch that did not verify, in the
                            // background.
                            let good = runs[b].state.as_ref().map(|s| s.file.final_path().to_path_buf());
                            if let (Some(bad), Some(good)) = (runs[b].pieces.take(), good) {
                                let good = Pieces { fetch: runs[b].fetches, hashes: hash_pieces(good, false) };
                                comparing.push(compare(b, runs[b].desc.size, bad, good));
                            }
                            if let Some(w) = self.watch.and_then(|w| w.get(&digest)) {
                                w.verified();
                            }
                            self.reporter.report(EventKind::BlobDone { digest });
                        }
                        Finished::Mismatch(b, actual) => {
                            if runs[b].repairs >= self.options.repair_attempts && !runs[b].resumed {
                                // The pull is about to fail on this blob: first say what
                                // the comparisons still under way found (fetch 1 against 2…).
                                while let Some((c, earlier, later, ranges)) = comparing.next().await {
                                    self.report_differences(&runs[c], earlier, later, ranges.as_ref());
                                }
                            }
                            if let Some(c) = self.refetch(&mut runs[b], b, actual).await? {
                                comparing.push(c);
                            }
                            to_open.push_back(b);
                        }
                    }
                }
                Some((b, earlier, later, ranges)) = comparing.next() => {
                    self.report_differences(&runs[b], earlier, later, ranges.as_ref());
                }
            }
        }
        if let Some(e) = no_space {
            return Err(e);
        }
        if finished != runs.len() {
            return Err(internal("fetch ended with blobs unfinished"));
        }
        tracing::info!(connections = %sched.summary(), "fan-out");
        Ok(downloaded)
    }

    /// Creates a blob's partial file (or reopens what an earlier pull left, if its journal
    /// is believable), its journal and its hasher; returns the writer of its first `len`
    /// missing bytes, `None` if none are missing.
    fn open(&self, run: &mut BlobRun, whole_request: bool, len: u64) -> Result<Option<SpanWriter>> {
        run.fetches += 1;
        run.resumed = false;
        let d = &run.desc;
        // In an archive, the blob's place inside it (no journal: archives are not resumed).
        if let Some(region) = self.layout.region(&d.digest)? {
            return Ok(self.start(run, region, None, whole_request, len));
        }
        let partial = self.layout.partial_path(&d.digest);
        let final_path = self.layout.blob_path(&d.digest);
        let journal_path = Journal::path_for(&partial);
        let resumable = self.options.resume && run.repairs == 0 && !run.restarted;
        if resumable {
            self.layout.adopt_partial(&d.digest, d.size);
        }
        let loaded = if resumable {
            Journal::load(&journal_path, &d.digest, d.size)
        } else {
            None
        };
        let fits = std::fs::metadata(&partial).is_ok_and(|m| m.is_file() && m.len() == d.size);
        let (file, journal) = match loaded {
            Some(l) if fits && !l.present.is_empty() => {
                let file = BlobFile::resume(&partial, &final_path, d.size, &l.present)?;
                tracing::info!(blob = %d.digest, present = l.present.len(), of = d.size, "resuming a partial download");
                run.resumed = true;
                self.reporter.report(EventKind::BlobResumed {
                    digest: d.digest,
                    present: l.present.len(),
                });
                (file, Some(l.journal))
            }
            _ => {
                // The old journal goes first: were the process stopped between the
                // truncation of the partial file and its new journal, an old journal that
                // checks would claim bytes of a zeroed file. (Made durable before the
                // truncation only when there was one: a power cut must not bring it back.)
                if std::fs::remove_file(&journal_path).is_ok() {
                    crate::write::sync_parent(&journal_path)?;
                }
                let file = if self.options.scratch {
                    BlobFile::create_scratch(&partial, &final_path, d.size)?
                } else {
                    BlobFile::create(&partial, &final_path, d.size)?
                };
                crate::stop_hook::reached("fresh", &partial);
                // The journal is an optimisation: without one (a full disk) the blob is
                // fetched as usual, only not kept when the pull stops.
                let journal = if self.options.resume {
                    Journal::create(&journal_path, &d.digest, d.size)
                        .inspect_err(|e| {
                            tracing::warn!(blob = %d.digest, journal = %journal_path.display(), error = %e, "cannot start a resume journal; this blob is not kept if the pull stops");
                            let _ = std::fs::remove_file(&journal_path);
                        })
                        .ok()
                } else {
                    None
                };
                (file, journal)
            }
        };
        if journal.is_some() {
            self.layout.note_partial(&d.digest, d.size);
        }
        Ok(self.start(run, file, journal, whole_request, len))
    }

    /// Sets up the blob's state (hasher, journal) over its opened file; returns the writer
    /// of its first `len` missing bytes.
    fn start(
        &self,
        run: &mut BlobRun,
        file: Arc<BlobFile>,
        journal: Option<Journal>,
        whole_request: bool,
        len: u64,
    ) -> Option<SpanWriter> {
        let d = &run.desc;
        let writer = file.take(len);
        let watch = self.watch.and_then(|w| w.get(&d.digest));
        if let Some(w) = watch {
            w.opened(file.clone());
        }
        let follower = watch.map(|w| w.clone() as Arc<dyn PrefixConsumer>);
        let (hasher, rx) =
            InOrderHasher::with_follower(file.clone(), self.hash_pool.clone(), follower);
        // A resumed file already holds a prefix: hash it now, while the missing bytes
        // download, not once the first of them lands (or the last, if it is at the end).
        let resumed_prefix = file.contiguous_prefix();
        if resumed_prefix > 0 {
            tracing::debug!(blob = %d.digest, prefix = resumed_prefix, "hashing the bytes already there while the rest downloads");
            hasher.poke();
        }
        run.state = Some(Arc::new(BlobState {
            desc: d.clone(),
            file,
            hasher,
            url: Mutex::new(self.registry.blob_url(&d.digest)),
            downloaded: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            whole_request,
            origin: OnceLock::new(),
            journal: journal.map(Mutex::new),
            flushing: AtomicBool::new(false),
        }));
        run.digest_rx = Some(rx);
        writer
    }

    /// A fetch of `run` (blob `b`) ended with the wrong digest: sets it up to be fetched
    /// again from scratch, or fails the pull when it has had its repairs. A fetch that
    /// resumed bytes an earlier pull left is fetched again without counting as a repair:
    /// the journal or the partial file lied, not the registry. Returns the comparison of
    /// this fetch with the previous failed one, to be reported when it is ready.
    async fn refetch(
        &self,
        run: &mut BlobRun,
        b: usize,
        actual: Digest,
    ) -> Result<Option<Comparison>> {
        let resumed = run.resumed;
        let comparison = self.set_aside(run, b)?;
        let expected = run.desc.digest;
        if resumed {
            run.restarted = true;
            tracing::warn!(blob = %expected, got = %actual, "the bytes an earlier pull left did not verify (its journal or partial file was wrong); fetching the blob again from scratch (not a repair)");
            self.reporter.report(EventKind::BlobRestarting {
                digest: expected,
                actual,
            });
            return Ok(comparison);
        }
        if run.repairs >= self.options.repair_attempts {
            // The pull fails: say which pieces the last two fetches differed in first.
            let mut what = format!("blob {expected} (fetched {} times)", run.fetches);
            if let Some(c) = comparison {
                let (_, earlier, later, ranges) = c.await;
                if let Some(r) = &ranges {
                    what = format!(
                        "blob {expected} (fetched {} times; {})",
                        run.fetches,
                        differed_text(earlier, later, r)
                    );
                }
                self.report_differences(run, earlier, later, ranges.as_ref());
            }
            return Err(Error::DigestMismatch {
                what,
                expected,
                actual,
            });
        }
        run.repairs += 1;
        tracing::warn!(blob = %expected, got = %actual, attempt = run.repairs, of = self.options.repair_attempts, "digest mismatch; fetching the blob again");
        self.reporter.report(EventKind::BlobRepairing {
            digest: expected,
            actual,
            attempt: run.repairs,
        });
        Ok(comparison)
    }

    /// Puts a fetch that did not verify aside: its journal removed, its bytes hashed in
    /// pieces in the background (not a region of an archive: its bytes stay in place, to
    /// be overwritten) and compared with the previous failed fetch's, its state reset.
    fn set_aside(&self, run: &mut BlobRun, b: usize) -> Result<Option<Comparison>> {
        let state = run
            .state
            .take()
            .ok_or_else(|| internal("repair of an unopened blob"))?;
        if let Some(j) = &state.journal {
            if let Ok(j) = j.lock() {
                let _ = std::fs::remove_file(j.path());
            }
        }
        if let Some(w) = self.watch.and_then(|w| w.get(&run.desc.digest)) {
            w.abandoned();
        }
        // One name per fetch: an earlier fetch's hashing may still be removing its own.
        let bad = state
            .file
            .partial_path()
            .with_extension(format!("bad-{}", run.fetches));
        let moved =
            !state.file.is_region() && std::fs::rename(state.file.partial_path(), &bad).is_ok();
        state.file.discard();
        let this = moved.then(|| Pieces {
            fetch: run.fetches,
            hashes: hash_pieces(bad, true),
        });
        let comparison = match (run.pieces.take(), &this) {
            (Some(before), Some(this)) => Some(compare(
                b,
                run.desc.size,
                before,
                Pieces {
                    fetch: this.fetch,
                    hashes: this.hashes.clone(),
                },
            )),
            _ => None,
        };
        run.pieces = this;
        run.digest_rx = None;
        run.running = 0;
        run.splits = 0;
        run.races = 0;
        run.resumed = false;
        Ok(comparison)
    }

    /// Says which pieces two fetches of `run` differed in (a warning and an event).
    fn report_differences(
        &self,
        run: &BlobRun,
        earlier: u32,
        later: u32,
        ranges: Option<&RangeSet>,
    ) {
        let Some(ranges) = ranges else {
            return;
        };
        tracing::warn!(
            blob = %run.desc.digest,
            earlier,
            later,
            differing_bytes = ranges.len(),
            ranges = %ranges_text(ranges),
            "byte ranges that differed between two fetches of a blob that failed its digest"
        );
        self.reporter.report(EventKind::BlobDiffered {
            digest: run.desc.digest,
            earlier,
            later,
            ranges: ranges.iter().cloned().collect(),
        });
    }

    /// Runs transfer `id` on `lane` (`first`: the blob's first).
    async fn run_flow(
        &self,
        (id, lane, first): (u64, usize, bool),
        state: Arc<BlobState>,
        stats: Arc<FlowStats>,
        writer: SpanWriter,
        answering: &Answering,
    ) -> (u64, Result<()>) {
        let flow = Flow {
            blob: &state,
            stats: &stats,
            answering,
            first,
            lane,
        };
        (id, self.transfer(flow, writer).await)
    }
}

/// Appends `W` records for what each unfinished blob has written since the last time. A
/// journal that cannot be appended to (a full disk) is left as it is, with a warning: the
/// journal is an optimisation, and the pull goes on.
fn journal_written(runs: &[BlobRun]) -> Result<()> {
    for run in runs.iter().filter(|r| !r.done) {
        let Some(state) = run.state.as_ref() else {
            continue;
        };
        let Some(journal) = &state.journal else {
            continue;
        };
        let written = state.file.written();
        let mut j = journal
            .lock()
            .map_err(|_| internal("journal lock poisoned"))?;
        if let Err(e) = j.record_written(&written) {
            tracing::warn!(blob = %state.desc.digest, journal = %j.path().display(), error = %e, "cannot append to the resume journal; it keeps claiming only what it claimed before");
        }
    }
    Ok(())
}

/// Flushes each unfinished blob that grew since its last flush and journals what the flush
/// covers (`D`), on a blocking thread, one flush per blob at a time.
fn journal_durable(runs: &[BlobRun]) {
    for run in runs.iter().filter(|r| !r.done) {
        let Some(state) = run.state.as_ref() else {
            continue;
        };
        let Some(journal) = &state.journal else {
            continue;
        };
        let durable = journal.lock().map_or(u64::MAX, |j| j.durable());
        let written = state.file.written();
        if written.len() <= durable || state.flushing.swap(true, Ordering::AcqRel) {
            continue;
        }
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let r = state.file.flush_data(false).and_then(|()| {
                let journal = state
                    .journal
                    .as_ref()
                    .ok_or_else(|| internal("journal went away"))?;
                let mut j = journal
                    .lock()
                    .map_err(|_| internal("journal lock poisoned"))?;
                j.record_durable(&written)
                    .map_err(|e| Error::io("append to", j.path(), e))
            });
            if let Err(e) = r {
                tracing::debug!(blob = %state.desc.digest, error = %e, "durable checkpoint failed");
            }
            state.flushing.store(false, Ordering::Release);
        });
    }
}

/// sha256 of each [`REPAIR_PIECE`] of a file.
fn piece_hashes(path: &std::path::Path) -> std::io::Result<Vec<[u8; 32]>> {
    use sha2::Digest as _;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; REPAIR_PIECE as usize];
    let mut out = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return Ok(out);
        }
        out.push(sha2::Sha256::digest(&buf[..n]).into());
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// Hashes `path` in [`REPAIR_PIECE`]s on a blocking thread (removing it after, if asked).
fn hash_pieces(path: std::path::PathBuf, remove: bool) -> PieceHashes {
    let task = tokio::task::spawn_blocking(move || {
        let pieces = piece_hashes(&path);
        if remove {
            let _ = std::fs::remove_file(&path);
        }
        pieces
    });
    async move { task.await.ok()?.ok().map(Arc::new) }
        .boxed()
        .shared()
}

/// Compares two fetches of blob `b` (`size` bytes) piece by piece, once both are hashed.
fn compare(b: usize, size: u64, earlier: Pieces, later: Pieces) -> Comparison {
    async move {
        let (x, y) = futures::join!(earlier.hashes, later.hashes);
        let ranges = match (x, y) {
            (Some(x), Some(y)) => Some(differing(&x, &y, size)),
            _ => None,
        };
        (b, earlier.fetch, later.fetch, ranges)
    }
    .boxed()
}

/// The byte ranges of the pieces whose hashes differ (a piece one side lacks differs).
fn differing(x: &[[u8; 32]], y: &[[u8; 32]], size: u64) -> RangeSet {
    (0..x.len().max(y.len()))
        .filter(|&i| x.get(i) != y.get(i))
        .map(|i| {
            let start = i as u64 * REPAIR_PIECE;
            start..(start + REPAIR_PIECE).min(size)
        })
        .filter(|r| r.start < r.end)
        .collect()
}

/// `a-b,c-d` (inclusive, as in an HTTP Range), or `none`.
fn ranges_text(ranges: &RangeSet) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// What two fetches' comparison says, for the error that ends a pull.
fn differed_text(earlier: u32, later: u32, ranges: &RangeSet) -> String {
    if ranges.is_empty() {
        format!("fetches {earlier} and {later} were the same, byte for byte: the source sends these bytes every time")
    } else {
        format!(
            "fetches {earlier} and {later} differed in bytes {} ({} bytes)",
            ranges_text(ranges),
            ranges.len()
        )
    }
}

/// Waits for the digest, compares it, and gives a verified blob its final name.
async fn finish(
    blob: usize,
    s: Arc<BlobState>,
    rx: tokio::sync::oneshot::Receiver<std::io::Result<Digest>>,
    splits: u32,
    races: u32,
) -> Result<Finished> {
    let path = s.file.final_path().to_path_buf();
    crate::stop_hook::reached("hash", &path);
    let actual = rx
        .await
        .map_err(|_| internal("hasher went away"))?
        .map_err(|e| Error::io("hash", &path, e))?;
    if actual != s.desc.digest {
        return Ok(Finished::Mismatch(blob, actual));
    }
    let file = s.file.clone();
    tracing::debug!(blob = %s.desc.digest, "hashed; persisting");
    tokio::task::spawn_blocking(move || file.persist())
        .await
        .map_err(|e| Error::io("persist", &path, std::io::Error::other(e.to_string())))??;
    if let Some(j) = &s.journal {
        if let Ok(j) = j.lock() {
            let _ = std::fs::remove_file(j.path());
        }
    }
    let bytes = s.downloaded.load(Ordering::Relaxed);
    tracing::info!(
        blob = %s.desc.digest,
        bytes,
        requests = s.requests.load(Ordering::Relaxed),
        splits,
        races,
        "verified and in place"
    );
    Ok(Finished::Verified(s.desc.digest, bytes))
}

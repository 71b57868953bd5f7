//! The range policy, in one place: how many connections each origin gets, which running
//! transfer gives up part of its span to an idle connection, and where it is cut.
//!
//! Why this shape. A puller cannot know up front whether an origin caps each connection (a
//! CDN's per-connection limiter), caps the sum (a saturated link, a busy CPU), or lets a burst
//! through first (token buckets, nginx's send chunks, `limit_rate_after`, TCP buffers). Any
//! decision taken from one short sample and kept for the pull will meet the world that fools
//! it. So nothing here is decided once:
//!
//! - **Pieces sized by the rate, then work stealing.** A blob's first request asks for a
//!   few minimum pieces; after that a connection asks for the next piece nobody has, sized
//!   to take about [`PIECE_TIME`] (and at least [`PIECE_RTTS`] round trips) at the rate
//!   connections to that origin get now (four times as long where the controller found that
//!   more connections do not pay: a piece of an uncapped origin is a hundred MB, of a capped
//!   one a few); that rate is the flows' sampled one, or what each connection got in the
//!   recent windows if more (on a fast origin, pieces too short to sample would leave only
//!   the ones that stalled to say what a connection gets), so requests stay few
//!   where the link is fast and pieces arrive nearly in order, which lets the in-order
//!   hasher follow close behind. When a blob has no unassigned bytes left, a free
//!   connection cuts the running transfer that would finish *last* (remaining bytes over
//!   its measured rate) where both should finish together, and takes the upper part (work
//!   stealing in the manner of aria2 and axel; closed ranges; never below the minimum
//!   piece). Blobs under two pieces are one request; a server that answers a range with
//!   the whole blob is never cut.
//! - **Connections only while they pay.** Each origin has a controller that measures its
//!   aggregate goodput over windows of a few round trips. It starts at [`INITIAL_LIMIT`]
//!   connections, grows (×4 from the start or while each added connection brings nearly what
//!   the others do, else ×2) after each window in which the added connections raised the
//!   goodput by at least [`MIN_GAIN`] of what the connections already there delivered each,
//!   and falls back to where the goodput stopped rising when two windows in a row say they
//!   did not. A step that clearly paid (bytes in every tick, its connections mostly there,
//!   each bringing nearly what those before it did) is judged after half a window, which on
//!   a far origin is a round trip and a half sooner; every other verdict, and the baseline
//!   the first step is judged against, waits for the whole window. The evidence is guarded
//!   against the noise a short window carries: a window with long silences (a limiter
//!   sending in bursts, a stall of our own) is stretched until
//!   it averages over them; a step is judged against the median of what fewer connections
//!   recently got, not one window that may have come out low; a long step that did not pay
//!   is tried again halfway before falling back (new connections may still have been getting
//!   going, or the knee lies between); a step that has barely begun (little work to cut yet)
//!   while the goodput stays far below its reference for two windows gives no verdict and is
//!   judged from there on, since a shared bottleneck stays flat and only the end of a burst
//!   does that. After a fall back it holds for a while and then probes
//!   again, and the hold ends at once when the origin delivers less than half of what it did
//!   when the verdict was taken (a limiter's burst ran out): a verdict lasts only as long as
//!   the world it was taken in. (The sum, not each connection's share, which also falls while
//!   the connections above a lowered limit finish their pieces on a shared link.) On a
//!   per-connection cap every added connection adds its share and the pull fans out fully; on
//!   an uncapped origin the goodput stays flat and the pull keeps a few long requests.
//! - **Round trips measured, not guessed.** Windows, pieces and cuts scale with the origin's
//!   round trip: the first response on a connection already open measures it exactly, and
//!   so does one on a fresh TLS connection, counted from the handshake's end; until one
//!   comes, a fresh plain connection's first response counts half its time (it waited for
//!   the TCP handshake as well), so a far origin's first windows are not twice as long as
//!   they should be.
//! - **Stragglers are raced.** Near the end, when nothing is left worth halving, a transfer
//!   [`STRAGGLER`] times slower than the origin's typical connection, whose tail would still
//!   take much longer than a fresh connection needs for it, gives the tail away: the cut is
//!   put just past where it will be when the new request's first byte arrives (two round
//!   trips at its rate) and past what its socket may hold, which for a connection that
//!   trickles is next to nothing: it keeps a few bytes, and one that has stopped keeps none
//!   (its transfer ends without waiting for them, wherever it waits). A blob is raced at
//!   most [`MAX_RACES_PER_BLOB`] times, and only transfers that delivered something.
//!   Before the end too: while its blob still has bytes to hand out, a transfer measured
//!   [`EARLY_STRAGGLER`] times slower than a new connection would be is cut before the next
//!   piece goes out (the one the blob's hash waits for first), since every byte above it
//!   waits for it to be hashed, and at the end that hashing is what the pull waits for;
//!   raced (it keeps next to nothing) when even a minimum piece would keep it longer than
//!   the new connection needs for the rest, at most [`MAX_EARLY_RACES_PER_BLOB`] times a
//!   blob, else split.
//! - **A lane remembers its connection's rate.** Each lane keeps its connection, and with
//!   it the connection's path and the server's per-connection limiter, so what its last
//!   measured transfer from an origin got is what it will likely get again: a free lane
//!   measured fast goes first, then one not measured, then slow ones; a piece on a lane
//!   slower than the origin's typical connection is sized to take it no longer than the
//!   others take theirs, and a cut or a race on it counts on the lane's rate, not the
//!   origin's. Each measured transfer replaces what the lane knew, and what it knew is
//!   forgotten after [`LANE_MEMORY`] (a lane given work last is rarely measured again, and
//!   its connection or path may have changed).
//! - **A refusal is a limit.** An origin that refuses a request as one too many (429 or 503
//!   without `Retry-After`: nginx's `limit_conn`, an object store's "slow down") while it is
//!   answering others of ours allows no more at once than those, whatever the goodput says:
//!   the limit falls to them at once and holds. The hold ends with a probe like any other;
//!   a probe that is refused doubles the next hold (up to 2^([`MAX_REFUSED_HOLD`] − 1) holds),
//!   so a server that keeps saying no is asked less and less often. The refused transfer
//!   waits for one of that origin's answers to us to end and asks again, without spending a
//!   retry (`fetch::transfer`), up to `MAX_REFUSED_WAITS` times in a row without a byte (a
//!   request refused for good while the origin answers the rest must still end); a refusal
//!   while the origin answers none of ours is an error like any other (retried with back-off; a `Retry-After` is honoured). While a refusing
//!   origin's limit is full, new blobs wait too: where a blob's bytes come from is known only
//!   after the registry's redirect, and one CDN usually serves them all. `--fan-out max`
//!   keeps every allowed connection busy whatever the origin says (the user asked for
//!   that): there, refused transfers only wait their turn.
//!
//! The scheduler only decides; `fetch` carries its decisions out (and [`crate::write`] makes
//! a cut safe while the victim is still writing).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::write::SpanRef;

/// Connections an origin gets before any measurement.
pub(crate) const INITIAL_LIMIT: usize = 4;
/// Share of the per-connection goodput that each added connection must add for the
/// controller to keep growing.
pub(crate) const MIN_GAIN: f64 = 0.3;
/// Share of the per-connection goodput that added connections bring when the origin caps
/// each connection: the controller then grows faster.
pub(crate) const LINEAR_GAIN: f64 = 0.7;
/// Cuts land on multiples of this (but a race's cut less than this ahead of its victim).
const ALIGN: u64 = 64 << 10;
/// A transfer is cut only if it would take longer than this (seconds) to finish alone.
const MIN_CUT_TIME: f64 = 0.1;
/// A race cuts past where the victim will be when the new request's bytes come (two round
/// trips at its rate), and past what its socket may hold already: this much...
const RACE_AHEAD: u64 = 256 << 10;
/// ...or what the victim gets in this time (seconds), if that is less: a connection that
/// trickles holds next to nothing in its socket, and every byte left to it costs seconds.
const RACE_AHEAD_TIME: f64 = 0.05;
/// A transfer that brought no bytes for this long (or four round trips, if longer) has
/// stopped: a race leaves it nothing.
const SILENT: Duration = Duration::from_millis(120);
/// Races of one blob's stragglers at most.
const MAX_RACES_PER_BLOB: u32 = 16;
/// Of those, races before the blob's last bytes are handed out
/// ([`Scheduler::early_straggler`]) at most: the rest stay for the end.
const MAX_EARLY_RACES_PER_BLOB: u32 = MAX_RACES_PER_BLOB / 2;
/// How long what a lane's last measured transfer from an origin got still counts: a lane
/// measured slow is given work last, so it is rarely measured again, and its connection may
/// since have been replaced, or its path have changed.
const LANE_MEMORY: Duration = Duration::from_secs(2);
/// Rates of ended connections an origin's typical rate also counts (the newest).
const ENDED_RATES: usize = 8;
/// Samples an ended connection's rate needs to count (the first holds no rate).
const ENDED_SAMPLES: u32 = 3;
/// A straggler is this many times slower than the origin's typical connection.
const STRAGGLER: f64 = 3.0;
/// The same for a transfer cut while its blob still has bytes to hand out
/// ([`Scheduler::early_straggler`]), and for a lane that is not to be preferred: told apart
/// with less margin, since its bytes hold the blob's hash back, and a wrong call costs one
/// request.
const EARLY_STRAGGLER: f64 = 2.0;
/// A window with long silences is stretched up to this many windows before a verdict.
const MAX_STRETCH: u32 = 4;
/// A hold after the origin refused requests lasts up to 2^(this - 1) ordinary holds.
const MAX_REFUSED_HOLD: u32 = 5;
/// A step to more than this many times the connections that did not pay is tried again
/// halfway before falling back.
const BISECT_ABOVE: f64 = 2.5;
/// A hold ends early when the origin delivers less than this share of what it did when the
/// hold began.
const HOLD_DROP: f64 = 0.5;
/// Two windows in a row early in a step whose goodput falls below this share of the
/// reference's give no verdict: the reference saw a burst that has run out.
const COLLAPSE: f64 = 0.7;
/// A step is early while its connections have made less than this share of the way to
/// the new limit.
const STEP_DONE: f64 = 0.5;
/// Windows of history a step is judged against.
const HISTORY_WINDOWS: u32 = 8;
/// Shortest interval a flow's rate is measured over.
const RATE_DT: Duration = Duration::from_millis(40);
/// How long a piece should take at the rate transfers get.
const PIECE_TIME: Duration = Duration::from_millis(250);
/// The same, on an origin whose controller found more connections do not pay.
const HOLDING_PIECE_TIME: Duration = Duration::from_millis(1000);

/// A piece lasts at least this many round trips to its origin, so the idle round trip of
/// each request costs a far origin under a tenth of its time.
const PIECE_RTTS: u32 = 10;
/// A blob's first request, before any rate is known, asks for this many minimum pieces.
pub(crate) const FIRST_PIECES: u64 = 8;
/// Rate samples (ticks) a transfer needs before it can be called a straggler.
const RACE_SAMPLES: u32 = 6;

/// How eagerly blobs are split over connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FanOut {
    /// Add connections to an origin while its aggregate goodput keeps rising (default).
    #[default]
    Auto,
    /// Every allowed connection at once, without measuring, in pieces of exactly the
    /// minimum piece size (`--chunk-size`) handed out in order, as a fixed-chunk
    /// downloader would (for networks known to cap each connection). No tail racing.
    Max,
}

/// What the scheduler knows of one running transfer.
#[derive(Clone, Copy)]
pub(crate) struct FlowInfo<'a> {
    /// Its id (stable for its life).
    pub id: u64,
    /// Which blob.
    pub blob: usize,
    /// Its span.
    pub span: &'a SpanRef,
    /// `scheme://host:port` it is reading from, once known.
    pub origin: Option<&'a str>,
    /// Bytes it has received so far.
    pub bytes: u64,
    /// When its first byte came (None: still waiting).
    pub first_byte: Option<Instant>,
    /// Whether it may be cut (its server answered a range with a range).
    pub splittable: bool,
}

/// What the scheduler knows of one blob that has started.
#[derive(Clone, Copy)]
pub(crate) struct BlobInfo<'a> {
    /// Which blob.
    pub blob: usize,
    /// Bytes no transfer has been handed yet.
    pub unassigned: u64,
    /// Transfers running for it.
    pub running: usize,
    /// The origin its bytes come from, once its first response said.
    pub origin: Option<&'a str>,
    /// Straggler tails raced so far.
    pub races: u32,
    /// Bytes written from its start without a gap: what its hash has, or can have, read.
    pub prefix: u64,
}

/// What a free connection should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Fetch the next `len` unassigned bytes of `blob`, on `lane`.
    Piece { blob: usize, len: u64, lane: usize },
    /// Take over part of a running transfer.
    Cut(Cut),
}

/// A decision: cut flow `victim` at `at`; the new connection, on `lane`, fetches from `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cut {
    pub victim: u64,
    pub at: u64,
    pub race: bool,
    pub lane: usize,
}

/// Per-flow measurements.
#[derive(Debug, Clone, Copy)]
struct Rate {
    last_bytes: u64,
    last_at: Instant,
    /// Bytes already counted in the origin's goodput.
    counted: u64,
    /// bytes/s, smoothed; None until a full tick of data.
    rate: Option<f64>,
    /// Samples taken.
    samples: u32,
    raced: bool,
    /// The last sample that brought bytes.
    progress_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Measuring where we stand.
    Baseline,
    /// Waiting for the connections just added to get going.
    Settling { until: Instant },
    /// Measuring the step just taken against `base`.
    Measuring,
    /// Growth did not pay; measuring only, until `until`.
    Holding { until: Instant },
}

/// One origin's connection controller.
#[derive(Debug, Clone)]
struct Controller {
    limit: usize,
    phase: Phase,
    /// Goodput (bytes/s) and mean connections of the window before the last step.
    base: Option<(f64, f64)>,
    win_start: Instant,
    win_bytes: u64,
    win_n: f64,
    win_ticks: u32,
    /// The round trip (and the server's think time): the smallest exact sample (a request
    /// on a connection already open), else the smallest estimate (see
    /// [`crate::http::Exchange::round_trip`]).
    rtt: Option<Duration>,
    /// Whether `rtt` is from an exact sample.
    rtt_exact: bool,
    /// The median rate of this origin's connections, live and [`ENDED_RATES`] recently
    /// ended, last taken while at least three were measured: what a new connection can
    /// expect, even at the end of a pull when only the stragglers are left (whose rates
    /// alone would say the origin is as slow as they are).
    typical: Option<f64>,
    /// The last rates of connections that ended, newest last.
    ended: std::collections::VecDeque<f64>,
    /// Ticks of the window in which bytes came.
    win_busy: u32,
    /// The goodput of a window that said the last step did not pay, waiting for a second
    /// window to confirm it.
    doubt: Option<f64>,
    /// The origin's goodput when the controller last decided to hold.
    held: f64,
    /// Trying the middle of a long step that did not pay.
    bisecting: bool,
    /// The last window, early in a step, came out far below the step's reference.
    collapsed: bool,
    /// Recent windows: when each ended, its mean connections and its goodput.
    history: std::collections::VecDeque<(Instant, f64, f64)>,
    /// Steps taken and fallen back (for the log).
    grew: u32,
    fell: u32,
    /// Times the origin refused requests as too many (429, 503): each such episode doubles
    /// the hold that follows it, up to [`MAX_REFUSED_HOLD`] holds.
    refusals: u32,
    /// When the last refusal came (refusals within a window are one episode).
    refused_at: Option<Instant>,
    /// The limit the last refusal left: what the origin is known to answer.
    answered: usize,
}

impl Controller {
    fn new(now: Instant) -> Controller {
        Controller {
            limit: INITIAL_LIMIT,
            // The first window would measure connections still starting up.
            phase: Phase::Settling {
                until: now + Duration::from_millis(20),
            },
            base: None,
            win_start: now,
            win_bytes: 0,
            win_n: 0.0,
            win_ticks: 0,
            rtt: None,
            rtt_exact: false,
            win_busy: 0,
            typical: None,
            ended: std::collections::VecDeque::new(),
            doubt: None,
            history: std::collections::VecDeque::new(),
            bisecting: false,
            collapsed: false,
            held: 0.0,
            grew: 0,
            fell: 0,
            refusals: 0,
            refused_at: None,
            answered: 0,
        }
    }

    /// The origin refused a request as one too many (429 or 503) while `delivering` of our
    /// transfers to it were being answered: it allows at most those at once, whatever the
    /// goodput said. The limit falls to them at once, and holds; the hold ends as any hold
    /// does, with a probe (the server may have been busy with other clients), and doubles
    /// each time a probe above what the origin answered is refused (a server that refuses
    /// again when probed is probed less often). A refusal at or below that (a slot the
    /// server had not let go of yet: a cut transfer's connection lingers there until its next
    /// write fails) lowers the limit and starts the hold again at the same length.
    fn refused(&mut self, now: Instant, delivering: usize, origin: &str) {
        let since = self.refused_at.map(|t| now.duration_since(t));
        // Long enough without a refusal, and what was learnt is forgotten: holds start short.
        if since.is_some_and(|d| d > self.hold() * (1 << MAX_REFUSED_HOLD)) {
            self.refusals = 0;
        }
        let new_episode = since.is_none_or(|d| d > self.window());
        if new_episode && (self.refusals == 0 || self.limit > self.answered) {
            self.refusals += 1;
        }
        self.refused_at = Some(now);
        // Before any measurement the limit is a guess (a connection per blob and a few
        // more): the origin just answered `delivering`. After, the goodput's verdict stands
        // unless the origin allows fewer.
        let to = delivering.max(1);
        if self.base.is_none() || to < self.limit {
            self.fell += u32::from(to < self.limit);
            self.limit = to;
        }
        self.answered = self.limit;
        self.doubt = None;
        self.bisecting = false;
        self.collapsed = false;
        // The goodput under the new limit is what holds now: no early end for its fall.
        self.held = 0.0;
        let times = 1u32 << (self.refusals.clamp(1, MAX_REFUSED_HOLD) - 1);
        self.phase = Phase::Holding {
            until: now + self.hold() * times,
        };
        self.restart_window(now);
        tracing::debug!(%origin, delivering, limit = self.limit, episodes = self.refusals, "fan-out: the origin refused a request as too many; holding");
    }

    fn rtt(&self) -> Duration {
        self.rtt.unwrap_or(Duration::from_millis(20))
    }

    /// A measurement window: a few round trips, at least 50 ms, at most 1 s.
    fn window(&self) -> Duration {
        (self.rtt() * 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// The shortest window a step may be judged paid in, when the evidence is clear
    /// ([`Controller::clearly_paid`]): half the usual, at least one round trip and a half.
    fn early_window(&self) -> Duration {
        (self.rtt() * 3 / 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Whether the step being measured has clearly paid already, `elapsed` into its window:
    /// the window is [`Controller::early_window`] long at least and had bytes in every tick
    /// (no limiter's pauses, no stall of ours), the step's connections are mostly there, and
    /// each added one brings nearly what those before it did (a per-connection cap). Only a
    /// step that paid is judged early: the full window's evidence is what a fall back, a
    /// bisection or a hold waits for. (On a far origin each step costs its connections two
    /// round trips to start and a window of three to judge; a clear gain needs less.)
    fn clearly_paid(&self, elapsed: Duration) -> bool {
        let Some(base @ (_, n0)) = self.base else {
            return false;
        };
        if self.phase != Phase::Measuring
            || self.bisecting
            || elapsed < self.early_window()
            || self.win_busy < self.win_ticks
        {
            return false;
        }
        let g = self.win_bytes as f64 / elapsed.as_secs_f64();
        let n = self.win_n / f64::from(self.win_ticks);
        let g0 = self.reference(base);
        let per = g0 / n0.max(1.0);
        n >= n0 + 1.0
            && n >= n0 + STEP_DONE * (self.limit as f64 - n0)
            && (g - g0) / (n - n0) >= LINEAR_GAIN * per
    }

    fn settle(&self) -> Duration {
        (self.rtt() * 2).clamp(Duration::from_millis(20), Duration::from_millis(500))
    }

    fn hold(&self) -> Duration {
        (self.window() * 6).max(Duration::from_millis(800))
    }

    /// The goodput a step is judged against: the reference window's, or, if higher, the
    /// median of what the origin delivered with no more connections than the reference had
    /// in the last few windows. One window that came out low (a stall of our own, blobs
    /// between requests) must not make the next step look as if it paid. (The reference
    /// window is in the history as well, so it counts twice in that median: a low reference
    /// among few windows is lifted less than the rule above says. Counting it once made no
    /// difference that ten interleaved uncapped pulls could show, so it stays as measured.)
    fn reference(&self, (g0, n0): (f64, f64)) -> f64 {
        let mut seen: Vec<f64> = self
            .history
            .iter()
            .filter(|&&(_, n, _)| n <= n0 + 0.5)
            .map(|&(_, _, g)| g)
            .collect();
        seen.push(g0);
        seen.sort_by(f64::total_cmp);
        g0.max(seen[seen.len() / 2])
    }

    /// What each delivering connection got in the recent windows (the median over them of
    /// goodput per connection): unlike the flows' own rates, this counts pieces too short to
    /// be sampled.
    fn window_rate(&self) -> Option<f64> {
        let mut per: Vec<f64> = self
            .history
            .iter()
            .filter(|&&(_, n, _)| n >= 0.5)
            .map(|&(_, n, g)| g / n)
            .collect();
        per.sort_by(f64::total_cmp);
        per.get(per.len() / 2).copied()
    }

    fn restart_window(&mut self, now: Instant) {
        self.win_start = now;
        self.win_bytes = 0;
        self.win_n = 0.0;
        self.win_ticks = 0;
        self.win_busy = 0;
    }

    /// Whether the origin refused a request as too many recently enough that what it
    /// answered still counts: as long as [`Controller::refused`] remembers the episodes.
    fn refusing(&self, now: Instant) -> bool {
        self.refused_at
            .is_some_and(|t| now.duration_since(t) <= self.hold() * (1 << MAX_REFUSED_HOLD))
    }

    /// A probe's step up from `n` connections: half as many again, at least 2 more.
    fn probe_above(n: usize) -> usize {
        n + (n / 2).max(2)
    }

    /// Raises the limit from `n` connections: ×4 when few, or when the last step showed
    /// every added connection bringing nearly as much as those before (a per-connection
    /// cap), else ×2. An origin that has refused requests as too many is approached as a
    /// hold's end probes it: at most half as many again as it answered (or as `n`, if more),
    /// and at least two more. (Seen at the end of a pull under an emulator: a step from one
    /// connection to two paid, and the limit went ×4 to 8 against an origin that had refused
    /// all but 3; a pull with blobs still to start would have sent 8 requests, and had 5 of
    /// them refused.)
    fn grow(&mut self, max: usize, n: f64, linear: bool, now: Instant) {
        let n = n.round().max(1.0) as usize;
        let mut to = if n <= INITIAL_LIMIT || linear {
            n * 4
        } else {
            n * 2
        };
        if self.refusing(now) {
            to = to.min(Controller::probe_above(n.max(self.answered)));
        }
        self.limit = to.max(self.limit).min(max).max(1);
    }

    /// One tick's worth: `bytes` received by `n` connections that were delivering.
    fn tick(&mut self, now: Instant, bytes: u64, n: usize, max: usize, origin: &str) {
        if let Phase::Settling { until } = self.phase {
            if now >= until {
                self.phase = if self.base.is_some() {
                    Phase::Measuring
                } else {
                    Phase::Baseline
                };
                self.restart_window(now);
            }
            return;
        }
        self.win_bytes += bytes;
        self.win_n += n as f64;
        self.win_ticks += 1;
        if bytes > 0 {
            self.win_busy += 1;
        }
        let elapsed = now.duration_since(self.win_start);
        if self.win_ticks < 3 || (elapsed < self.window() && !self.clearly_paid(elapsed)) {
            return;
        }
        // Bytes in most ticks: the window measured a flow. A window with long silences (a
        // limiter sending in bursts, such as nginx's 2 MiB send chunks, each followed by a
        // pause; or our own process starved of CPU) is too short to say what more
        // connections bring: when it is to judge a step, it goes on, up to MAX_STRETCH
        // windows, until it averages over the bursts, and the verdict is taken on the whole.
        // (A baseline needs no verdict: the first step is taken anyway.)
        let clean = self.win_busy * 4 >= self.win_ticks * 3;
        if !clean && self.phase == Phase::Measuring && elapsed < self.window() * MAX_STRETCH {
            return;
        }
        let g = self.win_bytes as f64 / elapsed.as_secs_f64();
        let n_avg = self.win_n / self.win_ticks as f64;
        let (busy, ticks) = (self.win_busy, self.win_ticks);
        self.restart_window(now);
        if n_avg < 0.5 {
            return; // nothing was flowing: no information
        }
        let g_ref = self.base.map(|b| self.reference(b));
        self.history.push_back((now, n_avg, g));
        let keep = self.window() * HISTORY_WINDOWS;
        while self
            .history
            .front()
            .is_some_and(|&(t, _, _)| now.duration_since(t) > keep)
        {
            self.history.pop_front();
        }
        match self.phase {
            Phase::Baseline => {
                self.base = Some((g, n_avg));
                if self.limit < max {
                    self.grow(max, n_avg.max(self.limit as f64), false, now);
                    self.grew += 1;
                    self.phase = Phase::Settling {
                        until: now + self.settle(),
                    };
                    tracing::debug!(%origin, mb_per_s = g / 1e6, connections = n_avg, limit = self.limit, "fan-out: probing more connections");
                }
            }
            Phase::Measuring => {
                let Some((g0, n0)) = self.base else {
                    self.phase = Phase::Baseline;
                    return;
                };
                if n_avg < n0 + 0.5 {
                    // The step did not happen (no work worth cutting, or blobs ended):
                    // no verdict; this is the new reference.
                    self.doubt = None;
                    self.base = Some((g, n_avg));
                    return;
                }
                let g0 = g_ref.unwrap_or(g0);
                let early = n_avg < n0 + STEP_DONE * (self.limit as f64 - n0);
                if g < COLLAPSE * g0 && early {
                    // The step has barely begun (little work to cut yet) and the goodput fell
                    // far below the reference. Once, that may be a stall of our own: look
                    // again, without a verdict. Twice in a row, the reference measured a
                    // world that is gone: no step does that to a shared bottleneck (it stays
                    // flat), but the end of a burst does (a limiter's first bytes, a socket
                    // buffer a slow client drains). Still no verdict: this window is the new
                    // reference, and the rest of the step is judged from it.
                    if !self.collapsed {
                        self.collapsed = true;
                        return;
                    }
                    self.collapsed = false;
                    self.doubt = None;
                    self.base = Some((g, n_avg));
                    tracing::debug!(%origin, mb_per_s = g / 1e6, before_mb_per_s = g0 / 1e6, connections = n_avg, before = n0, limit = self.limit, "fan-out: goodput stayed far below the reference early in a step; measuring from here");
                    return;
                }
                self.collapsed = false;
                let per = g0 / n0.max(1.0);
                let marginal = (g - g0) / (n_avg - n0);
                if marginal >= MIN_GAIN * per && self.bisecting {
                    // Halfway paid, all the way did not: the knee lies between. Stay here.
                    self.doubt = None;
                    self.bisecting = false;
                    self.base = Some((g, n_avg));
                    self.held = g;
                    self.phase = Phase::Holding {
                        until: now + self.hold(),
                    };
                    tracing::debug!(%origin, mb_per_s = g / 1e6, before_mb_per_s = g0 / 1e6, connections = n_avg, before = n0, limit = self.limit, "fan-out: halfway paid; holding");
                } else if marginal >= MIN_GAIN * per {
                    self.doubt = None;
                    self.base = Some((g, n_avg));
                    if self.limit < max {
                        self.grow(max, n_avg, marginal >= LINEAR_GAIN * per, now);
                        self.grew += 1;
                        self.phase = Phase::Settling {
                            until: now + self.settle(),
                        };
                    }
                    tracing::debug!(%origin, mb_per_s = g / 1e6, before_mb_per_s = g0 / 1e6, connections = n_avg, before = n0, clean, busy, ticks, limit = self.limit, "fan-out: more connections paid; growing");
                } else if self.doubt.is_none() {
                    // One window is not a verdict (new connections starting up, a stall of
                    // our own): look once more.
                    self.doubt = Some(g);
                } else if n_avg > BISECT_ABOVE * n0 && !self.bisecting {
                    // A long step that did not pay may still have paid halfway (the
                    // connections just added were still getting going, or the knee lies
                    // between): try the geometric middle against the same reference before
                    // falling back all the way.
                    self.doubt = None;
                    self.bisecting = true;
                    self.limit = ((n0.max(1.0) * n_avg).sqrt().round() as usize).max(1);
                    self.phase = Phase::Settling {
                        until: now + self.settle(),
                    };
                    tracing::debug!(%origin, mb_per_s = g / 1e6, before_mb_per_s = g0 / 1e6, connections = n_avg, before = n0, limit = self.limit, "fan-out: the long step did not pay; trying halfway");
                } else {
                    // Back to where the goodput stopped rising: as many connections as the
                    // gain measured would have needed at the old per-connection rate.
                    self.bisecting = false;
                    let g = g.max(self.doubt.take().unwrap_or(0.0));
                    let knee = n0 + ((g - g0) / per).max(0.0);
                    self.limit = (knee.min(n_avg).round() as usize).max(1);
                    self.fell += 1;
                    self.base = Some((g, n_avg));
                    // What the origin delivered when the reference was taken, or since if more:
                    // if the world that reference saw goes away, so does this verdict.
                    self.held = g0.max(g);
                    self.phase = Phase::Holding {
                        until: now + self.hold(),
                    };
                    tracing::debug!(%origin, mb_per_s = g / 1e6, before_mb_per_s = g0 / 1e6, connections = n_avg, limit = self.limit, "fan-out: more connections did not pay; holding");
                }
            }
            Phase::Holding { until } => {
                self.base = Some((g, n_avg));
                // The origin now delivers far less than when the verdict was taken: what it
                // was taken on is gone (a limiter's burst ran out), so it no longer holds.
                // (The sum, not each connection's share: right after a fall back the
                // connections above the new limit are still finishing their pieces, and on a
                // shared link each of them gets less while the sum stays where it was.)
                let fell_off = g < HOLD_DROP * self.held;
                if (now >= until || fell_off) && self.limit < max {
                    // Probe again: the world may have changed (a burst ran out, other
                    // transfers ended, the link freed up).
                    if fell_off {
                        tracing::debug!(%origin, mb_per_s = g / 1e6, connections = n_avg, "fan-out: the origin delivers far less than when growth stopped; probing again");
                    }
                    let n = n_avg.round().max(1.0) as usize;
                    self.limit = Controller::probe_above(n).min(max);
                    self.grew += 1;
                    self.phase = Phase::Settling {
                        until: now + self.settle(),
                    };
                }
            }
            Phase::Settling { .. } => {}
        }
    }
}

/// The scheduler of one pull.
pub(crate) struct Scheduler {
    fan_out: FanOut,
    max_connections: usize,
    max_per_blob: usize,
    min_piece: u64,
    origins: HashMap<String, Controller>,
    rates: HashMap<u64, Rate>,
    /// Per origin, what the last transfer on each lane got from it (bytes/s) and when it
    /// ended, if it lasted long enough to be measured: a lane keeps its connection, and a
    /// connection its path and its server's limiter. Forgotten after [`LANE_MEMORY`].
    lane_rates: HashMap<String, HashMap<usize, (f64, Instant)>>,
    /// The last tick: the scheduler's now.
    now: Option<Instant>,
}

impl Scheduler {
    /// `max_connections`: requests in flight overall; `max_per_blob`: per blob;
    /// `min_piece`: no cut leaves a piece smaller than this (tails raced excepted).
    pub(crate) fn new(
        fan_out: FanOut,
        max_connections: usize,
        max_per_blob: usize,
        min_piece: u64,
    ) -> Scheduler {
        Scheduler {
            fan_out,
            max_connections: max_connections.max(1),
            max_per_blob: max_per_blob.max(1),
            min_piece: match fan_out {
                FanOut::Auto => min_piece.max(ALIGN),
                FanOut::Max => min_piece.max(1),
            },
            origins: HashMap::new(),
            rates: HashMap::new(),
            lane_rates: HashMap::new(),
            now: None,
        }
    }

    /// Whether a blob of `size` bytes is fetched in one request without `Range`: it is never
    /// worth cutting.
    pub(crate) fn whole_request(&self, size: u64) -> bool {
        match self.fan_out {
            FanOut::Auto => size < 2 * self.min_piece,
            FanOut::Max => size <= self.min_piece,
        }
    }

    /// How many connections `origin` may have now, when `blobs` blobs are being fetched
    /// from it: until its controller has measured anything, each of them has its own
    /// connection and the origin [`INITIAL_LIMIT`] more (a pull of many blobs is not held to four connections while
    /// the first window runs).
    fn limit_with(&self, origin: &str, blobs: usize) -> usize {
        match self.fan_out {
            FanOut::Max => self.max_connections,
            FanOut::Auto => {
                let c = self.origins.get(origin);
                let measured = c.is_some_and(|c| c.base.is_some() || c.refusals > 0);
                let limit = c.map_or(INITIAL_LIMIT, |c| c.limit);
                if measured {
                    limit
                } else {
                    limit.max(blobs + INITIAL_LIMIT)
                }
                .min(self.max_connections)
            }
        }
    }

    /// Notes the round trip a flow's first response showed; `exact` when it came on a
    /// connection already open. Until an exact sample comes, the estimate is the smallest
    /// of the others (fresh connections' first responses, half their time); after, only
    /// exact samples count.
    pub(crate) fn first_byte(&mut self, origin: &str, rtt: Duration, exact: bool, now: Instant) {
        let c = self
            .origins
            .entry(origin.to_string())
            .or_insert_with(|| Controller::new(now));
        c.rtt = match (c.rtt, c.rtt_exact, exact) {
            (None, _, _) | (Some(_), false, true) => Some(rtt),
            (Some(old), true, false) => Some(old),
            (Some(old), _, _) => Some(old.min(rtt)),
        };
        c.rtt_exact |= exact;
    }

    /// Measures: every flow's rate, every origin's goodput; the controllers decide.
    pub(crate) fn tick<'a>(&mut self, now: Instant, flows: impl Iterator<Item = FlowInfo<'a>>) {
        self.now = Some(now);
        let mut per_origin: HashMap<&str, (u64, usize)> = HashMap::new();
        // Every live flow's latest rate (flows sample at different ticks).
        let mut per_origin_rates: HashMap<&str, Vec<f64>> = HashMap::new();
        let mut live = Vec::new();
        for f in flows {
            live.push(f.id);
            let Some(first) = f.first_byte else { continue };
            let r = self.rates.entry(f.id).or_insert(Rate {
                last_bytes: 0,
                last_at: first,
                counted: 0,
                rate: None,
                samples: 0,
                raced: false,
                progress_at: first,
            });
            // Goodput: every byte, every tick.
            if let Some(o) = f.origin {
                let e = per_origin.entry(o).or_default();
                e.0 += f.bytes.saturating_sub(r.counted);
                e.1 += 1;
            }
            r.counted = f.bytes;
            // The flow's own rate, over at least RATE_DT.
            let dt = now.duration_since(r.last_at);
            if dt >= RATE_DT {
                // The first sample holds the start of the response (whatever the sockets
                // had buffered), not the flow's rate.
                if r.samples > 0 {
                    let sample = f.bytes.saturating_sub(r.last_bytes) as f64 / dt.as_secs_f64();
                    r.rate = Some(match r.rate {
                        None => sample,
                        Some(old) => 0.6 * old + 0.4 * sample,
                    });
                }
                if f.bytes > r.last_bytes {
                    r.progress_at = now;
                }
                r.last_bytes = f.bytes;
                r.last_at = now;
                r.samples += 1;
            }
            if let (Some(o), Some(rate)) = (f.origin, r.rate) {
                per_origin_rates.entry(o).or_default().push(rate);
            }
        }
        self.rates.retain(|id, _| live.contains(id));
        // With the origin's recently ended ones, the typical rate.
        for (origin, c) in self.origins.iter_mut() {
            let mut rates = per_origin_rates.remove(origin.as_str()).unwrap_or_default();
            rates.extend(c.ended.iter().copied());
            if rates.len() >= 3 {
                rates.sort_by(f64::total_cmp);
                c.typical = Some(rates[rates.len() / 2]);
            }
        }
        if self.fan_out == FanOut::Max {
            return;
        }
        let max = self.max_connections;
        for (origin, c) in self.origins.iter_mut() {
            let (bytes, n) = per_origin.get(origin.as_str()).copied().unwrap_or((0, 0));
            tracing::trace!(%origin, bytes, delivering = n, limit = c.limit, "tick");
            c.tick(now, bytes, n, max, origin);
        }
    }

    /// `origin` refused a request as one too many (429, 503) while `delivering` of our
    /// transfers to it were being answered (see [`Controller::refused`]).
    pub(crate) fn refused(&mut self, origin: &str, delivering: usize, now: Instant) {
        if self.fan_out == FanOut::Max {
            return;
        }
        self.origins
            .entry(origin.to_string())
            .or_insert_with(|| Controller::new(now))
            .refused(now, delivering, origin);
    }

    /// Whether a new request may go out while `unknown` requests have not said where their
    /// bytes come from yet (a blob's first, until its redirect is followed): not if an origin
    /// that refused requests as too many, with `on_origin(origin)` in flight, would be over
    /// its limit should they all land there (they usually do: one CDN serves every blob).
    pub(crate) fn room_for(&self, unknown: usize, on_origin: impl Fn(&str) -> usize) -> bool {
        self.origins
            .iter()
            .all(|(o, c)| c.refusals == 0 || on_origin(o) + unknown < self.limit_with(o, 0))
    }

    /// Bytes a flow received since the last tick, when it ends (so the window counts them).
    /// Its rate, if measured over a few samples, joins the origin's recent ones and is what
    /// its lane (`lane`; None when a retry took it to other lanes) is known to get from that
    /// origin, until the lane's next measured transfer there or [`LANE_MEMORY`].
    pub(crate) fn flow_ended(
        &mut self,
        id: u64,
        origin: Option<&str>,
        bytes: u64,
        lane: Option<usize>,
    ) {
        let r = self.rates.remove(&id);
        let Some((origin, c)) = origin.and_then(|o| Some(o).zip(self.origins.get_mut(o))) else {
            return;
        };
        // A flow no tick saw delivering (a piece that came and went within one) brought
        // all its bytes since.
        c.win_bytes += bytes.saturating_sub(r.as_ref().map_or(0, |r| r.counted));
        if let Some(rate) = r.and_then(|r| r.rate.filter(|_| r.samples >= ENDED_SAMPLES)) {
            if c.ended.len() == ENDED_RATES {
                c.ended.pop_front();
            }
            c.ended.push_back(rate);
            if let (Some(lane), Some(now)) = (lane, self.now) {
                self.lane_rates
                    .entry(origin.to_string())
                    .or_default()
                    .insert(lane, (rate, now));
            }
        }
    }

    /// Whether a lane's rate measured at `at` still counts.
    fn remembered(&self, at: Instant) -> bool {
        self.now
            .is_some_and(|now| now.saturating_duration_since(at) <= LANE_MEMORY)
    }

    /// What `lane` got from `origin` the last time it was measured there, if recently.
    fn lane_rate(&self, lane: usize, origin: Option<&str>) -> Option<f64> {
        let &(rate, at) = self.lane_rates.get(origin?)?.get(&lane)?;
        self.remembered(at).then_some(rate)
    }

    /// Which of the `free` lanes (at least one) a new request to `origin` (None: not known
    /// yet, a blob's first) goes on, and what that lane is known to get there. A lane keeps
    /// its connection, so one whose last transfer was a straggler's would likely be one
    /// again (a limiter or a path per connection): the fastest lane measured to be at least
    /// half as fast as the origin's typical connection first, then one not measured, then
    /// the slow ones, fastest first.
    pub(crate) fn lane_for(&self, origin: Option<&str>, free: &[usize]) -> (usize, Option<f64>) {
        let slow_at = |o: &str, r: f64| {
            self.origins
                .get(o)
                .and_then(|c| c.typical)
                .is_some_and(|t| r * EARLY_STRAGGLER < t)
        };
        // (class, rate): 0 fast, 1 not measured, 2 slow; faster first within a class.
        let rank = |lane: usize| -> (u8, f64) {
            match origin {
                Some(o) => match self.lane_rate(lane, origin) {
                    None => (1, 0.0),
                    Some(r) if slow_at(o, r) => (2, -r),
                    Some(r) => (0, -r),
                },
                // A blob's first request: its bytes will likely come from where the others'
                // did; off lanes slow at any origin, onto one measured (a warm connection).
                None => {
                    let mut seen = self.lane_rates.iter().filter_map(|(o, lanes)| {
                        let &(r, at) = lanes.get(&lane)?;
                        self.remembered(at).then_some((o, r))
                    });
                    if seen.clone().any(|(o, r)| slow_at(o, r)) {
                        (2, 0.0)
                    } else if seen.next().is_some() {
                        (0, 0.0)
                    } else {
                        (1, 0.0)
                    }
                }
            }
        };
        let lane = free
            .iter()
            .copied()
            .min_by(|&a, &b| {
                let (ca, ra) = rank(a);
                let (cb, rb) = rank(b);
                ca.cmp(&cb).then(ra.total_cmp(&rb)).then(a.cmp(&b))
            })
            .unwrap_or(0);
        (lane, self.lane_rate(lane, origin))
    }

    /// How many bytes a new transfer on `origin` asks for: about [`PIECE_TIME`] (or
    /// [`PIECE_RTTS`] round trips, if longer) at the rate its transfers get now, so that the request's
    /// round trip is a small part of it, the pieces of a blob arrive roughly in order (the
    /// hasher follows close behind) and the last ones finish together. Before any rate is
    /// known: [`FIRST_PIECES`] minimum pieces.
    /// A lane known to get less (`lane_rate`) gets a piece that takes it as long.
    pub(crate) fn piece_len(
        &self,
        origin: Option<&str>,
        flows: &[FlowInfo<'_>],
        lane_rate: Option<f64>,
    ) -> u64 {
        if self.fan_out == FanOut::Max {
            return self.min_piece;
        }
        let on_origin: Vec<FlowInfo<'_>> = flows
            .iter()
            .filter(|f| origin.is_none() || f.origin == origin)
            .copied()
            .collect();
        let ctl = origin.and_then(|o| self.origins.get(o));
        let rate = ctl
            .and_then(|c| c.typical)
            .or_else(|| self.typical_rate(&on_origin))
            .or_else(|| self.typical_rate(flows));
        // Never below what each connection got in the recent windows: the flows' own rates
        // come only from pieces long enough to be sampled, and on a fast origin that may be
        // just the few that stalled. Sized by those, pieces came out shorter still and fewer
        // lived long enough to correct it (seen on uncapped loopback: pieces of 2.4 MiB
        // where 25 MB fit, 427 requests for 1 GiB, twice the time).
        let rate = match (rate, ctl.and_then(Controller::window_rate)) {
            (Some(r), Some(w)) => Some(r.max(w)),
            (r, w) => r.or(w),
        };
        let rate = match (rate, lane_rate) {
            (Some(r), Some(l)) => Some(r.min(l)),
            (r, _) => r,
        };
        let rtt = ctl.map_or(Duration::from_millis(20), |c| c.rtt());
        // An origin where more connections did not pay is not capped per connection: its
        // pieces may be long (fewer requests); elsewhere short, for order and balance.
        let time = if ctl.is_some_and(|c| matches!(c.phase, Phase::Holding { .. })) {
            HOLDING_PIECE_TIME
        } else {
            PIECE_TIME
        };
        match rate {
            Some(r) => {
                // Each piece costs its connection one idle round trip (its request): at least
                // ten round trips long, that is under a tenth of the time on a far origin.
                let t = time.max(rtt * PIECE_RTTS).as_secs_f64();
                ((r * t) as u64).max(self.min_piece)
            }
            None => FIRST_PIECES * self.min_piece,
        }
    }

    /// The length of a piece of `len` asked from a blob with `unassigned` bytes left: no
    /// remainder smaller than a minimum piece is left behind.
    pub(crate) fn fit(&self, len: u64, unassigned: u64) -> u64 {
        if self.fan_out == FanOut::Max {
            return len.min(unassigned);
        }
        if unassigned < len.saturating_add(self.min_piece) {
            unassigned
        } else {
            align(len)
        }
    }

    /// What a free connection should do, if anything. A straggler in a blob that still has
    /// bytes nobody fetches yet is cut first ([`Scheduler::early_straggler`]); then those
    /// bytes go out (of the blob with the most); then the transfer that would finish last
    /// is cut, or a straggler's tail is raced. `on_origin(origin)` counts
    /// the flows in flight to an origin; `free` are the lanes free (at least one), of which
    /// the decision names one ([`Scheduler::lane_for`]), and what that lane is known to get
    /// sizes its piece or its cut.
    pub(crate) fn pick<'a>(
        &mut self,
        flows: &[FlowInfo<'a>],
        blobs: &[BlobInfo<'a>],
        on_origin: impl Fn(&str) -> usize,
        free: &[usize],
    ) -> Option<Decision> {
        let running = |b: usize| blobs.iter().find(|x| x.blob == b).map_or(0, |x| x.running);
        let on_origin_blobs = |o: &str| {
            blobs
                .iter()
                .filter(|b| b.running > 0 && b.origin == Some(o))
                .count()
        };
        let room = |o: &str| on_origin(o) < self.limit_with(o, on_origin_blobs(o));
        if let Some(cut) = self.early_straggler(flows, blobs, room, free) {
            return Some(Decision::Cut(cut));
        }
        // The lane a request to each origin would take: ranked once per origin, not per flow.
        let mut lanes: Vec<(&str, (usize, Option<f64>))> = Vec::new();
        let mut lane_of = |o: &'a str| {
            if let Some(&(_, l)) = lanes.iter().find(|(x, _)| *x == o) {
                return l;
            }
            let l = self.lane_for(Some(o), free);
            lanes.push((o, l));
            l
        };
        let mut piece: Option<(u64, usize, u64, usize)> = None;
        for b in blobs {
            let Some(origin) = b.origin else { continue };
            if b.unassigned == 0
                || b.running >= self.max_per_blob
                || on_origin(origin) >= self.limit_with(origin, on_origin_blobs(origin))
            {
                continue;
            }
            if piece.is_none_or(|(u, _, _, _)| b.unassigned > u) {
                let (lane, lane_rate) = lane_of(origin);
                let len = self.fit(self.piece_len(Some(origin), flows, lane_rate), b.unassigned);
                piece = Some((b.unassigned, b.blob, len, lane));
            }
        }
        if let Some((_, blob, len, lane)) = piece {
            return Some(Decision::Piece { blob, len, lane });
        }
        let typical = self.typical_rate(flows);
        let mut best: Option<(f64, Cut)> = None;
        let mut best_race: Option<(f64, Cut)> = None;
        for f in flows {
            if !f.splittable || running(f.blob) >= self.max_per_blob {
                continue;
            }
            // Bytes nobody has are handed out as pieces (above), not cut from others.
            if blobs.iter().any(|b| b.blob == f.blob && b.unassigned > 0) {
                continue;
            }
            let Some(origin) = f.origin else { continue };
            let pos = f.span.position();
            let end = f.span.end();
            let remaining = end.saturating_sub(pos);
            let rate = self.rates.get(&f.id).and_then(|r| r.rate);
            let rtt = self
                .origins
                .get(origin)
                .map_or(Duration::from_millis(20), |c| c.rtt())
                .as_secs_f64();
            let fresh = self
                .origins
                .get(origin)
                .and_then(|c| c.typical)
                .or(typical)
                .unwrap_or(1e6)
                .max(1.0);
            let own = rate.unwrap_or(fresh).max(1.0);
            let left = remaining as f64 / own;
            // The new connection: the lane's, if measured there.
            let (lane, lane_rate) = lane_of(origin);
            let fresh = lane_rate.unwrap_or(fresh).max(1.0);
            // A cut costs a request and the victim's connection: only where the victim
            // would still take a while alone (a fast connection's last MiBs are not worth
            // it, and its socket may hold them already).
            if remaining >= 2 * self.min_piece
                && left > MIN_CUT_TIME.max(4.0 * rtt)
                && on_origin(origin) < self.limit_with(origin, on_origin_blobs(origin))
            {
                let at = self.split_point(pos, end, own, fresh, rtt);
                if at + self.min_piece <= end && best.is_none_or(|(l, _)| left > l) {
                    best = Some((
                        left,
                        Cut {
                            victim: f.id,
                            at,
                            race: false,
                            lane,
                        },
                    ));
                }
            } else if self.fan_out == FanOut::Auto
                && remaining < 2 * self.min_piece
                // It delivered something (one that never did, say a racer on an origin that
                // sent headers and then stalled, waits for the stall timeout), the origin
                // is not over its limit (the victim hands its place over: it ends within
                // moments), and the blob has not been raced often already:
                // when racers turn out slow too, the origin is, and racing on would only
                // churn connections.
                && f.bytes > 0
                && on_origin(origin) <= self.limit_with(origin, on_origin_blobs(origin))
                && blobs
                    .iter()
                    .any(|b| b.blob == f.blob && b.races < MAX_RACES_PER_BLOB)
                && self
                    .rates
                    .get(&f.id)
                    .is_some_and(|r| !r.raced && r.samples >= RACE_SAMPLES)
            {
                // A straggler: its tail takes much longer than a new connection would (the
                // time tests, not a size, decide: a trickling connection's last KiBs are worth
                // a request).
                let fresh_time = rtt + remaining as f64 / fresh;
                if own * STRAGGLER < fresh && left > 2.0 * fresh_time && left > 4.0 * rtt + 0.2 {
                    let at = self.race_point(f.id, pos, own, rtt);
                    if at < end && best_race.is_none_or(|(l, _)| left > l) {
                        best_race = Some((
                            left,
                            Cut {
                                victim: f.id,
                                at,
                                race: true,
                                lane,
                            },
                        ));
                    }
                }
            }
        }
        best.or(best_race).map(|(_, c)| Decision::Cut(c))
    }

    /// Where to cut a span at `pos..end` whose transfer goes on at `own` bytes/s so that it
    /// and a new connection (its first byte a round trip away, then `fresh` bytes/s) finish
    /// together: aligned, and leaving each side a minimum piece (so the span must hold two).
    fn split_point(&self, pos: u64, end: u64, own: f64, fresh: f64, rtt: f64) -> u64 {
        debug_assert!(end >= pos + 2 * self.min_piece, "a span too short to split");
        let t = together(end.saturating_sub(pos), own, fresh, rtt);
        let at = pos as f64 + own * t;
        let at = align(at as u64).clamp(pos + self.min_piece, end.saturating_sub(self.min_piece));
        align_down(at).max(pos + self.min_piece)
    }

    /// Where a race takes over the tail of flow `id`, at `pos` and `own` bytes/s: past
    /// where the victim will be when the new request's bytes come, and past what its socket
    /// may already hold; a victim that has stopped delivering keeps nothing (its transfer
    /// ends without the bytes it would wait for: `fetch::transfer`). (A rate decays towards
    /// 0 but never gets there: silence says stopped.)
    fn race_point(&self, id: u64, pos: u64, own: f64, rtt: f64) -> u64 {
        let silent = self.rates.get(&id).map_or(Duration::ZERO, |r| {
            r.last_at.saturating_duration_since(r.progress_at)
        });
        let ahead = if silent >= SILENT.max(Duration::from_secs_f64(4.0 * rtt)) {
            0
        } else {
            ((own * 2.0 * rtt) as u64).max(RACE_AHEAD.min((own * RACE_AHEAD_TIME) as u64))
        };
        if ahead >= ALIGN {
            align(pos + ahead)
        } else {
            pos + ahead
        }
    }

    /// A straggler cut at once, before its blob's last bytes are handed out (after, the cuts
    /// of [`Scheduler::pick`] take over): a transfer measured over a few samples at
    /// [`EARLY_STRAGGLER`] times slower than what a new connection to its origin gets, whose
    /// rest would take it much longer than a new connection needs; the one the blob's hash
    /// waits for (at its written prefix) first, then the one that would take longest. Every
    /// byte written above a straggler waits for it to be hashed, and at the end the hashing
    /// of all of them is what the pull waits for: seen in perf/'s slow-tail world, where the
    /// first pieces, handed out before any rate was known, put one in four on a slow
    /// connection all over a 300 MB blob; the last of them held its hash until 0.8 s, and
    /// it ended 0.15 s after the last byte. Most of its rest goes to the new connection
    /// (the two finish together), or, when too little is left to halve, its tail is raced
    /// as at the end. `room(origin)`: whether the origin may have one more request.
    fn early_straggler(
        &self,
        flows: &[FlowInfo<'_>],
        blobs: &[BlobInfo<'_>],
        room: impl Fn(&str) -> bool,
        free: &[usize],
    ) -> Option<Cut> {
        if self.fan_out != FanOut::Auto {
            return None;
        }
        let typical = self.typical_rate(flows);
        // (holds the hash now, time it would take), best last.
        let mut best: Option<((bool, f64), Cut)> = None;
        for f in flows {
            let Some(b) = blobs.iter().find(|b| b.blob == f.blob) else {
                continue;
            };
            let Some(origin) = f.origin else { continue };
            let (pos, end) = (f.span.position(), f.span.end());
            // Blobs with nothing left to hand out get their cuts in `pick`.
            if !f.splittable || b.unassigned == 0 || b.running >= self.max_per_blob || pos >= end {
                continue;
            }
            let front = f.span.start() <= b.prefix && pos >= b.prefix;
            let Some(r) = self.rates.get(&f.id) else {
                continue;
            };
            let Some(own) = r.rate.filter(|_| !r.raced && r.samples >= RACE_SAMPLES) else {
                continue;
            };
            let own = own.max(1.0);
            let c = self.origins.get(origin);
            let usual = c
                .and_then(|c| c.typical)
                .or(typical)
                .unwrap_or(1e6)
                .max(1.0);
            let remaining = end - pos;
            let left = remaining as f64 / own;
            if own * EARLY_STRAGGLER >= usual
                || best.is_some_and(|((bf, bl), _)| (bf, bl) >= (front, left))
                || !room(origin)
            {
                continue;
            }
            // The new connection: the lane's, if measured (a slow lane gains nothing).
            let (lane, lane_rate) = self.lane_for(Some(origin), free);
            let fresh = lane_rate.unwrap_or(usual).max(1.0);
            let rtt = c
                .map_or(Duration::from_millis(20), |c| c.rtt())
                .as_secs_f64();
            let fresh_time = rtt + remaining as f64 / fresh;
            if own * EARLY_STRAGGLER >= fresh || left <= 2.0 * fresh_time || left <= 4.0 * rtt + 0.2
            {
                continue;
            }
            // A race leaves the victim next to nothing, for one request: where even a
            // minimum piece would keep it longer than the new connection needs for the rest,
            // or too little is left to halve. Only of transfers that delivered something (one
            // that sent headers and then nothing is split, and its stall timeout ends it), and
            // within the blob's early races.
            let t = together(remaining, own, fresh, rtt);
            let race = (remaining < 2 * self.min_piece || own * t < self.min_piece as f64)
                && f.bytes > 0
                && b.races < MAX_EARLY_RACES_PER_BLOB;
            let cut = if race {
                let at = self.race_point(f.id, pos, own, rtt);
                (at < end).then_some(Cut {
                    victim: f.id,
                    at,
                    race: true,
                    lane,
                })
            } else if remaining >= 2 * self.min_piece {
                let at = self.split_point(pos, end, own, fresh, rtt);
                (at + self.min_piece <= end).then_some(Cut {
                    victim: f.id,
                    at,
                    race: false,
                    lane,
                })
            } else {
                None
            };
            if let Some(cut) = cut {
                best = Some(((front, left), cut));
            }
        }
        best.map(|(_, c)| c)
    }

    /// A race cut `victim`'s span: it is not raced again. (Marked once the cut is made, not
    /// when chosen: a cut the victim's own writing got ahead of is chosen again.)
    pub(crate) fn raced(&mut self, victim: u64) {
        if let Some(r) = self.rates.get_mut(&victim) {
            r.raced = true;
        }
    }

    /// The median measured rate of the flows (what a new connection can expect).
    fn typical_rate(&self, flows: &[FlowInfo<'_>]) -> Option<f64> {
        let mut rates: Vec<f64> = flows
            .iter()
            .filter_map(|f| self.rates.get(&f.id).and_then(|r| r.rate))
            .collect();
        if rates.is_empty() {
            return None;
        }
        rates.sort_by(f64::total_cmp);
        Some(rates[rates.len() / 2])
    }

    /// A line for the log: per origin, the limit reached and the steps taken.
    pub(crate) fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .origins
            .iter()
            .map(|(o, c)| {
                let refused = if c.refusals > 0 {
                    format!(", refused {}", c.refusals)
                } else {
                    String::new()
                };
                format!(
                    "{o}: limit {} (grew {}, fell back {}{refused}, rtt {:?})",
                    c.limit,
                    c.grew,
                    c.fell,
                    c.rtt.unwrap_or_default()
                )
            })
            .collect();
        parts.sort();
        parts.join("; ")
    }
}

/// When a transfer going on at `own` bytes/s and a new connection (its first byte a round
/// trip `rtt` away, then `fresh` bytes/s) finish `remaining` bytes together, from now (s).
fn together(remaining: u64, own: f64, fresh: f64, rtt: f64) -> f64 {
    (remaining as f64 + fresh * rtt) / (own + fresh)
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

fn align_down(x: u64) -> u64 {
    x / ALIGN * ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::{BlobFile, SpanWriter};
    use std::path::Path;
    use std::sync::Arc;

    const MS: Duration = Duration::from_millis(1);

    /// A controller started at `t0`, its round trip known (1 ms).
    fn controller(t0: Instant) -> Controller {
        let mut c = Controller::new(t0);
        c.rtt = Some(MS);
        c
    }

    /// Drives a controller for `secs`: `n` connections, each bringing `per_conn(elapsed, n)`
    /// bytes/s, follow its limit at once (there is always work to cut).
    fn drive(
        per_conn: impl Fn(Duration, usize) -> f64,
        max: usize,
        secs: f64,
    ) -> (usize, Controller) {
        drive_slowly(per_conn, max, secs, 1, 0)
    }

    /// [`drive`] from `n` connections, one more joining every `every` 10 ms ticks while
    /// under the limit (0: all at once), as when work to cut is scarce.
    fn drive_slowly(
        per_conn: impl Fn(Duration, usize) -> f64,
        max: usize,
        secs: f64,
        n: usize,
        every: u32,
    ) -> (usize, Controller) {
        drive_by(per_conn, max, secs, n, |c, n, ticks| match every {
            0 => c.limit,
            k if ticks.is_multiple_of(k) => c.limit.min(n + 1),
            _ => n,
        })
    }

    /// Ticks a controller every 10 ms for `secs`, starting from `n` connections that each
    /// get `per_conn(elapsed, n)` bytes/s; after each tick `next(controller, n, ticks)` says
    /// how many connections deliver during the next one.
    fn drive_by(
        per_conn: impl Fn(Duration, usize) -> f64,
        max: usize,
        secs: f64,
        mut n: usize,
        mut next: impl FnMut(&Controller, usize, u32) -> usize,
    ) -> (usize, Controller) {
        let t0 = Instant::now();
        let mut c = controller(t0);
        let mut t = t0;
        let mut ticks = 0u32;
        let tick = Duration::from_millis(10);
        while t.duration_since(t0).as_secs_f64() < secs {
            t += tick;
            ticks += 1;
            let bytes = (per_conn(t.duration_since(t0), n) * n as f64 * tick.as_secs_f64()) as u64;
            c.tick(t, bytes, n, max, "o");
            n = next(&c, n, ticks);
        }
        (n, c)
    }

    /// `shared` bytes/s in all (however many connections) for the first `ms`, then
    /// `per_conn` bytes/s per connection: a limiter's burst, then its cap.
    fn burst_then_cap(ms: u64, shared: f64, per_conn: f64) -> impl Fn(Duration, usize) -> f64 {
        move |t, n| {
            if t < Duration::from_millis(ms) {
                shared / n as f64
            } else {
                per_conn
            }
        }
    }

    /// A per-connection cap (every connection would pay) on an origin that answers 5
    /// requests at once and refuses the rest: the limit falls to 5 at the first refusal and
    /// stays within a probe of it; the probes are refused, each time after a longer hold, so
    /// refusals stay few; a refusal at the limit it knows (a race with a slot the server has
    /// not let go of) lowers the limit without lengthening the hold.
    #[test]
    fn an_origin_that_refuses_beyond_five_holds_the_limit_there() {
        let t0 = Instant::now();
        let mut c = controller(t0);
        let tick = Duration::from_millis(10);
        let (mut t, mut n, mut refused_at) = (t0, 1usize, Vec::new());
        while t.duration_since(t0) < Duration::from_secs(30) {
            t += tick;
            c.tick(t, (10e6 * n as f64 * tick.as_secs_f64()) as u64, n, 64, "o");
            if c.limit > 5 {
                // Requests above the fifth are refused as soon as they go out.
                refused_at.push(t.duration_since(t0));
                c.refused(t, 5, "o");
            }
            n = c.limit.min(5);
        }
        assert_eq!(c.limit, 5, "{c:?}");
        // Holds of 0.8 s, 1.6, 3.2, 6.4, 12.8 (then 12.8 again): 6-7 refusals in 30 s.
        assert!(
            (4..=8).contains(&refused_at.len()),
            "refused at {refused_at:?}"
        );
        let gaps: Vec<Duration> = refused_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).take(3).all(|g| g[1] > g[0]),
            "the holds between probes grow: {gaps:?}"
        );
        // A race: refused while answering 4 at a limit of 5. The limit falls to 4; the hold
        // stays as long as the last one.
        let episodes = c.refusals;
        let t = t + Duration::from_secs(1);
        c.refused(t, 4, "o");
        assert_eq!((c.limit, c.refusals), (4, episodes));
        // A refusal long after the last: what was learnt is forgotten, the hold is short.
        c.limit = 8;
        c.refused(t + Duration::from_secs(60), 6, "o");
        assert_eq!((c.limit, c.refusals), (6, 1));
    }

    /// After the origin refused all but 3 requests, a step that pays raises the limit a
    /// probe's step above those 3, not ×4: here one connection had work through the hold,
    /// then two (the end of a pull), each bringing as much as the one before. Long after the
    /// last refusal the origin is approached as any other. (Red without the cap in `grow`:
    /// the limit went to 8.)
    #[test]
    fn after_refusals_a_paying_step_grows_the_limit_a_probe_at_a_time() {
        let t0 = Instant::now();
        let mut c = controller(t0);
        let tick = Duration::from_millis(10);
        let mut t = t0 + tick;
        c.tick(t, 0, 3, 64, "o");
        c.refused(t, 3, "o");
        assert_eq!(c.limit, 3);
        let hold_end = t + c.hold();
        let mut highest = c.limit;
        while t < t0 + Duration::from_secs(3) {
            t += tick;
            let n = if t < hold_end { 1 } else { c.limit.min(2) };
            c.tick(t, (10e6 * n as f64 * tick.as_secs_f64()) as u64, n, 64, "o");
            highest = highest.max(c.limit);
        }
        assert!(c.grew >= 2, "no step was taken: {c:?}");
        assert_eq!(highest, 5, "{c:?}");
        // Long after: the step from 2 is ×4 again.
        let later = t + c.hold() * (1 << MAX_REFUSED_HOLD) + Duration::from_secs(1);
        c.grow(64, 2.0, true, later);
        assert_eq!(c.limit, 8);
    }

    #[test]
    fn capped_connections_fan_out_fully() {
        // 25 MB/s per connection, whatever the count.
        let (n, _) = drive(|_, _| 25e6, 32, 1.0);
        assert_eq!(n, 32);
    }

    #[test]
    fn a_shared_link_behind_a_per_connection_cap_holds_while_connections_drain() {
        // Each connection capped at 25 MB/s, all of them sharing a 150 MB/s link: more than
        // ~6 connections do not pay. After a fall back, the connections above the new limit
        // finish their pieces first (one leaves every other tick), so for a while each gets
        // less than when the verdict was taken: the link is as full as before, and that is no
        // reason to probe again. (A pull of several blobs starts with a connection each and
        // a few more; the first windows come out high, as when sockets hand over what they
        // buffered while connections started.)
        let per_conn = |t: Duration, n: usize| {
            let link = if t < Duration::from_millis(100) {
                200e6
            } else {
                150e6
            };
            (link / n as f64).min(25e6)
        };
        let (mut grew, mut fell, mut falls, mut reprobes) = (0, 0, 0, 0);
        let (_, c) = drive_by(per_conn, 64, 1.5, 8, |c, n, ticks| {
            if c.fell > fell {
                falls += 1;
            }
            if falls > 0 && c.grew > grew {
                reprobes += 1;
            }
            (grew, fell) = (c.grew, c.fell);
            if n < c.limit {
                c.limit
            } else if n > c.limit && falls > 0 && ticks.is_multiple_of(2) {
                n - 1
            } else {
                n
            }
        });
        assert!(falls >= 1, "more than ~6 connections never pay here");
        assert!(
            reprobes <= 1,
            "{reprobes} probes after the fall back, within one hold (limit {})",
            c.limit
        );
    }

    #[test]
    fn a_shared_bottleneck_does_not_fan_out() {
        // 700 MB/s in all, however many connections share it.
        let (n, c) = drive(|_, n| 700e6 / n as f64, 32, 3.0);
        assert!(n <= 4 * 4, "limit {n}");
        assert!(c.fell >= 1);
    }

    /// A far origin (100 ms round trips): where each connection is capped, a step whose
    /// connections each bring what those before did is judged in half a window, so the
    /// pull has its connections sooner (red without the early verdict: 64 connections at
    /// 0.82 s); the baseline is not taken early (a burst would fool it); a shared
    /// bottleneck there still does not fan out.
    #[test]
    fn a_far_origin_that_caps_each_connection_is_judged_paid_early() {
        // `per_conn(elapsed, n)` bytes/s each, from `n` connections that follow the limit.
        let far = |per_conn: &dyn Fn(Duration, usize) -> f64, mut n: usize, secs: f64| {
            let t0 = Instant::now();
            let mut c = Controller::new(t0);
            c.rtt = Some(100 * MS);
            let tick = 10 * MS;
            let (mut t, mut all_at) = (t0, None);
            while t.duration_since(t0).as_secs_f64() < secs {
                t += tick;
                let each = per_conn(t.duration_since(t0), n);
                c.tick(t, (each * n as f64 * tick.as_secs_f64()) as u64, n, 64, "o");
                n = c.limit;
                if n == 64 && all_at.is_none() {
                    all_at = Some(t.duration_since(t0));
                }
            }
            (c, all_at)
        };
        let (_, all_at) = far(&|_, _| 25e6, INITIAL_LIMIT, 2.0);
        assert!(all_at.is_some_and(|d| d <= 720 * MS), "64 at {all_at:?}");
        // The first connection's first 200 ms bring 250 MB/s (a limiter's burst): the
        // baseline's whole window averages it out. (A baseline taken as early as a paying
        // step is judged fell back here, and had 64 connections only at 2.8 s.)
        let (c, all_at) = far(&burst_then_cap(200, 250e6, 25e6), 1, 4.0);
        assert_eq!(c.fell, 0, "{c:?}");
        assert!(all_at.is_some_and(|d| d <= 1250 * MS), "64 at {all_at:?}");
        let (c, _) = far(&|_, n| 700e6 / n as f64, INITIAL_LIMIT, 4.0);
        assert!(c.limit <= 16 && c.fell >= 1, "{c:?}");
    }

    #[test]
    fn a_burst_that_runs_out_ends_the_hold_at_once() {
        // A limiter that lets everything through for 150 ms (shared 900 MB/s: more
        // connections do not pay), then caps each connection at 25 MB/s: the hold taken on
        // the burst's evidence ends as soon as the connections' rate falls, not 800 ms later.
        let (n, c) = drive(burst_then_cap(150, 900e6, 25e6), 64, 0.7);
        assert!(c.fell >= 1, "the burst should have stopped growth once");
        assert_eq!(n, 64);
    }

    #[test]
    fn a_burst_gone_before_the_step_happened_is_no_verdict() {
        // The first 90 ms (the baseline) deliver 250 MB/s in all, however many connections
        // (a limiter's burst drained from socket buffers by a slow client); then 25 MB/s per
        // connection. Connections come slowly (one per 40 ms: little work to cut yet), so
        // the first step is measured when it has barely begun and the burst is gone. That
        // must not read as "more connections do not pay".
        let (_, c) = drive_slowly(burst_then_cap(90, 250e6, 25e6), 64, 1.5, 4, 4);
        assert_eq!(
            c.fell, 0,
            "a fall back on the burst's evidence (limit {})",
            c.limit
        );
        assert_eq!(c.limit, 64);
    }

    #[test]
    fn one_low_window_does_not_make_a_step_look_paid() {
        // 700 MB/s shared, but one window in every five comes out at a third (a stall of our
        // own): a step measured against such a window must not count as paid.
        let per = |t: Duration, n: usize| {
            let slot = t.as_millis() / 50;
            let total = if slot % 5 == 2 { 230e6 } else { 700e6 };
            total / n as f64
        };
        for max in [32, 64] {
            let (n, _) = drive(per, max, 3.0);
            assert!(n <= 16, "limit {n} of {max}");
        }
    }

    #[test]
    fn a_cap_that_appears_later_is_noticed() {
        // Uncapped (shared 700 MB/s) for the first second, then 10 MB/s per connection.
        let (n, _) = drive(burst_then_cap(1000, 700e6, 10e6), 32, 4.0);
        assert_eq!(n, 32);
    }

    #[test]
    fn cuts_go_to_the_transfer_that_would_finish_last() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, size: u64| {
            crate::write::BlobFile::create(&dir.path().join(name), &dir.path().join("f"), size)
                .unwrap()
        };
        let a = mk("a", 64 << 20);
        let b = mk("b", 16 << 20);
        let wa = a.writer().unwrap();
        let wb = b.writer().unwrap();
        let (sa, sb) = (wa.span(), wb.span());
        let now = Instant::now();
        let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        s.first_byte("o", MS, true, now);
        let flows = |bytes: [u64; 2]| {
            vec![
                FlowInfo {
                    id: 1,
                    blob: 0,
                    span: &sa,
                    origin: Some("o"),
                    bytes: bytes[0],
                    first_byte: Some(now),
                    splittable: true,
                },
                FlowInfo {
                    id: 2,
                    blob: 1,
                    span: &sb,
                    origin: Some("o"),
                    bytes: bytes[1],
                    first_byte: Some(now),
                    splittable: true,
                },
            ]
        };
        // b is 10x slower: its 16 MiB take longer than a's 64 MiB.
        let blobs = [
            BlobInfo {
                blob: 0,
                unassigned: 0,
                running: 1,
                origin: Some("o"),
                races: 0,
                prefix: 0,
            },
            BlobInfo {
                blob: 1,
                unassigned: 0,
                running: 1,
                origin: Some("o"),
                races: 0,
                prefix: 0,
            },
        ];
        s.tick(now + 100 * MS, flows([0, 0]).into_iter());
        s.tick(now + 200 * MS, flows([10_000_000, 100_000]).into_iter());
        let Some(Decision::Cut(cut)) = s.pick(&flows([0, 0]), &blobs, |_| 2, &[0]) else {
            panic!("no cut");
        };
        assert_eq!(cut.victim, 2);
        assert!(!cut.race);
        // The slow victim keeps little: the fast newcomer takes most of the span.
        assert!(cut.at < 4 << 20, "cut at {}", cut.at);
        assert_eq!(cut.at % ALIGN, 0);
        // No cut beyond the origin's limit, or the blob's.
        let mut fresh = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        // (Before any measurement: a connection per blob, and INITIAL_LIMIT more.)
        assert!(fresh
            .pick(&flows([0, 0]), &blobs, |_| 2 + INITIAL_LIMIT, &[0])
            .is_none());
        assert!(fresh.pick(&flows([0, 0]), &blobs, |_| 1, &[0]).is_some());
        let mut per_blob = Scheduler::new(FanOut::Max, 32, 1, 1 << 20);
        assert!(per_blob.pick(&flows([0, 0]), &blobs, |_| 2, &[0]).is_none());
        // Unassigned bytes go out as a piece before anything is cut, to the blob with most.
        let more = [
            BlobInfo {
                unassigned: 8 << 20,
                ..blobs[0]
            },
            BlobInfo {
                unassigned: 16 << 20,
                ..blobs[1]
            },
        ];
        assert!(matches!(
            s.pick(&flows([0, 0]), &more, |_| 2, &[0]),
            Some(Decision::Piece { blob: 1, .. })
        ));
    }

    /// What a new connection can expect is what the origin's connections got, though they
    /// sampled at different ticks and have all ended: the one left, stopped after its first
    /// MiB, is raced from where it stopped. (Red when the typical rate came only from
    /// ticks where three flows sampled at once: it was never taken, and the stopped flow's
    /// own rate said a new one would be as slow.)
    #[test]
    fn a_stopped_flow_left_alone_is_raced_from_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, size: u64| {
            crate::write::BlobFile::create(&dir.path().join(name), &dir.path().join("f"), size)
                .unwrap()
        };
        let a = mk("a", 4 << 20);
        let b = mk("b", 64 << 20);
        let mut wa = a.writer().unwrap();
        let _rest = a.split(&wa.span(), 3 << 19).unwrap();
        assert_eq!(wa.append(&vec![1u8; 1 << 20]).unwrap(), 1 << 20);
        let wb = b.writer().unwrap();
        let (sa, sb) = (wa.span(), wb.span());
        let t0 = Instant::now();
        let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        s.first_byte("o", MS, true, t0);
        // Flow 0 (blob a) brought its first MiB at once and nothing since; flows 1-3 (blob
        // b) bring 16 MB/s each, their first bytes 10 ms apart, so that no two sample at
        // the same tick.
        let flows = |t: Duration, fast: bool| {
            let mut v = vec![FlowInfo {
                id: 0,
                blob: 0,
                span: &sa,
                origin: Some("o"),
                bytes: 1 << 20,
                first_byte: Some(t0),
                splittable: true,
            }];
            if fast {
                v.extend((1..4u64).map(|id| {
                    let first = t0 + 10 * MS * (id as u32);
                    FlowInfo {
                        id,
                        blob: 1,
                        span: &sb,
                        origin: Some("o"),
                        bytes: (16e6 * t.saturating_sub(first - t0).as_secs_f64()) as u64,
                        first_byte: Some(first),
                        splittable: true,
                    }
                }));
            }
            v
        };
        let mut t = Duration::ZERO;
        while t < Duration::from_millis(300) {
            t += 10 * MS;
            s.tick(t0 + t, flows(t, true).into_iter());
        }
        for id in 1..4 {
            s.flow_ended(id, Some("o"), 0, Some(0));
        }
        while t < Duration::from_millis(600) {
            t += 10 * MS;
            s.tick(t0 + t, flows(t, false).into_iter());
        }
        let blobs = [BlobInfo {
            blob: 0,
            unassigned: 0,
            running: 1,
            origin: Some("o"),
            races: 0,
            prefix: 0,
        }];
        let Some(Decision::Cut(cut)) = s.pick(&flows(t, false), &blobs, |_| 1, &[0]) else {
            panic!("the stopped flow was not raced");
        };
        assert_eq!(cut.victim, 0);
        assert!(cut.race);
        assert_eq!(cut.at, 1 << 20, "a stopped flow keeps nothing");
    }

    #[test]
    fn exact_round_trips_replace_estimates() {
        let now = Instant::now();
        let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        let rtt = |s: &Scheduler| s.origins["o"].rtt();
        s.first_byte("o", 60 * MS, false, now);
        s.first_byte("o", 50 * MS, false, now);
        assert_eq!(rtt(&s), 50 * MS, "the smallest estimate");
        // A request on an open connection: exact, even if longer than an estimate (a
        // fresh connection's halved time errs low by half the server's think time).
        s.first_byte("o", 70 * MS, true, now);
        assert_eq!(rtt(&s), 70 * MS);
        s.first_byte("o", 20 * MS, false, now);
        assert_eq!(rtt(&s), 70 * MS, "estimates no longer count");
        s.first_byte("o", 65 * MS, true, now);
        assert_eq!(rtt(&s), 65 * MS, "the smallest exact sample");
    }

    /// On a fast origin, pieces that come and go between two ticks are never sampled: only a
    /// flow that stalled lived long enough for a rate (10 MB/s here), while three pieces of
    /// 2.5 MB each came in every 10 ms besides. The next piece is sized by what the windows
    /// counted per connection, not by the one slow flow. (Red without the windows' floor, or
    /// without counting the unsampled pieces' bytes: 2.5 MB; on uncapped loopback that made
    /// 427 requests for 1 GiB.)
    #[test]
    fn pieces_too_short_to_sample_still_size_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let blob =
            crate::write::BlobFile::create(&dir.path().join("a"), &dir.path().join("f"), 1 << 30)
                .unwrap();
        let span = blob.writer().unwrap().span();
        let t0 = Instant::now();
        let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        s.first_byte("o", MS, true, t0);
        let slow = |bytes: u64| FlowInfo {
            id: 0,
            blob: 0,
            span: &span,
            origin: Some("o"),
            bytes,
            first_byte: Some(t0),
            splittable: true,
        };
        let mut t = t0;
        let mut id = 1;
        for _ in 0..30 {
            t += 10 * MS;
            for _ in 0..3 {
                s.flow_ended(id, Some("o"), 2_500_000, Some(0));
                id += 1;
            }
            let bytes = (10e6 * t.duration_since(t0).as_secs_f64()) as u64;
            s.tick(t, [slow(bytes)].into_iter());
        }
        let len = s.piece_len(Some("o"), &[slow(3_000_000)], None);
        assert!(len >= 40_000_000, "{len}");
    }

    /// Flows 0..4 on lanes 0..4, each reading a 4 MiB piece of one 64 MiB blob from its
    /// start at `rates` bytes/s, ticked for `ms` milliseconds.
    fn four_pieces<'a>(
        s: &mut Scheduler,
        spans: &'a [SpanRef],
        rates: [f64; 4],
        t0: Instant,
        ms: u32,
    ) -> Vec<FlowInfo<'a>> {
        let flows = |t: Duration| -> Vec<FlowInfo<'a>> {
            (0..4)
                .map(|i| FlowInfo {
                    id: i as u64,
                    blob: 0,
                    span: &spans[i],
                    origin: Some("o"),
                    bytes: (rates[i] * t.as_secs_f64()) as u64,
                    first_byte: Some(t0),
                    splittable: true,
                })
                .collect()
        };
        let mut t = Duration::ZERO;
        while t < MS * ms {
            t += 10 * MS;
            s.tick(t0 + t, flows(t).into_iter());
        }
        flows(t)
    }

    fn blob_in_pieces(dir: &Path) -> (Arc<BlobFile>, Vec<SpanWriter>) {
        let a = BlobFile::create(&dir.join("a"), &dir.join("f"), 64 << 20).unwrap();
        let writers = (0..4).map(|_| a.take(4 << 20).unwrap()).collect();
        (a, writers)
    }

    /// A straggler is cut while its blob still has bytes to hand out, the one the blob's
    /// hash waits for first: a new connection takes most of its rest rather than the next
    /// unassigned piece; with no straggler the next piece goes out. (Red with cuts only
    /// once a blob's bytes have all been handed out: the decision was a piece.)
    #[test]
    fn a_straggler_is_cut_while_its_blob_still_has_bytes_to_hand_out() {
        let dir = tempfile::tempdir().unwrap();
        let (a, writers) = blob_in_pieces(dir.path());
        let spans: Vec<SpanRef> = writers.iter().map(SpanWriter::span).collect();
        let blobs = |prefix: u64| {
            [BlobInfo {
                blob: 0,
                unassigned: a.unassigned(),
                running: 4,
                origin: Some("o"),
                races: 0,
                prefix,
            }]
        };
        assert_eq!(a.unassigned(), 48 << 20);
        let t0 = Instant::now();
        let cut_of = |rates: [f64; 4], races: u32| {
            let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
            s.first_byte("o", MS, true, t0);
            let flows = four_pieces(&mut s, &spans, rates, t0, 400);
            let mut blobs = blobs(0);
            blobs[0].races = races;
            match s.pick(&flows, &blobs, |_| 4, &[4, 5]) {
                Some(Decision::Cut(cut)) => Some(cut),
                _ => None,
            }
        };
        // Pieces 0 and 2 are slow against 8 MB/s; piece 0 holds the hash, and goes first
        // though piece 2 would take longer. So slow that a minimum piece would keep it
        // longer than the new connection needs for all the rest: raced, keeping next to
        // nothing.
        let cut = cut_of([400e3, 8e6, 150e3, 8e6], 0).expect("the straggler was not cut");
        assert_eq!(cut.victim, 0, "the one the hash waits for goes first");
        assert!(cut.race);
        assert!(cut.at < 64 << 10, "the victim keeps {}", cut.at);
        // The blob's early races spent: split, the victim keeping a minimum piece.
        let cut = cut_of([400e3, 8e6, 150e3, 8e6], MAX_EARLY_RACES_PER_BLOB).expect("not cut");
        assert_eq!(cut.victim, 0);
        assert!(!cut.race);
        assert!((1 << 20..2 << 20).contains(&cut.at), "{}", cut.at);
        // Less slow: split where both finish together.
        let cut = cut_of([3e6, 8e6, 8e6, 8e6], 0).expect("the straggler was not cut");
        assert_eq!(cut.victim, 0);
        assert!(!cut.race);
        assert!((1 << 20..2 << 20).contains(&cut.at), "{}", cut.at);
        // A straggler higher up is cut as well.
        let cut = cut_of([8e6, 8e6, 150e3, 8e6], 0).expect("the one higher up was not cut");
        assert_eq!(cut.victim, 2);
        // Every connection alike: the next piece.
        let mut even = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        even.first_byte("o", MS, true, t0);
        let flows = four_pieces(&mut even, &spans, [8e6; 4], t0, 400);
        assert!(matches!(
            even.pick(&flows, &blobs(0), |_| 4, &[4, 5]),
            Some(Decision::Piece { blob: 0, .. })
        ));
    }

    /// A lane whose last transfer from an origin was a straggler's is the last choice for
    /// the next request there, after lanes measured fast (the fastest first) and lanes not
    /// measured, and a piece it does get is sized to take it no longer than the others'
    /// take them; for LANE_MEMORY. (Red with the first free lane taken, with pieces sized by
    /// the origin alone, and with a lane's rate kept for the rest of the pull.)
    #[test]
    fn lanes_measured_slow_are_chosen_last_and_get_shorter_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let (_a, writers) = blob_in_pieces(dir.path());
        let spans: Vec<SpanRef> = writers.iter().map(SpanWriter::span).collect();
        let t0 = Instant::now();
        let mut s = Scheduler::new(FanOut::Auto, 32, 32, 1 << 20);
        s.first_byte("o", MS, true, t0);
        let flows = four_pieces(&mut s, &spans, [1e6, 16e6, 20e6, 20e6], t0, 200);
        // The slow flow (lane 0) and a fast one (lane 1) end; two fast ones go on.
        s.flow_ended(0, Some("o"), flows[0].bytes, Some(0));
        s.flow_ended(1, Some("o"), flows[1].bytes, Some(1));
        let going = &flows[2..];
        s.tick(t0 + 210 * MS, going.iter().copied());
        assert_eq!(s.lane_for(Some("o"), &[0, 1, 7]).0, 1);
        assert_eq!(s.lane_for(Some("o"), &[0, 7]), (7, None));
        assert_eq!(s.lane_for(None, &[0, 7]).0, 7, "a blob's first request too");
        let (lane, rate) = s.lane_for(Some("o"), &[0]);
        assert_eq!(lane, 0);
        let rate = rate.expect("lane 0 was measured");
        assert!(rate < 2e6, "{rate}");
        // Another origin knows nothing of these lanes.
        assert_eq!(s.lane_for(Some("p"), &[0, 7]), (0, None));
        let usual = s.piece_len(Some("o"), going, None);
        let slow = s.piece_len(Some("o"), going, Some(rate));
        assert!(usual >= 4 << 20, "{usual}");
        assert!(slow < usual / 4, "{slow} against {usual}");
        assert!(slow >= 1 << 20, "never below a minimum piece: {slow}");
        // What a lane got counts for LANE_MEMORY: then lane 0 is as good as any unmeasured.
        s.tick(t0 + 210 * MS + LANE_MEMORY, going.iter().copied());
        assert_eq!(s.lane_for(Some("o"), &[0, 7]), (0, None));
        assert_eq!(s.lane_for(None, &[0, 7]).0, 0);
    }

    #[test]
    fn small_blobs_are_one_request() {
        let s = Scheduler::new(FanOut::Auto, 32, 32, 4 << 20);
        assert!(s.whole_request((8 << 20) - 1));
        assert!(!s.whole_request(8 << 20));
    }
}

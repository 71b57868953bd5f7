//! One transfer: the requests that fill one span of one blob, each retried on its own and
//! resumed from the byte it reached. Which span, and when it is cut, is the scheduler's
//! business; a cut simply makes the span end sooner, and the transfer stops there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use super::Fetcher;
use crate::error::{redact_url, Error, Result};
use crate::manifest::BlobDescriptor;
use crate::progress::EventKind;
use crate::registry::{origin_of, BlobBody, BlobResponse};
use crate::verify::InOrderHasher;
use crate::write::{BlobFile, SpanWriter};

/// What the transfers of one blob share.
pub(super) struct BlobState {
    pub desc: BlobDescriptor,
    pub file: Arc<BlobFile>,
    pub hasher: Arc<InOrderHasher>,
    /// Where cut-off spans are fetched from: the URL that answered the blob's first
    /// request (after redirects), the registry's blob URL until then.
    pub url: Mutex<String>,
    /// Bytes received for this blob (all its transfers).
    pub downloaded: AtomicU64,
    /// HTTP requests for this blob that were answered, redirect hops and re-sends after a
    /// 401 included: its round trips, besides new connections.
    pub requests: AtomicU32,
    /// The blob is small enough to be asked for without `Range`.
    pub whole_request: bool,
    /// `scheme://host:port` of `url`, set once the blob's first response has come (`None`
    /// inside: a URL without one).
    pub origin: OnceLock<Option<String>>,
    /// The resume journal (none without resume).
    pub journal: Option<Mutex<crate::resume::Journal>>,
    /// A durable checkpoint (fdatasync + `D` records) is running.
    pub flushing: AtomicBool,
}

impl BlobState {
    /// Where the blob's bytes come from, once its first response has said.
    pub(super) fn origin(&self) -> Option<&str> {
        self.origin.get()?.as_deref()
    }
}

/// What one transfer shows the scheduler while it runs.
pub(super) struct FlowStats {
    /// Bytes received.
    pub bytes: AtomicU64,
    /// `scheme://host:port` of the server sending the bytes.
    pub origin: OnceLock<String>,
    /// When the first response arrived, the round trip its exchange showed, and whether that
    /// is exact (see [`crate::http::Exchange::round_trip`]).
    pub first_response: OnceLock<(Instant, Duration, bool)>,
    /// The server answers ranges with ranges: this transfer may be cut.
    pub splittable: AtomicBool,
    /// A retry took it to other lanes (what it got is not its own lane's).
    pub moved: AtomicBool,
    /// The last refusal of a request of this transfer as one too many (429, 503) not yet
    /// told to the scheduler, which takes it (see the scheduler's module docs).
    pub refused: Mutex<Option<Refusal>>,
}

/// How many times in a row, without a byte between, a transfer waits for an answer of its
/// refuser to end and asks again. The waits spend no retry (the origin answers others: the
/// refusal is of one request too many, not a failure), so something must end them for a
/// request the origin refuses for good while it answers the rest (a broken object behind a
/// CDN); after this many, a refusal is an error like any other (back-off, retry budget).
const MAX_REFUSED_WAITS: u32 = 16;

/// How often a transfer that gets no data looks whether a cut has left it nothing to do.
const CUT_POLL: Duration = Duration::from_millis(100);
/// An answer that ends early with fewer bytes than this counts as short (see
/// `MAX_SHORT_ENDS`).
const SHORT_END: u64 = 64 << 10;
/// Short answers in a row asked again at once; the next is an error (retried with a
/// back-off, within the retry budget).
const MAX_SHORT_ENDS: u32 = 8;

/// Awaits `fut`, looking every [`CUT_POLL`] whether a cut has left `writer` complete
/// (a race took all it lacked while it waited: for an answer, a back-off, a refused slot);
/// then gives `fut` up: None.
async fn unless_cut<T>(
    writer: &SpanWriter,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(fut);
    loop {
        match tokio::time::timeout(CUT_POLL, &mut fut).await {
            Ok(v) => return Some(v),
            Err(_) if writer.is_complete() => return None,
            Err(_) => {}
        }
    }
}

/// An origin refused a request as one too many while answering `answering` of ours: it
/// allows no more than those at once.
pub(super) struct Refusal {
    pub origin: String,
    pub answering: usize,
}

impl FlowStats {
    pub(super) fn new(origin: Option<String>) -> FlowStats {
        let o = OnceLock::new();
        if let Some(origin) = origin {
            let _ = o.set(origin);
        }
        FlowStats {
            bytes: AtomicU64::new(0),
            origin: o,
            first_response: OnceLock::new(),
            splittable: AtomicBool::new(false),
            moved: AtomicBool::new(false),
            refused: Mutex::new(None),
        }
    }
}

/// Per origin: how many of our requests it is answering now (a 2xx came and the body is
/// being read), and a wake-up for transfers it refused as a request too many, given each
/// time one of those answers ends (a slot there came free).
#[derive(Default)]
pub(super) struct Answering(Mutex<HashMap<String, (usize, Arc<tokio::sync::Notify>)>>);

/// One answer being read from `origin` (see [`Answering`]); ends when dropped.
pub(super) struct Answer<'a> {
    all: &'a Answering,
    origin: String,
}

impl Answering {
    /// A 2xx from `origin` is being read.
    pub(super) fn begin(&self, origin: &str) -> Answer<'_> {
        if let Ok(mut m) = self.0.lock() {
            m.entry(origin.to_string()).or_default().0 += 1;
        }
        Answer {
            all: self,
            origin: origin.to_string(),
        }
    }

    /// How many answers `origin` is giving us now, and what a transfer it refused waits on;
    /// None if it is giving none (or never answered a blob request of ours: a token service).
    pub(super) fn refused_by(&self, origin: &str) -> Option<(usize, Arc<tokio::sync::Notify>)> {
        let m = self.0.lock().ok()?;
        m.get(origin)
            .filter(|e| e.0 > 0)
            .map(|e| (e.0, e.1.clone()))
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.all.0.lock() {
            if let Some(e) = m.get_mut(&self.origin) {
                e.0 = e.0.saturating_sub(1);
                // Only for a transfer waiting (it holds a clone, taken under this lock):
                // a wake-up nobody waits for would be kept by `Notify` and end the next
                // refused transfer's wait at once, before any slot came free.
                if Arc::strong_count(&e.1) > 1 {
                    e.1.notify_one();
                }
            }
        }
    }
}

/// How a transfer's request goes out.
pub(super) struct Flow<'a> {
    pub blob: &'a BlobState,
    pub stats: &'a FlowStats,
    /// Answers being read, per origin; where refused transfers wait for a slot.
    pub answering: &'a Answering,
    /// The blob's first transfer (it learns the URL the others use).
    pub first: bool,
    pub lane: usize,
}

/// Where one request of a transfer goes.
#[derive(Clone, Copy)]
struct Lane {
    /// The transport's lane (its pool, modulo their number).
    index: usize,
    /// Whether its request to the registry itself may share the registry's HTTP/2
    /// connection (see [`crate::registry::Registry::get_blob`]).
    share_registry_connection: bool,
}

impl Fetcher<'_> {
    /// Fills `writer`'s span: requests, retries and resumes until every byte of it (as the
    /// scheduler may shorten it) is written.
    pub(super) async fn transfer(&self, flow: Flow<'_>, mut writer: SpanWriter) -> Result<()> {
        let s = flow.blob;
        let registry_url = self.registry.blob_url(&s.desc.digest);
        let mut url = if flow.first {
            registry_url.clone()
        } else {
            s.url.lock().map_err(|_| internal("poisoned"))?.clone()
        };
        // `attempt` counts failures in a row that brought no new bytes (the retry budget);
        // `retried` counts them all, and is capped too so a trickling server ends.
        let mut attempt = 0u32;
        let mut retried = 0u32;
        let max_retried = self.options.retry.retries.saturating_mul(10);
        let mut fell_back_to_registry = false;
        // Woken because an answer of its refuser ended: a refusal now is a race with that
        // server letting go of the slot (a cut transfer's connection lingers there until its
        // next write fails), not news of its limit.
        let mut woken = false;
        // Refusals in a row that were waited out (see below), and where the writer stood at
        // the last of them: a byte since then starts the count again.
        let (mut refused_waits, mut refused_at) = (0u32, writer.position());
        // Bodies in a row that ended early, each with under SHORT_END bytes.
        let mut short_ends = 0u32;
        loop {
            let before = writer.position();
            // A retry goes on another lane (another pool, so another connection), the
            // registry's request included: only a first try shares its connection (see
            // `Registry::get_blob`), so a stale or broken one cannot hold every try.
            let lane = Lane {
                index: flow.lane + retried as usize,
                share_registry_connection: retried == 0 && !fell_back_to_registry,
            };
            if retried > 0 {
                flow.stats.moved.store(true, Ordering::Relaxed);
            }
            let result = self.exchange(&flow, &mut writer, &url, lane).await;
            let err = match result {
                // Complete, or cut to where it stood (a race took the rest): whatever went
                // wrong after that concerns bytes another transfer fetches.
                _ if writer.is_complete() => return Ok(()),
                // A body that ended early after bringing bytes: ask for the rest at once,
                // unless bodies keep ending after a little (a server answering each request
                // with a few bytes): past MAX_SHORT_ENDS in a row that is an error like any
                // other, with a back-off and the retry budget, so such a server ends.
                Ok(()) if writer.position() > before => {
                    let got = writer.position() - before;
                    short_ends = if got < SHORT_END { short_ends + 1 } else { 0 };
                    if short_ends <= MAX_SHORT_ENDS {
                        continue;
                    }
                    short_ends = 0;
                    Error::network(
                        "read",
                        &url,
                        format!(
                            "blob {}: {} answers in a row each ended with under {SHORT_END} \
                             bytes, the last at byte {} of range {}-{}",
                            s.desc.digest,
                            MAX_SHORT_ENDS + 1,
                            writer.position(),
                            writer.range().start,
                            writer.range().end.saturating_sub(1)
                        ),
                    )
                }
                Ok(()) => Error::network(
                    "read",
                    &url,
                    format!(
                        "blob {}: body ended at byte {} of range {}-{}",
                        s.desc.digest,
                        writer.position(),
                        writer.range().start,
                        writer.range().end.saturating_sub(1)
                    ),
                ),
                Err(e) => e,
            };
            // A URL the registry redirected us to may expire (presigned): ask the registry again.
            if !err.is_transient() && url != registry_url && !fell_back_to_registry {
                if let Error::Registry {
                    status: 400 | 401 | 403 | 404 | 410,
                    ..
                } = err
                {
                    tracing::debug!(url = %redact_url(&url), "redirect target refused; asking the registry again");
                    fell_back_to_registry = true;
                    url = registry_url.clone();
                    continue;
                }
            }
            // A 429 or 503 without a `Retry-After` from an origin that is answering other
            // blob requests of ours: it refuses a request as one too many (nginx's
            // `limit_conn`, an object store's "slow down"). The scheduler lowers the origin's
            // limit (it takes `refused`), and this transfer waits for one of those answers to
            // end rather than for a timer. Anything else (an origin answering none of ours, a
            // token service) is an error like any other.
            let refused_by = match &err {
                Error::Registry {
                    status: 429 | 503,
                    url,
                    retry_after: None,
                    ..
                } => origin_of(url),
                _ => None,
            };
            let was_woken = std::mem::take(&mut woken);
            if writer.position() != refused_at {
                (refused_waits, refused_at) = (0, writer.position());
            }
            if let Some(origin) = refused_by
                .as_ref()
                .filter(|_| refused_waits < MAX_REFUSED_WAITS)
            {
                if let Some((answering, freed)) = flow.answering.refused_by(origin) {
                    refused_waits += 1;
                    if !was_woken {
                        if let Ok(mut r) = flow.stats.refused.lock() {
                            *r = Some(Refusal {
                                origin: origin.clone(),
                                answering,
                            });
                        }
                    }
                    // The origin is answering others of ours: this is no failure, and no
                    // timer helps. Wait until one of them ends (each does: by its bytes, or by
                    // an error of its own), then ask again.
                    tracing::debug!(blob = %s.desc.digest, range = ?writer.range(), %origin, answering, "refused as a request too many; waiting for one of the origin's answers to end");
                    if unless_cut(&writer, freed.notified()).await.is_none() {
                        return Ok(());
                    }
                    woken = true;
                    continue;
                }
            }
            if writer.position() > before {
                attempt = 0;
            }
            if !err.is_transient()
                || attempt >= self.options.retry.retries
                || retried >= max_retried
            {
                return Err(err.with_retries(retried));
            }
            attempt += 1;
            retried += 1;
            let delay = self.options.retry.delay(attempt, &err);
            self.reporter.report(EventKind::BlobRetrying {
                digest: s.desc.digest,
                attempt: retried,
                error: err.to_string(),
            });
            tracing::warn!(blob = %s.desc.digest, range = ?writer.range(), attempt, error = %err, "retrying");
            if unless_cut(&writer, tokio::time::sleep(delay))
                .await
                .is_none()
            {
                return Ok(());
            }
        }
    }

    /// One HTTP exchange: asks for what `writer` still lacks and appends what comes.
    async fn exchange(
        &self,
        flow: &Flow<'_>,
        writer: &mut SpanWriter,
        url: &str,
        lane: Lane,
    ) -> Result<()> {
        let s = flow.blob;
        let size = s.desc.size;
        let from = writer.position();
        let end = writer.range().end;
        if from >= end && size > 0 {
            return Ok(()); // cut to nothing while waiting for a retry
        }
        // A small blob is asked for whole (no Range) unless resuming; everything else as a
        // closed range, so a cut never leaves the server sending bytes nobody wants for long.
        let range = if (flow.first && from == 0 && s.whole_request) || size == 0 {
            None
        } else {
            Some((from, end - 1))
        };
        let asked = std::time::Instant::now();
        let answer = unless_cut(
            writer,
            tokio::time::timeout(
                self.options.stall_timeout,
                self.registry
                    .get_blob(url, range, lane.index, lane.share_registry_connection),
            ),
        );
        let Some(answer) = answer.await else {
            return Ok(()); // a race took all of it while we waited for the answer
        };
        let resp = match answer {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::network(
                    "GET",
                    url,
                    format!("no response in {}s", self.options.stall_timeout.as_secs()),
                ))
            }
        };
        let BlobResponse {
            body: kind,
            response,
            url: final_url,
            exchanges,
        } = resp;
        s.requests.fetch_add(exchanges, Ordering::Relaxed);
        tracing::debug!(
            blob = %s.desc.digest,
            url = %redact_url(&final_url),
            range = ?range,
            status = response.status().as_u16(),
            lane = lane.index,
            "response"
        );
        if flow.first {
            *s.url.lock().map_err(|_| internal("poisoned"))? = final_url.clone();
        }
        // Counted as answered by its origin until this exchange ends (its body is read, cut
        // or failed).
        let _answer = origin_of(&final_url).map(|origin| {
            let answer = flow.answering.begin(&origin);
            let _ = flow.stats.origin.set(origin);
            answer
        });
        // The origin's round trip: the last hop's (a redirect's hop went elsewhere).
        let (round_trip, exact) = response
            .extensions()
            .get::<crate::http::Exchange>()
            .map_or_else(|| (asked.elapsed(), false), |x| x.round_trip());
        let _ = flow
            .stats
            .first_response
            .set((Instant::now(), round_trip, exact));
        let what = || format!("blob {} from {}", s.desc.digest, redact_url(&final_url));
        let (skip, body_len) = match kind {
            BlobBody::Partial {
                start,
                end: last,
                total,
            } => {
                if total.is_some_and(|t| t != size) {
                    return Err(Error::SizeMismatch {
                        what: format!("{} (Content-Range)", what()),
                        expected: size,
                        actual: total.unwrap_or(0),
                    });
                }
                let to = range.map_or(size.saturating_sub(1), |r| r.1);
                // Fewer bytes than asked are fine (the retry resumes); other bytes are not.
                if start > from || last < from || last > to {
                    return Err(Error::Registry {
                        url: redact_url(&final_url),
                        status: 206,
                        code: None,
                        message: format!("asked for bytes {from}-{to}, got {start}-{last}"),
                        retry_after: None,
                        retries: 0,
                    });
                }
                flow.stats.splittable.store(true, Ordering::Release);
                (from - start, last - start + 1)
            }
            BlobBody::Whole { length } => {
                if let Some(n) = length.filter(|&n| n != size) {
                    return Err(Error::SizeMismatch {
                        what: format!("{} (Content-Length)", what()),
                        expected: size,
                        actual: n,
                    });
                }
                if range.is_some() {
                    // The whole body comes anyway: take from it all that nobody has yet.
                    let absorbed = writer.absorb_rest();
                    tracing::debug!(blob = %s.desc.digest, absorbed, "server ignored Range; this transfer reads the whole body");
                }
                (from, size)
            }
        };
        if flow.first {
            let _ = s.origin.set(origin_of(&final_url));
        }
        self.stream(flow, writer, response, skip, body_len, &final_url)
            .await
    }

    /// Streams a body of `body_len` bytes into `writer`, dropping the first `skip` (already
    /// written, or another span's). Stops when the span is complete: at its end, or where a
    /// cut put it (the rest of the body is left unread and the connection closed), also
    /// while no data comes: a stalled straggler whose whole tail a race took is done at once,
    /// not after the stall timeout.
    async fn stream(
        &self,
        flow: &Flow<'_>,
        writer: &mut SpanWriter,
        resp: http::Response<hyper::body::Incoming>,
        mut skip: u64,
        body_len: u64,
        url: &str,
    ) -> Result<()> {
        let s = flow.blob;
        let mut body = resp.into_body();
        let mut since_poke = 0usize;
        let mut consumed = 0u64;
        let stall = self.options.stall_timeout;
        let mut last_data = Instant::now();
        loop {
            let failed = |what: String| {
                Error::network(
                    "read",
                    url,
                    format!(
                        "blob {} range {}-{}: {what}",
                        s.desc.digest,
                        writer.range().start,
                        writer.range().end.saturating_sub(1),
                    ),
                )
            };
            // `frame()` is cancel-safe: a poll that times out loses nothing.
            let frame = match tokio::time::timeout(stall.min(CUT_POLL), body.frame()).await {
                Err(_) if writer.is_complete() => return Ok(()),
                Err(_) if last_data.elapsed() < stall => continue,
                Err(_) => {
                    return Err(failed(format!(
                        "no data for {}s at byte {}",
                        stall.as_secs(),
                        writer.position()
                    )))
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    return Err(failed(format!(
                        "body failed at byte {}: {e}",
                        writer.position()
                    )))
                }
                Ok(Some(Ok(frame))) => {
                    last_data = Instant::now();
                    frame
                }
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            consumed += data.len() as u64;
            if consumed > body_len {
                return Err(Error::SizeMismatch {
                    what: format!("blob {} from {}", s.desc.digest, redact_url(url)),
                    expected: body_len,
                    actual: consumed,
                });
            }
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                let _ = data.split_to(n);
                skip -= n as u64;
            }
            if data.is_empty() {
                continue;
            }
            let taken = writer.append(&data)?;
            flow.stats.bytes.fetch_add(taken as u64, Ordering::Relaxed);
            let total = s.downloaded.fetch_add(taken as u64, Ordering::Relaxed) + taken as u64;
            since_poke += taken;
            let complete = writer.is_complete();
            if since_poke >= 1 << 20 || complete {
                since_poke = 0;
                s.hasher.poke();
                self.reporter.report(EventKind::BlobProgress {
                    digest: s.desc.digest,
                    downloaded: total,
                });
            }
            if complete {
                if consumed < body_len {
                    // The rest belongs to other spans (a cut, or a whole-blob body).
                    return Ok(());
                }
                // The body must end here: reading its end also lets the connection be reused.
                return match tokio::time::timeout(stall, body.frame()).await {
                    Ok(Some(Ok(f))) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                        Err(Error::SizeMismatch {
                            what: format!("blob {} from {}", s.desc.digest, redact_url(url)),
                            expected: body_len,
                            actual: body_len + f.data_ref().map_or(0, |d| d.len() as u64),
                        })
                    }
                    _ => Ok(()),
                };
            }
        }
    }
}

pub(super) fn internal(what: &str) -> Error {
    Error::Internal(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait (for an answer, a back-off, a refused slot) is given up once a race has cut
    /// the transfer to where it stands, and not before.
    #[tokio::test]
    async fn a_wait_ends_when_a_cut_leaves_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            BlobFile::create(&dir.path().join("b.partial"), &dir.path().join("b"), 1000).unwrap();
        let mut writer = file.writer().unwrap();
        assert_eq!(writer.append(&[7u8; 100]).unwrap(), 100);
        // Not cut: the wait runs to its end.
        let waited = unless_cut(&writer, tokio::time::sleep(CUT_POLL * 3)).await;
        assert!(waited.is_some());
        // Cut where it stands while waiting for something that never comes: given up.
        let span = writer.span();
        let cutter = {
            let file = file.clone();
            tokio::spawn(async move {
                tokio::time::sleep(CUT_POLL).await;
                file.split(&span, 100).map(|w| w.range())
            })
        };
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            unless_cut(&writer, std::future::pending::<()>()),
        )
        .await
        .expect("the wait ended");
        assert!(waited.is_none());
        assert_eq!(cutter.await.unwrap(), Some(100..1000));
        assert!(writer.is_complete());
    }
}

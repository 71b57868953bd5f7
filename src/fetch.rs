//! The concurrent stage. Every blob's bytes come over HTTP into its mapped partial file,
//! large blobs as range chunks over many connections, while its in-order hasher follows on
//! the hashing pool; a blob is renamed into place once its digest matches.
//!
//! Scheduling: one bound on requests in flight for the whole pull, and one per blob. The
//! first request of a blob (the *probe*) asks for its first chunk; a `206` with the right
//! `Content-Range` says ranges work and gives the URL after redirects, which the other
//! chunks use directly (no `Authorization` goes to a host the registry redirected to). A
//! `200` means the server ignores `Range`, and that one response streams the whole blob.
//! Chunks of blobs already started go before the probes of new blobs, largest blobs first.
//!
//! Each request is retried on its own (reset, truncation, stall, 5xx, 429 with
//! `Retry-After`) and resumes from the byte it reached: writers are append-only, so every
//! byte is written once and the hash is of exactly what is on disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::digest::Digest;
use crate::error::{redact_url, Error, Result};
use crate::layout::Layout;
use crate::manifest::BlobDescriptor;
use crate::plan::Chunking;
use crate::progress::{Event, Reporter};
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::verify::{HashPool, InOrderHasher};
use crate::write::{BlobFile, ChunkWriter};

/// Knobs of the fetch stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchOptions {
    /// Requests in flight for the whole pull.
    pub connections: usize,
    /// Requests in flight for one blob.
    pub connections_per_blob: usize,
    /// How blobs are cut into ranges.
    pub chunking: Chunking,
    /// Retries per request.
    pub retry: RetryPolicy,
    /// No bytes for this long and the request is re-issued.
    pub stall_timeout: Duration,
    /// A blob whose first connection is faster than this (bytes/s) is streamed on that
    /// connection alone: it is not capped the way CDNs cap, and more ranges would only cost
    /// CPU on both ends. `None`: always ranges.
    pub fast_connection: Option<f64>,
}

/// What the fetch stage needs from the pull.
pub(crate) struct Fetcher<'a> {
    pub registry: &'a Registry,
    pub layout: &'a Layout,
    pub reporter: &'a dyn Reporter,
    pub hash_pool: &'a Arc<HashPool>,
    pub options: FetchOptions,
    /// Origins (`scheme://host:port`) a connection has been fast to.
    pub fast_origins: Mutex<std::collections::HashSet<String>>,
}

/// What the futures of one blob share.
struct Shared {
    desc: BlobDescriptor,
    file: Arc<BlobFile>,
    hasher: Arc<InOrderHasher>,
    downloaded: AtomicU64,
    /// Where chunk requests go: the registry's blob URL until a probe learns the final URL.
    url: Mutex<String>,
    /// Set by the probe once its `206` has delivered its first bytes: the URL that answered
    /// and the rate one connection gets (bytes/s). The other chunks start then, not after
    /// the probe's whole chunk.
    early: Mutex<Option<(String, f64)>>,
    /// The probe has let other chunks start: from now on no writer may take over chunks.
    early_sent: AtomicBool,
}

/// Bytes the probe reads before it judges the connection's rate.
const RATE_SAMPLE: u64 = 1 << 20;

enum Mode {
    NotStarted,
    Probing,
    Ranged,
    Whole,
}

struct BlobRun {
    desc: BlobDescriptor,
    shared: Option<Arc<Shared>>,
    digest_rx: Option<tokio::sync::oneshot::Receiver<std::io::Result<Digest>>>,
    mode: Mode,
    next_chunk: usize,
    running: usize,
    done_chunks: usize,
}

enum Job {
    Probe,
    Chunk,
}

enum Outcome {
    /// Ranges work; later chunks go to this URL.
    Ranged(String),
    /// The response held the whole blob.
    Whole,
}

impl Fetcher<'_> {
    /// Downloads and verifies every blob; stops at the first failure (in-flight requests are
    /// dropped and partial files removed). Returns bytes downloaded.
    pub(crate) async fn fetch_all(&self, blobs: &[BlobDescriptor]) -> Result<u64> {
        let mut runs: Vec<BlobRun> = Vec::new();
        let result = self.fetch_runs(blobs, &mut runs).await;
        if result.is_err() {
            // Partial files go now, not when the last hashing thread lets go of them.
            for s in runs.iter().filter_map(|r| r.shared.as_ref()) {
                s.file.discard();
            }
        }
        result
    }

    async fn fetch_runs(&self, blobs: &[BlobDescriptor], runs: &mut Vec<BlobRun>) -> Result<u64> {
        *runs = blobs
            .iter()
            .map(|d| BlobRun {
                desc: d.clone(),
                shared: None,
                digest_rx: None,
                mode: Mode::NotStarted,
                next_chunk: 0,
                running: 0,
                done_chunks: 0,
            })
            .collect();
        let wake = tokio::sync::Notify::new();
        let mut jobs = FuturesUnordered::new();
        let mut finishing = FuturesUnordered::new();
        let mut finished = 0usize;
        let mut lane = 0usize;
        let mut downloaded = 0u64;
        loop {
            while jobs.len() < self.options.connections.max(1) {
                let Some((b, job, chunk)) = self.pick(runs)? else {
                    break;
                };
                let shared = runs[b]
                    .shared
                    .clone()
                    .ok_or_else(|| internal("blob scheduled before it was opened"))?;
                lane += 1;
                let fut = self.run_job(shared, job, chunk, lane, &wake);
                jobs.push(async move { (b, fut.await) });
            }
            if jobs.is_empty() && finishing.is_empty() {
                break;
            }
            tokio::select! {
                Some((b, result)) = jobs.next() => {
                    let run = &mut runs[b];
                    run.running -= 1;
                    match result? {
                        Outcome::Ranged(url) => {
                            if let Some(s) = &run.shared {
                                *s.url.lock().map_err(|_| internal("poisoned"))? = url;
                            }
                            if matches!(run.mode, Mode::Probing) {
                                run.mode = Mode::Ranged;
                                run.next_chunk = run.next_chunk.max(1);
                            }
                            run.done_chunks += 1;
                        }
                        Outcome::Whole => {
                            run.mode = Mode::Whole;
                            run.done_chunks = run.shared.as_ref().map_or(1, |s| s.file.chunk_count());
                        }
                    }
                    let chunks = run.shared.as_ref().map_or(1, |s| s.file.chunk_count());
                    if run.done_chunks == chunks {
                        let shared = run.shared.clone().ok_or_else(|| internal("finished blob without file"))?;
                        let rx = run.digest_rx.take().ok_or_else(|| internal("blob finished twice"))?;
                        shared.hasher.poke();
                        finishing.push(finish(shared, rx));
                    }
                }
                _ = wake.notified() => {}
                Some(result) = finishing.next() => {
                    let (digest, bytes) = result?;
                    tracing::info!(blob = %digest, bytes, "verified and in place");
                    downloaded += bytes;
                    finished += 1;
                    self.reporter.report(&Event::BlobDone { digest });
                }
            }
        }
        if finished != runs.len() {
            return Err(internal("fetch ended with blobs unfinished"));
        }
        Ok(downloaded)
    }

    /// Whether a blob whose probe got `rate` bytes/s from `url` should stream whole. A CDN
    /// caps every connection alike, so once any connection to an origin has been faster
    /// than the threshold, that origin is not capped: probes that measured less were only
    /// sharing the machine with the other transfers.
    fn is_fast(&self, url: &str, rate: f64) -> bool {
        let Some(threshold) = self.options.fast_connection else {
            return false;
        };
        let origin = crate::registry::origin_of(url).unwrap_or_default();
        let Ok(mut fast) = self.fast_origins.lock() else {
            return false;
        };
        if rate > threshold {
            fast.insert(origin);
            return true;
        }
        fast.contains(&origin)
    }

    /// The next request to start: chunks of blobs already started (largest first), then the
    /// probe of the next blob.
    fn pick(&self, runs: &mut [BlobRun]) -> Result<Option<(usize, Job, usize)>> {
        for run in runs.iter_mut() {
            if let (Mode::Probing, Some(s)) = (&run.mode, &run.shared) {
                let early = s.early.lock().map_err(|_| internal("poisoned"))?.take();
                if let Some((url, rate)) = early {
                    *s.url.lock().map_err(|_| internal("poisoned"))? = url;
                    run.mode = Mode::Ranged;
                    run.next_chunk = 1;
                    tracing::debug!(blob = %run.desc.digest, mb_per_s = rate / 1e6, "ranges work");
                }
            }
        }
        for (i, run) in runs.iter_mut().enumerate() {
            if let (Mode::Ranged, Some(s)) = (&run.mode, &run.shared) {
                if run.next_chunk < s.file.chunk_count()
                    && run.running < self.options.connections_per_blob.max(1)
                {
                    let chunk = run.next_chunk;
                    run.next_chunk += 1;
                    run.running += 1;
                    return Ok(Some((i, Job::Chunk, chunk)));
                }
            }
        }
        for (i, run) in runs.iter_mut().enumerate() {
            if let Mode::NotStarted = run.mode {
                self.open(run)?;
                run.mode = Mode::Probing;
                run.running += 1;
                return Ok(Some((i, Job::Probe, 0)));
            }
        }
        Ok(None)
    }

    fn open(&self, run: &mut BlobRun) -> Result<()> {
        let d = &run.desc;
        let ranges = self.options.chunking.ranges(d.size);
        let file = BlobFile::create(
            &self.layout.partial_path(&d.digest),
            &self.layout.blob_path(&d.digest),
            d.size,
            &ranges,
        )?;
        let (hasher, rx) = InOrderHasher::new(file.clone(), self.hash_pool.clone());
        run.shared = Some(Arc::new(Shared {
            desc: d.clone(),
            file,
            hasher,
            downloaded: AtomicU64::new(0),
            url: Mutex::new(self.registry.blob_url(&d.digest)),
            early: Mutex::new(None),
            early_sent: AtomicBool::new(false),
        }));
        run.digest_rx = Some(rx);
        Ok(())
    }

    /// One request's worth of work, retried on its own and resumed where it stopped.
    async fn run_job(
        &self,
        s: Arc<Shared>,
        job: Job,
        chunk: usize,
        lane: usize,
        wake: &tokio::sync::Notify,
    ) -> Result<Outcome> {
        let mut writer = s
            .file
            .claim(chunk)
            .ok_or_else(|| internal("chunk claimed twice"))?;
        let single = s.file.chunk_count() == 1;
        // Only a probe of a many-chunk blob reports early.
        let signal = (matches!(job, Job::Probe) && !single).then_some(wake);
        let registry_url = self.registry.blob_url(&s.desc.digest);
        let mut url = s.url.lock().map_err(|_| internal("poisoned"))?.clone();
        // `attempt` counts failures in a row that brought no new bytes (the retry budget);
        // `retried` counts them all, and is capped too so a trickling server ends.
        let mut attempt = 0u32;
        let mut retried = 0u32;
        let max_retried = self.options.retry.retries.saturating_mul(10);
        let mut fell_back_to_registry = false;
        loop {
            let before = writer.written();
            let result = self
                .transfer(
                    &s,
                    &mut writer,
                    &url,
                    single,
                    lane + retried as usize,
                    signal,
                )
                .await;
            let err = match result {
                Ok(outcome) if writer.is_complete() => return Ok(outcome),
                // A range answered in full whose writer owns more (a fast probe took over
                // the blob), or a body that ended early after bringing bytes: ask for the
                // rest at once; that is no failure.
                Ok(_) if writer.written() > before => continue,
                Ok(_) => Error::network(
                    "read",
                    &url,
                    format!(
                        "blob {}: body ended after {} of {} bytes of range {:?}",
                        s.desc.digest,
                        writer.written(),
                        writer.range().end - writer.range().start,
                        writer.range()
                    ),
                ),
                Err(e) => e,
            };
            // A URL the registry redirected us to may expire (presigned): ask the registry again.
            if !err.is_transient()
                && url != registry_url
                && !fell_back_to_registry
                && matches!(job, Job::Chunk)
            {
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
            if writer.written() > before {
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
            self.reporter.report(&Event::BlobRetrying {
                digest: s.desc.digest,
                attempt: retried,
                error: err.to_string(),
            });
            tracing::warn!(blob = %s.desc.digest, range = ?writer.range(), attempt, error = %err, "retrying");
            tokio::time::sleep(self.options.retry.delay(attempt, &err)).await;
        }
    }

    /// One HTTP exchange: asks for what `writer` still lacks and appends what comes.
    async fn transfer(
        &self,
        s: &Shared,
        writer: &mut ChunkWriter,
        url: &str,
        single: bool,
        lane: usize,
        signal: Option<&tokio::sync::Notify>,
    ) -> Result<Outcome> {
        let r = writer.range();
        let from = r.start + writer.written();
        let size = s.desc.size;
        // A single-chunk blob is asked for whole (no Range) unless resuming.
        let range = if single && from == 0 {
            None
        } else {
            Some((from, r.end - 1))
        };
        if r.end == r.start {
            // A 0-byte blob: nothing to ask for but its existence.
            let (resp, final_url) = self.registry.get_blob(url, None, lane).await?;
            check_length(&resp, 0, &s.desc.digest, &final_url)?;
            return Ok(if single {
                Outcome::Whole
            } else {
                Outcome::Ranged(final_url)
            });
        }
        let (resp, final_url) = match tokio::time::timeout(
            self.options.stall_timeout,
            self.registry.get_blob(url, range, lane),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::network(
                    "GET",
                    url,
                    format!("no response in {}s", self.options.stall_timeout.as_secs()),
                ))
            }
        };
        tracing::debug!(
            blob = %s.desc.digest,
            url = %redact_url(&final_url),
            range = ?range,
            status = resp.status().as_u16(),
            lane,
            "response"
        );
        let what = || format!("blob {} from {}", s.desc.digest, redact_url(&final_url));
        let skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let (start, end, total) = content_range(&resp).ok_or_else(|| Error::Registry {
                    url: redact_url(&final_url),
                    status: 206,
                    code: None,
                    message: "206 without a valid Content-Range".into(),
                    retry_after: None,
                    retries: 0,
                })?;
                if total.is_some_and(|t| t != size) {
                    return Err(Error::SizeMismatch {
                        what: format!("{} (Content-Range)", what()),
                        expected: size,
                        actual: total.unwrap_or(0),
                    });
                }
                // Fewer bytes than asked are fine (the retry resumes); other bytes are not.
                if start > from || end < from || end > r.end - 1 {
                    return Err(Error::Registry {
                        url: redact_url(&final_url),
                        status: 206,
                        code: None,
                        message: format!("asked for bytes {from}-{}, got {start}-{end}", r.end - 1),
                        retry_after: None,
                        retries: 0,
                    });
                }
                from - start
            }
            _ => {
                // 200: the whole blob from byte 0, whatever we asked for.
                check_length(&resp, size, &s.desc.digest, &final_url)?;
                if range.is_some() {
                    tracing::debug!(blob = %s.desc.digest, "server ignored Range; streaming the whole blob on one connection");
                }
                // Only the probe of a blob whose other chunks were never let out (its first
                // answer was this 200) streams the rest; any other writer takes its own range
                // from the body and leaves the rest.
                if signal.is_some() && !s.early_sent.load(Ordering::Acquire) {
                    while writer.absorb_next() {}
                }
                from
            }
        };
        let full_body = resp.status() == StatusCode::OK;
        // A 206 to the probe: the other chunks may start once the rate is known.
        // Only while the probe owns just its first chunk: a probe that took over the whole
        // blob (an earlier 200) must not let the other chunks out.
        let signal = if full_body || writer.range() != s.file.chunk_range(0) {
            None
        } else {
            signal.map(|w| (w, final_url.as_str()))
        };
        self.stream(s, writer, resp, skip, full_body, &final_url, signal)
            .await?;
        // Only a writer that owns every chunk may say the blob is done.
        Ok(if writer.range() == (0..size) {
            Outcome::Whole
        } else {
            Outcome::Ranged(final_url)
        })
    }

    /// Streams a body into `writer`, dropping the first `skip` bytes (already written).
    /// `full_body`: the body is the whole blob (a 200), so bytes past the writer's range
    /// are expected and left unread.
    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &self,
        s: &Shared,
        writer: &mut ChunkWriter,
        resp: Response<Incoming>,
        mut skip: u64,
        full_body: bool,
        url: &str,
        mut signal: Option<(&tokio::sync::Notify, &str)>,
    ) -> Result<()> {
        let mut body = resp.into_body();
        let range = writer.range();
        let mut since_poke = 0usize;
        let started = std::time::Instant::now();
        let mut received = 0u64;
        loop {
            let frame = match tokio::time::timeout(self.options.stall_timeout, body.frame()).await {
                Err(_) => {
                    return Err(Error::network(
                        "read",
                        url,
                        format!(
                            "blob {} range {}-{}: no data for {}s at byte {}",
                            s.desc.digest,
                            range.start,
                            range.end - 1,
                            self.options.stall_timeout.as_secs(),
                            range.start + writer.written()
                        ),
                    ))
                }
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => {
                    return Err(Error::network(
                        "read",
                        url,
                        format!(
                            "blob {} range {}-{}: body failed at byte {}: {e}",
                            s.desc.digest,
                            range.start,
                            range.end - 1,
                            range.start + writer.written()
                        ),
                    ))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                let _ = data.split_to(n);
                skip -= n as u64;
            }
            if data.is_empty() {
                continue;
            }
            let room = range.end - range.start - writer.written();
            if full_body && data.len() as u64 > room {
                data.truncate(room as usize);
            }
            if data.len() as u64 > room {
                return Err(Error::SizeMismatch {
                    what: format!(
                        "blob {} range {}-{} from {}",
                        s.desc.digest,
                        range.start,
                        range.end - 1,
                        redact_url(url)
                    ),
                    expected: range.end - range.start,
                    actual: range.end - range.start - room + data.len() as u64,
                });
            }
            writer.append(&data)?;
            received += data.len() as u64;
            if received >= RATE_SAMPLE || writer.is_complete() {
                if let Some((wake, answered)) = signal.take() {
                    let rate = received as f64 / started.elapsed().as_secs_f64().max(1e-6);
                    if self.is_fast(answered, rate) {
                        // Not capped like a CDN: this connection streams the whole blob (the
                        // next request asks for the rest); more ranges would only cost CPU.
                        while writer.absorb_next() {}
                        tracing::debug!(blob = %s.desc.digest, mb_per_s = rate / 1e6, "fast connection: one stream");
                    } else {
                        s.early_sent.store(true, Ordering::Release);
                        *s.early.lock().map_err(|_| internal("poisoned"))? =
                            Some((answered.to_string(), rate));
                        wake.notify_one();
                    }
                }
            }
            let total =
                s.downloaded.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            since_poke += data.len();
            if since_poke >= 1 << 20 || writer.is_complete() {
                since_poke = 0;
                s.hasher.poke();
                self.reporter.report(&Event::BlobProgress {
                    digest: s.desc.digest,
                    downloaded: total,
                });
            }
            if writer.is_complete() {
                if full_body && range.end < s.desc.size {
                    // The rest of a whole-blob body belongs to other chunks: drop it.
                    return Ok(());
                }
                // A range response must end here.
                return match tokio::time::timeout(self.options.stall_timeout, body.frame()).await {
                    Ok(Some(Ok(f))) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                        Err(Error::SizeMismatch {
                            what: format!("blob {} from {}", s.desc.digest, redact_url(url)),
                            expected: range.end - range.start,
                            actual: range.end - range.start
                                + f.data_ref().map_or(0, |d| d.len() as u64),
                        })
                    }
                    _ => Ok(()),
                };
            }
        }
    }
}

/// Waits for the digest, compares it, and gives a verified blob its final name.
async fn finish(
    s: Arc<Shared>,
    rx: tokio::sync::oneshot::Receiver<std::io::Result<Digest>>,
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
    Ok((s.desc.digest, s.downloaded.load(Ordering::Relaxed)))
}

fn check_length(resp: &Response<Incoming>, size: u64, digest: &Digest, url: &str) -> Result<()> {
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(n) if n != size => Err(Error::SizeMismatch {
            what: format!("blob {digest} from {} (Content-Length)", redact_url(url)),
            expected: size,
            actual: n,
        }),
        _ => Ok(()),
    }
}

/// `Content-Range: bytes start-end/total` (total may be `*`).
fn content_range(resp: &Response<Incoming>) -> Option<(u64, u64, Option<u64>)> {
    parse_content_range(resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?)
}

fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

fn internal(what: &str) -> Error {
    Error::Internal(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}

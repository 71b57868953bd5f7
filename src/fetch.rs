//! The concurrent stage: blobs stream from the registry into their writers, a bounded number
//! at a time; each blob is retried as a whole when the transfer fails in a way that may pass.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use http_body_util::BodyExt;

use crate::error::{redact_url, Error, Result};
use crate::layout::Layout;
use crate::manifest::BlobDescriptor;
use crate::progress::{Event, Reporter};
use crate::registry::Registry;
use crate::retry::RetryPolicy;
use crate::write::{BlobWriter, Target};

/// What the fetch stage needs from the pull.
pub(crate) struct Fetcher<'a> {
    pub registry: &'a Registry,
    pub layout: &'a Layout,
    pub reporter: &'a dyn Reporter,
    pub retry: RetryPolicy,
    /// No bytes for this long and the transfer counts as failed.
    pub stall_timeout: Duration,
    /// Blobs in flight at once.
    pub concurrency: usize,
}

impl Fetcher<'_> {
    /// Downloads and verifies every blob; stops at the first failure (in-flight blobs are
    /// abandoned and their partial files removed). Returns bytes downloaded.
    pub(crate) async fn fetch_all(&self, blobs: &[BlobDescriptor]) -> Result<u64> {
        futures::stream::iter(blobs.iter().map(|b| self.fetch_blob(b)))
            .buffer_unordered(self.concurrency.max(1))
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await
    }

    async fn fetch_blob(&self, blob: &BlobDescriptor) -> Result<u64> {
        let mut attempt = 0;
        loop {
            match self.attempt(blob).await {
                Ok(n) => {
                    self.reporter.report(&Event::BlobDone {
                        digest: blob.digest,
                    });
                    return Ok(n);
                }
                Err(e) if e.is_transient() && attempt < self.retry.retries => {
                    attempt += 1;
                    self.reporter.report(&Event::BlobRetrying {
                        digest: blob.digest,
                        attempt,
                        error: e.to_string(),
                    });
                    tracing::warn!(blob = %blob.digest, attempt, error = %e, "retrying blob");
                    tokio::time::sleep(self.retry.delay(attempt, &e)).await;
                }
                Err(e) => return Err(e.with_retries(attempt)),
            }
        }
    }

    async fn attempt(&self, blob: &BlobDescriptor) -> Result<u64> {
        let (resp, url) = self.registry.blob(&blob.digest).await?;
        let what = format!("blob {} from {}", blob.digest, redact_url(&url));
        if let Some(len) = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len != blob.size {
                return Err(Error::SizeMismatch {
                    what: format!("{what} (Content-Length)"),
                    expected: blob.size,
                    actual: len,
                });
            }
        }
        let mut writer = BlobWriter::create(Target {
            partial: self.layout.partial_path(&blob.digest),
            final_path: self.layout.blob_path(&blob.digest),
            digest: blob.digest,
            size: blob.size,
            what: what.clone(),
        })?;
        let mut body = resp.into_body();
        let mut downloaded = 0u64;
        loop {
            let frame = match tokio::time::timeout(self.stall_timeout, body.frame()).await {
                Err(_) => {
                    return Err(Error::network(
                        "read",
                        &url,
                        format!(
                            "{what}: no data for {}s after {downloaded} bytes",
                            self.stall_timeout.as_secs()
                        ),
                    ))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(Error::network(
                        "read",
                        &url,
                        format!("{what}: body failed after {downloaded} bytes: {e}"),
                    ))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                downloaded += data.len() as u64;
                writer.write(data).await?;
                self.reporter.report(&Event::BlobProgress {
                    digest: blob.digest,
                    downloaded,
                });
            }
        }
        if downloaded < blob.size {
            // The server closed the body early: a truncated transfer is worth retrying.
            return Err(Error::network(
                "read",
                &url,
                format!(
                    "{what}: body ended after {downloaded} of {} bytes",
                    blob.size
                ),
            ));
        }
        writer.finish().await?;
        Ok(downloaded)
    }
}

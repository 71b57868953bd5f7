//! The unpack of one `--format rootfs` pull, as the pull sees it: started before the fetch
//! (a blocking task that follows each layer's written prefix), raced against the fetch (an
//! unpack that fails for good ends the pull at once), and finished after it (from the
//! verified blob files instead, when the stream cannot be trusted).

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use super::{Layer, Staging, StreamEnd, UnpackSummary};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::manifest::{BlobDescriptor, Manifest};
use crate::prefix::Watchers;
use crate::progress::{EventKind, PullReporter};

type Outcome = std::result::Result<UnpackSummary, StreamEnd>;

/// A streaming unpack under way. Dropped, it stops following the downloads (its readers
/// fail; the staging directory's drop waits for the thread).
pub(crate) struct Session {
    watchers: Arc<Watchers>,
    /// The unpacking task, until it has been joined.
    handle: Option<JoinHandle<Outcome>>,
    /// Its result, once joined.
    streamed: Option<Outcome>,
    /// When the fetch ended (its last byte was in).
    fetched_at: Option<Instant>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.watchers.stop();
    }
}

impl Session {
    /// Starts unpacking `m`'s layers into the staging directory while they download: a
    /// blocking task that reads the config once it is verified, then unpacks every layer at
    /// once from its fetch's written prefix, each into its own tree, and merges them in
    /// order (see [`super::unpack_streaming`]). `all` are the pull's blobs, `present` those
    /// already verified on disk.
    pub(crate) fn start(
        layout: &Layout,
        m: &Manifest,
        staging: &Staging,
        all: &[BlobDescriptor],
        present: &HashSet<Digest>,
        reporter: &PullReporter,
    ) -> Result<Session> {
        let watchers = Arc::new(Watchers::new(
            all.iter().map(|b| (b.digest, layout.blob_path(&b.digest))),
            present,
        ));
        let config = watchers
            .get(&m.config.digest)
            .cloned()
            .ok_or_else(|| Error::Internal("the config is not followed".into()))?;
        let layers: Vec<(Digest, String)> = m
            .layers
            .iter()
            .map(|l| (l.digest, l.media_type.clone()))
            .collect();
        staging.reset_rootfs()?;
        let root = staging.rootfs();
        let opts = staging.options();
        tracing::info!(
            layers = layers.len(),
            rootless = opts.rootless,
            "unpacking as the layers download"
        );
        let (cancel, running) = staging.worker();
        let reporter = reporter.clone();
        let w = watchers.clone();
        let handle = tokio::task::spawn_blocking(move || {
            // Held while the tree is written: dropping the staging directory waits for it.
            let _writing = running.lock().unwrap_or_else(|p| p.into_inner());
            super::unpack_streaming(
                &root,
                &layers,
                &config,
                &w,
                opts,
                &cancel,
                &mut layer_event(&reporter),
                &staged_event(&reporter),
            )
        });
        Ok(Session {
            watchers,
            handle: Some(handle),
            streamed: None,
            fetched_at: None,
        })
    }

    /// What the fetch tells as blobs are opened, written, refetched and verified.
    pub(crate) fn watchers(&self) -> Arc<Watchers> {
        self.watchers.clone()
    }

    /// Runs `fetch` beside the unpack. An unpack that fails for good ends it at once with
    /// that error; a fetch that fails stops the unpack and waits for it (the next endpoint,
    /// if any, starts a new tree in the same staging directory).
    pub(crate) async fn follow<T>(&mut self, fetch: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(fetch);
        let first = match self.handle.as_mut() {
            None => Ok(fetch.as_mut().await),
            Some(h) => tokio::select! {
                r = fetch.as_mut() => Ok(r),
                u = h => Err(joined(u)),
            },
        };
        let fetched = match first {
            Ok(r) => r,
            Err(u) => {
                self.handle = None;
                match u {
                    Err(StreamEnd::Failed(e)) => Err(e),
                    u => {
                        self.streamed = Some(u);
                        fetch.as_mut().await
                    }
                }
            }
        };
        self.fetched_at = Some(Instant::now());
        if fetched.is_err() {
            self.watchers.stop();
            if let Some(h) = self.handle.take() {
                let _ = h.await;
            }
        }
        fetched
    }

    /// After a fetch that verified every blob: the tree the stream built, or, when it cannot
    /// be trusted (a layer fetched again after part of it was unpacked, or the stream gave
    /// up), one built again from the verified blob files.
    pub(crate) async fn finish(
        mut self,
        layout: &Layout,
        m: &Manifest,
        staging: &Staging,
        reporter: &PullReporter,
    ) -> Result<UnpackSummary> {
        let streamed = match (self.streamed.take(), self.handle.take()) {
            (Some(s), _) => Some(s),
            (None, Some(h)) => Some(joined(h.await)),
            (None, None) => None,
        };
        let last_byte = self.fetched_at.unwrap_or_else(Instant::now);
        // A blob fetched again after the unpacker had read part of it (a digest mismatch
        // found after its layer was in): that layer's bytes were not the verified ones.
        let streamed = match streamed {
            Some(Ok(_)) if self.watchers.restarted_under_reader() => {
                Some(Err(StreamEnd::Fallback(
                    "a layer was fetched again after part of it had been unpacked".into(),
                )))
            }
            other => other,
        };
        let summary = match streamed {
            Some(Ok(summary)) => summary,
            Some(Err(StreamEnd::Failed(e))) => return Err(e),
            Some(Err(StreamEnd::Fallback(why))) => {
                tracing::warn!(reason = %why, "unpacking again from the verified blobs");
                from_verified(layout, m, staging, reporter).await?
            }
            None => from_verified(layout, m, staging, reporter).await?,
        };
        tracing::info!(
            after_last_blob_secs = last_byte.elapsed().as_secs_f64(),
            "unpacked"
        );
        Ok(summary)
    }
}

/// Unpacks the layers of `m` (fetched and verified into `layout`) into the staging tree, in
/// manifest order, each checked against the config's diff_id.
async fn from_verified(
    layout: &Layout,
    m: &Manifest,
    staging: &Staging,
    reporter: &PullReporter,
) -> Result<UnpackSummary> {
    // The config's digest was verified by the fetch (or on disk) before it is trusted.
    let config_path = layout.blob_path(&m.config.digest);
    let config = tokio::fs::read(&config_path)
        .await
        .map_err(|e| Error::io("read", &config_path, e))?;
    let what = format!("config {}", m.config.digest);
    let ids = super::diff_ids(&config, &what)?;
    if ids.len() != m.layers.len() {
        return Err(Error::InvalidManifest {
            what,
            reason: format!(
                "the manifest lists {} layers, the config {} diff_ids",
                m.layers.len(),
                ids.len()
            ),
        });
    }
    let layers: Vec<Layer> = m
        .layers
        .iter()
        .zip(ids)
        .map(|(l, diff_id)| Layer {
            digest: l.digest,
            media_type: l.media_type.clone(),
            path: layout.blob_path(&l.digest),
            diff_id,
        })
        .collect();
    staging.reset_rootfs()?;
    let root = staging.rootfs();
    let opts = staging.options();
    tracing::info!(layers = layers.len(), rootless = opts.rootless, "unpacking");
    let (cancel, running) = staging.worker();
    let reporter = reporter.clone();
    tokio::task::spawn_blocking(move || {
        // Held while the tree is written: dropping the staging directory waits for it.
        let _writing = running.lock().unwrap_or_else(|p| p.into_inner());
        super::unpack(
            &root,
            &layers,
            opts,
            &cancel,
            &mut layer_event(&reporter),
            &staged_event(&reporter),
        )
    })
    .await
    .map_err(|e| Error::Internal(format!("unpacking thread: {e}")))?
}

/// The unpacking task's result, its panic included.
fn joined(r: std::result::Result<Outcome, tokio::task::JoinError>) -> Outcome {
    r.unwrap_or_else(|e| {
        Err(StreamEnd::Failed(Error::Internal(format!(
            "unpacking thread: {e}"
        ))))
    })
}

/// Reports each layer's staging tree complete ([`EventKind::LayerStaged`]).
fn staged_event(reporter: &PullReporter) -> impl Fn(usize, &Layer, super::Applied) + Sync + '_ {
    move |index, layer, applied| {
        reporter.report(EventKind::LayerStaged {
            index,
            digest: layer.digest,
            entries: applied.entries,
        })
    }
}

/// Reports each layer unpacked ([`EventKind::LayerApplied`]).
fn layer_event(reporter: &PullReporter) -> impl FnMut(usize, &Layer, super::Applied) + '_ {
    move |index, layer, applied| {
        reporter.report(EventKind::LayerApplied {
            index,
            digest: layer.digest,
            uncompressed: applied.bytes,
            entries: applied.entries,
        })
    }
}

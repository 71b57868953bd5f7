//! Pull an image into an OCI layout, printing progress from the library's events; Ctrl-C
//! cancels the pull (what it wrote is kept for the next run to resume).
//!
//! `cargo run --example pull_with_progress -- alpine:3.20 ./alpine`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fastpull::{CancellationToken, Client, Digest, Event, EventKind, Reference, Reporter};

/// Per blob to fetch: (bytes received, size).
type Blobs = HashMap<Digest, (u64, u64)>;

/// Prints a line per blob when it is verified, and every 10% of the whole.
#[derive(Default)]
struct Progress {
    /// The blobs, and the last tenth printed.
    state: Mutex<(Blobs, u64)>,
}

impl Reporter for Progress {
    fn report(&self, event: &Event) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let (blobs, last_tenth) = &mut *st;
        match &event.kind {
            EventKind::BlobPlanned {
                digest,
                size,
                present: false,
                ..
            } => {
                blobs.insert(*digest, (0, *size));
            }
            EventKind::BlobProgress { digest, downloaded } => {
                if let Some(b) = blobs.get_mut(digest) {
                    b.0 = *downloaded;
                }
                let (got, total) = blobs.values().fold((0, 0), |(g, t), (d, s)| (g + d, t + s));
                let tenth = (got * 10).checked_div(total).unwrap_or(10);
                if tenth > *last_tenth {
                    *last_tenth = tenth;
                    println!("{}% of {} bytes", tenth * 10, total);
                }
            }
            EventKind::BlobDone { digest } => {
                println!("{}: {} verified", event.pull, digest.short())
            }
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(dest)) = (args.next(), args.next()) else {
        return Err("usage: pull_with_progress IMAGE DEST".into());
    };
    let image: Reference = image.parse()?;
    let client = Client::new()?;
    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    let report = client
        .request(&image, &dest)
        .reporter(Arc::new(Progress::default()))
        .cancel_on(cancel)
        .await?;
    println!(
        "{} -> {} ({} bytes downloaded in {:.2?})",
        image, report.digest, report.bytes_downloaded, report.elapsed
    );
    Ok(())
}

//! Stream an image's first layer into a file, verified as it streams: the copy fails,
//! instead of ending, if the bytes do not match the layer's digest.
//!
//! `cargo run --example stream_blob -- alpine:3.20 layer.tar.gz`

use fastpull::{Client, Reference};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(image), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: stream_blob IMAGE FILE".into());
    };
    let image: Reference = image.parse()?;
    let client = Client::new()?;
    // The platform's manifest (an index is resolved for this machine by `config`'s rules).
    let manifest = client.manifest(&image).await?;
    let doc: serde_json::Value = serde_json::from_slice(&manifest.bytes)?;
    let layer = doc["layers"][0]["digest"]
        .as_str()
        .ok_or("no layers (a multi-platform index? pass IMAGE@sha256:<platform manifest>)")?;
    let size = doc["layers"][0]["size"].as_u64();
    let mut reader = client.blob(&image, &layer.parse()?, size).await?;
    let mut file = tokio::fs::File::create(&out).await?;
    let n = tokio::io::copy(&mut reader, &mut file).await?;
    println!("{layer}: {n} bytes to {out}, verified");
    Ok(())
}

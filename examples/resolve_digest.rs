//! Print the digest a reference names (like `crane digest`), without pulling anything.
//!
//! `cargo run --example resolve_digest -- alpine:3.20`

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let image: fastpull::Reference = std::env::args()
        .nth(1)
        .ok_or("usage: resolve_digest IMAGE")?
        .parse()?;
    let client = fastpull::Client::new()?;
    let r = client.resolve(&image).await?;
    println!("{} {} ({} bytes)", r.digest, r.media_type, r.size);
    Ok(())
}

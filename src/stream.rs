//! A blob as a verified stream: [`BlobReader`] hands out the blob's bytes as they arrive and
//! checks their sha256 and length at the end, so a reader that reaches EOF has read exactly
//! the blob the digest names (or got an error instead of EOF).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Incoming};
use tokio::io::{AsyncRead, ReadBuf};

use crate::digest::Digest;
use crate::verify::Hasher;

/// A blob's bytes as an [`AsyncRead`], verified: at the end of the body its sha256 and
/// length are checked, and a mismatch is an [`std::io::ErrorKind::InvalidData`] error in
/// place of EOF (so whatever was read before it must not be trusted); every read after an
/// error gives the same error, never EOF. Get one from [`crate::Client::blob`].
pub struct BlobReader {
    body: Incoming,
    chunk: Bytes,
    hasher: Option<Hasher>,
    digest: Digest,
    size: Option<u64>,
    /// The error a read returned, returned again by every read after it: a reader that
    /// tries again must not get the EOF that says the bytes were verified.
    failed: Option<(std::io::ErrorKind, String)>,
}

impl BlobReader {
    pub(crate) fn new(body: Incoming, digest: Digest, size: Option<u64>) -> BlobReader {
        BlobReader {
            body,
            chunk: Bytes::new(),
            hasher: Some(Hasher::new()),
            digest,
            size,
            failed: None,
        }
    }

    /// The digest the bytes must match.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl AsyncRead for BlobReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if let Some((kind, message)) = &me.failed {
            return Poll::Ready(Err(std::io::Error::new(*kind, message.clone())));
        }
        let r = me.read_some(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            me.failed = Some((e.kind(), e.to_string()));
        }
        r
    }
}

impl BlobReader {
    /// [`AsyncRead::poll_read`], before an error is kept.
    fn read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self;
        loop {
            if !me.chunk.is_empty() {
                let n = me.chunk.len().min(buf.remaining());
                buf.put_slice(&me.chunk[..n]);
                me.chunk.advance(n);
                return Poll::Ready(Ok(()));
            }
            let Some(hasher) = me.hasher.as_mut() else {
                return Poll::Ready(Ok(())); // verified EOF, again
            };
            match Pin::new(&mut me.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::other(format!(
                        "blob {}: body failed after {} bytes: {e}",
                        me.digest,
                        hasher.len()
                    ))))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        hasher.update(&data);
                        if me.size.is_some_and(|s| hasher.len() > s) {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("blob {}: more bytes than its size", me.digest),
                            )));
                        }
                        me.chunk = data;
                    }
                }
                Poll::Ready(None) => {
                    let Some(h) = me.hasher.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    let len = h.len();
                    let actual = h.finish();
                    if actual != me.digest || me.size.is_some_and(|s| s != len) {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "blob {}: got {len} bytes hashing to {actual}: do not use what was read",
                                me.digest
                            ),
                        )));
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

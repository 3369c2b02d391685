//! Writes held back until a flush, so that many small writes leave in one syscall.
//!
//! It sits under every server-side TLS stream. A TURN client over TLS needs each frame in a
//! TLS record of its own: TLS is a byte stream, but coturn's uclient (and clients written
//! like it) take one `SSL_read` as one frame, and coturn, pion and LiveKit all write a
//! record per frame. Writing a record per frame straight to the socket would cost a syscall
//! per frame; under this, the records of a whole batch leave together at the flush.
//!
//! Bounded: past [`MAX_HELD`] bytes the held bytes are written first, and a single write that
//! large goes straight through. The buffer grows only as writes need it and is given back
//! after a large batch, so an idle connection holds none. Everything that writes to a TLS
//! stream flushes (hyper after each response, tungstenite after each message, the TURN
//! stream writer after each batch, the TLS handshake before it reads).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes out without waiting for the flush.
pub const MAX_HELD: usize = 64 * 1024;

/// A buffer past this size is freed once written, not kept for the next batch.
const KEEP: usize = 16 * 1024;

/// `inner` with its writes held until [`AsyncWrite::poll_flush`] (or [`MAX_HELD`]).
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` is already written (a flush that returned `Pending` midway).
    written: usize,
}

impl<T> Coalesced<T> {
    /// Wraps `inner`; nothing is held yet.
    pub fn new(inner: T) -> Self {
        Coalesced { inner, held: Vec::new(), written: 0 }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out everything held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.held.clear();
        self.written = 0;
        if self.held.capacity() > KEEP {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held.len() + len > MAX_HELD {
            ready!(this.poll_write_held(cx))?;
        }
        if len >= MAX_HELD {
            // Nothing is held now, so order is kept.
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn writes_wait_for_the_flush_in_order_and_the_bound_sends_early() {
        let (a, mut b) = tokio::io::duplex(4 * MAX_HELD);
        let mut a = Coalesced::new(a);
        a.write_all(b"one ").await.unwrap();
        a.write_all(b"two").await.unwrap();
        let mut buf = vec![0u8; 2 * MAX_HELD];
        let nothing = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut buf)).await;
        assert!(nothing.is_err(), "held until the flush");
        a.flush().await.unwrap();
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one two");
        // Past the bound, what is held goes first and a large write follows it directly.
        a.write_all(&[1u8; 100]).await.unwrap();
        a.write_all(&[2u8; MAX_HELD]).await.unwrap();
        let mut got = vec![0u8; 100 + MAX_HELD];
        b.read_exact(&mut got).await.unwrap();
        assert!(got[..100].iter().all(|&x| x == 1) && got[100..].iter().all(|&x| x == 2));
        // A large buffer is given back once written.
        a.write_all(&[3u8; MAX_HELD - 1]).await.unwrap();
        a.flush().await.unwrap();
        assert_eq!(a.held.capacity(), 0);
        // Shutdown writes what is held first.
        a.write_all(b"last").await.unwrap();
        a.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[rest.len() - 4..], b"last");
    }
}

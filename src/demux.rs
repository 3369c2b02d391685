//! One TCP port for HTTP(S)/WSS and TURN over TCP/TLS (`turn.tcp_listen` or `turn.tls_listen`
//! naming `http.listen`): which protocol a connection speaks, from its ALPN or its first bytes.
//!
//! TLS is recognised by its record header; after the handshake the negotiated ALPN decides
//! (`http/1.1` → HTTP, `stun.turn` → TURN, RFC 7443), and without ALPN the first decrypted
//! bytes do, as they do on plain TCP: a STUN header (RFC 8489: two zero bits, then the magic
//! cookie at bytes 4–7 — the first TURN message is always STUN, ChannelData needs an
//! allocation) or an HTTP request line. The listener driving this is
//! `http::listener`; this module only reads bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The STUN magic cookie.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// HTTP/1.1 methods a client of kinlink may start with.
const METHODS: [&[u8]; 9] = [b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// What a connection speaks inside its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (and WebSocket upgrades).
    Http,
    /// TURN (STUN messages and ChannelData, RFC 6062 framing).
    Turn,
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A TLS record (handshake): terminate TLS, then look again.
    Tls,
    /// A protocol spoken in the clear.
    Plain(Protocol),
    /// Not enough bytes yet to tell.
    NeedMore,
    /// Nothing kinlink speaks.
    Unknown,
}

/// Bytes that decide: a STUN header needs 8.
pub const SNIFF_BYTES: usize = 8;

/// Classifies the first bytes of a connection (or of its decrypted stream: `Tls` is then
/// simply not expected).
pub fn sniff(b: &[u8]) -> Sniff {
    let Some(&first) = b.first() else { return Sniff::NeedMore };
    if first == 0x16 {
        // A TLS handshake record: content type 22, legacy version 3.x.
        return match b.get(1) {
            None => Sniff::NeedMore,
            Some(3) => Sniff::Tls,
            Some(_) => Sniff::Unknown,
        };
    }
    if first & 0xc0 == 0 {
        // STUN: the cookie must follow the type and length.
        if b.len() < 8 {
            return Sniff::NeedMore;
        }
        return if b[4..8] == MAGIC_COOKIE { Sniff::Plain(Protocol::Turn) } else { Sniff::Unknown };
    }
    for m in METHODS {
        let n = m.len().min(b.len());
        if b[..n] == m[..n] {
            return if n == m.len() { Sniff::Plain(Protocol::Http) } else { Sniff::NeedMore };
        }
    }
    Sniff::Unknown
}

/// The protocol a negotiated ALPN id names; `None` without ALPN (then [`sniff`] decides).
pub fn by_alpn(alpn: Option<&[u8]>) -> Option<Protocol> {
    match alpn? {
        b"stun.turn" => Some(Protocol::Turn),
        _ => Some(Protocol::Http),
    }
}

/// ALPN ids a shared port offers: HTTP/1.1 (kinlink speaks no h2) and TURN.
pub const ALPN_HTTP: &[u8] = b"http/1.1";
/// RFC 7443's ALPN id for TURN.
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// A stream whose first bytes were already read to classify it: they are read again first.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// `prefix` is what was read from `inner` so far.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads from `stream` until [`sniff`] decides (at most [`SNIFF_BYTES`]); returns the verdict
/// and the bytes read, to replay with [`Rewind`]. EOF before a verdict is `Unknown`.
pub async fn read_and_sniff<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Sniff, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(SNIFF_BYTES);
    loop {
        let verdict = sniff(&buf);
        if verdict != Sniff::NeedMore {
            return Ok((verdict, buf));
        }
        let mut byte = [0u8; SNIFF_BYTES];
        let n = stream.read(&mut byte[..SNIFF_BYTES - buf.len()]).await?;
        if n == 0 {
            return Ok((Sniff::Unknown, buf));
        }
        buf.extend_from_slice(&byte[..n]);
    }
}

/// Peeks at a TCP socket (nothing consumed) until [`sniff`] decides. The first peek waits for
/// data; a client trickling its first bytes is peeked again after 5 ms, doubling up to half a
/// second (peeked data keeps the socket readable, so waiting for readiness would spin), under
/// the caller's deadline: a client holding one byte back costs a dozen wake-ups, not a
/// thousand.
pub async fn peek_and_sniff(stream: &tokio::net::TcpStream) -> io::Result<Sniff> {
    let mut buf = [0u8; SNIFF_BYTES];
    let mut wait = std::time::Duration::from_millis(5);
    loop {
        let n = stream.peek(&mut buf).await?;
        match sniff(&buf[..n]) {
            Sniff::NeedMore if n > 0 => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_millis(500));
            }
            Sniff::NeedMore => return Ok(Sniff::Unknown),
            verdict => return Ok(verdict),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocols_apart() {
        let binding = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3];
        assert_eq!(sniff(&binding), Sniff::Plain(Protocol::Turn));
        assert_eq!(sniff(&binding[..5]), Sniff::NeedMore, "a STUN header needs its cookie");
        assert_eq!(sniff(&[0x00, 0x03, 0x00, 0x00, 0xde, 0xad, 0xbe, 0xef]), Sniff::Unknown, "no cookie");
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Sniff::Tls);
        assert_eq!(sniff(&[0x16]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x16, 0x99]), Sniff::Unknown);
        assert_eq!(sniff(b"GET /signal HTTP/1.1\r\n"), Sniff::Plain(Protocol::Http));
        assert_eq!(sniff(b"OPTIONS * HTTP/1.1"), Sniff::Plain(Protocol::Http));
        assert_eq!(sniff(b"OPT"), Sniff::NeedMore);
        assert_eq!(sniff(b"GETX"), Sniff::Unknown);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniff::Unknown);
        assert_eq!(sniff(&[0x40, 0x00, 0x00, 0x04]), Sniff::Unknown, "ChannelData cannot come first");
        assert_eq!(sniff(b""), Sniff::NeedMore);
    }

    #[test]
    fn alpn_decides_when_negotiated() {
        assert_eq!(by_alpn(Some(b"stun.turn")), Some(Protocol::Turn));
        assert_eq!(by_alpn(Some(b"http/1.1")), Some(Protocol::Http));
        assert_eq!(by_alpn(None), None);
    }

    #[tokio::test]
    async fn rewind_replays_the_sniffed_bytes_then_the_rest() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(a);
        let mut b = b;
        let (verdict, prefix) = read_and_sniff(&mut b).await.unwrap();
        assert_eq!(verdict, Sniff::Plain(Protocol::Http));
        let mut all = String::new();
        Rewind::new(prefix, b).read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\n\r\n");
    }
}

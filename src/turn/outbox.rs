//! What a TCP/TLS client is about to be sent: frames appended to one buffer, which its writer
//! takes whole and writes in one go (one syscall; over TLS a record per frame). A relayed
//! frame is copied once, out of the shard's read buffer (which is reused at once): no
//! per-frame allocation, no gathering copy before the write.
//!
//! Bounded in bytes (`turn.stream_queue_bytes`): relayed data past the bound is dropped
//! (media is loss-tolerant, and a client that stops reading must not hold megabytes); a STUN
//! response waits for room instead, which stops reading that client's requests meanwhile.

use std::sync::Mutex;

use tokio::sync::Notify;

/// One TCP/TLS client's outgoing bytes.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    max_bytes: usize,
    /// The writer waits on this for bytes (or the end).
    filled: Notify,
    /// A STUN response waits on this for room.
    drained: Notify,
}

#[derive(Debug, Default)]
struct State {
    buf: Vec<u8>,
    closed: bool,
}

impl Outbox {
    /// An empty outbox holding at most `max_bytes` of relayed data.
    pub fn new(max_bytes: usize) -> Self {
        Outbox { state: Mutex::new(State::default()), max_bytes, filled: Notify::new(), drained: Notify::new() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends relayed data; false (dropped) when it does not fit or the connection is gone.
    pub fn push_data(&self, frame: &[u8]) -> bool {
        let mut s = self.state();
        if s.closed || s.buf.len() + frame.len() > self.max_bytes {
            return false;
        }
        let was_empty = s.buf.is_empty();
        s.buf.extend_from_slice(frame);
        drop(s);
        if was_empty {
            self.filled.notify_one();
        }
        true
    }

    /// Appends a STUN response once there is room (it may pass the bound by itself); false
    /// when the connection is gone.
    pub async fn push_reply(&self, reply: &[u8]) -> bool {
        loop {
            let drained = self.drained.notified();
            {
                let mut s = self.state();
                if s.closed {
                    return false;
                }
                if s.buf.len() < self.max_bytes {
                    s.buf.extend_from_slice(reply);
                    drop(s);
                    self.filled.notify_one();
                    return true;
                }
            }
            drained.await;
        }
    }

    /// No more bytes will be appended; the writer sends what is left and ends.
    pub fn close(&self) {
        self.state().closed = true;
        self.filled.notify_one();
        self.drained.notify_waiters();
    }

    /// Swaps everything queued into `out` (which must be empty), waiting for something;
    /// false once closed and empty.
    pub async fn take(&self, out: &mut Vec<u8>) -> bool {
        loop {
            let filled = self.filled.notified();
            {
                let mut s = self.state();
                if !s.buf.is_empty() {
                    std::mem::swap(&mut s.buf, out);
                    drop(s);
                    self.drained.notify_waiters();
                    return true;
                }
                if s.closed {
                    return false;
                }
            }
            filled.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn relayed_data_is_bounded_replies_wait_and_the_writer_takes_it_whole() {
        let o = Arc::new(Outbox::new(9_600));
        // 512 frames of 1,200 bytes would be 600 KB: the bound stops it at 9,600 bytes (full).
        let accepted = (0..512).filter(|_| o.push_data(&[7u8; 1200])).count();
        assert_eq!(accepted, 8);
        // A reply waits for room instead of being dropped...
        let waiting = tokio::spawn({
            let o = o.clone();
            async move { o.push_reply(&[1u8; 100]).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the reply waits while the outbox is full");
        // ...and goes in once the writer has taken the batch, in one piece.
        let mut out = Vec::new();
        assert!(o.take(&mut out).await);
        assert_eq!(out.len(), 9600);
        assert!(waiting.await.unwrap());
        out.clear();
        assert!(o.take(&mut out).await);
        assert_eq!(out, vec![1u8; 100]);
        // Closed: what is left is taken, then the writer ends; nothing more goes in.
        assert!(o.push_data(b"last"));
        o.close();
        assert!(!o.push_data(b"late"));
        assert!(!o.push_reply(b"late").await);
        out.clear();
        assert!(o.take(&mut out).await);
        assert_eq!(out, b"last");
        out.clear();
        assert!(!o.take(&mut out).await);
    }
}

//! A queue bounded in messages *and* in bytes, for what the server holds for one slow reader:
//! a signaling device's outbound messages. A count
//! of messages alone bounds nothing when messages are large (256 × 64 KiB is 16 MB).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

/// What a queued message weighs.
pub trait Weighed {
    /// Bytes it holds; 0 for a control message, which always fits the byte bound.
    fn bytes(&self) -> usize;
}

/// A queue of at most `messages` messages and `max_bytes` bytes.
pub fn bounded<T: Weighed>(messages: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(messages);
    let queued = Arc::new(AtomicUsize::new(0));
    (Sender { tx, queued: queued.clone(), max_bytes }, Receiver { rx, queued })
}

/// The sending half of [`bounded`].
pub struct Sender<T> {
    tx: mpsc::Sender<T>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), queued: self.queued.clone(), max_bytes: self.max_bytes }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("queued", &self.queued.load(Ordering::Relaxed)).field("max_bytes", &self.max_bytes).finish()
    }
}

impl<T: Weighed> Sender<T> {
    /// Queues `msg` unless the queue is full in messages or in bytes.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let n = msg.bytes();
        let before = self.queued.fetch_add(n, Ordering::Relaxed);
        if n > 0 && before + n > self.max_bytes {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            return Err(TrySendError::Full(msg));
        }
        self.tx.try_send(msg).inspect_err(|_| {
            self.queued.fetch_sub(n, Ordering::Relaxed);
        })
    }

    /// Queues `msg`, waiting for room in messages; counted in bytes but never refused for them
    /// (for the few messages that must not be lost, such as STUN responses).
    pub async fn send(&self, msg: T) -> Result<(), SendError<T>> {
        let n = msg.bytes();
        self.queued.fetch_add(n, Ordering::Relaxed);
        self.tx.send(msg).await.inspect_err(|_| {
            self.queued.fetch_sub(n, Ordering::Relaxed);
        })
    }
}

/// The receiving half of [`bounded`].
#[derive(Debug)]
pub struct Receiver<T> {
    rx: mpsc::Receiver<T>,
    queued: Arc<AtomicUsize>,
}

impl<T: Weighed> Receiver<T> {
    /// The next message, once one is queued; `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(msg.bytes(), Ordering::Relaxed);
        Some(msg)
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let msg = self.rx.try_recv()?;
        self.queued.fetch_sub(msg.bytes(), Ordering::Relaxed);
        Ok(msg)
    }

    /// Up to `limit` queued messages into `out`; 0 when every sender is gone.
    pub async fn recv_many(&mut self, out: &mut Vec<T>, limit: usize) -> usize {
        let before = out.len();
        let n = self.rx.recv_many(out, limit).await;
        let bytes: usize = out[before..].iter().map(Weighed::bytes).sum();
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        n
    }
}

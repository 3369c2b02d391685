//! A queue bounded in messages *and* in bytes, for what the server holds for one slow reader:
//! a signaling device's outbound messages. A count
//! of messages alone bounds nothing when messages are large (256 × 64 KiB is 16 MB).
//!
//! Control messages (weighing 0 bytes: a close) have slots of their own past the bound, so a
//! reader that stopped reading can still be told to close (a revocation, a replacement).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

/// What a queued message weighs.
pub trait Weighed {
    /// Bytes it holds; 0 for a control message, which always fits the byte bound.
    fn bytes(&self) -> usize;
}

/// Slots for control messages past the message bound: a replacement and a revocation can
/// both be queued behind a full queue.
const CONTROL_SLOTS: usize = 4;

/// What is queued now, shared by both halves.
#[derive(Debug, Default)]
struct Load {
    bytes: AtomicUsize,
    /// Data messages (control messages are not counted: they have their own slots).
    messages: AtomicUsize,
}

impl Load {
    fn release(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        if bytes > 0 {
            self.messages.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A queue of at most `messages` data messages and `max_bytes` bytes, plus a few control
/// messages.
pub fn bounded<T: Weighed>(messages: usize, max_bytes: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(messages + CONTROL_SLOTS);
    let load = Arc::new(Load::default());
    (Sender { tx, load: load.clone(), max_bytes, max_messages: messages }, Receiver { rx, load })
}

/// The sending half of [`bounded`].
pub struct Sender<T> {
    tx: mpsc::Sender<T>,
    load: Arc<Load>,
    max_bytes: usize,
    max_messages: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), load: self.load.clone(), max_bytes: self.max_bytes, max_messages: self.max_messages }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("queued", &self.load.bytes.load(Ordering::Relaxed)).field("max_bytes", &self.max_bytes).finish()
    }
}

impl<T: Weighed> Sender<T> {
    /// Queues `msg` unless the queue is full in messages or in bytes (a control message only
    /// when its own slots are taken too).
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let n = msg.bytes();
        if n > 0 {
            let before = self.load.messages.fetch_add(1, Ordering::Relaxed);
            let bytes_before = self.load.bytes.fetch_add(n, Ordering::Relaxed);
            if before >= self.max_messages || bytes_before + n > self.max_bytes {
                self.load.release(n);
                return Err(TrySendError::Full(msg));
            }
        }
        self.tx.try_send(msg).inspect_err(|_| {
            if n > 0 {
                self.load.release(n);
            }
        })
    }

    /// Queues `msg`, waiting for room in messages; counted in bytes but never refused for them
    /// (for the few messages that must not be lost, such as STUN responses).
    pub async fn send(&self, msg: T) -> Result<(), SendError<T>> {
        let n = msg.bytes();
        if n > 0 {
            self.load.messages.fetch_add(1, Ordering::Relaxed);
            self.load.bytes.fetch_add(n, Ordering::Relaxed);
        }
        self.tx.send(msg).await.inspect_err(|_| {
            if n > 0 {
                self.load.release(n);
            }
        })
    }
}

/// The receiving half of [`bounded`].
#[derive(Debug)]
pub struct Receiver<T> {
    rx: mpsc::Receiver<T>,
    load: Arc<Load>,
}

impl<T: Weighed> Receiver<T> {
    /// The next message, once one is queued; `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let msg = self.rx.recv().await?;
        self.load.release(msg.bytes());
        Some(msg)
    }

    /// The next message if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let msg = self.rx.try_recv()?;
        self.load.release(msg.bytes());
        Ok(msg)
    }

    /// Up to `limit` queued messages into `out`; 0 when every sender is gone.
    pub async fn recv_many(&mut self, out: &mut Vec<T>, limit: usize) -> usize {
        let before = out.len();
        let n = self.rx.recv_many(out, limit).await;
        for msg in &out[before..] {
            self.load.release(msg.bytes());
        }
        n
    }
}

//! TLS for `turns:` and for HTTPS/WSS: rustls with the certificate and key from files,
//! reloaded when the files change (checked every few seconds) or on SIGHUP, so renewed
//! certificates need no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Why a certificate/key pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The files hold no usable certificate or key.
    #[error("{0}")]
    Invalid(String),
}

/// The bounded label for a failed TLS handshake.
fn failure_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "eof",
        std::io::ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

/// A TLS acceptor whose configuration can be swapped while serving.
#[derive(Clone)]
pub struct Acceptor {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    cert: PathBuf,
    key: PathBuf,
    /// The config section the files come from (`turn` or `http`), for errors and the
    /// `listener` label of the reload metric.
    section: &'static str,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

/// Loads a rustls server configuration from PEM files; errors name `section`'s keys.
pub fn load(cert: &Path, key: &Path, section: &str) -> Result<ServerConfig, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("{section}.tls_cert: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("{section}.tls_cert: no certificate in {}", cert.display())));
    }
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| TlsError::Invalid(format!("{section}.tls_key: {e}")))?
        .ok_or_else(|| TlsError::Invalid(format!("{section}.tls_key: no private key in {}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid(format!("{section}.tls_cert/{section}.tls_key: {e}")))
}

impl Acceptor {
    /// Loads the files of config section `section` (`turn`, `http`); fails start-up when
    /// they are unusable.
    pub fn new(cert: PathBuf, key: PathBuf, section: &'static str) -> Result<Self, TlsError> {
        let config = load(&cert, &key, section)?;
        Ok(Acceptor { current: Arc::new(RwLock::new(Arc::new(config))), cert, key, section })
    }

    /// Completes a TLS handshake with the current certificate.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let config = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        TlsAcceptor::from(config).accept(stream).await
    }

    /// Completes a handshake by `deadline`. A failure (or the deadline) is counted by reason in
    /// `kinlink_turn_tls_handshake_failures_total{listener}` (this acceptor's section) and
    /// yields `None`: a socket that never finishes the handshake is held no longer than that.
    pub async fn accept_by(&self, stream: TcpStream, deadline: tokio::time::Instant, metrics: &crate::metrics::Metrics) -> Option<TlsStream<TcpStream>> {
        let reason = match tokio::time::timeout_at(deadline, self.accept(stream)).await {
            Ok(Ok(s)) => return Some(s),
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                tracing::debug!(listener = self.section, reason, error = %e, "TLS handshake failed");
                reason
            }
            Err(_) => "timeout",
        };
        metrics.turn_tls_handshake_failures.with_label_values(&[self.section, reason]).inc();
        None
    }

    /// Reloads the files; on failure the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.cert, &self.key, self.section)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&self.cert)?, m(&self.key)?))
    }

    /// Reloads on SIGHUP and when the files' modification times change (checked every `poll`).
    pub async fn watch(self, poll: Duration, metrics: Arc<crate::metrics::Metrics>) {
        let mut last = self.modified();
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let signalled = match hup.as_mut() {
                Some(h) => tokio::select! {
                    _ = h.recv() => true,
                    _ = tokio::time::sleep(poll) => false,
                },
                None => {
                    tokio::time::sleep(poll).await;
                    false
                }
            };
            #[cfg(not(unix))]
            let signalled = {
                tokio::time::sleep(poll).await;
                false
            };
            let now = self.modified();
            if signalled || now != last {
                last = now;
                match self.reload() {
                    Ok(()) => {
                        metrics.turn_tls_reloads.with_label_values(&[self.section, "ok"]).inc();
                        tracing::info!(signalled, listener = self.section, "TLS certificate reloaded")
                    }
                    Err(e) => {
                        metrics.turn_tls_reloads.with_label_values(&[self.section, "error"]).inc();
                        tracing::error!(error = %e, listener = self.section, "TLS certificate reload failed; keeping the previous one")
                    }
                }
            }
        }
    }
}

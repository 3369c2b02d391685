//! Certificates that get themselves (`acme.*`): an ACME (RFC 8555) account and certificate for
//! `acme.domains`, validated with TLS-ALPN-01 (RFC 8737) on `http.listen` itself — the
//! shared 443 socket, no port 80 — cached in `data_dir/acme` (files 0600) and renewed when a
//! third of its lifetime is left. rustls-acme speaks the protocol and answers the challenge
//! through the resolver this module hands to [`crate::tls`]; this module is the glue: the
//! directory's roots, the cache, and the events turned into metrics and logs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use rustls_acme::caches::DirCache;
use rustls_acme::{AccountCache, AcmeConfig, CertCache, EventOk, ResolvesServerCertAcme};
use sha2::Digest;

use crate::metrics::Metrics;

/// Why ACME could not start.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// `acme.ca_file` is unreadable or holds no certificate.
    #[error("acme.ca_file: {0}")]
    CaFile(String),
    /// The cache directory could not be created.
    #[error("acme cache {path}: {source}")]
    Cache {
        /// The directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The running ACME client: its resolver serves the certificate (and the challenges).
pub struct Acme {
    /// For [`crate::tls::Source::Resolver`].
    pub resolver: Arc<ResolvesServerCertAcme>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Acme {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The certificate's expiry (unix seconds) from a cached PEM chain (leaf first).
fn not_after(pem: &[u8]) -> Option<i64> {
    let der = rustls_pemfile::certs(&mut &pem[..]).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// rustls-acme's directory cache, with private files and the certificate's expiry published
/// (`kinlink_acme_certificate_expiry_timestamp_seconds`) whenever one is loaded or stored.
struct Cache {
    dir: DirCache<PathBuf>,
    path: PathBuf,
    metrics: Arc<Metrics>,
}

impl Cache {
    fn saw_cert(&self, pem: &[u8]) {
        if let Some(t) = not_after(pem) {
            self.metrics.acme_certificate_expiry.set(t);
        }
    }

    /// The account key is a secret: the cache writes with the process umask, so tighten it.
    fn tighten(&self) {
        #[cfg(unix)]
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            use std::os::unix::fs::PermissionsExt;
            for e in entries.flatten() {
                let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600));
            }
        }
    }
}

#[async_trait::async_trait]
impl CertCache for Cache {
    type EC = std::io::Error;
    async fn load_cert(&self, domains: &[String], directory_url: &str) -> Result<Option<Vec<u8>>, Self::EC> {
        let cert = self.dir.load_cert(domains, directory_url).await?;
        if let Some(pem) = &cert {
            self.saw_cert(pem);
        }
        Ok(cert)
    }
    async fn store_cert(&self, domains: &[String], directory_url: &str, cert: &[u8]) -> Result<(), Self::EC> {
        self.dir.store_cert(domains, directory_url, cert).await?;
        self.tighten();
        self.saw_cert(cert);
        Ok(())
    }
}

#[async_trait::async_trait]
impl AccountCache for Cache {
    type EA = std::io::Error;
    async fn load_account(&self, contact: &[String], directory_url: &str) -> Result<Option<Vec<u8>>, Self::EA> {
        self.dir.load_account(contact, directory_url).await
    }
    async fn store_account(&self, contact: &[String], directory_url: &str, account: &[u8]) -> Result<(), Self::EA> {
        self.dir.store_account(contact, directory_url, account).await?;
        self.tighten();
        Ok(())
    }
}

/// A short, stable name for this directory's cache (several CAs may be tried in one data dir).
fn cache_dir(data_dir: &Path, directory: &str) -> PathBuf {
    let h = sha2::Sha256::digest(directory.as_bytes());
    data_dir.join("acme").join(format!("{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3]))
}

/// Starts the ACME client for `cfg` (when `acme.domains` is set): it loads a cached
/// certificate or orders one, and keeps renewing, in a task of its own.
pub fn start(cfg: &crate::config::AcmeConfig, data_dir: &Path, metrics: Arc<Metrics>) -> Result<Option<Acme>, AcmeError> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let path = cache_dir(data_dir, &cfg.directory);
    std::fs::create_dir_all(&path).map_err(|source| AcmeError::Cache { path: path.display().to_string(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for dir in [data_dir.join("acme"), path.clone()] {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    let cache = Cache { dir: DirCache::new(path.clone()), path, metrics: metrics.clone() };
    // The Web PKI's roots, plus acme.ca_file for a private directory.
    let roots = crate::tls::client_config(cfg.ca_file.as_deref()).map_err(|e| AcmeError::CaFile(e.to_string()))?;
    let mut state = AcmeConfig::new_with_client_config(cfg.domains.clone(), roots)
        .contact(cfg.contact.iter())
        .directory(&cfg.directory)
        .cache(cache)
        .state();
    let resolver = state.resolver();
    let domains = cfg.domains.join(",");
    tracing::info!(%domains, directory = %cfg.directory, "ACME: obtaining the certificate (TLS-ALPN-01 on http.listen)");
    let task = tokio::spawn(async move {
        while let Some(event) = state.next().await {
            let label = match &event {
                Ok(EventOk::DeployedCachedCert) => "deployed_cached",
                Ok(EventOk::DeployedNewCert) => "deployed_new",
                Ok(EventOk::CertCacheStore | EventOk::AccountCacheStore) => "cache_store",
                Err(rustls_acme::EventError::Order(_)) => "order_error",
                Err(_) => "cache_error",
            };
            metrics.acme_events.with_label_values(&[label]).inc();
            match event {
                Ok(EventOk::DeployedNewCert) => tracing::info!(%domains, "ACME: new certificate deployed"),
                Ok(EventOk::DeployedCachedCert) => tracing::info!(%domains, "ACME: cached certificate deployed"),
                Ok(_) => tracing::debug!(event = label, "ACME"),
                // rustls-acme retries with backoff; each failure is worth an operator's look.
                Err(e) => tracing::warn!(%domains, error = %e, "ACME: failed; retrying"),
            }
        }
    });
    Ok(Some(Acme { resolver, task }))
}

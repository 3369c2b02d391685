//! TLS for `turns:`, for HTTPS/WSS, and for the one port that serves both: rustls with
//! certificates from PEM files, reloaded when the files change (checked every few seconds) or
//! on SIGHUP, so renewed certificates need no restart. Each certificate/key pair is a
//! [`KeyFiles`] whose key is swapped in place; an [`Acceptor`] picks among its pairs by SNI
//! at every handshake, so a reload or a shared port needs no new configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::coalesce::Coalesced;

/// A server-side TLS connection. Its writes leave the socket at each flush ([`Coalesced`]),
/// so a TURN frame per record costs no syscall per frame.
pub type ServerTls = TlsStream<Coalesced<TcpStream>>;

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
        std::io::ErrorKind::InvalidData if is_no_alpn(e) => "alpn",
        std::io::ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

/// The client offered only application protocols this listener does not serve: refused by
/// [`SniResolver`] (rustls itself would carry on without ALPN), which rustls reports as no
/// certificate resolved.
fn is_no_alpn(e: &std::io::Error) -> bool {
    use tokio_rustls::rustls::Error;
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()).is_some_and(|e| match e {
        Error::NoApplicationProtocol => true,
        Error::General(m) => m.contains("no server certificate chain resolved"),
        _ => false,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io { path: path.display().to_string(), source })
}

/// Loads a certificate chain and its key from PEM files; errors name the two configuration
/// keys (`names`).
fn load_key(cert: &Path, key: &Path, (cert_name, key_name): (&str, &str)) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut read(cert)?.as_slice()).collect::<Result<_, _>>().map_err(|e| TlsError::Invalid(format!("{cert_name}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!("{cert_name}: no certificate in {}", cert.display())));
    }
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| TlsError::Invalid(format!("{key_name}: {e}")))?
        .ok_or_else(|| TlsError::Invalid(format!("{key_name}: no private key in {}", key.display())))?;
    CertifiedKey::from_der(certs, key, &provider()).map_err(|e| TlsError::Invalid(format!("{cert_name}/{key_name}: {e}")))
}

/// A TLS client configuration trusting the Web PKI roots plus the PEM certificates in
/// `extra_roots` (a private CA: `kinlink check --ca-file`, `acme.ca_file`,
/// `cluster.redis_ca_file`).
pub fn client_config(extra_roots: Option<&Path>) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, TlsError> {
    client_config_with_identity(extra_roots, None)
}

/// [`client_config`] that also presents a client certificate when `identity` is given (a
/// server that authenticates its clients by certificate, e.g. Redis' `tls-auth-clients yes`);
/// each handshake presents the pair as last reloaded.
pub fn client_config_with_identity(extra_roots: Option<&Path>, identity: Option<Arc<KeyFiles>>) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, TlsError> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_roots {
        let bad = |e: String| TlsError::Invalid(format!("{}: {e}", path.display()));
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut read(path)?.as_slice()) {
            roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("no certificate".into()));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        None => config.with_no_client_auth(),
        Some(files) => config.with_client_cert_resolver(files),
    };
    Ok(Arc::new(config))
}

/// One certificate/key pair from files; [`KeyFiles::reload`] swaps it in place.
#[derive(Debug)]
pub struct KeyFiles {
    cert: PathBuf,
    key: PathBuf,
    /// What the files are for (`turn`, `http`, `redis`): the `listener` label of the reload
    /// metric and of its log lines.
    section: &'static str,
    /// The configuration keys naming the two files, for errors.
    names: (String, String),
    current: RwLock<Arc<CertifiedKey>>,
}

impl KeyFiles {
    /// Loads the files of config section `section` (`tls_cert`, `tls_key`); fails start-up
    /// when they are unusable.
    pub fn load(cert: PathBuf, key: PathBuf, section: &'static str) -> Result<Arc<Self>, TlsError> {
        Self::load_named(cert, key, section, (format!("{section}.tls_cert"), format!("{section}.tls_key")))
    }

    /// [`KeyFiles::load`] for files named by other keys (`names`).
    pub fn load_named(cert: PathBuf, key: PathBuf, section: &'static str, names: (String, String)) -> Result<Arc<Self>, TlsError> {
        let current = RwLock::new(Arc::new(load_key(&cert, &key, (&names.0, &names.1))?));
        Ok(Arc::new(KeyFiles { cert, key, section, names, current }))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads the files; on failure the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_key(&self.cert, &self.key, (&self.names.0, &self.names.1))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }
}

/// Reloaded on change or SIGHUP by [`crate::reload::watch`]; counted in
/// `kinlink_turn_tls_reloads_total{listener}`.
impl crate::reload::Reloadable for KeyFiles {
    fn label(&self) -> &'static str {
        self.section
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.cert.clone(), self.key.clone()]
    }

    fn reload(&self) -> Result<(), String> {
        KeyFiles::reload(self).map_err(|e| e.to_string())
    }
}

/// As a TLS client's certificate (TLS to Redis): each handshake presents the current pair,
/// so a reconnect after the files were renewed uses the new one.
impl tokio_rustls::rustls::client::ResolvesClientCert for KeyFiles {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[tokio_rustls::rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Whether a certificate chain's leaf is valid for `name` (its SANs, wildcards included).
fn valid_for(key: &CertifiedKey, name: &str) -> bool {
    let Ok(name) = ServerName::try_from(name) else { return false };
    key.cert.first().is_some_and(|leaf| webpki::EndEntityCert::try_from(leaf).is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok()))
}

/// A certificate source the resolver can pick from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files (`http.tls_cert`, `turn.tls_cert`).
    Files(Arc<KeyFiles>),
    /// Certificates kinlink obtains itself (ACME), which also answers TLS-ALPN-01 challenges.
    Resolver(Arc<dyn ResolvesServerCert>),
}

/// Picks the certificate for a handshake: an ACME challenge (`acme-tls/1`) goes to the ACME
/// source; otherwise the first source whose certificate is valid for the SNI name, else the
/// first source (clients without SNI, or with an IP address).
/// A client that offers ALPN, none of it served here (when the listener names what it
/// serves), gets no certificate: a misrouted connection is refused in the handshake.
#[derive(Debug)]
pub struct SniResolver {
    sources: Vec<Source>,
    alpn: Vec<Vec<u8>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if !self.alpn.is_empty() && hello.alpn().is_some_and(|mut offered| !offered.any(|p| self.alpn.iter().any(|a| a == p))) {
            return None;
        }
        let acme_challenge = hello.alpn().is_some_and(|mut a| a.any(|p| p == crate::tls::ACME_TLS_ALPN));
        let resolver = self.sources.iter().find_map(|s| match s {
            Source::Resolver(r) => Some(r.clone()),
            Source::Files(_) => None,
        });
        if acme_challenge {
            return resolver.and_then(|r| r.resolve(hello));
        }
        let name = hello.server_name().map(str::to_owned);
        let files: Vec<Arc<CertifiedKey>> = self.sources.iter().filter_map(|s| if let Source::Files(f) = s { Some(f.current()) } else { None }).collect();
        if let Some(name) = &name {
            if let Some(k) = files.iter().find(|k| valid_for(k, name)) {
                return Some(k.clone());
            }
        }
        // The ACME certificate (for its domains), then the first file pair.
        if let Some(r) = resolver {
            if let Some(k) = r.resolve(hello) {
                if files.is_empty() || name.as_deref().is_some_and(|n| valid_for(&k, n)) {
                    return Some(k);
                }
            }
        }
        files.into_iter().next()
    }
}

/// The ALPN protocol id of TLS-ALPN-01 challenges (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A TLS acceptor over one or more certificate sources (their files are reloaded by
/// [`KeyFiles::watch`], which the server runs once per pair).
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<ServerConfig>,
    /// The `listener` label of the handshake-failure metric (`turn`, `http`, `shared`).
    label: &'static str,
}

impl Acceptor {
    /// Several sources picked by SNI, offering `alpn` (a client offering ALPN with none of
    /// these is refused in the handshake).
    pub fn with_sources(sources: Vec<Source>, alpn: Vec<Vec<u8>>, label: &'static str) -> Self {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver { sources, alpn: alpn.clone() }));
        config.alpn_protocols = alpn;
        Acceptor { config: Arc::new(config), label }
    }

    /// Completes a TLS handshake.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<ServerTls> {
        match TlsAcceptor::from(self.config.clone()).accept(Coalesced::new(stream)).into_fallible().await {
            Ok(s) => Ok(s),
            Err((e, mut io)) => {
                // rustls queued an alert that says why; it goes out before the socket closes.
                let _ = io.flush().await;
                Err(e)
            }
        }
    }

    /// Completes a handshake by `deadline`. A failure (or the deadline) is counted by reason in
    /// `kinlink_turn_tls_handshake_failures_total{listener}` and yields `None`: a socket that
    /// never finishes the handshake is held no longer than that.
    pub async fn accept_by(&self, stream: TcpStream, deadline: tokio::time::Instant, metrics: &crate::metrics::Metrics) -> Option<ServerTls> {
        let reason = match tokio::time::timeout_at(deadline, self.accept(stream)).await {
            Ok(Ok(s)) => return Some(s),
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                tracing::debug!(listener = self.label, reason, error = %e, "TLS handshake failed");
                reason
            }
            Err(_) => "timeout",
        };
        metrics.turn_tls_handshake_failures.with_label_values(&[self.label, reason]).inc();
        None
    }
}

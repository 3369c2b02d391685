//! Where token keys and shared secrets come from while kinlink runs:
//! - `auth.public_keys`: a JWKS file, reloaded on change or SIGHUP ([`JwksFile`]);
//! - `auth.public_keys_url`: an https JWKS URL, fetched every `public_keys_refresh_secs`;
//!   its keys stay usable for `public_keys_max_stale_secs` after the last good fetch, then
//!   tokens needing them are refused as `keys_unavailable` ([`poll_jwks_url`]);
//! - `auth.token_secrets_file` and `turn.secrets_file`: secrets one per line, the first
//!   mints and every one is accepted, so a secret is rotated by putting the new one first,
//!   waiting out the longest lifetime, then removing the old one ([`SecretsFile`]).
//!
//! A reload that fails (a half-written file, a bad key) keeps the keys loaded before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::jwks;
use super::token::TokenVerifier;
use crate::config::Secret;

/// Shortest secret accepted, as for `auth.token_secret` and `turn.secret`.
pub const MIN_SECRET_BYTES: usize = 16;
/// Most secrets one file may hold.
pub const MAX_SECRETS: usize = 16;

/// Reads a secrets file: one secret a line, blank lines and `#` comments skipped.
pub fn read_secrets(path: &Path) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secrets: Vec<Secret> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(Secret::new).collect();
    if secrets.is_empty() {
        return Err(format!("{}: no secret in the file", path.display()));
    }
    if secrets.len() > MAX_SECRETS {
        return Err(format!("{}: {} secrets, at most {MAX_SECRETS}", path.display(), secrets.len()));
    }
    if let Some(i) = secrets.iter().position(|s| s.expose().len() < MIN_SECRET_BYTES) {
        return Err(format!("{}: secret {} is shorter than {MIN_SECRET_BYTES} characters", path.display(), i + 1));
    }
    Ok(secrets)
}

/// A secrets file and what to do with its contents.
pub struct SecretsFile {
    path: PathBuf,
    label: &'static str,
    apply: Box<dyn Fn(Vec<Secret>) + Send + Sync>,
}

impl SecretsFile {
    /// Reads `path` and hands its secrets to `apply`, now and at every reload; fails when the
    /// file is unusable now.
    pub fn load(path: PathBuf, label: &'static str, apply: impl Fn(Vec<Secret>) + Send + Sync + 'static) -> Result<Arc<Self>, String> {
        let f = SecretsFile { path, label, apply: Box::new(apply) };
        crate::reload::Reloadable::reload(&f)?;
        Ok(Arc::new(f))
    }
}

impl crate::reload::Reloadable for SecretsFile {
    fn label(&self) -> &'static str {
        self.label
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn reload(&self) -> Result<(), String> {
        (self.apply)(read_secrets(&self.path)?);
        Ok(())
    }
}

/// `auth.public_keys`.
pub struct JwksFile {
    path: PathBuf,
    verifier: TokenVerifier,
}

impl JwksFile {
    /// Loads the file into `verifier`; fails when it is unusable now.
    pub fn load(path: PathBuf, verifier: TokenVerifier) -> Result<Arc<Self>, String> {
        let f = JwksFile { path, verifier };
        crate::reload::Reloadable::reload(&f)?;
        Ok(Arc::new(f))
    }
}

impl crate::reload::Reloadable for JwksFile {
    fn label(&self) -> &'static str {
        "jwks_file"
    }

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn reload(&self) -> Result<(), String> {
        let bytes = std::fs::read(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let keys = jwks::parse(&bytes, self.verifier.policy().rs256).map_err(|e| format!("{}: {e}", self.path.display()))?;
        tracing::info!(keys = keys.len(), "auth.public_keys loaded");
        self.verifier.update_keys(|k| k.file = keys);
        Ok(())
    }
}

/// How the JWKS URL is fetched, from `auth.*`.
#[derive(Debug, Clone)]
pub struct UrlSource {
    /// `https://host[:port]/path`.
    pub url: String,
    /// Extra CA certificates (PEM) to trust, beside the web's roots.
    pub ca_file: Option<PathBuf>,
    /// Seconds between fetches.
    pub refresh: Duration,
    /// How long keys stay usable after the last good fetch.
    pub max_stale_secs: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an https URL kinlink can fetch.
    #[error("{0}")]
    BadUrl(String),
    /// Connecting, TLS or HTTP failed.
    #[error("{0}")]
    Transport(String),
    /// Not 200, or the body is too large.
    #[error("{0}")]
    Http(String),
    /// The body is not a usable JWKS.
    #[error("{0}")]
    Keys(#[from] jwks::KeyError),
}

/// What the fetch loop reports to metrics (the caller's closure).
pub type FetchReport = Box<dyn Fn(bool, u64) + Send + Sync>;

/// Fetches the JWKS URL now and every `refresh`, keeping the last good keys for
/// `max_stale_secs`. `report(ok, last_good_unix)` after each attempt.
pub async fn poll_jwks_url(source: UrlSource, verifier: TokenVerifier, report: FetchReport) {
    let tls = match client_config(source.ca_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "auth.public_keys_url: cannot build the TLS client; the URL's keys stay unavailable");
            return;
        }
    };
    let mut last_good = 0u64;
    let mut failures = 0u32;
    loop {
        let result = fetch(&source.url, &tls, Duration::from_secs(10)).await.and_then(|body| Ok(jwks::parse(&body, verifier.policy().rs256)?));
        let now = super::unix_now();
        match result {
            Ok(keys) => {
                if failures > 0 || last_good == 0 {
                    tracing::info!(keys = keys.len(), "auth.public_keys_url fetched");
                }
                failures = 0;
                last_good = now;
                verifier.update_keys(|k| {
                    k.url = keys;
                    k.url_valid_until = now.saturating_add(source.max_stale_secs);
                });
            }
            Err(e) => {
                failures += 1;
                // One line per failure streak step that doubles: an unreachable URL does not
                // flood the log.
                if failures.is_power_of_two() {
                    let stale_for = if last_good == 0 { "never fetched".to_string() } else { format!("{} s", now.saturating_sub(last_good)) };
                    tracing::warn!(error = %e, failures, stale_for, max_stale_secs = source.max_stale_secs, "auth.public_keys_url fetch failed; keeping the last keys within the stale period");
                }
            }
        }
        report(failures == 0, last_good);
        // A failing URL is retried sooner than the refresh, but not in a tight loop.
        let wait = if failures == 0 { source.refresh } else { source.refresh.min(Duration::from_secs(5u64 << failures.min(4))) };
        tokio::time::sleep(wait).await;
    }
}

fn client_config(ca_file: Option<&Path>) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("auth.public_keys_ca_file: {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("auth.public_keys_ca_file: {e}"))?;
            roots.add(cert).map_err(|e| format!("auth.public_keys_ca_file: {e}"))?;
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `https://host[:port]/path` split into host, port and path.
pub fn parse_https_url(url: &str) -> Result<(String, u16, String), FetchError> {
    let rest = url.strip_prefix("https://").ok_or_else(|| FetchError::BadUrl(format!("`{url}` is not an https:// URL")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = crate::probe::split_host_port(authority, 443).ok_or_else(|| FetchError::BadUrl(format!("`{url}`: bad host or port")))?;
    if host.is_empty() {
        return Err(FetchError::BadUrl(format!("`{url}`: no host")));
    }
    Ok((host, port, path.to_string()))
}

/// One GET over HTTPS, the body bounded to [`jwks::MAX_JWKS_BYTES`].
async fn fetch(url: &str, tls: &Arc<tokio_rustls::rustls::ClientConfig>, timeout: Duration) -> Result<Vec<u8>, FetchError> {
    use http_body_util::{BodyExt, Empty, Limited};
    let (host, port, path) = parse_https_url(url)?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| FetchError::Transport(format!("connect {host}:{port}: {e}")))?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| FetchError::BadUrl(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| FetchError::Transport(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| FetchError::Transport(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let authority = if port == 443 { host.clone() } else { format!("{host}:{port}") };
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::ACCEPT, "application/jwk-set+json, application/json")
            .header(hyper::header::USER_AGENT, concat!("kinlink/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| FetchError::BadUrl(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| FetchError::Transport(e.to_string()))?;
        if resp.status() != hyper::StatusCode::OK {
            conn.abort();
            return Err(FetchError::Http(format!("HTTP {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), jwks::MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Http(format!("body: {e}")))?
            .to_bytes();
        conn.abort();
        Ok(body.to_vec())
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| FetchError::Transport(format!("no answer within {} s", timeout.as_secs())))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_files_are_strict() {
        let dir = std::env::temp_dir().join(format!("kinlink-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        std::fs::write(&p, "# new first\nnew-secret-0123456789\n\n  old-secret-0123456789  \n").unwrap();
        let s = read_secrets(&p).unwrap();
        assert_eq!(s.iter().map(Secret::expose).collect::<Vec<_>>(), ["new-secret-0123456789", "old-secret-0123456789"]);
        std::fs::write(&p, "short\n").unwrap();
        assert!(read_secrets(&p).unwrap_err().contains("shorter"));
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(read_secrets(&p).unwrap_err().contains("no secret"));
        assert!(read_secrets(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn urls() {
        assert_eq!(parse_https_url("https://keys.example/.well-known/jwks.json").unwrap(), ("keys.example".into(), 443, "/.well-known/jwks.json".into()));
        assert_eq!(parse_https_url("https://127.0.0.1:8443").unwrap(), ("127.0.0.1".into(), 8443, "/".into()));
        assert!(parse_https_url("http://keys.example/").is_err());
    }
}

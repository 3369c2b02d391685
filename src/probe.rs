//! `kinlink healthcheck`: a tiny HTTP GET for container HEALTHCHECKs and `helm test`, so
//! the image needs no curl or shell. Plain `http://` only: health endpoints are internal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::config::Config;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Not an `http://host:port/path` URL.
    #[error("{0}: not an http:// URL")]
    BadUrl(String),
    /// Name resolution, connect, write or read failed.
    #[error("{url}: {error}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        error: std::io::Error,
    },
    /// The server answered, but not 200.
    #[error("{url}: {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status line.
        status: String,
    },
}

/// The local readiness URL of this configuration: the metrics listener's `/readyz` (or the
/// HTTP listener's when metrics share it), on loopback when it listens on all addresses.
pub fn default_url(config: &Config) -> String {
    let addr = config.metrics.listen_addr().unwrap_or(config.http.listen);
    let ip = if addr.ip().is_unspecified() {
        if addr.is_ipv6() { "[::1]".to_string() } else { "127.0.0.1".to_string() }
    } else {
        SocketAddr::new(addr.ip(), 0).to_string().trim_end_matches(":0").to_string()
    };
    format!("http://{ip}:{}/readyz", addr.port())
}

/// GETs `url`; Ok with the status line when it is 200.
pub fn get(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| ProbeError::BadUrl(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(ProbeError::BadUrl(url.into()));
    }
    let io = |error| ProbeError::Io { url: url.into(), error };
    let target = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = target.to_socket_addrs().map_err(io)?.next().ok_or_else(|| ProbeError::BadUrl(url.into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: kinlink-healthcheck\r\nConnection: close\r\n\r\n").map_err(io)?;
    // The status line is all we need; health bodies are tiny.
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        let read = stream.read(&mut buf[n..]).map_err(io)?;
        if read == 0 || buf[..n + read].contains(&b'\n') {
            n += read;
            break;
        }
        n += read;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let status = head.lines().next().unwrap_or("").trim().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(status)
    } else {
        Err(ProbeError::Status { url: url.into(), status: if status.is_empty() { "no HTTP answer".into() } else { status } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_url_follows_the_metrics_listener() {
        let mut c = Config::default();
        assert_eq!(default_url(&c), "http://127.0.0.1:9090/readyz");
        c.metrics.listen = "10.1.2.3:9100".into();
        assert_eq!(default_url(&c), "http://10.1.2.3:9100/readyz");
        c.metrics.listen = String::new();
        c.http.listen = "[::]:8080".parse().unwrap();
        assert_eq!(default_url(&c), "http://[::1]:8080/readyz");
    }

    #[test]
    fn bad_urls_and_closed_ports_fail() {
        assert!(matches!(get("https://x/", Duration::from_secs(1)), Err(ProbeError::BadUrl(_))));
        assert!(matches!(get("http:///x", Duration::from_secs(1)), Err(ProbeError::BadUrl(_))));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(get(&format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(1)), Err(ProbeError::Io { .. })));
    }
}

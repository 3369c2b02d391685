//! `kinlink healthcheck`: a tiny HTTP GET for container HEALTHCHECKs and `helm test`, so
//! the image needs no curl or shell. Plain `http://` only: health endpoints are internal.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
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
    format!("{}/readyz", local_base(config.metrics.listen_addr().unwrap_or(config.http.listen)))
}

/// `http://` base URL of a listener as seen from this host: loopback for a wildcard address.
pub fn local_base(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if !ip.is_unspecified() => ip,
        IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// `host[:port]` or `[v6][:port]` split into a host (without brackets) and a port.
pub fn split_host_port(authority: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, p)) if !host.is_empty() => Some((host.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_string(), default)),
        None => None,
    }
}

/// GETs `url`; Ok with the status line when it is 200.
pub fn get(url: &str, timeout: Duration) -> Result<String, ProbeError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| ProbeError::BadUrl(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_host_port(authority, 80).ok_or_else(|| ProbeError::BadUrl(url.into()))?;
    let io = |error| ProbeError::Io { url: url.into(), error };
    let addr = (host.as_str(), port).to_socket_addrs().map_err(io)?.next().ok_or_else(|| ProbeError::BadUrl(url.into()))?;
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
    fn authorities_split() {
        assert_eq!(split_host_port("h:8080", 80), Some(("h".into(), 8080)));
        assert_eq!(split_host_port("h", 80), Some(("h".into(), 80)));
        assert_eq!(split_host_port("[::1]:9", 80), Some(("::1".into(), 9)));
        assert_eq!(split_host_port("[::1]", 443), Some(("::1".into(), 443)));
        assert_eq!(split_host_port("h:x", 80), None);
        assert_eq!(split_host_port("", 80), None);
        assert_eq!(local_base("10.0.0.1:80".parse().unwrap()), "http://10.0.0.1:80");
        assert_eq!(local_base("[2001:db8::1]:80".parse().unwrap()), "http://[2001:db8::1]:80");
    }

    #[test]
    fn bad_urls_and_closed_ports_fail() {
        assert!(matches!(get("https://x/", Duration::from_secs(1)), Err(ProbeError::BadUrl(_))));
        assert!(matches!(get("http:///x", Duration::from_secs(1)), Err(ProbeError::BadUrl(_))));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(get(&format!("http://127.0.0.1:{port}/readyz"), Duration::from_secs(1)), Err(ProbeError::Io { .. })));
    }
}

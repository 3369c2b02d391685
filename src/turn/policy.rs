//! Which peers a relay may talk to. By default never loopback, private, CGNAT, link-local
//! (with the 169.254.169.254 metadata address), multicast, broadcast, unspecified, `0.0.0.0/8`,
//! documentation/benchmark/reserved ranges, the IPv6 equivalents, and IPv4 addresses hidden
//! inside IPv6 (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`): the
//! bypass of CVE-2020-26262. Never kinlink's own listening ports. Operators allow-list CIDRs
//! (`turn.allowed_peers`), which win over the defaults, and add denials (`turn.denied_peers`),
//! which win over everything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside (an IPv4 network never contains an IPv6 address, and the reverse;
    /// callers unwrap embedded IPv4 first).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{s}` is not an IP network like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{s}`: prefix must be 0-{max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a peer was refused; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// In a default-denied special-purpose range.
    SpecialRange,
    /// In `turn.denied_peers`.
    DenyList,
    /// One of kinlink's own listening sockets.
    OwnPort,
}

impl Denied {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Denied; 3] = [Denied::SpecialRange, Denied::DenyList, Denied::OwnPort];

    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Denied::SpecialRange => "special_range",
            Denied::DenyList => "deny_list",
            Denied::OwnPort => "own_port",
        }
    }
}

/// The default-denied ranges (IPv4 and native IPv6 forms).
const DEFAULT_DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// The peer policy.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Vec<Cidr>,
    denied: Vec<Cidr>,
    defaults: Vec<Cidr>,
    own: Vec<SocketAddr>,
}

/// The IPv4 address inside an IPv6 one, if any: mapped, compatible or NAT64 well-known prefix.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let seg = ip.segments();
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || (seg[5] == 0 && u32::from(v4) > 1)) {
        return Some(v4); // ::ffff:a.b.c.d or ::a.b.c.d (not :: or ::1)
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(v4);
    }
    None
}

impl PeerPolicy {
    /// A policy with operator lists on top of the defaults. `own` are kinlink's listening
    /// sockets as peers would address them (the caller expands an unspecified listen address
    /// to the advertised public IP).
    pub fn new(allowed: Vec<Cidr>, denied: Vec<Cidr>, own: Vec<SocketAddr>) -> Self {
        let defaults = DEFAULT_DENIED.iter().map(|s| s.parse().expect("built-in CIDR")).collect();
        PeerPolicy { allowed, denied, defaults, own }
    }

    /// Checks a peer (CreatePermission/ChannelBind address, or the source of a peer packet).
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        // Checked against both the unwrapped and the literal form, so an operator's IPv6
        // deny entry also matches.
        let forms = [ip, peer.ip()];
        if forms.iter().any(|f| self.denied.iter().any(|c| c.contains(*f))) {
            return Err(Denied::DenyList);
        }
        // Never relay into ourselves, allow-listed or not: that is a loop.
        if self.own.iter().any(|o| o.port() == peer.port() && o.ip() == ip) {
            return Err(Denied::OwnPort);
        }
        if forms.iter().any(|f| self.allowed.iter().any(|c| c.contains(*f))) {
            return Ok(());
        }
        if forms.iter().any(|f| self.defaults.iter().any(|c| c.contains(*f))) {
            return Err(Denied::SpecialRange);
        }
        Ok(())
    }
}

/// Parses a CIDR list for config key `key`.
pub fn parse_list(key: &str, items: &[String]) -> Result<Vec<Cidr>, String> {
    items.iter().map(|s| s.parse::<Cidr>().map_err(|e| format!("{key}: {e}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_table_including_embedded_ipv4() {
        let p = PeerPolicy::new(vec![], vec![], vec![]);
        let denied = [
            "127.0.0.1:9", "10.1.2.3:9", "172.16.0.1:9", "172.31.255.255:9", "192.168.1.1:9", "100.64.0.1:9",
            "100.127.255.255:9", "169.254.169.254:80", "169.254.1.1:9", "224.0.0.1:9", "239.255.255.250:1900",
            "255.255.255.255:9", "0.0.0.0:9", "0.1.2.3:9", "240.0.0.1:9", "[::1]:9", "[::]:9", "[fc00::1]:9",
            "[fd12:3456::1]:9", "[fe80::1]:9", "[ff02::1]:9",
            // CVE-2020-26262 style: IPv4 hidden in IPv6.
            "[::ffff:127.0.0.1]:9", "[::ffff:10.0.0.1]:9", "[::ffff:169.254.169.254]:80", "[::127.0.0.1]:9",
            "[::ffff:192.168.0.1]:9", "[64:ff9b::10.0.0.1]:9", "[64:ff9b::7f00:1]:9", "[::ffff:0.0.0.0]:9",
        ];
        for d in denied {
            assert_eq!(p.check(addr(d)), Err(Denied::SpecialRange), "{d}");
        }
        for ok in ["8.8.8.8:53", "1.1.1.1:9", "[2606:4700::1111]:443", "[::ffff:8.8.8.8]:53", "172.32.0.1:9", "100.128.0.1:9"] {
            assert_eq!(p.check(addr(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn allow_and_deny_lists_and_own_ports() {
        let own = vec![addr("127.0.0.1:3478"), addr("198.51.100.7:5349"), addr("1.2.3.4:3478")];
        let p = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec!["8.8.8.0/24".parse().unwrap()], own);
        assert_eq!(p.check(addr("127.0.0.1:4000")), Ok(()));
        assert_eq!(p.check(addr("[::ffff:127.0.0.1]:4000")), Ok(()));
        assert_eq!(p.check(addr("8.8.8.8:53")), Err(Denied::DenyList));
        assert_eq!(p.check(addr("[::ffff:8.8.8.8]:53")), Err(Denied::DenyList));
        // Own listening sockets are refused even inside an allow-listed network.
        assert_eq!(p.check(addr("127.0.0.1:3478")), Err(Denied::OwnPort));
        assert_eq!(p.check(addr("[::ffff:127.0.0.1]:3478")), Err(Denied::OwnPort));
        assert_eq!(p.check(addr("1.2.3.4:3478")), Err(Denied::OwnPort));
        assert_eq!(p.check(addr("1.2.3.4:3479")), Ok(()));
        assert_eq!(p.check(addr("198.51.100.7:5349")), Err(Denied::OwnPort));
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/8".parse::<Cidr>().is_ok());
        assert!("::1".parse::<Cidr>().is_ok());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana/8".parse::<Cidr>().is_err());
        let err = parse_list("turn.allowed_peers", &["10.0.0.0/8".into(), "x".into()]).unwrap_err();
        assert!(err.starts_with("turn.allowed_peers: "), "{err}");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
    }
}

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
    /// The network of one address.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
    }

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

/// The default-denied ranges: eturnal's "recommended" set (IANA special-purpose registries),
/// IPv4 and native IPv6 forms. IPv6 forms that carry an IPv4 address (6to4, Teredo, NAT64,
/// SIIT) are denied as prefixes *and* unwrapped, so allow-listing a prefix still applies the
/// IPv4 policy to what it wraps.
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
    // Mapped, compatible, SIIT and well-known NAT64 forms are only unwrapped: they are
    // spellings of an IPv4 address, which gets the IPv4 policy.
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/32",
    "2001:2::/48",
    "2001:10::/28",
    "2001:20::/28",
    "2001:db8::/32",
    "2002::/16",
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
    own: Vec<OwnAddr>,
}

/// One of kinlink's own listening sockets as a peer could address it: every IP in `ips` on
/// `port` (a wildcard listener is reachable on every local address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnAddr {
    /// The networks the listener answers on.
    pub ips: Vec<Cidr>,
    /// Its port.
    pub port: u16,
}

impl OwnAddr {
    fn contains(&self, ip: IpAddr, port: u16) -> bool {
        self.port == port && self.ips.iter().any(|c| c.contains(ip))
    }
}

/// The IPv4 addresses carried inside an IPv6 one (RFC 4291 mapped and compatible, RFC 6052
/// NAT64 with the well-known and the local-use /48 prefix, RFC 6145 SIIT, RFC 3056 6to4,
/// RFC 4380 Teredo server and client). At most two (Teredo carries both ends).
pub fn embedded_v4(ip: Ipv6Addr) -> impl Iterator<Item = Ipv4Addr> {
    let o = ip.octets();
    let seg = ip.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let mut found: [Option<Ipv4Addr>; 2] = [None, None];
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || (seg[5] == 0 && u32::from(tail) > 1)) {
        found[0] = Some(tail); // ::ffff:a.b.c.d or ::a.b.c.d (not :: or ::1)
    } else if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
        found[0] = Some(tail); // SIIT ::ffff:0:a.b.c.d
    } else if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        found[0] = Some(tail); // NAT64 64:ff9b::/96
    } else if seg[..3] == [0x64, 0xff9b, 1] {
        // Local-use NAT64 /48 (RFC 6052 §2.2): IPv4 in bytes 6..8 and 9..11, byte 8 is zero.
        found[0] = Some(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
    } else if seg[0] == 0x2002 {
        found[0] = Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])); // 6to4
    } else if seg[0] == 0x2001 && seg[1] == 0 {
        // Teredo: the server in bytes 4..8, the client's mapped address inverted in 12..16.
        found[0] = Some(Ipv4Addr::new(o[4], o[5], o[6], o[7]));
        found[1] = Some(Ipv4Addr::from(!u32::from(tail)));
    }
    found.into_iter().flatten()
}

impl PeerPolicy {
    /// A policy with operator lists on top of the defaults. `own` are kinlink's listening
    /// sockets as peers could address them (see [`OwnAddr`]).
    pub fn new(allowed: Vec<Cidr>, denied: Vec<Cidr>, own: Vec<OwnAddr>) -> Self {
        let defaults = DEFAULT_DENIED.iter().map(|s| s.parse().expect("built-in CIDR")).collect();
        PeerPolicy { allowed, denied, defaults, own }
    }

    /// The port numbers of kinlink's own listeners.
    pub fn own_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.own.iter().map(|o| o.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Checks a peer (CreatePermission/ChannelBind address, the destination of a Send
    /// indication, or the source of a peer packet). The literal address and every IPv4
    /// address it wraps are checked: the operator's deny list and kinlink's own sockets match
    /// any form; a default-denied range is lifted only when `allowed_peers` covers that form.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Denied> {
        let mut forms = [Some(peer.ip()), None, None];
        if let IpAddr::V6(v6) = peer.ip() {
            for (slot, v4) in forms[1..].iter_mut().zip(embedded_v4(v6)) {
                *slot = Some(IpAddr::V4(v4));
            }
        }
        let forms = || forms.iter().flatten().copied();
        if forms().any(|f| self.denied.iter().any(|c| c.contains(f))) {
            return Err(Denied::DenyList);
        }
        // Never relay into ourselves, allow-listed or not: that is a loop.
        if forms().any(|f| self.own.iter().any(|o| o.contains(f, peer.port()))) {
            return Err(Denied::OwnPort);
        }
        let special = |f: IpAddr| self.defaults.iter().any(|c| c.contains(f)) && !self.allowed.iter().any(|c| c.contains(f));
        if forms().any(special) {
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
        let own = vec![
            OwnAddr { ips: vec!["127.0.0.1".parse().unwrap()], port: 3478 },
            OwnAddr { ips: vec!["198.51.100.7".parse().unwrap()], port: 5349 },
            OwnAddr { ips: vec!["1.2.3.4".parse().unwrap()], port: 3478 },
        ];
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
    fn ipv4_inside_every_ipv6_wrapper_gets_the_ipv4_policy() {
        let p = PeerPolicy::new(vec![], vec![], vec![]);
        for d in [
            "[2002:7f00:1::]:9",        // 6to4 of 127.0.0.1
            "[2002:a9fe:a9fe::]:80",    // 6to4 of 169.254.169.254
            "[2002:0808:0808::1]:9",    // 6to4 itself is default-denied (eturnal's set)
            "[2001:0:4136:e378:8000:63bf:80ff:fffe]:9", // Teredo, client 127.0.0.1
            "[64:ff9b:1:7f00:0:100::]:9", // local-use NAT64 /48 of 127.0.0.1
            "[::ffff:0:7f00:1]:9",      // SIIT of 127.0.0.1
            "[::ffff:0:a00:1]:9",       // SIIT of 10.0.0.1
            "[100::1]:9", "[2001:db8::1]:9", "[2001:20::1]:9",
            "100.64.0.1:9", "192.0.0.8:9", "198.18.0.1:9", "192.0.2.1:9", "198.51.100.1:9", "203.0.113.9:9",
            "240.0.0.1:9", "255.255.255.255:9",
        ] {
            assert_eq!(p.check(addr(d)), Err(Denied::SpecialRange), "{d}");
        }
        // Public addresses in the forms that are only unwrapped stay reachable.
        for ok in ["[::ffff:0:808:808]:53", "[64:ff9b::8.8.8.8]:53"] {
            assert_eq!(p.check(addr(ok)), Ok(()), "{ok}");
        }
        // Allow-listing the 6to4 prefix still applies the IPv4 policy to what it wraps.
        let p = PeerPolicy::new(vec!["2002::/16".parse().unwrap()], vec![], vec![]);
        assert_eq!(p.check(addr("[2002:0808:0808::1]:9")), Ok(()));
        assert_eq!(p.check(addr("[2002:7f00:1::]:9")), Err(Denied::SpecialRange));
        let p = PeerPolicy::new(vec!["2002::/16".parse().unwrap(), "127.0.0.0/8".parse().unwrap()], vec![], vec![]);
        assert_eq!(p.check(addr("[2002:7f00:1::]:9")), Ok(()));
        // The operator's deny list and own sockets match wrapped forms too.
        let own = vec![OwnAddr { ips: vec!["127.0.0.0/8".parse().unwrap()], port: 3478 }];
        let p = PeerPolicy::new(vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], vec!["9.9.9.0/24".parse().unwrap()], own);
        assert_eq!(p.check(addr("[2002:0909:0909::]:9")), Err(Denied::DenyList));
        assert_eq!(p.check(addr("[2002:7f00:2::]:3478")), Err(Denied::OwnPort));
        assert_eq!(p.check(addr("127.9.9.9:3478")), Err(Denied::OwnPort));
        assert_eq!(p.check(addr("127.9.9.9:3479")), Ok(()));
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

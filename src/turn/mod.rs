//! The embedded STUN/TURN server (RFC 8489, RFC 8656) that accepts the TURN REST credentials
//! the signaling side hands out.
//!
//! - [`stun`]: the wire format (zero-copy parser, builder, integrity, ChannelData).
//! - [`policy`]: which peer addresses may be relayed to.
//! - [`server`]: the rules, sans-IO: the control plane (auth, allocations, permissions,
//!   channels, quotas) and each allocation's data [`server::Path`].
//! - [`shard`]: the UDP data plane, one thread per core with batched socket I/O.
//! - [`stream`]: the TCP and TLS client legs; [`outbox`]: what one of them is about to be sent.
//! - [`relay`]: binding relay sockets; [`batch`]: `recvmmsg`/`sendmmsg`.
//! - [`telemetry`]: the core's and the shards' counters as Prometheus metrics.

pub mod batch;
pub mod discover;
pub mod outbox;
pub mod policy;
pub mod relay;
pub mod server;
pub mod shard;
pub mod stream;
pub mod stun;
pub mod telemetry;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::TurnConfig;
use crate::connlimit::ConnLimiter;
use crate::health::{supervise, Health};
use crate::metrics::Metrics;
use policy::{Cidr, OwnAddr};
use relay::{Relay, RelayBinder};
use server::{ClientAction, FiveTuple, Path, Settings, TurnServer};
use shard::ShardHandle;
use stream::{Ctx, StreamTimeouts};

/// The control plane, shared by every shard and stream task. A std mutex: every section is
/// short, never crosses an `.await` and makes no system call.
pub type Core = Arc<Mutex<TurnServer<Relay>>>;

/// Locks the core; a panic elsewhere must not take TURN down with it.
pub fn lock(core: &Core) -> std::sync::MutexGuard<'_, TurnServer<Relay>> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the drivers reach the control plane: a STUN request in, a reply and maybe a new
/// allocation out, with relay sockets bound between two short holds of the lock.
#[derive(Clone)]
pub struct Control {
    core: Core,
    binder: Arc<RelayBinder>,
}

impl Control {
    /// Handles a STUN request from `tuple`: the reply to send, and the path of an allocation
    /// it started (which the caller must have a shard read).
    pub fn request(&self, tuple: FiveTuple, buf: &[u8]) -> (Option<Vec<u8>>, Option<Arc<Path<Relay>>>) {
        let (mut action, mut released) = self.locked(|core| core.handle_client(Instant::now(), tuple, buf));
        if let ClientAction::Bind(request) = action {
            // Outside the lock: binding may try dozens of ports.
            let bound = self.binder.bind(&request);
            drop(released);
            (action, released) = self.locked(|core| core.allocated(Instant::now(), request, bound));
        }
        drop(released);
        match action {
            ClientAction::None | ClientAction::Bind(_) => (None, None),
            ClientAction::Reply(reply) => (Some(reply), None),
            ClientAction::Started { reply, path } => (Some(reply), Some(path)),
        }
    }

    /// `cached` while its allocation is open, else the core's current one for `tuple` (a
    /// frame before the driver saw the allocation, or after it was replaced); none counts a
    /// `no_allocation` drop.
    pub fn live_path(&self, cached: Option<&Arc<Path<Relay>>>, tuple: &FiveTuple, counters: &server::DataCounters) -> Option<Arc<Path<Relay>>> {
        let live = match cached {
            Some(p) if !p.is_closed() => Some(p.clone()),
            _ => lock(&self.core).path(tuple),
        };
        if live.is_none() {
            counters.dropped(server::DropReason::NoAllocation);
        }
        live
    }

    /// A TCP/TLS client is gone.
    pub fn closed(&self, tuple: &FiveTuple) {
        let ((), released) = self.locked(|core| core.handle_client_closed(Instant::now(), tuple));
        drop(released);
    }

    /// Runs `f` on the core and returns, with its result, what the core let go of: the caller
    /// drops that after the lock is released, so no socket is closed under it.
    fn locked<T>(&self, f: impl FnOnce(&mut TurnServer<Relay>) -> T) -> (T, server::Released<Relay>) {
        let mut core = lock(&self.core);
        let out = f(&mut core);
        (out, core.take_released())
    }
}

/// Counter sets TCP/TLS connections spread over (see `stream::Ctx::counters`).
const STREAM_COUNTER_SETS: usize = 16;

/// The control plane, for what reaches TURN from outside its listeners: revocations and
/// secret rotation.
#[derive(Clone)]
pub struct TurnHandle {
    core: Core,
}

impl TurnHandle {
    /// A revocation: the device's (or family's) allocations close now and its credentials are
    /// refused. Returns how many allocations closed.
    pub fn revoke(&self, entry: &crate::auth::revocation::Entry) -> usize {
        let mut core = lock(&self.core);
        let closed = core.revoke(Instant::now(), entry);
        let released = core.take_released();
        drop(core);
        // Relay sockets close outside the lock.
        drop(released);
        closed
    }

    /// Replaces the accepted REST secrets (`turn.secrets_file` reloaded).
    pub fn set_secrets(&self, secrets: Vec<crate::config::Secret>) {
        lock(&self.core).set_secrets(secrets);
    }

}

/// The running TURN server.
pub struct TurnService {
    /// Bound UDP listeners.
    pub udp: Vec<SocketAddr>,
    /// Bound TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// Bound TLS listeners.
    pub tls: Vec<SocketAddr>,
    /// The address relayed addresses carry: `turn.public_ip` (given or discovered at start),
    /// else the relays' own.
    pub advertised_ip: IpAddr,
    core: Core,
    shards: Arc<[Arc<ShardHandle>]>,
    tasks: Vec<JoinHandle<()>>,
    entry: stream::StreamEntry,
}

/// The host's primary IP for a family, found by asking the kernel for a route: `connect()` on
/// a UDP socket sends nothing.
fn primary_ip(v6: bool) -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).ok()?;
    socket.connect(if v6 { "[2001:db8::1]:9" } else { "192.0.2.1:9" }).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The IPv4 address relay sockets bind on, and where it came from: the listener's address
/// when it is specific, else the host's primary IPv4 (so XOR-RELAYED-ADDRESS is reachable
/// even without `turn.public_ip`).
fn relay_bind_ipv4(cfg: &TurnConfig) -> (IpAddr, &'static str) {
    match cfg.udp_listen.0.iter().chain(&cfg.tcp_listen.0).map(|a| a.ip()).find(|ip| ip.is_ipv4()) {
        Some(ip) if !ip.is_unspecified() => (ip, "the TURN listener's address"),
        _ => match primary_ip(false) {
            Some(ip) => (ip, "this host's primary IPv4 (the source of its default route)"),
            None => (IpAddr::from([127, 0, 0, 1]), "loopback: this host has no IPv4 route"),
        },
    }
}

/// Private, loopback, link-local or CGNAT: an address peers on the internet cannot reach.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64,
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// What devices will be handed and told, for `kinlink config check`: the ICE URLs and the
/// relayed address with where it comes from.
pub fn advertised(cfg: &crate::Config) -> Vec<String> {
    let t = &cfg.turn;
    if !t.enabled {
        return vec!["TURN/STUN: off (turn.enabled = false): devices get no ICE servers".into()];
    }
    let ice = crate::ice::IceConfig::new(t, crate::config::Secret::new("-"));
    let urls: Vec<String> = ice.block("f", "d", Some("HOST"), 0, 60).into_iter().flat_map(|s| s.urls).collect();
    let host = if t.public_host.is_empty() {
        "HOST is the Host header of each device's request (set turn.public_host when devices reach signaling through a proxy or another name)".to_string()
    } else {
        format!("HOST is turn.public_host = {}", t.public_host)
    };
    let mut lines = vec![format!("ICE URLs handed to devices: {}", urls.join(", ")), format!("  {host}")];
    if !t.urls.is_empty() {
        lines.push("  (turn.urls is set: kinlink's own TURN server does not run)".into());
        return lines;
    }
    let (ip, from) = match &t.public_ip {
        Some(crate::config::PublicIp::Fixed(ip)) => (*ip, "turn.public_ip"),
        Some(crate::config::PublicIp::Stun(server)) => {
            lines.push(format!("Relayed addresses (XOR-RELAYED-ADDRESS): this node's address as the STUN server {server} sees it, asked at start (kinlink does not start without an answer) and every {} s", t.public_ip_refresh_secs));
            return lines;
        }
        None => relay_bind_ipv4(t),
    };
    lines.push(format!("Relayed addresses (XOR-RELAYED-ADDRESS): {ip}, from {from}"));
    if is_private(ip) {
        lines.push(format!(
            "  WARNING: {ip} is a private address: peers outside this network cannot reach it. Set turn.public_ip to the \
             public IP (behind NAT), or, for a LAN-only install, add the LAN to turn.allowed_peers"
        ));
    }
    lines
}

/// Asks the STUN server again every `every`: a changed address is what new allocations
/// advertise from then on (and is denied as our own); a failed check keeps the last one.
async fn watch_public_ip(server: String, bind: IpAddr, mut current: IpAddr, every: Duration, core: Core, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        match discover::public_address(&server, bind).await {
            Ok(ip) if ip == current => metrics.turn_public_ip_checks.with_label_values(&["same"]).inc(),
            Ok(ip) => {
                metrics.turn_public_ip_checks.with_label_values(&["changed"]).inc();
                tracing::warn!(from = %current, to = %ip, server = %server, "turn.public_ip changed: new allocations advertise the new address (existing ones keep theirs)");
                lock(&core).set_public_ip(ip);
                current = ip;
            }
            Err(e) => {
                metrics.turn_public_ip_checks.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %e, server = %server, kept = %current, "turn.public_ip: STUN check failed; keeping the last address");
            }
        }
    }
}

/// Binds a TCP listener; an IPv6 one only takes IPv6, so it can share the port with IPv4.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A bind result, where failing to bind the IPv6 wildcard on a host without IPv6 is a warning,
/// not an error (the default listens on both families). Any other failure names the key.
fn optional_v6<T>(addr: SocketAddr, key: &str, bound: std::io::Result<T>) -> anyhow::Result<Option<T>> {
    match bound {
        Ok(t) => Ok(Some(t)),
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && e.kind() != std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, error = %e, "{key}: IPv6 unavailable on this host; listening on IPv4 only");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("{key}: cannot bind {addr}"))),
    }
}

impl TurnService {
    /// Binds the listeners and starts serving. `other_own` are kinlink's other listeners
    /// (HTTP, metrics), which the relay must not reach either; `health` shows the listener
    /// tasks on `/readyz`.
    ///
    /// `tls_files` is the `turns:` certificate (loaded and watched by the caller, which may
    /// also serve it on the HTTP port); `cfg`'s TCP/TLS addresses are the dedicated ones (an
    /// address shared with `http.listen` is served through [`TurnService::stream_entry`]).
    pub async fn start(cfg: &TurnConfig, tls_files: Option<Arc<crate::tls::KeyFiles>>, metrics: Arc<Metrics>, health: Arc<Health>, other_own: &[SocketAddr]) -> anyhow::Result<TurnService> {
        let secrets = crate::secrets::turn_secrets(cfg).map_err(anyhow::Error::msg)?;
        let tls_files = tls_files
            .filter(|_| !cfg.tls_listen.0.is_empty())
            .map(|f| crate::tls::Acceptor::with_sources(vec![crate::tls::Source::Files(f)], Vec::new(), "turn"));
        // One socket per shard on every UDP address: the first binds (port 0 picks a port),
        // the others join it with SO_REUSEPORT.
        let shards_n = cfg.shards();
        let mut udp: Vec<Vec<std::net::UdpSocket>> = (0..shards_n).map(|_| Vec::new()).collect();
        for &addr in &cfg.udp_listen.0 {
            if let Some(first) = optional_v6(addr, "turn.udp_listen", relay::bind_udp(addr, cfg.socket_buffer_bytes, true))? {
                let bound = first.local_addr()?;
                udp[0].push(first);
                for sockets in udp.iter_mut().skip(1) {
                    let s = relay::bind_udp(bound, cfg.socket_buffer_bytes, true).with_context(|| format!("turn.udp_listen: cannot add a shard socket on {bound}"))?;
                    sockets.push(s);
                }
            }
        }
        let mut tcp = Vec::new();
        for &addr in &cfg.tcp_listen.0 {
            tcp.extend(optional_v6(addr, "turn.tcp_listen", bind_tcp(addr))?.map(Arc::new));
        }
        let mut tls = Vec::new();
        if tls_files.is_some() {
            for &addr in &cfg.tls_listen.0 {
                tls.extend(optional_v6(addr, "turn.tls_listen", bind_tcp(addr))?.map(Arc::new));
            }
        }
        let udp_addrs = udp[0].iter().map(|s| s.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let tcp_addrs = tcp.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let tls_addrs = tls.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;

        // Relays bind on the listener's IP when it is specific, else on the host's primary IP,
        // so XOR-RELAYED-ADDRESS is always a reachable address even without turn.public_ip.
        let listen_ips: Vec<IpAddr> = cfg.udp_listen.0.iter().chain(&cfg.tcp_listen.0).map(|a| a.ip()).collect();
        let (relay_ipv4, _) = relay_bind_ipv4(cfg);
        let relay_ipv6 = match listen_ips.iter().find(|ip| ip.is_ipv6()) {
            Some(&ip) if !ip.is_unspecified() => ip,
            _ => primary_ip(true).unwrap_or(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
        };
        if cfg.public_ip.is_none() && listen_ips.iter().any(|ip| ip.is_unspecified()) {
            tracing::warn!(relay_ip = %relay_ipv4, "turn.public_ip is not set: relayed addresses use this host IP; set it behind NAT");
        }
        let public_ip = match &cfg.public_ip {
            None => None,
            Some(crate::config::PublicIp::Fixed(ip)) => Some(*ip),
            Some(crate::config::PublicIp::Stun(server)) => {
                let ip = discover::public_address(server, relay_ipv4).await.map_err(|e| {
                    metrics.turn_public_ip_checks.with_label_values(&["failed"]).inc();
                    anyhow::anyhow!("turn.public_ip = stun:{server}: cannot learn this node's public address: {e}")
                })?;
                metrics.turn_public_ip_checks.with_label_values(&["same"]).inc();
                tracing::info!(%ip, server = %server, "turn.public_ip: this node's public address, from STUN");
                Some(ip)
            }
        };

        // Every listener of ours, on every address it answers on. A relay that happens to
        // share its port number with a TCP listener stays reachable: the core exempts live
        // relay ports (see `TurnServer::policy_check`).
        let bound: Vec<SocketAddr> = udp_addrs.iter().chain(&tcp_addrs).chain(&tls_addrs).chain(other_own).copied().collect();
        let extra: Vec<IpAddr> = public_ip.into_iter().chain([relay_ipv4, relay_ipv6]).collect();
        let own = own_addresses(&bound, &extra);
        let policy = policy::PeerPolicy::new(
            policy::parse_list("turn.allowed_peers", &cfg.allowed_peers).map_err(anyhow::Error::msg)?,
            policy::parse_list("turn.denied_peers", &cfg.denied_peers).map_err(anyhow::Error::msg)?,
            own,
        );
        let settings = Settings {
            secrets,
            credential_ttl_secs: cfg.credential_ttl_secs,
            realm: cfg.realm.clone(),
            public_ip,
            max_lifetime: Duration::from_secs(cfg.max_lifetime_secs),
            nonce_lifetime: Duration::from_secs(cfg.nonce_lifetime_secs),
            quota: cfg.quota.clone(),
            unauthenticated_per_ip_per_sec: cfg.unauthenticated_per_ip_per_sec,
        };
        let core: Core = Arc::new(Mutex::new(TurnServer::new(settings, policy, Instant::now(), crate::auth::unix_now())));
        let binder = RelayBinder {
            ports: cfg.relay_port_range().context("turn.relay_ports is validated")?,
            ipv4: relay_ipv4,
            ipv6: relay_ipv6,
            buffer_bytes: cfg.relay_socket_buffer_bytes,
        };
        let control = Control { core: core.clone(), binder: Arc::new(binder) };
        let mut handles = Vec::new();
        for (index, sockets) in udp.into_iter().enumerate() {
            let (handle, _thread) = shard::spawn(index, sockets, control.clone(), health.clone(), metrics.clone()).context("TURN: cannot start a data-path shard")?;
            handles.push(handle);
        }
        let shards: Arc<[Arc<ShardHandle>]> = handles.into();
        let streams: Arc<[server::DataCounters]> = (0..STREAM_COUNTER_SETS).map(|_| server::DataCounters::default()).collect();
        telemetry::register(&metrics, &core, &shards, &streams);
        let ctx = Ctx {
            control,
            shards: shards.clone(),
            next_shard: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            counters: streams,
            metrics: metrics.clone(),
            stream_queue_bytes: cfg.stream_queue_bytes,
            stream_timeouts: StreamTimeouts {
                handshake: Duration::from_secs(cfg.handshake_timeout_secs),
                idle: Duration::from_secs(cfg.stream_idle_timeout_secs),
            },
        };
        let limit = ConnLimiter::new(cfg.max_stream_connections, cfg.max_stream_connections_per_ip);
        let mut tasks = Vec::new();
        // Every listener runs under a supervisor: if one ends (a panic on some input), it is
        // restarted and `/readyz` shows it down meanwhile. (Shards supervise themselves.)
        for l in tcp {
            let (ctx, limit) = (ctx.clone(), limit.clone());
            let name = format!("turn tcp {}", l.local_addr()?);
            tasks.push(supervise(name, "turn_tcp", health.clone(), metrics.clone(), move || {
                stream::serve_tcp(l.clone(), ctx.clone(), limit.clone(), None)
            }));
        }
        if let Some(acceptor) = tls_files {
            for l in tls {
                let (ctx, limit, acceptor) = (ctx.clone(), limit.clone(), acceptor.clone());
                let name = format!("turn tls {}", l.local_addr()?);
                tasks.push(supervise(name, "turn_tls", health.clone(), metrics.clone(), move || {
                    stream::serve_tcp(l.clone(), ctx.clone(), limit.clone(), Some(acceptor.clone()))
                }));
            }
        }
        let timer_core = core.clone();
        let timer_metrics = metrics.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                // The wall clock is read here, beside the monotonic one, so the core follows
                // the same clock credentials are minted from.
                let (lifetimes, released) = {
                    let mut core = lock(&timer_core);
                    core.handle_timeout(Instant::now(), crate::auth::unix_now());
                    (core.stats().take_closed_lifetimes(), core.take_released())
                };
                drop(released);
                telemetry::observe_lifetimes(&timer_metrics, &lifetimes);
            }
        }));
        if let (Some(crate::config::PublicIp::Stun(server)), Some(ip)) = (&cfg.public_ip, public_ip) {
            let every = Duration::from_secs(cfg.public_ip_refresh_secs);
            tasks.push(tokio::spawn(watch_public_ip(server.clone(), relay_ipv4, ip, every, core.clone(), metrics.clone())));
        }
        tracing::info!(udp = ?udp_addrs, tcp = ?tcp_addrs, tls = ?tls_addrs, relay_ip = %public_ip.unwrap_or(relay_ipv4), "TURN serving");
        let entry = stream::StreamEntry { ctx, limit, log: Arc::new(crate::ratelimit::LogLimiter::new(Instant::now(), Duration::from_secs(1))) };
        Ok(TurnService { udp: udp_addrs, tcp: tcp_addrs, tls: tls_addrs, advertised_ip: public_ip.unwrap_or(relay_ipv4), core, shards, tasks, entry })
    }

    /// Where another listener (the HTTP port, when TURN shares it) hands TCP/TLS connections.
    pub fn stream_entry(&self) -> stream::StreamEntry {
        self.entry.clone()
    }

    /// A handle on the control plane for revocation and secret rotation.
    pub fn handle(&self) -> TurnHandle {
        TurnHandle { core: self.core.clone() }
    }

    /// Stops granting allocations; existing ones keep relaying until the process exits.
    pub fn drain(&self) {
        lock(&self.core).drain();
    }

    /// Open allocations.
    pub fn allocations(&self) -> usize {
        lock(&self.core).allocation_count()
    }
}

impl Drop for TurnService {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in self.shards.iter() {
            s.stop();
        }
    }
}

/// kinlink's own sockets as a peer could address them, for the peer policy. A specific listen
/// address is reachable on that address; a wildcard one on every local address: every
/// interface's (IPv4 and IPv6), all of loopback, the unspecified address (which reaches the
/// host on Linux), and `extra` (the public IP and the relay IPs, which may be NATed to us).
pub fn own_addresses(bound: &[SocketAddr], extra: &[IpAddr]) -> Vec<OwnAddr> {
    let mut local: Vec<Cidr> = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"].iter().map(|c| c.parse().expect("built-in CIDR")).collect();
    match if_addrs::get_if_addrs() {
        Ok(ifs) => local.extend(ifs.iter().map(|i| Cidr::host(i.ip()))),
        Err(e) => tracing::warn!(error = %e, "cannot list local interfaces: only loopback and turn.public_ip are denied as own addresses"),
    }
    local.extend(extra.iter().map(|ip| Cidr::host(*ip)));
    local.dedup();
    bound
        .iter()
        .map(|a| {
            let ips = if a.ip().is_unspecified() {
                local.clone()
            } else {
                let mut ips = vec![Cidr::host(a.ip())];
                ips.extend(extra.iter().map(|ip| Cidr::host(*ip)));
                ips
            };
            OwnAddr { ips, port: a.port() }
        })
        .collect()
}

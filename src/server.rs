//! Start-up and shutdown: bind the listeners, serve, and on the shutdown signal drain:
//! `/readyz` turns 503, the public listener stops accepting, every device is told
//! `shutting-down` and closed with 1001, and the process waits for them up to
//! `shutdown.grace_secs`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::TokenVerifier;
use crate::config::{Config, Listen};
use crate::http::{self, AppState};
use crate::ice::IceConfig;
use crate::metrics::Metrics;
use crate::signal::hub::{Hub, HubLimits, LocalHub};
use crate::signal::session::SessionEnv;
use crate::tls::KeyFiles;
use crate::turn::TurnService;

/// A server with its listeners bound, ready to [`Server::run`].
pub struct Server {
    config: Config,
    http: TcpListener,
    metrics: Option<TcpListener>,
    state: AppState,
    drain: watch::Sender<bool>,
    turn: Option<TurnService>,
    http_limits: http::listener::HttpLimits,
    /// Certificate files to reload (`http`, `turn`), watched once each.
    key_files: Vec<Arc<crate::tls::KeyFiles>>,
    /// Key and secret files to reload (`auth.public_keys`, the secrets files).
    reloadable: Vec<Arc<dyn crate::reload::Reloadable>>,
    /// The ACME client (`acme.domains`), running while the server does.
    acme: Option<crate::acme::Acme>,
    /// The admin API's listener (`admin.listen`) and router.
    admin: Option<(TcpListener, axum::Router)>,
    /// Revocations and disconnects.
    control: Arc<crate::admin::Control>,
}

impl Server {
    /// Binds the listeners. Unset secrets are taken from (or generated into) `data_dir`; a
    /// data directory this call created is removed again when binding fails.
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let dir = config.data_dir.clone();
        let existed = dir.exists();
        let bound = Self::bind_inner(config).await;
        if bound.is_err() && !existed {
            let _ = std::fs::remove_dir_all(&dir);
        }
        bound
    }

    async fn bind_inner(mut config: Config) -> anyhow::Result<Server> {
        for key in crate::secrets::resolve(&mut config)? {
            tracing::warn!(key, data_dir = %config.data_dir.display(), "secret not configured: using one generated in the data directory; set it explicitly in production");
        }
        raise_nofile_limit(&config);
        let metrics = Arc::new(Metrics::new());
        metrics.turn_relay_capacity.set(i64::try_from(config.metrics.relay_capacity_bytes_per_sec).unwrap_or(i64::MAX));
        let limits = HubLimits { max_devices_per_family: config.signal.max_devices_per_family, max_devices: config.signal.max_devices };
        let mut cluster = None;
        // The client certificate for TLS to Redis, reloaded with the other certificates.
        let redis_identity = match (&config.cluster.redis_url, &config.cluster.redis_cert_file, &config.cluster.redis_key_file) {
            (Some(_), Some(cert), Some(key)) => {
                let names = ("cluster.redis_cert_file".to_string(), "cluster.redis_key_file".to_string());
                Some(KeyFiles::load_named(cert.clone(), key.clone(), "redis", names).context("TLS to Redis: client certificate")?)
            }
            _ => None,
        };
        let hub: Arc<dyn Hub> = match &config.cluster.redis_url {
            None => Arc::new(LocalHub::new(limits, metrics.clone(), &config.cluster.node())),
            Some(_) => {
                let hub = Arc::new(crate::cluster::RedisHub::connect(&config.cluster, redis_identity.clone(), limits, metrics.clone()).await?);
                cluster = Some(hub.clone());
                hub
            }
        };
        let http = TcpListener::bind(config.http.listen).await.with_context(|| format!("http.listen: cannot bind {}", config.http.listen))?;
        let metrics_listener = match config.metrics.listen_addr() {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("metrics.listen: cannot bind {addr}"))?),
            None => None,
        };
        let health = crate::health::Health::new();
        let http_files = match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => Some(KeyFiles::load(cert.clone(), key.clone(), "http").context("https: certificate")?),
            _ => None,
        };
        let turn_active = config.turn.enabled && config.turn.urls.is_empty();
        let turn_files = match (turn_active && config.turn.tls_enabled(), &config.turn.tls_cert, &config.turn.tls_key) {
            (true, Some(cert), Some(key)) => Some(KeyFiles::load(cert.clone(), key.clone(), "turn").context("turns: certificate")?),
            _ => None,
        };
        // One port for everything: a TURN TCP/TLS address equal to http.listen is served by
        // the HTTP listener, which tells the protocols apart (src/demux.rs).
        // (Port 0 never shares: each port-0 listener picks its own port.)
        let shared_addr = (config.http.listen.port() != 0).then_some(config.http.listen);
        let shares = |list: &Listen| shared_addr.is_some_and(|a| list.0.contains(&a));
        // Certificates from ACME (acme.domains): the HTTPS one, and `turns:` on the shared
        // port when no turn.tls_cert is given.
        let acme = crate::acme::start(&config.acme, &config.data_dir, metrics.clone())?;
        let turn_tls_by_acme = acme.is_some() && turn_active && config.turn.tls_cert.is_none() && shares(&config.turn.tls_listen);
        let shares_tls = (turn_files.is_some() || turn_tls_by_acme) && shares(&config.turn.tls_listen);
        let shares_tcp = turn_active && shares(&config.turn.tcp_listen);
        let http_addr = http.local_addr()?;
        let turn = if turn_active {
            let mut others = vec![http_addr];
            others.extend(metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?);
            config.turn.tls_by_acme = turn_tls_by_acme;
            let mut dedicated = config.turn.clone();
            dedicated.tcp_listen.0.retain(|a| Some(*a) != shared_addr);
            dedicated.tls_listen.0.retain(|a| Some(*a) != shared_addr);
            let service = TurnService::start(&dedicated, turn_files.clone(), metrics.clone(), health.clone(), &others).await?;
            // Advertise the ports actually bound (port 0 in tests), the shared one first.
            let with_shared = |shared: bool, bound: &[SocketAddr]| shared.then_some(http_addr).into_iter().chain(bound.iter().copied()).collect();
            config.turn.udp_listen = Listen(service.udp.clone());
            config.turn.tcp_listen = Listen(with_shared(shares_tcp, &service.tcp));
            config.turn.tls_listen = Listen(with_shared(shares_tls, &service.tls));
            if shares_tcp || shares_tls {
                tracing::info!(addr = %http_addr, tcp = shares_tcp, tls = shares_tls, "TURN shares the HTTP port");
            }
            if config.turn.advertise_ip {
                // Several replicas on their nodes' network: each hands out URLs to itself.
                config.turn.public_host = service.advertised_ip.to_string();
            }
            Some(service)
        } else {
            None
        };
        let (verifier, mut reloadable) = token_verifier(&config.auth)?;
        let turn_secrets = crate::secrets::turn_secrets(&config.turn).map_err(anyhow::Error::msg)?;
        let ice = IceConfig::new(&config.turn, turn_secrets[0].clone());
        if let Some(path) = &config.turn.secrets_file {
            // A rotation: new credentials are minted with the new first secret, and the TURN
            // server accepts every listed one.
            let (ice, turn_core) = (ice.clone(), turn.as_ref().map(TurnService::handle));
            reloadable.push(crate::auth::keys::SecretsFile::load(path.clone(), "turn_secrets", move |secrets| {
                ice.set_secret(secrets[0].clone());
                if let Some(core) = &turn_core {
                    core.set_secrets(secrets);
                }
            }).map_err(anyhow::Error::msg)?);
        }
        let env = Arc::new(SessionEnv {
            limits: config.signal.clone(),
            verifier,
            token_leeway: Duration::from_secs(config.auth.token_leeway_secs),
            ice,
            hub,
            metrics,
            negotiations: std::sync::Mutex::new(crate::signal::negotiation::Negotiations::new(
                Duration::from_secs(config.signal.negotiation_timeout_secs),
                Duration::from_secs(config.signal.negotiation_settle_secs),
            )),
            refusal_log: crate::ratelimit::LogLimiter::new(std::time::Instant::now(), Duration::from_secs(1)),
        });
        let (drain, draining) = watch::channel(false);
        if config.check.enabled && config.check.demo {
            tracing::warn!("check.demo is on: anyone reaching this server can mint throw-away devices and use TURN");
        }
        let minter = crate::check::Minter::new(config.check.clone(), std::time::Instant::now());
        if let Some(cluster) = &cluster {
            // Reports other nodes forward land in this node's negotiations (weakly held: the
            // hub lives inside the environment).
            let env = Arc::downgrade(&env);
            cluster.set_report_sink(Box::new(move |family, reporter, peer, report| {
                if let Some(env) = env.upgrade() {
                    let _ = env.record_report(family, reporter, peer, report, std::time::Instant::now());
                }
            }));
        }
        // The deny list: from the data directory on one node, from Redis with several, and
        // applied to TURN too.
        let store = match &cluster {
            Some(c) => crate::admin::Store::Cluster(c.clone()),
            None => crate::admin::Store::File(config.data_dir.join("revocations.json")),
        };
        let control = crate::admin::Control::new(env.verifier.clone(), env.hub.clone(), turn.as_ref().map(TurnService::handle), store, env.metrics.clone());
        let in_force = control.load(crate::auth::unix_now()).await.context("revocations")?;
        if in_force > 0 {
            tracing::info!(revocations = in_force, "revocations in force");
        }
        if let Some(cluster) = &cluster {
            let control = Arc::downgrade(&control);
            cluster.set_control_sink(Box::new(move |incoming| {
                let Some(control) = control.upgrade() else { return };
                match incoming {
                    crate::cluster::Incoming::Command(cmd) => drop(control.apply(&cmd)),
                    crate::cluster::Incoming::Revocations(all) => control.apply_all(&all, crate::auth::unix_now()),
                }
            }));
        }
        let admin = match config.admin.listen_addr() {
            Some(addr) => {
                let token = config.admin.token().map_err(anyhow::Error::msg)?.context("admin.token")?;
                let listener = TcpListener::bind(addr).await.with_context(|| format!("admin.listen: cannot bind {addr}"))?;
                Some((listener, crate::admin::api::router(control.clone(), &token, env.metrics.clone())))
            }
            None => None,
        };
        let state = AppState::new(env, draining, minter, health, config.http.cors_origins.clone());
        let share = turn.as_ref().filter(|_| shares_tcp || shares_tls).map(|t| http::listener::Share { turn: t.stream_entry(), tcp: shares_tcp, tls: shares_tls });
        // This port's TLS: the HTTPS certificate, and on a shared port the `turns:` one too,
        // picked by SNI; ALPN names what is served so a client asking for anything else is
        // refused in the handshake.
        let https = http_files.is_some() || acme.is_some();
        let mut sources: Vec<crate::tls::Source> = http_files.iter().cloned().map(crate::tls::Source::Files).collect();
        let mut alpn = Vec::new();
        if share.is_some() || acme.is_some() {
            // rustls picks by the server's order. TURN first: only TURN clients offer
            // `stun.turn`, and some (coturn's) offer `http/1.1` beside it.
            if shares_tls {
                sources.extend(turn_files.iter().cloned().map(crate::tls::Source::Files));
                alpn.push(crate::demux::ALPN_TURN.to_vec());
            }
            if https {
                alpn.push(crate::demux::ALPN_HTTP.to_vec());
            }
        }
        if let Some(acme) = &acme {
            // After the files: an ACME certificate is picked by SNI, or when there is no other.
            sources.push(crate::tls::Source::Resolver(acme.resolver.clone()));
            alpn.push(crate::tls::ACME_TLS_ALPN.to_vec());
        }
        let tls = (!sources.is_empty()).then(|| crate::tls::Acceptor::with_sources(sources, alpn, "http"));
        let http_limits = http::listener::HttpLimits::new(&config.http, tls, https, share);
        let key_files = http_files.into_iter().chain(turn_files).chain(redis_identity).collect();
        Ok(Server { config, http, metrics: metrics_listener, state, drain, turn, http_limits, key_files, reloadable, acme, admin, control })
    }

    /// The bound admin address, when the admin API is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(l, _)| l.local_addr().expect("bound listener has an address"))
    }

    /// The bound public address (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().expect("bound listener has an address")
    }

    /// The bound metrics address, when metrics have their own listener.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|l| l.local_addr().expect("bound listener has an address"))
    }

    /// The bound TURN UDP listener, if TURN runs.
    pub fn turn_udp_addr(&self) -> Option<SocketAddr> {
        self.turn.as_ref().and_then(|t| t.udp.first().copied())
    }

    /// The bound TURN TCP listener (the HTTP one when shared), if TURN runs.
    pub fn turn_tcp_addr(&self) -> Option<SocketAddr> {
        self.turn.as_ref().and(self.config.turn.tcp_listen.0.first().copied())
    }

    /// The bound TURN TLS listener (the HTTP one when shared), if TURN runs with a certificate.
    pub fn turn_tls_addr(&self) -> Option<SocketAddr> {
        self.turn.as_ref().and(self.config.turn.tls_listen.0.first().copied())
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Server { config, http, metrics, state, drain, turn, http_limits, key_files, reloadable, acme, admin, control } = self;
        let _acme = acme;
        let separate_metrics = metrics.is_some();
        let http_addr = http.local_addr()?;
        let metrics_addr = metrics.as_ref().map(TcpListener::local_addr).transpose()?;
        // Certificates are reloaded when their files change (turn.tls_reload_poll_secs) or on
        // SIGHUP, each pair once however many listeners serve it.
        let poll = Duration::from_secs(config.turn.tls_reload_poll_secs);
        let tls_watch = (!key_files.is_empty()).then(|| {
            let metrics = state.shared().env.metrics.clone();
            let counter = metrics.turn_tls_reloads.clone();
            tokio::spawn(futures_util::future::join_all(
                key_files.into_iter().map(move |f| crate::reload::watch(f as Arc<dyn crate::reload::Reloadable>, poll, counter.clone())),
            ))
        });
        // SIGHUP reloads: install the handler before anything can send one (the default
        // action ends the process), not when the watcher tasks first run.
        #[cfg(unix)]
        let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let key_watch = {
            let poll = Duration::from_secs(config.auth.reload_poll_secs);
            let counter = state.shared().env.metrics.auth_key_reloads.clone();
            tokio::spawn(futures_util::future::join_all(reloadable.into_iter().map(move |r| crate::reload::watch(r, poll, counter.clone()))))
        };
        let url_poll = url_source(&config.auth).map(|source| {
            let env = state.shared().env.clone();
            let metrics = env.metrics.clone();
            tokio::spawn(crate::auth::keys::poll_jwks_url(
                source,
                env.verifier.clone(),
                Box::new(move |ok, last_good| {
                    metrics.auth_jwks_url_fetches.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
                    metrics.auth_jwks_url_last_success.set(i64::try_from(last_good).unwrap_or(0));
                }),
            ))
        });
        let scheme = if http_limits.https { "https" } else { "http" };
        let public = http::listener::serve(http, http::app(state.clone(), !separate_metrics), http_limits, state.shared().env.metrics.clone(), drain.subscribe());
        let public = tokio::spawn(public);
        let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = metrics.map(|listener| {
            let serve = axum::serve(listener, http::metrics_app(state.clone())).with_graceful_shutdown(async move {
                let _ = metrics_stopped.await;
            });
            tokio::spawn(async move { serve.await })
        });
        // The admin API, with the public listener's deadlines and caps; it keeps serving
        // through the drain (an operator may still revoke), and stops with the process.
        let (admin_stop, admin_stopped) = watch::channel(false);
        let admin_addr = admin.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        let admin_task = admin.map(|(listener, router)| {
            let limits = http::listener::HttpLimits::new(&config.http, None, false, None);
            tokio::spawn(http::listener::serve(listener, router, limits, state.shared().env.metrics.clone(), admin_stopped))
        });
        let shared = state.shared();
        let sweeper = {
            let env = shared.env.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut n: u64 = 0;
                loop {
                    tick.tick().await;
                    env.expire_negotiations(std::time::Instant::now());
                    if n.is_multiple_of(60) {
                        control.expire(crate::auth::unix_now());
                    }
                    n += 1;
                }
            })
        };
        shared.ready.store(true, Ordering::Relaxed);
        let base = crate::probe::local_base(http_addr).replacen("http", scheme, 1);
        tracing::info!(
            "next: mint a device token with `kinlink token --family FAMILY --user USER --device DEVICE` (same data \
             directory or auth.token_secret), then open {base}/check in a browser or run `kinlink check`"
        );
        tracing::info!(
            http = %http_addr,
            scheme,
            metrics = %metrics_addr.map_or_else(|| "on http".to_string(), |a| a.to_string()),
            admin = %admin_addr.map_or_else(|| "off".to_string(), |a| a.to_string()),
            version = env!("CARGO_PKG_VERSION"),
            "kinlink serving"
        );

        shutdown.await;
        let open = shared.env.metrics.signal_connections.get();
        tracing::info!(open_connections = open, grace_secs = config.shutdown.grace_secs, "shutting down: draining");
        shared.ready.store(false, Ordering::Relaxed);
        // Before the devices are told to go: their leaving is then not news to their families
        // on other nodes (they reconnect there).
        shared.env.hub.drain();
        let _ = drain.send(true);
        if let Some(t) = &turn {
            t.drain();
        }
        let all = u32::try_from(config.signal.max_connections).unwrap_or(u32::MAX);
        let grace = Duration::from_secs(config.shutdown.grace_secs);
        let deadline = tokio::time::Instant::now() + grace;
        match tokio::time::timeout_at(deadline, shared.connections.acquire_many(all)).await {
            Ok(_) => tracing::info!("all devices disconnected"),
            Err(_) => tracing::warn!(
                remaining = shared.env.metrics.signal_connections.get(),
                "shutdown grace expired with devices still connected"
            ),
        }
        // Relayed media keeps flowing until its allocations end or the grace runs out.
        if let Some(t) = &turn {
            while t.allocations() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // The public listener has stopped accepting; plain HTTP requests still in flight get
        // what is left of the grace period.
        let _ = tokio::time::timeout(Duration::from_secs(1), public).await;
        sweeper.abort();
        if let Some(w) = tls_watch {
            w.abort();
        }
        key_watch.abort();
        if let Some(p) = url_poll {
            p.abort();
        }
        let _ = metrics_stop.send(());
        let _ = admin_stop.send(true);
        if let Some(task) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        if let Some(task) = metrics_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        Ok(())
    }
}

/// The device token verifier `auth.*` describes, and the files to reload into it.
fn token_verifier(auth: &crate::config::AuthConfig) -> anyhow::Result<(TokenVerifier, Vec<Arc<dyn crate::reload::Reloadable>>)> {
    let secrets = crate::secrets::token_secrets(auth).map_err(anyhow::Error::msg)?;
    let keys = crate::auth::token::KeySet { hs256: secrets, url_configured: !auth.public_keys_url.is_empty(), ..Default::default() };
    let verifier = TokenVerifier::new(auth.policy(), keys);
    let mut reloadable: Vec<Arc<dyn crate::reload::Reloadable>> = Vec::new();
    if let Some(path) = &auth.token_secrets_file {
        let v = verifier.clone();
        reloadable.push(
            crate::auth::keys::SecretsFile::load(path.clone(), "token_secrets", move |secrets| v.update_keys(|k| k.hs256 = secrets))
                .map_err(anyhow::Error::msg)?,
        );
    }
    if let Some(path) = &auth.public_keys {
        reloadable.push(crate::auth::keys::JwksFile::load(path.clone(), verifier.clone()).map_err(|e| anyhow::anyhow!("auth.public_keys: {e}"))?);
    }
    tracing::info!(algorithms = %auth.policy().algorithms().join(","), public_keys = auth.public_keys.is_some(), public_keys_url = !auth.public_keys_url.is_empty(), "device tokens");
    Ok((verifier, reloadable))
}

fn url_source(auth: &crate::config::AuthConfig) -> Option<crate::auth::keys::UrlSource> {
    (!auth.public_keys_url.is_empty()).then(|| crate::auth::keys::UrlSource {
        url: auth.public_keys_url.clone(),
        ca_file: auth.public_keys_ca_file.clone(),
        refresh: Duration::from_secs(auth.public_keys_refresh_secs),
        max_stale_secs: auth.public_keys_max_stale_secs,
    })
}

/// Descriptors the configuration can use at its limits: one per WebSocket, per TURN stream
/// connection, per relay socket (allocations and reservations), plus listeners and slack.
pub fn descriptors_needed(config: &Config) -> u64 {
    let turn = if config.turn.enabled && config.turn.urls.is_empty() {
        config.turn.quota.total_allocations as u64 + config.turn.max_stream_connections as u64
    } else {
        0
    };
    config.signal.max_connections as u64 + config.http.max_unupgraded_connections as u64 + turn + 64
}

/// Each connection is a file descriptor: raise the soft limit to the hard one (as coturn
/// does) and warn, with the exact fix, only when even that is below what the configured
/// limits can use.
fn raise_nofile_limit(config: &Config) {
    let need = descriptors_needed(config);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < need => tracing::warn!(
            limit,
            need,
            "open-file limit {limit} is below what the configured limits can use ({need} = signal.max_connections + \
             http.max_unupgraded_connections + turn.quota.total_allocations + turn.max_stream_connections + 64): \
             raise it (systemd LimitNOFILE={need}, docker --ulimit nofile={need}:{need}, or ulimit -n {need}) or lower those limits"
        ),
        Ok(limit) => tracing::debug!(limit, need, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// Binds and serves `config` until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    Server::bind(config).await?.run(shutdown).await
}

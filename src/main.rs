use std::process::ExitCode;


use kinlink::cli::{init_logging, Cli, Command, ConfigAction};

fn main() -> ExitCode {
    let cli = Cli::parse_all();
    let mut config = match cli.load_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kinlink: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Config { action: ConfigAction::Check }) => config_check(&config),
        Some(Command::Token { family, user, device, ttl }) => {
            for (name, id) in [("--family", &family), ("--user", &user), ("--device", &device)] {
                if !kinlink::auth::valid_id(id) {
                    eprintln!("kinlink: {name}: ids are 1-{} printable ASCII characters without spaces or ':'", kinlink::auth::MAX_ID_BYTES);
                    return ExitCode::from(2);
                }
            }
            if let Err(e) = kinlink::secrets::resolve_existing(&mut config) {
                eprintln!("kinlink: token: {e}");
                return ExitCode::FAILURE;
            }
            let secret = config.auth.token_secret.as_ref().expect("resolved above");
            println!("{}", kinlink::auth::mint_token(secret, &family, &user, &device, ttl, kinlink::auth::unix_now()));
            ExitCode::SUCCESS
        }
        Some(Command::Healthcheck { urls, timeout }) => {
            let urls = if urls.is_empty() { vec![kinlink::probe::default_url(&config)] } else { urls };
            for url in &urls {
                match kinlink::probe::get(url, std::time::Duration::from_secs(timeout)) {
                    Ok(status) => println!("{url}: {status}"),
                    Err(e) => {
                        eprintln!("kinlink: healthcheck failed: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Some(Command::Check { url, token, ca_file, timeout, skip_turn }) => check(config, url, token, ca_file, timeout, skip_turn),
        Some(Command::Serve { .. }) | None => serve(config),
    }
}

fn serve(config: kinlink::Config) -> ExitCode {
    init_logging(&config);
    for var in &config.ignored_env {
        tracing::debug!(var, "environment variable ignored: a Kubernetes service link, not configuration");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinlink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let server = kinlink::Server::bind(config).await?;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = first_tx.send(());
            shutdown_signal().await;
            tracing::warn!("second shutdown signal: exiting now");
            std::process::exit(130);
        });
        server.run(async move { let _ = first_rx.await; }).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kinlink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `kinlink config check`: the effective configuration, then what devices will be handed and
/// where each secret comes from; files the configuration names must exist.
fn config_check(config: &kinlink::Config) -> ExitCode {
    println!("# configuration is valid; effective values (secrets redacted):");
    print!("{}", config.to_redacted_toml());
    let env: Vec<(String, String)> = std::env::vars().collect();
    println!();
    println!("# What this configuration serves:");
    for line in kinlink::turn::advertised(config) {
        println!("#   {line}");
    }
    for key in ["auth.token_secret", "turn.secret"] {
        println!("#   {key}: {}", kinlink::secrets::source(config, key, &env));
    }
    let mut missing = false;
    let files = [
        ("turn.tls_cert", &config.turn.tls_cert),
        ("turn.tls_key", &config.turn.tls_key),
        ("http.tls_cert", &config.http.tls_cert),
        ("http.tls_key", &config.http.tls_key),
        ("cluster.redis_ca_file", &config.cluster.redis_ca_file),
        ("cluster.redis_cert_file", &config.cluster.redis_cert_file),
        ("cluster.redis_key_file", &config.cluster.redis_key_file),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            if let Err(e) = std::fs::metadata(path) {
                eprintln!("kinlink: configuration error: {key}: cannot read {}: {e}", path.display());
                missing = true;
            }
        }
    }
    if missing { ExitCode::from(2) } else { ExitCode::SUCCESS }
}

fn check(
    mut config: kinlink::Config,
    url: Option<String>,
    token: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    timeout: u64,
    skip_turn: bool,
) -> ExitCode {
    let url = url.unwrap_or_else(|| kinlink::probe::local_base(config.http.listen));
    // On the server host the token secret is at hand: configured, or generated earlier into
    // the data directory (never create one here: it would not be the server's).
    let token_secret = if token.is_some() {
        None
    } else if config.auth.token_secret.is_some() {
        config.auth.token_secret.clone()
    } else if config.data_dir.join("token_secret").exists() {
        kinlink::secrets::resolve(&mut config).ok().and(config.auth.token_secret.clone())
    } else {
        None
    };
    let opts =
        kinlink::check::client::CheckOptions { url, token, token_secret, ca_file, timeout: std::time::Duration::from_secs(timeout), skip_turn };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kinlink: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kinlink::check::client::run(&opts)) {
        Ok(report) => {
            print!("{}", report.render());
            if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("kinlink: check: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

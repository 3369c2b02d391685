//! Secrets that are not configured are generated once into the data directory and reused,
//! so `kinlink serve` and `kinlink token` agree with no configuration at all.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use rand::RngCore;

use crate::config::{Config, Secret};

/// Why a secret could not be read or created.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot use {path}: {source}")]
pub struct SecretError {
    key: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

/// Fills `auth.token_secret` and `turn.secret` from the data directory when they are unset,
/// generating them on first use. Returns the keys that were taken from the data directory.
pub fn resolve(cfg: &mut Config) -> Result<Vec<&'static str>, SecretError> {
    let mut generated = Vec::new();
    if cfg.auth.token_secret.is_none() && cfg.auth.token_secrets_file.is_none() {
        cfg.auth.token_secret = Some(load_or_create(&cfg.data_dir, "token_secret", "auth.token_secret")?);
        // With public keys, this secret only signs kinlink's own self-check tokens.
        if !cfg.auth.has_public_keys() {
            generated.push("auth.token_secret");
        }
    }
    if cfg.turn.secret.is_none() && cfg.turn.secrets_file.is_none() {
        cfg.turn.secret = Some(load_or_create(&cfg.data_dir, "turn_secret", "turn.secret")?);
        generated.push("turn.secret");
    }
    Ok(generated)
}

/// Fills the secrets that are not configured from the data directory, never creating one:
/// for commands that must agree with a running server (`kinlink token`), where a fresh secret
/// would sign tokens the server refuses. Errors say where the secret was looked for.
pub fn resolve_existing(cfg: &mut Config) -> Result<(), String> {
    for (key, file, var) in [("auth.token_secret", "token_secret", "KINLINK_AUTH__TOKEN_SECRET")] {
        if cfg.auth.token_secret.is_some() {
            continue;
        }
        let path = cfg.data_dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => cfg.auth.token_secret = Some(Secret::new(s.trim())),
            Ok(_) | Err(_) => {
                let dir = std::fs::canonicalize(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
                return Err(format!(
                    "{key} is not configured and {} does not exist (data directory {}): this is not the server's secret, \
                     and a new one would sign tokens the server refuses. Run from the directory `kinlink serve` runs in, \
                     pass its --data-dir, or set {var}",
                    path.display(),
                    dir.display()
                ));
            }
        }
    }
    Ok(())
}

/// The HS256 secrets for device tokens: `auth.token_secrets_file`'s, else `auth.token_secret`
/// (resolved). The first mints.
pub fn token_secrets(cfg: &crate::config::AuthConfig) -> Result<Vec<Secret>, String> {
    match (&cfg.token_secrets_file, &cfg.token_secret) {
        (Some(path), _) => crate::auth::keys::read_secrets(path).map_err(|e| format!("auth.token_secrets_file: {e}")),
        (None, Some(s)) => Ok(vec![s.clone()]),
        (None, None) => Err("auth.token_secret is not resolved".into()),
    }
}

/// The TURN REST secrets: `turn.secrets_file`'s, else `turn.secret` (resolved). The first mints.
pub fn turn_secrets(cfg: &crate::config::TurnConfig) -> Result<Vec<Secret>, String> {
    match (&cfg.secrets_file, &cfg.secret) {
        (Some(path), _) => crate::auth::keys::read_secrets(path).map_err(|e| format!("turn.secrets_file: {e}")),
        (None, Some(s)) => Ok(vec![s.clone()]),
        (None, None) => Err("turn.secret is not resolved".into()),
    }
}

/// Where a secret comes from, for `kinlink config check`.
pub fn source(cfg: &Config, key: &str, env: &[(String, String)]) -> String {
    let (value, file, var) = match key {
        "auth.token_secret" => (&cfg.auth.token_secret, "token_secret", "KINLINK_AUTH__TOKEN_SECRET"),
        _ => (&cfg.turn.secret, "turn_secret", "KINLINK_TURN__SECRET"),
    };
    if value.is_some() {
        if env.iter().any(|(k, v)| k == var && !v.is_empty()) {
            return format!("environment ({var})");
        }
        return "the config file or --set".into();
    }
    let path = cfg.data_dir.join(file);
    if path.exists() {
        format!("generated earlier, read from {}", path.display())
    } else {
        format!("not set: `kinlink serve` generates it into {} at first start", path.display())
    }
}

fn load_or_create(dir: &Path, file: &str, key: &'static str) -> Result<Secret, SecretError> {
    let path = dir.join(file);
    let err = |source| SecretError { key, path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Secret::new(s.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    create_private_dir(dir).map_err(err)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    write_private(&path, &value).map_err(err)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

/// Writes the secret to a private temporary file, then links it into place: the link either
/// creates `path` whole or fails because another process won the race, and then the winner's
/// secret is the one to use (two processes must never run on different secrets).
fn write_private(path: &Path, value: &str) -> std::io::Result<Secret> {
    let tmp = path.with_extension(format!("tmp-{}-{:016x}", std::process::id(), rand::random::<u64>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&tmp).and_then(|mut f| {
        f.write_all(value.as_bytes())?;
        f.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(Secret::new(value)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let winner = std::fs::read_to_string(path)?;
            if winner.trim().is_empty() {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "exists but is empty"));
            }
            Ok(Secret::new(winner.trim()))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("kinlink-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = Config { data_dir: dir.clone(), ..Config::default() };
        assert_eq!(resolve(&mut a).unwrap(), vec!["auth.token_secret", "turn.secret"]);
        let mut b = Config { data_dir: dir.clone(), ..Config::default() };
        resolve(&mut b).unwrap();
        assert_eq!(a.auth.token_secret, b.auth.token_secret);
        assert_eq!(a.turn.secret, b.turn.secret);
        assert_ne!(a.auth.token_secret.as_ref().unwrap().expose(), a.turn.secret.as_ref().unwrap().expose());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("token_secret")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_racing_to_create_agree_on_the_winner() {
        for round in 0..20 {
            let dir = std::env::temp_dir().join(format!("kinlink-secrets-race-{}-{round}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (dir, barrier) = (dir.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let mut c = Config { data_dir: dir, ..Config::default() };
                        resolve(&mut c).unwrap();
                        c.auth.token_secret.unwrap()
                    })
                })
                .collect();
            let secrets: Vec<Secret> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(secrets.windows(2).all(|w| w[0] == w[1]), "round {round}: racers disagree");
            let on_disk = std::fs::read_to_string(dir.join("token_secret")).unwrap();
            assert_eq!(on_disk, secrets[0].expose());
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "no temporary files left");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

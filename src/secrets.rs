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
    if cfg.auth.token_secret.is_none() {
        cfg.auth.token_secret = Some(load_or_create(&cfg.data_dir, "token_secret", "auth.token_secret")?);
        generated.push("auth.token_secret");
    }
    if cfg.turn.secret.is_none() {
        cfg.turn.secret = Some(load_or_create(&cfg.data_dir, "turn_secret", "turn.secret")?);
        generated.push("turn.secret");
    }
    Ok(generated)
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
    write_private(&path, &value).map_err(err)?;
    Ok(Secret::new(value))
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

fn write_private(path: &Path, value: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    // create_new: two processes starting at once must not overwrite each other's secret.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut f) => {
            f.write_all(value.as_bytes())?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
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
}

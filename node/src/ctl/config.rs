//! Where the CLI finds a cluster: a config file of contexts (as a kubeconfig's), chosen by
//! `--context` or the file's `current_context`, or flags that name the servers directly.
//!
//! ```toml
//! current_context = "dev"
//! [contexts.dev]
//! servers = ["https://127.0.0.1:8081", "https://127.0.0.1:8082"]
//! ca = "runtimeai-dev/certs/ca.pem"
//! token_file = "runtimeai-dev/admin.key"   # or token = "rai_..."
//! tenant = "acme"                         # optional
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One cluster and the credentials to use it with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    pub servers: Vec<String>,
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, ContextConfig>,
}

impl ConfigFile {
    /// `RUNTIMEAI_CONFIG`, else `~/.config/runtimeai/config.toml`.
    pub fn default_path() -> PathBuf {
        if let Some(path) = std::env::var_os("RUNTIMEAI_CONFIG") {
            return PathBuf::from(path);
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".config").join("runtimeai").join("config.toml")
    }

    /// The file at `path`; empty if there is none.
    pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("{} is not a RuntimeAI config", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes it (owner-only: it may hold a token).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("cannot write the config")?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    /// The context `name` (or the current one). Relative paths in it are relative to the
    /// config file's directory.
    pub fn context(&self, name: Option<&str>, path: &Path) -> anyhow::Result<ContextConfig> {
        let name = name.or(self.current_context.as_deref()).with_context(|| {
            format!("no context chosen: give --context or --server, or set current_context in {}", path.display())
        })?;
        let mut context = self
            .contexts
            .get(name)
            .cloned()
            .with_context(|| format!("no context {name:?} in {} (it has: {})", path.display(), self.names()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        context.ca = context.ca.map(|ca| base.join(ca));
        context.token_file = context.token_file.map(|file| base.join(file));
        Ok(context)
    }

    fn names(&self) -> String {
        let names: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

impl ContextConfig {
    /// The client this context describes.
    pub fn client(&self) -> anyhow::Result<runtimeai_client::Client> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(file)) => {
                Some(std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?)
            }
            (None, None) => std::env::var("RUNTIMEAI_TOKEN").ok(),
        };
        let ca_pem = match &self.ca {
            Some(ca) => Some(std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?),
            None => None,
        };
        let config = runtimeai_client::ClientConfig {
            servers: self.servers.clone(),
            token: token.map(|t| t.trim().to_string()),
            ca_pem,
            tenant: self.tenant.clone(),
            timeout: None,
        };
        Ok(runtimeai_client::Client::new(config)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_resolve_their_files_beside_the_config() {
        let text = r#"
            current_context = "dev"
            [contexts.dev]
            servers = ["https://127.0.0.1:8081"]
            ca = "certs/ca.pem"
            token_file = "admin.key"
        "#;
        let file: ConfigFile = toml::from_str(text).unwrap();
        let dev = file.context(None, Path::new("/etc/runtimeai/config.toml")).unwrap();
        assert_eq!(dev.ca.as_deref(), Some(Path::new("/etc/runtimeai/certs/ca.pem")));
        assert_eq!(dev.token_file.as_deref(), Some(Path::new("/etc/runtimeai/admin.key")));
        let missing = file.context(Some("prod"), Path::new("c.toml")).unwrap_err().to_string();
        assert!(missing.contains("it has: dev"), "{missing}");
        assert!(toml::from_str::<ConfigFile>("[contexts.x]\nservers = []\nsurprise = 1").is_err());
    }
}

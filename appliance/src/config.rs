//! The appliance's TOML configuration. Every key is optional; the defaults are those of a local
//! run (DESIGN.md's "config file" section is the contract: keys are added, never renamed).
//! `DATA_DIR` inside a path or URL stands for the configured `data_dir`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub roles: Vec<String>,
    pub listen: Listen,
    pub tls: Tls,
    pub security: Security,
    pub blob: Blob,
    pub cache: Cache,
    pub policy: Policy,
    pub config_server: ConfigServer,
}

/// Scale-out: a process-server appliance registers with the config server named here and sends
/// it heartbeats; the config server can then assign machines to it. Empty `url`: this appliance
/// is its own config server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigServer {
    /// The config server's management API, e.g. `https://appliance:443`.
    pub url: String,
    /// CA certificate (PEM) to trust for `url` (the config server's cert.pem when self-signed).
    pub ca: String,
    /// This process server's name at the config server (default: the host name).
    pub name: String,
    /// The replication address agents are sent to, HOST:PORT (default: the bound address).
    pub advertise: String,
    pub heartbeat_interval: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    pub management: SocketAddr,
    pub replication: SocketAddr,
    pub nbd: SocketAddr,
    pub metrics: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    /// Extra names and addresses for the generated certificate.
    pub san: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    pub passphrase_file: String,
    /// The passphrase itself, instead of a file (not recommended outside tests).
    pub passphrase: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Blob {
    pub url: String,
    /// object_store options, e.g. `azure_storage_account_name`, `azure_storage_access_key`,
    /// `azure_storage_sas_key`, `azure_storage_endpoint`, `azure_allow_http`, `aws_endpoint`,
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_region`.
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cache {
    pub max_bytes: String,
    /// Decompressed chunks the read side (NBD, FUSE) keeps in memory.
    pub chunk_cache_bytes: String,
    /// Committed writes kept in memory for the uploader (beyond it, they are read back from disk).
    pub memory_bytes: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    pub crash_consistent_interval: String,
    pub app_consistent_interval: String,
    pub retention: String,
    pub rpo_threshold: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./lifeboat-data"),
            roles: vec!["config".into(), "process".into(), "master-target".into()],
            listen: Listen::default(),
            tls: Tls::default(),
            security: Security::default(),
            blob: Blob::default(),
            cache: Cache::default(),
            policy: Policy::default(),
            config_server: ConfigServer::default(),
        }
    }
}

impl Default for ConfigServer {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca: String::new(),
            name: String::new(),
            advertise: String::new(),
            heartbeat_interval: "10s".into(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            management: "127.0.0.1:8443".parse().expect("addr"),
            replication: "127.0.0.1:9443".parse().expect("addr"),
            nbd: "127.0.0.1:10809".parse().expect("addr"),
            metrics: "127.0.0.1:9464".parse().expect("addr"),
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            cert: "DATA_DIR/tls/cert.pem".into(),
            key: "DATA_DIR/tls/key.pem".into(),
            san: Vec::new(),
        }
    }
}

impl Default for Security {
    fn default() -> Self {
        Self {
            passphrase_file: "DATA_DIR/passphrase".into(),
            passphrase: None,
        }
    }
}

impl Default for Blob {
    fn default() -> Self {
        Self {
            url: "file://DATA_DIR/blob".into(),
            options: BTreeMap::new(),
        }
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            max_bytes: "8GiB".into(),
            chunk_cache_bytes: "512MiB".into(),
            memory_bytes: "64MiB".into(),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            crash_consistent_interval: "5m".into(),
            app_consistent_interval: "4h".into(),
            retention: "24h".into(),
            rpo_threshold: "15m".into(),
        }
    }
}

/// Parses sizes like `8GiB`, `512MiB`, `100MB`, `4096`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("size {s:?}: no number"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        other => bail!("size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    Ok((n * mult as f64) as u64)
}

pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s.trim()).with_context(|| format!("duration {s:?} (use e.g. 30s, 5m, 4h)"))
}

/// The configuration with paths resolved and values parsed.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub raw: Config,
    pub data_dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub passphrase_file: PathBuf,
    pub blob_url: String,
    pub cache_max_bytes: u64,
    pub chunk_cache_bytes: u64,
    pub cache_memory_bytes: u64,
    pub policy: ResolvedPolicy,
}

/// The `[policy]` section, parsed. (The app-consistent schedule and the RPO threshold are
/// validated here; the config server's scheduler and RPO alerts will read them.)
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)]
pub struct ResolvedPolicy {
    pub crash_consistent_interval: Duration,
    pub app_consistent_interval: Duration,
    pub retention: Duration,
    pub rpo_threshold: Duration,
}

impl Config {
    /// Loads `path`, or the embedded defaults when `None`.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            None => Ok(Self::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("config {}", p.display()))
            }
        }
    }

    /// Resolves `DATA_DIR`, creates the data dir and checks every value.
    pub fn resolve(self) -> anyhow::Result<Resolved> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating data dir {}", self.data_dir.display()))?;
        let data_dir = std::fs::canonicalize(&self.data_dir)?;
        let dd = data_dir.to_string_lossy().into_owned();
        let sub = |s: &str| s.replace("DATA_DIR", &dd);
        for r in &self.roles {
            if !["config", "process", "master-target"].contains(&r.as_str()) {
                bail!("unknown role {r:?} (roles are config, process, master-target)");
            }
        }
        for v in [
            &self.policy.crash_consistent_interval,
            &self.policy.app_consistent_interval,
            &self.policy.retention,
            &self.policy.rpo_threshold,
        ] {
            parse_duration(v)?;
        }
        if parse_duration(&self.policy.retention)? > Duration::from_secs(72 * 3600) {
            bail!("policy.retention {:?} exceeds the 72h maximum", self.policy.retention);
        }
        let cache_max_bytes = parse_size(&self.cache.max_bytes)?;
        if cache_max_bytes < (64 << 20) {
            bail!("cache.max_bytes {:?} is below the 64MiB minimum", self.cache.max_bytes);
        }
        let policy = ResolvedPolicy {
            crash_consistent_interval: parse_duration(&self.policy.crash_consistent_interval)?,
            app_consistent_interval: parse_duration(&self.policy.app_consistent_interval)?,
            retention: parse_duration(&self.policy.retention)?,
            rpo_threshold: parse_duration(&self.policy.rpo_threshold)?,
        };
        if !self.config_server.url.is_empty() {
            if !self.config_server.url.starts_with("https://") {
                bail!("config_server.url {:?} must be an https:// URL", self.config_server.url);
            }
            if !self.roles.iter().any(|r| r == "process") {
                bail!("config_server.url is set but this appliance runs no process role");
            }
            if parse_duration(&self.config_server.heartbeat_interval)?.is_zero() {
                bail!("config_server.heartbeat_interval must be positive");
            }
        }
        if policy.crash_consistent_interval.is_zero() || policy.retention.is_zero() {
            bail!("policy.crash_consistent_interval and policy.retention must be positive");
        }
        Ok(Resolved {
            chunk_cache_bytes: parse_size(&self.cache.chunk_cache_bytes)?,
            cache_memory_bytes: parse_size(&self.cache.memory_bytes)?,
            policy,
            cert: PathBuf::from(sub(&self.tls.cert)),
            key: PathBuf::from(sub(&self.tls.key)),
            passphrase_file: PathBuf::from(sub(&self.security.passphrase_file)),
            blob_url: sub(&self.blob.url),
            cache_max_bytes,
            data_dir,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("8 parsecs").is_err());
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    }

    #[test]
    fn design_keys_parse_and_unknown_keys_are_refused() {
        let text = r#"
            data_dir = "/tmp/x"
            roles = ["config", "process", "master-target"]
            [listen]
            management = "127.0.0.1:8443"
            replication = "127.0.0.1:9443"
            nbd = "127.0.0.1:10809"
            metrics = "127.0.0.1:9464"
            [tls]
            cert = "DATA_DIR/tls/cert.pem"
            key = "DATA_DIR/tls/key.pem"
            [security]
            passphrase_file = "DATA_DIR/passphrase"
            [blob]
            url = "file://DATA_DIR/blob"
            [cache]
            max_bytes = "8GiB"
            [policy]
            crash_consistent_interval = "5m"
            app_consistent_interval = "4h"
            retention = "24h"
            rpo_threshold = "15m"
        "#;
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.cache.max_bytes, "8GiB");
        assert!(toml::from_str::<Config>("[cache]\nmax_byte = \"1GiB\"").is_err());
    }
}

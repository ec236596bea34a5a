//! Lifeboat's replication data path, the process server role, as a library.
//!
//! ```text
//! agent ──batches (HTTPS)──▶ server ──prepare (decode, CRC, block checksums)──▶ journal writer thread
//!                                                    group commit: payload log fdatasync + one synced WriteBatch, then ack
//! journal ──uploader──▶ segment (zstd + AES-256-GCM chunks, sealed index) ──▶ blob store ──▶ replay
//! ```
//!
//! - [`protocol`]: the batch wire format agents send.
//! - [`journal`]: the RocksDB write-ahead cache; nothing is acked before it is synced, nothing is
//!   dropped from it before its segment is durably in blob storage.
//! - [`segment`] and [`record`]: the versioned, authenticated log format in blob storage.
//! - [`crypto`]: Argon2id key-encryption key, wrapped per-disk data keys, never-reused nonces.
//! - [`uploader`]: journal → segments → blob store, retried for as long as an outage lasts.
//! - [`catalog`]: segments and the extent index that the read side serves points from.
//! - [`replay`]: blob store → image at any sequence number; [`rebuild`]: the catalogue from blob
//!   storage alone, for a new appliance after a disaster.
//! - [`server`] and [`agent`]: the two ends of the ingest API.
//! - [`groups`], [`consistency`], [`events`]: replication groups, the point schedule (crash
//!   points, app-consistent bookmark requests, group barriers) and the event log.

pub mod agent;
pub mod blob;
pub mod catalog;
pub mod consistency;
pub mod crc;
pub mod crypto;
pub mod direct_io;
pub mod disk_scan;
pub mod events;
pub mod groups;
pub mod journal;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod process_servers;
pub mod protocol;
pub mod rebuild;
pub mod record;
pub mod replay;
pub mod segment;
pub mod server;
pub mod testkit;
pub mod uploader;
pub mod zstd_frame;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

/// What the process server needs to start.
#[derive(Debug, Clone)]
pub struct ProcessServerConfig {
    pub journal_dir: PathBuf,
    pub cache_max_bytes: u64,
    /// Committed records kept in memory for the uploader (the journal's hot tail).
    pub cache_memory_bytes: u64,
    pub blob_url: String,
    pub blob_options: BTreeMap<String, String>,
    pub passphrase: String,
    /// A local copy of the blob store's keyring (salt and verifier, no key), so the process
    /// server can start and keep accepting writes while blob storage is unreachable.
    pub keyring_cache: PathBuf,
    /// The config file's `[policy]`: the "default" policy until the management API replaces it.
    pub default_policy: policy::Policy,
}

/// How long start-up waits for blob storage before falling back to the cached keyring.
const KEYRING_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Opens the keyring from blob storage (creating it on first use) and caches it locally; when
/// blob storage is unreachable, opens the cached copy instead. A wrong passphrase always fails.
async fn open_keyring(blob: &uploader::BlobStore, cfg: &ProcessServerConfig) -> anyhow::Result<crypto::Key> {
    let remote = tokio::time::timeout(
        KEYRING_WAIT,
        blob::open_or_create_keyring(blob.store.as_ref(), &cfg.passphrase, crypto::KdfParams::generate),
    )
    .await;
    let unreachable = match remote {
        Ok(Ok((kek, ring))) => {
            let json = serde_json::to_vec_pretty(&ring)?;
            if std::fs::read(&cfg.keyring_cache).ok().as_deref() != Some(json.as_slice()) {
                let tmp = cfg.keyring_cache.with_extension("tmp");
                std::fs::write(&tmp, &json)?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &cfg.keyring_cache)?;
            }
            return Ok(kek);
        }
        Ok(Err(blob::BlobError::Store(e))) => e.to_string(),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => format!("no answer in {KEYRING_WAIT:?}"),
    };
    let Ok(text) = std::fs::read(&cfg.keyring_cache) else {
        anyhow::bail!("blob storage is unreachable ({unreachable}) and no cached keyring exists yet");
    };
    tracing::warn!(error = %unreachable, "blob storage unreachable at start; using the cached keyring, uploads will catch up");
    let ring: crypto::Keyring = serde_json::from_slice(&text)?;
    Ok(blob::open_keyring_blocking(ring, cfg.passphrase.clone()).await?)
}

/// A running process server: journal, uploader task and the ingest API's state.
pub struct ProcessServer {
    pub journal: journal::Journal,
    pub ingest: Arc<server::IngestState>,
    pub blob: uploader::BlobStore,
    /// The key-encryption key: unwraps the disks' data keys for the read side.
    pub kek: crypto::Key,
    /// Replication policies and which machine follows which.
    pub policies: policy::Policies,
    /// Point schedule and group bookmark barriers; holds the replication groups.
    pub coordinator: Arc<consistency::Coordinator>,
    /// The event log.
    pub events: events::Events,
    uploader: tokio::task::JoinHandle<()>,
    points: tokio::task::JoinHandle<()>,
}

impl ProcessServer {
    /// Opens the journal and the blob store (creating the keyring on first use) and starts the
    /// uploader. Stops when `shutdown` turns true.
    pub async fn start(
        cfg: &ProcessServerConfig,
        metrics: metrics::GatewayMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let store = blob::open_store(&cfg.blob_url, &cfg.blob_options)?;
        let local_root = url::Url::parse(&cfg.blob_url)
            .ok()
            .filter(|u| u.scheme() == "file")
            .and_then(|u| u.to_file_path().ok());
        let blob = uploader::BlobStore::new(store, local_root);
        let kek = open_keyring(&blob, cfg).await?;
        let dir = cfg.journal_dir.clone();
        let max = cfg.cache_max_bytes;
        let journal = tokio::task::spawn_blocking(move || journal::Journal::open(&dir, max)).await??;
        journal.state.hot.set_limit(cfg.cache_memory_bytes);
        metrics.cache_limit_bytes.set(cfg.cache_max_bytes as i64);
        metrics.cache_used_bytes.set(journal.cache_used() as i64);
        let up = Arc::new(uploader::Uploader::new(
            journal.clone(),
            blob.clone(),
            kek.clone(),
            metrics.clone(),
        ));
        let uploader = tokio::spawn(up.run(shutdown.clone()));
        let policies = policy::Policies::new(journal.clone(), cfg.default_policy.clone());
        let j = journal.clone();
        let events = tokio::task::spawn_blocking(move || events::Events::open(j)).await??;
        metrics.use_policies(policies.clone(), events.clone());
        let (p, e) = (policies.clone(), events.clone());
        let coordinator = tokio::task::spawn_blocking(move || consistency::Coordinator::new(p, e)).await?;
        let points = tokio::spawn(coordinator.clone().run(shutdown));
        let ingest = server::IngestState::new(
            journal.clone(),
            blob.clone(),
            kek.clone(),
            cfg.passphrase.clone(),
            metrics,
            coordinator.clone(),
        );
        Ok(Self {
            journal,
            ingest,
            blob,
            kek,
            policies,
            coordinator,
            events,
            uploader,
            points,
        })
    }

    /// Waits for the uploader to stop (after shutdown).
    pub async fn join(self) {
        let _ = self.uploader.await;
        let _ = self.points.await;
    }
}

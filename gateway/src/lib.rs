//! Lifeboat's replication data path, the process server role, as a library.
//!
//! ```text
//! agent ──batches (HTTPS)──▶ server ──prepare (decode, CRC, block checksums)──▶ journal writer thread
//!                                                    group commit: one WriteBatch + WAL fsync, then ack
//! journal ──uploader──▶ segment (zstd + AES-256-GCM chunks, sealed index) ──▶ blob store ──▶ replay
//! ```
//!
//! - [`protocol`]: the batch wire format agents send.
//! - [`journal`]: the RocksDB write-ahead cache; nothing is acked before it is synced, nothing is
//!   dropped from it before its segment is durably in blob storage.
//! - [`segment`] and [`record`]: the versioned, authenticated log format in blob storage.
//! - [`crypto`]: Argon2id key-encryption key, wrapped per-disk data keys, never-reused nonces.
//! - [`uploader`]: journal → segments → blob store, retried for as long as an outage lasts.
//! - [`replay`]: blob store → image at any sequence number.
//! - [`server`] and [`agent`]: the two ends of the ingest API.

pub mod agent;
pub mod blob;
pub mod crypto;
pub mod journal;
pub mod metrics;
pub mod protocol;
pub mod record;
pub mod replay;
pub mod segment;
pub mod server;
pub mod testkit;
pub mod uploader;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

/// What the process server needs to start.
#[derive(Debug, Clone)]
pub struct ProcessServerConfig {
    pub journal_dir: PathBuf,
    pub cache_max_bytes: u64,
    pub blob_url: String,
    pub blob_options: BTreeMap<String, String>,
    pub passphrase: String,
}

/// A running process server: journal, uploader task and the ingest API's state.
pub struct ProcessServer {
    pub journal: journal::Journal,
    pub ingest: Arc<server::IngestState>,
    pub blob: uploader::BlobStore,
    uploader: tokio::task::JoinHandle<()>,
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
        let blob = uploader::BlobStore { store, local_root };
        let kek =
            blob::open_or_create_keyring(blob.store.as_ref(), &cfg.passphrase, crypto::KdfParams::generate).await?;
        let dir = cfg.journal_dir.clone();
        let max = cfg.cache_max_bytes;
        let journal = tokio::task::spawn_blocking(move || journal::Journal::open(&dir, max)).await??;
        metrics.cache_limit_bytes.set(cfg.cache_max_bytes as i64);
        metrics.cache_used_bytes.set(journal.cache_used() as i64);
        let up = Arc::new(uploader::Uploader::new(
            journal.clone(),
            blob.clone(),
            kek.clone(),
            metrics.clone(),
        ));
        let uploader = tokio::spawn(up.run(shutdown));
        let ingest = server::IngestState::new(journal.clone(), blob.clone(), kek, cfg.passphrase.clone(), metrics);
        Ok(Self {
            journal,
            ingest,
            blob,
            uploader,
        })
    }

    /// Waits for the uploader to stop (after shutdown).
    pub async fn join(self) {
        let _ = self.uploader.await;
    }
}

//! The segmenter and uploader: turns journal entries into segments and puts them to blob storage.
//! Each segment's range and counter are persisted (a plan) before the put; journal entries are
//! deleted only after the put succeeded. Puts are retried with backoff for as long as it takes:
//! during a blob-store outage the journal absorbs the writes and ingest is held back when full.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, PutPayload};
use tokio::sync::{watch, Mutex};

use crate::blob::{self, layout};
use crate::catalog;
use crate::crypto::Key;
use crate::journal::{DiskMeta, Journal, JournalError, SegmentPlan};
use crate::metrics::GatewayMetrics;
use crate::record::LogRecord;
use crate::segment;

/// Most raw log bytes in one segment.
pub const SEGMENT_MAX_BYTES: usize = 32 << 20;
/// Compact the emptied journal after this many bytes were uploaded since the last compaction.
const COMPACT_AFTER_BYTES: u64 = 256 << 20;

/// The blob store plus what durability needs: for a local folder, the root to fsync under.
#[derive(Clone)]
pub struct BlobStore {
    pub store: Arc<dyn ObjectStore>,
    pub local_root: Option<PathBuf>,
}

impl BlobStore {
    /// Puts an object; on a local folder the file and its directory are fsynced before return,
    /// since the journal drops its copy right after.
    pub async fn put_durable(
        &self,
        path: &object_store::path::Path,
        data: bytes::Bytes,
    ) -> Result<(), object_store::Error> {
        self.store.put(path, PutPayload::from(data)).await?;
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::File::open(&file)?.sync_all()?;
                if let Some(dir) = file.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(())
            })
            .await
            .expect("fsync task")
            .map_err(|e| object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })?;
        }
        Ok(())
    }
}

/// Records of a disk's next segment, read and compressed ahead (see [`Uploader::prefetch`]).
type Ahead = (Vec<LogRecord>, segment::CompressedChunks);

/// The next segment being read and compressed while the current one is put: `(disk, first seq)`.
struct Prefetch {
    disk: u32,
    from: u64,
    task: tokio::task::JoinHandle<Result<Option<Ahead>, JournalError>>,
}

pub struct Uploader {
    journal: Journal,
    blob: BlobStore,
    kek: Key,
    keys: Mutex<HashMap<(u32, u32), Key>>,
    metrics: GatewayMetrics,
    prefetch: Mutex<Option<Prefetch>>,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(7)).min(10_000))
}

impl Uploader {
    pub fn new(journal: Journal, blob: BlobStore, kek: Key, metrics: GatewayMetrics) -> Self {
        Self {
            journal,
            blob,
            kek,
            keys: Mutex::new(HashMap::new()),
            metrics,
            prefetch: Mutex::new(None),
        }
    }

    /// Runs until `shutdown` turns true. A segment in flight at shutdown is left as a plan and
    /// re-uploaded (identically) on the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut compacted_at = 0u64;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let notified = self.journal.state.committed.notified();
            let mut progressed = false;
            let disks = self.journal.disks();
            let pending = disks.iter().filter(|d| d.next_seq - 1 > d.uploaded_through).count();
            self.metrics.segments_pending.set(pending as i64);
            for disk in disks {
                tokio::select! {
                    r = self.upload_one(&disk) => progressed |= r,
                    _ = shutdown.changed() => return,
                }
            }
            self.metrics.cache_used_bytes.set(self.journal.cache_used() as i64);
            let uploaded = self.metrics.compressed_in_bytes.get();
            if !progressed && self.journal.cache_used() == 0 && uploaded - compacted_at >= COMPACT_AFTER_BYTES {
                // Everything is uploaded: reclaim the journal's disk space while it is cheap.
                compacted_at = uploaded;
                let j = self.journal.clone();
                let _ = tokio::task::spawn_blocking(move || j.compact()).await;
            }
            if !progressed {
                tokio::select! {
                    _ = notified => {
                        // Let a burst of small batches gather into one segment.
                        if self.journal.cache_used() < (8 << 20) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// Uploads the next segment of `disk` if it has one; true if something was uploaded.
    async fn upload_one(&self, disk: &DiskMeta) -> bool {
        let mut attempt = 0;
        loop {
            let existing = self.journal.state.plans.read().expect("lock").get(&disk.id).copied();
            if existing.is_none() && disk.next_seq - 1 <= disk.uploaded_through {
                return false;
            }
            match self.try_upload(disk, existing).await {
                Ok(done) => return done,
                Err(e) => {
                    self.metrics.upload_errors.inc();
                    let wait = backoff(attempt);
                    tracing::warn!(machine = %disk.machine, disk = %disk.disk, error = %e, retry_in = ?wait, "segment upload failed; the journal keeps the data");
                    tokio::time::sleep(wait).await;
                    self.metrics.upload_retries.inc();
                    attempt += 1;
                }
            }
        }
    }

    async fn data_key(&self, disk: &DiskMeta, key_id: u32) -> anyhow::Result<Key> {
        if let Some(k) = self.keys.lock().await.get(&(disk.id, key_id)) {
            return Ok(k.clone());
        }
        let k = blob::get_data_key(self.blob.store.as_ref(), &self.kek, &disk.machine, &disk.disk, key_id)
            .await?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "data key {key_id} of {}/{} is missing from blob storage",
                    disk.machine,
                    disk.disk
                )
            })?;
        self.keys.lock().await.insert((disk.id, key_id), k.clone());
        Ok(k)
    }

    /// Starts reading and compressing the segment of disk `disk` from seq `from` on, when a full
    /// segment's worth is already waiting: that work then overlaps the put of the current one
    /// (compression needs no counter, so no plan is made ahead).
    async fn start_prefetch(&self, disk: u32, from: u64, current_bytes: u64) {
        let waiting = self.journal.cache_used().saturating_sub(current_bytes);
        let more = self.journal.disks().iter().any(|d| d.id == disk && d.next_seq > from);
        if !more || waiting < SEGMENT_MAX_BYTES as u64 {
            return;
        }
        let journal = self.journal.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<Option<Ahead>, JournalError> {
            let recs = journal.read_records(disk, from, u64::MAX, SEGMENT_MAX_BYTES)?;
            if recs.is_empty() {
                return Ok(None);
            }
            let compressed = segment::compress_chunks(&recs);
            Ok(Some((recs, compressed)))
        });
        *self.prefetch.lock().await = Some(Prefetch { disk, from, task });
    }

    /// The records (and compressed chunks) read ahead for `disk` from `from`, if that is what
    /// was prefetched; anything else prefetched is dropped.
    async fn take_prefetch(&self, disk: u32, from: u64) -> Option<Ahead> {
        let p = self.prefetch.lock().await.take()?;
        if p.disk != disk || p.from != from {
            p.task.abort();
            return None;
        }
        match p.task.await {
            Ok(Ok(ahead)) => ahead,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "read-ahead of the next segment failed; reading again");
                None
            }
            Err(_) => None,
        }
    }

    async fn try_upload(&self, disk: &DiskMeta, existing: Option<SegmentPlan>) -> anyhow::Result<bool> {
        let journal = self.journal.clone();
        let id = disk.id;
        let mut compressed = None;
        let (plan, records) = match existing {
            Some(plan) => {
                let recs = tokio::task::spawn_blocking(move || {
                    journal.read_records(id, plan.first_seq, plan.last_seq, usize::MAX)
                })
                .await??;
                (plan, recs)
            }
            None => {
                let from = disk.uploaded_through + 1;
                let recs = match self.take_prefetch(id, from).await {
                    Some((recs, chunks)) => {
                        compressed = Some(chunks);
                        recs
                    }
                    None => {
                        tokio::task::spawn_blocking(move || journal.read_records(id, from, u64::MAX, SEGMENT_MAX_BYTES))
                            .await??
                    }
                };
                let (Some(first), Some(last)) = (recs.first(), recs.last()) else {
                    return Ok(false);
                };
                let plan = self.journal.plan_segment(id, first.seq, last.seq).await?;
                if plan.first_seq != first.seq || plan.last_seq != last.seq {
                    // A plan already existed (raced with a restart path): redo from it.
                    return Ok(false);
                }
                (plan, recs)
            }
        };
        let expected = plan.last_seq - plan.first_seq + 1;
        if records.len() as u64 != expected || records.first().map(|r| r.seq) != Some(plan.first_seq) {
            anyhow::bail!(
                "journal of disk {id} holds {} of the {expected} records of seq {}..={}",
                records.len(),
                plan.first_seq,
                plan.last_seq
            );
        }
        let key = self.data_key(disk, disk.key_id).await?;
        let raw: usize = records.iter().map(|r| r.encoded_len()).sum();
        let journal_bytes = (raw + 4 * records.len()) as u64;
        self.start_prefetch(id, plan.last_seq + 1, journal_bytes).await;
        let (machine, diskname, key_id) = (disk.machine.clone(), disk.disk.clone(), disk.key_id);
        let path = layout::segment(&disk.machine, &disk.disk, plan.first_seq, plan.last_seq);
        let name = path.to_string();
        let (bytes, entry, records) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let compressed = compressed
                .filter(|c| c.matches(&records))
                .unwrap_or_else(|| segment::compress_chunks(&records));
            let (_, bytes) =
                segment::seal_segment(&machine, &diskname, key_id, plan.counter, &key, &records, compressed);
            let (index, _) = segment::SegmentIndex::from_object(&bytes, |_| Ok(key.clone()), &name)?;
            Ok((bytes, catalog::SegmentEntry::from_index(&name, &index), records))
        })
        .await??;
        let len = bytes.len();
        self.blob.put_durable(&path, bytes).await?;
        // The catalogue learns of the segment before the journal lets go of its records; both
        // writes share the WAL, so the synced journal update below makes this one durable too.
        let db = self.journal.db().clone();
        tokio::task::spawn_blocking(move || {
            let mut wb = rocksdb::WriteBatch::default();
            catalog::index_segment(&db, &mut wb, id, entry.first_seq, &entry, &records);
            db.write(wb)
        })
        .await??;
        self.journal.segment_uploaded(plan, journal_bytes).await?;
        self.metrics.uploaded_bytes.inc_by(len as u64);
        self.metrics.compressed_in_bytes.inc_by(raw as u64);
        self.metrics.segments_uploaded.inc();
        self.metrics.record_drained(journal_bytes);
        tracing::debug!(segment = %path, bytes = len, raw, "segment uploaded");
        Ok(true)
    }
}

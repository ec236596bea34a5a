//! Retention: drops recovery points older than the policy allows (the newest point always stays)
//! and rolls the log segments that only they needed into the disk's base image in blob storage.
//!
//! A roll-up is crash-safe at every step: (1) the new base generation's parts are written beside
//! the old ones, (2) `base.json` switches to them, (3) the local catalogue switches in one
//! `WriteBatch`, (4) the rolled-up segments and the old parts are deleted. Until (2) readers and
//! rebuilds use the old objects; after it, leftovers of an interrupted run are swept next time.
//! A point's own record stays in the log, so `index rebuild` still finds every retained point.
//!
//! Retention runs where a disk's log is written (it reserves nonce counters from that journal):
//! on every process server, for its own disks; a disk the config server only follows is left to
//! its process server. There, (4) waits [`Retention::delete_rolled_after`] so that the config
//! server's follower switches to the new base before the objects it still reads go.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use gateway::blob::{self, layout, BaseManifest};
use gateway::catalog::{self, BaseState, SegmentEntry, INDEX_BLOCK};
use gateway::journal::DiskMeta;
use gateway::record::{LogRecord, RecordKind};
use gateway::segment::{self, SegmentIndex};
use gateway::uploader::{BlobStore, SEGMENT_MAX_BYTES};
use object_store::path::Path;

use crate::pit::{now_ms, Reader};
use crate::view::DiskView;

/// What one retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub points_dropped: usize,
    pub segments_rolled: usize,
    pub objects_deleted: usize,
}

pub struct Retention {
    reader: Arc<Reader>,
    blob: BlobStore,
    kek: gateway::crypto::Key,
    /// Each machine keeps its points for its policy's retention.
    policies: gateway::policy::Policies,
    /// How long rolled-up objects stay after the switch (zero: deleted at once).
    delete_after: Duration,
    /// When this process switched each disk's base, for `delete_after`.
    switched: std::sync::Mutex<HashMap<u32, std::time::Instant>>,
    /// Which machines this process server replicates now (see [`Retention::only_for`]).
    serves: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

/// Crash tests: `LIFEBOAT_FAILPOINT=NAME` aborts the process (like kill -9) when a roll-up reaches
/// step NAME, so a test can prove that every step is safe to die at.
fn failpoint(name: &str) {
    if std::env::var("LIFEBOAT_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("lifeboat: failpoint {name} reached; aborting");
        std::process::abort();
    }
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl Retention {
    pub fn new(
        reader: Arc<Reader>,
        blob: BlobStore,
        kek: gateway::crypto::Key,
        policies: gateway::policy::Policies,
    ) -> Self {
        Self {
            reader,
            blob,
            kek,
            policies,
            delete_after: Duration::ZERO,
            switched: std::sync::Mutex::new(HashMap::new()),
            serves: Arc::new(|_| true),
        }
    }

    /// Keeps to the machines `serves` names (it may read RocksDB: it is called on a blocking
    /// thread). A machine moved to another process server keeps its disks in this journal, but
    /// its log is that server's now: rolling it up here would race with its new writer.
    pub fn only_for(mut self, serves: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.serves = Arc::new(serves);
        self
    }

    /// Keeps the objects a roll-up replaced for `delay` after the switch, then a later pass
    /// deletes them: another appliance that follows this log (the config server's catalogue
    /// follower) reads them until it has switched too. A restart forgets the wait.
    pub fn delete_rolled_after(mut self, delay: Duration) -> Self {
        self.delete_after = delay;
        self
    }

    /// Runs a pass every `every` until `shutdown` turns true.
    pub async fn run(self, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            match self.pass().await {
                Ok(o) if o != RetentionOutcome::default() => tracing::info!(
                    points_dropped = o.points_dropped,
                    segments_rolled = o.segments_rolled,
                    objects_deleted = o.objects_deleted,
                    "retention pass"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention pass failed; retrying next round"),
            }
        }
    }

    /// One pass over every machine.
    pub async fn pass(&self) -> anyhow::Result<RetentionOutcome> {
        let mut out = RetentionOutcome::default();
        let (mut machines, serves) = (self.reader.machines(), self.serves.clone());
        let machines = tokio::task::spawn_blocking(move || {
            machines.retain(|m| serves(m));
            machines
        })
        .await?;
        for machine in machines {
            self.machine(&machine, &mut out).await?;
        }
        Ok(out)
    }

    async fn machine(&self, machine: &str, out: &mut RetentionOutcome) -> anyhow::Result<()> {
        if self.reader.disks(machine).iter().any(|d| d.is_followed()) {
            return Ok(()); // its own process server keeps its points and base images
        }
        let journal = self.reader.journal().clone();
        let m = machine.to_owned();
        let points = tokio::task::spawn_blocking(move || journal.points(&m)).await??;
        let Some(newest) = points.iter().map(|p| p.time_ms).max() else {
            return Ok(());
        };
        let (p, m) = (self.policies.clone(), machine.to_owned());
        let keep_for = tokio::task::spawn_blocking(move || p.settings_of(&m).retention).await?;
        let cutoff = now_ms().saturating_sub(keep_for.as_millis() as u64);
        let (expired, kept): (Vec<_>, Vec<_>) = points
            .into_iter()
            .partition(|p| p.time_ms < cutoff && p.time_ms < newest);
        if !expired.is_empty() {
            let journal = self.reader.journal().clone();
            let ids: Vec<u64> = expired.iter().map(|p| p.id).collect();
            let m = machine.to_owned();
            tokio::task::spawn_blocking(move || journal.drop_points(&m, &ids)).await??;
            out.points_dropped += expired.len();
        }
        // The oldest kept point bounds what each disk may roll up: everything strictly before
        // its sequence (its own record stays in the log).
        // Only after points expired (the flag is set with the drop and survives a crash): the
        // log of the first sync is not rewritten into a base before anything needs dropping.
        let Some(oldest) = kept.iter().min_by_key(|p| (p.time_ms, p.id)) else {
            return Ok(());
        };
        let (journal, m) = (self.reader.journal().clone(), machine.to_owned());
        if !tokio::task::spawn_blocking(move || journal.rollup_pending(&m)).await?? {
            return Ok(());
        }
        let mut all_done = true;
        for disk in self.reader.disks(machine) {
            let Some(&keep_from) = oldest.seqs.get(&disk.disk) else {
                continue;
            };
            all_done &= self.disk(&disk, keep_from, out).await?;
        }
        if all_done {
            let (journal, m) = (self.reader.journal().clone(), machine.to_owned());
            tokio::task::spawn_blocking(move || journal.clear_rollup(&m)).await??;
        }
        Ok(())
    }

    /// Rolls `disk`'s log segments that end before `keep_from` into a new base generation.
    /// Returns false when an open view held the roll-up back (it is retried next pass).
    async fn disk(&self, disk: &DiskMeta, keep_from: u64, out: &mut RetentionOutcome) -> anyhow::Result<bool> {
        let db = self.reader.journal().db().clone();
        let id = disk.id;
        let (entries, base) = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                Ok((
                    catalog::segments(&db, id).map_err(err)?,
                    catalog::base_state(&db, id).map_err(err)?,
                ))
            })
            .await??
        };
        let rolled: Vec<&(u64, SegmentEntry)> = entries
            .iter()
            .filter(|(sid, e)| sid & catalog::BASE_ID == 0 && e.last_seq < keep_from && e.last_seq > base.through_seq)
            .collect();
        let Some(through) = rolled.iter().map(|(_, e)| e.last_seq).max() else {
            return self.sweep(disk, base, out).await;
        };
        if self.reader.oldest_open_view(disk.id).is_some_and(|s| s < through) {
            tracing::debug!(machine = %disk.machine, disk = %disk.disk, "roll-up waits for an open view of an old point");
            return Ok(false);
        }
        // Past any generation an interrupted run published, so a part name is never reused
        // while a manifest still points at it.
        let published = blob::get_base_manifest(self.blob.store.as_ref(), &disk.machine, &disk.disk)
            .await?
            .map(|m| m.generation)
            .unwrap_or(0);
        let generation = base.generation.max(published) + 1;
        let old_parts: Vec<u64> = entries
            .iter()
            .map(|(sid, _)| *sid)
            .filter(|sid| sid & catalog::BASE_ID != 0)
            .collect();
        // (1) The new base: every block that has a version at or before `through`, as it reads
        // at `through`; blocks that read as zeros need no record at all.
        let blocks = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || catalog::extents_through(&db, id, through)).await??
        };
        let view = self.reader.view_at(disk.clone(), through);
        let key = gateway::blob::get_data_key(
            self.blob.store.as_ref(),
            &self.kek,
            &disk.machine,
            &disk.disk,
            disk.key_id,
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("data key {} of {}/{} is missing", disk.key_id, disk.machine, disk.disk))?;
        // The catalogue switch is built along the way and written in one batch at (3): first the
        // old versions out, then each part's extents in as the part lands.
        let mut wb = rocksdb::WriteBatch::default();
        catalog::drop_extents(&db, &mut wb, id, &blocks);
        let mut parts: Vec<String> = Vec::new();
        let mut pending: Vec<LogRecord> = Vec::new();
        let mut pending_bytes = 0usize;
        let time_ms = now_ms();
        for (block, _) in &blocks {
            let offset = block * INDEX_BLOCK;
            let len = (disk.size - offset).min(INDEX_BLOCK) as usize;
            let data: Bytes = view.read_at(offset, len).await?;
            if gateway::journal::is_zero(&data) {
                continue;
            }
            pending_bytes += data.len();
            pending.push(LogRecord {
                kind: RecordKind::Write,
                seq: through,
                time_ms,
                offset,
                len: len as u32,
                payload: data,
            });
            if pending_bytes >= SEGMENT_MAX_BYTES {
                let records = std::mem::take(&mut pending);
                pending_bytes = 0;
                let (sid, entry, records) = self
                    .write_part(disk, &key, generation, parts.len() as u32, records)
                    .await?;
                catalog::index_segment(&db, &mut wb, id, sid, &entry, &records);
                parts.push(entry.path);
            }
        }
        if !pending.is_empty() {
            let (sid, entry, records) = self
                .write_part(disk, &key, generation, parts.len() as u32, pending)
                .await?;
            catalog::index_segment(&db, &mut wb, id, sid, &entry, &records);
            parts.push(entry.path);
        }
        drop(view);
        failpoint("retention-after-parts");
        // (2) The switch.
        let manifest = BaseManifest::new(&disk.machine, &disk.disk, generation, through, parts.clone());
        self.blob
            .put_durable(
                &layout::base_manifest(&disk.machine, &disk.disk),
                Bytes::from(serde_json::to_vec_pretty(&manifest)?),
            )
            .await?;
        failpoint("retention-after-manifest");
        // (3) The catalogue, in one batch: old extents out, base extents in.
        let rolled_ids: Vec<u64> = rolled.iter().map(|(sid, _)| *sid).collect();
        let rolled_paths: Vec<String> = rolled.iter().map(|(_, e)| e.path.clone()).collect();
        let old_paths: Vec<String> = entries
            .iter()
            .filter(|(sid, _)| sid & catalog::BASE_ID != 0)
            .map(|(_, e)| e.path.clone())
            .collect();
        {
            let db = db.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                catalog::switch_base(
                    &db,
                    &mut wb,
                    id,
                    rolled_ids.into_iter().chain(old_parts),
                    BaseState {
                        generation,
                        through_seq: through,
                    },
                );
                let mut wo = rocksdb::WriteOptions::default();
                wo.set_sync(true);
                db.write_opt(wb, &wo)?;
                Ok(())
            })
            .await??;
        }
        self.reader.forget_segments(disk.id);
        failpoint("retention-after-catalogue");
        out.segments_rolled += rolled_paths.len();
        tracing::info!(machine = %disk.machine, disk = %disk.disk, through, generation, parts = parts.len(), rolled = rolled_paths.len(), "log rolled into the base image");
        // (4) What nothing needs any more (or, with a delay, what a later sweep deletes).
        if !self.delete_after.is_zero() {
            self.switched
                .lock()
                .expect("lock")
                .insert(disk.id, std::time::Instant::now());
            return Ok(false);
        }
        for p in rolled_paths.iter().chain(&old_paths) {
            if self.blob.store.delete(&Path::from(p.as_str())).await.is_ok() {
                out.objects_deleted += 1;
            }
        }
        self.sweep(
            disk,
            BaseState {
                generation,
                through_seq: through,
            },
            out,
        )
        .await
    }

    /// Seals and puts one base part under a freshly reserved counter.
    async fn write_part(
        &self,
        disk: &DiskMeta,
        key: &gateway::crypto::Key,
        generation: u64,
        part: u32,
        records: Vec<LogRecord>,
    ) -> anyhow::Result<(u64, SegmentEntry, Vec<LogRecord>)> {
        let (key_id, counter) = self.reader.journal().reserve_counters(disk.id, 1).await?;
        anyhow::ensure!(
            key_id == disk.key_id,
            "the data key of {}/{} changed",
            disk.machine,
            disk.disk
        );
        let path = layout::base_part(&disk.machine, &disk.disk, generation, part);
        let name = path.to_string();
        let (machine, d, key) = (disk.machine.clone(), disk.disk.clone(), key.clone());
        let (bytes, entry, records) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (_, bytes) = segment::build_segment(&machine, &d, key_id, counter, &key, &records);
            let (index, _) = SegmentIndex::from_object(&bytes, |_| Ok(key.clone()), &name)?;
            Ok((bytes, SegmentEntry::from_index(&name, &index), records))
        })
        .await??;
        self.blob.put_durable(&path, bytes).await?;
        Ok((catalog::base_part_id(generation, part), entry, records))
    }

    /// Deletes objects an interrupted roll-up left behind: base parts of other generations and
    /// log segments the base already holds. Returns false while [`Retention::delete_rolled_after`] holds the deletes back.
    async fn sweep(&self, disk: &DiskMeta, base: BaseState, out: &mut RetentionOutcome) -> anyhow::Result<bool> {
        if base.generation == 0 {
            return Ok(true);
        }
        let waiting = self
            .switched
            .lock()
            .expect("lock")
            .get(&disk.id)
            .is_some_and(|at| at.elapsed() < self.delete_after);
        if waiting {
            return Ok(false);
        }
        let store = self.blob.store.as_ref();
        let current: HashMap<String, ()> = blob::get_base_manifest(store, &disk.machine, &disk.disk)
            .await?
            .filter(|m| m.generation == base.generation)
            .map(|m| m.parts.into_iter().map(|p| (p, ())).collect())
            .unwrap_or_default();
        if current.is_empty() && base.through_seq > 0 {
            // The manifest is not (yet) the catalogue's generation: touch nothing.
            let m = blob::get_base_manifest(store, &disk.machine, &disk.disk).await?;
            if m.map(|m| m.generation) != Some(base.generation) {
                return Ok(true);
            }
        }
        let parts: Vec<_> = store
            .list(Some(&layout::base_dir(&disk.machine, &disk.disk)))
            .try_collect()
            .await?;
        for o in parts {
            if !current.contains_key(o.location.as_ref()) && store.delete(&o.location).await.is_ok() {
                out.objects_deleted += 1;
            }
        }
        for seg in gateway::replay::list_segments(store, &disk.machine, &disk.disk).await? {
            if seg.last_seq <= base.through_seq && store.delete(&seg.path).await.is_ok() {
                out.objects_deleted += 1;
            }
        }
        Ok(true)
    }
}

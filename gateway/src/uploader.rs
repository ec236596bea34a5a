//! The segmenter and uploader: turns journal entries into segments and puts them to blob storage.
//! Each segment's range and counter are persisted (a plan) before the put; journal entries are
//! deleted only after the put succeeded. Puts are retried with backoff for as long as it takes:
//! during a blob-store outage the journal absorbs the writes and ingest is held back when full.
//! Segments of a disk compress in parallel but become visible in blob storage strictly in sequence
//! order, so the store always holds a gap-free prefix of each disk's log: whatever happens to the
//! appliance, a recovery from blob storage alone reaches the last segment put.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, PutPayload};
use tokio::sync::{watch, Mutex};

use crate::blob::{self, layout};
use crate::catalog;
use crate::crypto::Key;
use crate::direct_io::{self, AlignedBuf};
use crate::journal::{DiskMeta, Journal, JournalError, SegmentPlan};
use crate::metrics::GatewayMetrics;
use crate::record::{LogRecord, RecordKind};
use crate::segment;

/// Most raw log bytes in one segment.
pub const SEGMENT_MAX_BYTES: usize = 16 << 20;
/// Compact the emptied journal after this many bytes were uploaded since the last compaction.
const COMPACT_AFTER_BYTES: u64 = 256 << 20;
/// How long an idle uploader lets new data gather before the first segment of a burst.
const GATHER_FOR: Duration = Duration::from_millis(100);

/// The blob store plus what durability needs: for a local folder, the root to fsync under.
#[derive(Clone)]
pub struct BlobStore {
    pub store: Arc<dyn ObjectStore>,
    pub local_root: Option<PathBuf>,
    /// Aligned staging buffers for direct-I/O puts to a local folder, reused between puts.
    scratch: Arc<crate::pool::Pool<AlignedBuf>>,
}

impl BlobStore {
    pub fn new(store: Arc<dyn ObjectStore>, local_root: Option<PathBuf>) -> Self {
        Self {
            store,
            local_root,
            // A few buffers serve the puts in flight.
            scratch: crate::pool::Pool::new(SEGMENTS_IN_FLIGHT + 1),
        }
    }

    /// Puts an object durably: on a local folder the file is written (with direct I/O where the
    /// file system allows), fsynced and renamed into place, and its folder fsynced before return,
    /// since the journal drops its copy right after. The file is what `object_store`'s local
    /// store reads; other stores acknowledge a put once it is durable.
    pub async fn put_durable(
        &self,
        path: &object_store::path::Path,
        data: bytes::Bytes,
    ) -> Result<(), object_store::Error> {
        let Some(root) = &self.local_root else {
            self.store.put(path, PutPayload::from(data)).await?;
            return Ok(());
        };
        let file = root.join(path.as_ref());
        let pool = self.scratch.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut scratch = pool.take().unwrap_or_default();
            let r = direct_io::write_file_durably(&file, &data, &mut scratch);
            pool.give(scratch);
            r
        })
        .await
        .expect("put task")
        .map_err(|e| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        })
    }
}

/// Segments of one disk in flight at once: while one is put and synced, the next ones compress.
pub const SEGMENTS_IN_FLIGHT: usize = 4;

/// A segment put to blob storage, waiting for the segments before it to be finalised.
struct Staged {
    len: usize,
    raw: usize,
    journal_bytes: u64,
    entry: catalog::SegmentEntry,
    /// The records' headers (payloads dropped once sealed, so their buffers are reused while
    /// the put is still in flight) and where each lies in the segment's chunks.
    records: Vec<LogRecord>,
    positions: Vec<(u32, u32)>,
}

/// One segment in flight: its plan and the task that compresses, seals and puts it.
struct InFlight {
    plan: SegmentPlan,
    attempt: u32,
    task: tokio::task::JoinHandle<anyhow::Result<Staged>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // At shutdown the plan stays and the segment is put again (identically) at the next start.
        self.task.abort();
    }
}

pub struct Uploader {
    journal: Journal,
    blob: BlobStore,
    kek: Key,
    keys: Mutex<HashMap<(u32, u32), Key>>,
    metrics: GatewayMetrics,
    /// Per disk: the sequence number through which every segment is put. A segment's put waits
    /// until it reaches the last sequence number of the segment planned before it.
    put_through: std::sync::Mutex<HashMap<u32, watch::Sender<u64>>>,
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
            put_through: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The put order of `disk`'s segments; starts at what the journal knows is uploaded.
    fn put_order(&self, disk: &DiskMeta) -> watch::Sender<u64> {
        let mut orders = self.put_through.lock().expect("lock");
        let order = orders
            .entry(disk.id)
            .or_insert_with(|| watch::Sender::new(disk.uploaded_through));
        order.send_if_modified(|through| {
            // Uploads finalised since (or before a restart) count as put.
            let behind = *through < disk.uploaded_through;
            *through = (*through).max(disk.uploaded_through);
            behind
        });
        order.clone()
    }

    /// Runs until `shutdown` turns true. Each disk keeps up to [`SEGMENTS_IN_FLIGHT`] segments
    /// going (compressing, sealing, putting); they are finalised — catalogued, and their journal
    /// entries dropped — strictly in sequence order. Segments in flight at shutdown are left as
    /// plans and re-uploaded (identically) on the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut compacted_at = 0u64;
        let mut flights: HashMap<u32, VecDeque<InFlight>> = HashMap::new();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let notified = self.journal.state.committed.notified();
            let disks = self.journal.disks();
            let pending = disks.iter().filter(|d| d.next_seq - 1 > d.uploaded_through).count();
            self.metrics.segments_pending.set(pending as i64);
            // A followed disk's log is written (and uploaded) by another process server.
            for disk in disks.iter().filter(|d| !d.is_followed()) {
                let queue = flights.entry(disk.id).or_default();
                if let Err(e) = self.start_segments(disk, queue).await {
                    tracing::warn!(machine = %disk.machine, disk = %disk.disk, error = %e, "cannot start a segment; retrying");
                }
            }
            flights.retain(|_, q| !q.is_empty());
            if flights.is_empty() {
                self.metrics.cache_used_bytes.set(self.journal.cache_used() as i64);
                let uploaded = self.metrics.compressed_in_bytes.get();
                if self.journal.cache_used() == 0 && uploaded - compacted_at >= COMPACT_AFTER_BYTES {
                    // Everything is uploaded: reclaim the journal's disk space while it is cheap.
                    compacted_at = uploaded;
                    let j = self.journal.clone();
                    let _ = tokio::task::spawn_blocking(move || j.compact()).await;
                }
                let woken = tokio::select! {
                    _ = notified => true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    _ = shutdown.changed() => return,
                };
                // Let a burst of small batches gather into one segment, for at most GATHER_FOR:
                // a stream that brings half a segment sooner starts uploading at once.
                let until = tokio::time::Instant::now() + GATHER_FOR;
                loop {
                    let more = self.journal.state.committed.notified();
                    if !woken
                        || self.journal.cache_used() >= SEGMENT_MAX_BYTES as u64 / 2
                        || tokio::time::Instant::now() >= until
                    {
                        break;
                    }
                    tokio::select! {
                        _ = more => {}
                        _ = tokio::time::sleep_until(until) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                continue;
            }
            // Wait for the oldest segment of any disk; new commits may start more segments.
            // A commit may start a segment on a disk with room (or none in flight yet).
            let room = flights.len() < disks.len() || flights.values().any(|q| q.len() < SEGMENTS_IN_FLIGHT);
            let fronts = flights
                .iter_mut()
                .map(|(id, q)| Box::pin(async move { (*id, (&mut q.front_mut().expect("non-empty").task).await) }));
            let ((disk_id, result), _, _) = tokio::select! {
                r = futures::future::select_all(fronts) => r,
                _ = notified, if room => continue,
                _ = shutdown.changed() => return,
            };
            let queue = flights.get_mut(&disk_id).expect("disk in flight");
            let flight = queue.pop_front().expect("front");
            let disk = disks.iter().find(|d| d.id == disk_id).cloned();
            let staged = match result {
                Ok(Ok(staged)) => Ok(staged),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("upload task: {e}")),
            };
            match (staged, disk) {
                (Ok(staged), disk) => {
                    // The segments after it that are put already finish with it: one round trip
                    // to the journal writer (whose group commits ingest shares) for all of them.
                    let mut done = vec![(flight, staged)];
                    let mut failed = None;
                    while queue.front().is_some_and(|f| f.task.is_finished()) {
                        let mut next = queue.pop_front().expect("front");
                        match (&mut next.task).await {
                            Ok(Ok(staged)) => done.push((next, staged)),
                            Ok(Err(e)) => {
                                failed = Some((next, e));
                                break;
                            }
                            Err(e) => {
                                failed = Some((next, anyhow::anyhow!("upload task: {e}")));
                                break;
                            }
                        }
                    }
                    let mut retry = Vec::new();
                    let plans: Vec<(SegmentPlan, u32)> = done.iter().map(|(f, _)| (f.plan, f.attempt)).collect();
                    let (finished, err) = self.finish(done.into_iter().map(|(f, s)| (f.plan, s)).collect()).await;
                    if let Some(e) = err {
                        tracing::warn!(error = %e, "finishing a segment failed; putting it again");
                        self.metrics.upload_errors.inc();
                        retry.extend(plans[finished..].iter().copied());
                    }
                    if let Some((f, e)) = failed {
                        self.metrics.upload_errors.inc();
                        let (machine, name) = disk.map(|d| (d.machine, d.disk)).unwrap_or_default();
                        tracing::warn!(%machine, disk = %name, error = %e, retry_in = ?backoff(f.attempt), "segment upload failed; the journal keeps the data");
                        retry.push((f.plan, f.attempt));
                    }
                    // Back at the front of the queue, in sequence order.
                    for (plan, attempt) in retry.into_iter().rev() {
                        queue.push_front(self.retry(plan, attempt + 1));
                    }
                }
                (Err(e), disk) => {
                    self.metrics.upload_errors.inc();
                    let wait = backoff(flight.attempt);
                    let (machine, name) = disk.map(|d| (d.machine, d.disk)).unwrap_or_default();
                    tracing::warn!(%machine, disk = %name, error = %e, retry_in = ?wait, "segment upload failed; the journal keeps the data");
                    queue.push_front(self.retry(flight.plan, flight.attempt + 1));
                }
            }
        }
    }

    /// Starts segments of `disk` until it has [`SEGMENTS_IN_FLIGHT`]: first the plans left by a
    /// previous run, then new ones. A segment short of [`SEGMENT_MAX_BYTES`] starts only when
    /// nothing else of the disk is in flight, so a steady stream makes full segments.
    async fn start_segments(self: &Arc<Self>, disk: &DiskMeta, queue: &mut VecDeque<InFlight>) -> anyhow::Result<()> {
        let next_from =
            |queue: &VecDeque<InFlight>| queue.back().map(|f| f.plan.last_seq).unwrap_or(disk.uploaded_through) + 1;
        while queue.len() < SEGMENTS_IN_FLIGHT {
            let from = next_from(queue);
            let existing = self
                .journal
                .state
                .plans
                .read()
                .expect("lock")
                .get(&(disk.id, from))
                .copied();
            let Some(plan) = existing else { break };
            queue.push_back(self.spawn(plan, 0, from - 1));
        }
        let free = SEGMENTS_IN_FLIGHT - queue.len();
        let from = next_from(queue);
        let committed = self.journal.disk(&disk.machine, &disk.disk).map(|d| d.next_seq - 1);
        if free == 0 || committed.is_none_or(|c| c < from) {
            return Ok(());
        }
        // Spans from the journal's pointers only: each segment's task reads its payloads, so
        // reading one segment's records (from the log, past the hot tail) overlaps with
        // compressing the others instead of holding up this loop.
        let (journal, id, busy) = (self.journal.clone(), disk.id, !queue.is_empty());
        let spans = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, u64)>, JournalError> {
            let mut spans = Vec::new();
            let mut from = from;
            while spans.len() < free {
                let Some((first, last, raw)) = journal.span_records(id, from, SEGMENT_MAX_BYTES)? else {
                    break;
                };
                if (busy || !spans.is_empty()) && raw < SEGMENT_MAX_BYTES {
                    break;
                }
                spans.push((first, last));
                from = last + 1;
            }
            Ok(spans)
        })
        .await??;
        if spans.is_empty() {
            return Ok(());
        }
        // All in one round trip to the journal writer (usually one group commit, not one each).
        // A plan made before a restart may differ from its span: the journal returns that one,
        // and it is what gets uploaded; planning goes on at the next call.
        let (plans, err) = self.journal.plan_segments(id, &spans).await;
        for plan in plans {
            let from = next_from(queue);
            if plan.first_seq != from {
                break;
            }
            queue.push_back(self.spawn(plan, 0, from - 1));
        }
        match err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Puts `plan`'s segment again after a failure, after a backoff. Retried segments are the
    /// disk's oldest in flight and go back to the front of its queue: the segments after them
    /// still wait for their puts, and one already put before is put again with the same bytes.
    fn retry(self: &Arc<Self>, plan: SegmentPlan, attempt: u32) -> InFlight {
        self.spawn(plan, attempt, 0)
    }

    /// Spawns the work of one segment: read its records, compress, seal, put. Its put waits
    /// until the disk's segments through seq `after` are put.
    fn spawn(self: &Arc<Self>, plan: SegmentPlan, attempt: u32, after: u64) -> InFlight {
        let me = self.clone();
        let task = tokio::spawn(async move {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt - 1)).await;
                me.metrics.upload_retries.inc();
            }
            me.stage(plan, after).await
        });
        InFlight { plan, attempt, task }
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

    /// Reads, compresses, seals and puts the segment of `plan` (durably, for a local folder).
    async fn stage(&self, plan: SegmentPlan, after: u64) -> anyhow::Result<Staged> {
        let id = plan.disk_id;
        let disk = self
            .journal
            .disks()
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| anyhow::anyhow!("segment of unknown disk {id}"))?;
        let journal = self.journal.clone();
        let records =
            tokio::task::spawn_blocking(move || journal.read_records(id, plan.first_seq, plan.last_seq, usize::MAX))
                .await??;
        let expected = plan.last_seq - plan.first_seq + 1;
        if records.len() as u64 != expected || records.first().map(|r| r.seq) != Some(plan.first_seq) {
            anyhow::bail!(
                "journal of disk {id} holds {} of the {expected} records of seq {}..={}",
                records.len(),
                plan.first_seq,
                plan.last_seq
            );
        }
        let key = self.data_key(&disk, disk.key_id).await?;
        let raw: usize = records.iter().map(|r| r.chunk_len()).sum();
        let journal_bytes = records.iter().map(|r| r.encoded_len() + 4).sum::<usize>() as u64;
        let (machine, diskname, key_id) = (disk.machine.clone(), disk.disk.clone(), disk.key_id);
        let path = layout::segment(&disk.machine, &disk.disk, plan.first_seq, plan.last_seq);
        let name = path.to_string();
        let (bytes, entry, records, positions) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (_, bytes) = segment::build_segment(&machine, &diskname, key_id, plan.counter, &key, &records);
            let (index, _) = segment::SegmentIndex::from_object(&bytes, |_| Ok(key.clone()), &name)?;
            let positions = segment::record_positions(&records);
            let headers = records
                .into_iter()
                .map(|mut r| {
                    r.payload = bytes::Bytes::new();
                    // The catalogue indexes the write a packed one decompresses to.
                    if r.kind == RecordKind::PackedWrite {
                        r.kind = RecordKind::Write;
                    }
                    r
                })
                .collect::<Vec<_>>();
            Ok((
                bytes,
                catalog::SegmentEntry::from_index(&name, &index),
                headers,
                positions,
            ))
        })
        .await??;
        let len = bytes.len();
        // Only after every earlier segment of the disk is put (they may still be compressing).
        let order = self.put_order(&disk);
        order
            .subscribe()
            .wait_for(|through| *through >= after)
            .await
            .expect("the uploader holds the sender");
        self.blob.put_durable(&path, bytes).await?;
        order.send_modify(|through| *through = (*through).max(plan.last_seq));
        Ok(Staged {
            len,
            raw,
            journal_bytes,
            entry,
            records,
            positions,
        })
    }

    /// Catalogues put segments of one disk (consecutive, in sequence order) and lets the journal
    /// drop their records, in one round trip to the journal writer. Returns how many were
    /// finished (a prefix) and the error that stopped the rest, which are to be put again.
    async fn finish(&self, done: Vec<(SegmentPlan, Staged)>) -> (usize, Option<anyhow::Error>) {
        let n = done.len();
        let summary: Vec<(SegmentPlan, u64, usize, usize)> = done
            .iter()
            .map(|(plan, s)| (*plan, s.journal_bytes, s.len, s.raw))
            .collect();
        // The catalogue learns of each segment before the journal lets go of its records; both
        // writes share the WAL, so the synced journal update below makes these durable too.
        let db = self.journal.db().clone();
        let catalogued = tokio::task::spawn_blocking(move || -> (usize, Option<rocksdb::Error>) {
            for (i, (plan, staged)) in done.into_iter().enumerate() {
                let Staged {
                    entry,
                    records,
                    positions,
                    ..
                } = staged;
                let mut wb = rocksdb::WriteBatch::default();
                catalog::index_segment_at(
                    &db,
                    &mut wb,
                    plan.disk_id,
                    entry.first_seq,
                    &entry,
                    &records,
                    &positions,
                );
                if let Err(e) = db.write(wb) {
                    return (i, Some(e));
                }
            }
            (n, None)
        })
        .await;
        let (catalogued, mut err) = match catalogued {
            Ok((k, e)) => (k, e.map(anyhow::Error::from)),
            Err(e) => (0, Some(anyhow::anyhow!("catalogue task: {e}"))),
        };
        let uploads: Vec<(SegmentPlan, u64)> = summary[..catalogued].iter().map(|s| (s.0, s.1)).collect();
        let (finished, journal_err) = self.journal.segments_uploaded(&uploads).await;
        if let Some(e) = journal_err {
            err = Some(e.into());
        }
        for &(plan, journal_bytes, len, raw) in &summary[..finished] {
            self.metrics.uploaded_bytes.inc_by(len as u64);
            self.metrics.compressed_in_bytes.inc_by(raw as u64);
            self.metrics.segments_uploaded.inc();
            self.metrics.record_drained(journal_bytes);
            tracing::debug!(
                first_seq = plan.first_seq,
                last_seq = plan.last_seq,
                bytes = len,
                raw,
                "segment uploaded"
            );
        }
        self.metrics.cache_used_bytes.set(self.journal.cache_used() as i64);
        (finished, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::WrappedKey;
    use crate::journal::prepare;
    use crate::protocol::IngestRecord;
    use bytes::Bytes;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path as ObjectPath;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutOptions, PutResult,
    };

    /// A real in-memory store whose put of a disk's first segment is slow; it records the order
    /// in which segments become visible.
    #[derive(Debug, Default)]
    struct SlowFirstSegment {
        inner: InMemory,
        visible: std::sync::Mutex<Vec<(u64, u64)>>,
    }

    impl std::fmt::Display for SlowFirstSegment {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SlowFirstSegment({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for SlowFirstSegment {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            let segment = layout::parse_segment_name(location);
            if segment.is_some_and(|(first, _)| first == 1) {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            let r = self.inner.put_opts(location, payload, opts).await?;
            if let Some(range) = segment {
                self.visible.lock().unwrap().push(range);
            }
            Ok(r)
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }
        async fn delete(&self, location: &ObjectPath) -> object_store::Result<()> {
            self.inner.delete(location).await
        }
        fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_become_visible_in_sequence_order() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), 1 << 30).unwrap();
        let disk = journal.register_disk("m", "disk0", 1 << 30, 1).await.unwrap();
        // 40 MiB: two full segments compress side by side, the first one's put is slow.
        for batch in 1..=40u64 {
            let data = Bytes::from(vec![batch as u8; 1 << 20]);
            let record = prepare(IngestRecord::write("disk0", batch << 20, data), 1 << 30);
            journal.commit("m", 1, batch, vec![record]).await.unwrap();
        }
        let store = Arc::new(SlowFirstSegment::default());
        let kek = Key::random();
        let wrapped = WrappedKey::wrap(&kek, &Key::random(), "m", "disk0", disk.key_id);
        blob::put_wrapped_key(store.as_ref(), &wrapped).await.unwrap();
        let metrics = GatewayMetrics::new(&prometheus::Registry::new());
        let uploader = Arc::new(Uploader::new(
            journal.clone(),
            BlobStore::new(store.clone(), None),
            kek,
            metrics,
        ));
        let (stop, stopped) = watch::channel(false);
        let run = tokio::spawn(uploader.run(stopped));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while journal.cache_used() > 0 {
            assert!(std::time::Instant::now() < deadline, "the uploader never drained");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        run.await.unwrap();
        let visible = store.visible.lock().unwrap().clone();
        assert!(visible.len() >= 3, "several segments: {visible:?}");
        assert_eq!(visible[0].0, 1);
        for pair in visible.windows(2) {
            assert_eq!(pair[1].0, pair[0].1 + 1, "put out of order: {visible:?}");
        }
        assert_eq!(visible.last().unwrap().1, 40);
    }
}

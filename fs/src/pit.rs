//! Point-in-time views: a disk exactly as it was at a recovery point, read from the segments in
//! blob storage through the extent index (one `seek_for_prev` per block) and a bounded in-memory
//! cache of decompressed chunks, filled by ranged GETs with one fetch per chunk however many
//! readers ask for it at once.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use gateway::catalog::{self, ExtentVersion, SegmentEntry, INDEX_BLOCK};
use gateway::crypto::{self, Key};
use gateway::journal::{DiskMeta, Journal, RecoveryPoint};
use gateway::record::RecordKind;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::view::{DiskView, Extent};

/// `(disk id, segment first_seq, chunk index)`.
type ChunkKey = (u32, u64, u32);

#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<ChunkKey, Bytes> for ChunkWeight {
    fn weight(&self, _key: &ChunkKey, val: &Bytes) -> u64 {
        val.len().max(1) as u64
    }
}

/// Counters of the read side, for metrics and for tests that prove the cache works.
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub chunk_fetches: AtomicU64,
    pub chunk_hits: AtomicU64,
    pub fetched_bytes: AtomicU64,
}

/// A recovery point as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointInfo {
    pub id: u64,
    pub machine: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub time_ms: u64,
    /// `crash-consistent` or `app-consistent`.
    pub kind: String,
    pub label: String,
    pub seqs: std::collections::BTreeMap<String, u64>,
    /// Whether every disk's log up to the point is in blob storage (only then can it be read).
    pub readable: bool,
}

/// Shared state of every view: catalogue, blob store, keys and the chunk cache.
pub struct Reader {
    journal: Journal,
    store: Arc<dyn ObjectStore>,
    kek: Key,
    keys: Mutex<HashMap<(u32, u32), Key>>,
    segments: Mutex<HashMap<(u32, u64), Arc<SegmentEntry>>>,
    chunks: quick_cache::sync::Cache<ChunkKey, Bytes, ChunkWeight>,
    /// Open views per disk id: sequence number → how many. Retention leaves alone what an open
    /// view still reads.
    leases: Arc<Mutex<HashMap<u32, std::collections::BTreeMap<u64, usize>>>>,
    pub stats: ReaderStats,
}

/// Held by every open view; retention does not roll up past the oldest leased sequence.
struct Lease {
    leases: Arc<Mutex<HashMap<u32, std::collections::BTreeMap<u64, usize>>>>,
    disk_id: u32,
    seq: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut all = self.leases.lock().expect("lock");
        if let Some(seqs) = all.get_mut(&self.disk_id) {
            if let Some(n) = seqs.get_mut(&self.seq) {
                *n -= 1;
                if *n == 0 {
                    seqs.remove(&self.seq);
                }
            }
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub fn format_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Reader {
    /// `cache_bytes`: the most decompressed chunk bytes kept in memory.
    /// The blob storage the points are read from.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn new(journal: Journal, store: Arc<dyn ObjectStore>, kek: Key, cache_bytes: u64) -> Arc<Self> {
        let items = (cache_bytes / (1 << 20)).max(16) as usize;
        Arc::new(Self {
            journal,
            store,
            kek,
            keys: Mutex::new(HashMap::new()),
            segments: Mutex::new(HashMap::new()),
            chunks: quick_cache::sync::Cache::with_weighter(items, cache_bytes.max(16 << 20), ChunkWeight),
            leases: Arc::new(Mutex::new(HashMap::new())),
            stats: ReaderStats::default(),
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The machines that have disks, sorted.
    pub fn machines(&self) -> Vec<String> {
        let mut m: Vec<String> = self.journal.disks().into_iter().map(|d| d.machine).collect();
        m.sort();
        m.dedup();
        m
    }

    /// A machine's disks, by name.
    pub fn disks(&self, machine: &str) -> Vec<DiskMeta> {
        let mut d: Vec<DiskMeta> = self
            .journal
            .disks()
            .into_iter()
            .filter(|d| d.machine == machine)
            .collect();
        d.sort_by(|a, b| a.disk.cmp(&b.disk));
        d
    }

    fn info(&self, p: RecoveryPoint) -> PointInfo {
        let disks = self.disks(&p.machine);
        let readable = p.seqs.iter().all(|(name, seq)| {
            disks
                .iter()
                .find(|d| &d.disk == name)
                .is_some_and(|d| d.uploaded_through >= *seq)
        });
        PointInfo {
            id: p.id,
            time: format_time(p.time_ms),
            time_ms: p.time_ms,
            kind: p.kind,
            label: p.label,
            seqs: p.seqs,
            machine: p.machine,
            readable,
        }
    }

    /// A machine's recovery points, newest first (blocking: reads RocksDB).
    pub fn points(&self, machine: &str) -> io::Result<Vec<PointInfo>> {
        let mut points: Vec<PointInfo> = self
            .journal
            .points(machine)
            .map_err(other)?
            .into_iter()
            .map(|p| self.info(p))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse((p.time_ms, p.id)));
        Ok(points)
    }

    /// Resolves a point selector of `machine`: an id, `latest` (the newest readable point), or
    /// an RFC 3339 time (the newest readable point at or before it). Blocking.
    pub fn resolve(&self, machine: &str, selector: &str) -> io::Result<PointInfo> {
        let points = self.points(machine)?;
        let not_found = |what: String| io::Error::new(io::ErrorKind::NotFound, what);
        if selector == "latest" {
            return points
                .into_iter()
                .find(|p| p.readable)
                .ok_or_else(|| not_found(format!("{machine} has no readable recovery point yet")));
        }
        if let Ok(id) = selector.parse::<u64>() {
            let p = points
                .into_iter()
                .find(|p| p.id == id)
                .ok_or_else(|| not_found(format!("{machine} has no recovery point {id}")))?;
            if !p.readable {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("recovery point {id} of {machine} is still being uploaded"),
                ));
            }
            return Ok(p);
        }
        let at = humantime::parse_rfc3339_weak(selector).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("point {selector:?}: not an id, `latest` or an RFC 3339 time ({e})"),
            )
        })?;
        let at_ms = at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        points
            .into_iter()
            .find(|p| p.readable && p.time_ms <= at_ms)
            .ok_or_else(|| {
                not_found(format!(
                    "{machine} has no readable recovery point at or before {selector}"
                ))
            })
    }

    /// A view of `machine/disk` at `point`.
    pub fn view(self: &Arc<Self>, machine: &str, disk: &str, point: &PointInfo) -> io::Result<PointView> {
        let meta = self
            .journal
            .disk(machine, disk)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{machine} has no disk {disk}")))?;
        let seq = *point.seqs.get(disk).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("recovery point {} does not cover {machine}/{disk}", point.id),
            )
        })?;
        Ok(self.view_at(meta, seq))
    }

    /// A view of a disk at any sequence number (retention reads the base image's content this way).
    pub fn view_at(self: &Arc<Self>, disk: DiskMeta, seq: u64) -> PointView {
        *self
            .leases
            .lock()
            .expect("lock")
            .entry(disk.id)
            .or_default()
            .entry(seq)
            .or_default() += 1;
        let lease = Arc::new(Lease {
            leases: self.leases.clone(),
            disk_id: disk.id,
            seq,
        });
        PointView {
            reader: self.clone(),
            disk,
            seq,
            _lease: lease,
        }
    }

    /// The oldest sequence number an open view of `disk_id` reads, if any view is open.
    pub fn oldest_open_view(&self, disk_id: u32) -> Option<u64> {
        self.leases
            .lock()
            .expect("lock")
            .get(&disk_id)
            .and_then(|s| s.keys().next().copied())
    }

    /// Forgets cached catalogue entries of a disk (after retention replaced its segments).
    pub fn forget_segments(&self, disk_id: u32) {
        self.segments.lock().expect("lock").retain(|(d, _), _| *d != disk_id);
    }

    async fn data_key(&self, disk: &DiskMeta, key_id: u32) -> io::Result<Key> {
        if let Some(k) = self.keys.lock().expect("lock").get(&(disk.id, key_id)) {
            return Ok(k.clone());
        }
        let k = gateway::blob::get_data_key(self.store.as_ref(), &self.kek, &disk.machine, &disk.disk, key_id)
            .await
            .map_err(other)?
            .ok_or_else(|| {
                invalid(format!(
                    "data key {key_id} of {}/{} is missing",
                    disk.machine, disk.disk
                ))
            })?;
        self.keys.lock().expect("lock").insert((disk.id, key_id), k.clone());
        Ok(k)
    }

    /// A segment's catalogue entry: from memory, or read once from RocksDB on a blocking thread.
    async fn segment(&self, disk: &DiskMeta, first_seq: u64) -> io::Result<Arc<SegmentEntry>> {
        if let Some(s) = self.segments.lock().expect("lock").get(&(disk.id, first_seq)) {
            return Ok(s.clone());
        }
        let db = self.journal.db().clone();
        let id = disk.id;
        let found = tokio::task::spawn_blocking(move || catalog::segment(&db, id, first_seq))
            .await
            .map_err(other)?
            .map_err(other)?;
        let s = found.ok_or_else(|| {
            invalid(format!(
                "segment {first_seq} of {}/{} is not catalogued",
                disk.machine, disk.disk
            ))
        })?;
        let s = Arc::new(s);
        self.segments
            .lock()
            .expect("lock")
            .insert((disk.id, first_seq), s.clone());
        Ok(s)
    }

    /// The decompressed bytes of one chunk, from the cache or fetched (once) from blob storage.
    async fn chunk(&self, disk: &DiskMeta, segment: u64, chunk: u32) -> io::Result<Bytes> {
        let key = (disk.id, segment, chunk);
        let guard = match self.chunks.get_value_or_guard_async(&key).await {
            Ok(hit) => {
                self.stats.chunk_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(hit);
            }
            Err(guard) => guard,
        };
        let seg = self.segment(disk, segment).await?;
        let loc = *seg
            .chunks
            .get(chunk as usize)
            .ok_or_else(|| invalid(format!("{}: no chunk {chunk}", seg.path)))?;
        let key_bytes = self.data_key(disk, seg.key_id).await?;
        let path = object_store::path::Path::from(seg.path.as_str());
        let sealed = self
            .store
            .get_range(&path, loc.offset..loc.offset + loc.sealed_len as u64)
            .await
            .map_err(other)?;
        self.stats.chunk_fetches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fetched_bytes
            .fetch_add(sealed.len() as u64, Ordering::Relaxed);
        let seg2 = seg.clone();
        let raw = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let what = format!("{} (chunk {chunk})", seg2.path);
            let compressed = crypto::open(
                &key_bytes,
                crypto::chunk_nonce(seg2.counter, chunk),
                &seg2.header_bytes,
                &sealed,
                &what,
            )
            .map_err(|e| invalid(e.to_string()))?;
            let raw = zstd::bulk::decompress(&compressed, loc.raw_len as usize)
                .map_err(|e| invalid(format!("{what} does not decompress: {e}")))?;
            if raw.len() != loc.raw_len as usize {
                return Err(invalid(format!(
                    "{what}: {} bytes, index says {}",
                    raw.len(),
                    loc.raw_len
                )));
            }
            Ok(Bytes::from(raw))
        })
        .await
        .map_err(other)??;
        let _ = guard.insert(raw.clone());
        Ok(raw)
    }
}

/// One disk at one recovery point.
#[derive(Clone)]
pub struct PointView {
    reader: Arc<Reader>,
    disk: DiskMeta,
    seq: u64,
    _lease: Arc<Lease>,
}

impl PointView {
    pub fn disk(&self) -> &DiskMeta {
        &self.disk
    }

    fn block_len(size: u64) -> impl Fn(u64) -> u32 {
        move |b| (size - b * INDEX_BLOCK).min(INDEX_BLOCK) as u32
    }

    /// The versions of blocks `first..=last` this point sees (blocking RocksDB reads).
    async fn versions(&self, first: u64, last: u64) -> io::Result<Vec<Vec<ExtentVersion>>> {
        let db = self.reader.journal.db().clone();
        let (id, seq, size) = (self.disk.id, self.seq, self.disk.size);
        tokio::task::spawn_blocking(move || {
            catalog::block_versions(&db, id, first..last + 1, seq, Self::block_len(size))
        })
        .await
        .map_err(other)?
        .map_err(other)
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= self.disk.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read beyond the end of the disk"))?;
        let first = offset / INDEX_BLOCK;
        let last = (end - 1) / INDEX_BLOCK;
        let versions = self.versions(first, last).await?;
        // Fetch every chunk the range needs, concurrently, before assembling.
        let mut wanted: Vec<(u64, u32)> = versions
            .iter()
            .flatten()
            .filter(|v| v.kind == RecordKind::Write)
            .map(|v| (v.segment, v.chunk))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let fetched = futures::future::try_join_all(
            wanted
                .iter()
                .map(|&(seg, chunk)| self.reader.chunk(&self.disk, seg, chunk)),
        )
        .await?;
        let chunks: HashMap<(u64, u32), Bytes> = wanted.into_iter().zip(fetched).collect();
        // One version covering the whole request: hand out a slice of the cached chunk.
        if first == last {
            if let [v] = versions[0].as_slice() {
                let base = first * INDEX_BLOCK;
                let (lo, hi) = (offset - base, end - base);
                if v.kind == RecordKind::Write && v.start as u64 <= lo && hi <= v.end as u64 {
                    let c = &chunks[&(v.segment, v.chunk)];
                    let at = v.pos as usize + (lo - v.start as u64) as usize;
                    return c
                        .get(at..at + len)
                        .map(|_| c.slice(at..at + len))
                        .ok_or_else(|| invalid("extent points outside its chunk"));
                }
            }
        }
        let mut out = BytesMut::zeroed(len);
        for (i, block_versions) in versions.iter().enumerate() {
            let base = (first + i as u64) * INDEX_BLOCK;
            // Oldest first, so newer versions land on top.
            for v in block_versions.iter().rev() {
                let lo = (base + v.start as u64).max(offset);
                let hi = (base + v.end as u64).min(end);
                if lo >= hi {
                    continue;
                }
                let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                match v.kind {
                    RecordKind::Write => {
                        let c = &chunks[&(v.segment, v.chunk)];
                        let at = v.pos as usize + (lo - base - v.start as u64) as usize;
                        let src = c
                            .get(at..at + dst.len())
                            .ok_or_else(|| invalid("extent points outside its chunk"))?;
                        dst.copy_from_slice(src);
                    }
                    _ => dst.fill(0),
                }
            }
        }
        Ok(out.freeze())
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = (offset + len).min(self.disk.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let first = offset / INDEX_BLOCK;
        let last = (end - 1) / INDEX_BLOCK;
        let mut out: Vec<Extent> = Vec::new();
        // Bounded batches keep one call's memory small on huge disks.
        let mut b = first;
        while b <= last {
            let upto = (b + 4096).min(last + 1) - 1;
            let versions = self.versions(b, upto).await?;
            for (i, v) in versions.iter().enumerate() {
                let block = b + i as u64;
                let lo = (block * INDEX_BLOCK).max(offset);
                let hi = ((block + 1) * INDEX_BLOCK).min(end);
                let allocated = v.iter().any(|x| x.kind == RecordKind::Write);
                match out.last_mut() {
                    Some(e) if e.allocated == allocated && e.offset + e.len == lo => e.len += hi - lo,
                    _ => out.push(Extent {
                        offset: lo,
                        len: hi - lo,
                        allocated,
                    }),
                }
            }
            b = upto + 1;
        }
        Ok(out)
    }
}

impl DiskView for PointView {
    fn size(&self) -> u64 {
        self.disk.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(self.read(offset, len))
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
        Box::pin(self.allocation(offset, len))
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

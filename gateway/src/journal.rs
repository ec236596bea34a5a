//! The write-ahead journal over RocksDB: the process server's cache between the agents' acks and
//! blob storage. One writer thread owns every mutation and group-commits whatever arrived while
//! the previous `WriteBatch` was syncing, so many concurrent ingest batches share one WAL fsync.
//! An ack is sent only after the sync returned. Readers (the uploader, checksum queries) read the
//! database directly from blocking threads.
//!
//! Column families:
//! - `meta`: schema version, disks (`disk/MACHINE/DISK`), agent tokens, batch dedupe records,
//!   segment upload plans, recovery points, cache usage.
//! - `journal`: `disk_id u32 ‖ seq u64` → record (see `record`), deleted once its segment is in blob.
//!   Since schema 2 a record with a payload of 4 KiB or more is a pointer into the payload log
//!   (see [`paylog`]): the payload is written once, not to the WAL and again to a blob file.
//! - `checksums`: `disk_id u32 ‖ block u64` → 16-byte BLAKE3 prefix of the replica's block, for
//!   delta sync by checksum. Absent means the block is zeros.
//! - `segments`, `extents`: the read side's catalogue (see `catalog`), filled as segments land.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{oneshot, Notify};

use crate::protocol::{IngestRecord, RecordKind};
use crate::record::LogRecord;

pub mod hot;
pub mod paylog;

pub const CF_META: &str = "meta";
pub const CF_JOURNAL: &str = "journal";
pub const CF_CHECKSUMS: &str = "checksums";
const SCHEMA_KEY: &[u8] = b"schema";
/// 2: write payloads live in the payload log, the journal CF holds pointers to them.
const SCHEMA_VERSION: u32 = 2;
const CACHE_USED_KEY: &[u8] = b"cache_used";
const NEXT_DISK_KEY: &[u8] = b"next_disk_id";
const NEXT_POINT_KEY: &[u8] = b"next_point_id";

/// Checksum block size for delta sync: 64 KiB.
pub const BLOCK_SIZE: u64 = 64 * 1024;
/// Checksum value meaning "content unknown, always resend" (after a partial-block write).
pub const UNKNOWN_CHECKSUM: [u8; 16] = [0xff; 16];
/// Most bytes the writer folds into one group commit.
const GROUP_COMMIT_BYTES: usize = 32 << 20;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("journal schema version {found} is not supported (expected {SCHEMA_VERSION}): this journal was written by another Lifeboat release; let that release upload it (until the cache is empty), then remove the journal folder")]
    Schema { found: u32 },
    #[error("cache full: {used} of {max} bytes held; retry after the uploader frees space")]
    CacheFull { used: u64, max: u64 },
    #[error("unknown disk {machine}/{disk}: register it before sending writes")]
    UnknownDisk { machine: String, disk: String },
    #[error("write to {machine}/{disk} at {offset}+{len} is beyond the disk's {size} bytes")]
    OutOfRange {
        machine: String,
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{machine}/{disk} replicates to process server {process_server:?}; this catalogue only follows its log (assign the machine back and run `lifeboat index rebuild` to adopt it)")]
    Followed {
        machine: String,
        disk: String,
        process_server: String,
    },
    #[error("corrupt journal entry: {0}")]
    Corrupt(String),
    #[error("the journal writer has stopped")]
    Stopped,
}

/// What the journal knows of one disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskMeta {
    pub id: u32,
    pub machine: String,
    pub disk: String,
    pub size: u64,
    /// Data key generation used for new segments.
    pub key_id: u32,
    /// Next sequence number to assign.
    pub next_seq: u64,
    /// Every record with seq ≤ this is in blob storage and gone from the journal.
    pub uploaded_through: u64,
    /// Next segment counter (nonce prefix) to hand out.
    pub next_counter: u64,
    /// Empty: this appliance's process server writes the disk's log. Otherwise the scale-out
    /// process server that does: the config server only follows that log into its catalogue
    /// (`next_seq - 1 == uploaded_through` is how far), never ingests, segments or rolls it up.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub followed_from: String,
}

impl DiskMeta {
    /// Whether another process server writes this disk's log (see [`DiskMeta::followed_from`]).
    pub fn is_followed(&self) -> bool {
        !self.followed_from.is_empty()
    }
}

/// A segment upload in progress: persisted before the put so a restart re-uploads the very same
/// range with the very same counter (hence identical bytes).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentPlan {
    pub disk_id: u32,
    pub counter: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// A recovery point: one exact position in each of a machine's disk logs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecoveryPoint {
    pub id: u64,
    pub machine: String,
    pub time_ms: u64,
    pub kind: String,
    pub label: String,
    pub seqs: BTreeMap<String, u64>,
    /// The replication group whose members share this point id (empty: the machine alone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
}

/// The answer to a group point: its id and time, and each member's per-disk positions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupPointAck {
    pub point: u64,
    pub time_ms: u64,
    pub seqs: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The catalogue name of a point record's kind.
pub fn point_kind_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::CrashPoint => "crash-consistent",
        _ => "app-consistent",
    }
}

/// The answer to a committed batch: the highest sequence number per disk it was given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Ack {
    pub batch: u64,
    pub seqs: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u64>,
    /// True when this batch had been committed before (a retry) and nothing was written again.
    #[serde(default)]
    pub duplicate: bool,
}

/// An ingest record with its checksum updates computed off the writer thread.
#[derive(Debug, Clone)]
pub struct PreparedRecord {
    pub record: IngestRecord,
    /// `(block, checksum)`; `None` deletes the entry (the block is now zeros).
    pub checksums: Vec<(u64, Option<[u8; 16]>)>,
    /// The payload's CRC32C where already verified (by the batch decoder): the payload log's
    /// record checksum is then combined from it, with no second pass over the payload.
    pub payload_crc: Option<u32>,
}

impl PreparedRecord {
    /// Records the payload's verified CRC32C.
    pub fn with_payload_crc(mut self, crc: u32) -> Self {
        self.payload_crc = Some(crc);
        self
    }
}

/// Computes the checksum-table changes of a record: whole blocks get their BLAKE3 prefix (or
/// deletion when zeroed), partly covered blocks become unknown. The disk's last block may be
/// short; a record reaching the disk's end covers it whole.
pub fn prepare(record: IngestRecord, disk_size: u64) -> PreparedRecord {
    prepare_with_sums(record, disk_size, None)
}

/// Like [`prepare`], taking whole blocks' checksums from `sums` (16 bytes per block the record
/// touches, as the agent computed them for its diff) instead of hashing the data again.
pub fn prepare_with_sums(record: IngestRecord, disk_size: u64, sums: Option<&[u8]>) -> PreparedRecord {
    let mut checksums = Vec::new();
    if matches!(
        record.kind,
        RecordKind::Write | RecordKind::Zero | RecordKind::PackedWrite
    ) {
        let start = record.offset;
        let end = record.offset + record.len as u64;
        let first = start / BLOCK_SIZE;
        let last = (end.max(1) - 1) / BLOCK_SIZE;
        for block in first..=last {
            let bstart = block * BLOCK_SIZE;
            let bend = (bstart + BLOCK_SIZE).min(disk_size.max(end));
            let whole = start <= bstart && end >= bend;
            let value = if !whole {
                Some(UNKNOWN_CHECKSUM)
            } else if record.kind == RecordKind::Zero {
                None
            } else if let Some(sum) =
                sums.and_then(|s| s.get(((block - first) * 16) as usize..((block - first + 1) * 16) as usize))
            {
                Some(sum.try_into().expect("16 bytes"))
            } else if record.kind == RecordKind::PackedWrite {
                // The data is compressed and came without its checksums: the next sync resends.
                Some(UNKNOWN_CHECKSUM)
            } else {
                let data = &record.payload[(bstart - start) as usize..(bend - start) as usize];
                if is_zero(data) {
                    None
                } else {
                    Some(block_checksum(data))
                }
            };
            checksums.push((block, value));
        }
    }
    PreparedRecord {
        record,
        checksums,
        payload_crc: None,
    }
}

/// Whether `data` is all zero bytes. ORs 4 KiB at a time, which the compiler vectorises, where a
/// byte-wise `all` stops to test every byte (a fifth of the agent's scan time before).
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// The delta-sync checksum of one block.
pub fn block_checksum(data: &[u8]) -> [u8; 16] {
    let h = blake3::hash(data);
    h.as_bytes()[..16].try_into().expect("16 bytes")
}

enum Command {
    Commit {
        machine: String,
        session: u64,
        batch: u64,
        records: Vec<PreparedRecord>,
        bytes: usize,
        reply: oneshot::Sender<Result<Ack, JournalError>>,
    },
    RegisterDisk {
        machine: String,
        disk: String,
        size: u64,
        key_id: u32,
        reply: oneshot::Sender<Result<DiskMeta, JournalError>>,
    },
    PlanSegment {
        disk_id: u32,
        first_seq: u64,
        last_seq: u64,
        reply: oneshot::Sender<Result<SegmentPlan, JournalError>>,
    },
    Uploaded {
        plan: SegmentPlan,
        bytes: u64,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    AddToken {
        hash: [u8; 32],
        machine: String,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    ReserveCounters {
        disk_id: u32,
        n: u64,
        reply: oneshot::Sender<Result<(u32, u64), JournalError>>,
    },
    GroupPoint {
        group: String,
        machines: Vec<String>,
        kind: RecordKind,
        label: String,
        reply: oneshot::Sender<Result<GroupPointAck, JournalError>>,
    },
    PutFollowed {
        disk: DiskMeta,
        reply: oneshot::Sender<Result<DiskMeta, JournalError>>,
    },
}

/// Shared, read-mostly state; only the writer thread mutates it.
pub struct JournalState {
    pub disks: RwLock<BTreeMap<u32, DiskMeta>>,
    /// Segments being uploaded, by `(disk, first seq)`: several per disk, uploaded in order.
    pub plans: RwLock<BTreeMap<(u32, u64), SegmentPlan>>,
    pub cache_used: AtomicU64,
    pub max_bytes: u64,
    /// Woken after each commit, so the uploader starts at once.
    pub committed: Notify,
    /// Woken after each upload frees space, so held-back ingest can retry.
    pub freed: Notify,
    /// Committed records the uploader takes from memory (see [`hot`]).
    pub hot: hot::HotTail,
}

/// The journal handle: cheap to clone, usable from async code (the calls hand work to the writer
/// thread and await its answer).
#[derive(Clone)]
pub struct Journal {
    db: Arc<DB>,
    /// The payload log's folder (readers open its files themselves).
    log_dir: Arc<std::path::PathBuf>,
    /// Buffers of the payload log's read-backs, back once their records are uploaded.
    read_bufs: Arc<crate::pool::Pool<crate::direct_io::AlignedBuf>>,
    tx: Sender<Command>,
    pub state: Arc<JournalState>,
    _writer: Arc<WriterGuard>,
}

struct WriterGuard {
    tx: Option<Sender<Command>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn journal_key(disk_id: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&disk_id.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub fn checksum_key(disk_id: u32, block: u64) -> [u8; 12] {
    journal_key(disk_id, block)
}

fn disk_meta_key(machine: &str, disk: &str) -> Vec<u8> {
    format!("disk/{machine}/{disk}").into_bytes()
}

fn plan_key(disk_id: u32, first_seq: u64) -> Vec<u8> {
    format!("plan/{disk_id:08x}/{first_seq:016x}").into_bytes()
}

fn batch_key(machine: &str, session: u64, batch: u64) -> Vec<u8> {
    format!("batch/{machine}/{session:016x}/{batch:016x}").into_bytes()
}

/// The `meta` key of a recovery point (the catalogue follower writes followed machines' points).
pub fn point_key(machine: &str, id: u64) -> Vec<u8> {
    format!("point/{machine}/{id:016x}").into_bytes()
}

fn rollup_key(machine: &str) -> Vec<u8> {
    format!("rollup/{machine}").into_bytes()
}

fn token_key(hash: &[u8; 32]) -> Vec<u8> {
    format!("token/{}", hex::encode(hash)).into_bytes()
}

fn u64_value(v: Option<Vec<u8>>) -> u64 {
    v.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// A journal record in hand (from the hot tail or inline), or where it lies in the payload log.
enum Slot {
    Ready(LogRecord),
    Logged(paylog::Pointer),
}

impl Slot {
    /// What the record counts against a read's byte budget: its payload, with the log header
    /// when it is still in the log.
    fn len(&self) -> usize {
        match self {
            Slot::Ready(r) => r.payload.len(),
            Slot::Logged(p) => p.len as usize,
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal in `path` with a cache limit of `max_bytes`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, JournalError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_bytes_per_sync(8 << 20);
        // The small meta and checksum memtables would otherwise pin every WAL file until they
        // fill: past this size RocksDB flushes them so old logs can go.
        db_opts.set_max_total_wal_size(512 << 20);
        let mut journal_opts = Options::default();
        journal_opts.set_compression_type(rocksdb::DBCompressionType::None);
        // Journal values are small (payload pointers, zero ranges, points): the payloads
        // themselves are in the payload log. Entries live for seconds, so most are deleted (by
        // the uploader's range delete) before a flush.
        journal_opts.set_write_buffer_size(64 << 20);
        journal_opts.set_max_write_buffer_number(4);
        journal_opts.set_target_file_size_base(64 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_JOURNAL, journal_opts),
            ColumnFamilyDescriptor::new(CF_CHECKSUMS, Options::default()),
            ColumnFamilyDescriptor::new(crate::catalog::CF_SEGMENTS, Options::default()),
            ColumnFamilyDescriptor::new(crate::catalog::CF_EXTENTS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match db.get_cf(meta, SCHEMA_KEY)? {
            Some(v) => {
                let found = v.try_into().ok().map(u32::from_be_bytes).unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(JournalError::Schema { found });
                }
            }
            None => {
                // A database without a schema key is new only if it holds no journal entries.
                let journal = db.cf_handle(CF_JOURNAL).expect("journal cf");
                if db.iterator_cf(journal, IteratorMode::Start).next().is_some() {
                    return Err(JournalError::Schema { found: 0 });
                }
                db.put_cf(meta, SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes())?
            }
        }
        // Every live payload pointer, so the payload log keeps exactly the files they need.
        let mut live = Vec::new();
        {
            let journal = db.cf_handle(CF_JOURNAL).expect("journal cf");
            for item in db.iterator_cf(journal, IteratorMode::Start) {
                let (k, v) = item?;
                if let Some(p) = paylog::Pointer::decode(&v) {
                    let p = p?;
                    if k.len() != 12 {
                        return Err(JournalError::Corrupt(format!("journal key of {} bytes", k.len())));
                    }
                    let disk = u32::from_be_bytes(k[..4].try_into().expect("4"));
                    let seq = u64::from_be_bytes(k[4..12].try_into().expect("8"));
                    live.push((disk, seq, p));
                }
            }
        }
        let log = paylog::PayloadLog::open(path.join(paylog::DIR), live.into_iter())?;
        let log_dir = log.dir().to_path_buf();
        let mut disks = BTreeMap::new();
        for item in db.prefix_iterator_cf(meta, b"disk/") {
            let (k, v) = item?;
            if !k.starts_with(b"disk/") {
                break;
            }
            let d: DiskMeta =
                serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("disk record: {e}")))?;
            disks.insert(d.id, d);
        }
        let mut plans = BTreeMap::new();
        for item in db.prefix_iterator_cf(meta, b"plan/") {
            let (k, v) = item?;
            if !k.starts_with(b"plan/") {
                break;
            }
            let p: SegmentPlan =
                serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("plan record: {e}")))?;
            if *k != *plan_key(p.disk_id, p.first_seq) {
                // Before several plans per disk, a disk's one plan was `plan/DISK`.
                let mut wb = WriteBatch::default();
                wb.delete_cf(meta, &k);
                wb.put_cf(meta, plan_key(p.disk_id, p.first_seq), &v);
                db.write(wb)?;
            }
            plans.insert((p.disk_id, p.first_seq), p);
        }
        let cache_used = u64_value(db.get_cf(meta, CACHE_USED_KEY)?);
        let db = Arc::new(db);
        let state = Arc::new(JournalState {
            disks: RwLock::new(disks),
            plans: RwLock::new(plans),
            cache_used: AtomicU64::new(cache_used),
            max_bytes,
            committed: Notify::new(),
            freed: Notify::new(),
            hot: hot::HotTail::default(),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let writer = Writer {
            db: db.clone(),
            state: state.clone(),
            log: RefCell::new(log),
        };
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawn journal writer");
        Ok(Self {
            db,
            tx: tx.clone(),
            state,
            log_dir: Arc::new(log_dir),
            // A few segments' worth in flight; at most this many idle.
            read_bufs: crate::pool::Pool::new(2),
            _writer: Arc::new(WriterGuard {
                tx: Some(tx),
                handle: Some(handle),
            }),
        })
    }

    /// Compacts the journal column family so that uploaded (deleted) entries are dropped from
    /// disk now rather than at the next automatic compaction (blocking). Payload log files go
    /// as soon as their records are uploaded, without compaction.
    pub fn compact(&self) {
        let cf = self.db.cf_handle(CF_JOURNAL).expect("journal cf");
        self.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Command,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| JournalError::Stopped)?;
        rx.await.map_err(|_| JournalError::Stopped)?
    }

    /// Sends several commands at once, so the writer usually takes them into one group, then
    /// waits for their answers in order: the answers before the first failure, and that failure.
    async fn call_many<T, F>(&self, makes: impl Iterator<Item = F>) -> (Vec<T>, Option<JournalError>)
    where
        F: FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Command,
    {
        let mut replies = Vec::new();
        for make in makes {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(make(reply)).is_err() {
                replies.push(None);
                break;
            }
            replies.push(Some(rx));
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            match rx {
                Some(rx) => match rx.await {
                    Ok(Ok(v)) => out.push(v),
                    Ok(Err(e)) => return (out, Some(e)),
                    Err(_) => return (out, Some(JournalError::Stopped)),
                },
                None => return (out, Some(JournalError::Stopped)),
            }
        }
        (out, None)
    }

    /// Commits a batch durably (synced WAL) and returns its ack. A batch already committed under
    /// the same `(machine, session, batch)` returns the original ack without writing again.
    pub async fn commit(
        &self,
        machine: &str,
        session: u64,
        batch: u64,
        records: Vec<PreparedRecord>,
    ) -> Result<Ack, JournalError> {
        let bytes = records.iter().map(|r| r.record.payload.len() + 64).sum();
        self.call(|reply| Command::Commit {
            machine: machine.to_owned(),
            session,
            batch,
            records,
            bytes,
            reply,
        })
        .await
    }

    /// Registers a disk (or updates its size). `key_id` is used only for a new disk.
    pub async fn register_disk(
        &self,
        machine: &str,
        disk: &str,
        size: u64,
        key_id: u32,
    ) -> Result<DiskMeta, JournalError> {
        self.call(|reply| Command::RegisterDisk {
            machine: machine.to_owned(),
            disk: disk.to_owned(),
            size,
            key_id,
            reply,
        })
        .await
    }

    /// Stores a followed disk's record (see [`DiskMeta::followed_from`]) through the writer, so
    /// it never races with ingest: `id` 0 gives a new disk the next id. Refused for a disk this
    /// appliance's own process server writes.
    pub async fn put_followed_disk(&self, disk: DiskMeta) -> Result<DiskMeta, JournalError> {
        self.call(|reply| Command::PutFollowed { disk, reply }).await
    }

    pub async fn plan_segment(&self, disk_id: u32, first_seq: u64, last_seq: u64) -> Result<SegmentPlan, JournalError> {
        self.call(|reply| Command::PlanSegment {
            disk_id,
            first_seq,
            last_seq,
            reply,
        })
        .await
    }

    /// Plans consecutive segments of a disk, `spans` in order (`(first_seq, last_seq)` each), in
    /// one round trip: the commands are queued together, so they usually share one group commit
    /// instead of waiting for one each. Returns the plans made before the first failure, and it.
    pub async fn plan_segments(&self, disk_id: u32, spans: &[(u64, u64)]) -> (Vec<SegmentPlan>, Option<JournalError>) {
        self.call_many(spans.iter().map(|&(first_seq, last_seq)| {
            move |reply| Command::PlanSegment {
                disk_id,
                first_seq,
                last_seq,
                reply,
            }
        }))
        .await
    }

    /// Reserves `n` segment counters (nonce prefixes) of a disk for segments written outside the
    /// upload path (retention's base image); returns the disk's current key id and the first
    /// counter. The reservation is synced before the answer, so a counter is never handed out twice.
    pub async fn reserve_counters(&self, disk_id: u32, n: u64) -> Result<(u32, u64), JournalError> {
        self.call(|reply| Command::ReserveCounters { disk_id, n, reply }).await
    }

    /// Drops a segment's records from the journal once it is durable in blob storage; `bytes` is
    /// what they took in the journal (the sum of their journal value lengths).
    pub async fn segment_uploaded(&self, plan: SegmentPlan, bytes: u64) -> Result<(), JournalError> {
        self.call(|reply| Command::Uploaded { plan, bytes, reply }).await
    }

    /// [`Journal::segment_uploaded`] for consecutive segments (`(plan, bytes)` each, in order) in
    /// one round trip: the commands are queued together and usually share one group commit.
    /// Returns how many succeeded (a prefix) and the error that stopped the rest.
    pub async fn segments_uploaded(&self, done: &[(SegmentPlan, u64)]) -> (usize, Option<JournalError>) {
        let (ok, err) = self
            .call_many(
                done.iter()
                    .map(|&(plan, bytes)| move |reply| Command::Uploaded { plan, bytes, reply }),
            )
            .await;
        (ok.len(), err)
    }

    /// Cuts one recovery point shared by `machines` (a replication group's members), at one
    /// position of the serial log order: every write acked before it is in it on every member,
    /// none acked after. Machines without disks get no point. `kind` is CrashPoint or Bookmark.
    pub async fn group_point(
        &self,
        group: &str,
        machines: &[String],
        kind: RecordKind,
        label: &str,
    ) -> Result<GroupPointAck, JournalError> {
        self.call(|reply| Command::GroupPoint {
            group: group.to_owned(),
            machines: machines.to_vec(),
            kind,
            label: label.to_owned(),
            reply,
        })
        .await
    }

    /// Cuts a crash-consistent group point when any member took writes since the group's last
    /// point; `None` when nothing changed or the cache is full (the next round retries).
    pub async fn cut_group_crash_point(&self, group: &str, machines: &[String]) -> Result<Option<u64>, JournalError> {
        let me = self.clone();
        let ms = machines.to_vec();
        let lasts = tokio::task::spawn_blocking(move || {
            ms.iter()
                .map(|m| me.last_point(m).map(|p| (m.clone(), p)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|_| JournalError::Stopped)??;
        let disks = self.disks();
        let changed = lasts.iter().any(|(m, last)| {
            disks
                .iter()
                .filter(|d| &d.machine == m)
                .any(|d| d.next_seq - 1 > last.as_ref().and_then(|p| p.seqs.get(&d.disk)).copied().unwrap_or(0))
        });
        if !changed {
            return Ok(None);
        }
        let with_disks: Vec<String> = lasts
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| disks.iter().any(|d| &d.machine == m))
            .collect();
        match self.group_point(group, &with_disks, RecordKind::CrashPoint, "").await {
            Ok(ack) => Ok(Some(ack.point)),
            Err(JournalError::CacheFull { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores an agent token's hash for `machine`.
    pub async fn add_token(&self, hash: [u8; 32], machine: &str) -> Result<(), JournalError> {
        self.call(|reply| Command::AddToken {
            hash,
            machine: machine.to_owned(),
            reply,
        })
        .await
    }

    /// The machine a token hash belongs to (blocking read).
    pub fn token_machine(&self, hash: &[u8; 32]) -> Result<Option<String>, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        Ok(self
            .db
            .get_cf(meta, token_key(hash))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn disk(&self, machine: &str, disk: &str) -> Option<DiskMeta> {
        self.state
            .disks
            .read()
            .expect("lock")
            .values()
            .find(|d| d.machine == machine && d.disk == disk)
            .cloned()
    }

    pub fn disks(&self) -> Vec<DiskMeta> {
        self.state.disks.read().expect("lock").values().cloned().collect()
    }

    pub fn cache_used(&self) -> u64 {
        self.state.cache_used.load(Ordering::Relaxed)
    }

    /// The replica's block checksums for a disk, 16 bytes per block, zeros for absent blocks
    /// (blocking read).
    pub fn checksums(&self, disk: &DiskMeta) -> Result<Vec<u8>, JournalError> {
        let blocks = disk.size.div_ceil(BLOCK_SIZE);
        let mut out = vec![0u8; (blocks * 16) as usize];
        let cf = self.db.cf_handle(CF_CHECKSUMS).expect("checksums cf");
        let start = checksum_key(disk.id, 0);
        for item in self.db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if k[..4] != disk.id.to_be_bytes() {
                break;
            }
            let block = u64::from_be_bytes(k[4..12].try_into().expect("8"));
            if block < blocks && v.len() == 16 {
                out[(block * 16) as usize..(block * 16 + 16) as usize].copy_from_slice(&v);
            }
        }
        Ok(out)
    }

    /// The run of journal records of a disk from `first` that [`Journal::read_records`] would
    /// return for `max_bytes`, as `(first seq, last seq, bytes counted against max_bytes)`, from
    /// the journal's keys and payload pointers alone: the uploader plans a segment with it and
    /// leaves reading the payloads to the segment's own task (blocking read). `None` when
    /// nothing is there.
    pub fn span_records(
        &self,
        disk_id: u32,
        first: u64,
        max_bytes: usize,
    ) -> Result<Option<(u64, u64, usize)>, JournalError> {
        let slots = self.slots(disk_id, first, u64::MAX, max_bytes)?;
        let bytes = slots.iter().map(|(_, s)| s.len()).sum();
        Ok(slots.first().zip(slots.last()).map(|((f, _), (l, _))| (*f, *l, bytes)))
    }

    /// The records of a disk with `seq` in `[first, last]`, up to and including the one that
    /// brings them to `max_bytes`: in hand (from the hot tail or inline) or where each lies in
    /// the payload log (blocking read of RocksDB only).
    fn slots(&self, disk_id: u32, first: u64, last: u64, max_bytes: usize) -> Result<Vec<(u64, Slot)>, JournalError> {
        let cf = self.db.cf_handle(CF_JOURNAL).expect("journal cf");
        let start = journal_key(disk_id, first);
        let mut slots = Vec::new();
        let mut bytes = 0;
        for item in self.db.iterator_cf(cf, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if k[..4] != disk_id.to_be_bytes() {
                break;
            }
            let seq = u64::from_be_bytes(k[4..12].try_into().expect("8"));
            if seq > last {
                break;
            }
            let corrupt = |e: String| JournalError::Corrupt(format!("disk {disk_id} seq {seq}: {e}"));
            let pointer = paylog::Pointer::decode(&v);
            // A payload still in the hot tail is taken from memory, not read back from the log.
            let hot = pointer.as_ref().and_then(|_| self.state.hot.get(disk_id, seq));
            let slot = match (hot, pointer) {
                (Some(r), _) => Slot::Ready(r),
                (None, None) => Slot::Ready(LogRecord::from_journal_value(&v).map_err(|e| corrupt(e.to_string()))?),
                (None, Some(p)) => Slot::Logged(p.map_err(|e| corrupt(e.to_string()))?),
            };
            bytes += slot.len();
            slots.push((seq, slot));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(slots)
    }

    /// Reads journal records of a disk with `seq` in `[first, last]`, stopping early once
    /// `max_bytes` of payload are collected (blocking read).
    pub fn read_records(
        &self,
        disk_id: u32,
        first: u64,
        last: u64,
        max_bytes: usize,
    ) -> Result<Vec<LogRecord>, JournalError> {
        let slots = self.slots(disk_id, first, last, max_bytes)?;
        // The logged ones in as few reads as their placement allows.
        let pointers: Vec<paylog::Pointer> = slots
            .iter()
            .filter_map(|(_, s)| match s {
                Slot::Logged(p) => Some(*p),
                Slot::Ready(_) => None,
            })
            .collect();
        let mut loaded = paylog::read_many(&self.log_dir, &pointers, &self.read_bufs).into_iter();
        let mut out = Vec::with_capacity(slots.len());
        for (seq, slot) in slots {
            let r = match slot {
                Slot::Ready(r) => r,
                Slot::Logged(p) => match loaded.next().expect("one result a pointer") {
                    Ok(r) => r,
                    // Uploaded (and its file deleted or recycled) since the iterator started.
                    Err(_) if self.uploaded(disk_id, seq) => break,
                    Err(e) => {
                        return Err(JournalError::Corrupt(format!(
                            "disk {disk_id} seq {seq}: payload log file {}: {e}",
                            p.file
                        )))
                    }
                },
            };
            if r.seq != seq {
                return Err(JournalError::Corrupt(format!(
                    "disk {disk_id}: key seq {seq} holds record seq {}",
                    r.seq
                )));
            }
            out.push(r);
        }
        Ok(out)
    }

    fn uploaded(&self, disk_id: u32, seq: u64) -> bool {
        self.state
            .disks
            .read()
            .expect("lock")
            .get(&disk_id)
            .is_some_and(|d| d.uploaded_through >= seq)
    }

    /// Adds rebuilt disks and points straight to the database, for `index rebuild` on a journal
    /// that nothing else writes to (the appliance is not running). Synced (blocking).
    pub fn restore_offline(&self, disks: &[DiskMeta], points: &[RecoveryPoint]) -> Result<(), JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        let next_disk = u64_value(self.db.get_cf(meta, NEXT_DISK_KEY)?);
        let max_disk = disks.iter().map(|d| d.id as u64 + 1).max().unwrap_or(0);
        wb.put_cf(meta, NEXT_DISK_KEY, next_disk.max(max_disk).to_be_bytes());
        for d in disks {
            wb.put_cf(
                meta,
                disk_meta_key(&d.machine, &d.disk),
                serde_json::to_vec(d).expect("json"),
            );
        }
        let next_point = u64_value(self.db.get_cf(meta, NEXT_POINT_KEY)?);
        let max_point = points.iter().map(|p| p.id + 1).max().unwrap_or(0);
        wb.put_cf(meta, NEXT_POINT_KEY, next_point.max(max_point).to_be_bytes());
        for p in points {
            wb.put_cf(meta, point_key(&p.machine, p.id), serde_json::to_vec(p).expect("json"));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        let mut state = self.state.disks.write().expect("lock");
        for d in disks {
            state.insert(d.id, d.clone());
        }
        Ok(())
    }

    /// The id a new disk would get (for offline rebuild).
    pub fn next_disk_id(&self) -> Result<u32, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let stored = u64_value(self.db.get_cf(meta, NEXT_DISK_KEY)?) as u32;
        let used = self.disks().iter().map(|d| d.id + 1).max().unwrap_or(1);
        Ok(stored.max(used).max(1))
    }

    /// Removes recovery points from the catalogue (retention), synced (blocking).
    pub fn drop_points(&self, machine: &str, ids: &[u64]) -> Result<(), JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        for id in ids {
            wb.delete_cf(meta, point_key(machine, *id));
        }
        // Retention rolls the machine's log up until this is cleared.
        wb.put_cf(meta, rollup_key(machine), b"1");
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    /// Whether points of `machine` were dropped and its log not yet rolled up (blocking read).
    pub fn rollup_pending(&self, machine: &str) -> Result<bool, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        Ok(self.db.get_cf(meta, rollup_key(machine))?.is_some())
    }

    /// Marks `machine`'s roll-up done (blocking, synced).
    pub fn clear_rollup(&self, machine: &str) -> Result<(), JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        wb.delete_cf(meta, rollup_key(machine));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    /// The newest recovery point of a machine (blocking read).
    pub fn last_point(&self, machine: &str) -> Result<Option<RecoveryPoint>, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let prefix = format!("point/{machine}/").into_bytes();
        let mut it = self.db.raw_iterator_cf(meta);
        // '~' sorts after every hex digit of the point ids.
        it.seek_for_prev(format!("point/{machine}/~"));
        match (it.key(), it.value()) {
            (Some(k), Some(v)) if k.starts_with(&prefix) => Ok(Some(
                serde_json::from_slice(v).map_err(|e| JournalError::Corrupt(format!("point: {e}")))?,
            )),
            _ => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// Cuts a crash-consistent point for `machine` if any of its disks took writes since its last
    /// point; returns the new point's id. A full cache skips this round (blocking read, then a
    /// commit through the writer).
    pub async fn cut_crash_point(&self, machine: &str) -> Result<Option<u64>, JournalError> {
        let me = self.clone();
        let m = machine.to_owned();
        let last = tokio::task::spawn_blocking(move || me.last_point(&m))
            .await
            .map_err(|_| JournalError::Stopped)??;
        let changed = self.disks().iter().filter(|d| d.machine == machine).any(|d| {
            let written_through = d.next_seq - 1;
            written_through > last.as_ref().and_then(|p| p.seqs.get(&d.disk)).copied().unwrap_or(0)
        });
        if !changed {
            return Ok(None);
        }
        let batch = u64::from_be_bytes(rand::random::<[u8; 8]>());
        let record = prepare(IngestRecord::crash_point(), 0);
        match self.commit(machine, 0, batch, vec![record]).await {
            Ok(ack) => Ok(ack.point),
            Err(JournalError::CacheFull { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Recovery points of a machine, oldest first (blocking read).
    pub fn points(&self, machine: &str) -> Result<Vec<RecoveryPoint>, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let prefix = format!("point/{machine}/").into_bytes();
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("point: {e}")))?);
        }
        Ok(out)
    }
}

/// An answer held back until the group's `WriteBatch` is synced; it is given the write error,
/// if any, which then replaces the answer.
type DeferredReply = Box<dyn FnOnce(Option<&str>)>;

fn deferred_reply<T: 'static>(
    reply: oneshot::Sender<Result<T, JournalError>>,
    r: Result<T, JournalError>,
) -> DeferredReply {
    Box::new(move |write_error| {
        let _ = reply.send(match write_error {
            Some(e) => Err(JournalError::Corrupt(e.to_owned())),
            None => r,
        });
    })
}

struct Writer {
    db: Arc<DB>,
    state: Arc<JournalState>,
    /// Only the writer thread touches it.
    log: RefCell<paylog::PayloadLog>,
}

/// Per-group scratch state: disk metadata changed by this group, not yet published.
struct Group<'a> {
    wb: WriteBatch,
    disks: HashMap<u32, DiskMeta>,
    acks: HashMap<Vec<u8>, Ack>,
    cache_used: u64,
    next_point: Option<u64>,
    db: &'a DB,
    /// Records appended to the payload log, for the hot tail once the group is durable.
    hot: Vec<(u32, LogRecord)>,
}

impl Writer {
    fn run(self, rx: Receiver<Command>) {
        while let Ok(first) = rx.recv() {
            let mut cmds = vec![first];
            let mut bytes = 0usize;
            while bytes < GROUP_COMMIT_BYTES {
                match rx.try_recv() {
                    Ok(c) => {
                        if let Command::Commit { bytes: b, .. } = &c {
                            bytes += b;
                        }
                        cmds.push(c)
                    }
                    Err(_) => break,
                }
            }
            self.process(cmds);
        }
    }

    fn process(&self, cmds: Vec<Command>) {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let mut g = Group {
            wb: WriteBatch::default(),
            disks: HashMap::new(),
            acks: HashMap::new(),
            cache_used: self.state.cache_used.load(Ordering::Relaxed),
            next_point: None,
            db: &self.db,
            hot: Vec::new(),
        };
        let mut replies: Vec<DeferredReply> = Vec::new();
        // A new payload log file, if due, before any commit of the group appends to it.
        let log_error = self.log.borrow_mut().rotate_if_needed().err().map(|e| e.to_string());
        if let Some(e) = &log_error {
            tracing::error!(error = %e, "payload log unavailable: batches are refused");
        }
        let mut new_plans = Vec::new();
        let mut done_plans = Vec::new();
        let mut committed_any = false;
        let mut freed_any = false;
        for cmd in cmds {
            match cmd {
                Command::Commit {
                    machine,
                    session,
                    batch,
                    records,
                    bytes,
                    reply,
                } => {
                    let r = match &log_error {
                        Some(e) => Err(JournalError::Corrupt(e.clone())),
                        None => self.commit(&mut g, &machine, session, batch, records, bytes as u64),
                    };
                    committed_any |= r.is_ok();
                    replies.push(deferred_reply(reply, r));
                }
                Command::RegisterDisk {
                    machine,
                    disk,
                    size,
                    key_id,
                    reply,
                } => {
                    let r = self.register_disk(&mut g, &machine, &disk, size, key_id);
                    replies.push(deferred_reply(reply, r));
                }
                Command::ReserveCounters { disk_id, n, reply } => {
                    let r = match self.disk_mut(&mut g, disk_id) {
                        Some(d) => {
                            let first = d.next_counter;
                            d.next_counter += n;
                            Ok((d.key_id, first))
                        }
                        None => Err(JournalError::Corrupt(format!("counters for unknown disk {disk_id}"))),
                    };
                    replies.push(deferred_reply(reply, r));
                }
                Command::PlanSegment {
                    disk_id,
                    first_seq,
                    last_seq,
                    reply,
                } => {
                    let r = self.plan(&mut g, &new_plans, disk_id, first_seq, last_seq);
                    if let Ok(p) = &r {
                        new_plans.push(*p);
                    }
                    replies.push(deferred_reply(reply, r));
                }
                Command::Uploaded { plan, bytes, reply } => {
                    let r = self.uploaded(&mut g, plan, bytes);
                    if r.is_ok() {
                        done_plans.push(plan);
                        freed_any = true;
                    }
                    replies.push(deferred_reply(reply, r));
                }
                Command::GroupPoint {
                    group,
                    machines,
                    kind,
                    label,
                    reply,
                } => {
                    let r = self.group_point(&mut g, &group, &machines, kind, &label);
                    committed_any |= r.is_ok();
                    replies.push(deferred_reply(reply, r));
                }
                Command::PutFollowed { disk, reply } => {
                    let r = self.put_followed(&mut g, disk);
                    replies.push(deferred_reply(reply, r));
                }
                Command::AddToken { hash, machine, reply } => {
                    g.wb.put_cf(meta, token_key(&hash), machine.as_bytes());
                    replies.push(deferred_reply(reply, Ok(())));
                }
            }
        }
        for d in g.disks.values() {
            g.wb.put_cf(
                meta,
                disk_meta_key(&d.machine, &d.disk),
                serde_json::to_vec(d).expect("json"),
            );
        }
        g.wb.put_cf(meta, CACHE_USED_KEY, g.cache_used.to_be_bytes());
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        // Payloads first: a pointer is durable only after the bytes it points at.
        let result = match self.log.borrow_mut().sync_group() {
            Ok(()) => self.db.write_opt(g.wb, &wo).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let err = result.as_ref().err().map(|e| format!("journal write failed: {e}"));
        if err.is_none() {
            {
                let mut disks = self.state.disks.write().expect("lock");
                for (id, d) in g.disks {
                    disks.insert(id, d);
                }
            }
            {
                let mut plans = self.state.plans.write().expect("lock");
                for p in new_plans {
                    plans.insert((p.disk_id, p.first_seq), p);
                }
                for p in &done_plans {
                    plans.remove(&(p.disk_id, p.first_seq));
                }
            }
            self.state.cache_used.store(g.cache_used, Ordering::Relaxed);
            self.state.hot.insert(g.hot);
            for p in &done_plans {
                self.state.hot.release_through(p.disk_id, p.last_seq);
            }
            if freed_any {
                let disks = self.state.disks.read().expect("lock");
                self.log.borrow_mut().reclaim(&disks);
            }
        } else {
            tracing::error!(error = err.as_deref().unwrap_or(""), "journal group commit failed");
        }
        for reply in replies {
            reply(err.as_deref());
        }
        if committed_any {
            self.state.committed.notify_waiters();
            self.state.committed.notify_one();
        }
        if freed_any {
            self.state.freed.notify_waiters();
        }
    }

    fn disk_mut<'g>(&self, g: &'g mut Group, id: u32) -> Option<&'g mut DiskMeta> {
        if let std::collections::hash_map::Entry::Vacant(e) = g.disks.entry(id) {
            e.insert(self.state.disks.read().expect("lock").get(&id).cloned()?);
        }
        g.disks.get_mut(&id)
    }

    /// Assigns the next sequence number of disk `id`; returns it and the disk's name.
    fn take_seq(&self, g: &mut Group, id: u32) -> (u64, String) {
        let d = self.disk_mut(g, id).expect("validated disk");
        let seq = d.next_seq;
        d.next_seq += 1;
        (seq, d.disk.clone())
    }

    fn find_disk(&self, g: &Group, machine: &str, disk: &str) -> Option<u32> {
        g.disks
            .values()
            .find(|d| d.machine == machine && d.disk == disk)
            .map(|d| d.id)
            .or_else(|| {
                self.state
                    .disks
                    .read()
                    .expect("lock")
                    .values()
                    .find(|d| d.machine == machine && d.disk == disk)
                    .map(|d| d.id)
            })
    }

    fn machine_disks(&self, g: &Group, machine: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .state
            .disks
            .read()
            .expect("lock")
            .values()
            .filter(|d| d.machine == machine && !d.is_followed())
            .map(|d| d.id)
            .collect();
        ids.extend(
            g.disks
                .values()
                .filter(|d| d.machine == machine && !d.is_followed())
                .map(|d| d.id),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn commit(
        &self,
        g: &mut Group,
        machine: &str,
        session: u64,
        batch: u64,
        records: Vec<PreparedRecord>,
        bytes: u64,
    ) -> Result<Ack, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let journal = self.db.cf_handle(CF_JOURNAL).expect("journal cf");
        let sums = self.db.cf_handle(CF_CHECKSUMS).expect("checksums cf");
        let bkey = batch_key(machine, session, batch);
        if let Some(ack) = g.acks.get(&bkey) {
            return Ok(Ack {
                duplicate: true,
                ..ack.clone()
            });
        }
        if let Some(v) = g.db.get_cf(meta, &bkey)? {
            let ack: Ack = serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("batch ack: {e}")))?;
            return Ok(Ack { duplicate: true, ..ack });
        }
        if g.cache_used > 0 && g.cache_used + bytes > self.state.max_bytes {
            return Err(JournalError::CacheFull {
                used: g.cache_used,
                max: self.state.max_bytes,
            });
        }
        // Validate the whole batch before touching anything: it commits all or nothing.
        let mut ids = Vec::with_capacity(records.len());
        for p in &records {
            let r = &p.record;
            if matches!(r.kind, RecordKind::Bookmark | RecordKind::CrashPoint) {
                ids.push(None);
                continue;
            }
            let id = self
                .find_disk(g, machine, &r.disk)
                .ok_or_else(|| JournalError::UnknownDisk {
                    machine: machine.into(),
                    disk: r.disk.clone(),
                })?;
            let d = self.disk_mut(g, id).expect("disk");
            if d.is_followed() {
                return Err(JournalError::Followed {
                    machine: machine.into(),
                    disk: r.disk.clone(),
                    process_server: d.followed_from.clone(),
                });
            }
            let size = d.size;
            if r.offset + r.len as u64 > size {
                return Err(JournalError::OutOfRange {
                    machine: machine.into(),
                    disk: r.disk.clone(),
                    offset: r.offset,
                    len: r.len as u64,
                    size,
                });
            }
            ids.push(Some(id));
        }
        let now = now_ms();
        let mut ack = Ack {
            batch,
            ..Default::default()
        };
        let mut added = 0u64;
        for (p, id) in records.into_iter().zip(ids) {
            match id {
                Some(id) => {
                    let (seq, name) = self.take_seq(g, id);
                    let rec = LogRecord {
                        kind: p.record.kind,
                        seq,
                        time_ms: now,
                        offset: p.record.offset,
                        len: p.record.len,
                        payload: p.record.payload,
                    };
                    if rec.payload.len() >= paylog::MIN_PAYLOAD {
                        let ptr = self.log.borrow_mut().append(id, &rec, p.payload_crc);
                        added += ptr.len as u64;
                        g.wb.put_cf(journal, journal_key(id, seq), ptr.encode());
                        g.hot.push((id, rec));
                    } else {
                        let value = rec.to_journal_value();
                        added += value.len() as u64;
                        g.wb.put_cf(journal, journal_key(id, seq), value);
                    }
                    for (block, sum) in p.checksums {
                        match sum {
                            Some(s) => g.wb.put_cf(sums, checksum_key(id, block), s),
                            None => g.wb.delete_cf(sums, checksum_key(id, block)),
                        }
                    }
                    ack.seqs.insert(name, seq);
                }
                None => {
                    // A point (bookmark or crash point): one id, one record in every disk's log.
                    let point_id = self.next_point_id(g)?;
                    let label = String::from_utf8_lossy(&p.record.payload).into_owned();
                    let (point, bytes) = self.append_point(g, machine, point_id, p.record.kind, &label, "", now);
                    added += bytes;
                    ack.seqs.extend(point.seqs);
                    ack.point = Some(point_id);
                }
            }
        }
        g.cache_used += added;
        g.wb.put_cf(meta, &bkey, serde_json::to_vec(&ack).expect("json"));
        g.acks.insert(bkey, ack.clone());
        Ok(ack)
    }

    /// Takes the next recovery point id (ids are unique across machines, so a replication group's
    /// members can share one).
    fn next_point_id(&self, g: &mut Group) -> Result<u64, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let point_id = match g.next_point {
            Some(n) => n,
            None => u64_value(g.db.get_cf(meta, NEXT_POINT_KEY)?).max(1),
        };
        g.next_point = Some(point_id + 1);
        g.wb.put_cf(meta, NEXT_POINT_KEY, (point_id + 1).to_be_bytes());
        Ok(point_id)
    }

    /// Appends point `point_id`'s record to every disk log of `machine` and stores the point;
    /// returns it and the journal bytes it added.
    #[allow(clippy::too_many_arguments)]
    fn append_point(
        &self,
        g: &mut Group,
        machine: &str,
        point_id: u64,
        kind: RecordKind,
        label: &str,
        group: &str,
        now: u64,
    ) -> (RecoveryPoint, u64) {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let journal = self.db.cf_handle(CF_JOURNAL).expect("journal cf");
        let payload = bytes::Bytes::copy_from_slice(label.as_bytes());
        let mut added = 0u64;
        let mut point = RecoveryPoint {
            id: point_id,
            machine: machine.into(),
            time_ms: now,
            kind: point_kind_name(kind).into(),
            label: label.into(),
            seqs: BTreeMap::new(),
            group: group.into(),
        };
        for id in self.machine_disks(g, machine) {
            let (seq, name) = self.take_seq(g, id);
            let rec = LogRecord {
                kind,
                seq,
                time_ms: now,
                offset: point_id,
                len: payload.len() as u32,
                payload: payload.clone(),
            };
            let value = rec.to_journal_value();
            added += value.len() as u64;
            g.wb.put_cf(journal, journal_key(id, seq), value);
            point.seqs.insert(name, seq);
        }
        g.wb.put_cf(
            meta,
            point_key(machine, point_id),
            serde_json::to_vec(&point).expect("json"),
        );
        (point, added)
    }

    /// One recovery point across several machines (a replication group), cut in one write: every
    /// member's disks get the point's record at the same position of the serial log order.
    fn group_point(
        &self,
        g: &mut Group,
        group: &str,
        machines: &[String],
        kind: RecordKind,
        label: &str,
    ) -> Result<GroupPointAck, JournalError> {
        if g.cache_used > 0 && g.cache_used + 4096 > self.state.max_bytes {
            return Err(JournalError::CacheFull {
                used: g.cache_used,
                max: self.state.max_bytes,
            });
        }
        let point_id = self.next_point_id(g)?;
        let now = now_ms();
        let mut ack = GroupPointAck {
            point: point_id,
            time_ms: now,
            seqs: BTreeMap::new(),
        };
        for machine in machines {
            let (point, bytes) = self.append_point(g, machine, point_id, kind, label, group, now);
            g.cache_used += bytes;
            ack.seqs.insert(machine.clone(), point.seqs);
        }
        Ok(ack)
    }

    fn register_disk(
        &self,
        g: &mut Group,
        machine: &str,
        disk: &str,
        size: u64,
        key_id: u32,
    ) -> Result<DiskMeta, JournalError> {
        if let Some(id) = self.find_disk(g, machine, disk) {
            let d = self.disk_mut(g, id).expect("disk");
            if d.is_followed() {
                return Err(JournalError::Followed {
                    machine: machine.into(),
                    disk: disk.into(),
                    process_server: d.followed_from.clone(),
                });
            }
            d.size = size;
            return Ok(d.clone());
        }
        let id = self.new_disk_id(g)?;
        let d = DiskMeta {
            id,
            machine: machine.into(),
            disk: disk.into(),
            size,
            key_id,
            next_seq: 1,
            uploaded_through: 0,
            next_counter: 1,
            followed_from: String::new(),
        };
        g.disks.insert(id, d.clone());
        Ok(d)
    }

    /// Takes the next disk id.
    fn new_disk_id(&self, g: &mut Group) -> Result<u32, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let used_max = g.disks.keys().max().copied().unwrap_or(0);
        let id = (u64_value(g.db.get_cf(meta, NEXT_DISK_KEY)?) as u32)
            .max(used_max + 1)
            .max(1);
        g.wb.put_cf(meta, NEXT_DISK_KEY, ((id + 1) as u64).to_be_bytes());
        Ok(id)
    }

    fn put_followed(&self, g: &mut Group, mut disk: DiskMeta) -> Result<DiskMeta, JournalError> {
        let refuse =
            |why: &str| JournalError::Corrupt(format!("{}/{} cannot be followed: {why}", disk.machine, disk.disk));
        if !disk.is_followed() {
            return Err(refuse("the record names no process server"));
        }
        disk.id = match self.find_disk(g, &disk.machine, &disk.disk) {
            Some(id) if !self.disk_mut(g, id).expect("disk").is_followed() => {
                return Err(refuse("this appliance's process server writes its log"))
            }
            Some(id) => id,
            None => self.new_disk_id(g)?,
        };
        g.disks.insert(disk.id, disk.clone());
        Ok(disk)
    }

    /// Plans the segment `first_seq..=last_seq` of a disk. `group_plans` are the plans made
    /// earlier in the same group (not yet in `state.plans`), so several plans can be made in one
    /// commit.
    fn plan(
        &self,
        g: &mut Group,
        group_plans: &[SegmentPlan],
        disk_id: u32,
        first_seq: u64,
        last_seq: u64,
    ) -> Result<SegmentPlan, JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        // A plan that already covers `first_seq` (made before a restart) is the one to upload.
        let planned_through = {
            let plans = self.state.plans.read().expect("lock");
            let mine = plans
                .range((disk_id, 0)..=(disk_id, u64::MAX))
                .map(|(_, p)| p)
                .chain(group_plans.iter().filter(|p| p.disk_id == disk_id));
            if let Some(p) = mine
                .clone()
                .find(|p| p.first_seq <= first_seq && first_seq <= p.last_seq)
            {
                return Ok(*p);
            }
            mine.map(|p| p.last_seq).max()
        };
        let d = self
            .disk_mut(g, disk_id)
            .ok_or_else(|| JournalError::Corrupt(format!("plan for unknown disk {disk_id}")))?;
        let next = planned_through.unwrap_or(d.uploaded_through).max(d.uploaded_through) + 1;
        if first_seq != next || last_seq < first_seq || last_seq >= d.next_seq {
            return Err(JournalError::Corrupt(format!(
                "segment plan {first_seq}..={last_seq} of disk {disk_id}: the next segment starts at {next}"
            )));
        }
        let plan = SegmentPlan {
            disk_id,
            counter: d.next_counter,
            first_seq,
            last_seq,
        };
        d.next_counter += 1;
        g.wb.put_cf(
            meta,
            plan_key(disk_id, first_seq),
            serde_json::to_vec(&plan).expect("json"),
        );
        Ok(plan)
    }

    fn uploaded(&self, g: &mut Group, plan: SegmentPlan, freed: u64) -> Result<(), JournalError> {
        let meta = self.db.cf_handle(CF_META).expect("meta cf");
        let journal = self.db.cf_handle(CF_JOURNAL).expect("journal cf");
        g.wb.delete_range_cf(
            journal,
            journal_key(plan.disk_id, plan.first_seq),
            journal_key(plan.disk_id, plan.last_seq + 1),
        );
        g.wb.delete_cf(meta, plan_key(plan.disk_id, plan.first_seq));
        let d = self
            .disk_mut(g, plan.disk_id)
            .ok_or_else(|| JournalError::Corrupt(format!("upload for unknown disk {}", plan.disk_id)))?;
        d.uploaded_through = d.uploaded_through.max(plan.last_seq);
        g.cache_used = g.cache_used.saturating_sub(freed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn zero_detection_sees_any_set_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 65536 + 17]));
        for at in [0, 4095, 4096, 65536 + 16] {
            let mut v = vec![0u8; 65536 + 17];
            v[at] = 0x80;
            assert!(!is_zero(&v), "byte {at}");
        }
    }

    /// A journal under `dir` with one 1 MiB disk and `batches` committed writes of `size` bytes
    /// (batch `n` writes bytes of value `n` at `n * size`).
    async fn journal_with_writes(dir: &Path, batches: u64, size: usize) -> (Journal, DiskMeta) {
        let j = Journal::open(dir, 1 << 30).unwrap();
        let d = j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        for batch in 1..=batches {
            let rec = prepare(
                IngestRecord::write("disk0", batch * size as u64, Bytes::from(vec![batch as u8; size])),
                1 << 20,
            );
            j.commit("m", 1, batch, vec![rec]).await.unwrap();
        }
        (j, d)
    }

    #[tokio::test]
    async fn several_plans_per_disk_in_order_and_old_plan_keys_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let (j, d) = journal_with_writes(dir.path(), 3, 4096).await;
        let a = j.plan_segment(d.id, 1, 1).await.unwrap();
        let b = j.plan_segment(d.id, 2, 3).await.unwrap();
        assert_ne!(a.counter, b.counter, "each segment its own nonce counter");
        assert!(j.plan_segment(d.id, 5, 5).await.is_err(), "plans follow one another");
        assert_eq!(
            j.plan_segment(d.id, 2, 3).await.unwrap(),
            b,
            "an existing plan is reused"
        );
        j.segment_uploaded(a, 0).await.unwrap();
        // A plan stored under the one-plan-per-disk key of older versions is read and re-keyed.
        let meta = j.db().cf_handle(CF_META).unwrap();
        j.db().delete_cf(meta, plan_key(d.id, 2)).unwrap();
        j.db()
            .put_cf(meta, format!("plan/{:08x}", d.id), serde_json::to_vec(&b).unwrap())
            .unwrap();
        drop(j);
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(j.state.plans.read().unwrap().get(&(d.id, 2)), Some(&b));
        let meta = j.db().cf_handle(CF_META).unwrap();
        assert!(j.db().get_cf(meta, plan_key(d.id, 2)).unwrap().is_some());
        assert!(j.db().get_cf(meta, format!("plan/{:08x}", d.id)).unwrap().is_none());
        assert_eq!(j.read_records(d.id, 2, 3, usize::MAX).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn plans_made_together_follow_one_another_and_spans_match_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (j, d) = journal_with_writes(dir.path(), 6, 8192).await;
        // A span is what read_records gives for the same budget, from pointers alone.
        for (from, budget) in [(1u64, 8192usize), (1, 8193), (2, 3 * 8192), (5, usize::MAX)] {
            let (first, last, bytes) = j.span_records(d.id, from, budget).unwrap().unwrap();
            let read = j.read_records(d.id, from, u64::MAX, budget).unwrap();
            assert_eq!(
                (first, last),
                (read[0].seq, read[read.len() - 1].seq),
                "from {from}, budget {budget}"
            );
            // Logged records count with their log headers, as read_records counts them.
            let payload: usize = read.iter().map(|r| r.payload.len()).sum();
            assert!(
                bytes >= payload && bytes < payload + 64 * read.len(),
                "{bytes} for {payload}"
            );
        }
        assert!(
            j.span_records(d.id, 7, 1).unwrap().is_none(),
            "nothing past the last record"
        );
        // Three plans queued together: consecutive, each its own counter, all durable.
        let (plans, err) = j.plan_segments(d.id, &[(1, 2), (3, 3), (4, 6)]).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            plans.iter().map(|p| (p.first_seq, p.last_seq)).collect::<Vec<_>>(),
            vec![(1, 2), (3, 3), (4, 6)]
        );
        let counters: std::collections::HashSet<u64> = plans.iter().map(|p| p.counter).collect();
        assert_eq!(counters.len(), 3, "no nonce counter handed out twice");
        // An existing plan comes back as it is; a span past the last record is refused.
        let (more, err) = j.plan_segments(d.id, &[(1, 2), (7, 7)]).await;
        assert_eq!(more, vec![plans[0]]);
        assert!(err.is_some(), "a plan of records not committed is refused");
        drop(j);
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let stored = j.state.plans.read().unwrap().clone();
        for p in &plans {
            assert_eq!(
                stored.get(&(d.id, p.first_seq)),
                Some(p),
                "plan {p:?} survives a reopen"
            );
        }
    }

    fn payload(b: &[u8]) -> Bytes {
        Bytes::copy_from_slice(b)
    }

    fn write(disk: &str, off: u64, data: &[u8]) -> PreparedRecord {
        prepare(IngestRecord::write(disk, off, payload(data)), 1 << 20)
    }

    #[tokio::test]
    async fn commit_is_durable_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
            let ack = j
                .commit(
                    "m",
                    7,
                    1,
                    vec![write("disk0", 0, &[1u8; 65536]), write("disk0", 65536, &[2u8; 100])],
                )
                .await
                .unwrap();
            assert_eq!(ack.seqs["disk0"], 2);
            let again = j
                .commit("m", 7, 1, vec![write("disk0", 0, &[9u8; 65536])])
                .await
                .unwrap();
            assert!(again.duplicate);
            assert_eq!(again.seqs, ack.seqs);
        }
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let d = j.disk("m", "disk0").unwrap();
        assert_eq!(d.next_seq, 3);
        let recs = j.read_records(d.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].payload.as_ref(), &[1u8; 65536][..]);
        let sums = j.checksums(&d).unwrap();
        assert_eq!(&sums[..16], &block_checksum(&[1u8; 65536]));
        assert_eq!(&sums[16..32], &UNKNOWN_CHECKSUM, "a partial block is unknown");
        assert!(j.cache_used() > 65536);
    }

    #[tokio::test]
    async fn full_cache_refuses_and_upload_frees() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 100_000).unwrap();
        let d = j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        j.commit("m", 1, 1, vec![write("disk0", 0, &[1u8; 65536])])
            .await
            .unwrap();
        let err = j
            .commit("m", 1, 2, vec![write("disk0", 65536, &[1u8; 65536])])
            .await
            .unwrap_err();
        assert!(matches!(err, JournalError::CacheFull { .. }), "{err}");
        let plan = j.plan_segment(d.id, 1, 1).await.unwrap();
        let bytes = j.read_records(d.id, 1, 1, usize::MAX).unwrap()[0]
            .to_journal_value()
            .len() as u64;
        j.segment_uploaded(plan, bytes).await.unwrap();
        assert_eq!(j.cache_used(), 0);
        j.commit("m", 1, 2, vec![write("disk0", 65536, &[1u8; 65536])])
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn unknown_disk_and_out_of_range_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        let e = j
            .commit("m", 1, 1, vec![write("disk0", 0, b"ok"), write("nope", 0, b"x")])
            .await
            .unwrap_err();
        assert!(matches!(e, JournalError::UnknownDisk { .. }));
        let e = j
            .commit("m", 1, 2, vec![write("disk0", (1 << 20) - 1, b"xx")])
            .await
            .unwrap_err();
        assert!(matches!(e, JournalError::OutOfRange { .. }));
        assert_eq!(j.disk("m", "disk0").unwrap().next_seq, 1);
    }

    /// A disk another process server writes is only followed: never written here, never
    /// replaced by a followed record once it is this appliance's, and older records (without
    /// the field) still read as this appliance's own.
    #[tokio::test]
    async fn a_followed_disk_takes_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let followed = |id, next_seq| DiskMeta {
            id,
            machine: "m2".into(),
            disk: "disk0".into(),
            size: 1 << 20,
            key_id: 0,
            next_seq,
            uploaded_through: next_seq - 1,
            next_counter: 0,
            followed_from: "ps2".into(),
        };
        let (local, f) = {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            let local = j.register_disk("m1", "disk0", 1 << 20, 1).await.unwrap();
            let f = j.put_followed_disk(followed(0, 5)).await.unwrap();
            assert!(f.id > local.id && f.is_followed());
            let again = j.put_followed_disk(followed(0, 9)).await.unwrap();
            assert_eq!((again.id, again.next_seq), (f.id, 9), "the same disk, moved on");
            let e = j.commit("m2", 1, 1, vec![write("disk0", 0, b"x")]).await.unwrap_err();
            assert!(matches!(e, JournalError::Followed { .. }), "{e}");
            let e = j.register_disk("m2", "disk0", 1 << 20, 1).await.unwrap_err();
            assert!(matches!(e, JournalError::Followed { .. }), "{e}");
            let mut owned = followed(0, 1);
            owned.machine = "m1".into();
            assert!(j.put_followed_disk(owned).await.is_err(), "m1/disk0 is written here");
            (local, f)
        };
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            j.disk("m2", "disk0").unwrap(),
            DiskMeta {
                next_seq: 9,
                uploaded_through: 8,
                ..f
            }
        );
        assert_eq!(j.disk("m1", "disk0").unwrap(), local);
        assert!(!serde_json::to_string(&local).unwrap().contains("followed_from"));
        let old = r#"{"id":1,"machine":"m","disk":"d","size":1,"key_id":1,"next_seq":1,"uploaded_through":0,"next_counter":1}"#;
        assert!(!serde_json::from_str::<DiskMeta>(old).unwrap().is_followed());
        let next = j.register_disk("m3", "disk0", 1 << 20, 1).await.unwrap();
        assert!(next.id > f.id, "ids are never given twice");
    }

    #[tokio::test]
    async fn bookmark_marks_every_disk() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        j.register_disk("m", "disk1", 1 << 20, 1).await.unwrap();
        j.commit("m", 1, 1, vec![write("disk0", 0, b"a")]).await.unwrap();
        let ack = j
            .commit("m", 1, 2, vec![prepare(IngestRecord::bookmark("nightly"), 0)])
            .await
            .unwrap();
        let points = j.points("m").unwrap();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].seqs["disk0"], 2);
        assert_eq!(points[0].seqs["disk1"], 1);
        assert_eq!(ack.point, Some(points[0].id));
        assert_eq!(points[0].label, "nightly");
    }
}

//! Rebuilds the read side's catalogue on a new appliance from blob storage alone: disks (from
//! their `disk.json`), recovery points (from the point records in the log) and the segment and
//! extent index. Disaster means the old appliance may be gone; the blob store and the passphrase
//! are enough. New writes then use a fresh data key, so no nonce of the old appliance's is reused.

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::blob::{self, layout};
use crate::catalog::{self, SegmentEntry};
use crate::crypto::{Key, WrappedKey};
use crate::journal::{checksum_key, point_kind_name, prepare, DiskMeta, Journal, RecoveryPoint, CF_CHECKSUMS};
use crate::protocol::IngestRecord;
use crate::record::{LogRecord, RecordKind};
use crate::replay::{list_segments, read_object, ReplayError, SegmentRef};
use crate::segment::SegmentIndex;
use crate::server::DiskDescriptor;

/// What a rebuild found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RebuildSummary {
    pub machines: usize,
    pub disks: usize,
    pub segments: usize,
    pub records: u64,
    pub points: usize,
}

/// Every `(machine, disk)` that has a `disk.json` in the store.
pub async fn list_disks(store: &dyn ObjectStore) -> Result<Vec<DiskDescriptor>, ReplayError> {
    let metas: Vec<_> = store.list(Some(&layout::machines())).try_collect().await?;
    let mut out = Vec::new();
    for m in metas {
        if m.location.filename() != Some("disk.json") {
            continue;
        }
        if let Some(d) = blob::get_json::<DiskDescriptor>(store, &m.location).await? {
            out.push(d);
        }
    }
    out.sort_by(|a, b| (&a.machine, &a.disk).cmp(&(&b.machine, &b.disk)));
    Ok(out)
}

/// The disks of one machine that have a `disk.json`, by name, without listing their logs.
pub async fn machine_disks(store: &dyn ObjectStore, machine: &str) -> Result<Vec<DiskDescriptor>, ReplayError> {
    let prefix = Path::from(format!("{}/disks", layout::machines().child(machine)));
    let listed = store.list_with_delimiter(Some(&prefix)).await?;
    let mut out = Vec::new();
    for dir in listed.common_prefixes {
        let Some(disk) = dir.filename() else { continue };
        if let Some(d) = blob::get_json::<DiskDescriptor>(store, &descriptor_path(machine, disk)).await? {
            out.push(d);
        }
    }
    out.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(out)
}

/// The log segments that continue a disk's log at sequence `expected`, in order: those that end
/// before it are skipped (rolled into the base, or left behind by an interrupted roll-up); a
/// missing range is a [`ReplayError::Gap`].
pub fn continuing(
    segments: Vec<SegmentRef>,
    mut expected: u64,
    machine: &str,
    disk: &str,
) -> Result<Vec<SegmentRef>, ReplayError> {
    let mut out = Vec::new();
    for seg in segments {
        if seg.last_seq < expected {
            continue;
        }
        if seg.first_seq != expected {
            return Err(ReplayError::Gap {
                machine: machine.into(),
                disk: disk.into(),
                expected,
                found: seg.first_seq,
            });
        }
        expected = seg.last_seq + 1;
        out.push(seg);
    }
    Ok(out)
}

/// Rebuilds the catalogue into `journal` (which the appliance must not have open).
/// `progress` is told each segment as it is indexed.
pub async fn rebuild(
    journal: &Journal,
    store: &dyn ObjectStore,
    kek: &Key,
    progress: impl Fn(&str),
) -> Result<RebuildSummary, ReplayError> {
    let mut summary = RebuildSummary::default();
    let mut new_disks = Vec::new();
    let mut points: BTreeMap<u64, RecoveryPoint> = BTreeMap::new();
    let mut next_id = journal.next_disk_id().map_err(|e| ReplayError::Io {
        path: "journal".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let descriptors = list_disks(store).await?;
    let mut machines: Vec<&str> = descriptors.iter().map(|d| d.machine.as_str()).collect();
    machines.dedup();
    summary.machines = machines.len();
    for desc in &descriptors {
        let (machine, disk) = (desc.machine.as_str(), desc.disk.as_str());
        let existing = journal.disk(machine, disk);
        let disk_id = match &existing {
            Some(d) => d.id,
            None => {
                next_id += 1;
                next_id - 1
            }
        };
        if existing.as_ref().is_some_and(|d| d.is_followed()) {
            // A log another process server wrote, followed here until now: its catalogue is
            // made again whole, like a new disk's.
            let db = journal.db().clone();
            tokio::task::spawn_blocking(move || catalog::clear_disk(&db, disk_id))
                .await
                .expect("clear task")
                .map_err(db_error)?;
        }
        let mut keys: HashMap<u32, Key> = HashMap::new();
        let mut expected = 1u64;
        // The base image first (if retention made one), then the log after it.
        if let Some(base) = blob::get_base_manifest(store, machine, disk).await? {
            for (part, path) in base.parts.iter().enumerate() {
                progress(path);
                let path = Path::from(path.as_str());
                let (index, records) = read_object(store, kek, &mut keys, machine, disk, &path).await?;
                let id = catalog::base_part_id(base.generation, part as u32);
                let n = index_records(journal, disk_id, id, &path, &index, records, desc.size)
                    .await?
                    .0;
                summary.records += n;
                summary.segments += 1;
            }
            let db = journal.db().clone();
            let state = catalog::BaseState {
                generation: base.generation,
                through_seq: base.through_seq,
            };
            let mut wb = WriteBatch::default();
            catalog::put_base_state(&db, &mut wb, disk_id, state);
            db.write(wb).map_err(db_error)?;
            expected = base.through_seq + 1;
        }
        for seg in continuing(list_segments(store, machine, disk).await?, expected, machine, disk)? {
            progress(seg.path.as_ref());
            let (index, records) = read_object(store, kek, &mut keys, machine, disk, &seg.path).await?;
            let (n, marks) =
                index_records(journal, disk_id, seg.first_seq, &seg.path, &index, records, desc.size).await?;
            for mark in marks {
                mark.add_to(&mut points, machine, disk);
            }
            summary.records += n;
            summary.segments += 1;
            expected = seg.last_seq + 1;
        }
        summary.disks += 1;
        // A journal behind blob storage (restored from an older copy), or a followed log another
        // process server wrote: adopt the log's end, so sequence numbers go on from there, under
        // a fresh data key (the counters issued under the old key are unknown here).
        let behind = existing
            .as_ref()
            .is_some_and(|d| expected > d.next_seq || d.is_followed());
        if let (true, Some(d)) = (behind, &existing) {
            let key_id = blob::max_key_id(store, machine, disk).await? + 1;
            let wrapped = WrappedKey::wrap(kek, &Key::random(), machine, disk, key_id);
            blob::put_wrapped_key(store, &wrapped).await?;
            new_disks.push(DiskMeta {
                key_id,
                next_seq: expected,
                uploaded_through: expected - 1,
                next_counter: 1,
                followed_from: String::new(),
                ..d.clone()
            });
        }
        if existing.is_none() {
            // New writes get a fresh data key: the old appliance's nonce counters are unknown.
            let key_id = blob::max_key_id(store, machine, disk).await? + 1;
            let wrapped = WrappedKey::wrap(kek, &Key::random(), machine, disk, key_id);
            blob::put_wrapped_key(store, &wrapped).await?;
            new_disks.push(DiskMeta {
                id: disk_id,
                machine: machine.into(),
                disk: disk.into(),
                size: desc.size,
                key_id,
                next_seq: expected,
                uploaded_through: expected - 1,
                next_counter: 1,
                followed_from: String::new(),
            });
        }
    }
    summary.points = points.len();
    let points: Vec<RecoveryPoint> = points.into_values().collect();
    let j = journal.clone();
    tokio::task::spawn_blocking(move || j.restore_offline(&new_disks, &points))
        .await
        .expect("restore task")
        .map_err(|e| ReplayError::Io {
            path: "journal".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(summary)
}

fn db_error(e: rocksdb::Error) -> ReplayError {
    ReplayError::Io {
        path: "catalogue".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// A point record found in a disk's log: the point's id and where it lies in this disk's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMark {
    pub point: u64,
    pub seq: u64,
    pub time_ms: u64,
    /// The catalogue's name of the kind (`crash-consistent`, `app-consistent`).
    pub kind: String,
    pub label: String,
}

impl PointMark {
    /// Adds this disk's position to its point in `points` (creating the point).
    pub fn add_to(&self, points: &mut BTreeMap<u64, RecoveryPoint>, machine: &str, disk: &str) {
        let p = points.entry(self.point).or_insert_with(|| RecoveryPoint {
            id: self.point,
            machine: machine.into(),
            time_ms: self.time_ms,
            kind: self.kind.clone(),
            label: self.label.clone(),
            seqs: BTreeMap::new(),
            // Group definitions live in the config server, not in blob storage; members'
            // points still share their ids.
            group: String::new(),
        });
        p.seqs.insert(disk.to_owned(), self.seq);
    }
}

/// Adds one object's catalogue entry and extents to `wb` (catalogue id `id`, see
/// [`catalog::index_segment`]) and, given the disk's size, the delta-sync checksums its records
/// leave, replayed in sequence order so an agent's next sync sends exactly the blocks that differ
/// from the replica. Returns the point records the object holds.
pub fn index_object(
    db: &DB,
    wb: &mut WriteBatch,
    disk_id: u32,
    id: u64,
    entry: &SegmentEntry,
    records: &[LogRecord],
    checksums_of_size: Option<u64>,
) -> Vec<PointMark> {
    catalog::index_segment(db, wb, disk_id, id, entry, records);
    if let Some(size) = checksums_of_size {
        let sums = db.cf_handle(CF_CHECKSUMS).expect("checksums cf");
        for r in records
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Write | RecordKind::Zero))
        {
            let ingest = IngestRecord {
                kind: r.kind,
                disk: String::new(),
                offset: r.offset,
                len: r.len,
                payload: r.payload.clone(),
            };
            for (block, sum) in prepare(ingest, size).checksums {
                match sum {
                    Some(s) => wb.put_cf(sums, checksum_key(disk_id, block), s),
                    None => wb.delete_cf(sums, checksum_key(disk_id, block)),
                }
            }
        }
    }
    records
        .iter()
        .filter(|r| matches!(r.kind, RecordKind::Bookmark | RecordKind::CrashPoint))
        .map(|r| PointMark {
            point: r.offset,
            seq: r.seq,
            time_ms: r.time_ms,
            kind: point_kind_name(r.kind).into(),
            label: String::from_utf8_lossy(&r.payload).into_owned(),
        })
        .collect()
}

/// Writes one segment's catalogue entry, extents and delta-sync checksums; returns its record
/// count and the point records it holds.
async fn index_records(
    journal: &Journal,
    disk_id: u32,
    id: u64,
    path: &Path,
    index: &SegmentIndex,
    records: Vec<LogRecord>,
    size: u64,
) -> Result<(u64, Vec<PointMark>), ReplayError> {
    let db = journal.db().clone();
    let entry = SegmentEntry::from_index(path.as_ref(), index);
    tokio::task::spawn_blocking(move || -> Result<_, ReplayError> {
        let mut wb = WriteBatch::default();
        let marks = index_object(&db, &mut wb, disk_id, id, &entry, &records, Some(size));
        db.write(wb).map_err(db_error)?;
        Ok((records.len() as u64, marks))
    })
    .await
    .expect("index task")
}

/// The object path of a disk's descriptor.
pub fn descriptor_path(machine: &str, disk: &str) -> Path {
    Path::from(format!("{}/disk.json", layout::disk_prefix(machine, disk)))
}

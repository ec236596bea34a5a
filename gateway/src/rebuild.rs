//! Rebuilds the read side's catalogue on a new appliance from blob storage alone: disks (from
//! their `disk.json`), recovery points (from the point records in the log) and the segment and
//! extent index. Disaster means the old appliance may be gone; the blob store and the passphrase
//! are enough. New writes then use a fresh data key, so no nonce of the old appliance's is reused.

use std::collections::{BTreeMap, HashMap};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStore;
use serde::Serialize;

use crate::blob::{self, layout};
use crate::catalog::{self, SegmentEntry};
use crate::crypto::{Key, WrappedKey};
use crate::journal::{checksum_key, point_kind_name, prepare, DiskMeta, Journal, RecoveryPoint, CF_CHECKSUMS};
use crate::protocol::IngestRecord;
use crate::record::RecordKind;
use crate::replay::{list_segments, read_object, ReplayError};
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
            let mut wb = rocksdb::WriteBatch::default();
            catalog::put_base_state(&db, &mut wb, disk_id, state);
            db.write(wb).map_err(db_error)?;
            expected = base.through_seq + 1;
        }
        for seg in list_segments(store, machine, disk).await? {
            if seg.last_seq < expected {
                continue; // rolled into the base, or left behind by an interrupted roll-up
            }
            if seg.first_seq != expected {
                return Err(ReplayError::Gap {
                    machine: machine.into(),
                    disk: disk.into(),
                    expected,
                    found: seg.first_seq,
                });
            }
            progress(seg.path.as_ref());
            let (index, records) = read_object(store, kek, &mut keys, machine, disk, &seg.path).await?;
            let (n, marks) =
                index_records(journal, disk_id, seg.first_seq, &seg.path, &index, records, desc.size).await?;
            for (id, seq, time_ms, kind, label) in marks {
                let p = points.entry(id).or_insert_with(|| RecoveryPoint {
                    id,
                    machine: machine.into(),
                    time_ms,
                    kind: point_kind_name(kind).into(),
                    label,
                    seqs: BTreeMap::new(),
                    // Group definitions live in the config server, not in blob storage; members'
                    // points still share their ids.
                    group: String::new(),
                });
                p.seqs.insert(disk.to_owned(), seq);
            }
            summary.records += n;
            summary.segments += 1;
            expected = seg.last_seq + 1;
        }
        summary.disks += 1;
        // A journal behind blob storage (restored from an older copy): adopt the log's end, so
        // sequence numbers go on from there, under a fresh data key (the counters the lost
        // state issued under the old key are unknown here).
        let behind = existing.as_ref().is_some_and(|d| expected > d.next_seq);
        if let (true, Some(d)) = (behind, &existing) {
            let key_id = blob::max_key_id(store, machine, disk).await? + 1;
            let wrapped = WrappedKey::wrap(kek, &Key::random(), machine, disk, key_id);
            blob::put_wrapped_key(store, &wrapped).await?;
            new_disks.push(DiskMeta {
                key_id,
                next_seq: expected,
                uploaded_through: expected - 1,
                next_counter: 1,
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

/// A point record found in the log: `(point id, seq, time_ms, kind, label)`.
type PointMark = (u64, u64, u64, RecordKind, String);

/// Writes one segment's catalogue entry, extents and delta-sync checksums; returns its record
/// count and the point records it holds.
async fn index_records(
    journal: &Journal,
    disk_id: u32,
    id: u64,
    path: &Path,
    index: &SegmentIndex,
    records: Vec<crate::record::LogRecord>,
    size: u64,
) -> Result<(u64, Vec<PointMark>), ReplayError> {
    let db = journal.db().clone();
    let entry = SegmentEntry::from_index(path.as_ref(), index);
    tokio::task::spawn_blocking(move || -> Result<_, ReplayError> {
        let mut wb = rocksdb::WriteBatch::default();
        catalog::index_segment(&db, &mut wb, disk_id, id, &entry, &records);
        // The delta-sync checksums, replayed in sequence order, so the agent's next sync sends
        // exactly the blocks that differ from the replica.
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
        db.write(wb).map_err(db_error)?;
        let marks = records
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Bookmark | RecordKind::CrashPoint))
            .map(|r| {
                (
                    r.offset,
                    r.seq,
                    r.time_ms,
                    r.kind,
                    String::from_utf8_lossy(&r.payload).into_owned(),
                )
            })
            .collect();
        Ok((records.len() as u64, marks))
    })
    .await
    .expect("index task")
}

/// The object path of a disk's descriptor.
pub fn descriptor_path(machine: &str, disk: &str) -> Path {
    Path::from(format!("{}/disk.json", layout::disk_prefix(machine, disk)))
}

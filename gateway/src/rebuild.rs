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
use crate::replay::{list_segments, ReplayError};
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
        for seg in list_segments(store, machine, disk).await? {
            if seg.last_seq < expected {
                continue; // superseded (e.g. left behind by an interrupted roll-up)
            }
            if seg.first_seq != expected {
                return Err(ReplayError::Gap {
                    machine: machine.into(),
                    disk: disk.into(),
                    expected,
                    found: seg.first_seq,
                });
            }
            let name = seg.path.to_string();
            progress(&name);
            let data = store.get(&seg.path).await?.bytes().await?;
            let (header, _) = crate::segment::SegmentHeader::decode(&data, &name)?;
            if header.machine != machine || header.disk != disk {
                return Err(ReplayError::Misplaced {
                    name,
                    found: format!("{}/{}", header.machine, header.disk),
                    expected: format!("{machine}/{disk}"),
                });
            }
            if let std::collections::hash_map::Entry::Vacant(e) = keys.entry(header.key_id) {
                let k = blob::get_data_key(store, kek, machine, disk, header.key_id)
                    .await?
                    .ok_or_else(|| ReplayError::MissingKey {
                        machine: machine.into(),
                        disk: disk.into(),
                        key_id: header.key_id,
                    })?;
                e.insert(k);
            }
            let key = keys[&header.key_id].clone();
            let db = journal.db().clone();
            let disk_name = disk.to_owned();
            let size = desc.size;
            let found = tokio::task::spawn_blocking(move || -> Result<_, ReplayError> {
                let (index, key) = SegmentIndex::from_object(&data, |_| Ok(key.clone()), &name)?;
                let records = index.read_all(&key, &data, &name)?;
                let entry = SegmentEntry::from_index(&name, &index);
                let mut wb = rocksdb::WriteBatch::default();
                catalog::index_segment(&db, &mut wb, disk_id, &entry, &records);
                // The delta-sync checksums, replayed in sequence order, so the agent's next sync
                // sends exactly the blocks that differ from the replica.
                let sums = db.cf_handle(CF_CHECKSUMS).expect("checksums cf");
                for r in records.iter().filter(|r| matches!(r.kind, RecordKind::Write | RecordKind::Zero)) {
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
                db.write(wb).map_err(|e| ReplayError::Io {
                    path: "catalogue".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let marks: Vec<(u64, u64, u64, RecordKind, String)> = records
                    .iter()
                    .filter(|r| matches!(r.kind, RecordKind::Bookmark | RecordKind::CrashPoint))
                    .map(|r| {
                        let label = String::from_utf8_lossy(&r.payload).into_owned();
                        (r.offset, r.seq, r.time_ms, r.kind, label)
                    })
                    .collect();
                Ok((records.len() as u64, marks, disk_name))
            })
            .await
            .expect("index task")?;
            let (n, marks, disk_name) = found;
            for (id, seq, time_ms, kind, label) in marks {
                let p = points.entry(id).or_insert_with(|| RecoveryPoint {
                    id,
                    machine: machine.into(),
                    time_ms,
                    kind: point_kind_name(kind).into(),
                    label,
                    seqs: BTreeMap::new(),
                });
                p.seqs.insert(disk_name.clone(), seq);
            }
            summary.records += n;
            summary.segments += 1;
            expected = seg.last_seq + 1;
        }
        summary.disks += 1;
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

/// The object path of a disk's descriptor.
pub fn descriptor_path(machine: &str, disk: &str) -> Path {
    Path::from(format!("{}/disk.json", layout::disk_prefix(machine, disk)))
}

//! Replay: reads a disk's segments from blob storage, authenticates and decodes them, and applies
//! their records in sequence order onto an image file, up to a chosen sequence number. The read
//! path of the master target builds on the same listing and decoding.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use futures::TryStreamExt;
use object_store::ObjectStore;
use thiserror::Error;

use crate::blob::{self, layout, BlobError};
use crate::crypto::Key;
use crate::record::{LogRecord, RecordKind};
use crate::segment::{SegmentError, SegmentIndex};

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("blob store: {0}")]
    Store(#[from] object_store::Error),
    #[error("segment {name} belongs to {found}, not {expected}")]
    Misplaced {
        name: String,
        found: String,
        expected: String,
    },
    #[error("the log of {machine}/{disk} has a gap: sequence {expected} is missing (next segment starts at {found})")]
    Gap {
        machine: String,
        disk: String,
        expected: u64,
        found: u64,
    },
    #[error("record seq {seq} writes {offset}+{len}, beyond the {size}-byte image")]
    OutOfRange { seq: u64, offset: u64, len: u64, size: u64 },
    #[error("{machine}/{disk} at seq {seq} is past retention: the base image starts at seq {base}")]
    Expired {
        machine: String,
        disk: String,
        seq: u64,
        base: u64,
    },
    #[error("data key {key_id} of {machine}/{disk} is not in blob storage")]
    MissingKey { machine: String, disk: String, key_id: u32 },
    #[error("image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A segment object as listed.
#[derive(Debug, Clone)]
pub struct SegmentRef {
    pub path: object_store::path::Path,
    pub first_seq: u64,
    pub last_seq: u64,
    pub size: u64,
}

/// Lists a disk's segments in sequence order.
pub async fn list_segments(store: &dyn ObjectStore, machine: &str, disk: &str) -> Result<Vec<SegmentRef>, ReplayError> {
    let metas: Vec<_> = store.list(Some(&layout::segments(machine, disk))).try_collect().await?;
    Ok(segment_refs(metas))
}

/// Lists a disk's segments whose first sequence is `first` or later, in sequence order (names
/// sort by sequence, so the store lists only those where it can).
pub async fn list_segments_from(
    store: &dyn ObjectStore,
    machine: &str,
    disk: &str,
    first: u64,
) -> Result<Vec<SegmentRef>, ReplayError> {
    let prefix = layout::segments(machine, disk);
    let offset = object_store::path::Path::from(format!("{prefix}/{first:020}"));
    let metas: Vec<_> = store.list_with_offset(Some(&prefix), &offset).try_collect().await?;
    let mut out = segment_refs(metas);
    out.retain(|s| s.first_seq >= first);
    Ok(out)
}

fn segment_refs(metas: Vec<object_store::ObjectMeta>) -> Vec<SegmentRef> {
    let mut out: Vec<SegmentRef> = metas
        .into_iter()
        .filter_map(|m| {
            let (first_seq, last_seq) = layout::parse_segment_name(&m.location)?;
            Some(SegmentRef {
                path: m.location,
                first_seq,
                last_seq,
                size: m.size,
            })
        })
        .collect();
    out.sort_by_key(|s| (s.first_seq, s.last_seq));
    out
}

/// Reads, authenticates and decodes one whole segment object (log segment or base part) of
/// `machine/disk`; returns its index (header, chunk table) and records.
pub async fn read_object(
    store: &dyn ObjectStore,
    kek: &Key,
    keys: &mut HashMap<u32, Key>,
    machine: &str,
    disk: &str,
    path: &object_store::path::Path,
) -> Result<(SegmentIndex, Vec<LogRecord>), ReplayError> {
    let name = path.to_string();
    let data = store.get(path).await?.bytes().await?;
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
    let decoded = tokio::task::spawn_blocking(move || -> Result<_, SegmentError> {
        let (index, key) = SegmentIndex::from_object(&data, |_| Ok(key.clone()), &name)?;
        let records = index.read_all(&key, &data, &name)?;
        Ok((index, records))
    })
    .await
    .expect("decode task")?;
    Ok(decoded)
}

/// Reads, authenticates and decodes one whole log segment, checking it is the one listed.
pub async fn read_segment(
    store: &dyn ObjectStore,
    kek: &Key,
    keys: &mut HashMap<u32, Key>,
    machine: &str,
    disk: &str,
    seg: &SegmentRef,
) -> Result<Vec<LogRecord>, ReplayError> {
    let (index, records) = read_object(store, kek, keys, machine, disk, &seg.path).await?;
    let h = &index.header;
    if h.first_seq != seg.first_seq || h.last_seq != seg.last_seq {
        return Err(ReplayError::Misplaced {
            name: seg.path.to_string(),
            found: format!("seq {}..={}", h.first_seq, h.last_seq),
            expected: format!("seq {}..={}", seg.first_seq, seg.last_seq),
        });
    }
    Ok(records)
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub segments: usize,
    pub records: u64,
    /// Highest sequence number applied.
    pub last_seq: u64,
    /// Bookmarks seen: `(seq, point id, label)`.
    pub bookmarks: Vec<(u64, u64, String)>,
}

/// Applies `machine/disk`'s log, up to and including `until_seq` (all of it if `None`), onto the
/// image at `image` (created or truncated to `size` bytes, starting from zeros).
pub async fn replay_disk(
    store: &dyn ObjectStore,
    kek: &Key,
    machine: &str,
    disk: &str,
    size: u64,
    until_seq: Option<u64>,
    image: &Path,
) -> Result<ReplayOutcome, ReplayError> {
    let io = |source| ReplayError::Io {
        path: image.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(image)
        .map_err(io)?;
    file.set_len(size).map_err(io)?;
    let until = until_seq.unwrap_or(u64::MAX);
    let mut keys = HashMap::new();
    let mut outcome = ReplayOutcome::default();
    let file = std::sync::Arc::new(file);
    // Start from the base image, if retention rolled the oldest log into one.
    if let Some(base) = blob::get_base_manifest(store, machine, disk).await? {
        if until < base.through_seq {
            return Err(ReplayError::Expired {
                machine: machine.into(),
                disk: disk.into(),
                seq: until,
                base: base.through_seq,
            });
        }
        for part in &base.parts {
            let path = object_store::path::Path::from(part.as_str());
            let (index, records) = read_object(store, kek, &mut keys, machine, disk, &path).await?;
            if index.header.first_seq != base.through_seq || index.header.last_seq != base.through_seq {
                return Err(ReplayError::Misplaced {
                    name: part.clone(),
                    found: format!("seq {}..={}", index.header.first_seq, index.header.last_seq),
                    expected: format!("base through seq {}", base.through_seq),
                });
            }
            let f = file.clone();
            let path = image.display().to_string();
            let (n, _) = tokio::task::spawn_blocking(move || apply_records(&f, &records, size, &path))
                .await
                .expect("apply task")?;
            outcome.records += n;
            outcome.segments += 1;
        }
        outcome.last_seq = base.through_seq;
    }
    for seg in list_segments(store, machine, disk).await? {
        if seg.last_seq <= outcome.last_seq {
            continue; // fully covered by what is applied (a re-upload of an older range)
        }
        if seg.first_seq > until {
            break;
        }
        if seg.first_seq > outcome.last_seq + 1 {
            return Err(ReplayError::Gap {
                machine: machine.into(),
                disk: disk.into(),
                expected: outcome.last_seq + 1,
                found: seg.first_seq,
            });
        }
        let records = read_segment(store, kek, &mut keys, machine, disk, &seg).await?;
        outcome.segments += 1;
        let applied_through = outcome.last_seq;
        let todo: Vec<LogRecord> = records
            .into_iter()
            .filter(|r| r.seq > applied_through && r.seq <= until)
            .collect();
        for r in &todo {
            if r.kind == RecordKind::Bookmark {
                outcome
                    .bookmarks
                    .push((r.seq, r.offset, String::from_utf8_lossy(&r.payload).into_owned()));
            }
        }
        let f = file.clone();
        let path = image.display().to_string();
        let (n, last) = tokio::task::spawn_blocking(move || apply_records(&f, &todo, size, &path))
            .await
            .expect("apply task")?;
        outcome.records += n;
        if last > outcome.last_seq {
            outcome.last_seq = last;
        }
        if seg.last_seq >= until {
            break;
        }
    }
    file.sync_all().map_err(io)?;
    Ok(outcome)
}

/// Writes records onto an image; returns how many and the last seq.
pub fn apply_records(
    file: &std::fs::File,
    records: &[LogRecord],
    size: u64,
    path: &str,
) -> Result<(u64, u64), ReplayError> {
    let io = |source| ReplayError::Io {
        path: path.to_owned(),
        source,
    };
    let zeros = vec![0u8; 1 << 20];
    let mut last = 0;
    for r in records {
        last = r.seq;
        match r.kind {
            RecordKind::Bookmark | RecordKind::CrashPoint => {}
            RecordKind::PackedWrite => unreachable!("segment chunks refuse packed writes when opened"),
            RecordKind::Write | RecordKind::Zero => {
                if r.end() > size || (r.kind == RecordKind::Write && r.payload.len() != r.len as usize) {
                    return Err(ReplayError::OutOfRange {
                        seq: r.seq,
                        offset: r.offset,
                        len: r.len as u64,
                        size,
                    });
                }
                if r.kind == RecordKind::Write {
                    file.write_all_at(&r.payload, r.offset).map_err(io)?;
                } else {
                    let mut off = r.offset;
                    while off < r.end() {
                        let n = ((r.end() - off) as usize).min(zeros.len());
                        file.write_all_at(&zeros[..n], off).map_err(io)?;
                        off += n as u64;
                    }
                }
            }
        }
    }
    Ok((records.len() as u64, last))
}

//! The read side's catalogue in the appliance's RocksDB: the segments each disk has in blob storage
//! (with their authenticated headers and chunk tables, so a reader fetches one chunk by a ranged
//! GET) and the extent index that finds, for any block and recovery point, the write to read.
//!
//! ```text
//! segments: disk_id u32 ‖ segment id u64         → SegmentEntry (versioned, CRC32C)
//!           disk_id u32 ‖ u64::MAX                → BaseState
//! extents:  disk_id u32 ‖ block u64 ‖ seq u64    → ExtentVersion (versioned, CRC32C)
//! ```
//! Keys are big-endian, so the versions of one block sort by sequence number and one
//! `seek_for_prev(disk ‖ block ‖ point_seq)` lands on the newest version a point sees. A write
//! that covers only part of a block is followed by older versions until the block is covered.
//! A log segment's id is its `first_seq`; a base image part's id has the top bit set (see
//! [`base_part_id`]). Both families are derived data: `lifeboat index rebuild` refills them from blob storage alone.

use bytes::{Buf, BufMut};
use rocksdb::{WriteBatch, DB};
use thiserror::Error;

use crate::record::{LogRecord, RecordKind};

pub const CF_SEGMENTS: &str = "segments";
pub const CF_EXTENTS: &str = "extents";
/// Granularity of the extent index: 64 KiB, the agent's block size.
pub const INDEX_BLOCK: u64 = crate::journal::BLOCK_SIZE;
const FORMAT_VERSION: u8 = 1;
/// Segment ids with this bit are base image parts.
pub const BASE_ID: u64 = 1 << 63;
const BASE_STATE_ID: u64 = u64::MAX;

/// The catalogue id of part `part` of base generation `generation`.
pub fn base_part_id(generation: u64, part: u32) -> u64 {
    BASE_ID | ((generation & 0xff_ffff_ffff) << 22) | (part as u64 & 0x3f_ffff)
}

/// Which base image generation the catalogue holds for a disk, and the sequence it is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BaseState {
    pub generation: u64,
    pub through_seq: u64,
}

impl BaseState {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![FORMAT_VERSION];
        v.put_u64(self.generation);
        v.put_u64(self.through_seq);
        seal(v)
    }
    fn decode(v: &[u8]) -> Result<Self, CatalogError> {
        let mut b = unseal(v, "base state")?;
        if b.len() != 16 {
            return Err(corrupt("base state", "wrong length"));
        }
        Ok(Self {
            generation: b.get_u64(),
            through_seq: b.get_u64(),
        })
    }
}

/// The base image state of a disk (default: none yet).
pub fn base_state(db: &DB, disk_id: u32) -> Result<BaseState, CatalogError> {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    match db.get_pinned_cf(segs, segment_key(disk_id, BASE_STATE_ID))? {
        Some(v) => BaseState::decode(&v),
        None => Ok(BaseState::default()),
    }
}

pub fn put_base_state(db: &DB, wb: &mut WriteBatch, disk_id: u32, state: BaseState) {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    wb.put_cf(segs, segment_key(disk_id, BASE_STATE_ID), state.encode());
}

/// Removes a segment's catalogue entry (its extents are removed by the caller).
pub fn delete_segment(db: &DB, wb: &mut WriteBatch, disk_id: u32, id: u64) {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    wb.delete_cf(segs, segment_key(disk_id, id));
}

/// Every extent key of a disk with seq ≤ `through`, grouped by block in block order.
pub fn extents_through(db: &DB, disk_id: u32, through: u64) -> Result<Vec<(u64, Vec<u64>)>, CatalogError> {
    let exts = db.cf_handle(CF_EXTENTS).expect("extents cf");
    let mut it = db.raw_iterator_cf(exts);
    it.seek(disk_id.to_be_bytes());
    let mut out: Vec<(u64, Vec<u64>)> = Vec::new();
    while let Some(k) = it.key() {
        if k.len() != 20 || k[..4] != disk_id.to_be_bytes() {
            break;
        }
        let block = u64::from_be_bytes(k[4..12].try_into().expect("8 bytes"));
        let seq = u64::from_be_bytes(k[12..].try_into().expect("8 bytes"));
        if seq <= through {
            match out.last_mut() {
                Some((b, seqs)) if *b == block => seqs.push(seq),
                _ => out.push((block, vec![seq])),
            }
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// Removes one extent key.
pub fn delete_extent(db: &DB, wb: &mut WriteBatch, disk_id: u32, block: u64, seq: u64) {
    let exts = db.cf_handle(CF_EXTENTS).expect("extents cf");
    wb.delete_cf(exts, extent_key(disk_id, block, seq));
}

/// A switch to a new base image, first half: every extent version of the disk at or before the
/// base's `through_seq` out (`blocks` as [`extents_through`] lists them). The new base parts'
/// extents are indexed after this, into the same batch, so a version at exactly `through_seq`
/// ends up being the base's.
pub fn drop_extents(db: &DB, wb: &mut WriteBatch, disk_id: u32, blocks: &[(u64, Vec<u64>)]) {
    for (block, seqs) in blocks {
        for seq in seqs {
            delete_extent(db, wb, disk_id, *block, *seq);
        }
    }
}

/// A switch to a new base image, second half: the segment entries it replaces out (`removed`:
/// the log segments it covers and the previous generation's parts) and the new state in. The
/// whole switch is one `WriteBatch`, so readers see the old catalogue or the new one.
pub fn switch_base(
    db: &DB,
    wb: &mut WriteBatch,
    disk_id: u32,
    removed: impl IntoIterator<Item = u64>,
    state: BaseState,
) {
    for id in removed {
        delete_segment(db, wb, disk_id, id);
    }
    put_base_state(db, wb, disk_id, state);
}

/// Removes every catalogue entry of a disk (segments, base state, extents), synced: before its
/// catalogue is made again from blob storage.
pub fn clear_disk(db: &DB, disk_id: u32) -> Result<(), rocksdb::Error> {
    let from = disk_id.to_be_bytes().to_vec();
    let mut to = from.clone();
    to.extend([0xff; 17]); // past every 12-byte segment key and 20-byte extent key of the disk
    let mut wb = WriteBatch::default();
    for cf in [CF_SEGMENTS, CF_EXTENTS] {
        wb.delete_range_cf(db.cf_handle(cf).expect("catalogue cf"), &from, &to);
    }
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(wb, &wo)
}

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("catalogue database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("corrupt catalogue entry ({what}): {reason}; run `lifeboat index rebuild`")]
    Corrupt { what: &'static str, reason: String },
}

fn corrupt(what: &'static str, reason: impl Into<String>) -> CatalogError {
    CatalogError::Corrupt {
        what,
        reason: reason.into(),
    }
}

/// Appends a CRC32C of everything before it.
fn seal(mut v: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&v);
    v.put_u32(crc);
    v
}

/// Checks the trailing CRC32C and the format version; returns the body after the version byte.
fn unseal<'a>(v: &'a [u8], what: &'static str) -> Result<&'a [u8], CatalogError> {
    if v.len() < 5 {
        return Err(corrupt(what, "truncated"));
    }
    let (body, crc) = v.split_at(v.len() - 4);
    if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt(what, "checksum mismatch"));
    }
    if body[0] != FORMAT_VERSION {
        return Err(corrupt(what, format!("unsupported version {}", body[0])));
    }
    Ok(&body[1..])
}

/// Where one sealed chunk lies in its segment object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    pub offset: u64,
    pub sealed_len: u32,
    pub raw_len: u32,
}

/// One segment of a disk, as a reader needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    /// Object path in the blob store.
    pub path: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Nonce prefix of the segment's chunks.
    pub counter: u64,
    pub key_id: u32,
    /// The encoded header: every chunk's AES-GCM associated data.
    pub header_bytes: Vec<u8>,
    pub chunks: Vec<ChunkLoc>,
}

impl SegmentEntry {
    /// The entry of a segment whose index was read and authenticated.
    pub fn from_index(path: &str, index: &crate::segment::SegmentIndex) -> Self {
        Self {
            path: path.to_owned(),
            first_seq: index.header.first_seq,
            last_seq: index.header.last_seq,
            counter: index.header.counter,
            key_id: index.header.key_id,
            header_bytes: index.header_bytes.clone(),
            chunks: index
                .chunks
                .iter()
                .map(|c| ChunkLoc {
                    offset: c.offset,
                    sealed_len: c.sealed_len,
                    raw_len: c.raw_len,
                })
                .collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.path.len() + self.header_bytes.len() + self.chunks.len() * 16);
        v.put_u8(FORMAT_VERSION);
        v.put_u64(self.first_seq);
        v.put_u64(self.last_seq);
        v.put_u64(self.counter);
        v.put_u32(self.key_id);
        v.put_u16(self.path.len() as u16);
        v.put_slice(self.path.as_bytes());
        v.put_u32(self.header_bytes.len() as u32);
        v.put_slice(&self.header_bytes);
        v.put_u32(self.chunks.len() as u32);
        for c in &self.chunks {
            v.put_u64(c.offset);
            v.put_u32(c.sealed_len);
            v.put_u32(c.raw_len);
        }
        seal(v)
    }

    pub fn decode(v: &[u8]) -> Result<Self, CatalogError> {
        const WHAT: &str = "segment";
        let mut b = unseal(v, WHAT)?;
        let need = |b: &[u8], n: usize| {
            if b.len() < n {
                Err(corrupt(WHAT, "truncated"))
            } else {
                Ok(())
            }
        };
        need(b, 8 * 3 + 4 + 2)?;
        let (first_seq, last_seq, counter, key_id) = (b.get_u64(), b.get_u64(), b.get_u64(), b.get_u32());
        let plen = b.get_u16() as usize;
        need(b, plen + 4)?;
        let path = String::from_utf8(b[..plen].to_vec()).map_err(|_| corrupt(WHAT, "path not UTF-8"))?;
        b.advance(plen);
        let hlen = b.get_u32() as usize;
        need(b, hlen + 4)?;
        let header_bytes = b[..hlen].to_vec();
        b.advance(hlen);
        let n = b.get_u32() as usize;
        need(b, n * 16)?;
        let chunks = (0..n)
            .map(|_| ChunkLoc {
                offset: b.get_u64(),
                sealed_len: b.get_u32(),
                raw_len: b.get_u32(),
            })
            .collect();
        Ok(Self {
            path,
            first_seq,
            last_seq,
            counter,
            key_id,
            header_bytes,
            chunks,
        })
    }
}

/// One version of (part of) one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentVersion {
    pub seq: u64,
    /// `Write` (data in a segment chunk) or `Zero` (reads as zeros).
    pub kind: RecordKind,
    /// The catalogue id of the segment holding the data.
    pub segment: u64,
    pub chunk: u32,
    /// Offset, in the chunk's decompressed bytes, of the byte at block offset `start`.
    pub pos: u32,
    /// The covered range within the block: `[start, end)`.
    pub start: u32,
    pub end: u32,
}

impl ExtentVersion {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        v.put_u8(FORMAT_VERSION);
        v.put_u8(self.kind as u8);
        v.put_u64(self.segment);
        v.put_u32(self.chunk);
        v.put_u32(self.pos);
        v.put_u32(self.start);
        v.put_u32(self.end);
        seal(v)
    }

    fn decode(seq: u64, v: &[u8]) -> Result<Self, CatalogError> {
        const WHAT: &str = "extent";
        let mut b = unseal(v, WHAT)?;
        if b.len() != 1 + 8 + 4 * 4 {
            return Err(corrupt(WHAT, "wrong length"));
        }
        let kind = match b.get_u8() {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            k => return Err(corrupt(WHAT, format!("kind {k}"))),
        };
        Ok(Self {
            seq,
            kind,
            segment: b.get_u64(),
            chunk: b.get_u32(),
            pos: b.get_u32(),
            start: b.get_u32(),
            end: b.get_u32(),
        })
    }
}

pub fn segment_key(disk_id: u32, first_seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&disk_id.to_be_bytes());
    k[4..].copy_from_slice(&first_seq.to_be_bytes());
    k
}

pub fn extent_key(disk_id: u32, block: u64, seq: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&disk_id.to_be_bytes());
    k[4..12].copy_from_slice(&block.to_be_bytes());
    k[12..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Adds a sealed segment (catalogue id `id`: `first_seq` for log segments, [`base_part_id`] for
/// base parts) and the extents of its records to `wb`. Idempotent: re-indexing a segment writes
/// the same keys.
pub fn index_segment(db: &DB, wb: &mut WriteBatch, disk_id: u32, id: u64, entry: &SegmentEntry, records: &[LogRecord]) {
    let positions = crate::segment::record_positions(records);
    index_segment_at(db, wb, disk_id, id, entry, records, &positions);
}

/// [`index_segment`] with the records' `(chunk, payload position)` computed beforehand, while
/// they still had their payloads: only their headers (kind, seq, offset, len) are read here.
pub fn index_segment_at(
    db: &DB,
    wb: &mut WriteBatch,
    disk_id: u32,
    id: u64,
    entry: &SegmentEntry,
    records: &[LogRecord],
    positions: &[(u32, u32)],
) {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    let exts = db.cf_handle(CF_EXTENTS).expect("extents cf");
    wb.put_cf(segs, segment_key(disk_id, id), entry.encode());
    assert_eq!(records.len(), positions.len(), "a position per record");
    for (r, &(chunk, payload_pos)) in records.iter().zip(positions) {
        if !matches!(r.kind, RecordKind::Write | RecordKind::Zero) || r.len == 0 {
            continue;
        }
        let first = r.offset / INDEX_BLOCK;
        let last = (r.end() - 1) / INDEX_BLOCK;
        for block in first..=last {
            let base = block * INDEX_BLOCK;
            let start = r.offset.max(base) - base;
            let end = r.end().min(base + INDEX_BLOCK) - base;
            let pos = match r.kind {
                RecordKind::Write => payload_pos as u64 + (base + start - r.offset),
                _ => 0,
            };
            let v = ExtentVersion {
                seq: r.seq,
                kind: r.kind,
                segment: id,
                chunk,
                pos: pos as u32,
                start: start as u32,
                end: end as u32,
            };
            wb.put_cf(exts, extent_key(disk_id, block, r.seq), v.encode());
        }
    }
}

/// Reads one disk's segment entry.
pub fn segment(db: &DB, disk_id: u32, first_seq: u64) -> Result<Option<SegmentEntry>, CatalogError> {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    db.get_pinned_cf(segs, segment_key(disk_id, first_seq))?
        .map(|v| SegmentEntry::decode(&v))
        .transpose()
}

/// Every segment entry of a disk with its id: log segments in sequence order, then base parts.
pub fn segments(db: &DB, disk_id: u32) -> Result<Vec<(u64, SegmentEntry)>, CatalogError> {
    let segs = db.cf_handle(CF_SEGMENTS).expect("segments cf");
    let mut it = db.raw_iterator_cf(segs);
    it.seek(disk_id.to_be_bytes());
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(&disk_id.to_be_bytes()) || k.len() != 12 {
            break;
        }
        let id = u64::from_be_bytes(k[4..].try_into().expect("8 bytes"));
        if id != BASE_STATE_ID {
            out.push((id, SegmentEntry::decode(v)?));
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// For each block of `blocks`, the versions a reader at `seq` needs, newest first: the newest
/// version with seq ≤ `seq`, then older ones until one covers the whole block (`block_len`
/// bytes; the disk's last block may be short). An empty list means the block was never written.
pub fn block_versions(
    db: &DB,
    disk_id: u32,
    blocks: std::ops::Range<u64>,
    seq: u64,
    block_len: impl Fn(u64) -> u32,
) -> Result<Vec<Vec<ExtentVersion>>, CatalogError> {
    let exts = db.cf_handle(CF_EXTENTS).expect("extents cf");
    let mut it = db.raw_iterator_cf(exts);
    let mut out = Vec::with_capacity((blocks.end - blocks.start) as usize);
    for block in blocks {
        let mut versions = Vec::new();
        let prefix = extent_key(disk_id, block, 0);
        it.seek_for_prev(extent_key(disk_id, block, seq));
        let full = block_len(block);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 20 || k[..12] != prefix[..12] {
                break;
            }
            let vseq = u64::from_be_bytes(k[12..].try_into().expect("8 bytes"));
            let ver = ExtentVersion::decode(vseq, v)?;
            let covers = ver.start == 0 && ver.end >= full;
            versions.push(ver);
            if covers {
                break;
            }
            it.prev();
        }
        it.status()?;
        out.push(versions);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn entries_round_trip_and_detect_damage() {
        let e = SegmentEntry {
            path: "machines/m/disks/d/segments/x.lbseg".into(),
            first_seq: 5,
            last_seq: 9,
            counter: 3,
            key_id: 1,
            header_bytes: vec![1, 2, 3],
            chunks: vec![ChunkLoc {
                offset: 10,
                sealed_len: 20,
                raw_len: 30,
            }],
        };
        let v = e.encode();
        assert_eq!(SegmentEntry::decode(&v).unwrap(), e);
        let mut bad = v.clone();
        bad[7] ^= 1;
        assert!(SegmentEntry::decode(&bad).is_err());
    }

    #[test]
    fn newest_version_at_or_before_a_point_and_partial_cover() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf(&opts, dir.path(), [CF_SEGMENTS, CF_EXTENTS]).unwrap();
        let rec = |seq, offset, len: usize| LogRecord {
            kind: RecordKind::Write,
            seq,
            time_ms: 0,
            offset,
            len: len as u32,
            payload: Bytes::from(vec![seq as u8; len]),
        };
        // seq 1: blocks 0-1 whole; seq 2: 4 KiB inside block 1; seq 3: block 0 whole.
        let records = vec![
            rec(1, 0, 128 << 10),
            rec(2, (64 << 10) + 4096, 4096),
            rec(3, 0, 64 << 10),
        ];
        let entry = SegmentEntry {
            path: "p".into(),
            first_seq: 1,
            last_seq: 3,
            counter: 1,
            key_id: 1,
            header_bytes: vec![],
            chunks: vec![],
        };
        let mut wb = WriteBatch::default();
        index_segment(&db, &mut wb, 7, 1, &entry, &records);
        db.write(wb).unwrap();
        let full = |_| (64 << 10) as u32;
        let at = |seq| block_versions(&db, 7, 0..3, seq, full).unwrap();
        let seqs = |v: &Vec<ExtentVersion>| v.iter().map(|x| x.seq).collect::<Vec<_>>();
        let v = at(1);
        assert_eq!(seqs(&v[0]), [1]);
        assert_eq!(seqs(&v[1]), [1]);
        assert!(v[2].is_empty());
        let v = at(2);
        assert_eq!(seqs(&v[1]), [2, 1], "a partial write needs the version under it");
        assert_eq!(v[1][0].start, 4096);
        let v = at(3);
        assert_eq!(seqs(&v[0]), [3]);
        assert_eq!(seqs(&v[1]), [2, 1]);
        assert!(at(0).iter().all(|b| b.is_empty()), "nothing before the first write");
        // Payload positions point at the block's bytes inside the chunk.
        let pos = crate::segment::record_positions(&records);
        assert_eq!(at(1)[1][0].pos as u64, pos[0].1 as u64 + (64 << 10));
        // Another disk's blocks are invisible.
        assert!(block_versions(&db, 8, 0..3, 9, full)
            .unwrap()
            .iter()
            .all(|b| b.is_empty()));
    }
}

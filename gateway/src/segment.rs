//! The segment: the unit of the log in blob storage. One segment holds a contiguous sequence range
//! of one disk's records, packed into ~1 MiB chunks that are each zstd-compressed and then sealed
//! with AES-256-GCM, followed by a sealed index of the chunks so readers can fetch only what they
//! need with ranged GETs.
//!
//! ```text
//! segment := header | sealed_chunk* | sealed_index | trailer
//! header  := "LBSEG\0v1" | version u16 | machine (u8 len + utf8) | disk (u8 len + utf8) | key_id u32
//!          | counter u64 | first_seq u64 | last_seq u64 | first_ms u64 | last_ms u64
//!          | chunk_count u32 | raw_bytes u64 | crc32c u32 (over the header before it)
//! chunk i := AES-GCM(DEK, nonce = counter‖i, aad = header, zstd(records))
//! index   := AES-GCM(DEK, nonce = counter‖0xFFFFFFFF, aad = header, entry*)
//! entry   := offset u64 | sealed_len u32 | raw_len u32 | first_seq u64 | last_seq u64 | min_off u64 | max_end u64
//! trailer := index_offset u64 | index_len u32 | crc32c u32 (over the 12 bytes before) | "LBSEGEND"
//! ```
//! The header is authenticated data of every chunk, so a changed header byte fails them all; the
//! CRCs only give clearer errors for plain-text damage. A segment is built deterministically from
//! its records, key and counter, so re-uploading after a crash writes the very same bytes.

use bytes::{Buf, BufMut, Bytes};
use rayon::prelude::*;
use thiserror::Error;

use crate::crypto::{self, CryptoError, Key};
use crate::record::{LogRecord, RecordError, RecordKind, FIXED_LEN};

pub const SEGMENT_MAGIC: &[u8; 8] = b"LBSEG\0v1";
pub const TRAILER_MAGIC: &[u8; 8] = b"LBSEGEND";
pub const SEGMENT_VERSION: u16 = 1;
/// Raw bytes per chunk before compression (a record larger than this gets a chunk of its own).
pub const CHUNK_RAW_BYTES: usize = 1 << 20;
/// zstd level: 1 is the fast end, where compression keeps up with the network.
pub const ZSTD_LEVEL: i32 = 1;
pub const TRAILER_LEN: usize = 8 + 4 + 4 + 8;
const INDEX_ENTRY_LEN: usize = 8 + 4 + 4 + 8 + 8 + 8 + 8;
const INDEX_NONCE_INDEX: u32 = u32::MAX;

#[derive(Debug, Error)]
pub enum SegmentError {
    #[error("segment {name}: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("segment {name}: {source}")]
    Crypto {
        name: String,
        #[source]
        source: CryptoError,
    },
}

/// The plain-text header of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub machine: String,
    pub disk: String,
    pub key_id: u32,
    /// Per-disk segment counter: the nonce prefix, unique for the disk's key.
    pub counter: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    pub chunk_count: u32,
    pub raw_bytes: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        b.put_slice(SEGMENT_MAGIC);
        b.put_u16(SEGMENT_VERSION);
        b.put_u8(self.machine.len() as u8);
        b.put_slice(self.machine.as_bytes());
        b.put_u8(self.disk.len() as u8);
        b.put_slice(self.disk.as_bytes());
        b.put_u32(self.key_id);
        b.put_u64(self.counter);
        b.put_u64(self.first_seq);
        b.put_u64(self.last_seq);
        b.put_u64(self.first_ms);
        b.put_u64(self.last_ms);
        b.put_u32(self.chunk_count);
        b.put_u64(self.raw_bytes);
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        b
    }

    /// Parses a header from the front of `data`; returns it and its encoded length.
    pub fn decode(data: &[u8], name: &str) -> Result<(Self, usize), SegmentError> {
        let corrupt = |reason: &str| SegmentError::Corrupt {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        let mut b = data;
        let take = |b: &mut &[u8], n: usize| -> Result<(), SegmentError> {
            if b.remaining() < n {
                Err(corrupt("truncated header"))
            } else {
                Ok(())
            }
        };
        take(&mut b, 8 + 2 + 1)?;
        if &b[..8] != SEGMENT_MAGIC {
            return Err(corrupt("not a Lifeboat segment (bad magic)"));
        }
        b.advance(8);
        let version = b.get_u16();
        if version != SEGMENT_VERSION {
            return Err(corrupt(&format!("unsupported segment version {version}")));
        }
        let ml = b.get_u8() as usize;
        take(&mut b, ml + 1)?;
        let machine = String::from_utf8(b[..ml].to_vec()).map_err(|_| corrupt("machine name not UTF-8"))?;
        b.advance(ml);
        let dl = b.get_u8() as usize;
        take(&mut b, dl + 4 + 8 * 6 + 4 + 4)?;
        let disk = String::from_utf8(b[..dl].to_vec()).map_err(|_| corrupt("disk name not UTF-8"))?;
        b.advance(dl);
        let h = SegmentHeader {
            machine,
            disk,
            key_id: b.get_u32(),
            counter: b.get_u64(),
            first_seq: b.get_u64(),
            last_seq: b.get_u64(),
            first_ms: b.get_u64(),
            last_ms: b.get_u64(),
            chunk_count: b.get_u32(),
            raw_bytes: b.get_u64(),
        };
        let len = data.len() - b.remaining();
        let crc = b.get_u32();
        if crc32c::crc32c(&data[..len]) != crc {
            return Err(corrupt("header checksum mismatch"));
        }
        Ok((h, len + 4))
    }
}

/// One index entry: where a chunk is and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub offset: u64,
    pub sealed_len: u32,
    pub raw_len: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Lowest disk offset written in the chunk (u64::MAX if it holds only bookmarks).
    pub min_off: u64,
    /// Highest disk end written in the chunk (0 if it holds only bookmarks).
    pub max_end: u64,
}

/// Groups records into chunks of about `CHUNK_RAW_BYTES`.
fn plan_chunks(records: &[LogRecord]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, r) in records.iter().enumerate() {
        let n = r.chunk_len();
        if i > start && size + n > CHUNK_RAW_BYTES {
            out.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < records.len() {
        out.push(start..records.len());
    }
    out
}

/// Where each record's payload lies once built into a segment: `(chunk index, byte offset of the
/// payload in the chunk's decompressed bytes)`, in record order. The extent index stores these.
pub fn record_positions(records: &[LogRecord]) -> Vec<(u32, u32)> {
    let mut out = Vec::with_capacity(records.len());
    for (chunk, range) in plan_chunks(records).into_iter().enumerate() {
        let mut at = 0usize;
        for r in &records[range] {
            out.push((chunk as u32, (at + crate::record::FIXED_LEN) as u32));
            at += r.chunk_len();
        }
    }
    out
}

/// Per-thread buffers of the chunk builders: the raw chunk and a zstd context, reused from chunk
/// to chunk instead of allocating (and faulting in) fresh ones each time. A reused context gives
/// the same bytes as a fresh one at the same level, so segments stay deterministic.
struct ChunkScratch {
    raw: Vec<u8>,
    /// Compressed output at its worst-case size; the chunk keeps only a right-sized copy, so a
    /// segment in flight holds its compressed bytes, not 1 MiB of mostly untouched capacity each.
    out: Vec<u8>,
    zstd: zstd::bulk::Compressor<'static>,
}

thread_local! {
    static CHUNK_SCRATCH: std::cell::RefCell<ChunkScratch> = std::cell::RefCell::new(ChunkScratch {
        raw: Vec::with_capacity(CHUNK_RAW_BYTES + (64 << 10)),
        out: Vec::new(),
        zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd context"),
    });
}

/// A segment's chunks compressed but not sealed yet. Compression needs neither the key nor the
/// segment counter, so the uploader compresses the next segment while the previous one is being
/// put; sealing (fast) waits for the counter of the segment's plan.
pub struct CompressedChunks {
    /// Per chunk: compressed bytes (with room for the tag), raw length, record range.
    chunks: Vec<(Vec<u8>, u32, std::ops::Range<usize>)>,
    records: usize,
    first_seq: u64,
    last_seq: u64,
}

/// Compresses the chunks of a future segment of `records` in parallel on the rayon pool.
pub fn compress_chunks(records: &[LogRecord]) -> CompressedChunks {
    assert!(!records.is_empty(), "a segment holds at least one record");
    let chunks = plan_chunks(records)
        .into_par_iter()
        .map(|range| {
            let recs = &records[range.clone()];
            let raw_len: usize = recs.iter().map(LogRecord::chunk_len).sum();
            let compressed = CHUNK_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let ChunkScratch { raw, out, zstd } = &mut *scratch;
                if recs.iter().any(|r| r.kind == RecordKind::PackedWrite) {
                    return chunk_of_frames(recs, raw, zstd);
                }
                raw.clear();
                for r in recs {
                    r.encode_into(raw);
                }
                out.clear();
                out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
                zstd.compress_to_buffer(raw.as_slice(), out)
                    .expect("zstd compress to memory");
                // Room for the tag too, so sealing needs no second buffer.
                let mut chunk = crate::pool::vec_with_room(&CHUNKS, out.len() + crypto::TAG_LEN);
                chunk.extend_from_slice(out);
                chunk
            });
            (compressed, raw_len as u32, range)
        })
        .collect();
    CompressedChunks {
        chunks,
        records: records.len(),
        first_seq: records[0].seq,
        last_seq: records[records.len() - 1].seq,
    }
}

/// A chunk holding packed writes: their zstd frames as the agent made them, and the record
/// headers (and any unpacked records) between them as frames of their own, so the chunk decodes
/// as one zstd stream to exactly the bytes of the unpacked records. Returns the frames with room
/// for the AES-GCM tag.
fn chunk_of_frames(recs: &[LogRecord], pending: &mut Vec<u8>, zstd: &mut zstd::bulk::Compressor<'static>) -> Vec<u8> {
    // Headers and small records are framed raw; a run with write data in it is compressed.
    const COMPRESS_FROM: usize = 4096;
    let flush = |pending: &mut Vec<u8>, chunk: &mut Vec<u8>, zstd: &mut zstd::bulk::Compressor<'static>| {
        if pending.len() >= COMPRESS_FROM {
            crate::zstd_frame::compress_append(zstd, pending, chunk);
        } else if !pending.is_empty() {
            crate::zstd_frame::raw_frame(chunk, pending);
        }
        pending.clear();
    };
    let room: usize = recs
        .iter()
        .map(|r| match r.kind {
            RecordKind::PackedWrite => r.payload.len() + crate::zstd_frame::raw_frame_len(FIXED_LEN),
            _ => crate::zstd_frame::raw_frame_len(r.encoded_len()),
        })
        .sum();
    let mut chunk = crate::pool::vec_with_room(&CHUNKS, room + crypto::TAG_LEN);
    pending.clear();
    for r in recs {
        if r.kind == RecordKind::PackedWrite {
            pending.extend_from_slice(&r.chunk_head());
            flush(pending, &mut chunk, zstd);
            chunk.extend_from_slice(&r.payload);
        } else {
            r.encode_into(pending);
        }
    }
    flush(pending, &mut chunk, zstd);
    chunk.reserve(crypto::TAG_LEN);
    chunk
}

impl CompressedChunks {
    /// Whether these are the chunks of exactly `records`.
    pub fn matches(&self, records: &[LogRecord]) -> bool {
        self.records == records.len()
            && records.first().map(|r| r.seq) == Some(self.first_seq)
            && records.last().map(|r| r.seq) == Some(self.last_seq)
    }
}

/// Builds a segment from records of one disk, in sequence order. Compression and sealing of the
/// chunks run in parallel on the rayon pool.
pub fn build_segment(
    machine: &str,
    disk: &str,
    key_id: u32,
    counter: u64,
    key: &Key,
    records: &[LogRecord],
) -> (SegmentHeader, Bytes) {
    seal_segment(machine, disk, key_id, counter, key, records, compress_chunks(records))
}

/// Seals chunks compressed by [`compress_chunks`] from the same `records` into a segment: the
/// very bytes [`build_segment`] gives.
pub fn seal_segment(
    machine: &str,
    disk: &str,
    key_id: u32,
    counter: u64,
    key: &Key,
    records: &[LogRecord],
    compressed: CompressedChunks,
) -> (SegmentHeader, Bytes) {
    assert!(compressed.matches(records), "compressed chunks of other records");
    let header = SegmentHeader {
        machine: machine.to_owned(),
        disk: disk.to_owned(),
        key_id,
        counter,
        first_seq: records[0].seq,
        last_seq: records[records.len() - 1].seq,
        first_ms: records.iter().map(|r| r.time_ms).min().unwrap_or(0),
        last_ms: records.iter().map(|r| r.time_ms).max().unwrap_or(0),
        chunk_count: compressed.chunks.len() as u32,
        raw_bytes: records.iter().map(|r| r.chunk_len() as u64).sum(),
    };
    let header_bytes = header.encode();
    let sealed: Vec<(Vec<u8>, u32, &[LogRecord])> = compressed
        .chunks
        .into_par_iter()
        .enumerate()
        .map(|(i, (mut out, raw_len, range))| {
            crypto::seal_in_place(key, crypto::chunk_nonce(counter, i as u32), &header_bytes, &mut out);
            (out, raw_len, &records[range])
        })
        .collect();
    let total: usize = header_bytes.len() + sealed.iter().map(|s| s.0.len()).sum::<usize>();
    // Assembled at a 4 KiB-aligned address: a local-folder put writes it with direct I/O as it
    // is, with no staging copy.
    let mut out = SEALED.take().unwrap_or_default();
    out.clear();
    out.reserve(total + sealed.len() * INDEX_ENTRY_LEN + 64);
    out.put(&header_bytes);
    let mut index = Vec::with_capacity(sealed.len() * INDEX_ENTRY_LEN);
    for (bytes, raw_len, recs) in &sealed {
        let (min_off, max_end) = recs
            .iter()
            .filter(|r| matches!(r.kind, RecordKind::Write | RecordKind::Zero | RecordKind::PackedWrite))
            .fold((u64::MAX, 0u64), |(lo, hi), r| (lo.min(r.offset), hi.max(r.end())));
        index.put_u64(out.len() as u64);
        index.put_u32(bytes.len() as u32);
        index.put_u32(*raw_len);
        index.put_u64(recs[0].seq);
        index.put_u64(recs[recs.len() - 1].seq);
        index.put_u64(min_off);
        index.put_u64(max_end);
        out.put(bytes);
    }
    let index_offset = out.len() as u64;
    let sealed_index = crypto::seal(
        key,
        crypto::chunk_nonce(counter, INDEX_NONCE_INDEX),
        &header_bytes,
        &index,
    );
    out.put(&sealed_index);
    let mut trailer = Vec::with_capacity(TRAILER_LEN);
    trailer.put_u64(index_offset);
    trailer.put_u32(sealed_index.len() as u32);
    let crc = crc32c::crc32c(&trailer);
    trailer.put_u32(crc);
    trailer.put_slice(TRAILER_MAGIC);
    out.put(&trailer);
    for (chunk, _, _) in sealed {
        CHUNKS.give(chunk);
    }
    (header, SEALED.share(out))
}

/// Chunk buffers, back from sealed segments: a segment's worth (16 MiB of journal bytes, in
/// chunks of at most 1 MiB), so that chunks are built in memory already mapped.
static CHUNKS: std::sync::LazyLock<std::sync::Arc<crate::pool::Pool<Vec<u8>>>> =
    std::sync::LazyLock::new(|| crate::pool::Pool::new(40));

/// Buffers of sealed segments, back once a segment's put is done: a few segments are in flight.
static SEALED: std::sync::LazyLock<std::sync::Arc<crate::pool::Pool<crate::direct_io::AlignedBuf>>> =
    std::sync::LazyLock::new(|| crate::pool::Pool::new(2));

/// A segment whose header and index have been read and authenticated.
#[derive(Debug, Clone)]
pub struct SegmentIndex {
    pub header: SegmentHeader,
    pub header_bytes: Vec<u8>,
    pub chunks: Vec<ChunkEntry>,
}

/// Parses the trailer (the last `TRAILER_LEN` bytes): index offset and length.
pub fn parse_trailer(trailer: &[u8], name: &str) -> Result<(u64, u32), SegmentError> {
    let corrupt = |reason: &str| SegmentError::Corrupt {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if trailer.len() != TRAILER_LEN {
        return Err(corrupt("truncated trailer"));
    }
    if &trailer[16..] != TRAILER_MAGIC {
        return Err(corrupt("bad trailer magic (truncated upload?)"));
    }
    let crc = u32::from_be_bytes(trailer[12..16].try_into().expect("4"));
    if crc32c::crc32c(&trailer[..12]) != crc {
        return Err(corrupt("trailer checksum mismatch"));
    }
    let off = u64::from_be_bytes(trailer[..8].try_into().expect("8"));
    let len = u32::from_be_bytes(trailer[8..12].try_into().expect("4"));
    Ok((off, len))
}

impl SegmentIndex {
    /// Reads header, trailer and index from a whole segment object.
    pub fn from_object(
        data: &[u8],
        key_for: impl Fn(&SegmentHeader) -> Result<Key, SegmentError>,
        name: &str,
    ) -> Result<(Self, Key), SegmentError> {
        let corrupt = |reason: String| SegmentError::Corrupt {
            name: name.to_owned(),
            reason,
        };
        let (header, hlen) = SegmentHeader::decode(data, name)?;
        if data.len() < hlen + TRAILER_LEN {
            return Err(corrupt("truncated segment".into()));
        }
        let (ioff, ilen) = parse_trailer(&data[data.len() - TRAILER_LEN..], name)?;
        let iend = ioff
            .checked_add(ilen as u64)
            .ok_or_else(|| corrupt("index range overflows".into()))?;
        if ioff < hlen as u64 || iend != (data.len() - TRAILER_LEN) as u64 {
            return Err(corrupt("index range outside the segment".into()));
        }
        let key = key_for(&header)?;
        let header_bytes = data[..hlen].to_vec();
        let index = Self::open_index(&header, header_bytes, &key, &data[ioff as usize..iend as usize], name)?;
        Ok((index, key))
    }

    /// Authenticates and parses the sealed index.
    pub fn open_index(
        header: &SegmentHeader,
        header_bytes: Vec<u8>,
        key: &Key,
        sealed: &[u8],
        name: &str,
    ) -> Result<Self, SegmentError> {
        let corrupt = |reason: String| SegmentError::Corrupt {
            name: name.to_owned(),
            reason,
        };
        let plain = crypto::open(
            key,
            crypto::chunk_nonce(header.counter, INDEX_NONCE_INDEX),
            &header_bytes,
            sealed,
            &format!("{name} (index)"),
        )
        .map_err(|source| SegmentError::Crypto {
            name: name.to_owned(),
            source,
        })?;
        if plain.len() != header.chunk_count as usize * INDEX_ENTRY_LEN {
            return Err(corrupt(format!(
                "index holds {} bytes for {} chunks",
                plain.len(),
                header.chunk_count
            )));
        }
        let mut b = plain.as_slice();
        let mut chunks = Vec::with_capacity(header.chunk_count as usize);
        for _ in 0..header.chunk_count {
            chunks.push(ChunkEntry {
                offset: b.get_u64(),
                sealed_len: b.get_u32(),
                raw_len: b.get_u32(),
                first_seq: b.get_u64(),
                last_seq: b.get_u64(),
                min_off: b.get_u64(),
                max_end: b.get_u64(),
            });
        }
        Ok(Self {
            header: header.clone(),
            header_bytes,
            chunks,
        })
    }

    /// Authenticates, decompresses and decodes chunk `i` from its sealed bytes.
    pub fn open_chunk(&self, key: &Key, i: usize, sealed: &[u8], name: &str) -> Result<Vec<LogRecord>, SegmentError> {
        let corrupt = |reason: String| SegmentError::Corrupt {
            name: name.to_owned(),
            reason,
        };
        let entry = self.chunks.get(i).ok_or_else(|| corrupt(format!("no chunk {i}")))?;
        let compressed = crypto::open(
            key,
            crypto::chunk_nonce(self.header.counter, i as u32),
            &self.header_bytes,
            sealed,
            &format!("{name} (chunk {i})"),
        )
        .map_err(|source| SegmentError::Crypto {
            name: name.to_owned(),
            source,
        })?;
        let raw = zstd::bulk::decompress(&compressed, entry.raw_len as usize)
            .map_err(|e| corrupt(format!("chunk {i} does not decompress: {e}")))?;
        if raw.len() != entry.raw_len as usize {
            return Err(corrupt(format!(
                "chunk {i} decompressed to {} bytes, index says {}",
                raw.len(),
                entry.raw_len
            )));
        }
        let mut b = Bytes::from(raw);
        let mut out = Vec::new();
        while b.has_remaining() {
            let r = LogRecord::decode_from(&mut b).map_err(|e: RecordError| corrupt(format!("chunk {i}: {e}")))?;
            if r.kind == RecordKind::PackedWrite {
                return Err(corrupt(format!("chunk {i}: a packed write, which only journals hold")));
            }
            out.push(r);
        }
        Ok(out)
    }

    /// Decodes every record of a whole segment object, checking sequence order and range.
    pub fn read_all(&self, key: &Key, data: &[u8], name: &str) -> Result<Vec<LogRecord>, SegmentError> {
        let corrupt = |reason: String| SegmentError::Corrupt {
            name: name.to_owned(),
            reason,
        };
        let mut out = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            let end = c
                .offset
                .checked_add(c.sealed_len as u64)
                .filter(|e| *e <= data.len() as u64);
            let end = end.ok_or_else(|| corrupt(format!("chunk {i} lies outside the object")))?;
            out.extend(self.open_chunk(key, i, &data[c.offset as usize..end as usize], name)?);
        }
        // Log segments hold strictly increasing sequence numbers; a base image part (first_seq ==
        // last_seq) holds many records that all carry that one number.
        let base = self.header.first_seq == self.header.last_seq;
        let mut prev: Option<u64> = None;
        for r in &out {
            let out_of_order = prev.is_some_and(|p| if base { r.seq != p } else { r.seq <= p });
            if out_of_order || r.seq < self.header.first_seq || r.seq > self.header.last_seq {
                return Err(corrupt(format!("record sequence {} out of order or range", r.seq)));
            }
            prev = Some(r.seq);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(n: u64, size: usize) -> Vec<LogRecord> {
        (0..n)
            .map(|i| LogRecord {
                kind: RecordKind::Write,
                seq: 10 + i,
                time_ms: 1000 + i,
                offset: i * size as u64,
                len: size as u32,
                payload: Bytes::from(vec![(i % 251) as u8; size]),
            })
            .collect()
    }

    #[test]
    fn round_trip_is_deterministic() {
        let key = Key::random();
        let records = recs(40, 100_000);
        let (h, a) = build_segment("m", "disk0", 1, 5, &key, &records);
        let (_, b) = build_segment("m", "disk0", 1, 5, &key, &records);
        assert_eq!(a, b, "same inputs must give the same bytes");
        assert!(h.chunk_count > 1);
        let (idx, k) = SegmentIndex::from_object(&a, |_| Ok(key.clone()), "s").unwrap();
        assert_eq!(idx.read_all(&k, &a, "s").unwrap(), records);
    }

    #[test]
    fn compressing_ahead_gives_the_same_segment() {
        let key = Key::random();
        let records = recs(30, 70_000);
        let (_, a) = build_segment("m", "disk0", 1, 5, &key, &records);
        let pre = compress_chunks(&records);
        assert!(pre.matches(&records));
        assert!(!pre.matches(&records[1..]));
        let (_, b) = seal_segment("m", "disk0", 1, 5, &key, &records, pre);
        assert_eq!(a, b);
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let key = Key::random();
        let records = recs(3, 3000);
        let (_, seg) = build_segment("m", "d", 1, 9, &key, &records);
        assert_flips_refused(&seg, &key, 7);
    }

    /// Every `step`-th byte of `seg` flipped makes reading it fail (flipping every byte is
    /// quadratic, so tests step through).
    fn assert_flips_refused(seg: &[u8], key: &Key, step: usize) {
        for i in (0..seg.len()).step_by(step) {
            let mut bad = seg.to_vec();
            bad[i] ^= 0x01;
            let res = SegmentIndex::from_object(&bad, |_| Ok(key.clone()), "s")
                .and_then(|(idx, k)| idx.read_all(&k, &bad, "s"));
            assert!(res.is_err(), "flip at byte {i} of {} was accepted", seg.len());
        }
    }

    /// `records` with every write of at least 4 KiB packed as an agent would send it.
    fn packed(records: &[LogRecord]) -> Vec<LogRecord> {
        let mut zstd = crate::zstd_frame::checked_compressor();
        records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if r.kind == RecordKind::Write && r.payload.len() >= 4096 {
                    let mut frame = Vec::new();
                    crate::zstd_frame::compress_append(&mut zstd, &r.payload, &mut frame);
                    r.kind = RecordKind::PackedWrite;
                    r.payload = Bytes::from(frame);
                }
                r
            })
            .collect()
    }

    #[test]
    fn packed_writes_read_back_as_the_writes_they_hold() {
        let key = Key::random();
        let mut records = recs(40, 100_000);
        // Mixed in: a small unpacked write, a zero range and a bookmark between packed writes.
        records[3].payload = Bytes::from(vec![5u8; 100]);
        records[3].len = 100;
        records[7].kind = RecordKind::Zero;
        records[7].payload = Bytes::new();
        records[9] = LogRecord {
            kind: RecordKind::Bookmark,
            seq: records[9].seq,
            time_ms: 5,
            offset: 77,
            len: 5,
            payload: Bytes::from_static(b"label"),
        };
        let packed = packed(&records);
        assert!(packed.iter().filter(|r| r.kind == RecordKind::PackedWrite).count() >= 30);
        let (h, seg) = build_segment("m", "disk0", 1, 5, &key, &packed);
        let (plain_h, _) = build_segment("m", "disk0", 1, 5, &key, &records);
        assert_eq!(h, plain_h, "the header counts the bytes the chunks decode to");
        assert_eq!(record_positions(&packed), record_positions(&records));
        let (idx, k) = SegmentIndex::from_object(&seg, |_| Ok(key.clone()), "s").unwrap();
        assert_eq!(idx.read_all(&k, &seg, "s").unwrap(), records);
        // Each chunk holds about 1 MiB of decoded bytes, as plain chunks do.
        let plain = compress_chunks(&records);
        let ahead = compress_chunks(&packed);
        let ranges = |c: &CompressedChunks| c.chunks.iter().map(|(_, n, r)| (*n, r.clone())).collect::<Vec<_>>();
        assert_eq!(ranges(&ahead), ranges(&plain));
        assert_flips_refused(&seg, &key, 4099);
    }

    #[test]
    fn wrong_key_is_refused() {
        let (_, seg) = build_segment("m", "d", 1, 9, &Key::random(), &recs(2, 10));
        let err = SegmentIndex::from_object(&seg, |_| Ok(Key::random()), "seg-x").unwrap_err();
        assert!(err.to_string().contains("seg-x"), "{err}");
    }
}

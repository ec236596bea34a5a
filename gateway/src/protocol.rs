//! The ingest wire format: one HTTP request body carries one *batch* of records (block writes,
//! zeroed ranges, bookmarks) for one machine. Versioned, length-checked and CRC32C-protected so a
//! truncated, oversized or corrupted body is refused with a precise error instead of a panic.
//!
//! ```text
//! batch   := magic "LBAT" | version u16 | flags u16 | count u32 | record* | crc32c u32 (over all before)
//! record  := kind u8 | disk_len u8 | disk utf8 | offset u64 | len u32 | crc32c(payload) u32
//!            [version 3, packed writes only: payload_len u32] | payload
//!            [version 2+, writes and packed writes: sum_count u32 | sum_count × 16-byte block checksum]
//! ```
//! All integers are big-endian. `payload` is the data of a write, empty for a zero range (whose
//! length is `len`), and the UTF-8 label of a bookmark (`disk` empty, `offset` 0).
//!
//! Version 2 carries, after each write's payload, the agent's delta-sync checksum of every 64 KiB
//! block the write touches (the agent hashed them to diff anyway), so the server does not hash
//! the data a second time. The body CRC still covers them and every payload.
//!
//! Version 3 adds the *packed write* (kind 5): its payload is the agent's zstd frame of the
//! write's `len` bytes, with the content size and a content checksum ([`crate::zstd_frame`]).
//! The server checks the frame's structure, keeps it as it came and builds segment chunks
//! around it, so the data is compressed once, on the protected machine, and crosses the network,
//! the journal and the cache compressed. [`pack_batch`] turns a body of writes into packed ones.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Magic bytes that open every batch.
pub const BATCH_MAGIC: &[u8; 4] = b"LBAT";
/// Current batch format version (2: writes carry their blocks' checksums; 3: packed writes).
pub const BATCH_VERSION: u16 = 3;
/// The oldest batch format version the server still accepts (no block checksums).
pub const BATCH_VERSION_MIN: u16 = 1;
/// The version [`BatchBuilder`] writes: its bodies hold no packed writes, so an appliance that
/// predates them takes them too (`agent sync --no-compress`).
const BATCH_VERSION_SUMS: u16 = 2;
/// Largest batch body the server accepts.
pub const MAX_BATCH_BYTES: usize = 64 << 20;
/// Largest single record payload (a write extent).
pub const MAX_RECORD_BYTES: usize = 8 << 20;
/// Largest number of records in one batch.
pub const MAX_RECORDS: u32 = 1 << 20;

const BATCH_HEADER_LEN: usize = 4 + 2 + 2 + 4;
const RECORD_FIXED_LEN: usize = 1 + 1 + 8 + 4 + 4;

/// What a record does to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Write `payload` at `offset`.
    Write = 1,
    /// The range `[offset, offset+len)` now reads as zeros.
    Zero = 2,
    /// An app-consistent bookmark for the whole machine.
    Bookmark = 3,
    /// A crash-consistent point the process server cut on its timer. Never sent by agents: a
    /// batch holding one is refused.
    CrashPoint = 4,
    /// A write of `len` bytes at `offset` whose payload is a zstd frame of the data (version 3
    /// batches, and the journal). Segment chunks hold it as the [`RecordKind::Write`] it
    /// decompresses to, so readers of segments never see this kind.
    PackedWrite = 5,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Write),
            2 => Some(Self::Zero),
            3 => Some(Self::Bookmark),
            5 => Some(Self::PackedWrite),
            _ => None,
        }
    }
}

/// One record of a batch as the agent sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestRecord {
    pub kind: RecordKind,
    pub disk: String,
    pub offset: u64,
    /// Length of the affected range (the payload length for writes).
    pub len: u32,
    pub payload: Bytes,
}

impl IngestRecord {
    pub fn write(disk: &str, offset: u64, data: Bytes) -> Self {
        Self {
            kind: RecordKind::Write,
            disk: disk.to_owned(),
            offset,
            len: data.len() as u32,
            payload: data,
        }
    }
    pub fn zero(disk: &str, offset: u64, len: u32) -> Self {
        Self {
            kind: RecordKind::Zero,
            disk: disk.to_owned(),
            offset,
            len,
            payload: Bytes::new(),
        }
    }
    /// A crash-consistent point; the process server makes these, agents cannot send them.
    pub fn crash_point() -> Self {
        Self {
            kind: RecordKind::CrashPoint,
            disk: String::new(),
            offset: 0,
            len: 0,
            payload: Bytes::new(),
        }
    }
    pub fn bookmark(label: &str) -> Self {
        let payload = Bytes::copy_from_slice(label.as_bytes());
        Self {
            kind: RecordKind::Bookmark,
            disk: String::new(),
            offset: 0,
            len: payload.len() as u32,
            payload,
        }
    }
    /// Bytes this record takes in a batch body.
    pub fn encoded_len(&self) -> usize {
        let packed_len = if self.kind == RecordKind::PackedWrite { 4 } else { 0 };
        RECORD_FIXED_LEN + self.disk.len() + packed_len + self.payload.len()
    }
}

/// Why a batch body was refused. Each names the byte position where parsing stopped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("batch is {0} bytes, more than the {MAX_BATCH_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("truncated batch: needed {needed} more bytes at byte {at}")]
    Truncated { at: usize, needed: usize },
    #[error("not a Lifeboat batch (bad magic)")]
    BadMagic,
    #[error("unsupported batch version {0} (this server speaks {BATCH_VERSION_MIN} to {BATCH_VERSION})")]
    BadVersion(u16),
    #[error("batch checksum mismatch: the body was corrupted in transit")]
    BadChecksum,
    #[error("record {index}: unknown kind {kind}")]
    BadKind { index: u32, kind: u8 },
    #[error("record {index}: payload checksum mismatch")]
    BadRecordChecksum { index: u32 },
    #[error("record {index}: {reason}")]
    BadRecord { index: u32, reason: &'static str },
    #[error("record {index}: {source}")]
    BadFrame {
        index: u32,
        source: crate::zstd_frame::FrameCheckError,
    },
    #[error("batch declares {declared} records but holds {found}")]
    CountMismatch { declared: u32, found: u32 },
    #[error("batch declares {0} records, more than the limit")]
    TooManyRecords(u32),
}

/// Blocks of the delta-sync checksum table that the range `[offset, offset+len)` touches.
pub fn blocks_touched(offset: u64, len: u32) -> u64 {
    if len == 0 {
        return 0;
    }
    let bs = crate::journal::BLOCK_SIZE;
    (offset + len as u64 - 1) / bs - offset / bs + 1
}

/// Builds a version 2 batch body in place, record by record: write payloads are copied once,
/// straight from the agent's read buffer into the body, with their block checksums alongside.
pub struct BatchBuilder {
    buf: BytesMut,
    count: u32,
    /// The write being built: where its header starts, its payload CRC, its block checksums.
    open: Option<OpenWrite>,
    /// CRC32C of the body from the first record on, kept as records close, so that the body CRC
    /// needs no second pass over the payloads.
    crc: u32,
    crc_len: usize,
}

struct OpenWrite {
    header_at: usize,
    payload_at: usize,
    payload_crc: u32,
    sums: Vec<u8>,
}

impl BatchBuilder {
    pub fn new(capacity: usize) -> Self {
        Self::with_buffer(BytesMut::with_capacity(capacity))
    }

    /// A builder writing into `buf` (cleared first): a sent body's memory, reused.
    pub fn with_buffer(mut buf: BytesMut) -> Self {
        buf.clear();
        buf.put_slice(BATCH_MAGIC);
        buf.put_u16(BATCH_VERSION_SUMS);
        buf.put_u16(0);
        buf.put_u32(0);
        Self {
            buf,
            count: 0,
            open: None,
            crc: 0,
            crc_len: BATCH_HEADER_LEN,
        }
    }

    pub fn records(&self) -> u32 {
        self.count + u32::from(self.open.is_some())
    }

    /// Bytes of the body so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records() == 0
    }

    fn add_crc(&mut self, upto: usize) {
        self.crc = crc32c::crc32c_append(self.crc, &self.buf[self.crc_len..upto]);
        self.crc_len = upto;
    }

    /// Starts a write record at `offset` of `disk` (closing any open one).
    pub fn begin_write(&mut self, disk: &str, offset: u64) {
        self.close_write();
        let header_at = self.buf.len();
        put_record_head(&mut self.buf, RecordKind::Write, disk, offset, 0);
        self.buf.put_u32(0);
        self.open = Some(OpenWrite {
            header_at,
            payload_at: self.buf.len(),
            payload_crc: 0,
            sums: Vec::new(),
        });
    }

    /// Appends one block (with its delta-sync checksum) to the open write.
    pub fn push_block(&mut self, data: &[u8], checksum: &[u8; 16]) {
        let w = self.open.as_mut().expect("push_block after begin_write");
        w.payload_crc = crc32c::crc32c_append(w.payload_crc, data);
        w.sums.extend_from_slice(checksum);
        self.buf.put_slice(data);
    }

    /// Closes the open write, if any: fills in its length and CRC, appends its checksums.
    pub fn close_write(&mut self) {
        let Some(w) = self.open.take() else { return };
        let len = (self.buf.len() - w.payload_at) as u32;
        self.buf[w.payload_at - 8..w.payload_at - 4].copy_from_slice(&len.to_be_bytes());
        self.buf[w.payload_at - 4..w.payload_at].copy_from_slice(&w.payload_crc.to_be_bytes());
        // Body CRC: the bytes up to the payload, then the payload by combining its CRC.
        debug_assert!(self.crc_len <= w.header_at);
        self.add_crc(w.payload_at);
        self.crc = crate::crc::combine(self.crc, w.payload_crc, len as usize);
        self.crc_len = self.buf.len();
        self.buf.put_u32((w.sums.len() / 16) as u32);
        self.buf.put_slice(&w.sums);
        self.count += 1;
    }

    /// Adds a zero-range record.
    pub fn zero(&mut self, disk: &str, offset: u64, len: u32) {
        self.close_write();
        put_record_head(&mut self.buf, RecordKind::Zero, disk, offset, len);
        self.buf.put_u32(crc32c::crc32c(&[]));
        self.count += 1;
    }

    /// Closes the body: record count and body CRC.
    pub fn finish(mut self) -> Bytes {
        self.close_write();
        let end = self.buf.len();
        self.buf[8..12].copy_from_slice(&self.count.to_be_bytes());
        self.add_crc(end);
        let head = crc32c::crc32c(&self.buf[..BATCH_HEADER_LEN]);
        let crc = crate::crc::combine(head, self.crc, end - BATCH_HEADER_LEN);
        self.buf.put_u32(crc);
        self.buf.freeze()
    }
}

/// A record's fields before its CRC: kind, disk name (length-prefixed), offset, length.
fn put_record_head(buf: &mut impl BufMut, kind: RecordKind, disk: &str, offset: u64, len: u32) {
    buf.put_u8(kind as u8);
    buf.put_u8(disk.len() as u8);
    buf.put_slice(disk.as_bytes());
    buf.put_u64(offset);
    buf.put_u32(len);
}

/// Encodes records into one batch body (version 1: no block checksums; the server hashes).
pub fn encode_batch(records: &[IngestRecord]) -> Bytes {
    let size = BATCH_HEADER_LEN + records.iter().map(IngestRecord::encoded_len).sum::<usize>() + 4;
    let mut buf = BytesMut::with_capacity(size);
    buf.put_slice(BATCH_MAGIC);
    buf.put_u16(BATCH_VERSION_MIN);
    buf.put_u16(0);
    buf.put_u32(records.len() as u32);
    for r in records {
        put_record_head(&mut buf, r.kind, &r.disk, r.offset, r.len);
        buf.put_u32(crc32c::crc32c(&r.payload));
        buf.put_slice(&r.payload);
    }
    let crc = crc32c::crc32c(&buf);
    buf.put_u32(crc);
    buf.freeze()
}

thread_local! {
    /// The agent's compressor for packed writes, one per packing thread.
    static PACKER: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(crate::zstd_frame::checked_compressor());
}

/// Builds a version 3 body of packed writes in place: each write's data is compressed straight
/// from the caller's memory (the agent's read buffer) into the body as one zstd frame (level 1,
/// with its content size and checksum), so block data is never copied raw on the way out.
pub struct PackedBatchBuilder {
    out: Vec<u8>,
    count: u32,
    /// Bytes of write data taken in (before compression).
    data: usize,
    /// CRC32C of the body after its header, kept up to `crc_at`: each frame's CRC is combined
    /// in rather than the frame read a second time.
    crc: u32,
    crc_at: usize,
}

impl PackedBatchBuilder {
    /// A builder writing into `out` (cleared first): a sent body's memory, reused.
    pub fn with_buffer(mut out: Vec<u8>) -> Self {
        out.clear();
        out.put_slice(BATCH_MAGIC);
        out.put_u16(BATCH_VERSION);
        out.put_u16(0);
        out.put_u32(0);
        Self {
            out,
            count: 0,
            data: 0,
            crc: 0,
            crc_at: BATCH_HEADER_LEN,
        }
    }

    pub fn records(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of write data in the body, as written to the disk (before compression).
    pub fn data_len(&self) -> usize {
        self.data
    }

    fn head(&mut self, kind: RecordKind, disk: &str, offset: u64, len: u32) {
        put_record_head(&mut self.out, kind, disk, offset, len);
        self.count += 1;
    }

    /// Appends a write of `data` at `offset` of `disk`, compressed, with the delta-sync checksums
    /// of the blocks it touches (16 bytes each).
    pub fn write(&mut self, disk: &str, offset: u64, data: &[u8], sums: &[u8]) {
        debug_assert_eq!(sums.len() as u64, 16 * blocks_touched(offset, data.len() as u32));
        self.head(RecordKind::PackedWrite, disk, offset, data.len() as u32);
        let fields = self.out.len();
        self.out.put_u32(0);
        self.out.put_u32(0);
        let frame_len =
            PACKER.with(|packer| crate::zstd_frame::compress_append(&mut packer.borrow_mut(), data, &mut self.out));
        let frame_crc = crc32c::crc32c(&self.out[fields + 8..]);
        self.out[fields..fields + 4].copy_from_slice(&frame_crc.to_be_bytes());
        self.out[fields + 4..fields + 8].copy_from_slice(&(frame_len as u32).to_be_bytes());
        self.crc = crc32c::crc32c_append(self.crc, &self.out[self.crc_at..fields + 8]);
        self.crc = crate::crc::combine(self.crc, frame_crc, frame_len);
        self.crc_at = self.out.len();
        self.out.put_u32((sums.len() / 16) as u32);
        self.out.put_slice(sums);
        self.data += data.len();
    }

    /// Appends a zero-range record.
    pub fn zero(&mut self, disk: &str, offset: u64, len: u32) {
        self.record(RecordKind::Zero, disk, offset, len, &[]);
    }

    /// Appends a record that is not a write (a zero range, a bookmark) as it is.
    fn record(&mut self, kind: RecordKind, disk: &str, offset: u64, len: u32, payload: &[u8]) {
        self.head(kind, disk, offset, len);
        self.out.put_u32(crc32c::crc32c(payload));
        self.out.put_slice(payload);
    }

    /// Closes the body: record count and body CRC.
    pub fn finish(mut self) -> Bytes {
        let end = self.out.len();
        self.out[8..12].copy_from_slice(&self.count.to_be_bytes());
        let rest = crc32c::crc32c_append(self.crc, &self.out[self.crc_at..end]);
        let head = crc32c::crc32c(&self.out[..BATCH_HEADER_LEN]);
        let crc = crate::crc::combine(head, rest, end - BATCH_HEADER_LEN);
        self.out.put_u32(crc);
        Bytes::from(self.out)
    }
}

/// Re-encodes a batch body whose writes carry block checksums (what [`BatchBuilder`] makes) as
/// a version 3 body of packed writes, as [`PackedBatchBuilder`] builds them. Zero ranges and
/// bookmarks stay as they are. `out` is a spent body's memory to build into (cleared first).
pub fn pack_batch(body: &Bytes, out: Vec<u8>) -> Result<Bytes, FrameError> {
    let mut packed = PackedBatchBuilder::with_buffer(out);
    for (index, (r, sums, _)) in decode_batch_with_sums(body.clone())?.into_iter().enumerate() {
        if r.kind != RecordKind::Write {
            packed.record(r.kind, &r.disk, r.offset, r.len, &r.payload);
            continue;
        }
        let Some(sums) = sums else {
            return Err(FrameError::BadRecord {
                index: index as u32,
                reason: "a write without block checksums cannot be packed",
            });
        };
        packed.write(&r.disk, r.offset, &r.payload, &sums);
    }
    Ok(packed.finish())
}

fn need(buf: &Bytes, at: usize, n: usize) -> Result<(), FrameError> {
    if buf.remaining() < n {
        Err(FrameError::Truncated {
            at,
            needed: n - buf.remaining(),
        })
    } else {
        Ok(())
    }
}

/// Decodes and verifies a batch body. Payloads share the body's memory (no copy).
pub fn decode_batch(body: Bytes) -> Result<Vec<IngestRecord>, FrameError> {
    Ok(decode_batch_with_sums(body)?.into_iter().map(|(r, _, _)| r).collect())
}

/// Like [`decode_batch`], also returning each write's block checksums when the agent sent them
/// (version 2): 16 bytes per block in [`blocks_touched`], sharing the body's memory; and each
/// record's payload CRC32C, verified, so that the payload log need not read the payload again.
pub fn decode_batch_with_sums(body: Bytes) -> Result<Vec<(IngestRecord, Option<Bytes>, u32)>, FrameError> {
    if body.len() > MAX_BATCH_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let total = body.len();
    let mut buf = body.clone();
    need(&buf, 0, BATCH_HEADER_LEN + 4)?;
    if &buf[..4] != BATCH_MAGIC {
        return Err(FrameError::BadMagic);
    }
    buf.advance(4);
    let version = buf.get_u16();
    if !(BATCH_VERSION_MIN..=BATCH_VERSION).contains(&version) {
        return Err(FrameError::BadVersion(version));
    }
    let _flags = buf.get_u16();
    let count = buf.get_u32();
    if count > MAX_RECORDS {
        return Err(FrameError::TooManyRecords(count));
    }
    // The body checksum covers everything but the trailing 4 bytes.
    let expected = u32::from_be_bytes(body[total - 4..].try_into().expect("4 bytes"));
    // Parse records first so a short body is reported as truncated, not as a checksum error.
    // The body CRC is built along the way, reusing each payload's CRC: one pass over the data.
    let mut body_crc = 0u32;
    let mut crc_at = 0usize;
    let mut records = Vec::with_capacity(count.min(4096) as usize);
    let mut index = 0u32;
    while index < count {
        let at = total - buf.remaining();
        need(&buf, at, RECORD_FIXED_LEN + 4)?;
        let kind_byte = buf.get_u8();
        let kind = RecordKind::from_u8(kind_byte)
            .filter(|k| *k != RecordKind::PackedWrite || version >= 3)
            .ok_or(FrameError::BadKind { index, kind: kind_byte })?;
        let disk_len = buf.get_u8() as usize;
        need(&buf, total - buf.remaining(), disk_len + 16 + 4)?;
        let disk = std::str::from_utf8(&buf[..disk_len])
            .map_err(|_| FrameError::BadRecord {
                index,
                reason: "disk name is not UTF-8",
            })?
            .to_owned();
        buf.advance(disk_len);
        let offset = buf.get_u64();
        let len = buf.get_u32();
        let crc = buf.get_u32();
        let payload_len = match kind {
            RecordKind::Write | RecordKind::Bookmark => len as usize,
            RecordKind::Zero => 0,
            RecordKind::PackedWrite => {
                need(&buf, total - buf.remaining(), 4)?;
                buf.get_u32() as usize
            }
            RecordKind::CrashPoint => unreachable!("from_u8 refuses crash points from agents"),
        };
        let (payload_limit, len_limit) = match kind {
            // An incompressible write's frame is a little larger than the write.
            RecordKind::PackedWrite => (zstd::zstd_safe::compress_bound(MAX_RECORD_BYTES), MAX_RECORD_BYTES),
            _ => (MAX_RECORD_BYTES, usize::MAX),
        };
        if payload_len > payload_limit || len as usize > len_limit {
            return Err(FrameError::BadRecord {
                index,
                reason: "record payload exceeds the 8 MiB limit",
            });
        }
        need(&buf, total - buf.remaining(), payload_len + 4)?;
        let payload = buf.split_to(payload_len);
        let payload_crc = crc32c::crc32c(&payload);
        if payload_crc != crc {
            return Err(FrameError::BadRecordChecksum { index });
        }
        // The body CRC over this record: its header bytes, then the payload's CRC combined.
        let header_end = total - buf.remaining() - payload_len;
        body_crc = crc32c::crc32c_append(body_crc, &body[crc_at..header_end]);
        body_crc = crate::crc::combine(body_crc, payload_crc, payload_len);
        crc_at = header_end + payload_len;
        if kind == RecordKind::PackedWrite {
            crate::zstd_frame::check(&payload, u64::from(len))
                .map_err(|source| FrameError::BadFrame { index, source })?;
        }
        let sums = if version >= 2 && matches!(kind, RecordKind::Write | RecordKind::PackedWrite) {
            need(&buf, total - buf.remaining(), 4 + 4)?;
            let n = buf.get_u32() as u64;
            if n != blocks_touched(offset, len) {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "block checksum count does not match the write's blocks",
                });
            }
            need(&buf, total - buf.remaining(), n as usize * 16 + 4)?;
            Some(buf.split_to(n as usize * 16))
        } else {
            None
        };
        match kind {
            RecordKind::Write | RecordKind::Zero | RecordKind::PackedWrite if disk.is_empty() => {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "write without a disk name",
                })
            }
            RecordKind::Write | RecordKind::Zero | RecordKind::PackedWrite if len == 0 => {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "empty write",
                })
            }
            RecordKind::Write | RecordKind::Zero | RecordKind::PackedWrite
                if offset.checked_add(len as u64).is_none() =>
            {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "offset + length overflows",
                })
            }
            _ => {}
        }
        records.push((
            IngestRecord {
                kind,
                disk,
                offset,
                len,
                payload,
            },
            sums,
            payload_crc,
        ));
        index += 1;
    }
    if buf.remaining() != 4 {
        return Err(FrameError::CountMismatch {
            declared: count,
            found: index,
        });
    }
    body_crc = crc32c::crc32c_append(body_crc, &body[crc_at..total - 4]);
    if body_crc != expected {
        return Err(FrameError::BadChecksum);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<IngestRecord> {
        vec![
            IngestRecord::write("disk0", 4096, Bytes::from(vec![7u8; 8192])),
            IngestRecord::zero("disk1", 0, 65536),
            IngestRecord::bookmark("nightly"),
        ]
    }

    fn built() -> (Bytes, Vec<Option<Vec<u8>>>) {
        let mut b = BatchBuilder::new(1 << 20);
        b.begin_write("disk0", 65536);
        b.push_block(&[7u8; 65536], &[1u8; 16]);
        b.push_block(&[8u8; 65536], &[2u8; 16]);
        b.zero("disk0", 0, 65536);
        b.begin_write("disk1", 0);
        b.push_block(&[9u8; 100], &[3u8; 16]);
        let mut s1 = vec![1u8; 16];
        s1.extend_from_slice(&[2u8; 16]);
        (b.finish(), vec![Some(s1), None, Some(vec![3u8; 16])])
    }

    #[test]
    fn builder_round_trip_with_sums() {
        let (body, sums) = built();
        let got = decode_batch_with_sums(body).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0.offset, 65536);
        assert_eq!(got[0].0.len, 131072);
        assert_eq!(&got[0].0.payload[65536..65537], &[8u8]);
        assert_eq!(got[1].0, IngestRecord::zero("disk0", 0, 65536));
        assert_eq!(got[2].0.payload.as_ref(), &[9u8; 100][..]);
        for (g, want) in got.iter().zip(sums) {
            assert_eq!(g.1.as_ref().map(|b| b.to_vec()), want);
        }
    }

    #[test]
    fn builder_body_every_flip_and_cut_is_refused() {
        let (body, _) = built();
        for i in (0..body.len()).step_by(97).chain(body.len() - 80..body.len()) {
            let mut bad = body.to_vec();
            bad[i] ^= 0x40;
            assert!(decode_batch(Bytes::from(bad)).is_err(), "flip at {i} accepted");
        }
        for cut in (0..body.len()).step_by(101) {
            assert!(decode_batch(body.slice(..cut)).is_err(), "cut at {cut} accepted");
        }
    }

    #[test]
    fn packed_batches_hold_the_writes_compressed_and_refuse_damage() {
        let (body, sums) = built();
        let raw = decode_batch_with_sums(body.clone()).unwrap();
        let packed = pack_batch(&body, Vec::new()).unwrap();
        let got = decode_batch_with_sums(packed.clone()).unwrap();
        assert_eq!(got.len(), raw.len());
        for ((p, psums, _), ((r, _, _), want)) in got.iter().zip(raw.iter().zip(sums)) {
            assert_eq!(psums.as_ref().map(|b| b.to_vec()), want);
            if r.kind == RecordKind::Write {
                assert_eq!(p.kind, RecordKind::PackedWrite);
                assert_eq!((p.disk.as_str(), p.offset, p.len), (r.disk.as_str(), r.offset, r.len));
                assert_eq!(zstd::bulk::decompress(&p.payload, r.len as usize).unwrap(), r.payload);
            } else {
                assert_eq!(p, r);
            }
        }
        // The 128 KiB of repeated bytes are sent as a few dozen.
        assert!(packed.len() < 1000, "packed body of {} bytes", packed.len());
        for i in 0..packed.len() {
            let mut bad = packed.to_vec();
            bad[i] ^= 0x40;
            assert!(decode_batch(Bytes::from(bad)).is_err(), "flip at {i} accepted");
        }
        for cut in 0..packed.len() {
            assert!(decode_batch(packed.slice(..cut)).is_err(), "cut at {cut} accepted");
        }
        // Built bodies stay version 2 (an older appliance takes them); packed ones are 3.
        assert_eq!((&body[4..6], &packed[4..6]), (&[0u8, 2][..], &[0u8, 3][..]));
        // A version 2 body cannot carry packed writes.
        let mut old = packed.to_vec();
        old[5] = 2;
        let end = old.len() - 4;
        let crc = crc32c::crc32c(&old[..end]);
        old[end..].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_batch(Bytes::from(old)),
            Err(FrameError::BadKind { index: 0, kind: 5 })
        ));
    }

    #[test]
    fn a_packed_write_whose_frame_is_not_its_data_is_refused() {
        let frame = Bytes::from(zstd::bulk::compress(&[1u8; 65536], 1).unwrap());
        // No content checksum in the frame: refused, with the record named.
        let mut b = BytesMut::new();
        b.put_slice(BATCH_MAGIC);
        b.put_u16(3);
        b.put_u16(0);
        b.put_u32(1);
        b.put_u8(RecordKind::PackedWrite as u8);
        b.put_u8(5);
        b.put_slice(b"disk0");
        b.put_u64(0);
        b.put_u32(65536);
        b.put_u32(crc32c::crc32c(&frame));
        b.put_u32(frame.len() as u32);
        b.put_slice(&frame);
        b.put_u32(1);
        b.put_slice(&[0u8; 16]);
        let crc = crc32c::crc32c(&b);
        b.put_u32(crc);
        assert_eq!(
            decode_batch(b.freeze()),
            Err(FrameError::BadFrame {
                index: 0,
                source: crate::zstd_frame::FrameCheckError::NoChecksum
            })
        );
    }

    #[test]
    fn round_trip() {
        let body = encode_batch(&sample());
        assert_eq!(decode_batch(body).unwrap(), sample());
    }

    #[test]
    fn every_truncation_is_refused_without_panic() {
        let body = encode_batch(&sample());
        for cut in 0..body.len() {
            let err = decode_batch(body.slice(..cut)).unwrap_err();
            assert!(
                matches!(
                    err,
                    FrameError::Truncated { .. }
                        | FrameError::BadChecksum
                        | FrameError::CountMismatch { .. }
                        | FrameError::BadRecordChecksum { .. }
                ),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let body = encode_batch(&sample());
        for i in 0..body.len() {
            let mut bad = body.to_vec();
            bad[i] ^= 0x40;
            assert!(decode_batch(Bytes::from(bad)).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn oversized_and_wrong_magic() {
        assert_eq!(
            decode_batch(Bytes::from(vec![0u8; MAX_BATCH_BYTES + 1])),
            Err(FrameError::TooLarge(MAX_BATCH_BYTES + 1))
        );
        let mut body = encode_batch(&sample()).to_vec();
        body[0] = b'X';
        assert_eq!(decode_batch(Bytes::from(body)), Err(FrameError::BadMagic));
    }
}

//! The ingest wire format: one HTTP request body carries one *batch* of records (block writes,
//! zeroed ranges, bookmarks) for one machine. Versioned, length-checked and CRC32C-protected so a
//! truncated, oversized or corrupted body is refused with a precise error instead of a panic.
//!
//! ```text
//! batch   := magic "LBAT" | version u16 | flags u16 | count u32 | record* | crc32c u32 (over all before)
//! record  := kind u8 | disk_len u8 | disk utf8 | offset u64 | len u32 | crc32c(payload) u32 | payload
//! ```
//! All integers are big-endian. `payload` is the data of a write, empty for a zero range (whose
//! length is `len`), and the UTF-8 label of a bookmark (`disk` empty, `offset` 0).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Magic bytes that open every batch.
pub const BATCH_MAGIC: &[u8; 4] = b"LBAT";
/// Current batch format version.
pub const BATCH_VERSION: u16 = 1;
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
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Write),
            2 => Some(Self::Zero),
            3 => Some(Self::Bookmark),
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
        RECORD_FIXED_LEN + self.disk.len() + self.payload.len()
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
    #[error("unsupported batch version {0} (this server speaks {BATCH_VERSION})")]
    BadVersion(u16),
    #[error("batch checksum mismatch: the body was corrupted in transit")]
    BadChecksum,
    #[error("record {index}: unknown kind {kind}")]
    BadKind { index: u32, kind: u8 },
    #[error("record {index}: payload checksum mismatch")]
    BadRecordChecksum { index: u32 },
    #[error("record {index}: {reason}")]
    BadRecord { index: u32, reason: &'static str },
    #[error("batch declares {declared} records but holds {found}")]
    CountMismatch { declared: u32, found: u32 },
    #[error("batch declares {0} records, more than the limit")]
    TooManyRecords(u32),
}

/// Encodes records into one batch body.
pub fn encode_batch(records: &[IngestRecord]) -> Bytes {
    let size = BATCH_HEADER_LEN + records.iter().map(IngestRecord::encoded_len).sum::<usize>() + 4;
    let mut buf = BytesMut::with_capacity(size);
    buf.put_slice(BATCH_MAGIC);
    buf.put_u16(BATCH_VERSION);
    buf.put_u16(0);
    buf.put_u32(records.len() as u32);
    for r in records {
        buf.put_u8(r.kind as u8);
        buf.put_u8(r.disk.len() as u8);
        buf.put_slice(r.disk.as_bytes());
        buf.put_u64(r.offset);
        buf.put_u32(r.len);
        buf.put_u32(crc32c::crc32c(&r.payload));
        buf.put_slice(&r.payload);
    }
    let crc = crc32c::crc32c(&buf);
    buf.put_u32(crc);
    buf.freeze()
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
    if version != BATCH_VERSION {
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
    let mut records = Vec::with_capacity(count.min(4096) as usize);
    let mut index = 0u32;
    while index < count {
        let at = total - buf.remaining();
        need(&buf, at, RECORD_FIXED_LEN + 4)?;
        let kind_byte = buf.get_u8();
        let kind = RecordKind::from_u8(kind_byte).ok_or(FrameError::BadKind { index, kind: kind_byte })?;
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
            RecordKind::CrashPoint => unreachable!("from_u8 refuses crash points from agents"),
        };
        if payload_len > MAX_RECORD_BYTES {
            return Err(FrameError::BadRecord {
                index,
                reason: "record payload exceeds the 8 MiB limit",
            });
        }
        need(&buf, total - buf.remaining(), payload_len + 4)?;
        let payload = buf.split_to(payload_len);
        if crc32c::crc32c(&payload) != crc {
            return Err(FrameError::BadRecordChecksum { index });
        }
        match kind {
            RecordKind::Write | RecordKind::Zero if disk.is_empty() => {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "write without a disk name",
                })
            }
            RecordKind::Write | RecordKind::Zero if len == 0 => {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "empty write",
                })
            }
            RecordKind::Write | RecordKind::Zero if offset.checked_add(len as u64).is_none() => {
                return Err(FrameError::BadRecord {
                    index,
                    reason: "offset + length overflows",
                })
            }
            _ => {}
        }
        records.push(IngestRecord {
            kind,
            disk,
            offset,
            len,
            payload,
        });
        index += 1;
    }
    if buf.remaining() != 4 {
        return Err(FrameError::CountMismatch {
            declared: count,
            found: index,
        });
    }
    if crc32c::crc32c(&body[..total - 4]) != expected {
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

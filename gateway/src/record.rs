//! The log record: one committed write, zeroed range or bookmark of one disk, with the sequence
//! number the process server assigned. The same encoding is stored in the journal (plus a CRC32C)
//! and packed into segment chunks (where AES-GCM authenticates it).
//! A packed write (kind 5, journal only) holds the agent's zstd frame as its payload; in a chunk
//! it is the plain write it decompresses to (see [`LogRecord::chunk_head`]).
//!
//! ```text
//! record := kind u8 | seq u64 | time_ms u64 | offset u64 | len u32 | payload_len u32 | payload
//! ```

use bytes::{Buf, BufMut, Bytes};
use thiserror::Error;

pub use crate::protocol::RecordKind;

/// Encoded bytes before the payload.
pub const FIXED_LEN: usize = 1 + 8 + 8 + 8 + 4 + 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub kind: RecordKind,
    /// Per-disk sequence number, assigned at commit, strictly increasing.
    pub seq: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Disk offset (writes, zero ranges) or the recovery point id (bookmarks, crash points).
    pub offset: u64,
    /// Range length (writes, zero ranges) or label length (bookmarks).
    pub len: u32,
    /// Write data, or the bookmark label.
    pub payload: Bytes,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record kind {0}")]
    BadKind(u8),
    #[error("record checksum mismatch")]
    BadChecksum,
}

impl LogRecord {
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + self.payload.len()
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.put_slice(&self.encode_head());
        out.put_slice(&self.payload);
    }

    /// The encoded bytes before the payload.
    pub fn encode_head(&self) -> [u8; FIXED_LEN] {
        let mut head = [0u8; FIXED_LEN];
        let mut out = &mut head[..];
        out.put_u8(self.kind as u8);
        out.put_u64(self.seq);
        out.put_u64(self.time_ms);
        out.put_u64(self.offset);
        out.put_u32(self.len);
        out.put_u32(self.payload.len() as u32);
        head
    }

    /// Decodes one record from the front of `buf`, advancing it.
    pub fn decode_from(buf: &mut Bytes) -> Result<Self, RecordError> {
        if buf.remaining() < FIXED_LEN {
            return Err(RecordError::Truncated);
        }
        let k = buf.get_u8();
        let kind = match k {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Bookmark,
            4 => RecordKind::CrashPoint,
            5 => RecordKind::PackedWrite,
            other => return Err(RecordError::BadKind(other)),
        };
        let seq = buf.get_u64();
        let time_ms = buf.get_u64();
        let offset = buf.get_u64();
        let len = buf.get_u32();
        let payload_len = buf.get_u32() as usize;
        if buf.remaining() < payload_len {
            return Err(RecordError::Truncated);
        }
        let payload = buf.split_to(payload_len);
        Ok(Self {
            kind,
            seq,
            time_ms,
            offset,
            len,
            payload,
        })
    }

    /// Bytes this record takes in a segment chunk's decompressed stream: a packed write as the
    /// plain write it decompresses to.
    pub fn chunk_len(&self) -> usize {
        match self.kind {
            RecordKind::PackedWrite => FIXED_LEN + self.len as usize,
            _ => self.encoded_len(),
        }
    }

    /// The header this record has in a segment chunk: a packed write's is a plain write's of
    /// `len` payload bytes, which its zstd frame decompresses to.
    pub fn chunk_head(&self) -> [u8; FIXED_LEN] {
        let mut head = self.encode_head();
        if self.kind == RecordKind::PackedWrite {
            head[0] = RecordKind::Write as u8;
            head[FIXED_LEN - 4..].copy_from_slice(&self.len.to_be_bytes());
        }
        head
    }

    /// The journal value: the record followed by its CRC32C.
    pub fn to_journal_value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len() + 4);
        self.encode_into(&mut v);
        let crc = crc32c::crc32c(&v);
        v.put_u32(crc);
        v
    }

    pub fn from_journal_value(value: &[u8]) -> Result<Self, RecordError> {
        if value.len() < FIXED_LEN + 4 {
            return Err(RecordError::Truncated);
        }
        let (body, crc) = value.split_at(value.len() - 4);
        if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err(RecordError::BadChecksum);
        }
        let mut b = Bytes::copy_from_slice(body);
        let r = Self::decode_from(&mut b)?;
        if b.has_remaining() {
            return Err(RecordError::Truncated);
        }
        Ok(r)
    }

    /// Like [`Self::from_journal_value`], taking ownership so the payload is not copied again.
    pub fn from_journal_vec(value: Vec<u8>) -> Result<Self, RecordError> {
        Self::from_journal_bytes(Bytes::from(value))
    }

    /// Like [`Self::from_journal_value`]; the payload is a slice of `value`, not a copy.
    pub fn from_journal_bytes(value: Bytes) -> Result<Self, RecordError> {
        if value.len() < FIXED_LEN + 4 {
            return Err(RecordError::Truncated);
        }
        let body_len = value.len() - 4;
        let crc = u32::from_be_bytes(value[body_len..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&value[..body_len]) != crc {
            return Err(RecordError::BadChecksum);
        }
        let mut b = value.slice(..body_len);
        let r = Self::decode_from(&mut b)?;
        if b.has_remaining() {
            return Err(RecordError::Truncated);
        }
        Ok(r)
    }

    /// End of the disk range this record touches (writes and zero ranges).
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_value_round_trip_and_corruption() {
        let r = LogRecord {
            kind: RecordKind::Write,
            seq: 42,
            time_ms: 1_700_000_000_000,
            offset: 65536,
            len: 5,
            payload: Bytes::from_static(b"hello"),
        };
        let v = r.to_journal_value();
        assert_eq!(LogRecord::from_journal_value(&v).unwrap(), r);
        assert_eq!(LogRecord::from_journal_vec(v.clone()).unwrap(), r);
        let mut framed = b"xx".to_vec();
        framed.extend_from_slice(&v);
        assert_eq!(
            LogRecord::from_journal_bytes(Bytes::from(framed).slice(2..)).unwrap(),
            r
        );
        for i in 0..v.len() {
            let mut bad = v.clone();
            bad[i] ^= 0x10;
            assert!(LogRecord::from_journal_value(&bad).is_err());
            assert!(LogRecord::from_journal_vec(bad).is_err());
        }
    }
}

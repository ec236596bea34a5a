//! Just enough of the zstd frame format (RFC 8878) to take frames an agent compressed without
//! decompressing them: [`check`] walks a frame's header and block headers and refuses anything
//! but one whole frame of the declared size with a content checksum; [`raw_frame`] writes bytes
//! as a frame of raw blocks. zstd decoders read concatenated frames as one stream, so a segment
//! chunk can be the agent's frames with the server's record headers framed between them.

use bytes::BufMut;

/// The magic number that opens every zstd frame (little-endian on the wire).
const MAGIC: u32 = 0xFD2F_B528;
/// The largest block a frame may hold (RFC 8878, `Block_Maximum_Size`).
pub const MAX_BLOCK: usize = 128 << 10;
/// Bytes a raw frame adds to its content: magic, descriptor, 8-byte content size, and one
/// 3-byte header per block.
pub fn raw_frame_len(content: usize) -> usize {
    4 + 1 + 8 + 3 * content.div_ceil(MAX_BLOCK).max(1) + content
}

/// Why an agent's frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameCheckError {
    #[error("not a zstd frame (bad magic)")]
    BadMagic,
    #[error("zstd frame is truncated")]
    Truncated,
    #[error("zstd frame uses a reserved header bit or block type")]
    Reserved,
    #[error("zstd frame needs a dictionary")]
    Dictionary,
    #[error("zstd frame does not declare its content size")]
    NoContentSize,
    #[error("zstd frame content size {found} is not the write's length {expected}")]
    ContentSize { expected: u64, found: u64 },
    #[error("zstd frame carries no content checksum")]
    NoChecksum,
    #[error("zstd frame has a block larger than 128 KiB")]
    BlockTooLarge,
    #[error("bytes follow the zstd frame")]
    Trailing,
}

/// Checks that `frame` is exactly one zstd frame that declares `content_len` bytes of content,
/// needs no dictionary and ends with a content checksum, and that its blocks fill it exactly.
/// Compressed blocks are not decoded: a decoder verifies them, and the content checksum, when
/// the segment is read. Costs one step per block (at most 128 KiB each), not a pass over data.
pub fn check(frame: &[u8], content_len: u64) -> Result<(), FrameCheckError> {
    use FrameCheckError as E;
    let take = |at: usize, n: usize| frame.get(at..at + n).ok_or(E::Truncated);
    let magic = u32::from_le_bytes(take(0, 4)?.try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(E::BadMagic);
    }
    let fhd = take(4, 1)?[0];
    let fcs_flag = fhd >> 6;
    let single_segment = fhd & 0x20 != 0;
    if fhd & 0x18 != 0 {
        // Bit 4 is unused and bit 3 reserved: both must be zero.
        return Err(E::Reserved);
    }
    let has_checksum = fhd & 0x04 != 0;
    if fhd & 0x03 != 0 {
        return Err(E::Dictionary);
    }
    let mut at = 5;
    let window = if single_segment {
        None
    } else {
        let wd = take(at, 1)?[0];
        at += 1;
        let exponent = u32::from(wd >> 3);
        let base = 1u64 << (10 + exponent);
        Some(base + (base / 8) * u64::from(wd & 7))
    };
    let fcs_len = match (fcs_flag, single_segment) {
        (0, false) => return Err(E::NoContentSize),
        (0, true) => 1,
        (1, _) => 2,
        (2, _) => 4,
        _ => 8,
    };
    let raw = take(at, fcs_len)?;
    at += fcs_len;
    let mut bytes = [0u8; 8];
    bytes[..fcs_len].copy_from_slice(raw);
    let mut fcs = u64::from_le_bytes(bytes);
    if fcs_len == 2 {
        fcs += 256;
    }
    if fcs != content_len {
        return Err(E::ContentSize {
            expected: content_len,
            found: fcs,
        });
    }
    if !has_checksum {
        return Err(E::NoChecksum);
    }
    let max_block = window.unwrap_or(fcs).min(MAX_BLOCK as u64) as usize;
    loop {
        let h = take(at, 3)?;
        at += 3;
        let header = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
        let last = header & 1 != 0;
        let size = (header >> 3) as usize;
        let stored = match (header >> 1) & 3 {
            0 | 2 => size,
            1 => 1,
            _ => return Err(E::Reserved),
        };
        if size > max_block {
            return Err(E::BlockTooLarge);
        }
        take(at, stored)?;
        at += stored;
        if last {
            break;
        }
    }
    take(at, 4)?;
    at += 4;
    if at != frame.len() {
        return Err(E::Trailing);
    }
    Ok(())
}

/// Appends `data` as one zstd frame of raw (uncompressed) blocks, with its content size and no
/// checksum (the segment's AES-GCM tag authenticates it).
pub fn raw_frame(out: &mut impl BufMut, data: &[u8]) {
    out.put_u32_le(MAGIC);
    // Frame content size in 8 bytes, single segment (no window descriptor), no checksum.
    out.put_u8(0xC0 | 0x20);
    out.put_u64_le(data.len() as u64);
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        out.put_slice(&[1, 0, 0]);
        return;
    }
    while let Some(block) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        let header = last | (block.len() as u32) << 3;
        out.put_slice(&header.to_le_bytes()[..3]);
        out.put_slice(block);
    }
}

/// The end of a `Vec` as a zstd output buffer: zstd writes into the spare capacity past `start`
/// (no zero-filling first) and the length grows by what it wrote.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

// SAFETY: zstd writes at most `capacity()` bytes from `as_mut_ptr()`, all inside the Vec's
// allocation past `start`, and `filled_until(n)` is called with the count it initialised.
#[allow(unsafe_code)]
unsafe impl zstd::zstd_safe::WriteBuf for Tail<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..]
    }
    fn capacity(&self) -> usize {
        self.vec.capacity() - self.start
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` is at most the Vec's length, so the pointer stays in its allocation.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }
    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller (zstd) initialised `n` bytes from `as_mut_ptr()`.
        unsafe { self.vec.set_len(self.start + n) }
    }
}

/// Compresses `data` as one frame appended to `out` (with its content size, and the content
/// checksum where `compressor` is set to write one). Returns the frame's length.
pub fn compress_append(compressor: &mut zstd::bulk::Compressor<'_>, data: &[u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    let mut tail = Tail { vec: out, start };
    compressor
        .compress_to_buffer(data, &mut tail)
        .expect("zstd into a buffer of compress_bound bytes")
}

/// A level-1 compressor whose frames carry a content checksum, as [`check`] requires.
pub fn checked_compressor() -> zstd::bulk::Compressor<'static> {
    let mut c = zstd::bulk::Compressor::new(1).expect("zstd context");
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
        .expect("zstd checksum flag");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed(data: &[u8]) -> Vec<u8> {
        let mut out = b"kept".to_vec();
        let n = compress_append(&mut checked_compressor(), data, &mut out);
        assert_eq!(&out[..4], b"kept");
        assert_eq!(out.len(), 4 + n);
        out.split_off(4)
    }

    fn mixed(len: usize) -> Vec<u8> {
        let mut state = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 3000 < 1000 {
                    b"the quick brown fox "[i % 20]
                } else {
                    (state >> 16) as u8
                }
            })
            .collect()
    }

    #[test]
    fn frames_zstd_makes_pass_at_every_size() {
        for len in [1usize, 100, 255, 256, 257, 4096, 65536, 65536 + 256, 300_000, 1 << 20] {
            let data = mixed(len);
            let frame = compressed(&data);
            assert_eq!(check(&frame, len as u64), Ok(()), "len {len}");
            assert_eq!(
                check(&frame, len as u64 + 1),
                Err(FrameCheckError::ContentSize {
                    expected: len as u64 + 1,
                    found: len as u64
                })
            );
            let zeros = compressed(&vec![0u8; len]);
            assert_eq!(check(&zeros, len as u64), Ok(()), "zeros len {len}");
        }
    }

    #[test]
    fn damaged_frames_are_refused_without_panic() {
        let data = mixed(300_000);
        let frame = compressed(&data);
        for cut in 0..frame.len() {
            assert!(check(&frame[..cut], data.len() as u64).is_err(), "cut at {cut}");
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(check(&longer, data.len() as u64), Err(FrameCheckError::Trailing));
        // A flip in the header or a block header is caught here; one inside compressed data is
        // left to the decoder, which the content checksum backs.
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x01;
            if check(&bad, data.len() as u64).is_ok() {
                assert!(zstd::bulk::decompress(&bad, data.len())
                    .map(|d| d == data)
                    .unwrap_or(true));
            }
        }
        let mut plain = zstd::bulk::Compressor::new(1).unwrap();
        plain
            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
            .unwrap();
        let unchecked = plain.compress(&data).unwrap();
        assert_eq!(check(&unchecked, data.len() as u64), Err(FrameCheckError::NoChecksum));
        assert_eq!(check(b"not a frame at all", 5), Err(FrameCheckError::BadMagic));
    }

    #[test]
    fn raw_frames_and_concatenations_decode_as_one_stream() {
        for len in [
            0usize,
            1,
            33,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            3 * MAX_BLOCK + 5,
        ] {
            let data = mixed(len);
            let mut frame = Vec::new();
            raw_frame(&mut frame, &data);
            assert_eq!(frame.len(), raw_frame_len(len), "len {len}");
            assert_eq!(zstd::bulk::decompress(&frame, len).unwrap(), data, "len {len}");
        }
        // Head, agent frame, head, agent frame: one buffer that decodes to the concatenation.
        let (a, b) = (mixed(70_000), mixed(200_000));
        let mut stream = Vec::new();
        raw_frame(&mut stream, b"head one");
        stream.extend_from_slice(&compressed(&a));
        raw_frame(&mut stream, b"head two");
        stream.extend_from_slice(&compressed(&b));
        let mut want = b"head one".to_vec();
        want.extend_from_slice(&a);
        want.extend_from_slice(b"head two");
        want.extend_from_slice(&b);
        assert_eq!(zstd::bulk::decompress(&stream, want.len()).unwrap(), want);
    }
}

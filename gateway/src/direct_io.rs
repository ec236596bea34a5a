//! Direct I/O (`O_DIRECT`) for bulk data the appliance writes or reads once: the payload log,
//! segments put to a local-folder blob store, and the agent's disk reads. It skips the page
//! cache, whose copies cost 0.45 s (reused pages) to 4 s (pages new to the VM) of system time per
//! GiB on the test machines, and keeps a replication agent from evicting its workload's cache.
//! Where a file system refuses it (tmpfs before Linux 6.6, some FUSE file systems), callers fall
//! back to buffered I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Direct I/O alignment: of file offsets, lengths and buffer addresses.
pub const ALIGN: usize = 4096;

pub fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A reusable buffer whose bytes start at a 4 KiB-aligned address, as direct I/O needs. It keeps
/// its memory between uses: no fresh pages to fault in and zero each time.
pub struct AlignedBuf {
    storage: Vec<u8>,
    /// Where the aligned data starts in `storage`.
    start: usize,
    len: usize,
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl AlignedBuf {
    pub fn new() -> Self {
        Self {
            storage: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// Makes room for `extra` more bytes plus the padding to the next 4 KiB boundary.
    pub fn reserve(&mut self, extra: usize) {
        let need = round_up(self.len + extra);
        if self.start + need <= self.storage.len() {
            return;
        }
        // Appending grows by doubling; refilling an empty buffer takes what it needs, rounded to
        // 1 MiB so that pooled buffers of about one size fit each other's contents.
        let grown = if self.len == 0 {
            need
        } else {
            need.max(2 * (self.storage.len().saturating_sub(ALIGN)))
        };
        let capacity = grown.div_ceil(1 << 20).max(1) << 20;
        let mut storage = vec![0u8; capacity + ALIGN];
        // A byte pointer can always be aligned; the offset is below ALIGN.
        let start = storage.as_ptr().align_offset(ALIGN);
        assert!(start < ALIGN, "cannot align a byte buffer");
        storage[start..start + self.len].copy_from_slice(self.data());
        self.storage = storage;
        self.start = start;
    }

    pub fn put(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let at = self.start + self.len;
        self.storage[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    pub fn data(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// `len` aligned bytes to read into (the buffer's length becomes `len`).
    pub fn fill_mut(&mut self, len: usize) -> &mut [u8] {
        self.len = 0;
        self.reserve(len);
        self.len = len;
        &mut self.storage[self.start..self.start + len]
    }

    /// The data followed by zeros up to a multiple of 4 KiB, at an aligned address.
    pub fn padded(&mut self) -> &[u8] {
        let end = round_up(self.len);
        self.reserve(0);
        self.storage[self.start + self.len..self.start + end].fill(0);
        &self.storage[self.start..self.start + end]
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Removes the first `n` bytes, moving the rest to the (aligned) start.
    pub fn drop_front(&mut self, n: usize) {
        assert!(n <= self.len, "dropping {n} of {} bytes", self.len);
        self.storage
            .copy_within(self.start + n..self.start + self.len, self.start);
        self.len -= n;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

/// Reads `buf.len()` bytes at `offset`, or fewer where the file ends first; returns the count.
pub fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether files in `dir` take direct I/O: writes one aligned block to a probe file.
pub fn supports_direct_io(dir: &Path) -> bool {
    let probe = dir.join(format!("direct-io.probe.{}", std::process::id()));
    let ok = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|f| {
            let mut b = AlignedBuf::new();
            b.put(&[0u8; ALIGN]);
            f.write_all_at(b.data(), 0)
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Opens `path` for reading with direct I/O, or `None` where the file system refuses it.
pub fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// Direct writes of a file go through the aligned scratch buffer in pieces of this size.
const WRITE_PIECE: usize = 4 << 20;

/// Writes `data` at the start of `f` (opened with direct I/O), then cuts the file to `data`'s
/// length. Data at a 4 KiB-aligned address (an [`AlignedBuf`]'s) is written as it is, but for
/// its last partial 4 KiB; other data goes through `scratch` piece by piece, the last piece
/// padded to 4 KiB.
fn write_direct(f: &File, data: &[u8], scratch: &mut AlignedBuf) -> io::Result<()> {
    let in_place = if data.as_ptr().align_offset(ALIGN) == 0 {
        data.len() / ALIGN * ALIGN
    } else {
        0
    };
    for (i, piece) in data[..in_place].chunks(WRITE_PIECE).enumerate() {
        f.write_all_at(piece, (i * WRITE_PIECE) as u64)?;
    }
    for (i, piece) in data[in_place..].chunks(WRITE_PIECE).enumerate() {
        scratch.clear();
        scratch.put(piece);
        f.write_all_at(scratch.padded(), (in_place + i * WRITE_PIECE) as u64)?;
    }
    f.set_len(data.len() as u64)
}

/// Writes `data` as the file `path`, durably and atomically: a temporary file beside it (direct
/// I/O where supported, padded to 4 KiB then cut to length), fsynced, renamed over `path`, and
/// the folder fsynced. `scratch` is the aligned staging buffer (up to 4 MiB), reused between
/// calls.
pub fn write_file_durably(path: &Path, data: &[u8], scratch: &mut AlignedBuf) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no folder", path.display())))?;
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("object");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let direct = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&tmp);
        let wrote_direct = match direct {
            Ok(f) => match write_direct(&f, data, scratch) {
                Ok(()) => {
                    f.sync_all()?;
                    true
                }
                Err(e) if is_unsupported(&e) => false,
                Err(e) => return Err(e),
            },
            Err(e) if is_unsupported(&e) => false,
            Err(e) => return Err(e),
        };
        if !wrote_direct {
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aligned_buffer_grows_without_losing_bytes() {
        let mut b = AlignedBuf::new();
        b.put(&[1; 10]);
        let big = vec![2u8; 3 << 20];
        b.put(&big);
        assert_eq!(b.data().as_ptr() as usize % ALIGN, 0);
        assert_eq!(&b.data()[..10], &[1; 10]);
        assert_eq!(b.data().len(), 10 + (3 << 20));
        let padded = b.padded();
        assert_eq!(padded.len() % ALIGN, 0);
        assert!(padded[10 + (3 << 20)..].iter().all(|x| *x == 0));
    }

    #[test]
    fn files_are_written_whole_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/segment.lbseg");
        let mut scratch = AlignedBuf::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        write_file_durably(&path, &data, &mut scratch).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let big: Vec<u8> = (0..(2 * WRITE_PIECE + 5_000) as u32)
            .map(|i| ((i * 13) >> 3) as u8)
            .collect();
        write_file_durably(&path, &big, &mut scratch).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), big, "a file of several pieces");
        write_file_durably(&path, b"short", &mut scratch).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn aligned_data_is_written_in_place_and_whole() {
        // On the package's own disk (tmpfs may refuse direct I/O and take the buffered path).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("segment.lbseg");
        let direct = supports_direct_io(dir.path());
        for len in [2 * WRITE_PIECE + 5_000, 3 * ALIGN, ALIGN - 1, 0] {
            let mut data = AlignedBuf::new();
            data.put(&(0..len as u32).map(|i| ((i * 29) >> 2) as u8).collect::<Vec<_>>());
            let mut scratch = AlignedBuf::new();
            write_file_durably(&path, data.data(), &mut scratch).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data.data(), "{len} bytes");
            if direct && len % ALIGN == 0 {
                assert!(scratch.is_empty(), "{len} aligned bytes need no staging copy");
            }
        }
    }
}

//! The agent's disk reader: reads a disk in chunks on its own thread, a few chunks ahead of the
//! scanner, so device reads overlap the hashing. A chunk already in the page cache is copied from
//! it (no device I/O); any other chunk is read with direct I/O, which neither waits for nor
//! evicts the protected machine's cached data.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::direct_io::{AlignedBuf, ALIGN};

/// Chunks read ahead of the scanner.
const AHEAD: usize = 3;

/// Whether all of `len` bytes at `offset` of `file` are in the page cache, from Linux's
/// `cachestat` (6.5+), which looks without reading anything. `None` where the kernel lacks it.
#[allow(unsafe_code)]
pub fn fully_cached(file: &File, offset: u64, len: u64) -> Option<bool> {
    /// `struct cachestat_range` of the Linux UAPI.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat` of the Linux UAPI.
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return Some(true);
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live, properly laid-out locals; the
    // descriptor is open for the duration of the call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return None;
    }
    // Counted in pages; where they are larger than 4 KiB this errs towards direct reads.
    Some(stat.nr_cache >= len.div_ceil(4096))
}

/// How a chunk was read (the tests check that the page-cache test chose the right path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    Cached,
    Direct,
    Buffered,
}

/// A chunk of the disk: where it starts, its bytes, and how it was read.
pub struct Chunk {
    pub pos: u64,
    pub buf: AlignedBuf,
    pub path: ReadPath,
}

/// Reads `size` bytes of a disk in `chunk`-byte pieces, `AHEAD` pieces ahead of the consumer.
pub struct DiskReader {
    chunks: Receiver<io::Result<Chunk>>,
    free: Sender<AlignedBuf>,
    thread: Option<JoinHandle<()>>,
}

impl DiskReader {
    /// `file` reads through the page cache; `direct` (opened with `O_DIRECT`, where the disk
    /// allows it) reads around it.
    pub fn start(file: File, direct: Option<File>, size: u64, chunk: usize) -> Self {
        assert!(
            chunk > 0 && chunk.is_multiple_of(ALIGN),
            "chunk size must be a multiple of {ALIGN}"
        );
        let (tx, chunks) = bounded(AHEAD);
        let (free, free_rx) = bounded::<AlignedBuf>(AHEAD + 2);
        let thread = std::thread::Builder::new()
            .name("disk-reader".into())
            .spawn(move || read_loop(file, direct, size, chunk, tx, free_rx))
            .expect("spawn disk reader");
        Self {
            chunks,
            free,
            thread: Some(thread),
        }
    }

    /// The next chunk in disk order; `None` after the last one (or after an error was returned).
    pub fn next(&self) -> Option<io::Result<Chunk>> {
        self.chunks.recv().ok()
    }

    /// Gives a chunk's buffer back to be filled again.
    pub fn recycle(&self, buf: AlignedBuf) {
        let _ = self.free.try_send(buf);
    }
}

impl Drop for DiskReader {
    fn drop(&mut self) {
        // Closing the channel stops the thread at its next send.
        let (_, closed) = bounded(0);
        self.chunks = closed;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_loop(
    file: File,
    mut direct: Option<File>,
    size: u64,
    chunk: usize,
    tx: Sender<io::Result<Chunk>>,
    free: Receiver<AlignedBuf>,
) {
    let mut cachestat = true;
    let mut pos = 0u64;
    while pos < size {
        let want = ((size - pos) as usize).min(chunk);
        let mut buf = free.try_recv().unwrap_or_default();
        let cached = if cachestat {
            let c = fully_cached(&file, pos, want as u64);
            cachestat = c.is_some();
            c.unwrap_or(false)
        } else {
            false
        };
        let result = read_chunk(&file, &mut direct, cached, pos, want, &mut buf);
        let failed = result.is_err();
        let msg = result.map(|path| Chunk { pos, buf, path });
        if tx.send(msg).is_err() || failed {
            return;
        }
        pos += want as u64;
    }
}

fn read_chunk(
    file: &File,
    direct: &mut Option<File>,
    cached: bool,
    pos: u64,
    want: usize,
    buf: &mut AlignedBuf,
) -> io::Result<ReadPath> {
    if !cached && want.is_multiple_of(ALIGN) {
        if let Some(d) = direct.as_ref() {
            match d.read_exact_at(buf.fill_mut(want), pos) {
                Ok(()) => return Ok(ReadPath::Direct),
                // Refused after all (alignment rules of this device): read through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
                Err(e) => return Err(e),
            }
        }
    }
    file.read_exact_at(buf.fill_mut(want), pos)?;
    Ok(if cached { ReadPath::Cached } else { ReadPath::Buffered })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn disk(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    fn read_all(reader: &DiskReader) -> (Vec<u8>, Vec<ReadPath>) {
        let (mut out, mut paths) = (Vec::new(), Vec::new());
        while let Some(c) = reader.next() {
            let c = c.unwrap();
            assert_eq!(c.pos, out.len() as u64);
            out.extend_from_slice(c.buf.data());
            paths.push(c.path);
            reader.recycle(c.buf);
        }
        (out, paths)
    }

    #[test]
    fn reads_every_byte_in_order_with_a_short_last_chunk() {
        let (f, data) = disk(5 * 65536 + 1000);
        let direct = crate::direct_io::open_direct(f.path());
        let reader = DiskReader::start(File::open(f.path()).unwrap(), direct, data.len() as u64, 65536);
        let (out, _) = read_all(&reader);
        assert_eq!(out, data);
    }

    #[test]
    fn cached_chunks_come_from_the_cache_and_uncached_ones_directly() {
        let (f, data) = disk(8 * 65536);
        let file = File::open(f.path()).unwrap();
        if fully_cached(&file, 0, 1).is_none() {
            eprintln!("kernel without cachestat: every chunk is read directly");
            return;
        }
        // Just written: in the page cache.
        assert_eq!(fully_cached(&file, 0, data.len() as u64), Some(true));
        let reader = DiskReader::start(file, crate::direct_io::open_direct(f.path()), data.len() as u64, 65536);
        let (out, paths) = read_all(&reader);
        assert_eq!(out, data);
        assert!(paths.iter().all(|p| *p == ReadPath::Cached), "{paths:?}");
        // Dropped from the cache: read directly, and still not cached afterwards.
        let file = File::open(f.path()).unwrap();
        file.sync_all().unwrap();
        rustix_fadvise_dontneed(&file);
        if fully_cached(&file, 0, data.len() as u64) != Some(false) {
            eprintln!("the page cache kept the file: skipping the uncached half");
            return;
        }
        let direct = crate::direct_io::open_direct(f.path());
        let has_direct = direct.is_some();
        let reader = DiskReader::start(File::open(f.path()).unwrap(), direct, data.len() as u64, 65536);
        let (out, paths) = read_all(&reader);
        assert_eq!(out, data);
        if has_direct {
            assert!(paths.iter().all(|p| *p == ReadPath::Direct), "{paths:?}");
            assert_eq!(fully_cached(&file, 0, data.len() as u64), Some(false));
        }
    }

    fn rustix_fadvise_dontneed(file: &File) {
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }

    #[test]
    fn a_read_error_ends_the_stream() {
        let (f, data) = disk(4 * 65536);
        // Claim a larger disk than the file: the read past its end fails.
        let reader = DiskReader::start(File::open(f.path()).unwrap(), None, data.len() as u64 + 65536, 65536);
        let mut errors = 0;
        while let Some(c) = reader.next() {
            match c {
                Ok(c) => reader.recycle(c.buf),
                Err(_) => errors += 1,
            }
        }
        assert_eq!(errors, 1);
    }
}

//! The agent's disk scan. Workers (two per core, so that one computes while another waits for
//! the disk) each take the next 4 MiB stripe of the disk, read it in 1 MiB pieces, hash its
//! 64 KiB blocks against the replica's checksums and build batch bodies of what differs. Changed data is compressed straight from the read buffer
//! while the CPU's cache still holds it: block data is never copied raw, and the memory a sync
//! touches stays a few buffers per worker. A piece already in the page cache is copied from it;
//! any other is read with direct I/O, which neither waits for nor evicts the protected
//! machine's cached data.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

use crate::direct_io::{AlignedBuf, ALIGN};
use crate::journal::{block_checksum, is_zero, BLOCK_SIZE};
use crate::protocol::{BatchBuilder, PackedBatchBuilder};

/// Most bytes of block data in one batch.
pub const BATCH_BYTES: usize = 8 << 20;
/// Longest extent in one record.
pub const EXTENT_BYTES: usize = 1 << 20;
/// Most records in one batch.
const BATCH_RECORDS: u32 = 4096;
/// The unit of work a scan worker takes: stripes are read, diffed and packed independently.
pub const STRIPE_BYTES: u64 = 4 << 20;
/// Read size within a stripe: small enough that a piece is still in the CPU's cache when it is
/// hashed and compressed.
const PIECE_BYTES: usize = 1 << 20;
/// A body's initial capacity: a full batch plus one extent and its framing, so it never regrows.
const BODY_CAPACITY: usize = BATCH_BYTES + EXTENT_BYTES + (256 << 10);

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

/// How a piece was read (the tests check that the page-cache test chose the right path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    Cached,
    Direct,
    Buffered,
}

/// Reads one piece of a disk into `out`: through the page cache when all of it is cached
/// (`cachestat` is cleared where the kernel cannot tell), else with direct I/O where the disk
/// allows it (`direct` is cleared if it refuses after all).
fn read_piece(
    file: &File,
    direct: &mut Option<&File>,
    cachestat: &mut bool,
    pos: u64,
    out: &mut [u8],
) -> io::Result<ReadPath> {
    let cached = if *cachestat {
        let c = fully_cached(file, pos, out.len() as u64);
        *cachestat = c.is_some();
        c.unwrap_or(false)
    } else {
        false
    };
    let aligned = out.len().is_multiple_of(ALIGN) && (out.as_ptr() as usize).is_multiple_of(ALIGN);
    if !cached && aligned && pos.is_multiple_of(ALIGN as u64) {
        if let Some(d) = *direct {
            match d.read_exact_at(out, pos) {
                Ok(()) => return Ok(ReadPath::Direct),
                // Refused after all (alignment rules of this device): read through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
                Err(e) => return Err(e),
            }
        }
    }
    file.read_exact_at(out, pos)?;
    Ok(if cached { ReadPath::Cached } else { ReadPath::Buffered })
}

/// One disk to scan.
pub struct ScanJob {
    /// The disk, read through the page cache.
    pub file: File,
    /// The same disk opened with `O_DIRECT`, where it allows it.
    pub direct: Option<File>,
    pub size: u64,
    /// The disk's name in the records.
    pub disk: String,
    /// The replica's block checksums, 16 bytes per block (all zero for an all-zero block).
    pub replica: Vec<u8>,
    /// Whether writes are packed (compressed here) or sent raw with CRCs.
    pub compress: bool,
}

/// A batch body ready to send, with what it holds.
pub struct ScannedBody {
    pub body: Bytes,
    /// Block data in it, as on the disk.
    pub data: u64,
    pub changed: u64,
    pub zeroed: u64,
}

/// Scans `job` on `workers` threads, sending each batch body on `tx` as it fills. Sent bodies'
/// memory comes back on `spare` to be filled again. Returns the bytes scanned; the first read
/// error stops every worker, and so does `tx` closing (the sync was abandoned).
pub fn scan(
    job: &ScanJob,
    workers: usize,
    tx: &tokio::sync::mpsc::Sender<ScannedBody>,
    spare: &crossbeam_channel::Receiver<BytesMut>,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> io::Result<u64> {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let results: Vec<io::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.max(1))
            .map(|i| {
                let (next, stop) = (&next, &stop);
                std::thread::Builder::new()
                    .name(format!("scan-{i}"))
                    .spawn_scoped(scope, move || {
                        let result = Worker::new(job, tx, spare).run(next, stop, progress);
                        if result.is_err() {
                            stop.store(true, Ordering::Relaxed);
                        }
                        result
                    })
                    .expect("spawn scan worker")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("scan worker panicked"))
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(job.size)
}

/// The body a worker is filling: packed writes, or raw ones with CRCs (`--no-compress`).
enum Body {
    Packed(PackedBatchBuilder),
    Raw { builder: BatchBuilder, data: usize },
}

impl Body {
    fn new(compress: bool, memory: Option<BytesMut>) -> Self {
        let memory = memory.unwrap_or_else(|| BytesMut::with_capacity(BODY_CAPACITY));
        if compress {
            Body::Packed(PackedBatchBuilder::with_buffer(memory.into()))
        } else {
            Body::Raw {
                builder: BatchBuilder::with_buffer(memory),
                data: 0,
            }
        }
    }

    fn write(&mut self, disk: &str, offset: u64, data: &[u8], sums: &[u8]) {
        match self {
            Body::Packed(b) => b.write(disk, offset, data, sums),
            Body::Raw { builder, data: total } => {
                builder.begin_write(disk, offset);
                for (block, sum) in data.chunks(BLOCK_SIZE as usize).zip(sums.chunks_exact(16)) {
                    builder.push_block(block, sum.try_into().expect("16-byte checksum"));
                }
                builder.close_write();
                *total += data.len();
            }
        }
    }

    fn zero(&mut self, disk: &str, offset: u64, len: u32) {
        match self {
            Body::Packed(b) => b.zero(disk, offset, len),
            Body::Raw { builder, .. } => builder.zero(disk, offset, len),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Body::Packed(b) => b.data_len(),
            Body::Raw { data, .. } => *data,
        }
    }

    fn records(&self) -> u32 {
        match self {
            Body::Packed(b) => b.records(),
            Body::Raw { builder, .. } => builder.records(),
        }
    }

    fn finish(self) -> Bytes {
        match self {
            Body::Packed(b) => b.finish(),
            Body::Raw { builder, .. } => builder.finish(),
        }
    }
}

/// The changed blocks being gathered into one write: where they start in the stripe buffer,
/// how long they run, and their checksums.
struct OpenExtent {
    at: usize,
    len: usize,
    sums: Vec<u8>,
}

struct Worker<'a> {
    job: &'a ScanJob,
    tx: &'a tokio::sync::mpsc::Sender<ScannedBody>,
    spare: &'a crossbeam_channel::Receiver<BytesMut>,
    body: Body,
    changed: u64,
    zeroed: u64,
    extent: OpenExtent,
    /// The zero range being built: (disk offset, length).
    zero_run: Option<(u64, u64)>,
}

impl<'a> Worker<'a> {
    fn new(
        job: &'a ScanJob,
        tx: &'a tokio::sync::mpsc::Sender<ScannedBody>,
        spare: &'a crossbeam_channel::Receiver<BytesMut>,
    ) -> Self {
        Self {
            body: Body::new(job.compress, spare.try_recv().ok()),
            job,
            tx,
            spare,
            changed: 0,
            zeroed: 0,
            extent: OpenExtent {
                at: 0,
                len: 0,
                sums: Vec::with_capacity(16 * EXTENT_BYTES / BLOCK_SIZE as usize),
            },
            zero_run: None,
        }
    }

    fn run(mut self, next: &AtomicU64, stop: &AtomicBool, progress: &(dyn Fn(u64) + Send + Sync)) -> io::Result<()> {
        let job = self.job;
        let mut buf = AlignedBuf::new();
        let mut direct = job.direct.as_ref();
        let mut cachestat = true;
        while !stop.load(Ordering::Relaxed) {
            let pos = next.fetch_add(STRIPE_BYTES, Ordering::Relaxed);
            if pos >= job.size {
                break;
            }
            let len = (job.size - pos).min(STRIPE_BYTES) as usize;
            let stripe = buf.fill_mut(len);
            let mut piece = 0;
            while piece < len {
                let end = (piece + PIECE_BYTES).min(len);
                read_piece(
                    &job.file,
                    &mut direct,
                    &mut cachestat,
                    pos + piece as u64,
                    &mut stripe[piece..end],
                )?;
                for at in (piece..end).step_by(BLOCK_SIZE as usize) {
                    let block_end = (at + BLOCK_SIZE as usize).min(end);
                    self.block(stripe, pos, at, block_end)?;
                }
                piece = end;
            }
            // Records end with the stripe: the next one may be another worker's.
            self.close_extent(stripe, pos)?;
            self.close_zero_run();
            progress(len as u64);
        }
        if self.body.records() > 0 {
            self.send()?;
        }
        Ok(())
    }

    /// Diffs the block at `stripe[at..end]` (disk offset `pos + at`) against the replica.
    fn block(&mut self, stripe: &[u8], pos: u64, at: usize, end: usize) -> io::Result<()> {
        let block = &stripe[at..end];
        let off = pos + at as u64;
        let index = (off / BLOCK_SIZE) as usize;
        let theirs = &self.job.replica[index * 16..index * 16 + 16];
        let (differs, sum) = if is_zero(block) {
            (!is_zero(theirs), None)
        } else {
            let sum = block_checksum(block);
            (sum != theirs, Some(sum))
        };
        let continues_write = differs
            && sum.is_some()
            && self.extent.len > 0
            && self.extent.at + self.extent.len == at
            && self.extent.len < EXTENT_BYTES;
        if !continues_write {
            self.close_extent(stripe, pos)?;
        }
        let continues_zero = differs && sum.is_none() && self.zero_run.is_some_and(|(s, l)| s + l == off);
        if !continues_zero {
            self.close_zero_run();
        }
        if !differs {
            return Ok(());
        }
        match sum {
            None => {
                self.zeroed += 1;
                match &mut self.zero_run {
                    Some((_, l)) => *l += block.len() as u64,
                    None => self.zero_run = Some((off, block.len() as u64)),
                }
            }
            Some(sum) => {
                self.changed += 1;
                if self.extent.len == 0 {
                    self.extent.at = at;
                }
                self.extent.len += block.len();
                self.extent.sums.extend_from_slice(&sum);
            }
        }
        Ok(())
    }

    /// Adds the open extent to the body as one write, sending the body if that filled it.
    fn close_extent(&mut self, stripe: &[u8], pos: u64) -> io::Result<()> {
        if self.extent.len == 0 {
            return Ok(());
        }
        let OpenExtent { at, len, sums } = &mut self.extent;
        self.body
            .write(&self.job.disk, pos + *at as u64, &stripe[*at..*at + *len], sums);
        *len = 0;
        sums.clear();
        if self.body.data_len() >= BATCH_BYTES || self.body.records() >= BATCH_RECORDS {
            self.send()?;
        }
        Ok(())
    }

    fn close_zero_run(&mut self) {
        if let Some((start, len)) = self.zero_run.take() {
            // Within one stripe, so far below the record's u32 length.
            self.body.zero(&self.job.disk, start, len as u32);
        }
    }

    /// Sends the body (waiting while the sender is busy) and starts the next in spare memory.
    fn send(&mut self) -> io::Result<()> {
        let next = Body::new(self.job.compress, self.spare.try_recv().ok());
        let body = std::mem::replace(&mut self.body, next);
        let msg = ScannedBody {
            data: body.data_len() as u64,
            body: body.finish(),
            changed: std::mem::take(&mut self.changed),
            zeroed: std::mem::take(&mut self.zeroed),
        };
        self.tx
            .blocking_send(msg)
            .map_err(|_| io::Error::other("sync cancelled"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_batch_with_sums, RecordKind};
    use std::io::Write;

    /// A disk of `len` bytes: compressible, random and zero regions, 64 KiB blocks.
    fn disk(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(len as u64);
        let mut data = vec![0u8; len];
        for (i, block) in data.chunks_mut(BLOCK_SIZE as usize).enumerate() {
            match i % 5 {
                0 | 1 => block.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 7 + i) as u8),
                2 => rng.fill_bytes(block),
                _ => {} // zeros
            }
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        (f, data)
    }

    fn job(f: &tempfile::NamedTempFile, size: u64, replica: Vec<u8>, compress: bool) -> ScanJob {
        ScanJob {
            file: File::open(f.path()).unwrap(),
            direct: crate::direct_io::open_direct(f.path()),
            size,
            disk: "disk0".into(),
            replica,
            compress,
        }
    }

    /// Runs a scan on `workers` threads; returns the bodies and the progress reported.
    fn run(job: &ScanJob, workers: usize) -> io::Result<(Vec<ScannedBody>, u64)> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let (_spare_tx, spare) = crossbeam_channel::bounded(4);
        let progress = std::sync::Mutex::new(0u64);
        let collect = std::thread::spawn(move || {
            let mut out = Vec::new();
            while let Some(b) = rx.blocking_recv() {
                out.push(b);
            }
            out
        });
        let scanned = scan(job, workers, &tx, &spare, &|n| *progress.lock().unwrap() += n);
        drop(tx);
        let bodies = collect.join().unwrap();
        scanned.map(|s| {
            assert_eq!(s, job.size);
            (bodies, progress.into_inner().unwrap())
        })
    }

    /// Applies the bodies' records to `image`; returns the block checksums they carried.
    fn apply(image: &mut [u8], bodies: &[ScannedBody]) -> std::collections::BTreeMap<u64, [u8; 16]> {
        let mut sums_seen = std::collections::BTreeMap::new();
        for b in bodies {
            for (r, sums, _) in decode_batch_with_sums(b.body.clone()).expect("a valid body") {
                let at = r.offset as usize;
                let data = match r.kind {
                    RecordKind::PackedWrite => zstd::bulk::decompress(&r.payload, r.len as usize).unwrap(),
                    RecordKind::Write => r.payload.to_vec(),
                    RecordKind::Zero => vec![0; r.len as usize],
                    other => panic!("unexpected record {other:?}"),
                };
                assert_eq!(data.len(), r.len as usize);
                image[at..at + data.len()].copy_from_slice(&data);
                if let Some(sums) = sums {
                    for (i, s) in sums.chunks(16).enumerate() {
                        sums_seen.insert(r.offset / BLOCK_SIZE + i as u64, s.try_into().unwrap());
                    }
                }
            }
        }
        sums_seen
    }

    fn checksums(data: &[u8]) -> Vec<u8> {
        data.chunks(BLOCK_SIZE as usize)
            .flat_map(|b| if is_zero(b) { [0u8; 16] } else { block_checksum(b) })
            .collect()
    }

    #[test]
    fn a_first_scan_sends_every_non_zero_block_packed_or_raw() {
        // Not a whole number of stripes, pieces or blocks: every short-end path is taken.
        let len = 3 * STRIPE_BYTES as usize + 5 * BLOCK_SIZE as usize + 1000;
        let (f, data) = disk(len);
        let blocks = len.div_ceil(BLOCK_SIZE as usize);
        let non_zero = data.chunks(BLOCK_SIZE as usize).filter(|b| !is_zero(b)).count() as u64;
        for (compress, workers) in [(true, 1), (true, 3), (false, 2)] {
            let job = job(&f, len as u64, vec![0; blocks * 16], compress);
            let (bodies, progress) = run(&job, workers).unwrap();
            assert_eq!(progress, len as u64);
            let mut image = vec![0xa5u8; len];
            // Zero blocks of a zero replica are not sent: start from zeros where the disk has them.
            for (i, b) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                if is_zero(b) {
                    image[i * BLOCK_SIZE as usize..i * BLOCK_SIZE as usize + b.len()].fill(0);
                }
            }
            let sums = apply(&mut image, &bodies);
            assert!(image == data, "compress {compress}, {workers} workers: image differs");
            assert_eq!(bodies.iter().map(|b| b.changed).sum::<u64>(), non_zero);
            assert_eq!(bodies.iter().map(|b| b.zeroed).sum::<u64>(), 0);
            assert_eq!(
                bodies.iter().map(|b| b.data).sum::<u64>(),
                non_zero * BLOCK_SIZE - (BLOCK_SIZE - 1000)
            );
            // Every block sent carries the checksum the next scan compares against.
            let expected = checksums(&data);
            for (block, sum) in sums {
                assert_eq!(&sum[..], &expected[block as usize * 16..block as usize * 16 + 16]);
            }
        }
    }

    #[test]
    fn a_later_scan_sends_only_what_changed() {
        let len = 2 * STRIPE_BYTES as usize;
        let (f, mut data) = disk(len);
        let replica = checksums(&data);
        // Change one block, zero one that had data, fill one that was zero, and one across the
        // stripe boundary.
        let bs = BLOCK_SIZE as usize;
        data[7 * bs + 10] ^= 1;
        data[bs..2 * bs].fill(0);
        data[3 * bs..4 * bs].fill(9);
        data[STRIPE_BYTES as usize - 100..STRIPE_BYTES as usize + 100].fill(7);
        std::fs::write(f.path(), &data).unwrap();
        let job = job(&f, len as u64, replica, true);
        let (bodies, _) = run(&job, 2).unwrap();
        assert_eq!(bodies.iter().map(|b| b.changed).sum::<u64>(), 4);
        assert_eq!(bodies.iter().map(|b| b.zeroed).sum::<u64>(), 1);
        let (f0, original) = disk(len);
        drop(f0);
        let mut image = original;
        apply(&mut image, &bodies);
        assert!(image == data);
    }

    #[test]
    fn a_read_error_ends_the_scan_with_it() {
        let (f, data) = disk(4 * BLOCK_SIZE as usize);
        // Claim a larger disk than the file: the read past its end fails.
        let size = data.len() as u64 + STRIPE_BYTES;
        let blocks = size.div_ceil(BLOCK_SIZE) as usize;
        let job = job(&f, size, vec![0; blocks * 16], true);
        let err = run(&job, 2).err().expect("the scan fails");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn cached_pieces_come_from_the_cache_and_uncached_ones_directly() {
        let (f, data) = disk(8 * BLOCK_SIZE as usize);
        let file = File::open(f.path()).unwrap();
        if fully_cached(&file, 0, 1).is_none() {
            eprintln!("kernel without cachestat: every piece is read directly");
            return;
        }
        let direct_file = crate::direct_io::open_direct(f.path());
        let mut buf = AlignedBuf::new();
        let mut read = |file: &File| {
            let (mut direct, mut cachestat) = (direct_file.as_ref(), true);
            let out = buf.fill_mut(data.len());
            let path = read_piece(file, &mut direct, &mut cachestat, 0, out).unwrap();
            assert!(out == &data[..]);
            path
        };
        // Just written: in the page cache.
        assert_eq!(fully_cached(&file, 0, data.len() as u64), Some(true));
        assert_eq!(read(&file), ReadPath::Cached);
        // Dropped from the cache: read directly, and still not cached afterwards.
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        if fully_cached(&file, 0, data.len() as u64) != Some(false) {
            eprintln!("the page cache kept the file: skipping the uncached half");
            return;
        }
        let path = read(&file);
        if direct_file.is_some() {
            assert_eq!(path, ReadPath::Direct);
            assert_eq!(fully_cached(&file, 0, data.len() as u64), Some(false));
        }
    }
}

//! Writes a disk view onto a real disk: [`copy_view`] materialises a recovery point (failover,
//! [`CopyMode::Full`]) or writes back only the blocks that differ from what the target already
//! holds (failback, [`CopyMode::Differential`]), onto a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;

use crate::view::{DiskView, Extent};

/// The unit of work: the view is read and the target written in pieces of this size, aligned.
pub const COPY_CHUNK: u64 = 1 << 20;
/// Granularity of comparison (and of `CopyStats::blocks_*`): aligned blocks of this size.
pub const COMPARE_BLOCK: u64 = 64 << 10;
/// Chunks in flight at once (view reads pipelined, target I/O on the blocking pool).
const IN_FLIGHT: usize = 8;
/// Extents are asked of the view for windows of this size.
const EXTENT_WINDOW: u64 = 256 << 20;

/// What a copy did. Blocks are aligned [`COMPARE_BLOCK`]s of the view's range (the last one may
/// be shorter).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// The view's size: the bytes the copy is responsible for.
    pub bytes_total: u64,
    /// Blocks whose target content was compared with the view's (holes compare against zeros;
    /// target bytes known to be zero — a file just created or extended — are not read).
    pub blocks_compared: u64,
    /// Blocks of which anything was written.
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// Bytes of holes in the view that were not written (the target already read as zero there).
    pub bytes_skipped_holes: u64,
}

impl CopyStats {
    fn add(&mut self, o: &CopyStats) {
        self.blocks_compared += o.blocks_compared;
        self.blocks_written += o.blocks_written;
        self.bytes_written += o.bytes_written;
        self.bytes_skipped_holes += o.bytes_skipped_holes;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Failover: every data extent of the view is written without reading the target first;
    /// holes are left alone where the target is known to be zero (a new file, or the part of a
    /// file this copy extended) and otherwise compared with zeros and zeroed where they differ,
    /// so the result equals the view even over an old disk.
    Full,
    /// Failback: every block of the target is read and compared (memcmp) with the view's, and
    /// only blocks that differ are written; holes in the view compare against zeros.
    Differential,
}

/// Writes `view` onto `target`:
///
/// * a regular file — created when missing, extended to the view's size when shorter (the new
///   part is sparse and known to be zero), written sparsely where it was just created or extended:
///   holes of the view are not written there;
/// * or an existing block device at least as large as the view (`InvalidInput` otherwise).
///
/// Only the view's range `[0, view.size())` is touched: a target larger than the view (failback
/// onto a disk that grew) keeps everything past it. `progress(done_bytes, total_bytes)` is called
/// after each piece (and once at the start with 0); the copy ends with fdatasync of the target.
pub async fn copy_view(
    view: Arc<dyn DiskView>,
    target: &Path,
    mode: CopyMode,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> io::Result<CopyStats> {
    let size = view.size();
    let path = target.to_owned();
    let (file, fresh_from) = tokio::task::spawn_blocking(move || open_target(&path, size))
        .await
        .map_err(io::Error::other)??;
    let file = Arc::new(file);
    let done = AtomicU64::new(0);
    progress(0, size);

    // The extents first (metadata only, window by window), then the copy, pipelined. Plain
    // values between the two stages keep callers' futures provably `Send`.
    let mut work = Vec::new();
    for w in 0..size.div_ceil(EXTENT_WINDOW) {
        let (ws, we) = (w * EXTENT_WINDOW, ((w + 1) * EXTENT_WINDOW).min(size));
        let extents = view.extents(ws, we - ws).await?;
        work.extend(jobs(ws, we, &extents));
    }
    let jobs = futures::stream::iter(work.into_iter().map(Ok::<_, io::Error>));
    let mut stats = jobs
        .map_ok(|job| copy_chunk(view.clone(), file.clone(), job, mode, fresh_from))
        .try_buffer_unordered(IN_FLIGHT)
        .try_fold(CopyStats::default(), |mut stats, (len, chunk)| {
            stats.add(&chunk);
            progress(done.fetch_add(len, Ordering::Relaxed) + len, size);
            futures::future::ready(Ok(stats))
        })
        .await?;
    stats.bytes_total = size;
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(io::Error::other)??;
    Ok(stats)
}

/// Opens (or creates) the target; returns it and the offset from which it is known to read zero.
fn open_target(path: &Path, size: u64) -> io::Result<(File, u64)> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(with_path)?;
            f.set_len(size).map_err(with_path)?;
            Ok((f, 0))
        }
        Err(e) => Err(with_path(e)),
        Ok(m) if m.is_file() => {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(with_path)?;
            let len = m.len();
            if len < size {
                f.set_len(size).map_err(with_path)?;
                Ok((f, len))
            } else {
                Ok((f, size))
            }
        }
        Ok(m) if m.file_type().is_block_device() => {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(with_path)?;
            let dev = f.seek(SeekFrom::End(0)).map_err(with_path)?;
            if dev < size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "block device {} holds {dev} bytes, smaller than the disk's {size} bytes",
                        path.display()
                    ),
                ));
            }
            Ok((f, size))
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is neither a regular file nor a block device", path.display()),
        )),
    }
}

/// One aligned chunk of the view and its data ranges (absolute, sorted, inside the chunk).
struct Job {
    start: u64,
    end: u64,
    data: Vec<(u64, u64)>,
}

/// Splits `[ws, we)` into chunk jobs; gaps the view's extents leave count as data (safe).
fn jobs(ws: u64, we: u64, extents: &[Extent]) -> Vec<Job> {
    // Data ranges of the window, clipped and merged.
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut add = |s: u64, e: u64| {
        if s < e {
            match data.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => data.push((s, e)),
            }
        }
    };
    let mut pos = ws;
    for x in extents {
        let (s, e) = (x.offset.max(pos), (x.offset + x.len).min(we));
        if s >= e {
            continue;
        }
        add(pos, s);
        if x.allocated {
            add(s, e);
        }
        pos = e;
    }
    add(pos, we);
    let mut out = Vec::new();
    let mut i = 0;
    let mut start = ws;
    while start < we {
        let end = ((start / COPY_CHUNK + 1) * COPY_CHUNK).min(we);
        while i < data.len() && data[i].1 <= start {
            i += 1;
        }
        let parts = data[i..]
            .iter()
            .take_while(|d| d.0 < end)
            .map(|&(s, e)| (s.max(start), e.min(end)))
            .collect();
        out.push(Job {
            start,
            end,
            data: parts,
        });
        start = end;
    }
    out
}

/// Copies one chunk; returns its length and what was done.
async fn copy_chunk(
    view: Arc<dyn DiskView>,
    file: Arc<File>,
    job: Job,
    mode: CopyMode,
    fresh_from: u64,
) -> io::Result<(u64, CopyStats)> {
    let len = job.end - job.start;
    if job.data.is_empty() && job.start >= fresh_from {
        // All hole over target bytes known to be zero: nothing to read or write.
        let stats = CopyStats {
            bytes_skipped_holes: len,
            ..CopyStats::default()
        };
        return Ok((len, stats));
    }
    let mut buf = BytesMut::zeroed(len as usize);
    if let (Some(first), Some(last)) = (job.data.first(), job.data.last()) {
        let read = view.read_at(first.0, (last.1 - first.0) as usize).await?;
        if read.len() as u64 != last.1 - first.0 {
            return Err(io::Error::other(format!(
                "the view returned {} bytes for a read of {} at {}",
                read.len(),
                last.1 - first.0,
                first.0
            )));
        }
        let at = (first.0 - job.start) as usize;
        buf[at..at + read.len()].copy_from_slice(&read);
    }
    let buf = buf.freeze();
    let stats = tokio::task::spawn_blocking(move || write_chunk(&file, &job, &buf, mode, fresh_from))
        .await
        .map_err(io::Error::other)??;
    Ok((len, stats))
}

/// Compares and writes one chunk whose view content is `view_buf` (blocking).
fn write_chunk(file: &File, job: &Job, view_buf: &Bytes, mode: CopyMode, fresh_from: u64) -> io::Result<CopyStats> {
    struct Block {
        start: u64,
        end: u64,
        data: Vec<(u64, u64)>,
        known_zero: bool,
        compare: bool,
    }
    let blocks: Vec<Block> = (job.start..job.end)
        .step_by(COMPARE_BLOCK as usize)
        .map(|bs| {
            let be = (bs + COMPARE_BLOCK).min(job.end);
            let data: Vec<(u64, u64)> = job
                .data
                .iter()
                .filter(|d| d.0 < be && bs < d.1)
                .map(|d| (d.0.max(bs), d.1.min(be)))
                .collect();
            let known_zero = bs >= fresh_from;
            let compare = match mode {
                CopyMode::Full => data.is_empty() && !known_zero,
                CopyMode::Differential => !(data.is_empty() && known_zero),
            };
            Block {
                start: bs,
                end: be,
                data,
                known_zero,
                compare,
            }
        })
        .collect();
    // The target bytes the comparisons need, in one read.
    let to_read = blocks.iter().filter(|b| b.compare && !b.known_zero);
    let span = to_read.clone().map(|b| b.start).min().zip(to_read.map(|b| b.end).max());
    let mut target = Vec::new();
    if let Some((s, e)) = span {
        target = vec![0u8; (e - s) as usize];
        file.read_exact_at(&mut target, s)?;
    }

    let mut stats = CopyStats::default();
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut write = |s: u64, e: u64| match writes.last_mut() {
        Some(last) if last.1 == s => last.1 = e,
        _ => writes.push((s, e)),
    };
    let rel = |x: u64| (x - job.start) as usize;
    for b in &blocks {
        let data_bytes: u64 = b.data.iter().map(|d| d.1 - d.0).sum();
        let hole_bytes = (b.end - b.start) - data_bytes;
        let wanted = &view_buf[rel(b.start)..rel(b.end)];
        let differs = if !b.compare {
            // Full: data is written unconditionally; a hole over known zeroes is left alone.
            !b.data.is_empty()
        } else {
            stats.blocks_compared += 1;
            if b.known_zero {
                wanted.iter().any(|x| *x != 0)
            } else {
                let (s, _) = span.expect("blocks to compare were read");
                let at = (b.start - s) as usize;
                target[at..at + wanted.len()] != *wanted
            }
        };
        if !differs {
            stats.bytes_skipped_holes += hole_bytes;
            continue;
        }
        stats.blocks_written += 1;
        if b.known_zero {
            // Holes already read as zero: write the data only, the file stays sparse.
            for &(s, e) in &b.data {
                write(s, e);
            }
            stats.bytes_written += data_bytes;
            stats.bytes_skipped_holes += hole_bytes;
        } else {
            write(b.start, b.end);
            stats.bytes_written += b.end - b.start;
        }
    }
    for (s, e) in writes {
        file.write_all_at(&view_buf[rel(s)..rel(e)], s)?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64, allocated: bool) -> Extent {
        Extent { offset, len, allocated }
    }

    #[test]
    fn jobs_split_windows_into_aligned_chunks_with_their_data() {
        let m = COPY_CHUNK;
        // Data, hole across a chunk boundary, then a gap the view did not describe (data).
        let jobs = jobs(
            0,
            3 * m + 10,
            &[e(0, 100, true), e(100, 2 * m, false), e(2 * m + 100, 50, true)],
        );
        let got: Vec<_> = jobs.iter().map(|j| (j.start, j.end, j.data.clone())).collect();
        assert_eq!(
            got,
            vec![
                (0, m, vec![(0, 100)]),
                (m, 2 * m, vec![]),
                (2 * m, 3 * m, vec![(2 * m + 100, 3 * m)]),
                (3 * m, 3 * m + 10, vec![(3 * m, 3 * m + 10)]),
            ]
        );
    }
}

//! Copy-on-write overlay for test failover: a writable [`DiskView`] over a read-only recovery
//! point. Writes land in a sparse file in the overlay's directory, tracked by a persisted,
//! checksummed map of written blocks; the point itself never changes and [`discard`] drops it all.
//!
//! # On-disk format (directory `dir`)
//!
//! * `data` — a sparse file as long as the disk; block `i` of the disk lives at byte
//!   `i * BLOCK_SIZE` (identity layout, so only written blocks take space).
//! * `map` — which blocks the overlay holds, rewritten atomically (`map.tmp`, fsync, rename,
//!   fsync of the directory) by [`DiskView::flush`] after the data file is fdatasync'ed, so the
//!   map never names a block whose data is not durable. All integers little-endian:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "LBOVMAP\0"
//!      8     4  format version (1)
//!     12     4  block size (4096)
//!     16     4  blocks per chunk (4096)
//!     20     4  reserved, 0
//!     24     8  disk size in bytes (must equal the base's size on open)
//!     32     8  number of chunk records N
//!     40  N*1032 chunk records, ascending chunk index: index u64, then the DATA bitmap (64 × u64)
//!               and the ZERO bitmap (64 × u64); bit b of word w is block index*4096 + w*64 + b
//!  end-4     4  CRC-32 (IEEE) of every byte before it
//! ```
//!
//! A block is in one of three states: not in either bitmap (read from the base), DATA (read from
//! `data`) or ZERO (written with zeroes: reads as zeroes, reported as a hole, takes no space —
//! `NBD_CMD_WRITE_ZEROES` and zero-filled writes become these).
//!
//! Durability: a flush makes every completed write durable. Writes after the last flush survive
//! a clean close (drop) and are flushed in the background every [`AUTO_FLUSH_INTERVAL`]; after a
//! crash, a new block written since the last flush reads as the base again, while an overwrite of
//! a block the overlay already held may show (it is written in place, as on a real disk).
//!
//! Lifecycle (test failover): `Overlay::open` (blocking) → `PointExports::add_overlay(name, ..)`;
//! cleanup: `remove_overlay(name)`, drop the last `Arc` (open NBD connections hold one), then
//! [`discard`].

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tracing::{debug, warn};

use crate::view::{DiskView, Extent};

/// Granularity of the overlay: a partial write reads the rest of its block from below.
pub const BLOCK_SIZE: u64 = 4096;
/// Blocks per map chunk (16 MiB of disk); the map stores only chunks that hold written blocks.
const CHUNK_BLOCKS: u64 = 4096;
const CHUNK_WORDS: usize = (CHUNK_BLOCKS / 64) as usize;
const MAP_MAGIC: &[u8; 8] = b"LBOVMAP\0";
const MAP_VERSION: u32 = 1;
const MAP_HEADER_LEN: usize = 40;
const CHUNK_RECORD_LEN: usize = 8 + 2 * 8 * CHUNK_WORDS;
const DATA_FILE: &str = "data";
const MAP_FILE: &str = "map";
const MAP_TMP_FILE: &str = "map.tmp";
/// While a runtime is around, an overlay with unflushed writes is flushed this often, so a crash
/// loses at most this much of what clients wrote without flushing.
pub const AUTO_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockState {
    /// Not written: read from the base.
    Base,
    /// Held in the data file.
    Data,
    /// Written with zeroes: reads as zeroes, nothing stored.
    Zero,
}

#[derive(Clone)]
struct Chunk {
    data: [u64; CHUNK_WORDS],
    zero: [u64; CHUNK_WORDS],
}

/// Which blocks the overlay holds, in chunks of [`CHUNK_BLOCKS`] allocated on first write.
#[derive(Clone, Default)]
struct BlockMap {
    chunks: BTreeMap<u64, Box<Chunk>>,
    data_blocks: u64,
    zero_blocks: u64,
    /// Bumped on every change; `flush` skips rewriting a map it already persisted.
    generation: u64,
}

impl BlockMap {
    fn state(&self, block: u64) -> BlockState {
        let Some(c) = self.chunks.get(&(block / CHUNK_BLOCKS)) else {
            return BlockState::Base;
        };
        let (w, bit) = (((block % CHUNK_BLOCKS) / 64) as usize, 1u64 << (block % 64));
        if c.data[w] & bit != 0 {
            BlockState::Data
        } else if c.zero[w] & bit != 0 {
            BlockState::Zero
        } else {
            BlockState::Base
        }
    }

    fn set(&mut self, block: u64, state: BlockState) {
        let old = self.state(block);
        if old == state {
            return;
        }
        let c = self.chunks.entry(block / CHUNK_BLOCKS).or_insert_with(|| {
            Box::new(Chunk {
                data: [0; CHUNK_WORDS],
                zero: [0; CHUNK_WORDS],
            })
        });
        let (w, bit) = (((block % CHUNK_BLOCKS) / 64) as usize, 1u64 << (block % 64));
        c.data[w] &= !bit;
        c.zero[w] &= !bit;
        match old {
            BlockState::Data => self.data_blocks -= 1,
            BlockState::Zero => self.zero_blocks -= 1,
            BlockState::Base => {}
        }
        match state {
            BlockState::Data => {
                c.data[w] |= bit;
                self.data_blocks += 1;
            }
            BlockState::Zero => {
                c.zero[w] |= bit;
                self.zero_blocks += 1;
            }
            BlockState::Base => {}
        }
        self.generation += 1;
    }

    /// Runs of equal state covering blocks `start..end`, in order; O(chunks) over unwritten space.
    fn runs(&self, start: u64, end: u64) -> Vec<(u64, u64, BlockState)> {
        let mut out: Vec<(u64, u64, BlockState)> = Vec::new();
        let mut push = |s: u64, e: u64, st: BlockState| match out.last_mut() {
            Some(last) if last.2 == st && last.1 == s => last.1 = e,
            _ => out.push((s, e, st)),
        };
        let mut block = start;
        while block < end {
            let idx = block / CHUNK_BLOCKS;
            let Some((&next, chunk)) = self.chunks.range(idx..).next() else {
                push(block, end, BlockState::Base);
                break;
            };
            if next > idx {
                let stop = (next * CHUNK_BLOCKS).min(end);
                push(block, stop, BlockState::Base);
                block = stop;
                continue;
            }
            let chunk_end = ((idx + 1) * CHUNK_BLOCKS).min(end);
            while block < chunk_end {
                let w = ((block % CHUNK_BLOCKS) / 64) as usize;
                if block.is_multiple_of(64) && block + 64 <= chunk_end && chunk.data[w] | chunk.zero[w] == 0 {
                    push(block, block + 64, BlockState::Base);
                    block += 64;
                    continue;
                }
                let bit = 1u64 << (block % 64);
                let st = if chunk.data[w] & bit != 0 {
                    BlockState::Data
                } else if chunk.zero[w] & bit != 0 {
                    BlockState::Zero
                } else {
                    BlockState::Base
                };
                push(block, block + 1, st);
                block += 1;
            }
        }
        out
    }

    fn encode(&self, disk_size: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAP_HEADER_LEN + self.chunks.len() * CHUNK_RECORD_LEN + 4);
        out.extend_from_slice(MAP_MAGIC);
        out.extend_from_slice(&MAP_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&(CHUNK_BLOCKS as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&disk_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (idx, c) in &self.chunks {
            out.extend_from_slice(&idx.to_le_bytes());
            for w in c.data.iter().chain(c.zero.iter()) {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], disk_size: u64, path: &Path) -> io::Result<Self> {
        let corrupt = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("overlay map {} is corrupt: {why}", path.display()),
            )
        };
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if bytes.len() < MAP_HEADER_LEN + 4 {
            return Err(corrupt(format!("{} bytes, shorter than its header", bytes.len())));
        }
        if &bytes[..8] != MAP_MAGIC {
            return Err(corrupt("bad magic, not an overlay map".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let (stored, computed) = (
            u32::from_le_bytes(crc.try_into().expect("4 bytes")),
            crc32fast::hash(body),
        );
        if stored != computed {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let version = u32_at(8);
        if version != MAP_VERSION {
            return Err(corrupt(format!(
                "format version {version}, this build reads version {MAP_VERSION}"
            )));
        }
        if u64::from(u32_at(12)) != BLOCK_SIZE || u64::from(u32_at(16)) != CHUNK_BLOCKS {
            return Err(corrupt(format!(
                "block size {} / chunk {} blocks, expected {BLOCK_SIZE} / {CHUNK_BLOCKS}",
                u32_at(12),
                u32_at(16)
            )));
        }
        let size = u64_at(24);
        if size != disk_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "overlay map {} is for a disk of {size} bytes, the base has {disk_size}: not this disk's overlay",
                    path.display()
                ),
            ));
        }
        let count = u64_at(32);
        let expect = (body.len() - MAP_HEADER_LEN) as u64;
        if count.checked_mul(CHUNK_RECORD_LEN as u64) != Some(expect) {
            return Err(corrupt(format!("{count} chunk records do not fill {expect} bytes")));
        }
        let blocks = disk_size.div_ceil(BLOCK_SIZE);
        let mut map = BlockMap::default();
        let mut prev: Option<u64> = None;
        for rec in body[MAP_HEADER_LEN..].chunks_exact(CHUNK_RECORD_LEN) {
            let idx = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            if prev.is_some_and(|p| p >= idx) || idx >= blocks.div_ceil(CHUNK_BLOCKS) {
                return Err(corrupt(format!("chunk index {idx} out of order or beyond the disk")));
            }
            prev = Some(idx);
            let word = |i: usize| u64::from_le_bytes(rec[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
            let mut c = Chunk {
                data: [0; CHUNK_WORDS],
                zero: [0; CHUNK_WORDS],
            };
            for w in 0..CHUNK_WORDS {
                c.data[w] = word(w);
                c.zero[w] = word(CHUNK_WORDS + w);
                if c.data[w] & c.zero[w] != 0 {
                    return Err(corrupt(format!("chunk {idx}: a block is both data and zero")));
                }
                let first_block = idx * CHUNK_BLOCKS + w as u64 * 64;
                let valid = blocks.saturating_sub(first_block).min(64);
                let beyond = if valid == 64 { 0 } else { !0u64 << valid };
                if (c.data[w] | c.zero[w]) & beyond != 0 {
                    return Err(corrupt(format!("chunk {idx}: blocks beyond the end of the disk")));
                }
                map.data_blocks += u64::from(c.data[w].count_ones());
                map.zero_blocks += u64::from(c.zero[w].count_ones());
            }
            map.chunks.insert(idx, Box::new(c));
        }
        Ok(map)
    }
}

/// Block ranges held by in-flight writes; a write waits for overlapping ones, so the
/// read-modify-write of a partial block never loses a neighbouring write to the same block.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: tokio::sync::Notify,
}

/// Owned so that it can travel into the blocking task that finishes the write: the range stays
/// locked until the data and the map are updated, even if the request is abandoned.
struct RangeGuard {
    locks: Arc<RangeLocks>,
    range: (u64, u64),
}

impl RangeLocks {
    async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().expect("range locks");
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        locks: self.clone(),
                        range: (start, end),
                    };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().expect("range locks");
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

/// What the blocking side of the overlay shares.
struct Store {
    dir: PathBuf,
    size: u64,
    data: File,
    map: RwLock<BlockMap>,
    /// Bumped by every write; `flush` remembers the last one it made durable.
    writes: AtomicU64,
}

impl Store {
    fn map(&self) -> std::sync::RwLockReadGuard<'_, BlockMap> {
        self.map.read().expect("overlay map")
    }

    /// fdatasync of the data, then the map atomically; returns the generation it persisted.
    fn persist(&self, persisted_map: u64) -> io::Result<u64> {
        let (encoded, generation) = {
            let map = self.map();
            (
                (map.generation != persisted_map).then(|| map.encode(self.size)),
                map.generation,
            )
        };
        // Every block in the snapshot had its data written before it was marked, so syncing the
        // data after taking the snapshot makes everything the snapshot names durable.
        self.data.sync_data()?;
        if let Some(encoded) = encoded {
            write_atomically(&self.dir, MAP_FILE, &encoded)?;
        }
        Ok(generation)
    }
}

/// Writes `dir/name` through `dir/map.tmp`: write, fsync, rename, fsync the directory.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(MAP_TMP_FILE);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// What `flush` persisted last: (write counter, map generation).
#[derive(Default)]
struct Persisted {
    writes: u64,
    generation: u64,
}

/// A writable copy-on-write view over a read-only base (see the module docs for the format).
///
/// Safe for concurrent use by several NBD connections with pipelined requests: reads run in
/// parallel with everything; writes to overlapping blocks are serialised. Only one `Overlay`
/// may have a directory open at a time (nothing enforces it across processes).
pub struct Overlay {
    base: Arc<dyn DiskView>,
    store: Arc<Store>,
    locks: Arc<RangeLocks>,
    persisted: tokio::sync::Mutex<Persisted>,
}

impl Overlay {
    /// Opens the overlay kept in `dir` (created when missing) over `base`. An overlay reopened
    /// after a restart keeps every write that was flushed; unflushed writes survive a clean drop
    /// and, while a tokio runtime runs, are flushed within [`AUTO_FLUSH_INTERVAL`] (best effort).
    ///
    /// Blocking (reads the map): call it from `spawn_blocking` in async code. Errors:
    /// `InvalidData` with the map's path when the map is corrupt, of another format version, or
    /// made for a disk of another size.
    pub fn open(dir: &Path, base: Arc<dyn DiskView>) -> io::Result<Arc<Overlay>> {
        let size = base.size();
        std::fs::create_dir_all(dir)?;
        let map_path = dir.join(MAP_FILE);
        let _ = std::fs::remove_file(dir.join(MAP_TMP_FILE));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(DATA_FILE))?;
        let map = match std::fs::read(&map_path) {
            Ok(bytes) => BlockMap::decode(&bytes, size, &map_path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // New (or created by a process that died before writing its first map): empty.
                if data.metadata()?.len() != size {
                    data.set_len(size)?;
                }
                write_atomically(dir, MAP_FILE, &BlockMap::default().encode(size))?;
                BlockMap::default()
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", map_path.display()))),
        };
        if data.metadata()?.len() != size {
            data.set_len(size)?;
        }
        debug!(dir = %dir.display(), size, data_blocks = map.data_blocks, zero_blocks = map.zero_blocks,
            "overlay opened");
        let generation = map.generation;
        let overlay = Arc::new(Overlay {
            base,
            store: Arc::new(Store {
                dir: dir.to_owned(),
                size,
                data,
                map: RwLock::new(map),
                writes: AtomicU64::new(0),
            }),
            locks: Arc::default(),
            persisted: tokio::sync::Mutex::new(Persisted { writes: 0, generation }),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(auto_flush(Arc::downgrade(&overlay)));
        }
        Ok(overlay)
    }

    /// The directory the overlay lives in.
    pub fn dir(&self) -> &Path {
        &self.store.dir
    }

    /// Bytes of written data held in the overlay's data file (blocks written with zeroes excluded).
    pub fn written_bytes(&self) -> u64 {
        let map = self.store.map();
        let mut bytes = map.data_blocks * BLOCK_SIZE;
        let tail = self.store.size % BLOCK_SIZE;
        if tail != 0 && map.state(self.store.size / BLOCK_SIZE) == BlockState::Data {
            bytes -= BLOCK_SIZE - tail;
        }
        bytes
    }

    /// Bytes written with zeroes (read as zeroes, take no space).
    pub fn zeroed_bytes(&self) -> u64 {
        let map = self.store.map();
        let mut bytes = map.zero_blocks * BLOCK_SIZE;
        let tail = self.store.size % BLOCK_SIZE;
        if tail != 0 && map.state(self.store.size / BLOCK_SIZE) == BlockState::Zero {
            bytes -= BLOCK_SIZE - tail;
        }
        bytes
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<u64> {
        offset
            .checked_add(len)
            .filter(|end| *end <= self.store.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "beyond the end of the disk"))
    }

    /// The current content of `[offset, end)`: overlay blocks, zeroes and base, merged.
    async fn read_range(&self, offset: u64, end: u64) -> io::Result<Bytes> {
        let len = (end - offset) as usize;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let runs = self.store.map().runs(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let clip = |s: u64, e: u64| (s * BLOCK_SIZE).max(offset)..(e * BLOCK_SIZE).min(end);
        if let [(_, _, BlockState::Base)] = runs.as_slice() {
            return self.base.read_at(offset, len).await;
        }
        let base_reads =
            futures::future::try_join_all(runs.iter().filter(|r| r.2 == BlockState::Base).map(|&(s, e, _)| {
                let r = clip(s, e);
                self.base.read_at(r.start, (r.end - r.start) as usize)
            }));
        let file_ranges: Vec<_> = runs
            .iter()
            .filter(|r| r.2 == BlockState::Data)
            .map(|&(s, e, _)| clip(s, e))
            .collect();
        let store = self.store.clone();
        let file_reads = async move {
            if file_ranges.is_empty() {
                return Ok(Vec::new());
            }
            tokio::task::spawn_blocking(move || {
                file_ranges
                    .into_iter()
                    .map(|r| {
                        let mut buf = vec![0u8; (r.end - r.start) as usize];
                        store.data.read_exact_at(&mut buf, r.start)?;
                        Ok(buf)
                    })
                    .collect::<io::Result<Vec<_>>>()
            })
            .await
            .map_err(io::Error::other)?
        };
        let (base_parts, file_parts) = tokio::try_join!(base_reads, file_reads)?;
        if let ([], [only]) = (base_parts.as_slice(), file_parts.as_slice()) {
            if only.len() == len {
                return Ok(Bytes::from(file_parts.into_iter().next().expect("one part")));
            }
        }
        let (mut base_parts, mut file_parts) = (base_parts.into_iter(), file_parts.into_iter());
        let mut out = BytesMut::with_capacity(len);
        for &(s, e, state) in &runs {
            let r = clip(s, e);
            let n = (r.end - r.start) as usize;
            match state {
                BlockState::Base => {
                    let part = base_parts.next().expect("one base read per base run");
                    if part.len() != n {
                        return Err(io::Error::other(format!(
                            "base view returned {} bytes for a read of {n}",
                            part.len()
                        )));
                    }
                    out.extend_from_slice(&part);
                }
                BlockState::Data => out.extend_from_slice(&file_parts.next().expect("one file read per data run")),
                BlockState::Zero => out.resize(out.len() + n, 0),
            }
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = self.check_range(offset, data.len() as u64)?;
        let size = self.store.size;
        let (first, last_end) = (offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let guard = self.locks.lock(first, last_end).await;
        let span_start = first * BLOCK_SIZE;
        let span_end = (last_end * BLOCK_SIZE).min(size);
        // Whole blocks (the disk's short last block counts as whole when written to its end).
        let buf = if span_start == offset && span_end == end {
            data
        } else {
            let mut buf = BytesMut::zeroed((span_end - span_start) as usize);
            if offset != span_start {
                let head_end = ((first + 1) * BLOCK_SIZE).min(size);
                let head = self.read_range(span_start, head_end).await?;
                buf[..head.len()].copy_from_slice(&head);
            }
            if end != span_end && (end > (first + 1) * BLOCK_SIZE || offset == span_start) {
                let tail_start = (last_end - 1) * BLOCK_SIZE;
                let tail = self.read_range(tail_start, span_end).await?;
                buf[(tail_start - span_start) as usize..].copy_from_slice(&tail);
            }
            buf[(offset - span_start) as usize..(end - span_start) as usize].copy_from_slice(&data);
            buf.freeze()
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            // Runs of non-zero blocks go to the data file in one write each; zero blocks are marked.
            let states: Vec<BlockState> = buf
                .chunks(BLOCK_SIZE as usize)
                .map(|b| {
                    if b.iter().all(|x| *x == 0) {
                        BlockState::Zero
                    } else {
                        BlockState::Data
                    }
                })
                .collect();
            let mut i = 0;
            while i < states.len() {
                let j = i + states[i..].iter().take_while(|s| **s == states[i]).count();
                if states[i] == BlockState::Data {
                    let lo = i * BLOCK_SIZE as usize;
                    let hi = (j * BLOCK_SIZE as usize).min(buf.len());
                    store.data.write_all_at(&buf[lo..hi], span_start + lo as u64)?;
                }
                i = j;
            }
            let mut map = store.map.write().expect("overlay map");
            for (k, st) in states.into_iter().enumerate() {
                map.set(first + k as u64, st);
            }
            drop(map);
            store.writes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn allocation(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.store.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let runs = self.store.map().runs(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE));
        let base = if runs.iter().any(|r| r.2 == BlockState::Base) {
            self.base.extents(offset, end - offset).await?
        } else {
            Vec::new()
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |lo: u64, hi: u64, allocated: bool| {
            if lo >= hi {
                return;
            }
            match out.last_mut() {
                Some(e) if e.allocated == allocated && e.offset + e.len == lo => e.len += hi - lo,
                _ => out.push(Extent {
                    offset: lo,
                    len: hi - lo,
                    allocated,
                }),
            }
        };
        for (s, e, state) in runs {
            let (lo, hi) = ((s * BLOCK_SIZE).max(offset), (e * BLOCK_SIZE).min(end));
            match state {
                BlockState::Data => push(lo, hi, true),
                BlockState::Zero => push(lo, hi, false),
                BlockState::Base => {
                    // The base's extents clipped to the run; gaps it leaves are data (always safe).
                    let mut pos = lo;
                    for x in &base {
                        let (xs, xe) = (x.offset.max(pos), (x.offset + x.len).min(hi));
                        if xs >= xe {
                            continue;
                        }
                        push(pos, xs, true);
                        push(xs, xe, x.allocated);
                        pos = xe;
                    }
                    push(pos, hi, true);
                }
            }
        }
        Ok(out)
    }

    async fn flush_now(&self) -> io::Result<()> {
        let mut persisted = self.persisted.lock().await;
        let writes = self.store.writes.load(Ordering::Relaxed);
        if writes == persisted.writes && self.store.map().generation == persisted.generation {
            return Ok(());
        }
        let store = self.store.clone();
        let known = persisted.generation;
        let generation = tokio::task::spawn_blocking(move || store.persist(known))
            .await
            .map_err(io::Error::other)??;
        *persisted = Persisted { writes, generation };
        Ok(())
    }

    fn needs_flush(&self) -> bool {
        match self.persisted.try_lock() {
            Ok(p) => {
                p.writes != self.store.writes.load(Ordering::Relaxed) || p.generation != self.store.map().generation
            }
            Err(_) => false,
        }
    }
}

async fn auto_flush(overlay: Weak<Overlay>) {
    loop {
        tokio::time::sleep(AUTO_FLUSH_INTERVAL).await;
        let Some(overlay) = overlay.upgrade() else {
            return;
        };
        if overlay.needs_flush() {
            if let Err(e) = overlay.flush_now().await {
                warn!(dir = %overlay.dir().display(), error = %e, "overlay: background flush failed");
            }
        }
    }
}

impl Drop for Overlay {
    /// Best effort: makes what was written since the last flush durable.
    fn drop(&mut self) {
        let persisted = self.persisted.get_mut();
        if persisted.writes == self.store.writes.load(Ordering::Relaxed)
            && persisted.generation == self.store.map().generation
        {
            return;
        }
        if let Err(e) = self.store.persist(persisted.generation) {
            warn!(dir = %self.store.dir.display(), error = %e, "overlay: flush on close failed");
        }
    }
}

impl DiskView for Overlay {
    fn size(&self) -> u64 {
        self.store.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let end = self.check_range(offset, len as u64)?;
            self.read_range(offset, end).await
        })
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'_, io::Result<Vec<Extent>>> {
        Box::pin(self.allocation(offset, len))
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.write(offset, data))
    }

    /// fdatasync of the data file, then the map rewritten atomically (when it changed).
    fn flush(&self) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(self.flush_now())
    }
}

/// Removes the overlay kept in `dir`: its files, then the directory (which must then be empty,
/// so nothing else is ever deleted). A missing directory is not an error. Remove the overlay
/// from the exports and drop it first: an open `Overlay` would keep writing to unlinked files.
pub fn discard(dir: &Path) -> io::Result<()> {
    for name in [MAP_FILE, MAP_TMP_FILE, DATA_FILE] {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("overlay directory {} not removed: {e}", dir.display()),
        )),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_states_and_skip_unwritten_chunks() {
        let mut m = BlockMap::default();
        m.set(5, BlockState::Data);
        m.set(6, BlockState::Data);
        m.set(7, BlockState::Zero);
        m.set(3 * CHUNK_BLOCKS + 1, BlockState::Data);
        assert_eq!(
            m.runs(0, 10 * CHUNK_BLOCKS),
            vec![
                (0, 5, BlockState::Base),
                (5, 7, BlockState::Data),
                (7, 8, BlockState::Zero),
                (8, 3 * CHUNK_BLOCKS + 1, BlockState::Base),
                (3 * CHUNK_BLOCKS + 1, 3 * CHUNK_BLOCKS + 2, BlockState::Data),
                (3 * CHUNK_BLOCKS + 2, 10 * CHUNK_BLOCKS, BlockState::Base),
            ]
        );
        assert_eq!(m.runs(6, 7), vec![(6, 7, BlockState::Data)]);
        assert_eq!((m.data_blocks, m.zero_blocks), (3, 1));
        m.set(6, BlockState::Zero);
        assert_eq!((m.data_blocks, m.zero_blocks), (2, 2));
    }

    #[test]
    fn map_round_trips_and_rejects_damage() {
        let size = 40 * CHUNK_BLOCKS * BLOCK_SIZE + 100;
        let mut m = BlockMap::default();
        for b in [0, 63, 64, 4095, 4096, 40 * CHUNK_BLOCKS] {
            m.set(b, BlockState::Data);
        }
        m.set(9999, BlockState::Zero);
        let bytes = m.encode(size);
        let path = Path::new("/x/map");
        let back = BlockMap::decode(&bytes, size, path).unwrap();
        assert_eq!(
            back.runs(0, size.div_ceil(BLOCK_SIZE)),
            m.runs(0, size.div_ceil(BLOCK_SIZE))
        );
        assert_eq!((back.data_blocks, back.zero_blocks), (6, 1));

        let err = |b: &[u8], s: u64| BlockMap::decode(b, s, path).err().unwrap().to_string();
        let mut flipped = bytes.clone();
        flipped[MAP_HEADER_LEN + 9] ^= 1;
        assert!(
            err(&flipped, size).contains("checksum mismatch"),
            "{}",
            err(&flipped, size)
        );
        assert!(err(&bytes[..bytes.len() - 1], size).contains("checksum"));
        assert!(err(&bytes[..10], size).contains("shorter than its header"));
        assert!(err(b"not a map at all, really not one, nope......", size).contains("bad magic"));
        assert!(err(&bytes, size + 4096).contains("not this disk's overlay"));
        // A newer version with a valid checksum.
        let mut v2 = bytes[..bytes.len() - 4].to_vec();
        v2[8] = 2;
        let crc = crc32fast::hash(&v2);
        v2.extend_from_slice(&crc.to_le_bytes());
        assert!(err(&v2, size).contains("format version 2"));
        // A block past the end of the disk, checksum fixed up.
        let mut beyond = BlockMap::default();
        beyond.set(40 * CHUNK_BLOCKS + 1, BlockState::Data);
        assert!(err(&beyond.encode(size), size).contains("beyond the end"));
    }
}

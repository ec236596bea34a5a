//! ext2/3/4 read by inode number: directories are read once and indexed by name, files are opened
//! from their inode (no path resolution, no linear directory scans per open). Used for cleanly
//! unmounted filesystems without inline data or meta_bg; others fall back to `ext4-view` ([`super::ext4`]).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::runtime::Handle;

use super::ext4::{ChunkCache, Meta};

const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
/// Incompatible features this reader understands (anything else: fall back).
const INCOMPAT_KNOWN: u32 = 0x2 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x10000 | 0x20000;
const FL_ENCRYPT: u32 = 0x800;
const FL_EXTENTS: u32 = 0x80000;
const FL_INLINE_DATA: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// Most extents or block pointers one file may map to (a guard against corrupt trees).
const MAX_EXTENTS: usize = 1 << 22;

fn u16le(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A run of file blocks: `len` blocks from logical block `lblk` at physical block `pblk`
/// (`pblk == None`: reads as zeros, a hole or an unwritten extent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub lblk: u64,
    pub len: u64,
    pub pblk: Option<u64>,
}

/// What the mount needs of an inode.
#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u32,
    pub meta: Meta,
    pub nlink: u32,
    flags: u32,
    block: [u8; 60],
    blocks_lo: u32,
    file_acl: bool,
}

/// One directory entry.
#[derive(Clone, Debug)]
pub struct DirEnt {
    pub name: Vec<u8>,
    pub ino: u32,
    pub kind: fuser::FileType,
}

/// A directory, read once: its entries in on-disk order and an index by name.
pub struct Dir {
    pub entries: Vec<DirEnt>,
    by_name: HashMap<Vec<u8>, usize>,
}

impl Dir {
    pub fn get(&self, name: &[u8]) -> Option<&DirEnt> {
        self.by_name.get(name).map(|i| &self.entries[*i])
    }
}

#[derive(Clone)]
struct DirWeight;

impl quick_cache::Weighter<u32, Arc<Dir>> for DirWeight {
    fn weight(&self, _key: &u32, val: &Arc<Dir>) -> u64 {
        val.entries.len() as u64 + 1
    }
}

/// An ext2/3/4 filesystem in `[start, start + len)` of a cached disk.
pub struct InodeFs {
    cache: Arc<ChunkCache>,
    rt: Handle,
    start: u64,
    len: u64,
    block_size: u64,
    blocks: u64,
    inodes: u32,
    inodes_per_group: u32,
    inode_size: u32,
    filetype: bool,
    /// Inode table block of each group.
    tables: Vec<u64>,
    dirs: quick_cache::sync::Cache<u32, Arc<Dir>, DirWeight>,
}

impl InodeFs {
    /// Opens the filesystem; `Ok(None)` when it uses something this reader leaves to `ext4-view`
    /// (a journal to replay, inline data, meta_bg, ...).
    pub fn open(cache: Arc<ChunkCache>, start: u64, len: u64, rt: Handle) -> io::Result<Option<Arc<Self>>> {
        let mut fs = Self {
            cache,
            rt,
            start,
            len,
            block_size: 1024,
            blocks: 0,
            inodes: 0,
            inodes_per_group: 0,
            inode_size: 128,
            filetype: false,
            tables: Vec::new(),
            // Up to ~1M cached directory entries.
            dirs: quick_cache::sync::Cache::with_weighter(4096, 1 << 20, DirWeight),
        };
        let mut sb = vec![0u8; 1024];
        fs.read(1024, &mut sb)?;
        if u16le(&sb, 0x38) != EXT4_MAGIC {
            return Err(corrupt("not an ext2/3/4 superblock"));
        }
        let incompat = u32le(&sb, 0x60);
        let unsupported =
            INCOMPAT_RECOVER | INCOMPAT_JOURNAL_DEV | INCOMPAT_META_BG | INCOMPAT_DIRDATA | INCOMPAT_INLINE_DATA;
        if incompat & unsupported != 0 || incompat & !INCOMPAT_KNOWN != 0 {
            return Ok(None);
        }
        fs.filetype = incompat & INCOMPAT_FILETYPE != 0;
        let log = u32le(&sb, 0x18);
        if log > 6 {
            return Err(corrupt("bad block size"));
        }
        fs.block_size = 1024 << log;
        fs.inodes = u32le(&sb, 0x0);
        let blocks_per_group = u64::from(u32le(&sb, 0x20));
        fs.inodes_per_group = u32le(&sb, 0x28);
        let wide = incompat & INCOMPAT_64BIT != 0;
        fs.blocks = u64::from(u32le(&sb, 0x4)) | if wide { u64::from(u32le(&sb, 0x150)) << 32 } else { 0 };
        if u32le(&sb, 0x4C) >= 1 {
            fs.inode_size = u32::from(u16le(&sb, 0x58));
        }
        let desc_size = if wide { u64::from(u16le(&sb, 0xFE)).max(32) } else { 32 };
        let first_data_block = u64::from(u32le(&sb, 0x14));
        if blocks_per_group == 0
            || fs.inodes_per_group == 0
            || fs.inode_size < 128
            || !fs.inode_size.is_power_of_two()
            || u64::from(fs.inode_size) > fs.block_size
            || fs.blocks.saturating_mul(fs.block_size) > len.saturating_add(fs.block_size)
        {
            return Err(corrupt("implausible superblock"));
        }
        let groups = (fs.blocks - first_data_block).div_ceil(blocks_per_group);
        let mut gdt = vec![0u8; (groups * desc_size) as usize];
        fs.read((first_data_block + 1) * fs.block_size, &mut gdt)?;
        fs.tables = gdt
            .chunks_exact(desc_size as usize)
            .map(|d| {
                u64::from(u32le(d, 0x8))
                    | if desc_size >= 64 {
                        u64::from(u32le(d, 0x28)) << 32
                    } else {
                        0
                    }
            })
            .collect();
        Ok(Some(Arc::new(fs)))
    }

    /// Reads partition bytes (blocking: from the cache, else through the runtime).
    fn read(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        if offset.saturating_add(dst.len() as u64) > self.len {
            return Err(corrupt("read beyond the end of the partition"));
        }
        let at = self.start + offset;
        if self.cache.read_cached(at, dst) {
            return Ok(());
        }
        self.rt.block_on(self.cache.read(at, dst))
    }

    fn block(&self, pblk: u64) -> io::Result<Vec<u8>> {
        if pblk == 0 || pblk >= self.blocks {
            return Err(corrupt(format!("block {pblk} out of range")));
        }
        let mut b = vec![0u8; self.block_size as usize];
        self.read(pblk * self.block_size, &mut b)?;
        Ok(b)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Reads inode `ino`.
    pub fn inode(&self, ino: u32) -> io::Result<Inode> {
        if ino == 0 || ino > self.inodes {
            return Err(corrupt(format!("inode {ino} out of range")));
        }
        let group = ((ino - 1) / self.inodes_per_group) as usize;
        let index = u64::from((ino - 1) % self.inodes_per_group);
        let table = *self
            .tables
            .get(group)
            .ok_or_else(|| corrupt("inode group out of range"))?;
        let mut raw = vec![0u8; self.inode_size as usize];
        self.read(table * self.block_size + index * u64::from(self.inode_size), &mut raw)?;
        let mode = u16le(&raw, 0x0);
        let kind = match mode & 0xF000 {
            0x4000 => fuser::FileType::Directory,
            0xA000 => fuser::FileType::Symlink,
            0x6000 => fuser::FileType::BlockDevice,
            0x2000 => fuser::FileType::CharDevice,
            0x1000 => fuser::FileType::NamedPipe,
            0xC000 => fuser::FileType::Socket,
            0x8000 => fuser::FileType::RegularFile,
            _ => return Err(corrupt(format!("inode {ino} has no valid type"))),
        };
        let size = u64::from(u32le(&raw, 0x4)) | (u64::from(u32le(&raw, 0x6C)) << 32);
        let extra = if raw.len() > 128 {
            u32::from(u16le(&raw, 0x80))
        } else {
            0
        };
        let time = |base: usize, extra_at: usize| {
            let secs = i64::from(u32le(&raw, base) as i32);
            let (secs, nanos) = if extra >= (extra_at + 4 - 128) as u32 && raw.len() >= extra_at + 4 {
                let x = u32le(&raw, extra_at);
                (secs + (i64::from(x & 3) << 32), x >> 2)
            } else {
                (secs, 0)
            };
            let base = if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            };
            base + Duration::from_nanos(u64::from(nanos.min(999_999_999)))
        };
        let meta = Meta {
            kind,
            size,
            perm: mode & 0o7777,
            uid: u32::from(u16le(&raw, 0x2)) | (u32::from(u16le(&raw, 0x78)) << 16),
            gid: u32::from(u16le(&raw, 0x18)) | (u32::from(u16le(&raw, 0x7A)) << 16),
            atime: time(0x8, 0x8C),
            ctime: time(0xC, 0x84),
            mtime: time(0x10, 0x88),
        };
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            ino,
            meta,
            nlink: u32::from(u16le(&raw, 0x1A)),
            flags: u32le(&raw, 0x20),
            block,
            blocks_lo: u32le(&raw, 0x1C),
            file_acl: u32le(&raw, 0x68) != 0 || u16le(&raw, 0x76) != 0,
        })
    }

    /// The block runs of a file or directory, sorted by logical block.
    pub fn map(&self, inode: &Inode) -> io::Result<Vec<Run>> {
        if inode.flags & FL_ENCRYPT != 0 {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "encrypted"));
        }
        if inode.flags & FL_INLINE_DATA != 0 {
            return Err(corrupt("inline data"));
        }
        let mut out = Vec::new();
        if inode.flags & FL_EXTENTS != 0 {
            self.extents(&inode.block, 6, &mut out)?;
            out.sort_by_key(|r| r.lblk);
        } else {
            let mut lblk = 0;
            let file_blocks = inode.meta.size.div_ceil(self.block_size);
            for i in 0..12 {
                self.pointers(
                    u64::from(u32le(&inode.block, i * 4)),
                    0,
                    &mut lblk,
                    file_blocks,
                    &mut out,
                )?;
            }
            for (i, depth) in [(12, 1), (13, 2), (14, 3)] {
                self.pointers(
                    u64::from(u32le(&inode.block, i * 4)),
                    depth,
                    &mut lblk,
                    file_blocks,
                    &mut out,
                )?;
            }
        }
        Ok(out)
    }

    /// An extent tree node (the inode's `i_block`, or a tree block).
    fn extents(&self, node: &[u8], depth_left: u32, out: &mut Vec<Run>) -> io::Result<()> {
        if node.len() < 12 || u16le(node, 0) != EXTENT_MAGIC {
            return Err(corrupt("bad extent header"));
        }
        let entries = usize::from(u16le(node, 2));
        let depth = u16le(node, 6);
        if 12 + entries * 12 > node.len() || u32::from(depth) > depth_left {
            return Err(corrupt("bad extent node"));
        }
        for e in node[12..12 + entries * 12].chunks_exact(12) {
            if depth == 0 {
                let raw_len = u64::from(u16le(e, 4));
                let (len, unwritten) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                let pblk = (u64::from(u16le(e, 6)) << 32) | u64::from(u32le(e, 8));
                if pblk + len > self.blocks {
                    return Err(corrupt("extent beyond the filesystem"));
                }
                if out.len() >= MAX_EXTENTS {
                    return Err(corrupt("too many extents"));
                }
                out.push(Run {
                    lblk: u64::from(u32le(e, 0)),
                    len,
                    pblk: (!unwritten).then_some(pblk),
                });
            } else {
                let child = u64::from(u32le(e, 4)) | (u64::from(u16le(e, 8)) << 32);
                let b = self.block(child)?;
                self.extents(&b, u32::from(depth) - 1, out)?;
            }
        }
        Ok(())
    }

    /// A block pointer of an ext2/3 block map: data (`depth` 0) or an indirect block.
    fn pointers(&self, ptr: u64, depth: u32, lblk: &mut u64, file_blocks: u64, out: &mut Vec<Run>) -> io::Result<()> {
        if *lblk >= file_blocks {
            return Ok(());
        }
        let per = self.block_size / 4;
        let span = per.pow(depth);
        if ptr == 0 {
            *lblk += span;
            return Ok(());
        }
        if depth == 0 {
            if ptr >= self.blocks {
                return Err(corrupt("block pointer beyond the filesystem"));
            }
            match out.last_mut() {
                Some(r) if r.lblk + r.len == *lblk && r.pblk.is_some_and(|p| p + r.len == ptr) => r.len += 1,
                _ => {
                    if out.len() >= MAX_EXTENTS {
                        return Err(corrupt("too many blocks"));
                    }
                    out.push(Run {
                        lblk: *lblk,
                        len: 1,
                        pblk: Some(ptr),
                    })
                }
            }
            *lblk += 1;
            return Ok(());
        }
        let b = self.block(ptr)?;
        for i in 0..per as usize {
            self.pointers(u64::from(u32le(&b, i * 4)), depth - 1, lblk, file_blocks, out)?;
        }
        Ok(())
    }

    /// The pieces of `[offset, offset + len)` of a file (within its size): where each lands in
    /// the destination, its length, and its partition byte offset (`None`: zeros).
    fn pieces(&self, runs: &[Run], offset: u64, len: usize) -> io::Result<Vec<(usize, usize, Option<u64>)>> {
        let bs = self.block_size;
        let end = offset + len as u64;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let lblk = at / bs;
            // The last run starting at or before lblk.
            let i = runs.partition_point(|r| r.lblk <= lblk);
            let run = i.checked_sub(1).map(|i| runs[i]).filter(|r| lblk < r.lblk + r.len);
            let (n, src) = match run {
                Some(r) => {
                    let run_end = (r.lblk + r.len) * bs;
                    let n = (run_end.min(end) - at) as usize;
                    (n, r.pblk.map(|p| p * bs + (at - r.lblk * bs)))
                }
                None => {
                    let next = runs.get(i).map_or(end, |r| (r.lblk * bs).min(end));
                    ((next.max(at + 1) - at).min(end - at) as usize, None)
                }
            };
            if src.is_some_and(|p| p + n as u64 > self.len) {
                return Err(corrupt("file data beyond the partition"));
            }
            out.push(((at - offset) as usize, n, src));
            at += n as u64;
        }
        Ok(out)
    }

    /// Reads `dst.len()` bytes of a file at `offset` (within its size), holes as zeros.
    pub async fn read_file(&self, runs: &[Run], offset: u64, dst: &mut [u8]) -> io::Result<()> {
        for (d, n, src) in self.pieces(runs, offset, dst.len())? {
            match src {
                Some(p) => self.cache.read(self.start + p, &mut dst[d..d + n]).await?,
                None => dst[d..d + n].fill(0),
            }
        }
        Ok(())
    }

    /// [`Self::read_file`] without waiting: `true` when every byte was cached (no runtime hop
    /// for the common small read); `false` (and `dst` partly written) otherwise.
    pub fn read_file_cached(&self, runs: &[Run], offset: u64, dst: &mut [u8]) -> bool {
        let Ok(pieces) = self.pieces(runs, offset, dst.len()) else {
            return false;
        };
        pieces.into_iter().all(|(d, n, src)| match src {
            Some(p) => self.cache.try_read(self.start + p, &mut dst[d..d + n]),
            None => {
                dst[d..d + n].fill(0);
                true
            }
        })
    }

    /// A whole (small) file, blocking: directory contents and symlink targets.
    fn read_all(&self, inode: &Inode, limit: u64) -> io::Result<Vec<u8>> {
        if inode.meta.size > limit {
            return Err(corrupt(format!(
                "inode {} is too large ({} bytes)",
                inode.ino, inode.meta.size
            )));
        }
        let runs = self.map(inode)?;
        let mut out = vec![0u8; inode.meta.size as usize];
        let cached = {
            // Fast path: every block already in the cache.
            let bs = self.block_size;
            runs.iter().all(|r| {
                let Some(p) = r.pblk else { return true };
                let lo = r.lblk * bs;
                if lo >= out.len() as u64 {
                    return true;
                }
                let hi = ((r.lblk + r.len) * bs).min(out.len() as u64);
                p * bs + (hi - lo) <= self.len
                    && self
                        .cache
                        .read_cached(self.start + p * bs, &mut out[lo as usize..hi as usize])
            })
        };
        if !cached {
            self.rt.block_on(self.read_file(&runs, 0, &mut out))?;
        }
        Ok(out)
    }

    /// The entries of directory inode `ino`.
    pub fn dir_of(&self, ino: u32) -> io::Result<Arc<Dir>> {
        match self.dirs.get(&ino) {
            Some(d) => Ok(d),
            None => self.dir(&self.inode(ino)?),
        }
    }

    /// A directory's entries (without `.` and `..`), read once and kept.
    pub fn dir(&self, inode: &Inode) -> io::Result<Arc<Dir>> {
        if let Some(d) = self.dirs.get(&inode.ino) {
            return Ok(d);
        }
        if inode.meta.kind != fuser::FileType::Directory {
            return Err(io::Error::new(io::ErrorKind::NotADirectory, "not a directory"));
        }
        let data = self.read_all(inode, 1 << 30)?;
        let bs = self.block_size as usize;
        let mut entries = Vec::new();
        for block in data.chunks(bs) {
            let mut at = 0;
            while at + 8 <= block.len() {
                let ino = u32le(block, at);
                let mut rec_len = usize::from(u16le(block, at + 4));
                if rec_len == 0 || rec_len == 65535 {
                    rec_len = bs;
                } else if bs >= 65536 {
                    rec_len = (rec_len & 65532) | ((rec_len & 3) << 16);
                }
                let (name_len, ty) = if self.filetype {
                    (usize::from(block[at + 6]), block[at + 7])
                } else {
                    (usize::from(u16le(block, at + 6)), 0)
                };
                if rec_len < 8 || at + rec_len > block.len() || 8 + name_len > rec_len {
                    return Err(corrupt(format!("directory inode {}: bad entry", inode.ino)));
                }
                let name = &block[at + 8..at + 8 + name_len];
                if ino != 0 && name != b"." && name != b".." && !name.is_empty() {
                    let kind = match ty {
                        2 => Some(fuser::FileType::Directory),
                        3 => Some(fuser::FileType::CharDevice),
                        4 => Some(fuser::FileType::BlockDevice),
                        5 => Some(fuser::FileType::NamedPipe),
                        6 => Some(fuser::FileType::Socket),
                        7 => Some(fuser::FileType::Symlink),
                        1 => Some(fuser::FileType::RegularFile),
                        _ => None,
                    };
                    let kind = match kind {
                        Some(k) => k,
                        None => self.inode(ino)?.meta.kind,
                    };
                    entries.push(DirEnt {
                        name: name.to_vec(),
                        ino,
                        kind,
                    });
                }
                at += rec_len;
            }
        }
        let by_name = entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        let dir = Arc::new(Dir { entries, by_name });
        self.dirs.insert(inode.ino, dir.clone());
        Ok(dir)
    }

    /// A symlink's target.
    pub fn readlink(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        if inode.meta.kind != fuser::FileType::Symlink {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a symlink"));
        }
        let size = inode.meta.size as usize;
        // A fast symlink keeps its target in the inode (no data blocks beyond an xattr block).
        let xattr_sectors = if inode.file_acl {
            (self.block_size / 512) as u32
        } else {
            0
        };
        if size < 60 && inode.flags & FL_EXTENTS == 0 && inode.blocks_lo <= xattr_sectors {
            return Ok(inode.block[..size].to_vec());
        }
        self.read_all(inode, 4096)
    }
}

/// SEEK_DATA / SEEK_HOLE within a file of `size` bytes mapped by `runs`.
pub fn seek(runs: &[Run], block_size: u64, size: u64, offset: u64, data: bool) -> Option<u64> {
    if offset >= size {
        return None;
    }
    let mut at = offset;
    for r in runs.iter().filter(|r| r.pblk.is_some()) {
        let (lo, hi) = (r.lblk * block_size, ((r.lblk + r.len) * block_size).min(size));
        if hi <= at {
            continue;
        }
        if data {
            return Some(lo.max(at));
        }
        if lo > at {
            return Some(at);
        }
        at = hi;
    }
    if data {
        None
    } else {
        Some(at.min(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_over_runs() {
        let runs = [
            Run {
                lblk: 0,
                len: 2,
                pblk: Some(10),
            },
            Run {
                lblk: 4,
                len: 1,
                pblk: Some(20),
            },
            Run {
                lblk: 5,
                len: 1,
                pblk: None,
            },
        ];
        assert_eq!(seek(&runs, 4096, 8 * 4096, 0, true), Some(0));
        assert_eq!(seek(&runs, 4096, 8 * 4096, 0, false), Some(8192));
        assert_eq!(seek(&runs, 4096, 8 * 4096, 8192, true), Some(16384));
        assert_eq!(seek(&runs, 4096, 8 * 4096, 16384, false), Some(20480));
        assert_eq!(seek(&runs, 4096, 8 * 4096, 20480, true), None);
        assert_eq!(seek(&runs, 4096, 8 * 4096, 40000, false), None);
    }
}

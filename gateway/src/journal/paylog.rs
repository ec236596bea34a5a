//! The payload log (journal schema 2): write payloads are appended once to plain files and synced
//! with one `fdatasync` per group commit, while RocksDB keeps only a small pointer per record.
//! Before, each payload went through the RocksDB WAL *and* a BlobDB blob file (two kernel copies,
//! two syncs' worth of write-back) plus a memtable copy.
//!
//! ```text
//! file   := header | value*            (named NNNNNNNNNNNNNNNN.lbpay, hex file number)
//! header := "LBPAYLOG" | version u16 | file_no u64 | crc32c u32 (over the 18 bytes before)
//! value  := record (see `record`) | crc32c u32      (the same bytes as an inline journal value)
//! pointer (the journal CF value) := 0xFF | file_no u64 | offset u64 | len u32
//! ```
//! A group's payloads are synced before the RocksDB batch holding their pointers, so a pointer
//! that survives a crash always points at synced bytes; bytes past the last pointer (a crash
//! between the two syncs) are never referenced and go with their file. A file is reclaimed once
//! every record in it is at or below its disk's `uploaded_through`; at open, files that no
//! pointer references are deleted and appends go to a fresh file.
//!
//! Groups are written with direct I/O (`O_DIRECT`) where the file system supports it: each group
//! starts at a 4 KiB-aligned offset and is padded to a multiple of 4 KiB, from a reused aligned
//! buffer. The payloads then skip the page cache, whose copy cost 0.45 s (reused pages) to 4 s
//! (pages new to this VM) of system time per GiB here; the uploader takes the committed records
//! from memory (the journal's hot tail), and reads the log back (after a restart, or when it is
//! more than the hot tail behind) with direct I/O too, see [`read_many`].
//! Reclaimed files are recycled (a few at a time): renamed to the next number and overwritten in
//! place, like RocksDB's recycled WAL files, so an in-place `fdatasync` has no extents or file
//! size to update. Stale bytes past the new end, and padding, are never pointed at.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{DiskMeta, JournalError};
use crate::direct_io::{self, supports_direct_io, AlignedBuf, ALIGN};
use crate::pool::Pool;
use crate::record::LogRecord;

pub const DIR: &str = "payload-log";
const MAGIC: &[u8; 8] = b"LBPAYLOG";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 8 + 4;
/// A file is closed for appends past this size.
const FILE_BYTES: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };
/// Reclaimed files kept for recycling.
const RECYCLE_MAX: usize = 4;
/// A group's buffered bytes are written out (not synced) in pieces of about this size.
const FLUSH_BYTES: usize = if cfg!(test) { 16 << 10 } else { 4 << 20 };
/// The first byte of a pointer value; inline record values start with a record kind (1..=4).
pub const POINTER_TAG: u8 = 0xFF;
pub const POINTER_LEN: usize = 1 + 8 + 8 + 4;
/// Records with at least this much payload go to the payload log; smaller ones stay inline.
pub const MIN_PAYLOAD: usize = 4096;
/// Where a record's journal value lies in the payload log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
}

impl Pointer {
    pub fn encode(&self) -> [u8; POINTER_LEN] {
        let mut v = [0u8; POINTER_LEN];
        v[0] = POINTER_TAG;
        v[1..9].copy_from_slice(&self.file.to_be_bytes());
        v[9..17].copy_from_slice(&self.offset.to_be_bytes());
        v[17..21].copy_from_slice(&self.len.to_be_bytes());
        v
    }

    /// Parses a journal value that is a pointer; `None` for an inline record value.
    pub fn decode(value: &[u8]) -> Option<Result<Self, JournalError>> {
        if value.first() != Some(&POINTER_TAG) {
            return None;
        }
        if value.len() != POINTER_LEN {
            return Some(Err(JournalError::Corrupt(format!(
                "payload pointer of {} bytes",
                value.len()
            ))));
        }
        Some(Ok(Self {
            file: u64::from_be_bytes(value[1..9].try_into().expect("8")),
            offset: u64::from_be_bytes(value[9..17].try_into().expect("8")),
            len: u32::from_be_bytes(value[17..21].try_into().expect("4")),
        }))
    }
}

fn file_name(no: u64) -> String {
    format!("{no:016x}.lbpay")
}

fn parse_name(name: &str) -> Option<u64> {
    u64::from_str_radix(name.strip_suffix(".lbpay")?, 16).ok()
}

fn header(no: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_be_bytes());
    h[10..18].copy_from_slice(&no.to_be_bytes());
    let crc = crc32c::crc32c(&h[..18]);
    h[18..].copy_from_slice(&crc.to_be_bytes());
    h
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Corrupt(format!("payload log {what} {}: {e}", path.display()))
}

/// Opens payload file `no` for reading and checks its header.
pub fn open_for_read(dir: &Path, no: u64) -> Result<File, std::io::Error> {
    let path = dir.join(file_name(no));
    let f = File::open(&path)?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact_at(&mut h, 0)?;
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    if &h[..8] != MAGIC {
        return Err(bad("not a Lifeboat payload log file (bad magic)".into()));
    }
    if crc32c::crc32c(&h[..18]) != u32::from_be_bytes(h[18..].try_into().expect("4")) {
        return Err(bad("header checksum mismatch".into()));
    }
    let version = u16::from_be_bytes(h[8..10].try_into().expect("2"));
    if version != VERSION {
        return Err(bad(format!(
            "unsupported payload log version {version} (expected {VERSION})"
        )));
    }
    let found = u64::from_be_bytes(h[10..18].try_into().expect("8"));
    if found != no {
        return Err(bad(format!("file holds number {found}, its name says {no}")));
    }
    Ok(f)
}

/// Records closer together than this in a file are read in one request, the gap included.
const COALESCE_GAP: u64 = 256 << 10;
/// The most one read request covers.
const EXTENT_MAX: u64 = 64 << 20;

/// Reads the records `pointers` designate, in that order. Neighbours in a file are read in one
/// request, with direct I/O where the file system allows, into one buffer that their payloads
/// then share: no copy into the page cache and none out of it. Each result is the record or why
/// it could not be read (`NotFound` when its file is gone).
pub fn read_many(dir: &Path, pointers: &[Pointer], bufs: &Arc<Pool<AlignedBuf>>) -> Vec<std::io::Result<LogRecord>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let mut out = Vec::with_capacity(pointers.len());
    let mut files: HashMap<u64, (File, Option<File>)> = HashMap::new();
    let mut i = 0;
    while i < pointers.len() {
        let first = pointers[i];
        if first.offset < HEADER_LEN as u64 {
            out.push(Err(invalid(format!(
                "pointer offset {} inside the file header",
                first.offset
            ))));
            i += 1;
            continue;
        }
        let mut end = first.offset + first.len as u64;
        let mut j = i + 1;
        while let Some(p) = pointers.get(j) {
            let p_end = p.offset + p.len as u64;
            if p.file != first.file
                || p.offset < end
                || p.offset - end > COALESCE_GAP
                || p_end - first.offset > EXTENT_MAX
            {
                break;
            }
            end = p_end;
            j += 1;
        }
        match read_extent(dir, &mut files, bufs, first.file, first.offset, end) {
            Ok(extent) => out.extend(pointers[i..j].iter().map(|p| {
                let at = (p.offset - first.offset) as usize;
                LogRecord::from_journal_bytes(extent.slice(at..at + p.len as usize))
                    .map_err(|e| invalid(format!("record at {} of file {}: {e}", p.offset, p.file)))
            })),
            Err(e) => out.extend((i..j).map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))),
        }
        i = j;
    }
    out
}

/// Bytes `start..end` of payload file `no`.
fn read_extent(
    dir: &Path,
    files: &mut HashMap<u64, (File, Option<File>)>,
    bufs: &Arc<Pool<AlignedBuf>>,
    no: u64,
    start: u64,
    end: u64,
) -> std::io::Result<Bytes> {
    let (file, direct) = match files.entry(no) {
        std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
        std::collections::hash_map::Entry::Vacant(slot) => {
            let file = open_for_read(dir, no)?;
            slot.insert((file, direct_io::open_direct(&dir.join(file_name(no)))))
        }
    };
    let eof = || {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("payload file {no} ends before {end}"),
        )
    };
    if let Some(d) = direct.as_ref() {
        let aligned_start = start / ALIGN as u64 * ALIGN as u64;
        let len = direct_io::round_up((end - aligned_start) as usize);
        let mut buf = bufs.take().unwrap_or_default();
        match direct_io::read_at_most(d, buf.fill_mut(len), aligned_start) {
            Ok(n) if aligned_start + n as u64 >= end => {
                let skip = (start - aligned_start) as usize;
                return Ok(bufs.share(buf).slice(skip..skip + (end - start) as usize));
            }
            Ok(_) => return Err(eof()),
            // Refused after all: read this file through the cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
            Err(e) => return Err(e),
        }
    }
    let mut v = vec![0u8; (end - start) as usize];
    let n = direct_io::read_at_most(file, &mut v, start)?;
    if n < v.len() {
        return Err(eof());
    }
    Ok(Bytes::from(v))
}

/// The writer thread's side of the payload log.
pub struct PayloadLog {
    dir: PathBuf,
    file: Option<File>,
    no: u64,
    len: u64,
    /// Per file: the highest sequence number of each disk in it.
    files: BTreeMap<u64, HashMap<u32, u64>>,
    /// The unwritten end of the group being built. Whole 4 KiB blocks are written out as it
    /// passes [`FLUSH_BYTES`], so a large group needs no buffer of its own size.
    buf: AlignedBuf,
    /// Bytes of the group being built already written (after `len`, not yet synced).
    flushed: u64,
    /// A write of the group being built failed: the group fails when it is synced.
    write_error: Option<std::io::Error>,
    /// Files are written with direct I/O (groups aligned and padded to 4 KiB).
    direct: bool,
    /// An append failed: the next group starts a new file (the failed one's length is unknown).
    broken: bool,
    /// Reclaimed files (by their old number) waiting to be recycled; unreferenced, so a restart
    /// deletes them.
    free: Vec<u64>,
}

impl PayloadLog {
    /// Opens the log in `dir` given the pointers the journal holds (`(disk, seq, pointer)`):
    /// deletes files no pointer references and appends to a fresh file.
    pub fn open(dir: PathBuf, live: impl Iterator<Item = (u32, u64, Pointer)>) -> Result<Self, JournalError> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("folder", &dir, e))?;
        let mut files: BTreeMap<u64, HashMap<u32, u64>> = BTreeMap::new();
        for (disk, seq, p) in live {
            let max = files.entry(p.file).or_default().entry(disk).or_insert(0);
            *max = (*max).max(seq);
        }
        let mut highest = files.keys().next_back().copied().unwrap_or(0);
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err("folder", &dir, e))? {
            let entry = entry.map_err(|e| io_err("folder", &dir, e))?;
            let name = entry.file_name();
            let Some(no) = name.to_str().and_then(parse_name) else {
                continue;
            };
            highest = highest.max(no);
            if !files.contains_key(&no) {
                std::fs::remove_file(entry.path()).map_err(|e| io_err("cleanup of", &entry.path(), e))?;
            }
        }
        for no in files.keys() {
            if !dir.join(file_name(*no)).exists() {
                return Err(JournalError::Corrupt(format!(
                    "payload log file {} is missing but the journal points into it",
                    dir.join(file_name(*no)).display()
                )));
            }
        }
        let direct = std::env::var_os("LIFEBOAT_BUFFERED_PAYLOAD_LOG").is_none() && supports_direct_io(&dir);
        Ok(Self {
            direct,
            dir,
            file: None,
            no: highest,
            len: FILE_BYTES,
            files,
            buf: AlignedBuf::new(),
            flushed: 0,
            write_error: None,
            broken: false,
            free: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a new file when the current one is full (or broken, or none is open yet). Called
    /// before each group, so that appends within the group cannot fail.
    pub fn rotate_if_needed(&mut self) -> Result<(), JournalError> {
        if self.file.is_some() && self.len < FILE_BYTES && !self.broken {
            return Ok(());
        }
        let no = self.no + 1;
        let path = self.dir.join(file_name(no));
        let mut options = OpenOptions::new();
        options.write(true);
        if self.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let f = match self.free.pop() {
            Some(old) => {
                let old_path = self.dir.join(file_name(old));
                std::fs::rename(&old_path, &path).map_err(|e| io_err("recycling of", &old_path, e))?;
                options.open(&path).map_err(|e| io_err("open", &path, e))?
            }
            None => options
                .create_new(true)
                .open(&path)
                .map_err(|e| io_err("create", &path, e))?,
        };
        // The header block: padded to 4 KiB with direct I/O, so that groups start aligned.
        debug_assert!(self.buf.is_empty(), "rotation happens between groups");
        self.buf.clear();
        self.buf.put(&header(no));
        let block = if self.direct {
            self.buf.padded()
        } else {
            self.buf.data()
        };
        let len = block.len() as u64;
        let written = f.write_all_at(block, 0);
        self.buf.clear();
        written.map_err(|e| io_err("write", &path, e))?;
        f.sync_all().map_err(|e| io_err("sync", &path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("sync of folder", &self.dir, e))?;
        self.file = Some(f);
        self.no = no;
        self.len = len;
        self.broken = false;
        Ok(())
    }

    /// Whether a file is open for appends (the last rotation succeeded).
    pub fn ready(&self) -> bool {
        self.file.is_some() && !self.broken
    }

    /// Adds a record of `disk` to the group; returns the pointer to store in the journal.
    /// `payload_crc` is the payload's CRC32C when the caller verified it already.
    /// Only after [`Self::rotate_if_needed`] succeeded ([`Self::ready`]).
    pub fn append(&mut self, disk: u32, record: &LogRecord, payload_crc: Option<u32>) -> Pointer {
        assert!(self.ready(), "payload log append without an open file");
        let offset = self.len + self.flushed + self.buf.len() as u64;
        let head = record.encode_head();
        debug_assert!(payload_crc.is_none_or(|c| c == crc32c::crc32c(&record.payload)));
        let crc = match payload_crc {
            Some(c) => crate::crc::combine(crc32c::crc32c(&head), c, record.payload.len()),
            None => crc32c::crc32c_append(crc32c::crc32c(&head), &record.payload),
        };
        self.buf.reserve(head.len() + record.payload.len() + 4);
        self.buf.put(&head);
        self.buf.put(&record.payload);
        self.buf.put(&crc.to_be_bytes());
        let max = self.files.entry(self.no).or_default().entry(disk).or_insert(0);
        *max = (*max).max(record.seq);
        let len = (self.len + self.flushed + self.buf.len() as u64 - offset) as u32;
        if self.buf.len() >= FLUSH_BYTES {
            self.write_out_whole_blocks();
        }
        Pointer {
            file: self.no,
            offset,
            len,
        }
    }

    /// Writes the group's buffered whole 4 KiB blocks and keeps the rest (less than a block).
    fn write_out_whole_blocks(&mut self) {
        let whole = self.buf.len() / ALIGN * ALIGN;
        if whole == 0 || self.write_error.is_some() {
            return;
        }
        let f = self.file.as_ref().expect("a group appends to an open file");
        match f.write_all_at(&self.buf.data()[..whole], self.len + self.flushed) {
            Ok(()) => {
                self.flushed += whole as u64;
                self.buf.drop_front(whole);
            }
            Err(e) => self.write_error = Some(e),
        }
    }

    /// Writes and syncs the group's payloads (before the journal batch that points at them).
    pub fn sync_group(&mut self) -> Result<(), JournalError> {
        if self.buf.is_empty() && self.flushed == 0 && self.write_error.is_none() {
            return Ok(());
        }
        let path = self.dir.join(file_name(self.no));
        let f = self.file.as_ref().expect("a group appends to an open file");
        // With direct I/O the group is padded to 4 KiB, so the next one starts aligned.
        let tail = if self.direct {
            self.buf.padded()
        } else {
            self.buf.data()
        };
        let n = self.flushed + tail.len() as u64;
        let r = match self.write_error.take() {
            Some(e) => Err(e),
            None => f
                .write_all_at(tail, self.len + self.flushed)
                .and_then(|_| f.sync_data()),
        };
        // Keep the buffer's memory for the next group: no fresh pages to fault in and zero.
        self.buf.clear();
        self.flushed = 0;
        match r {
            Ok(()) => {
                self.len += n;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(io_err("append to", &path, e))
            }
        }
    }

    /// Deletes the closed files whose records are all uploaded (after the journal batch that
    /// dropped their pointers is synced).
    pub fn reclaim(&mut self, disks: &BTreeMap<u32, DiskMeta>) {
        let done: Vec<u64> = self
            .files
            .iter()
            .filter(|(no, _)| **no != self.no || self.file.is_none())
            .filter(|(_, per_disk)| {
                per_disk
                    .iter()
                    .all(|(id, max)| disks.get(id).is_some_and(|d| d.uploaded_through >= *max))
            })
            .map(|(no, _)| *no)
            .collect();
        for no in done {
            if self.free.len() < RECYCLE_MAX {
                self.files.remove(&no);
                self.free.push(no);
                continue;
            }
            let path = self.dir.join(file_name(no));
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    self.files.remove(&no);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.files.remove(&no);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete an uploaded payload log file")
                }
            }
        }
    }

    /// Payload log files holding live records (for tests and diagnostics).
    pub fn file_count(&self) -> usize {
        self.files.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{prepare, Journal, JournalError, CF_META, SCHEMA_KEY};
    use super::*;
    use crate::direct_io::ALIGN;
    use crate::protocol::IngestRecord;
    use bytes::Bytes;

    fn files(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(dir.join(DIR))
            .unwrap()
            .filter_map(|e| parse_name(e.unwrap().file_name().to_str()?))
            .collect();
        v.sort_unstable();
        v
    }

    fn write(off: u64, byte: u8, len: usize) -> crate::journal::PreparedRecord {
        prepare(IngestRecord::write("disk0", off, Bytes::from(vec![byte; len])), 1 << 20)
    }

    #[tokio::test]
    async fn payloads_survive_reopen_and_files_go_once_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
            j.commit("m", 1, 1, vec![write(0, 1, 65536), write(65536, 2, 100)])
                .await
                .unwrap();
        }
        let first = files(dir.path());
        assert_eq!(first.len(), 1);
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let d = j.disk("m", "disk0").unwrap();
        let recs = j.read_records(d.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].payload.as_ref(), &[1u8; 65536][..]);
        assert_eq!(recs[1].payload.as_ref(), &[2u8; 100][..], "small payloads stay inline");
        let bytes: u64 = recs.iter().map(|r| r.to_journal_value().len() as u64).sum();
        assert_eq!(j.cache_used(), bytes);
        let plan = j.plan_segment(d.id, 1, 2).await.unwrap();
        j.segment_uploaded(plan, bytes).await.unwrap();
        assert_eq!(j.cache_used(), 0);
        drop(j);
        drop(Journal::open(dir.path(), 1 << 30).unwrap());
        assert!(
            !files(dir.path()).contains(&first[0]),
            "an uploaded file no longer referenced is gone"
        );
    }

    #[tokio::test]
    async fn read_back_coalesces_neighbours_and_skips_other_disks_records() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            j.register_disk("m", "disk0", 64 << 20, 1).await.unwrap();
            j.register_disk("m", "disk1", 64 << 20, 1).await.unwrap();
            let w = |disk: &str, off: u64, byte: u8, len: usize| {
                prepare(IngestRecord::write(disk, off, Bytes::from(vec![byte; len])), 64 << 20)
            };
            // Per batch: two neighbouring disk0 records, then a disk1 one (a gap for disk0's
            // reader, under the coalescing limit), and every fifth batch a 300 KiB disk1 record
            // (a gap over it). 40 batches fill several 1 MiB test files.
            for batch in 1..=40u64 {
                let mut recs = vec![
                    w("disk0", batch * 131072, batch as u8, 65536),
                    w("disk0", batch * 131072 + 65536, batch as u8 ^ 0xff, 20000),
                    w("disk1", batch * 65536, 7, 5000),
                ];
                if batch % 5 == 0 {
                    recs.push(w("disk1", 0, 9, 300 << 10));
                }
                j.commit("m", 1, batch, recs).await.unwrap();
            }
        }
        assert!(files(dir.path()).len() > 2, "the records span several files");
        // Reopened: nothing in the hot tail, every payload comes back from the log.
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let d0 = j.disk("m", "disk0").unwrap();
        let recs = j.read_records(d0.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(recs.len(), 80);
        for (i, r) in recs.iter().enumerate() {
            let batch = i as u64 / 2 + 1;
            let (byte, len) = if i % 2 == 0 {
                (batch as u8, 65536)
            } else {
                (batch as u8 ^ 0xff, 20000)
            };
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.payload.len(), len);
            assert!(r.payload.iter().all(|b| *b == byte), "record {i}");
        }
        // Neighbours were read in one request: the second payload sits in the same buffer, right
        // after the first record's payload, checksum and the next record's header.
        let gap = recs[1].payload.as_ptr() as usize - recs[0].payload.as_ptr() as usize;
        assert_eq!(gap, 65536 + 4 + (recs[1].encoded_len() - recs[1].payload.len()));
        let d1 = j.disk("m", "disk1").unwrap();
        let other = j.read_records(d1.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(other.len(), 48);
        assert!(other.iter().all(|r| r.payload.iter().all(|b| *b == 7 || *b == 9)));
    }

    #[tokio::test]
    async fn uploaded_files_are_recycled_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let d = j.register_disk("m", "disk0", 64 << 20, 1).await.unwrap();
        let mut batch = 0;
        let mut uploaded = 0u64;
        for round in 0..6u8 {
            // 1.5 MiB per round: files (1 MiB in tests) fill and rotate.
            for _ in 0..24 {
                batch += 1;
                let off = (batch % 1000) * 65536;
                j.commit("m", 1, batch, vec![write(off, round + 1, 65536)])
                    .await
                    .unwrap();
            }
            let d = j.disk("m", "disk0").unwrap();
            let recs = j.read_records(d.id, uploaded + 1, u64::MAX, usize::MAX).unwrap();
            assert_eq!(recs.len(), 24);
            assert!(recs.iter().all(|r| r.payload.iter().all(|b| *b == round + 1)));
            let bytes: u64 = recs.iter().map(|r| r.to_journal_value().len() as u64).sum();
            let plan = j.plan_segment(d.id, uploaded + 1, d.next_seq - 1).await.unwrap();
            j.segment_uploaded(plan, bytes).await.unwrap();
            uploaded = d.next_seq - 1;
        }
        assert_eq!(j.cache_used(), 0);
        let on_disk = files(dir.path());
        assert!(
            on_disk.len() <= 2 + RECYCLE_MAX,
            "files are recycled or deleted: {on_disk:?}"
        );
        assert!(
            *on_disk.last().unwrap() >= 6,
            "rotated through several files: {on_disk:?}"
        );
        // A restart keeps nothing it does not need, and the journal still works.
        drop(j);
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.commit("m", 2, 1, vec![write(0, 9, 65536)]).await.unwrap();
        let recs = j.read_records(d.id, uploaded + 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].payload[0], 9);
    }

    #[tokio::test]
    async fn corrupt_payload_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        j.commit("m", 1, 1, vec![write(0, 7, 8192)]).await.unwrap();
        let no = files(dir.path())[0];
        let path = dir.path().join(DIR).join(file_name(no));
        let ptr = {
            let journal = j.db().cf_handle(crate::journal::CF_JOURNAL).unwrap();
            let (_, v) = j
                .db()
                .iterator_cf(journal, rocksdb::IteratorMode::Start)
                .next()
                .unwrap()
                .unwrap();
            Pointer::decode(&v).unwrap().unwrap()
        };
        // After a restart the record comes from the file (not the hot tail in memory).
        drop(j);
        let mut data = std::fs::read(&path).unwrap();
        data[(ptr.offset + ptr.len as u64 - 100) as usize] ^= 1;
        std::fs::write(&path, data).unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let d = j.disk("m", "disk0").unwrap();
        let err = j.read_records(d.id, 1, 1, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[tokio::test]
    async fn groups_are_aligned_for_direct_io_and_read_back_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let direct = supports_direct_io(dir.path());
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        for (batch, len) in [(1u64, 5000usize), (2, 65536), (3, 4096 * 3 + 1)] {
            j.commit("m", 1, batch, vec![write(batch * 65536, batch as u8, len)])
                .await
                .unwrap();
        }
        let d = j.disk("m", "disk0").unwrap();
        let from_memory = j.read_records(d.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(j.state.hot.bytes(), 5000 + 65536 + 4096 * 3 + 1);
        drop(j);
        let no = files(dir.path())[0];
        let len = std::fs::metadata(dir.path().join(DIR).join(file_name(no)))
            .unwrap()
            .len();
        if direct {
            assert_eq!(len % ALIGN as u64, 0, "each group is padded to 4 KiB");
        }
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(j.state.hot.bytes(), 0);
        let from_log = j.read_records(d.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(from_log, from_memory);
        assert_eq!(from_log[2].payload.len(), 4096 * 3 + 1);
        assert!(from_log[1].payload.iter().all(|b| *b == 2));
    }

    #[tokio::test]
    async fn a_group_larger_than_the_flush_size_is_written_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        j.register_disk("m", "disk0", 64 << 20, 1).await.unwrap();
        // One group of odd-sized records, several times the (test) flush size: records straddle
        // the pieces written before the group's sync.
        let lens: Vec<usize> = (0..12).map(|i| 4096 + i * 3001).collect();
        assert!(lens.iter().sum::<usize>() > 4 * FLUSH_BYTES);
        // Every other record comes with its payload CRC (as from the batch decoder): the record
        // checksum combined from it must be the one a read checks.
        let recs = lens
            .iter()
            .enumerate()
            .map(|(i, len)| {
                let r = write(i as u64 * 65536, i as u8 + 1, *len);
                if i % 2 == 0 {
                    let crc = crc32c::crc32c(&r.record.payload);
                    r.with_payload_crc(crc)
                } else {
                    r
                }
            })
            .collect();
        j.commit("m", 1, 1, recs).await.unwrap();
        j.commit("m", 1, 2, vec![write(0, 0xee, 7000)]).await.unwrap();
        let d = j.disk("m", "disk0").unwrap();
        drop(j);
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let back = j.read_records(d.id, 1, u64::MAX, usize::MAX).unwrap();
        assert_eq!(back.len(), 13);
        for (i, len) in lens.iter().enumerate() {
            assert_eq!(back[i].payload.len(), *len);
            assert!(back[i].payload.iter().all(|b| *b == i as u8 + 1), "record {i}");
        }
        assert!(back[12].payload.iter().all(|b| *b == 0xee), "the next group follows");
    }

    #[tokio::test]
    async fn orphan_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Journal::open(dir.path(), 1 << 30).unwrap());
        let orphan = dir.path().join(DIR).join(file_name(99));
        std::fs::write(&orphan, header(99)).unwrap();
        drop(Journal::open(dir.path(), 1 << 30).unwrap());
        assert!(!orphan.exists());
    }

    #[tokio::test]
    async fn an_older_schema_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            let meta = j.db().cf_handle(CF_META).unwrap();
            j.db().put_cf(meta, SCHEMA_KEY, 1u32.to_be_bytes()).unwrap();
        }
        let err = Journal::open(dir.path(), 1 << 30).err().expect("refused");
        assert!(matches!(err, JournalError::Schema { found: 1 }), "{err}");
        assert!(err.to_string().contains("expected 2"), "{err}");
    }

    #[test]
    fn pointer_round_trip() {
        let p = Pointer {
            file: 3,
            offset: 1 << 33,
            len: 65_572,
        };
        assert_eq!(Pointer::decode(&p.encode()).unwrap().unwrap(), p);
        assert!(Pointer::decode(&[1, 2, 3]).is_none(), "an inline record is no pointer");
        assert!(Pointer::decode(&[POINTER_TAG, 0]).unwrap().is_err());
    }
}

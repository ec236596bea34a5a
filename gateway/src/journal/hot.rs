//! The journal's hot tail: committed records not yet uploaded, kept in memory up to a budget so
//! the uploader takes them from here instead of reading the payload log back (which is written
//! with direct I/O, so not in the page cache). Records past the budget, and every record after a
//! restart, are read from the log as before; the tail is only a shortcut, never the copy of record.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::record::LogRecord;

/// The default budget: a few segments' worth (the uploader trails ingest by little when it keeps up).
pub const DEFAULT_BYTES: u64 = 256 << 20;

pub struct HotTail {
    inner: Mutex<Inner>,
    limit: AtomicU64,
}

#[derive(Default)]
struct Inner {
    disks: HashMap<u32, BTreeMap<u64, LogRecord>>,
    bytes: u64,
}

impl Default for HotTail {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            limit: AtomicU64::new(DEFAULT_BYTES),
        }
    }
}

impl HotTail {
    pub fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    /// Keeps committed records (`(disk, record)`) while the budget allows.
    pub fn insert(&self, records: impl IntoIterator<Item = (u32, LogRecord)>) {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut inner = self.inner.lock().expect("hot tail lock");
        for (disk, r) in records {
            let n = r.payload.len() as u64;
            if inner.bytes + n > limit {
                continue;
            }
            inner.bytes += n;
            if let Some(old) = inner.disks.entry(disk).or_default().insert(r.seq, r) {
                inner.bytes -= old.payload.len() as u64;
            }
        }
    }

    /// The record `seq` of `disk`, if it is held here.
    pub fn get(&self, disk: u32, seq: u64) -> Option<LogRecord> {
        let inner = self.inner.lock().expect("hot tail lock");
        inner.disks.get(&disk)?.get(&seq).cloned()
    }

    /// Drops the records of `disk` up to `seq` (they are in blob storage now).
    pub fn release_through(&self, disk: u32, seq: u64) {
        let mut inner = self.inner.lock().expect("hot tail lock");
        let Some(records) = inner.disks.get_mut(&disk) else {
            return;
        };
        let kept = records.split_off(&(seq.saturating_add(1)));
        let freed: u64 = std::mem::replace(records, kept)
            .values()
            .map(|r| r.payload.len() as u64)
            .sum();
        if records.is_empty() {
            inner.disks.remove(&disk);
        }
        inner.bytes -= freed;
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().expect("hot tail lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordKind;
    use bytes::Bytes;

    fn rec(seq: u64, n: usize) -> LogRecord {
        LogRecord {
            kind: RecordKind::Write,
            seq,
            time_ms: 0,
            offset: 0,
            len: n as u32,
            payload: Bytes::from(vec![seq as u8; n]),
        }
    }

    #[test]
    fn keeps_records_within_the_budget_and_releases_uploaded_ones() {
        let hot = HotTail::default();
        hot.set_limit(250);
        hot.insert([(1, rec(1, 100)), (1, rec(2, 100)), (1, rec(3, 100)), (2, rec(1, 40))]);
        assert_eq!(hot.bytes(), 240, "the third record of disk 1 is over the budget");
        assert!(hot.get(1, 3).is_none());
        assert_eq!(hot.get(1, 2).unwrap().payload[0], 2);
        hot.release_through(1, 1);
        assert!(hot.get(1, 1).is_none());
        assert_eq!(hot.bytes(), 140);
        hot.release_through(1, 9);
        hot.release_through(2, 1);
        assert_eq!(hot.bytes(), 0);
    }
}

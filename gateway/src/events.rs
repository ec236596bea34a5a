//! The appliance's event log: what an operator should know happened (RPO threshold crossed,
//! scheduled app-consistent point missed, a job's steps, resync required), durable in RocksDB
//! and served by the management API. The newest `KEEP` events are kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::journal::{Journal, JournalError, CF_META};

/// How many events are kept; older ones are deleted as new ones arrive.
const KEEP: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub time_ms: u64,
    pub severity: Severity,
    /// A stable, scriptable name: `rpo-threshold-exceeded`, `job-failed`, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
    pub message: String,
}

fn event_key(id: u64) -> Vec<u8> {
    format!("event/{id:016x}").into_bytes()
}

/// The event log (blocking RocksDB calls).
#[derive(Clone)]
pub struct Events {
    journal: Journal,
    next: Arc<AtomicU64>,
}

impl Events {
    pub fn open(journal: Journal) -> Result<Self, JournalError> {
        let next = Self::newest_id(&journal)?.map(|i| i + 1).unwrap_or(1);
        Ok(Self {
            journal,
            next: Arc::new(AtomicU64::new(next)),
        })
    }

    fn newest_id(journal: &Journal) -> Result<Option<u64>, JournalError> {
        let db = journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut it = db.raw_iterator_cf(meta);
        it.seek_for_prev(b"event/~");
        match it.key() {
            Some(k) if k.starts_with(b"event/") => Ok(u64::from_str_radix(&String::from_utf8_lossy(&k[6..]), 16).ok()),
            _ => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// Records an event (and logs it); durable before it returns.
    pub fn post(
        &self,
        severity: Severity,
        kind: &str,
        machine: &str,
        message: impl Into<String>,
    ) -> Result<Event, JournalError> {
        let message = message.into();
        match severity {
            Severity::Info => tracing::info!(kind, machine, "{message}"),
            Severity::Warning => tracing::warn!(kind, machine, "{message}"),
            Severity::Error => tracing::error!(kind, machine, "{message}"),
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let event = Event {
            id,
            time_ms: crate::journal::now_ms(),
            severity,
            kind: kind.into(),
            machine: machine.into(),
            message,
        };
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        wb.put_cf(meta, event_key(id), serde_json::to_vec(&event).expect("json"));
        if id > KEEP {
            wb.delete_range_cf(meta, event_key(0), event_key(id - KEEP));
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo)?;
        Ok(event)
    }

    /// [`Events::post`] from async code: the synced write runs on a blocking thread.
    pub async fn post_async(
        &self,
        severity: Severity,
        kind: &'static str,
        machine: &str,
        message: String,
    ) -> Result<Event, JournalError> {
        let ev = self.clone();
        let m = machine.to_owned();
        tokio::task::spawn_blocking(move || ev.post(severity, kind, &m, message))
            .await
            .map_err(|_| JournalError::Stopped)?
    }

    /// Events with id > `after`, oldest first, at most `limit`; `machine` filters when not empty.
    pub fn list(&self, after: u64, limit: usize, machine: &str) -> Result<Vec<Event>, JournalError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let start = event_key(after + 1);
        let mut out = Vec::new();
        for item in db.iterator_cf(meta, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(b"event/") || out.len() >= limit {
                break;
            }
            let e: Event = serde_json::from_slice(&v).map_err(|e| JournalError::Corrupt(format!("event: {e}")))?;
            if machine.is_empty() || e.machine == machine {
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_reopen_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ev = Events::open(Journal::open(dir.path(), 1 << 30).unwrap()).unwrap();
            ev.post(Severity::Warning, "rpo-threshold-exceeded", "m1", "RPO 20m over 15m")
                .unwrap();
            ev.post(Severity::Info, "job-succeeded", "", "job 1 done").unwrap();
        }
        let ev = Events::open(Journal::open(dir.path(), 1 << 30).unwrap()).unwrap();
        let third = ev.post(Severity::Info, "x", "m1", "third").unwrap();
        assert_eq!(third.id, 3);
        assert_eq!(ev.list(0, 100, "").unwrap().len(), 3);
        let m1 = ev.list(0, 100, "m1").unwrap();
        assert_eq!(m1.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(ev.list(2, 100, "").unwrap().len(), 1);
    }
}

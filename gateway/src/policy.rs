//! Replication policies: named sets of the settings ../shared/REFERENCE.md gives (crash-consistent
//! interval, app-consistent frequency, recovery-point retention, RPO threshold), kept durably in
//! the appliance's RocksDB, and which policy each machine follows ("default" unless assigned).
//! The `[policy]` section of the config file is the "default" policy until the API replaces it.

use std::time::Duration;

use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::journal::{Journal, JournalError, CF_META};

/// The policy every machine follows unless another is assigned.
pub const DEFAULT_POLICY: &str = "default";
/// Retention may not exceed this (REFERENCE.md: 72 hours).
pub const MAX_RETENTION: Duration = Duration::from_secs(72 * 3600);

/// A policy as operators write it (durations like `5m`, `4h`, `24h`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub crash_consistent_interval: String,
    pub app_consistent_interval: String,
    pub retention: String,
    pub rpo_threshold: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            crash_consistent_interval: "5m".into(),
            app_consistent_interval: "4h".into(),
            retention: "24h".into(),
            rpo_threshold: "15m".into(),
        }
    }
}

/// A policy with its durations parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub crash_consistent_interval: Duration,
    pub app_consistent_interval: Duration,
    pub retention: Duration,
    pub rpo_threshold: Duration,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("policy name {0:?}: use letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("no policy named {0:?}")]
    Unknown(String),
    #[error("policy {name:?} is assigned to {machines:?}; assign them another policy first")]
    InUse { name: String, machines: Vec<String> },
    #[error("the default policy cannot be deleted")]
    DeleteDefault,
    #[error("no replication group named {0:?}")]
    UnknownGroup(String),
    #[error("{0}")]
    Conflict(String),
    #[error("policy storage: {0}")]
    Store(String),
}

impl From<rocksdb::Error> for PolicyError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<JournalError> for PolicyError {
    fn from(e: JournalError) -> Self {
        Self::Store(e.to_string())
    }
}

impl Policy {
    /// Parses and checks every field; the error names the field.
    pub fn settings(&self) -> Result<Settings, PolicyError> {
        let parse = |field: &'static str, v: &str| {
            let d = humantime::parse_duration(v.trim()).map_err(|e| PolicyError::Invalid {
                field,
                reason: format!("{v:?} is not a duration like 30s, 5m or 4h ({e})"),
            })?;
            if d.is_zero() {
                return Err(PolicyError::Invalid {
                    field,
                    reason: "must be positive".into(),
                });
            }
            Ok(d)
        };
        let s = Settings {
            crash_consistent_interval: parse("crash_consistent_interval", &self.crash_consistent_interval)?,
            app_consistent_interval: parse("app_consistent_interval", &self.app_consistent_interval)?,
            retention: parse("retention", &self.retention)?,
            rpo_threshold: parse("rpo_threshold", &self.rpo_threshold)?,
        };
        if s.retention > MAX_RETENTION {
            return Err(PolicyError::Invalid {
                field: "retention",
                reason: format!("{:?} exceeds the 72h maximum", self.retention),
            });
        }
        if s.crash_consistent_interval < Duration::from_secs(1) {
            return Err(PolicyError::Invalid {
                field: "crash_consistent_interval",
                reason: "must be at least 1s".into(),
            });
        }
        Ok(s)
    }
}

fn policy_key(name: &str) -> Vec<u8> {
    format!("policy/{name}").into_bytes()
}

pub(crate) fn assignment_key(machine: &str) -> Vec<u8> {
    format!("machine-policy/{machine}").into_bytes()
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// The policies in the journal's database, with the config file's `[policy]` as the fallback
/// "default". Reads and writes are blocking RocksDB calls.
#[derive(Clone)]
pub struct Policies {
    journal: Journal,
    fallback: Policy,
}

impl Policies {
    pub fn new(journal: Journal, fallback: Policy) -> Self {
        Self { journal, fallback }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn valid_name(name: &str) -> Result<(), PolicyError> {
        if crate::server::valid_name(name) {
            Ok(())
        } else {
            Err(PolicyError::BadName(name.into()))
        }
    }

    /// Every policy by name (the default one included), sorted.
    pub fn list(&self) -> Result<Vec<(String, Policy)>, PolicyError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"policy/") {
            let (k, v) = item?;
            if !k.starts_with(b"policy/") {
                break;
            }
            let name = String::from_utf8_lossy(&k[7..]).into_owned();
            let p: Policy = serde_json::from_slice(&v).map_err(|e| PolicyError::Store(e.to_string()))?;
            out.push((name, p));
        }
        if !out.iter().any(|(n, _)| n == DEFAULT_POLICY) {
            out.push((DEFAULT_POLICY.into(), self.fallback.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Policy, PolicyError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match db.get_cf(meta, policy_key(name))? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| PolicyError::Store(e.to_string())),
            None if name == DEFAULT_POLICY => Ok(self.fallback.clone()),
            None => Err(PolicyError::Unknown(name.into())),
        }
    }

    /// Creates or replaces a policy after checking it; durable before it returns.
    pub fn put(&self, name: &str, policy: &Policy) -> Result<Settings, PolicyError> {
        Self::valid_name(name)?;
        let settings = policy.settings()?;
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        wb.put_cf(meta, policy_key(name), serde_json::to_vec(policy).expect("json"));
        db.write_opt(wb, &synced())?;
        Ok(settings)
    }

    /// Deletes a policy no machine follows.
    pub fn delete(&self, name: &str) -> Result<(), PolicyError> {
        if name == DEFAULT_POLICY {
            return Err(PolicyError::DeleteDefault);
        }
        self.get(name)?;
        let machines: Vec<String> = self
            .assignments()?
            .into_iter()
            .filter(|(_, p)| p == name)
            .map(|(m, _)| m)
            .collect();
        if !machines.is_empty() {
            return Err(PolicyError::InUse {
                name: name.into(),
                machines,
            });
        }
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        wb.delete_cf(meta, policy_key(name));
        db.write_opt(wb, &synced())?;
        Ok(())
    }

    /// `(machine, policy)` for every machine with an explicit assignment.
    pub fn assignments(&self) -> Result<Vec<(String, String)>, PolicyError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"machine-policy/") {
            let (k, v) = item?;
            if !k.starts_with(b"machine-policy/") {
                break;
            }
            out.push((
                String::from_utf8_lossy(&k[15..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
        Ok(out)
    }

    /// Makes `machine` follow policy `name` (which must exist); durable before it returns.
    pub fn assign(&self, machine: &str, name: &str) -> Result<(), PolicyError> {
        self.get(name)?;
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        if let Some(group) = db.get_cf(meta, crate::groups::member_key(machine))? {
            return Err(PolicyError::Conflict(format!(
                "machine {machine:?} is in replication group {:?}: set the group's policy instead",
                String::from_utf8_lossy(&group)
            )));
        }
        let mut wb = WriteBatch::default();
        wb.put_cf(meta, assignment_key(machine), name.as_bytes());
        db.write_opt(wb, &synced())?;
        Ok(())
    }

    /// The name of the policy `machine` follows.
    pub fn policy_of(&self, machine: &str) -> Result<String, PolicyError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        Ok(db
            .get_cf(meta, assignment_key(machine))?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| DEFAULT_POLICY.into()))
    }

    /// The settings `machine` runs with; a broken stored policy falls back to the config file's.
    pub fn settings_of(&self, machine: &str) -> Settings {
        let fallback = || {
            self.fallback
                .settings()
                .expect("the config file's policy was validated at start")
        };
        self.policy_of(machine)
            .and_then(|name| self.get(&name))
            .and_then(|p| p.settings())
            .unwrap_or_else(|e| {
                tracing::warn!(machine, error = %e, "using the config file's policy");
                fallback()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let ok = Policy::default();
        assert_eq!(ok.settings().unwrap().retention, Duration::from_secs(24 * 3600));
        let bad = |f: fn(&mut Policy), field: &str| {
            let mut p = Policy::default();
            f(&mut p);
            match p.settings() {
                Err(PolicyError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{other:?}"),
            }
        };
        bad(|p| p.retention = "0s".into(), "retention");
        bad(|p| p.retention = "73h".into(), "retention");
        bad(|p| p.rpo_threshold = "soon".into(), "rpo_threshold");
        bad(
            |p| p.crash_consistent_interval = "100ms".into(),
            "crash_consistent_interval",
        );
    }

    #[test]
    fn stored_durably_assigned_and_guarded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path(), 1 << 30).unwrap();
            let p = Policies::new(j, Policy::default());
            assert_eq!(p.list().unwrap().len(), 1, "the default policy always exists");
            let fast = Policy {
                crash_consistent_interval: "1s".into(),
                ..Policy::default()
            };
            p.put("fast", &fast).unwrap();
            assert_eq!(p.assign("m1", "nope"), Err(PolicyError::Unknown("nope".into())));
            p.assign("m1", "fast").unwrap();
            assert!(matches!(p.delete("fast"), Err(PolicyError::InUse { .. })));
            assert_eq!(p.delete(DEFAULT_POLICY), Err(PolicyError::DeleteDefault));
        }
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let p = Policies::new(j, Policy::default());
        assert_eq!(p.policy_of("m1").unwrap(), "fast");
        assert_eq!(p.settings_of("m1").crash_consistent_interval, Duration::from_secs(1));
        assert_eq!(p.settings_of("m2").crash_consistent_interval, Duration::from_secs(300));
    }
}

//! The config server's registry of scale-out process servers. Each one registers with the
//! appliance passphrase, gets its own token and reports its cache and machines in heartbeats;
//! machines can be assigned to one, and this appliance's process server then redirects their
//! agents there. Records and assignments are kept in RocksDB (`meta` column family).
//!
//! Each heartbeat also carries the assigned machines' flags both ways ([`FlagRelay`]): the
//! config server's "replication stopped" (failover) and "resync required" go to the process
//! server that replicates the machine, and that server's own "resync required" comes back.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rand::RngCore;
use rocksdb::DB;
use serde::{Deserialize, Serialize};

use crate::journal::{self, now_ms};

/// The name of the config server's own process server; assigning a machine to it removes the
/// assignment.
pub const LOCAL: &str = "local";

/// What a process server sends to register.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    /// The replication address agents use, HOST:PORT.
    pub address: String,
    /// Its TLS certificate (PEM): agents redirected there trust it.
    pub certificate_pem: String,
    #[serde(default)]
    pub version: String,
    pub passphrase: String,
    /// How often it will send heartbeats; missing three marks it unreachable.
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
}

/// What a process server reports in each heartbeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    /// Machines with disks in its cache (those it replicates).
    pub machines: Vec<String>,
    #[serde(default)]
    pub version: String,
    /// Its machines that must resynchronise, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resync_required: BTreeMap<String, String>,
}

/// The config server's answer to a heartbeat: the machines assigned to that process server, and
/// the flags the config server holds for them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub assigned: Vec<String>,
    /// Assigned machines whose replication is stopped (failed over), with the reason: their
    /// agents are refused there as they would be here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stopped: BTreeMap<String, String>,
    /// Assigned machines the config server marked resync-required and the process server has
    /// not reported yet, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resync: BTreeMap<String, String>,
}

/// The config server's side of the flags a heartbeat carries. A resync flag is mirrored: one the
/// process server reports is set here too; one set here is sent until the process server
/// reports it, and cleared here once it reports it no more (its agent resynchronised). Which
/// flags were delivered is kept in memory: after a restart an undelivered-looking flag is sent
/// again, and the agent compares its blocks once more (cheap: only differences are sent).
#[derive(Default)]
pub struct FlagRelay {
    /// `(process server, machine)` whose resync flag the process server has reported.
    delivered: Mutex<HashSet<(String, String)>>,
}

impl FlagRelay {
    /// Exchanges the flags of `answer.assigned` with process server `name`, which reported
    /// `reported` (its machines' resync reasons): fills `answer` and updates the flags here
    /// (blocking: flags are written durably).
    pub fn exchange(
        &self,
        coordinator: &crate::consistency::Coordinator,
        name: &str,
        reported: &BTreeMap<String, String>,
        answer: &mut HeartbeatAnswer,
    ) -> Result<(), journal::JournalError> {
        let mut delivered = self.delivered.lock().expect("lock");
        for m in &answer.assigned {
            if let Some(why) = coordinator.replication_stopped(m) {
                answer.stopped.insert(m.clone(), why);
            }
            let key = (name.to_string(), m.clone());
            match (reported.get(m), coordinator.resync_required(m)) {
                (Some(why), None) => {
                    coordinator.require_resync(m, &format!("{why} (reported by process server {name})"))?;
                    delivered.insert(key);
                }
                (Some(_), Some(_)) => {
                    delivered.insert(key);
                }
                (None, Some(_)) if delivered.remove(&key) => coordinator.resync_done(m)?,
                (None, Some(why)) => {
                    answer.resync.insert(m.clone(), why);
                }
                (None, None) => {
                    delivered.remove(&key);
                }
            }
        }
        Ok(())
    }
}

/// The scale-out process server's side: applies the config server's flags for the machines
/// assigned to it (blocking: flags are written durably). The config server is authoritative for
/// "replication stopped" of an assigned machine: failover sets it, failback clears it.
pub fn apply_flags(
    coordinator: &crate::consistency::Coordinator,
    answer: &HeartbeatAnswer,
) -> Result<(), journal::JournalError> {
    for m in &answer.assigned {
        match (answer.stopped.get(m), coordinator.replication_stopped(m)) {
            (Some(why), None) => {
                tracing::warn!(machine = %m, reason = %why, "replication stopped by the config server");
                coordinator.stop_replication(m, why)?;
            }
            (None, Some(_)) => {
                tracing::info!(machine = %m, "replication resumed by the config server");
                coordinator.resume_replication(m)?;
            }
            _ => {}
        }
        if let Some(why) = answer.resync.get(m) {
            if coordinator.resync_required(m).is_none() {
                coordinator.require_resync(m, why)?;
            }
        }
    }
    Ok(())
}

/// A registered process server as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessServerRecord {
    pub name: String,
    pub address: String,
    pub certificate_pem: String,
    pub version: String,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// BLAKE3 of its token, hex; the token itself is never stored.
    token_hash: String,
    #[serde(default)]
    pub last: Heartbeat,
}

impl ProcessServerRecord {
    /// Reachable when a heartbeat came within three intervals (at least 3 s).
    pub fn reachable(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) <= (self.heartbeat_interval_ms * 3).max(3_000)
    }
}

/// Where an agent of an assigned machine is sent instead.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Redirect {
    pub process_server: String,
    pub address: String,
    pub certificate_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessServerError {
    #[error("wrong passphrase")]
    WrongPassphrase,
    #[error("missing or wrong process-server token")]
    Unauthorized,
    #[error("unknown process server {0:?}")]
    Unknown(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("process-server store: {0}")]
    Store(String),
}

impl From<rocksdb::Error> for ProcessServerError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Store(e.to_string())
    }
}

fn record_key(name: &str) -> Vec<u8> {
    format!("process-server/{name}").into_bytes()
}

fn assignment_key(machine: &str) -> Vec<u8> {
    format!("ps-assignment/{machine}").into_bytes()
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The registry, over the appliance's RocksDB.
#[derive(Clone)]
pub struct ProcessServers {
    db: Arc<DB>,
}

impl ProcessServers {
    pub fn new(db: Arc<DB>) -> Self {
        Self { db }
    }

    fn put(&self, key: Vec<u8>, value: &[u8], sync: bool) -> Result<(), ProcessServerError> {
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        self.db.put_cf_opt(meta, key, value, &wo)?;
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Option<ProcessServerRecord>, ProcessServerError> {
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        match self.db.get_cf(meta, record_key(name))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| ProcessServerError::Store(format!("process-server record {name}: {e}"))),
        }
    }

    /// Registers (or re-registers) a process server after checking the passphrase against
    /// `expected`; returns its new token (any earlier token of that name stops working).
    pub fn register(&self, reg: &Registration, expected_passphrase: &str) -> Result<String, ProcessServerError> {
        if !crate::server::constant_time_eq(reg.passphrase.as_bytes(), expected_passphrase.as_bytes()) {
            return Err(ProcessServerError::WrongPassphrase);
        }
        if !crate::server::valid_name(&reg.name) || reg.name == LOCAL {
            return Err(ProcessServerError::BadRequest(format!(
                "invalid process-server name {:?}: use 1-64 letters, digits, '-', '_' or '.' (not {LOCAL:?})",
                reg.name
            )));
        }
        let host_port = reg.address.rsplit_once(':');
        if !host_port.is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
            return Err(ProcessServerError::BadRequest(format!(
                "address {:?} is not HOST:PORT",
                reg.address
            )));
        }
        if !reg.certificate_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ProcessServerError::BadRequest(
                "certificate_pem holds no PEM certificate".into(),
            ));
        }
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = hex::encode(raw);
        let now = now_ms();
        let registered_ms = self.get(&reg.name)?.map(|r| r.registered_ms).unwrap_or(now);
        let record = ProcessServerRecord {
            name: reg.name.clone(),
            address: reg.address.clone(),
            certificate_pem: reg.certificate_pem.clone(),
            version: reg.version.clone(),
            registered_ms,
            last_seen_ms: now,
            heartbeat_interval_ms: reg.heartbeat_interval_ms.max(1000),
            token_hash: token_hash(&token),
            last: Heartbeat::default(),
        };
        self.put(record_key(&reg.name), &serde_json::to_vec(&record).expect("json"), true)?;
        Ok(token)
    }

    /// Records a heartbeat of `name` authenticated by `token`; answers its assigned machines.
    pub fn heartbeat(&self, name: &str, token: &str, hb: Heartbeat) -> Result<HeartbeatAnswer, ProcessServerError> {
        let mut record = self
            .get(name)?
            .ok_or_else(|| ProcessServerError::Unknown(name.to_string()))?;
        if !crate::server::constant_time_eq(token_hash(token).as_bytes(), record.token_hash.as_bytes()) {
            return Err(ProcessServerError::Unauthorized);
        }
        record.last_seen_ms = now_ms();
        if !hb.version.is_empty() {
            record.version = hb.version.clone();
        }
        record.last = hb;
        // A heartbeat is observation, not operator state: an unsynced write is enough.
        self.put(record_key(name), &serde_json::to_vec(&record).expect("json"), false)?;
        let assigned = self
            .assignments()?
            .into_iter()
            .filter(|(_, ps)| ps == name)
            .map(|(m, _)| m)
            .collect();
        Ok(HeartbeatAnswer {
            assigned,
            ..Default::default()
        })
    }

    /// Every registered process server (not the local one), by name.
    pub fn list(&self) -> Result<Vec<ProcessServerRecord>, ProcessServerError> {
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, b"process-server/") {
            let (k, v) = item?;
            if !k.starts_with(b"process-server/") {
                break;
            }
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| ProcessServerError::Store(format!("process-server record: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Assigns `machine` to process server `name` (durably); [`LOCAL`] removes the assignment.
    pub fn assign(&self, machine: &str, name: &str) -> Result<(), ProcessServerError> {
        if !crate::server::valid_name(machine) {
            return Err(ProcessServerError::BadRequest(format!(
                "invalid machine name {machine:?}"
            )));
        }
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        if name == LOCAL {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            self.db.delete_cf_opt(meta, assignment_key(machine), &wo)?;
            return Ok(());
        }
        if self.get(name)?.is_none() {
            return Err(ProcessServerError::Unknown(name.to_string()));
        }
        self.put(assignment_key(machine), name.as_bytes(), true)
    }

    /// Machine → process server, for every assignment.
    pub fn assignments(&self) -> Result<Vec<(String, String)>, ProcessServerError> {
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(meta, b"ps-assignment/") {
            let (k, v) = item?;
            let Some(machine) = k.strip_prefix(b"ps-assignment/") else {
                break;
            };
            out.push((
                String::from_utf8_lossy(machine).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
        Ok(out)
    }

    /// The scale-out process server `machine` is assigned to, if any.
    pub fn assigned_to(&self, machine: &str) -> Result<Option<String>, ProcessServerError> {
        let meta = self.db.cf_handle(journal::CF_META).expect("meta cf");
        Ok(self
            .db
            .get_cf(meta, assignment_key(machine))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Where `machine`'s agent must go when it is assigned to another process server.
    pub fn redirect_for(&self, machine: &str) -> Result<Option<Redirect>, ProcessServerError> {
        let Some(name) = self.assigned_to(machine)? else {
            return Ok(None);
        };
        let record = self
            .get(&name)?
            .ok_or_else(|| ProcessServerError::Unknown(name.clone()))?;
        Ok(Some(Redirect {
            process_server: name,
            address: record.address,
            certificate_pem: record.certificate_pem,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, ProcessServers) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf(&opts, dir.path(), [journal::CF_META]).unwrap();
        (dir, ProcessServers::new(Arc::new(db)))
    }

    fn registration(name: &str) -> Registration {
        Registration {
            name: name.into(),
            address: "ps2.example:9443".into(),
            certificate_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            version: "0.1.0".into(),
            passphrase: "secret words".into(),
            heartbeat_interval_ms: 2000,
        }
    }

    #[test]
    fn register_heartbeat_assign_redirect() {
        let (_d, ps) = registry();
        assert!(matches!(
            ps.register(&registration("ps2"), "other words"),
            Err(ProcessServerError::WrongPassphrase)
        ));
        let token = ps.register(&registration("ps2"), "secret words").unwrap();
        assert!(matches!(
            ps.heartbeat("ps2", "not-the-token", Heartbeat::default()),
            Err(ProcessServerError::Unauthorized)
        ));
        assert!(matches!(
            ps.heartbeat("ps9", &token, Heartbeat::default()),
            Err(ProcessServerError::Unknown(_))
        ));
        assert!(matches!(ps.assign("m1", "ps9"), Err(ProcessServerError::Unknown(_))));
        ps.assign("m1", "ps2").unwrap();
        let hb = Heartbeat {
            cache_used_bytes: 5,
            cache_limit_bytes: 10,
            machines: vec!["m1".into()],
            version: "0.1.1".into(),
            ..Default::default()
        };
        let answer = ps.heartbeat("ps2", &token, hb.clone()).unwrap();
        assert_eq!(answer.assigned, vec!["m1".to_string()]);
        let listed = ps.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last, hb);
        assert_eq!(listed[0].version, "0.1.1");
        assert!(listed[0].reachable(now_ms()));
        assert!(!listed[0].reachable(now_ms() + 60_000));
        let r = ps.redirect_for("m1").unwrap().unwrap();
        assert_eq!(
            (r.process_server.as_str(), r.address.as_str()),
            ("ps2", "ps2.example:9443")
        );
        assert_eq!(ps.redirect_for("m2").unwrap(), None);
        // Re-registering issues a new token; the old one stops working.
        let token2 = ps.register(&registration("ps2"), "secret words").unwrap();
        assert!(ps.heartbeat("ps2", &token, Heartbeat::default()).is_err());
        assert!(ps.heartbeat("ps2", &token2, Heartbeat::default()).is_ok());
        // Back to the local process server.
        ps.assign("m1", LOCAL).unwrap();
        assert_eq!(ps.redirect_for("m1").unwrap(), None);
    }

    fn coordinator(dir: &std::path::Path) -> Arc<crate::consistency::Coordinator> {
        let j = crate::journal::Journal::open(dir, 1 << 30).unwrap();
        let policies = crate::policy::Policies::new(j.clone(), crate::policy::Policy::default());
        let events = crate::events::Events::open(j).unwrap();
        crate::consistency::Coordinator::new(policies, events)
    }

    /// Failover's stop and failback's resume reach the process server; a resync asked on the
    /// config server is sent until the process server reports it, and cleared here once that
    /// server's agent resynchronised; one the process server found itself shows here too.
    #[test]
    fn heartbeats_carry_the_machine_flags_both_ways() {
        let (cs_dir, ps_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (cs, ps) = (coordinator(cs_dir.path()), coordinator(ps_dir.path()));
        let relay = FlagRelay::default();
        let reported = |ps: &crate::consistency::Coordinator| -> BTreeMap<String, String> {
            ["m2", "m3"]
                .iter()
                .filter_map(|m| ps.resync_required(m).map(|r| (m.to_string(), r)))
                .collect()
        };
        // One heartbeat round: the process server reports, the config server answers, the
        // process server applies the answer.
        let round = || {
            let mut answer = HeartbeatAnswer {
                assigned: vec!["m2".into(), "m3".into()],
                ..Default::default()
            };
            relay.exchange(&cs, "ps2", &reported(&ps), &mut answer).unwrap();
            apply_flags(&ps, &answer).unwrap();
            answer
        };
        assert!(round().stopped.is_empty());
        cs.stop_replication("m2", "failed over by job 7").unwrap();
        assert_eq!(round().stopped["m2"], "failed over by job 7");
        assert_eq!(ps.replication_stopped("m2").as_deref(), Some("failed over by job 7"));
        assert_eq!(ps.replication_stopped("m3"), None);
        cs.resume_replication("m2").unwrap();
        round();
        assert_eq!(ps.replication_stopped("m2"), None, "failback resumes it there too");

        cs.require_resync("m2", "asked by the operator").unwrap();
        assert_eq!(round().resync["m2"], "asked by the operator");
        assert!(ps.resync_required("m2").is_some());
        assert!(round().resync.is_empty(), "reported back: not sent again");
        assert!(cs.resync_required("m2").is_some(), "still resyncing there");
        ps.resync_done("m2").unwrap();
        round();
        assert_eq!(
            cs.resync_required("m2"),
            None,
            "the agent resynchronised at the process server"
        );
        round();
        assert_eq!(ps.resync_required("m2"), None, "and it is not asked again");

        ps.require_resync("m3", "disk disk0 resized").unwrap();
        round();
        assert!(cs.resync_required("m3").unwrap().contains("disk disk0 resized"));
        ps.resync_done("m3").unwrap();
        round();
        assert_eq!(cs.resync_required("m3"), None);
    }

    #[test]
    fn bad_registrations_are_refused_with_the_reason() {
        let (_d, ps) = registry();
        for (mutate, want) in [
            (
                Box::new(|r: &mut Registration| r.name = LOCAL.into()) as Box<dyn Fn(&mut Registration)>,
                "name",
            ),
            (Box::new(|r: &mut Registration| r.name = "a/b".into()), "name"),
            (Box::new(|r: &mut Registration| r.address = "nohost".into()), "address"),
            (
                Box::new(|r: &mut Registration| r.certificate_pem = "junk".into()),
                "certificate_pem",
            ),
        ] {
            let mut r = registration("ps2");
            mutate(&mut r);
            match ps.register(&r, "secret words") {
                Err(ProcessServerError::BadRequest(m)) => assert!(m.contains(want), "{m}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        assert!(ps.list().unwrap().is_empty());
    }
}

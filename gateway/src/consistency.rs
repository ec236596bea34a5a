//! Recovery points on schedule, per machine or per replication group. Crash-consistent points are
//! cut by the server itself on the policy's interval; app-consistent points need the guest, so
//! the server posts a bookmark request that agents pick up (`GET .../requests`), quiesce, sync and
//! answer with a bookmark. A group's bookmark is a barrier: each member's bookmark waits until
//! every member has sent its own, then one point is cut across all members in one log write
//! while they are all quiesced — every machine of the group fails over to the same moment.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Mutex};
use tokio::time::Instant;

use crate::events::{Events, Severity};
use crate::groups::Groups;
use crate::journal::{self, Ack, Journal, JournalError};
use crate::policy::Policies;
use crate::protocol::{IngestRecord, RecordKind};

/// How long a group member's bookmark waits for the other members before it fails.
pub const GROUP_BARRIER_TIMEOUT: Duration = Duration::from_secs(120);
/// A scheduled request no agent answered is dropped (and an event posted) after this long, or
/// after the app-consistent interval if that is longer.
const REQUEST_EXPIRY: Duration = Duration::from_secs(600);

/// What an agent is asked to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRequests {
    /// Take an app-consistent bookmark: quiesce, sync, send a bookmark with this request id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<BookmarkAsk>,
    /// Resynchronise: compare every block with the appliance's checksums, send what differs,
    /// then report `resynced`. The reason is shown to the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkAsk {
    pub request: u64,
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BookmarkError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "replication group {group:?}: no bookmark from {missing:?} within {timeout:?}; the group point was not cut"
    )]
    BarrierTimeout {
        group: String,
        missing: Vec<String>,
        timeout: Duration,
    },
    #[error("replication is stopped for {0}")]
    Stopped(String),
    #[error("{0}")]
    Store(String),
}

/// A unit of consistency: a group, or a machine in no group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Unit {
    Group(String),
    Machine(String),
}

struct Pending {
    id: u64,
    label: String,
    created: Instant,
    expires: Duration,
    /// Group members that sent their bookmark, each waiting for the point.
    arrived: HashMap<String, Vec<oneshot::Sender<Result<Ack, String>>>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<Unit, Pending>,
    last_app: HashMap<Unit, Instant>,
    last_crash: HashMap<Unit, Instant>,
    next_request: u64,
}

/// Schedules points and runs group bookmark barriers.
pub struct Coordinator {
    journal: Journal,
    policies: Policies,
    groups: Groups,
    events: Events,
    state: Mutex<State>,
    /// Machines whose replication is stopped (failed over), with the reason; mirrored in RocksDB.
    stopped: std::sync::RwLock<HashMap<String, String>>,
    /// Machines marked resync-required, with the reason; mirrored in RocksDB.
    resync: std::sync::RwLock<HashMap<String, String>>,
}

fn stopped_key(machine: &str) -> Vec<u8> {
    format!("replication-stopped/{machine}").into_bytes()
}

fn resync_key(machine: &str) -> Vec<u8> {
    format!("resync-required/{machine}").into_bytes()
}

/// Every `PREFIX<machine>` → value in the meta column family.
fn load_flags(journal: &Journal, prefix: &[u8]) -> HashMap<String, String> {
    let db = journal.db();
    let meta = db.cf_handle(journal::CF_META).expect("meta cf");
    let mut out = HashMap::new();
    for (k, v) in db.prefix_iterator_cf(meta, prefix).flatten() {
        if !k.starts_with(prefix) {
            break;
        }
        out.insert(
            String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
            String::from_utf8_lossy(&v).into_owned(),
        );
    }
    out
}

/// Sets (`Some`) or clears a machine flag durably, then in `map`.
fn set_flag(
    journal: &Journal,
    map: &std::sync::RwLock<HashMap<String, String>>,
    key: Vec<u8>,
    machine: &str,
    value: Option<&str>,
) -> Result<(), JournalError> {
    let db = journal.db();
    let meta = db.cf_handle(journal::CF_META).expect("meta cf");
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    match value {
        Some(v) => {
            db.put_cf_opt(meta, key, v.as_bytes(), &wo)?;
            map.write().expect("lock").insert(machine.into(), v.into());
        }
        None => {
            db.delete_cf_opt(meta, key, &wo)?;
            map.write().expect("lock").remove(machine);
        }
    }
    Ok(())
}

impl Coordinator {
    /// Reads the machine flags from RocksDB: blocking, call it off the async runtime.
    pub fn new(policies: Policies, events: Events) -> Arc<Self> {
        let stopped = load_flags(policies.journal(), b"replication-stopped/");
        let resync = load_flags(policies.journal(), b"resync-required/");
        Arc::new(Self {
            stopped: std::sync::RwLock::new(stopped),
            resync: std::sync::RwLock::new(resync),
            journal: policies.journal().clone(),
            groups: Groups::new(policies.clone()),
            policies,
            events,
            state: Mutex::new(State {
                next_request: 1,
                ..Default::default()
            }),
        })
    }

    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Why `machine`'s replication is stopped, if it is (it failed over).
    pub fn replication_stopped(&self, machine: &str) -> Option<String> {
        self.stopped.read().expect("lock").get(machine).cloned()
    }

    /// Stops accepting `machine`'s writes (failover); durable before it returns (blocking).
    pub fn stop_replication(&self, machine: &str, reason: &str) -> Result<(), JournalError> {
        set_flag(
            &self.journal,
            &self.stopped,
            stopped_key(machine),
            machine,
            Some(reason),
        )
    }

    /// Accepts `machine`'s writes again (re-protect after failback); durable (blocking).
    pub fn resume_replication(&self, machine: &str) -> Result<(), JournalError> {
        set_flag(&self.journal, &self.stopped, stopped_key(machine), machine, None)
    }

    /// Why `machine` must resynchronise, if it must.
    pub fn resync_required(&self, machine: &str) -> Option<String> {
        self.resync.read().expect("lock").get(machine).cloned()
    }

    /// Marks `machine` resync-required (disk resized, agent-reported unclean shutdown, or an
    /// operator's request) and posts an event; durable (blocking).
    pub fn require_resync(&self, machine: &str, reason: &str) -> Result<(), JournalError> {
        set_flag(&self.journal, &self.resync, resync_key(machine), machine, Some(reason))?;
        self.events.post(
            Severity::Warning,
            "resync-required",
            machine,
            format!("{machine} must resynchronise: {reason}"),
        )?;
        Ok(())
    }

    /// The agent compared every block and sent what differed: protected again (blocking).
    pub fn resync_done(&self, machine: &str) -> Result<(), JournalError> {
        if self.resync_required(machine).is_none() {
            return Ok(());
        }
        set_flag(&self.journal, &self.resync, resync_key(machine), machine, None)?;
        self.events.post(
            Severity::Info,
            "resynchronised",
            machine,
            format!("{machine} resynchronised: every block compared, the differences sent"),
        )?;
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Groups, &Policies) -> T + Send + 'static,
    ) -> Result<T, BookmarkError> {
        let (g, p) = (self.groups.clone(), self.policies.clone());
        tokio::task::spawn_blocking(move || f(&g, &p))
            .await
            .map_err(|e| BookmarkError::Store(e.to_string()))
    }

    async fn unit_of(&self, machine: &str) -> Result<Unit, BookmarkError> {
        let m = machine.to_owned();
        let group = self
            .blocking(move |g, _| g.group_of(&m))
            .await?
            .map_err(|e| BookmarkError::Store(e.to_string()))?;
        Ok(match group {
            Some(g) => Unit::Group(g),
            None => Unit::Machine(machine.into()),
        })
    }

    /// The requests waiting for `machine`'s agent.
    pub async fn requests(&self, machine: &str) -> Result<AgentRequests, BookmarkError> {
        let unit = self.unit_of(machine).await?;
        let st = self.state.lock().await;
        let bookmark = st
            .pending
            .get(&unit)
            .filter(|p| !p.arrived.contains_key(machine))
            .map(|p| BookmarkAsk {
                request: p.id,
                label: p.label.clone(),
            });
        Ok(AgentRequests {
            bookmark,
            resync: self.resync_required(machine),
        })
    }

    /// Asks for an app-consistent point of `machine`'s unit now (the schedule does this on its
    /// interval; the management API may too). Returns the request id.
    pub async fn ask_bookmark(&self, machine: &str, label: &str) -> Result<u64, BookmarkError> {
        let unit = self.unit_of(machine).await?;
        let mut st = self.state.lock().await;
        Ok(Self::ask(&mut st, unit, label, REQUEST_EXPIRY))
    }

    fn ask(st: &mut State, unit: Unit, label: &str, expires: Duration) -> u64 {
        if let Some(p) = st.pending.get(&unit) {
            return p.id;
        }
        let id = st.next_request;
        st.next_request += 1;
        st.pending.insert(
            unit,
            Pending {
                id,
                label: label.into(),
                created: Instant::now(),
                expires,
                arrived: HashMap::new(),
            },
        );
        id
    }

    /// An app-consistent bookmark from `machine`'s agent. A machine alone gets its point at once;
    /// a group member waits (up to [`GROUP_BARRIER_TIMEOUT`]) until every member with disks has
    /// sent one, and all get the same point.
    pub async fn bookmark(&self, machine: &str, label: &str, request: Option<u64>) -> Result<Ack, BookmarkError> {
        if let Some(why) = self.replication_stopped(machine) {
            return Err(BookmarkError::Stopped(format!("{machine}: {why}")));
        }
        if let Some(d) = self
            .journal
            .disks()
            .into_iter()
            .find(|d| d.machine == machine && d.is_followed())
        {
            return Err(BookmarkError::Journal(JournalError::Followed {
                machine: machine.into(),
                disk: d.disk,
                process_server: d.followed_from,
            }));
        }
        let unit = self.unit_of(machine).await?;
        let group = match &unit {
            Unit::Machine(_) => {
                let record = journal::prepare(IngestRecord::bookmark(label), 0);
                let batch = u64::from_be_bytes(rand::random::<[u8; 8]>());
                let ack = self.journal.commit(machine, batch, 0, vec![record]).await?;
                let mut st = self.state.lock().await;
                if st.pending.get(&unit).is_some_and(|p| request.is_none_or(|r| r == p.id)) {
                    st.pending.remove(&unit);
                }
                st.last_app.insert(unit, Instant::now());
                return Ok(ack);
            }
            Unit::Group(g) => g.clone(),
        };
        let name = group.clone();
        let members = self
            .blocking(move |g, _| g.get(&name))
            .await?
            .map_err(|e| BookmarkError::Store(e.to_string()))?
            .map(|g| g.machines)
            .unwrap_or_default();
        let disks = self.ingested_disks();
        let with_disks: Vec<String> = members
            .into_iter()
            .filter(|m| disks.iter().any(|d| &d.machine == m))
            .collect();
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().await;
            let id = Self::ask(&mut st, unit.clone(), label, REQUEST_EXPIRY);
            let pending = st.pending.get_mut(&unit).expect("just asked");
            if request.is_some_and(|r| r != id) {
                tracing::info!(machine, group, "bookmark for an older request joins the current one");
            }
            pending.arrived.entry(machine.into()).or_default().push(tx);
            let all_in = with_disks.iter().all(|m| pending.arrived.contains_key(m));
            if all_in {
                let pending = st.pending.remove(&unit).expect("pending");
                st.last_app.insert(unit.clone(), Instant::now());
                drop(st);
                let result = self
                    .journal
                    .group_point(&group, &with_disks, RecordKind::Bookmark, &pending.label)
                    .await;
                for (m, waiters) in pending.arrived {
                    for w in waiters {
                        let _ = w.send(match &result {
                            Ok(gp) => Ok(Ack {
                                batch: 0,
                                seqs: gp.seqs.get(&m).cloned().unwrap_or_default(),
                                point: Some(gp.point),
                                duplicate: false,
                            }),
                            Err(e) => Err(e.to_string()),
                        });
                    }
                }
            }
        }
        match tokio::time::timeout(GROUP_BARRIER_TIMEOUT, rx).await {
            Ok(Ok(Ok(ack))) => Ok(ack),
            Ok(Ok(Err(e))) => Err(BookmarkError::Store(e)),
            Ok(Err(_)) => Err(BookmarkError::Store("the group bookmark was abandoned".into())),
            Err(_) => {
                let mut st = self.state.lock().await;
                let missing = match st.pending.get(&unit) {
                    Some(p) => with_disks
                        .iter()
                        .filter(|m| !p.arrived.contains_key(*m))
                        .cloned()
                        .collect(),
                    None => Vec::new(),
                };
                st.pending.remove(&unit);
                drop(st);
                let err = BookmarkError::BarrierTimeout {
                    group,
                    missing,
                    timeout: GROUP_BARRIER_TIMEOUT,
                };
                let _ = self
                    .post(
                        Severity::Warning,
                        "app-consistent-point-missed",
                        machine,
                        err.to_string(),
                    )
                    .await;
                Err(err)
            }
        }
    }

    async fn post(
        &self,
        severity: Severity,
        kind: &'static str,
        machine: &str,
        message: String,
    ) -> Result<(), BookmarkError> {
        self.events.post_async(severity, kind, machine, message).await?;
        Ok(())
    }

    /// The disks this appliance's process server writes: a followed disk's points are cut by the
    /// process server that writes its log.
    fn ingested_disks(&self) -> Vec<journal::DiskMeta> {
        let mut disks = self.journal.disks();
        disks.retain(|d| !d.is_followed());
        disks
    }

    /// The units to schedule now: every group, and every machine with disks in no group.
    async fn units(&self) -> Result<Vec<(Unit, Vec<String>, crate::policy::Settings)>, BookmarkError> {
        let machines: Vec<String> = {
            let mut m: Vec<String> = self.ingested_disks().into_iter().map(|d| d.machine).collect();
            m.sort();
            m.dedup();
            m
        };
        self.blocking(move |groups, policies| {
            let mut out = Vec::new();
            let list = groups.list().map_err(|e| e.to_string())?;
            for g in &list {
                let members: Vec<String> = g
                    .group
                    .machines
                    .iter()
                    .filter(|m| machines.contains(m))
                    .cloned()
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let settings = policies.settings_of(&members[0]);
                out.push((Unit::Group(g.name.clone()), members, settings));
            }
            for m in &machines {
                if !list.iter().any(|g| g.group.machines.contains(m)) {
                    out.push((Unit::Machine(m.clone()), vec![m.clone()], policies.settings_of(m)));
                }
            }
            Ok::<_, String>(out)
        })
        .await?
        .map_err(BookmarkError::Store)
    }

    /// One round of the schedule: cut due crash points, post due bookmark requests, expire
    /// requests nobody answered.
    async fn tick(&self) -> Result<(), BookmarkError> {
        let now = Instant::now();
        for (unit, members, settings) in self.units().await? {
            let (crash_due, app_due) = {
                let mut st = self.state.lock().await;
                let last_crash = *st.last_crash.entry(unit.clone()).or_insert(now);
                let last_app = *st.last_app.entry(unit.clone()).or_insert(now);
                let crash_due = now.duration_since(last_crash) >= settings.crash_consistent_interval;
                if crash_due {
                    st.last_crash.insert(unit.clone(), now);
                }
                let app_due = now.duration_since(last_app) >= settings.app_consistent_interval;
                if app_due {
                    st.last_app.insert(unit.clone(), now);
                    let expires = REQUEST_EXPIRY.max(settings.app_consistent_interval);
                    Self::ask(&mut st, unit.clone(), "scheduled", expires);
                }
                (crash_due, app_due)
            };
            if app_due {
                tracing::debug!(?unit, "app-consistent point requested");
            }
            if crash_due {
                let cut = match &unit {
                    Unit::Group(g) => self.journal.cut_group_crash_point(g, &members).await,
                    Unit::Machine(m) => self.journal.cut_crash_point(m).await,
                };
                match cut {
                    Ok(Some(id)) => tracing::debug!(?unit, point = id, "crash-consistent point"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(?unit, error = %e, "could not cut a crash-consistent point"),
                }
            }
        }
        let expired: Vec<(Unit, u64)> = {
            let mut st = self.state.lock().await;
            let gone: Vec<(Unit, u64)> = st
                .pending
                .iter()
                .filter(|(_, p)| p.arrived.is_empty() && now.duration_since(p.created) > p.expires)
                .map(|(u, p)| (u.clone(), p.id))
                .collect();
            for (u, _) in &gone {
                st.pending.remove(u);
            }
            gone
        };
        for (unit, id) in expired {
            let (who, message) = match &unit {
                Unit::Group(g) => (
                    String::new(),
                    format!("group {g:?}: no agent answered app-consistent request {id}"),
                ),
                Unit::Machine(m) => (m.clone(), format!("no agent answered app-consistent request {id}")),
            };
            self.post(Severity::Warning, "app-consistent-point-missed", &who, message)
                .await?;
        }
        Ok(())
    }

    /// Runs the schedule every second (so policy changes apply at once) until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "point schedule");
            }
        }
    }
}

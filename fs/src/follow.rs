//! The config server's catalogue follower. A machine assigned to a scale-out process server
//! replicates there, into the shared blob storage; this task brings the config server's own
//! catalogue up to that log every few seconds (and at each heartbeat), so the machine's points
//! are listed, exported, mounted and failed over here without `lifeboat index rebuild`.
//!
//! For each disk of an assigned machine (found by its `disk.json`) the follower keeps a local
//! [`DiskMeta`] marked as followed (never ingested, segmented, pointed or rolled up here) and
//! indexes what blob storage holds after its position:
//! - a base image generation newer than the catalogue's, as retention on the process server
//!   published it: its parts in, the extents and segments it covers out, the points it ends
//!   dropped — one `WriteBatch`, like retention's own switch ([`catalog::drop_extents`],
//!   [`catalog::switch_base`]);
//! - then each new log segment, one `WriteBatch` each (entry, extents, the point records found,
//!   the new position), so a restart goes on after the last one written and re-indexing is
//!   harmless.
//!
//! A point's record is in every disk's log that the point covers; the point is registered (with
//! the writer's id) once every followed disk either holds its record or has indexed past its
//! time, so a point never shows as readable with one of its disks missing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gateway::blob;
use gateway::catalog::{self, BaseState, SegmentEntry};
use gateway::crypto::Key;
use gateway::journal::{self, DiskMeta, RecoveryPoint};
use gateway::process_servers::ProcessServers;
use gateway::rebuild::{self, PointMark};
use gateway::replay::{list_segments_from, read_object};
use gateway::server::DiskDescriptor;
use object_store::path::Path;
use object_store::ObjectStore;
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::pit::Reader;

/// How often the follower looks at blob storage when no heartbeat wakes it earlier.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// Passes woken by heartbeats are at least this far apart.
const MIN_GAP: Duration = Duration::from_millis(500);

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FollowOutcome {
    pub new_disks: usize,
    pub segments: usize,
    pub base_switches: usize,
    pub points_added: usize,
    pub points_dropped: usize,
}

/// How far a followed disk's catalogue is: written in the same batch as what it indexed.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Position {
    /// Every record with seq ≤ this is indexed (or covered by the base image).
    through: u64,
    /// The newest record time indexed (the writer's clock): a point older than this that the
    /// disk's log did not hold never will.
    last_time_ms: u64,
}

fn position_key(disk_id: u32) -> Vec<u8> {
    format!("follow/{disk_id:08x}").into_bytes()
}

fn mark_prefix(machine: &str) -> Vec<u8> {
    format!("follow-mark/{machine}/").into_bytes()
}

/// A point record seen in one disk's log, kept until the point is complete.
fn mark_key(machine: &str, point: u64, disk: &str) -> Vec<u8> {
    format!("follow-mark/{machine}/{point:016x}/{disk}").into_bytes()
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn read_position(db: &DB, disk_id: u32) -> anyhow::Result<Position> {
    let meta = db.cf_handle(journal::CF_META).expect("meta cf");
    match db.get_cf(meta, position_key(disk_id))? {
        Some(v) => Ok(serde_json::from_slice(&v)?),
        None => Ok(Position::default()),
    }
}

fn put_position(db: &DB, wb: &mut WriteBatch, disk_id: u32, pos: Position) {
    let meta = db.cf_handle(journal::CF_META).expect("meta cf");
    wb.put_cf(meta, position_key(disk_id), serde_json::to_vec(&pos).expect("json"));
}

fn put_marks(db: &DB, wb: &mut WriteBatch, machine: &str, disk: &str, marks: &[PointMark]) {
    let meta = db.cf_handle(journal::CF_META).expect("meta cf");
    for m in marks {
        wb.put_cf(
            meta,
            mark_key(machine, m.point, disk),
            serde_json::to_vec(m).expect("json"),
        );
    }
}

/// A followed disk after this pass: its record, position and base image.
struct Followed {
    meta: DiskMeta,
    pos: Position,
    base: BaseState,
}

fn base_through(disks: &[Followed], disk: &str) -> u64 {
    disks
        .iter()
        .find(|f| f.meta.disk == disk)
        .map(|f| f.base.through_seq)
        .unwrap_or(0)
}

/// What to do with a point of which `marks` (disk, record) were seen so far: `None` to wait
/// (a followed disk has neither its record nor anything later yet), `Some(true)` to register
/// it, `Some(false)` to forget it (a base image now covers its position on some disk: its
/// process server's retention dropped it).
fn settle(marks: &[(String, PointMark)], disks: &[Followed]) -> Option<bool> {
    let (_, first) = marks.first()?;
    if marks.iter().any(|(d, m)| m.seq <= base_through(disks, d)) {
        return Some(false);
    }
    disks
        .iter()
        .all(|f| f.pos.last_time_ms > first.time_ms || marks.iter().any(|(d, _)| *d == f.meta.disk))
        .then_some(true)
}

pub struct Follower {
    reader: Arc<Reader>,
    kek: Key,
    registry: ProcessServers,
    wake: Arc<Notify>,
    /// Assigned machines whose disks this appliance writes itself: told once.
    warned: Mutex<HashSet<String>>,
}

impl Follower {
    /// `reader` is the master target's (over the config server's journal); `wake` makes the
    /// next pass start at once (each heartbeat of a process server notifies it).
    pub fn new(reader: Arc<Reader>, kek: Key, registry: ProcessServers, wake: Arc<Notify>) -> Self {
        Self {
            reader,
            kek,
            registry,
            wake,
            warned: Mutex::new(HashSet::new()),
        }
    }

    fn store(&self) -> &dyn ObjectStore {
        self.reader.store().as_ref()
    }

    fn db(&self) -> Arc<DB> {
        self.reader.journal().db().clone()
    }

    /// Runs a pass now, then every `every` or when woken, until `shutdown` turns true.
    pub async fn run(self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            match self.pass().await {
                Ok(o) if o != FollowOutcome::default() => tracing::info!(
                    new_disks = o.new_disks,
                    segments = o.segments,
                    base_switches = o.base_switches,
                    points_added = o.points_added,
                    points_dropped = o.points_dropped,
                    "followed the scale-out process servers' logs"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "catalogue follower pass failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(MIN_GAP) => {}
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(every.saturating_sub(MIN_GAP)) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over every machine assigned to a scale-out process server.
    pub async fn pass(&self) -> anyhow::Result<FollowOutcome> {
        let registry = self.registry.clone();
        let assignments = tokio::task::spawn_blocking(move || registry.assignments())
            .await?
            .map_err(err)?;
        let mut out = FollowOutcome::default();
        for (machine, process_server) in assignments {
            if let Err(e) = self.machine(&machine, &process_server, &mut out).await {
                tracing::warn!(machine = %machine, process_server = %process_server, error = %format!("{e:#}"),
                    "following the machine's log failed; retrying next round");
            }
        }
        Ok(out)
    }

    async fn machine(&self, machine: &str, process_server: &str, out: &mut FollowOutcome) -> anyhow::Result<()> {
        let local = self.reader.disks(machine);
        if local.iter().any(|d| !d.is_followed()) {
            if self.warned.lock().expect("lock").insert(machine.to_owned()) {
                tracing::warn!(machine, process_server,
                    "the machine is assigned to a scale-out process server but this appliance wrote its disks: not followed (see `lifeboat index rebuild`)");
            }
            return Ok(());
        }
        let mut followed = Vec::new();
        for desc in rebuild::machine_disks(self.store(), machine).await? {
            let existing = local.iter().find(|d| d.disk == desc.disk).cloned();
            if let Some(f) = self.disk(&desc, process_server, existing, out).await? {
                followed.push(f);
            }
        }
        self.points(machine, followed, out).await
    }

    /// Brings one disk's catalogue up to its log; `None` while the disk has no log yet.
    async fn disk(
        &self,
        desc: &DiskDescriptor,
        process_server: &str,
        existing: Option<DiskMeta>,
        out: &mut FollowOutcome,
    ) -> anyhow::Result<Option<Followed>> {
        let (machine, disk) = (desc.machine.as_str(), desc.disk.as_str());
        let store = self.store();
        let manifest = blob::get_base_manifest(store, machine, disk).await?;
        let meta = match existing {
            Some(m) => m,
            None => {
                let has_log = manifest.is_some() || !list_segments_from(store, machine, disk, 1).await?.is_empty();
                if !has_log {
                    return Ok(None);
                }
                out.new_disks += 1;
                tracing::info!(machine, disk, process_server, "following a disk's log");
                self.reader
                    .journal()
                    .put_followed_disk(DiskMeta {
                        id: 0,
                        machine: machine.into(),
                        disk: disk.into(),
                        size: desc.size,
                        // Followed disks hold no key of their own: each segment names its own.
                        key_id: 0,
                        next_seq: 1,
                        uploaded_through: 0,
                        next_counter: 0,
                        followed_from: process_server.into(),
                    })
                    .await?
            }
        };
        let id = meta.id;
        let db = self.db();
        let (mut pos, mut base) = {
            let db = db.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                Ok((read_position(&db, id)?, catalog::base_state(&db, id).map_err(err)?))
            })
            .await??
        };
        let mut keys: HashMap<u32, Key> = HashMap::new();
        // (1) A base image the process server's retention published since.
        if let Some(m) = manifest.filter(|m| m.generation > base.generation) {
            if self.reader.oldest_open_view(id).is_some_and(|s| s < m.through_seq) {
                tracing::debug!(machine, disk, "base switch waits for an open view of an old point");
                return Ok(Some(Followed { meta, pos, base }));
            }
            let mut wb = WriteBatch::default();
            let blocks = {
                let (db, through) = (db.clone(), m.through_seq);
                tokio::task::spawn_blocking(move || catalog::extents_through(&db, id, through)).await??
            };
            catalog::drop_extents(&db, &mut wb, id, &blocks);
            for (part, path) in m.parts.iter().enumerate() {
                let path = Path::from(path.as_str());
                let (index, records) = read_object(store, &self.kek, &mut keys, machine, disk, &path).await?;
                let entry = SegmentEntry::from_index(path.as_ref(), &index);
                rebuild::index_object(
                    &db,
                    &mut wb,
                    id,
                    catalog::base_part_id(m.generation, part as u32),
                    &entry,
                    &records,
                    None,
                );
            }
            let state = BaseState {
                generation: m.generation,
                through_seq: m.through_seq,
            };
            let replaced = {
                let db = db.clone();
                tokio::task::spawn_blocking(move || catalog::segments(&db, id)).await??
            };
            let replaced = replaced
                .into_iter()
                .filter(|(sid, e)| sid & catalog::BASE_ID != 0 || e.last_seq <= state.through_seq)
                .map(|(sid, _)| sid);
            catalog::switch_base(&db, &mut wb, id, replaced, state);
            pos.through = pos.through.max(state.through_seq);
            put_position(&db, &mut wb, id, pos);
            {
                let db = db.clone();
                tokio::task::spawn_blocking(move || db.write(wb)).await??;
            }
            self.reader.forget_segments(id);
            base = state;
            out.base_switches += 1;
            tracing::info!(
                machine,
                disk,
                generation = state.generation,
                through = state.through_seq,
                "followed a base image switch"
            );
        }
        // (2) The log segments after the position, one batch each.
        let from = pos.through + 1;
        let segments = rebuild::continuing(
            list_segments_from(store, machine, disk, from).await?,
            from,
            machine,
            disk,
        )?;
        for seg in segments {
            let (index, records) = read_object(store, &self.kek, &mut keys, machine, disk, &seg.path).await?;
            let entry = SegmentEntry::from_index(seg.path.as_ref(), &index);
            let next = Position {
                through: seg.last_seq,
                last_time_ms: records
                    .iter()
                    .map(|r| r.time_ms)
                    .max()
                    .unwrap_or(0)
                    .max(pos.last_time_ms),
            };
            let (db, m, d) = (db.clone(), machine.to_owned(), disk.to_owned());
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut wb = WriteBatch::default();
                let marks = rebuild::index_object(&db, &mut wb, id, seg.first_seq, &entry, &records, None);
                put_marks(&db, &mut wb, &m, &d, &marks);
                put_position(&db, &mut wb, id, next);
                // Not synced: the disk record published next is, and that syncs the WAL before it.
                db.write(wb)?;
                Ok(())
            })
            .await??;
            pos = next;
            out.segments += 1;
        }
        // (3) The disk record: how far its points are readable here.
        let meta = if meta.next_seq != pos.through + 1 || meta.size != desc.size || meta.followed_from != process_server
        {
            self.reader
                .journal()
                .put_followed_disk(DiskMeta {
                    size: desc.size,
                    next_seq: pos.through + 1,
                    uploaded_through: pos.through,
                    followed_from: process_server.into(),
                    ..meta
                })
                .await?
        } else {
            meta
        };
        Ok(Some(Followed { meta, pos, base }))
    }

    /// Registers the points whose records every followed disk of `machine` has indexed (or
    /// indexed past), and drops points and pending records a base image ended.
    async fn points(&self, machine: &str, disks: Vec<Followed>, out: &mut FollowOutcome) -> anyhow::Result<()> {
        let journal = self.reader.journal().clone();
        let machine = machine.to_owned();
        let (added, dropped) = tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, usize)> {
            let db = journal.db();
            let meta = db.cf_handle(journal::CF_META).expect("meta cf");
            let base_of = |disk: &str| base_through(&disks, disk);
            let mut pending: BTreeMap<u64, Vec<(String, PointMark)>> = BTreeMap::new();
            let prefix = mark_prefix(&machine);
            for item in db.prefix_iterator_cf(meta, &prefix) {
                let (k, v) = item?;
                let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                    break;
                };
                let disk = String::from_utf8_lossy(rest.get(17..).unwrap_or_default()).into_owned();
                let mark: PointMark = serde_json::from_slice(&v)?;
                pending.entry(mark.point).or_default().push((disk, mark));
            }
            let mut points: BTreeMap<u64, RecoveryPoint> =
                journal.points(&machine)?.into_iter().map(|p| (p.id, p)).collect();
            let mut wb = WriteBatch::default();
            let (mut added, mut dropped) = (0, 0);
            for (id, marks) in pending {
                let Some(register) = settle(&marks, &disks) else {
                    continue;
                };
                for (d, _) in &marks {
                    wb.delete_cf(meta, mark_key(&machine, id, d));
                }
                if !register {
                    continue;
                }
                added += !points.contains_key(&id) as usize;
                for (d, m) in &marks {
                    m.add_to(&mut points, &machine, d);
                }
                wb.put_cf(
                    meta,
                    journal::point_key(&machine, id),
                    serde_json::to_vec(&points[&id]).expect("json"),
                );
            }
            // A point whose position on some disk the base image now covers was dropped by the
            // process server's retention: it cannot be read here any more either.
            for p in points.values() {
                if p.seqs.iter().any(|(d, seq)| *seq <= base_of(d)) {
                    wb.delete_cf(meta, journal::point_key(&machine, p.id));
                    dropped += 1;
                }
            }
            if !wb.is_empty() {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.write_opt(wb, &wo)?;
            }
            Ok((added, dropped))
        })
        .await??;
        out.points_added += added;
        out.points_dropped += dropped;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn followed(disk: &str, last_time_ms: u64, base_through: u64) -> Followed {
        Followed {
            meta: DiskMeta {
                id: 1,
                machine: "m".into(),
                disk: disk.into(),
                size: 1 << 20,
                key_id: 0,
                next_seq: 1,
                uploaded_through: 0,
                next_counter: 0,
                followed_from: "ps2".into(),
            },
            pos: Position {
                through: 0,
                last_time_ms,
            },
            base: BaseState {
                generation: (base_through > 0) as u64,
                through_seq: base_through,
            },
        }
    }

    fn mark(disk: &str, seq: u64, time_ms: u64) -> (String, PointMark) {
        (
            disk.into(),
            PointMark {
                point: 7,
                seq,
                time_ms,
                kind: "crash-consistent".into(),
                label: String::new(),
            },
        )
    }

    /// A point is registered only once no followed disk can still bring its record: a disk
    /// lagging behind holds it back, a disk whose log went past the point's time without it
    /// (it was added later) does not, and a base image over its position ends it.
    #[test]
    fn a_point_waits_for_every_disk_that_may_still_hold_it() {
        let disks = [followed("disk0", 1_000, 0), followed("disk1", 900, 0)];
        assert_eq!(settle(&[mark("disk0", 10, 950)], &disks), None, "disk1 lags behind");
        assert_eq!(
            settle(&[mark("disk0", 10, 950), mark("disk1", 4, 950)], &disks),
            Some(true)
        );
        assert_eq!(
            settle(&[mark("disk0", 10, 850)], &disks),
            Some(true),
            "disk1 went past it"
        );
        let rolled = [followed("disk0", 1_000, 12), followed("disk1", 900, 0)];
        assert_eq!(settle(&[mark("disk0", 10, 950)], &rolled), Some(false));
        assert_eq!(settle(&[], &disks), None);
    }
}

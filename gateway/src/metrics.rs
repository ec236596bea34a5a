//! Prometheus metrics of the data path, registered in the registry the appliance serves.
//!
//! Counters are bumped where things happen (ingest, upload); the derived gauges (RPO, churn,
//! cache time to full, compression ratio, machine state) are computed by [`GatewayMetrics::refresh`],
//! which the appliance runs every second and before each scrape.
//!
//! Definitions:
//! - **RPO** of a disk (`lifeboat_rpo_seconds`): how much acknowledged history would be lost if
//!   the appliance's journal were lost now, i.e. `now − ack time of the oldest acknowledged write
//!   that is not yet in blob storage` (the `time_ms` of the journal record at `uploaded_through + 1`,
//!   stamped at the group commit that acked it). 0 when everything acked is uploaded. It keeps
//!   growing during a blob-store outage and survives restarts (the time is in the journal). It
//!   measures the appliance's side only: writes the agent has not sent yet are not visible here.
//! - **Churn** (`lifeboat_churn_bytes_per_second`): block data bytes acked for a disk, averaged
//!   over the last 60 s (bytes in the window ÷ 60).
//! - **Cache time to full** (`lifeboat_cache_time_to_full_seconds`): free cache ÷ (journal bytes
//!   taken in by ingest − journal bytes drained by uploads, per second over 60 s; the bytes taken
//!   in are the churn, compressed where the agents compress). `+Inf` when uploads keep up
//!   (drain ≥ fill); 0 when the cache is full, i.e. an ingest batch had to wait for
//!   space in the last 5 s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::journal::Journal;

/// Length of the sliding window of the rate gauges, in seconds.
pub const RATE_WINDOW_SECS: u64 = 60;
/// The cache counts as full for this long after an ingest batch waited for space.
const HELD_BACK_FULL_MS: u64 = 5_000;
/// The replication states `lifeboat_machine_state` reports (one series each, 1 for the current).
pub const MACHINE_STATES: [&str; 2] = ["initial-sync", "protected"];

#[derive(Clone)]
pub struct GatewayMetrics {
    pub ingest_bytes: IntCounterVec,
    pub ingest_batches: IntCounter,
    pub ingest_rejected: IntCounterVec,
    pub ingest_held_back: IntCounter,
    pub uploaded_bytes: IntCounter,
    pub compressed_in_bytes: IntCounter,
    pub segments_uploaded: IntCounter,
    pub upload_errors: IntCounter,
    pub upload_retries: IntCounter,
    pub cache_used_bytes: IntGauge,
    pub cache_limit_bytes: IntGauge,
    pub segments_pending: IntGauge,
    pub commit_seconds: Histogram,
    pub rpo_seconds: GaugeVec,
    pub rpo_threshold_seconds: Gauge,
    pub rpo_exceeded: IntGaugeVec,
    pub churn: GaugeVec,
    pub pending_records: IntGaugeVec,
    pub upload_rate: Gauge,
    pub cache_time_to_full: Gauge,
    pub compression_ratio: Gauge,
    pub machine_state: IntGaugeVec,
    rates: Arc<Mutex<Rates>>,
    disks: Arc<Mutex<DiskStates>>,
    /// Per-machine RPO thresholds (each machine's policy) and the event log for crossings; set
    /// once the process server has them.
    policy: Arc<Mutex<Option<(crate::policy::Policies, crate::events::Events)>>>,
}

/// Per-second buckets of a byte count over the last [`RATE_WINDOW_SECS`].
#[derive(Default)]
struct Window {
    buckets: VecDeque<(u64, u64)>,
}

impl Window {
    fn add(&mut self, now_s: u64, n: u64) {
        match self.buckets.back_mut() {
            Some((s, b)) if *s == now_s => *b += n,
            _ => self.buckets.push_back((now_s, n)),
        }
        self.trim(now_s);
    }

    fn trim(&mut self, now_s: u64) {
        while self.buckets.front().is_some_and(|(s, _)| s + RATE_WINDOW_SECS <= now_s) {
            self.buckets.pop_front();
        }
    }

    fn rate(&mut self, now_s: u64) -> f64 {
        self.trim(now_s);
        self.buckets.iter().map(|(_, b)| *b).sum::<u64>() as f64 / RATE_WINDOW_SECS as f64
    }
}

#[derive(Default)]
struct Rates {
    /// machine → disk → window (nested so that a lookup by `&str` allocates nothing).
    churn: HashMap<String, HashMap<String, Window>>,
    /// Journal bytes taken in by ingest (compressed where agents pack their writes), the
    /// counterpart of `drained` for the cache's time to full.
    filled: Window,
    drained: Window,
    held_back_ms: Option<u64>,
}

#[derive(Default)]
struct DiskState {
    /// `(uploaded_through, ack time of record uploaded_through + 1)`, re-read when it moves.
    oldest_pending: Option<(u64, u64)>,
    exceeded: bool,
}

#[derive(Default)]
struct DiskStates {
    disks: HashMap<u32, DiskState>,
    protected: HashSet<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("metric");
        let gauge = |name: &str, help: &str| Gauge::new(name, help).expect("metric");
        let per_disk =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["machine", "disk"]).expect("metric");
        let m = Self {
            ingest_bytes: IntCounterVec::new(
                Opts::new(
                    "lifeboat_ingest_bytes_total",
                    "Block data bytes committed to the journal, as written to the disk (before compression).",
                ),
                &["machine", "disk"],
            )
            .expect("metric"),
            ingest_batches: counter("lifeboat_ingest_batches_total", "Ingest batches committed."),
            ingest_rejected: IntCounterVec::new(
                Opts::new("lifeboat_ingest_rejected_total", "Ingest requests refused, by reason."),
                &["reason"],
            )
            .expect("metric"),
            ingest_held_back: counter(
                "lifeboat_ingest_held_back_total",
                "Times an ingest batch had to wait for cache space (the cache was full).",
            ),
            uploaded_bytes: counter(
                "lifeboat_uploaded_bytes_total",
                "Segment bytes put to blob storage (compressed, sealed).",
            ),
            compressed_in_bytes: counter(
                "lifeboat_compressed_input_bytes_total",
                "Raw log bytes packed into uploaded segments.",
            ),
            segments_uploaded: counter("lifeboat_segments_uploaded_total", "Segments put to blob storage."),
            upload_errors: counter("lifeboat_upload_errors_total", "Failed segment puts (each is retried)."),
            upload_retries: counter(
                "lifeboat_upload_retries_total",
                "Segment upload attempts made again after a failure.",
            ),
            cache_used_bytes: IntGauge::new("lifeboat_cache_used_bytes", "Bytes held in the write-ahead cache.")
                .expect("metric"),
            cache_limit_bytes: IntGauge::new("lifeboat_cache_limit_bytes", "Configured write-ahead cache limit.")
                .expect("metric"),
            segments_pending: IntGauge::new(
                "lifeboat_segments_pending",
                "Disks with journal data waiting for upload.",
            )
            .expect("metric"),
            commit_seconds: Histogram::with_opts(HistogramOpts::new(
                "lifeboat_ingest_commit_seconds",
                "Time from batch receipt to durable ack.",
            ))
            .expect("metric"),
            rpo_seconds: per_disk(
                "lifeboat_rpo_seconds",
                "Current RPO: seconds since the oldest acknowledged write not yet in blob storage was acked; 0 when all is uploaded.",
            ),
            rpo_threshold_seconds: gauge(
                "lifeboat_rpo_threshold_seconds",
                "The policy's RPO threshold.",
            ),
            rpo_exceeded: IntGaugeVec::new(
                Opts::new(
                    "lifeboat_rpo_threshold_exceeded",
                    "1 when the disk's current RPO is over the policy's RPO threshold.",
                ),
                &["machine", "disk"],
            )
            .expect("metric"),
            churn: per_disk(
                "lifeboat_churn_bytes_per_second",
                "Block data bytes acked for the disk per second, averaged over the last 60 s.",
            ),
            pending_records: IntGaugeVec::new(
                Opts::new(
                    "lifeboat_pending_upload_records",
                    "Journal records of the disk acknowledged but not yet in blob storage.",
                ),
                &["machine", "disk"],
            )
            .expect("metric"),
            upload_rate: gauge(
                "lifeboat_upload_drain_bytes_per_second",
                "Journal bytes freed by uploads per second, averaged over the last 60 s.",
            ),
            cache_time_to_full: gauge(
                "lifeboat_cache_time_to_full_seconds",
                "Estimated seconds until the cache is full at the current churn and upload rate; +Inf when uploads keep up, 0 when full.",
            ),
            compression_ratio: gauge(
                "lifeboat_compression_ratio",
                "Raw log bytes per uploaded segment byte since start (0 before the first upload).",
            ),
            machine_state: IntGaugeVec::new(
                Opts::new(
                    "lifeboat_machine_state",
                    "Replication state per machine: 1 for the current state (initial-sync until its first recovery point is readable, then protected).",
                ),
                &["machine", "state"],
            )
            .expect("metric"),
            rates: Arc::default(),
            disks: Arc::default(),
            policy: Arc::default(),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.ingest_bytes.clone()),
            Box::new(m.ingest_batches.clone()),
            Box::new(m.ingest_rejected.clone()),
            Box::new(m.ingest_held_back.clone()),
            Box::new(m.uploaded_bytes.clone()),
            Box::new(m.compressed_in_bytes.clone()),
            Box::new(m.segments_uploaded.clone()),
            Box::new(m.upload_errors.clone()),
            Box::new(m.upload_retries.clone()),
            Box::new(m.cache_used_bytes.clone()),
            Box::new(m.cache_limit_bytes.clone()),
            Box::new(m.segments_pending.clone()),
            Box::new(m.commit_seconds.clone()),
            Box::new(m.rpo_seconds.clone()),
            Box::new(m.rpo_threshold_seconds.clone()),
            Box::new(m.rpo_exceeded.clone()),
            Box::new(m.churn.clone()),
            Box::new(m.pending_records.clone()),
            Box::new(m.upload_rate.clone()),
            Box::new(m.cache_time_to_full.clone()),
            Box::new(m.compression_ratio.clone()),
            Box::new(m.machine_state.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("register");
        }
        m
    }

    /// Counts `n` block data bytes acked for a disk (the ingest counter and the churn window),
    /// which took `cached` bytes of the journal (fewer where the agent compressed them).
    pub fn record_ingest(&self, machine: &str, disk: &str, n: u64, cached: u64) {
        self.ingest_bytes.with_label_values(&[machine, disk]).inc_by(n);
        let now_s = now_ms() / 1000;
        let mut r = self.rates.lock().expect("lock");
        r.filled.add(now_s, cached);
        if let Some(w) = r.churn.get_mut(machine).and_then(|d| d.get_mut(disk)) {
            w.add(now_s, n);
            return;
        }
        r.churn
            .entry(machine.to_owned())
            .or_default()
            .entry(disk.to_owned())
            .or_default()
            .add(now_s, n);
    }

    /// Counts journal bytes freed by an upload (the drain rate).
    pub fn record_drained(&self, journal_bytes: u64) {
        self.rates
            .lock()
            .expect("lock")
            .drained
            .add(now_ms() / 1000, journal_bytes);
    }

    /// Notes that an ingest batch is waiting for cache space.
    pub fn note_held_back(&self) {
        self.ingest_held_back.inc();
        self.rates.lock().expect("lock").held_back_ms = Some(now_ms());
    }

    /// From now on each machine's RPO threshold is its policy's, and crossings are events.
    pub fn use_policies(&self, policies: crate::policy::Policies, events: crate::events::Events) {
        *self.policy.lock().expect("lock") = Some((policies, events));
    }

    /// Recomputes the derived gauges from the journal (blocking: may read RocksDB). Posts an
    /// event (and logs a warning) when a disk's RPO goes over its machine's threshold, and a
    /// notice when it is back under.
    pub fn refresh(&self, journal: &Journal) {
        let now = now_ms();
        let now_s = now / 1000;
        let disks = journal.disks();
        let default_threshold = self.rpo_threshold_seconds.get();
        let policy = self.policy.lock().expect("lock").clone();
        let mut thresholds: HashMap<String, f64> = HashMap::new();
        // One refresh at a time: the ticker and a scrape may race.
        let mut states = self.disks.lock().expect("lock");
        let mut pending_disks = 0;
        // A followed disk's RPO is its own process server's to report (see `DiskMeta::followed_from`).
        for d in disks.iter().filter(|d| !d.is_followed()) {
            let labels = [d.machine.as_str(), d.disk.as_str()];
            let pending = (d.next_seq - 1).saturating_sub(d.uploaded_through);
            self.pending_records.with_label_values(&labels).set(pending as i64);
            let st = states.disks.entry(d.id).or_default();
            let rpo = if pending == 0 {
                st.oldest_pending = None;
                Some(0.0)
            } else {
                pending_disks += 1;
                if st.oldest_pending.map(|(through, _)| through) != Some(d.uploaded_through) {
                    let first = d.uploaded_through + 1;
                    match journal.read_records(d.id, first, first, 0) {
                        Ok(recs) => {
                            if let Some(r) = recs.first() {
                                st.oldest_pending = Some((d.uploaded_through, r.time_ms));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(machine = %d.machine, disk = %d.disk, error = %e, "cannot read the journal for the RPO")
                        }
                    }
                }
                st.oldest_pending.map(|(_, t)| now.saturating_sub(t) as f64 / 1000.0)
            };
            let Some(rpo) = rpo else { continue };
            self.rpo_seconds.with_label_values(&labels).set(rpo);
            let threshold = *thresholds.entry(d.machine.clone()).or_insert_with(|| match &policy {
                Some((p, _)) => p.settings_of(&d.machine).rpo_threshold.as_secs_f64(),
                None => default_threshold,
            });
            let exceeded = threshold > 0.0 && rpo > threshold;
            if exceeded != st.exceeded {
                let (severity, kind, what) = if exceeded {
                    (crate::events::Severity::Warning, "rpo-threshold-exceeded", "over")
                } else {
                    (crate::events::Severity::Info, "rpo-within-threshold", "back within")
                };
                let message = format!(
                    "{}/{}: RPO {rpo:.0}s is {what} the threshold of {threshold:.0}s",
                    d.machine, d.disk
                );
                match &policy {
                    Some((_, events)) => {
                        if let Err(e) = events.post(severity, kind, &d.machine, message) {
                            tracing::warn!(error = %e, "could not record an RPO event");
                        }
                    }
                    None if exceeded => tracing::warn!(machine = %d.machine, disk = %d.disk, "{message}"),
                    None => tracing::info!(machine = %d.machine, disk = %d.disk, "{message}"),
                }
            }
            st.exceeded = exceeded;
            self.rpo_exceeded.with_label_values(&labels).set(exceeded as i64);
        }
        self.segments_pending.set(pending_disks);

        // Replication state per machine.
        let mut machines: Vec<&str> = disks.iter().map(|d| d.machine.as_str()).collect();
        machines.sort_unstable();
        machines.dedup();
        for m in machines {
            if !states.protected.contains(m) {
                let readable = journal.points(m).unwrap_or_default().iter().any(|p| {
                    p.seqs.iter().all(|(name, seq)| {
                        disks
                            .iter()
                            .any(|d| d.machine == m && &d.disk == name && d.uploaded_through >= *seq)
                    })
                });
                if readable {
                    states.protected.insert(m.to_owned());
                }
            }
            let current = if states.protected.contains(m) {
                "protected"
            } else {
                "initial-sync"
            };
            for s in MACHINE_STATES {
                self.machine_state.with_label_values(&[m, s]).set((s == current) as i64);
            }
        }
        drop(states);

        // Churn, drain and the cache's time to full.
        let (fill, drain, held_back_ms) = {
            let mut r = self.rates.lock().expect("lock");
            for (machine, disks) in r.churn.iter_mut() {
                for (disk, w) in disks.iter_mut() {
                    self.churn.with_label_values(&[machine, disk]).set(w.rate(now_s));
                }
            }
            (r.filled.rate(now_s), r.drained.rate(now_s), r.held_back_ms)
        };
        self.upload_rate.set(drain);
        let used = journal.cache_used();
        let limit = journal.state.max_bytes;
        self.cache_used_bytes.set(used as i64);
        let held_back = held_back_ms.is_some_and(|t| now.saturating_sub(t) < HELD_BACK_FULL_MS);
        let ttf = if held_back || used >= limit {
            0.0
        } else if fill > drain {
            (limit - used) as f64 / (fill - drain)
        } else {
            f64::INFINITY
        };
        self.cache_time_to_full.set(ttf);
        let stored = self.uploaded_bytes.get();
        if stored > 0 {
            self.compression_ratio
                .set(self.compressed_in_bytes.get() as f64 / stored as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_averages_over_sixty_seconds_and_forgets() {
        let mut w = Window::default();
        w.add(1000, 600);
        w.add(1000, 600);
        w.add(1030, 1200);
        assert_eq!(w.rate(1030), 2400.0 / 60.0);
        assert_eq!(w.rate(1059), 2400.0 / 60.0);
        assert_eq!(w.rate(1060), 1200.0 / 60.0, "the bucket of second 1000 left the window");
        assert_eq!(w.rate(1090), 0.0);
        assert!(w.buckets.is_empty());
    }

    #[tokio::test]
    async fn rpo_churn_and_time_to_full_follow_the_journal() {
        use crate::journal::{prepare, Journal};
        use crate::protocol::IngestRecord;
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let m = GatewayMetrics::new(&registry);
        m.rpo_threshold_seconds.set(0.5);
        let j = Journal::open(dir.path(), 100 << 20).unwrap();
        let d = j.register_disk("m", "disk0", 1 << 20, 1).await.unwrap();
        let refresh = |m: &GatewayMetrics, j: &Journal| {
            let (m, j) = (m.clone(), j.clone());
            std::thread::spawn(move || m.refresh(&j)).join().unwrap()
        };
        refresh(&m, &j);
        let rpo = |m: &GatewayMetrics| m.rpo_seconds.with_label_values(&["m", "disk0"]).get();
        assert_eq!(rpo(&m), 0.0);
        assert_eq!(m.machine_state.with_label_values(&["m", "initial-sync"]).get(), 1);
        assert_eq!(m.cache_time_to_full.get(), f64::INFINITY);

        let rec = prepare(
            IngestRecord::write("disk0", 0, bytes::Bytes::from(vec![7u8; 65536])),
            1 << 20,
        );
        j.commit("m", 1, 1, vec![rec]).await.unwrap();
        m.record_ingest("m", "disk0", 65536, 65536);
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        refresh(&m, &j);
        assert!(rpo(&m) >= 0.7, "rpo {}", rpo(&m));
        assert_eq!(m.rpo_exceeded.with_label_values(&["m", "disk0"]).get(), 1);
        assert_eq!(m.segments_pending.get(), 1);
        assert_eq!(m.pending_records.with_label_values(&["m", "disk0"]).get(), 1);
        let churn = m.churn.with_label_values(&["m", "disk0"]).get();
        assert_eq!(churn, 65536.0 / 60.0);
        let ttf = m.cache_time_to_full.get();
        let expected = ((100u64 << 20) - j.cache_used()) as f64 / churn;
        assert!((ttf - expected).abs() < 1.0, "ttf {ttf} expected {expected}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        refresh(&m, &j);
        assert!(rpo(&m) >= 1.0, "the RPO grows while nothing is uploaded: {}", rpo(&m));

        let plan = j.plan_segment(d.id, 1, 1).await.unwrap();
        j.segment_uploaded(plan, j.cache_used()).await.unwrap();
        m.record_drained(2 * 65536);
        refresh(&m, &j);
        assert_eq!(rpo(&m), 0.0);
        assert_eq!(m.rpo_exceeded.with_label_values(&["m", "disk0"]).get(), 0);
        assert_eq!(m.cache_time_to_full.get(), f64::INFINITY, "uploads keep up");

        m.note_held_back();
        refresh(&m, &j);
        assert_eq!(m.cache_time_to_full.get(), 0.0, "held back means full");
    }
}

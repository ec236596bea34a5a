//! Jobs: test failover, failover, failback and their follow-ups (clean-up, commit), run by the
//! config server over a recovery plan or a list of machines. Every state change is durable in
//! RocksDB before anyone can see it; after a restart a running job resumes at its current step
//! (steps are idempotent) and a paused one waits for `resume`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use gateway::consistency::Coordinator;
use gateway::events::{Events, Severity};
use gateway::journal::{Journal, CF_META};
use lifeboat_fs::blob_image::{write_image, BlobImageView, ImageFormat};
use lifeboat_fs::copy::{copy_view, CopyMode, CopyStats};
use lifeboat_fs::exports::PointExports;
use lifeboat_fs::overlay::Overlay;
use lifeboat_fs::pit::{PointInfo, Reader};
use lifeboat_fs::view::DiskView;
use rocksdb::WriteOptions;
use serde::{Deserialize, Serialize};

use crate::plans::{Plan, PlanError, PlanStep, Plans};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Writable copy-on-write NBD exports of the chosen point; replication keeps running.
    TestFailover,
    /// Discards a test failover's exports and overlays.
    TestFailoverCleanup,
    /// Materialises the chosen point to files or devices and stops replication.
    Failover,
    /// Makes a failover final.
    FailoverCommit,
    /// Writes the failed-over copy (or a point) back onto the on-premises disks, only the
    /// blocks that differ, then re-protects: replication resumes without a full copy.
    Failback,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::TestFailover => "test-failover",
            JobKind::TestFailoverCleanup => "test-failover-cleanup",
            JobKind::Failover => "failover",
            JobKind::FailoverCommit => "failover-commit",
            JobKind::Failback => "failback",
        }
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub kind: JobKind,
    /// A recovery plan to run ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// ... or these machines, as one step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// `latest` (default), `latest-app`, a point id, or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    /// Failover: write each disk to `DIR/MACHINE/DISK.img`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_dir: Option<PathBuf>,
    /// `MACHINE/DISK` → a file or block device: the failover target, or the on-premises disk a
    /// failback writes to.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, PathBuf>,
    /// Failover to the cloud: write each disk as one object `PREFIX/MACHINE/DISK.img` (or
    /// `.vhd`) in the appliance's blob storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_blob: Option<String>,
    /// With `target_blob`: `raw` (default) or `vhd` (a fixed VHD that Azure imports as a disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_format: Option<String>,
    /// Failback source: `failover-copy` (default; the files the failover wrote, with whatever
    /// ran on them since) or `point` (the chosen recovery point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Paused,
    Succeeded,
    Failed,
}

impl JobState {
    pub const ALL: [JobState; 4] = [
        JobState::Running,
        JobState::Paused,
        JobState::Succeeded,
        JobState::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

/// What a job did for one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineResult {
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub point_time: String,
    /// Test failover: the writable NBD exports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<String>,
    /// Failover / failback: the files or devices written, per disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, PathBuf>,
    /// Failover to blob storage: the image objects written, per disk.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blob_targets: BTreeMap<String, String>,
    #[serde(default)]
    pub blocks_compared: u64,
    #[serde(default)]
    pub blocks_written: u64,
    #[serde(default)]
    pub bytes_written: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStatus {
    pub step: String,
    /// `pending`, `running`, `done`, `paused` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub request: JobRequest,
    pub state: JobState,
    /// The next step to run.
    pub step: usize,
    pub steps: Vec<StepStatus>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub progress_done_bytes: u64,
    pub progress_total_bytes: u64,
    pub results: Vec<MachineResult>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The plan as it was when the job started (later edits do not change a running job).
    plan: Plan,
}

impl Job {
    pub fn finished(&self) -> bool {
        matches!(self.state, JobState::Succeeded | JobState::Failed)
    }
}

/// A machine after a failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    pub job: u64,
    pub point: u64,
    pub point_time: String,
    /// Disk → the file or device holding the failed-over copy.
    pub targets: BTreeMap<String, PathBuf>,
    /// Disk → the image object in blob storage holding it (failover to the cloud).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blob_targets: BTreeMap<String, String>,
    /// `raw` or `vhd`, for the blob images.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_format: String,
    pub committed: bool,
}

/// A machine under test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverRecord {
    pub job: u64,
    pub point: u64,
    pub disks: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

impl From<PlanError> for JobError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Unknown(_) => JobError::NotFound(e.to_string()),
            PlanError::Invalid { .. } => JobError::BadRequest(e.to_string()),
            PlanError::Store(_) => JobError::Internal(e.to_string()),
        }
    }
}

impl From<rocksdb::Error> for JobError {
    fn from(e: rocksdb::Error) -> Self {
        JobError::Internal(e.to_string())
    }
}

impl From<gateway::journal::JournalError> for JobError {
    fn from(e: gateway::journal::JournalError) -> Self {
        JobError::Internal(e.to_string())
    }
}

fn job_key(id: u64) -> Vec<u8> {
    format!("job/{id:016x}").into_bytes()
}

fn failover_key(machine: &str) -> Vec<u8> {
    format!("failover/{machine}").into_bytes()
}

fn test_failover_key(machine: &str) -> Vec<u8> {
    format!("test-failover/{machine}").into_bytes()
}

/// The export name of a disk under test failover.
pub fn test_failover_export(machine: &str, disk: &str) -> String {
    format!("{machine}/{disk}@test-failover")
}

/// A disk image file or block device as a read-only view (the failed-over copy a failback reads).
struct FileView {
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileView {
    fn open(path: &Path) -> io::Result<Self> {
        use std::io::Seek;
        let mut file = std::fs::File::open(path)?;
        let size = file.seek(io::SeekFrom::End(0))?;
        Ok(Self {
            file: Arc::new(file),
            size,
        })
    }
}

impl DiskView for FileView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, len: usize) -> BoxFuture<'_, io::Result<Bytes>> {
        let file = self.file.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Bytes::from(buf))
            })
            .await
            .map_err(io::Error::other)?
        })
    }
}

/// Job state counts for `/metrics`.
pub struct JobMetrics {
    pub jobs: prometheus::IntGaugeVec,
    pub failed_over: prometheus::IntGaugeVec,
}

impl JobMetrics {
    pub fn register(registry: &prometheus::Registry) -> Self {
        let jobs = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "lifeboat_jobs",
                "Jobs (failover, test failover, failback) by kind and state.",
            ),
            &["kind", "state"],
        )
        .expect("metric");
        registry.register(Box::new(jobs.clone())).expect("register");
        let failed_over = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "lifeboat_machine_failed_over",
                "1 while a machine is failed over (replication stopped), else 0.",
            ),
            &["machine"],
        )
        .expect("metric");
        registry.register(Box::new(failed_over.clone())).expect("register");
        Self { jobs, failed_over }
    }
}

/// A running job's (done, total) bytes, shared with its copies.
type Progress = (Arc<AtomicU64>, Arc<AtomicU64>);

/// The job runner and the durable records of failovers and test failovers.
pub struct Jobs {
    journal: Journal,
    reader: Arc<Reader>,
    exports: Arc<PointExports>,
    coordinator: Arc<Coordinator>,
    events: Events,
    plans: Plans,
    data_dir: PathBuf,
    metrics: JobMetrics,
    next_id: AtomicU64,
    /// Machine → the unfinished job that holds it.
    busy: Mutex<HashMap<String, u64>>,
    /// Live progress of running jobs: (done, total) bytes.
    progress: Mutex<HashMap<u64, Progress>>,
    /// Serialises read-modify-write of job records.
    write: tokio::sync::Mutex<()>,
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

fn now_ms() -> u64 {
    gateway::journal::now_ms()
}

impl Jobs {
    /// Loads jobs and records, re-opens test-failover exports, and resumes jobs that were
    /// running when the appliance stopped.
    pub async fn start(
        journal: Journal,
        reader: Arc<Reader>,
        exports: Arc<PointExports>,
        coordinator: Arc<Coordinator>,
        events: Events,
        data_dir: PathBuf,
        metrics: JobMetrics,
    ) -> anyhow::Result<Arc<Self>> {
        let jobs = Arc::new(Self {
            plans: Plans::new(journal.clone()),
            journal,
            reader,
            exports,
            coordinator,
            events,
            data_dir,
            metrics,
            next_id: AtomicU64::new(1),
            busy: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            write: tokio::sync::Mutex::new(()),
        });
        let me = jobs.clone();
        let list = tokio::task::spawn_blocking(move || me.list_blocking()).await??;
        let next = list.iter().map(|j| j.id).max().unwrap_or(0) + 1;
        jobs.next_id.store(next, Ordering::SeqCst);
        for job in &list {
            if !job.finished() {
                let mut busy = jobs.busy.lock().expect("lock");
                for m in job.plan.machines() {
                    busy.insert(m, job.id);
                }
            }
        }
        let me = jobs.clone();
        let tests = tokio::task::spawn_blocking(move || me.test_failovers()).await??;
        for (machine, rec) in tests {
            if let Err(e) = jobs.open_test_failover(&machine, &rec).await {
                tracing::error!(machine, error = %e, "could not re-open a test failover's exports");
            }
        }
        for job in list {
            if job.state == JobState::Running {
                tracing::info!(job = job.id, step = job.step, "resuming a job interrupted by a restart");
                jobs.spawn(job.id);
            }
        }
        jobs.refresh_metrics().await;
        Ok(jobs)
    }

    pub fn plans(&self) -> &Plans {
        &self.plans
    }

    fn list_blocking(&self) -> Result<Vec<Job>, JobError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"job/") {
            let (k, v) = item?;
            if !k.starts_with(b"job/") {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(|e| JobError::Internal(format!("job record: {e}")))?);
        }
        Ok(out)
    }

    fn records<T: serde::de::DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<(String, T)>, JobError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, prefix) {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                serde_json::from_slice(&v).map_err(|e| JobError::Internal(format!("record: {e}")))?,
            ));
        }
        Ok(out)
    }

    /// Machines failed over, with their records (blocking).
    pub fn failovers(&self) -> Result<Vec<(String, FailoverRecord)>, JobError> {
        self.records(b"failover/")
    }

    /// Machines under test failover (blocking).
    pub fn test_failovers(&self) -> Result<Vec<(String, TestFailoverRecord)>, JobError> {
        self.records(b"test-failover/")
    }

    fn get_record<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, JobError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match db.get_cf(meta, key)? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| JobError::Internal(format!("record: {e}")))?,
            )),
            None => Ok(None),
        }
    }

    fn put_record(&self, key: &[u8], value: Option<&impl Serialize>) -> Result<(), JobError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match value {
            Some(v) => db.put_cf_opt(meta, key, serde_json::to_vec(v).expect("json"), &synced())?,
            None => db.delete_cf_opt(meta, key, &synced())?,
        }
        Ok(())
    }

    /// Every job, newest first, with live progress.
    pub async fn list(self: &Arc<Self>) -> Result<Vec<Job>, JobError> {
        let me = self.clone();
        let mut list = tokio::task::spawn_blocking(move || me.list_blocking())
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        list.reverse();
        for j in &mut list {
            self.live(j);
        }
        Ok(list)
    }

    fn live(&self, job: &mut Job) {
        if let Some((done, total)) = self.progress.lock().expect("lock").get(&job.id) {
            job.progress_done_bytes = done.load(Ordering::Relaxed);
            job.progress_total_bytes = total.load(Ordering::Relaxed);
        }
    }

    pub async fn get(self: &Arc<Self>, id: u64) -> Result<Job, JobError> {
        let me = self.clone();
        let mut job = tokio::task::spawn_blocking(move || me.get_record::<Job>(&job_key(id)))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??
            .ok_or_else(|| JobError::NotFound(format!("no job {id}")))?;
        self.live(&mut job);
        Ok(job)
    }

    async fn save(self: &Arc<Self>, job: &Job) -> Result<(), JobError> {
        let me = self.clone();
        let job = job.clone();
        tokio::task::spawn_blocking(move || me.put_record(&job_key(job.id), Some(&job)))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        self.refresh_metrics().await;
        Ok(())
    }

    async fn refresh_metrics(self: &Arc<Self>) {
        let me = self.clone();
        let Ok(Ok((jobs, failovers))) =
            tokio::task::spawn_blocking(move || Ok::<_, JobError>((me.list_blocking()?, me.failovers()?))).await
        else {
            return;
        };
        let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
        for j in &jobs {
            *counts.entry((j.request.kind.name(), j.state.name())).or_default() += 1;
        }
        for kind in [
            JobKind::TestFailover,
            JobKind::TestFailoverCleanup,
            JobKind::Failover,
            JobKind::FailoverCommit,
            JobKind::Failback,
        ] {
            for state in JobState::ALL {
                let n = counts.get(&(kind.name(), state.name())).copied().unwrap_or(0);
                self.metrics.jobs.with_label_values(&[kind.name(), state.name()]).set(n);
            }
        }
        self.metrics.failed_over.reset();
        for m in self.reader.machines() {
            let failed = failovers.iter().any(|(f, _)| *f == m);
            self.metrics.failed_over.with_label_values(&[&m]).set(failed as i64);
        }
    }

    /// Checks a request, records the job and starts it. 404 for unknown machines or plans, 409
    /// when a machine is held by another unfinished job or is in the wrong state.
    pub async fn submit(self: &Arc<Self>, request: JobRequest) -> Result<Job, JobError> {
        let me = self.clone();
        let req = request.clone();
        let plan = tokio::task::spawn_blocking(move || me.plan_for(&req))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let machines = plan.machines();
        for m in &machines {
            if self.reader.disks(m).is_empty() {
                return Err(JobError::NotFound(format!("unknown machine {m:?}")));
            }
        }
        let me = self.clone();
        let (req, ms) = (request.clone(), machines.clone());
        tokio::task::spawn_blocking(move || me.check_states(&req, &ms))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let _w = self.write.lock().await;
        let id = {
            let mut busy = self.busy.lock().expect("lock");
            if let Some((m, other)) = machines.iter().find_map(|m| busy.get(m).map(|j| (m, *j))) {
                return Err(JobError::Conflict(format!(
                    "machine {m:?} is busy with job {other}; wait for it (or resume / let it fail) first"
                )));
            }
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            for m in &machines {
                busy.insert(m.clone(), id);
            }
            id
        };
        let now = now_ms();
        let job = Job {
            id,
            steps: plan
                .steps
                .iter()
                .map(|s| StepStatus {
                    step: step_name(s),
                    state: "pending".into(),
                    message: String::new(),
                })
                .collect(),
            request,
            state: JobState::Running,
            step: 0,
            created_ms: now,
            updated_ms: now,
            progress_done_bytes: 0,
            progress_total_bytes: 0,
            results: Vec::new(),
            error: String::new(),
            plan,
        };
        if let Err(e) = self.save(&job).await {
            self.release(&job);
            return Err(e);
        }
        let _ = self
            .post(
                Severity::Info,
                "job-started",
                "",
                format!("job {id} ({}) started", job.request.kind.name()),
            )
            .await;
        self.spawn(id);
        Ok(job)
    }

    fn plan_for(&self, req: &JobRequest) -> Result<Plan, JobError> {
        match (&req.plan, req.machines.is_empty()) {
            (Some(name), true) => Ok(self.plans.get(name)?),
            (None, false) => {
                let plan = Plan {
                    steps: vec![PlanStep::Machines {
                        machines: req.machines.clone(),
                    }],
                };
                plan.validate()?;
                Ok(plan)
            }
            _ => Err(JobError::BadRequest("give either plan or machines".into())),
        }
    }

    /// The state checks of a request (blocking).
    fn check_states(&self, req: &JobRequest, machines: &[String]) -> Result<(), JobError> {
        for m in machines {
            let failover: Option<FailoverRecord> = self.get_record(&failover_key(m))?;
            let test: Option<TestFailoverRecord> = self.get_record(&test_failover_key(m))?;
            match req.kind {
                JobKind::TestFailover if test.is_some() => {
                    return Err(JobError::Conflict(format!(
                        "{m:?} is already under test failover; clean it up first"
                    )))
                }
                JobKind::TestFailoverCleanup if test.is_none() => {
                    return Err(JobError::Conflict(format!("{m:?} is not under test failover")))
                }
                JobKind::Failover if failover.is_some() => {
                    return Err(JobError::Conflict(format!("{m:?} is already failed over")))
                }
                JobKind::FailoverCommit | JobKind::Failback if failover.is_none() => {
                    return Err(JobError::Conflict(format!("{m:?} is not failed over")))
                }
                JobKind::FailoverCommit if failover.as_ref().is_some_and(|f| f.committed) => {
                    return Err(JobError::Conflict(format!("{m:?}'s failover is already committed")))
                }
                _ => {}
            }
            let disks = self.reader.disks(m);
            match req.kind {
                JobKind::Failover if req.target_blob.is_some() => {
                    blob_image_target(req)?;
                }
                JobKind::Failover if req.target_dir.is_none() => {
                    for d in &disks {
                        if !req.targets.contains_key(&format!("{m}/{}", d.disk)) {
                            return Err(JobError::BadRequest(format!(
                                "targets: no target for {m}/{} (give target_dir, targets or target_blob)",
                                d.disk
                            )));
                        }
                    }
                }
                JobKind::Failback => {
                    for d in &disks {
                        if !req.targets.contains_key(&format!("{m}/{}", d.disk)) {
                            return Err(JobError::BadRequest(format!(
                                "targets: no on-premises disk for {m}/{}",
                                d.disk
                            )));
                        }
                    }
                    match req.source.as_deref() {
                        None | Some("failover-copy") | Some("point") => {}
                        Some(other) => {
                            return Err(JobError::BadRequest(format!(
                                "source: {other:?} is neither failover-copy nor point"
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn release(&self, job: &Job) {
        let mut busy = self.busy.lock().expect("lock");
        busy.retain(|_, j| *j != job.id);
    }

    /// Resumes a paused job.
    pub async fn resume(self: &Arc<Self>, id: u64) -> Result<Job, JobError> {
        let _w = self.write.lock().await;
        let mut job = self.get(id).await?;
        if job.state != JobState::Paused {
            return Err(JobError::Conflict(format!(
                "job {id} is {}, not paused",
                job.state.name()
            )));
        }
        if let Some(s) = job.steps.get_mut(job.step) {
            s.state = "done".into();
        }
        job.step += 1;
        job.state = JobState::Running;
        job.updated_ms = now_ms();
        self.save(&job).await?;
        drop(_w);
        self.spawn(id);
        Ok(job)
    }

    fn spawn(self: &Arc<Self>, id: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.run(id).await {
                tracing::error!(job = id, error = %e, "job runner");
            }
        });
    }

    async fn post(
        &self,
        severity: Severity,
        kind: &'static str,
        machine: &str,
        message: String,
    ) -> Result<(), JobError> {
        self.events.post_async(severity, kind, machine, message).await?;
        Ok(())
    }

    /// Runs a job's steps from its current one until it pauses, fails or ends.
    async fn run(self: &Arc<Self>, id: u64) -> Result<(), JobError> {
        let done = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        self.progress
            .lock()
            .expect("lock")
            .insert(id, (done.clone(), total.clone()));
        let mut job = self.get(id).await?;
        while job.step < job.plan.steps.len() && job.state == JobState::Running {
            let step = job.plan.steps[job.step].clone();
            job.steps[job.step].state = "running".into();
            job.updated_ms = now_ms();
            self.save(&job).await?;
            let outcome = match &step {
                PlanStep::Machines { machines } => self.machines_step(&mut job, machines, &done, &total).await,
                PlanStep::Script { command, timeout } => self.script_step(&job, command, timeout.as_deref()).await,
                PlanStep::Pause { message } => {
                    job.state = JobState::Paused;
                    job.steps[job.step].state = "paused".into();
                    job.steps[job.step].message = message.clone();
                    job.updated_ms = now_ms();
                    self.save(&job).await?;
                    self.post(
                        Severity::Info,
                        "job-paused",
                        "",
                        format!("job {id} paused: {message} (resume it to go on)"),
                    )
                    .await?;
                    self.progress.lock().expect("lock").remove(&id);
                    return Ok(());
                }
            };
            job.progress_done_bytes = done.load(Ordering::Relaxed);
            job.progress_total_bytes = total.load(Ordering::Relaxed);
            job.updated_ms = now_ms();
            match outcome {
                Ok(message) => {
                    job.steps[job.step].state = "done".into();
                    job.steps[job.step].message = message;
                    job.step += 1;
                }
                Err(e) => {
                    job.steps[job.step].state = "failed".into();
                    job.steps[job.step].message = e.to_string();
                    job.state = JobState::Failed;
                    job.error = format!("step {} ({}): {e}", job.step + 1, job.steps[job.step].step);
                }
            }
            self.save(&job).await?;
        }
        if job.state == JobState::Running {
            job.state = JobState::Succeeded;
            job.updated_ms = now_ms();
            self.save(&job).await?;
            self.post(
                Severity::Info,
                "job-succeeded",
                "",
                format!("job {id} ({}) succeeded", job.request.kind.name()),
            )
            .await?;
        } else if job.state == JobState::Failed {
            self.post(
                Severity::Error,
                "job-failed",
                "",
                format!("job {id} ({}) failed: {}", job.request.kind.name(), job.error),
            )
            .await?;
        }
        self.release(&job);
        self.progress.lock().expect("lock").remove(&id);
        self.refresh_metrics().await;
        Ok(())
    }

    async fn script_step(&self, job: &Job, command: &str, timeout: Option<&str>) -> Result<String, JobError> {
        let limit = timeout
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(600));
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .env("LIFEBOAT_JOB_ID", job.id.to_string())
            .env("LIFEBOAT_JOB_KIND", job.request.kind.name())
            .env("LIFEBOAT_PLAN", job.request.plan.clone().unwrap_or_default())
            .env("LIFEBOAT_MACHINES", job.plan.machines().join(","))
            .env("LIFEBOAT_STEP", (job.step + 1).to_string())
            .env("LIFEBOAT_RESULTS", serde_json::to_string(&job.results).expect("json"))
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .map_err(|_| JobError::Internal(format!("script {command:?} ran longer than {limit:?}")))?
            .map_err(|e| JobError::Internal(format!("script {command:?}: {e}")))?;
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b);
            let s = s.trim();
            s[s.len().saturating_sub(500)..].to_string()
        };
        if !out.status.success() {
            return Err(JobError::Internal(format!(
                "script {command:?} failed ({}): {}",
                out.status,
                tail(&out.stderr)
            )));
        }
        Ok(tail(&out.stdout))
    }

    /// Resolves the point each machine of a step uses. Members of one replication group get
    /// the newest point id they all share (group points carry one id across members).
    fn resolve_points(&self, machines: &[String], selector: &str) -> Result<BTreeMap<String, PointInfo>, JobError> {
        let not_found = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => JobError::NotFound(e.to_string()),
            io::ErrorKind::InvalidInput => JobError::BadRequest(e.to_string()),
            _ => JobError::Internal(e.to_string()),
        };
        let groups = self.coordinator.groups();
        let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in machines {
            let g = groups
                .group_of(m)
                .map_err(|e| JobError::Internal(e.to_string()))?
                .unwrap_or_default();
            by_group.entry(g).or_default().push(m.clone());
        }
        let mut out = BTreeMap::new();
        for (group, members) in by_group {
            let shared = !group.is_empty() && members.len() > 1;
            if !shared || (selector != "latest" && selector != "latest-app") {
                for m in &members {
                    let p = if selector == "latest-app" {
                        self.reader
                            .points(m)
                            .map_err(not_found)?
                            .into_iter()
                            .find(|p| p.readable && p.kind == "app-consistent")
                            .ok_or_else(|| JobError::NotFound(format!("{m} has no readable app-consistent point")))?
                    } else {
                        self.reader.resolve(m, selector).map_err(not_found)?
                    };
                    out.insert(m.clone(), p);
                }
                continue;
            }
            // The newest id readable on every member.
            let mut lists = Vec::new();
            for m in &members {
                lists.push(self.reader.points(m).map_err(not_found)?);
            }
            let candidate = lists[0].iter().find(|p| {
                p.readable
                    && (selector == "latest" || p.kind == "app-consistent")
                    && lists[1..].iter().all(|l| l.iter().any(|q| q.id == p.id && q.readable))
            });
            let Some(c) = candidate else {
                return Err(JobError::NotFound(format!(
                    "replication group {group:?} has no {} point shared by {members:?}",
                    if selector == "latest" {
                        "readable"
                    } else {
                        "app-consistent"
                    }
                )));
            };
            for (m, l) in members.iter().zip(&lists) {
                let p = l.iter().find(|q| q.id == c.id).expect("shared").clone();
                out.insert(m.clone(), p);
            }
        }
        Ok(out)
    }

    async fn machines_step(
        self: &Arc<Self>,
        job: &mut Job,
        machines: &[String],
        done: &Arc<AtomicU64>,
        total: &Arc<AtomicU64>,
    ) -> Result<String, JobError> {
        let kind = job.request.kind;
        let needs_point = matches!(kind, JobKind::TestFailover | JobKind::Failover)
            || (kind == JobKind::Failback && job.request.source.as_deref() == Some("point"));
        let points = if needs_point {
            let me = self.clone();
            let (ms, sel) = (
                machines.to_vec(),
                job.request.point.clone().unwrap_or_else(|| "latest".into()),
            );
            tokio::task::spawn_blocking(move || me.resolve_points(&ms, &sel))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))??
        } else {
            BTreeMap::new()
        };
        let step_bytes: u64 = machines.iter().flat_map(|m| self.reader.disks(m)).map(|d| d.size).sum();
        if matches!(kind, JobKind::Failover | JobKind::Failback) {
            total.fetch_add(step_bytes, Ordering::Relaxed);
        }
        let mut lines = Vec::new();
        for m in machines {
            let result = match kind {
                JobKind::TestFailover => self.test_failover(job.id, m, &points[m]).await?,
                JobKind::TestFailoverCleanup => self.test_failover_cleanup(m).await?,
                JobKind::Failover => self.failover(job, m, &points[m], done).await?,
                JobKind::FailoverCommit => self.failover_commit(m).await?,
                JobKind::Failback => self.failback(job, m, points.get(m), done).await?,
            };
            lines.push(match kind {
                JobKind::TestFailover => format!(
                    "{m}: point {} → {}",
                    result.point.unwrap_or(0),
                    result.exports.join(", ")
                ),
                JobKind::Failback => format!(
                    "{m}: {} of {} blocks differed and were written",
                    result.blocks_written, result.blocks_compared
                ),
                JobKind::Failover => format!("{m}: point {}", result.point.unwrap_or(0)),
                _ => format!("{m}: done"),
            });
            job.results.retain(|r| r.machine != *m);
            job.results.push(result);
            self.save(job).await?;
        }
        Ok(lines.join("; "))
    }

    fn overlay_dir(&self, machine: &str, disk: &str) -> PathBuf {
        self.data_dir.join("test-failover").join(machine).join(disk)
    }

    async fn open_test_failover(&self, machine: &str, rec: &TestFailoverRecord) -> Result<Vec<String>, JobError> {
        let reader = self.reader.clone();
        let (m, id) = (machine.to_owned(), rec.point);
        let point = tokio::task::spawn_blocking(move || reader.resolve(&m, &id.to_string()))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| JobError::Internal(e.to_string()))?;
        let mut names = Vec::new();
        for disk in &rec.disks {
            let view = self
                .reader
                .view(machine, disk, &point)
                .map_err(|e| JobError::Internal(e.to_string()))?;
            let dir = self.overlay_dir(machine, disk);
            let overlay = tokio::task::spawn_blocking(move || Overlay::open(&dir, Arc::new(view)))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))?
                .map_err(|e| JobError::Internal(format!("overlay of {machine}/{disk}: {e}")))?;
            let name = test_failover_export(machine, disk);
            self.exports.add_overlay(name.clone(), overlay);
            names.push(name);
        }
        Ok(names)
    }

    async fn test_failover(
        self: &Arc<Self>,
        job: u64,
        machine: &str,
        point: &PointInfo,
    ) -> Result<MachineResult, JobError> {
        let rec = TestFailoverRecord {
            job,
            point: point.id,
            disks: self.reader.disks(machine).into_iter().map(|d| d.disk).collect(),
        };
        // Record first: a restart in between re-opens (creates) the overlays.
        let me = self.clone();
        let (m, r) = (machine.to_owned(), rec.clone());
        tokio::task::spawn_blocking(move || me.put_record(&test_failover_key(&m), Some(&r)))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let exports = self.open_test_failover(machine, &rec).await?;
        self.post(
            Severity::Info,
            "test-failover-started",
            machine,
            format!(
                "test failover of {machine} at point {}: {}",
                point.id,
                exports.join(", ")
            ),
        )
        .await?;
        Ok(MachineResult {
            machine: machine.into(),
            point: Some(point.id),
            point_time: point.time.clone(),
            exports,
            ..Default::default()
        })
    }

    async fn test_failover_cleanup(self: &Arc<Self>, machine: &str) -> Result<MachineResult, JobError> {
        let me = self.clone();
        let m = machine.to_owned();
        let rec: Option<TestFailoverRecord> =
            tokio::task::spawn_blocking(move || me.get_record(&test_failover_key(&m)))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))??;
        let Some(rec) = rec else {
            // Already cleaned up (a resumed job): nothing left to do.
            return Ok(MachineResult {
                machine: machine.into(),
                ..Default::default()
            });
        };
        for disk in &rec.disks {
            self.exports.remove_overlay(&test_failover_export(machine, disk));
            let dir = self.overlay_dir(machine, disk);
            tokio::task::spawn_blocking(move || lifeboat_fs::overlay::discard(&dir))
                .await
                .map_err(|e| JobError::Internal(e.to_string()))?
                .map_err(|e| JobError::Internal(format!("discarding the overlay of {machine}/{disk}: {e}")))?;
        }
        let me = self.clone();
        let m = machine.to_owned();
        tokio::task::spawn_blocking(move || me.put_record(&test_failover_key(&m), None::<&TestFailoverRecord>))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        self.post(
            Severity::Info,
            "test-failover-cleaned-up",
            machine,
            format!("test failover of {machine} cleaned up"),
        )
        .await?;
        Ok(MachineResult {
            machine: machine.into(),
            point: Some(rec.point),
            ..Default::default()
        })
    }

    fn target_of(req: &JobRequest, machine: &str, disk: &str) -> Option<PathBuf> {
        req.targets.get(&format!("{machine}/{disk}")).cloned().or_else(|| {
            req.target_dir
                .as_ref()
                .map(|d| d.join(machine).join(format!("{disk}.img")))
        })
    }

    async fn failover(
        self: &Arc<Self>,
        job: &Job,
        machine: &str,
        point: &PointInfo,
        done: &Arc<AtomicU64>,
    ) -> Result<MachineResult, JobError> {
        // Stop replication first: the failed-over copy is where the machine lives from now on.
        let co = self.coordinator.clone();
        let (m, why) = (machine.to_owned(), format!("failed over by job {}", job.id));
        tokio::task::spawn_blocking(move || co.stop_replication(&m, &why))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let mut result = MachineResult {
            machine: machine.into(),
            point: Some(point.id),
            point_time: point.time.clone(),
            ..Default::default()
        };
        let blob_target = match &job.request.target_blob {
            Some(_) => Some(blob_image_target(&job.request)?),
            None => None,
        };
        for d in self.reader.disks(machine) {
            if let Some((prefix, format)) = &blob_target {
                let path = format!("{prefix}/{machine}/{}.{}", d.disk, format.extension());
                let view = self
                    .reader
                    .view(machine, &d.disk, point)
                    .map_err(|e| JobError::Internal(e.to_string()))?;
                let base = done.load(Ordering::Relaxed);
                let stats = write_blob_image(
                    Arc::new(view),
                    self.reader.store().clone(),
                    path.clone(),
                    *format,
                    done.clone(),
                    base,
                )
                .await
                .map_err(|e| JobError::Internal(format!("writing {path} to blob storage: {e}")))?;
                done.store(base + d.size, Ordering::Relaxed);
                result.bytes_written += stats.bytes_written;
                result.blocks_written += stats.blocks_written;
                result.blob_targets.insert(d.disk.clone(), path);
                continue;
            }
            let target = Self::target_of(&job.request, machine, &d.disk).expect("checked at submit");
            if let Some(parent) = target.parent().map(Path::to_owned) {
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&parent)
                        .map_err(|e| JobError::Internal(format!("creating {}: {e}", parent.display())))
                })
                .await
                .map_err(|e| JobError::Internal(e.to_string()))??;
            }
            let view = self
                .reader
                .view(machine, &d.disk, point)
                .map_err(|e| JobError::Internal(e.to_string()))?;
            let base = done.load(Ordering::Relaxed);
            let stats = copy_boxed(Arc::new(view), target.clone(), CopyMode::Full, done.clone(), base)
                .await
                .map_err(|e| JobError::Internal(format!("writing {}: {e}", target.display())))?;
            done.store(base + d.size, Ordering::Relaxed);
            result.bytes_written += stats.bytes_written;
            result.blocks_written += stats.blocks_written;
            result.targets.insert(d.disk.clone(), target);
        }
        let rec = FailoverRecord {
            job: job.id,
            point: point.id,
            point_time: point.time.clone(),
            targets: result.targets.clone(),
            blob_targets: result.blob_targets.clone(),
            image_format: blob_target.map(|(_, f)| f.name().to_string()).unwrap_or_default(),
            committed: false,
        };
        let me = self.clone();
        let m = machine.to_owned();
        tokio::task::spawn_blocking(move || me.put_record(&failover_key(&m), Some(&rec)))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        self.post(
            Severity::Warning,
            "failed-over",
            machine,
            format!(
                "{machine} failed over to point {} ({}); replication stopped",
                point.id, point.time
            ),
        )
        .await?;
        Ok(result)
    }

    async fn failover_commit(self: &Arc<Self>, machine: &str) -> Result<MachineResult, JobError> {
        let me = self.clone();
        let m = machine.to_owned();
        let point = tokio::task::spawn_blocking(move || {
            let mut rec: FailoverRecord = me
                .get_record(&failover_key(&m))?
                .ok_or_else(|| JobError::Conflict(format!("{m:?} is not failed over")))?;
            rec.committed = true;
            me.put_record(&failover_key(&m), Some(&rec))?;
            Ok::<_, JobError>(rec.point)
        })
        .await
        .map_err(|e| JobError::Internal(e.to_string()))??;
        self.post(
            Severity::Info,
            "failover-committed",
            machine,
            format!("failover of {machine} committed"),
        )
        .await?;
        Ok(MachineResult {
            machine: machine.into(),
            point: Some(point),
            ..Default::default()
        })
    }

    async fn failback(
        self: &Arc<Self>,
        job: &Job,
        machine: &str,
        point: Option<&PointInfo>,
        done: &Arc<AtomicU64>,
    ) -> Result<MachineResult, JobError> {
        let me = self.clone();
        let m = machine.to_owned();
        let rec: Option<FailoverRecord> = tokio::task::spawn_blocking(move || me.get_record(&failover_key(&m)))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))??;
        let mut result = MachineResult {
            machine: machine.into(),
            ..Default::default()
        };
        if let Some(rec) = &rec {
            for d in self.reader.disks(machine) {
                let target = Self::target_of(&job.request, machine, &d.disk).expect("checked at submit");
                let source: Arc<dyn DiskView> = match point {
                    Some(p) => {
                        result.point = Some(p.id);
                        result.point_time = p.time.clone();
                        Arc::new(
                            self.reader
                                .view(machine, &d.disk, p)
                                .map_err(|e| JobError::Internal(e.to_string()))?,
                        )
                    }
                    None => {
                        result.point = Some(rec.point);
                        result.point_time = rec.point_time.clone();
                        if let Some(object) = rec.blob_targets.get(&d.disk) {
                            let format = ImageFormat::parse(&rec.image_format).unwrap_or(ImageFormat::Raw);
                            let view = BlobImageView::open(
                                self.reader.store().clone(),
                                object_store::path::Path::from(object.as_str()),
                                format,
                            )
                            .await
                            .map_err(|e| JobError::Internal(format!("opening the failed-over image {object}: {e}")))?;
                            Arc::new(view) as Arc<dyn DiskView>
                        } else {
                            let copy = rec.targets.get(&d.disk).ok_or_else(|| {
                                JobError::Internal(format!("the failover of {machine} wrote no copy of {}", d.disk))
                            })?;
                            let copy = copy.clone();
                            let view = tokio::task::spawn_blocking(move || {
                                FileView::open(&copy).map_err(|e| {
                                    JobError::Internal(format!("opening the failed-over copy {}: {e}", copy.display()))
                                })
                            })
                            .await
                            .map_err(|e| JobError::Internal(e.to_string()))??;
                            Arc::new(view)
                        }
                    }
                };
                let base = done.load(Ordering::Relaxed);
                let stats = copy_boxed(source, target.clone(), CopyMode::Differential, done.clone(), base)
                    .await
                    .map_err(|e| JobError::Internal(format!("writing back {}: {e}", target.display())))?;
                done.store(base + d.size, Ordering::Relaxed);
                result.blocks_compared += stats.blocks_compared;
                result.blocks_written += stats.blocks_written;
                result.bytes_written += stats.bytes_written;
                result.targets.insert(d.disk.clone(), target);
            }
        }
        // Re-protect: the agent's next sync compares the disk with the checksums the process
        // server holds and sends only what differs.
        let me = self.clone();
        let m = machine.to_owned();
        tokio::task::spawn_blocking(move || {
            me.coordinator.resume_replication(&m)?;
            me.put_record(&failover_key(&m), None::<&FailoverRecord>)
        })
        .await
        .map_err(|e| JobError::Internal(e.to_string()))??;
        self.post(
            Severity::Info,
            "failed-back",
            machine,
            format!(
                "{machine} failed back ({} of {} blocks written); replication resumed",
                result.blocks_written, result.blocks_compared
            ),
        )
        .await?;
        Ok(result)
    }
}

/// `copy_view` with its progress added to the job's running total from `base`, as a boxed
/// future: the job runner's future stays `Send` provable (rustc cannot see through the copy's
/// stream of async blocks otherwise).
/// [`write_image`] boxed, for the same reason as [`copy_boxed`].
fn write_blob_image(
    view: Arc<dyn DiskView>,
    store: Arc<dyn object_store::ObjectStore>,
    path: String,
    format: ImageFormat,
    done: Arc<AtomicU64>,
    base: u64,
) -> BoxFuture<'static, io::Result<CopyStats>> {
    Box::pin(async move {
        let path = object_store::path::Path::from(path.as_str());
        write_image(view, store.as_ref(), &path, format, move |n, _| {
            done.store(base + n, Ordering::Relaxed)
        })
        .await
    })
}

/// The checked prefix and format of a failover to blob storage. The prefix must not reach into
/// the appliance's own objects (`machines/`, the keyring).
fn blob_image_target(req: &JobRequest) -> Result<(String, ImageFormat), JobError> {
    let prefix = req.target_blob.as_deref().unwrap_or_default().trim_matches('/');
    let ok = !prefix.is_empty()
        && prefix.split('/').all(gateway::server::valid_name)
        && !["machines", "keyring.json"].contains(&prefix.split('/').next().unwrap_or_default());
    if !ok {
        return Err(JobError::BadRequest(format!(
            "target_blob: {prefix:?} is not a usable prefix (names of letters, digits, '-', '_', '.', \
             separated by '/'; not under machines/)"
        )));
    }
    let format = match req.image_format.as_deref() {
        None => ImageFormat::Raw,
        Some(f) => ImageFormat::parse(f)
            .ok_or_else(|| JobError::BadRequest(format!("image_format: {f:?} is neither raw nor vhd")))?,
    };
    Ok((prefix.to_string(), format))
}

fn copy_boxed(
    view: Arc<dyn DiskView>,
    target: PathBuf,
    mode: CopyMode,
    done: Arc<AtomicU64>,
    base: u64,
) -> BoxFuture<'static, io::Result<CopyStats>> {
    Box::pin(async move { copy_view(view, &target, mode, move |n, _| done.store(base + n, Ordering::Relaxed)).await })
}

fn step_name(s: &PlanStep) -> String {
    match s {
        PlanStep::Machines { machines } => format!("machines {}", machines.join(", ")),
        PlanStep::Script { command, .. } => format!("script {command:?}"),
        PlanStep::Pause { message } => format!("pause {message:?}"),
    }
}

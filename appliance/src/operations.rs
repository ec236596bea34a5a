//! The management API's operations: replication groups, recovery plans, jobs (test failover,
//! failover, commit, failback), events, and asking agents for an app-consistent point now.
//! Same authentication and error shape as the rest of the API (see `management`).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/agents` | registered agents: version, registered, last seen |
//! | GET | `/api/process-servers` | process servers (the local one and scale-out ones): state, cache, machines |
//! | POST | `/api/process-servers/register` | a scale-out process server registers (`Registration`, with the passphrase) → `{name, token}` |
//! | PUT | `/api/process-servers/NAME/heartbeat` | its heartbeat (`Heartbeat`, its own bearer token) → the machines assigned to it |
//! | PUT | `/api/machines/M/process-server` | `{process_server}`: M's agent is sent there from now on (`local` = this appliance) |
//! | GET | `/api/groups` | replication groups |
//! | PUT / DELETE | `/api/groups/NAME` | `{machines, policy}` (409: a machine is in another group) |
//! | GET | `/api/plans` | recovery plans |
//! | PUT / DELETE | `/api/plans/NAME` | `{steps: [{type: machines|script|pause, ...}]}` |
//! | GET / POST | `/api/jobs` | jobs, newest first / start one (`JobRequest`; 202) |
//! | GET | `/api/jobs/ID` | one job, with live progress |
//! | POST | `/api/jobs/ID/resume` | resume a paused job |
//! | GET | `/api/events?after=ID&limit=N&machine=M` | the event log, oldest first |
//! | POST | `/api/machines/M/resync` | mark M resync-required (202); its next sync compares every block |
//! | POST | `/api/machines/M/bookmark` | ask M's agent (its group's agents) for an app-consistent point |

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use gateway::consistency::Coordinator;
use gateway::events::{Event, Events, Severity};
use gateway::groups::{Group, NamedGroup};
use gateway::process_servers::{Heartbeat, HeartbeatAnswer, ProcessServerError, Registration, LOCAL};
use gateway::server::ErrorBody;
use serde::{Deserialize, Serialize};

use crate::jobs::{Job, JobError, JobRequest, Jobs};
use crate::management::{authorize, error, policy_error, ApiResult, ManagementState};
use crate::plans::{NamedPlan, Plan, PlanError};

/// What the operations need from the running appliance.
pub struct Operations {
    pub jobs: Arc<Jobs>,
    pub coordinator: Arc<Coordinator>,
    pub events: Events,
    pub ingest: Arc<gateway::server::IngestState>,
    /// The replication address agents use (this appliance's process server).
    pub replication_address: String,
}

/// A process server and the machines it serves.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessServerInfo {
    pub name: String,
    pub address: String,
    /// This appliance's own process server.
    pub local: bool,
    /// `ok`, or `unreachable` when three heartbeats (at least 3 s) were missed.
    pub state: String,
    pub version: String,
    pub last_seen_ms: u64,
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    /// Machines with disks in its cache.
    pub machines: Vec<String>,
    /// Machines the config server assigned to it (their agents are sent there).
    pub assigned: Vec<String>,
}

/// `PUT /api/machines/M/process-server`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessServerAssignment {
    #[serde(default)]
    pub machine: String,
    pub process_server: String,
}

/// A scale-out process server's credentials after registering.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProcessServerToken {
    pub name: String,
    pub token: String,
}

type Failure = (StatusCode, Json<ErrorBody>);

fn ops(s: &ManagementState) -> Result<&Operations, Failure> {
    s.operations.as_deref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this appliance runs no process server / master target role",
        )
    })
}

pub fn job_error(e: JobError) -> Failure {
    let status = match &e {
        JobError::BadRequest(_) => StatusCode::BAD_REQUEST,
        JobError::NotFound(_) => StatusCode::NOT_FOUND,
        JobError::Conflict(_) => StatusCode::CONFLICT,
        JobError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

fn plan_error(e: PlanError) -> Failure {
    job_error(e.into())
}

async fn off_reactor<T: Send + 'static>(f: impl FnOnce() -> Result<T, Failure> + Send + 'static) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn list_groups(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<NamedGroup>> {
    authorize(&s, &headers)?;
    let groups = ops(&s)?.coordinator.groups().clone();
    Ok(Json(off_reactor(move || groups.list().map_err(policy_error)).await?))
}

async fn put_group(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<NamedGroup> {
    authorize(&s, &headers)?;
    let group: Group =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("group body: {e}")))?;
    let groups = ops(&s)?.coordinator.groups().clone();
    let n = name.clone();
    let stored = off_reactor(move || groups.put(&n, &group).map_err(policy_error)).await?;
    tracing::info!(group = %name, machines = ?stored.machines, "replication group saved");
    Ok(Json(NamedGroup { name, group: stored }))
}

async fn delete_group(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Failure> {
    authorize(&s, &headers)?;
    let groups = ops(&s)?.coordinator.groups().clone();
    off_reactor(move || groups.delete(&name).map_err(policy_error)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_plans(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<NamedPlan>> {
    authorize(&s, &headers)?;
    let plans = ops(&s)?.jobs.plans().clone();
    Ok(Json(off_reactor(move || plans.list().map_err(plan_error)).await?))
}

async fn put_plan(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<NamedPlan> {
    authorize(&s, &headers)?;
    let plan: Plan =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("plan body: {e}")))?;
    let plans = ops(&s)?.jobs.plans().clone();
    let (n, p) = (name.clone(), plan.clone());
    off_reactor(move || plans.put(&n, &p).map_err(plan_error)).await?;
    Ok(Json(NamedPlan { name, plan }))
}

async fn delete_plan(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Failure> {
    authorize(&s, &headers)?;
    let plans = ops(&s)?.jobs.plans().clone();
    off_reactor(move || plans.delete(&name).map_err(plan_error)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_jobs(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<Job>> {
    authorize(&s, &headers)?;
    Ok(Json(ops(&s)?.jobs.list().await.map_err(job_error)?))
}

async fn start_job(
    State(s): State<Arc<ManagementState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Job>), Failure> {
    authorize(&s, &headers)?;
    let req: JobRequest =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("job body: {e}")))?;
    let job = ops(&s)?.jobs.submit(req).await.map_err(job_error)?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn get_job(State(s): State<Arc<ManagementState>>, Path(id): Path<u64>, headers: HeaderMap) -> ApiResult<Job> {
    authorize(&s, &headers)?;
    Ok(Json(ops(&s)?.jobs.get(id).await.map_err(job_error)?))
}

async fn resume_job(State(s): State<Arc<ManagementState>>, Path(id): Path<u64>, headers: HeaderMap) -> ApiResult<Job> {
    authorize(&s, &headers)?;
    Ok(Json(ops(&s)?.jobs.resume(id).await.map_err(job_error)?))
}

#[derive(Debug, Deserialize)]
struct EventQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    machine: String,
}

async fn events(
    State(s): State<Arc<ManagementState>>,
    Query(q): Query<EventQuery>,
    headers: HeaderMap,
) -> ApiResult<Vec<Event>> {
    authorize(&s, &headers)?;
    let ev = ops(&s)?.events.clone();
    let limit = q.limit.unwrap_or(1000).min(10_000);
    Ok(Json(
        off_reactor(move || {
            ev.list(q.after, limit, &q.machine)
                .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        })
        .await?,
    ))
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BookmarkAsked {
    pub machine: String,
    pub request: u64,
}

#[derive(Debug, Default, Deserialize)]
struct AskBody {
    #[serde(default)]
    label: String,
}

async fn ask_bookmark(
    State(s): State<Arc<ManagementState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<BookmarkAsked> {
    authorize(&s, &headers)?;
    let o = ops(&s)?;
    if s.reader.as_ref().is_none_or(|r| r.disks(&machine).is_empty()) {
        return Err(error(StatusCode::NOT_FOUND, format!("unknown machine {machine:?}")));
    }
    let ask: AskBody = if body.is_empty() {
        AskBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?
    };
    let label = if ask.label.is_empty() { "on demand" } else { &ask.label };
    let request = o
        .coordinator
        .ask_bookmark(&machine, label)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(BookmarkAsked { machine, request }))
}

async fn agents(
    State(s): State<Arc<ManagementState>>,
    headers: HeaderMap,
) -> ApiResult<Vec<gateway::server::AgentInfo>> {
    authorize(&s, &headers)?;
    let ingest = ops(&s)?.ingest.clone();
    Ok(Json(
        off_reactor(move || {
            ingest
                .agents()
                .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        })
        .await?,
    ))
}

fn process_server_error(e: ProcessServerError) -> Failure {
    let status = match &e {
        ProcessServerError::WrongPassphrase | ProcessServerError::Unauthorized => StatusCode::UNAUTHORIZED,
        ProcessServerError::Unknown(_) => StatusCode::NOT_FOUND,
        ProcessServerError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ProcessServerError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// The process servers: this appliance's own (`local`) and the scale-out ones that registered.
async fn process_servers(
    State(s): State<Arc<ManagementState>>,
    headers: HeaderMap,
) -> ApiResult<Vec<ProcessServerInfo>> {
    authorize(&s, &headers)?;
    let o = ops(&s)?;
    let ingest = o.ingest.clone();
    let address = o.replication_address.clone();
    off_reactor(move || {
        let j = &ingest.journal;
        let registry = &ingest.process_servers;
        let assignments = registry.assignments().map_err(process_server_error)?;
        let assigned_to = |name: &str| -> Vec<String> {
            assignments
                .iter()
                .filter(|(_, ps)| ps == name)
                .map(|(m, _)| m.clone())
                .collect()
        };
        let mut machines: Vec<String> = j.disks().into_iter().map(|d| d.machine).collect();
        machines.sort();
        machines.dedup();
        let now = lifeboat_fs::pit::now_ms();
        let mut out = vec![ProcessServerInfo {
            name: LOCAL.into(),
            address,
            local: true,
            state: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            last_seen_ms: now,
            cache_used_bytes: j.cache_used(),
            cache_limit_bytes: j.state.max_bytes,
            // Machines assigned elsewhere but not yet moved still show here until they are.
            assigned: machines
                .iter()
                .filter(|m| !assignments.iter().any(|(a, _)| a == *m))
                .cloned()
                .collect(),
            machines,
        }];
        for r in registry.list().map_err(process_server_error)? {
            out.push(ProcessServerInfo {
                state: if r.reachable(now) { "ok" } else { "unreachable" }.into(),
                assigned: assigned_to(&r.name),
                local: false,
                version: r.version,
                last_seen_ms: r.last_seen_ms,
                cache_used_bytes: r.last.cache_used_bytes,
                cache_limit_bytes: r.last.cache_limit_bytes,
                machines: r.last.machines,
                address: r.address,
                name: r.name,
            });
        }
        Ok(out)
    })
    .await
    .map(Json)
}

/// A scale-out process server registers with the passphrase (no admin token) and gets its own.
async fn register_process_server(
    State(s): State<Arc<ManagementState>>,
    body: axum::body::Bytes,
) -> ApiResult<ProcessServerToken> {
    let reg: Registration =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("registration body: {e}")))?;
    let ingest = ops(&s)?.ingest.clone();
    let name = reg.name.clone();
    let token = off_reactor(move || {
        ingest
            .process_servers
            .register(&reg, &ingest.passphrase)
            .map_err(process_server_error)
    })
    .await
    .inspect_err(|_| tracing::warn!(process_server = %name, "process-server registration refused"))?;
    tracing::info!(process_server = %name, "scale-out process server registered");
    Ok(Json(ProcessServerToken { name, token }))
}

async fn process_server_heartbeat(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<HeartbeatAnswer> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let hb: Heartbeat =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("heartbeat body: {e}")))?;
    let ingest = ops(&s)?.ingest.clone();
    off_reactor(move || {
        ingest
            .process_servers
            .heartbeat(&name, &token, hb)
            .map_err(process_server_error)
    })
    .await
    .map(Json)
}

async fn assign_process_server(
    State(s): State<Arc<ManagementState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<ProcessServerAssignment> {
    authorize(&s, &headers)?;
    let mut a: ProcessServerAssignment =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
    a.machine = machine;
    let o = ops(&s)?;
    let ingest = o.ingest.clone();
    let (m, ps) = (a.machine.clone(), a.process_server.clone());
    off_reactor(move || ingest.process_servers.assign(&m, &ps).map_err(process_server_error)).await?;
    let message = format!(
        "the agent of {} is sent to process server {}",
        a.machine, a.process_server
    );
    if let Err(e) = o
        .events
        .post_async(Severity::Info, "process-server-assigned", &a.machine, message)
        .await
    {
        tracing::warn!(error = %e, "could not record the assignment event");
    }
    tracing::info!(machine = %a.machine, process_server = %a.process_server, "machine assigned");
    Ok(Json(a))
}

/// Marks a machine resync-required by hand; its agent's next sync compares every block.
async fn resync(
    State(s): State<Arc<ManagementState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Failure> {
    authorize(&s, &headers)?;
    let co = ops(&s)?.coordinator.clone();
    if s.reader.as_ref().is_none_or(|r| r.disks(&machine).is_empty()) {
        return Err(error(StatusCode::NOT_FOUND, format!("unknown machine {machine:?}")));
    }
    off_reactor(move || {
        co.require_resync(&machine, "requested by the operator")
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await?;
    Ok(StatusCode::ACCEPTED)
}

pub fn routes() -> Router<Arc<ManagementState>> {
    Router::new()
        .route("/api/machines/{machine}/resync", post(resync))
        .route("/api/agents", get(agents))
        .route("/api/process-servers", get(process_servers))
        .route("/api/process-servers/register", post(register_process_server))
        .route("/api/process-servers/{name}/heartbeat", put(process_server_heartbeat))
        .route("/api/machines/{machine}/process-server", put(assign_process_server))
        .route("/api/groups", get(list_groups))
        .route("/api/groups/{name}", put(put_group).delete(delete_group))
        .route("/api/plans", get(list_plans))
        .route("/api/plans/{name}", put(put_plan).delete(delete_plan))
        .route("/api/jobs", get(list_jobs).post(start_job))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/resume", post(resume_job))
        .route("/api/events", get(events))
        .route("/api/machines/{machine}/bookmark", post(ask_bookmark))
}

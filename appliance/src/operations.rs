//! The management API's operations: replication groups, recovery plans, jobs (test failover,
//! failover, commit, failback), events, and asking agents for an app-consistent point now.
//! Same authentication and error shape as the rest of the API (see `management`).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/agents` | registered agents: version, registered, last seen |
//! | GET | `/api/process-servers` | process servers, their cache and machines |
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
use gateway::events::{Event, Events};
use gateway::groups::{Group, NamedGroup};
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
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    pub machines: Vec<String>,
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

/// The process servers: this appliance's own (scale-out appliances are listed here once they
/// register; none can yet).
async fn process_servers(
    State(s): State<Arc<ManagementState>>,
    headers: HeaderMap,
) -> ApiResult<Vec<ProcessServerInfo>> {
    authorize(&s, &headers)?;
    let o = ops(&s)?;
    let j = &o.ingest.journal;
    let mut machines: Vec<String> = j.disks().into_iter().map(|d| d.machine).collect();
    machines.sort();
    machines.dedup();
    Ok(Json(vec![ProcessServerInfo {
        name: "local".into(),
        address: o.replication_address.clone(),
        cache_used_bytes: j.cache_used(),
        cache_limit_bytes: j.state.max_bytes,
        machines,
    }]))
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

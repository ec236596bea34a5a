//! The management API's operations: replication groups, recovery plans, jobs (test failover,
//! failover, commit, failback), events, and asking agents for an app-consistent point now.
//! Same authentication and error shape as the rest of the API (see `management`).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/agents` | registered agents: version, registered, last seen |
//! | GET | `/api/process-servers` | process servers (the local one and scale-out ones): state, cache, machines |
//! | POST | `/api/process-servers/register` | a scale-out process server registers (`Registration`, with the passphrase) → `{name, token}` |
//! | PUT | `/api/process-servers/NAME/heartbeat` | its heartbeat (`Heartbeat`, its own bearer token) → the machines assigned to it and their flags |
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
    /// Wakes the catalogue follower (each heartbeat of a scale-out process server does).
    pub follow_wake: Arc<tokio::sync::Notify>,
    /// The machine flags heartbeats carry to and from scale-out process servers.
    pub flags: gateway::process_servers::FlagRelay,
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
    let disks = s.reader.as_ref().map(|r| r.disks(&machine)).unwrap_or_default();
    if disks.is_empty() {
        return Err(error(StatusCode::NOT_FOUND, format!("unknown machine {machine:?}")));
    }
    if let Some(d) = disks.iter().find(|d| d.is_followed()) {
        return Err(error(
            StatusCode::CONFLICT,
            format!(
                "{machine:?} replicates to process server {:?}: its agent takes app-consistent points there (on that server's schedule, or `lifeboat agent bookmark` against it)",
                d.followed_from
            ),
        ));
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
        // Followed disks are written by a scale-out process server, not here.
        let mut machines: Vec<String> = j
            .disks()
            .into_iter()
            .filter(|d| !d.is_followed())
            .map(|d| d.machine)
            .collect();
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
    let token = gateway::server::bearer_token(&headers).unwrap_or_default().to_string();
    let hb: Heartbeat =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("heartbeat body: {e}")))?;
    let o = ops(&s)?;
    let ingest = o.ingest.clone();
    let ops = s.operations.clone().expect("checked above");
    let answer = off_reactor(move || {
        let reported = hb.resync_required.clone();
        let mut answer = ingest
            .process_servers
            .heartbeat(&name, &token, hb)
            .map_err(process_server_error)?;
        ops.flags
            .exchange(&ops.coordinator, &name, &reported, &mut answer)
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(answer)
    })
    .await?;
    // Its machines' logs may have moved on: the follower looks now.
    o.follow_wake.notify_one();
    Ok(Json(answer))
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

/// The OpenAPI paths and schemas of these operations (and of `/api/mounts`), merged into the
/// management API's document.
pub fn openapi() -> (serde_json::Value, serde_json::Value) {
    use serde_json::json;
    let name = |what: &str| json!({"name": what, "in": "path", "required": true, "schema": {"type": "string"}});
    let id = json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}});
    let err = json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}});
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let one = |d: &str, schema: &str| json!({"description": d, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let many = |d: &str, schema: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": format!("#/components/schemas/{schema}")}}}}});
    let e = |d: &str| json!({"description": d, "content": err.clone()});
    let paths = json!({
        "/api/agents": {"get": {"summary": "registered mobility agents", "responses": {"200": many("agents", "Agent")}}},
        "/api/process-servers": {"get": {"summary": "process servers: the local one and scale-out ones", "responses": {"200": many("process servers", "ProcessServer")}}},
        "/api/process-servers/register": {"post": {"summary": "a scale-out process server registers (passphrase in the body, no admin token)", "security": [],
            "requestBody": body("ProcessServerRegistration"),
            "responses": {"200": one("its token", "ProcessServerToken"), "400": e("invalid name, address or certificate"), "401": e("wrong passphrase")}}},
        "/api/process-servers/{name}/heartbeat": {"put": {"summary": "a process server's heartbeat (its own bearer token)", "security": [{"process_server": []}], "parameters": [name("name")],
            "requestBody": body("Heartbeat"),
            "responses": {"200": one("the machines assigned to it", "HeartbeatAnswer"), "401": e("wrong token"), "404": e("unknown process server")}}},
        "/api/machines/{machine}/process-server": {"put": {"summary": "send a machine's agent to a process server (`local`: this appliance)", "parameters": [name("machine")],
            "requestBody": body("ProcessServerAssignment"),
            "responses": {"200": one("assigned", "ProcessServerAssignment"), "404": e("unknown process server")}}},
        "/api/machines/{machine}/resync": {"post": {"summary": "mark a machine resync-required (its next sync compares every block)", "parameters": [name("machine")],
            "responses": {"202": {"description": "marked"}, "404": e("unknown machine")}}},
        "/api/machines/{machine}/bookmark": {"post": {"summary": "ask the machine's agent (its group's agents) for an app-consistent point now", "parameters": [name("machine")],
            "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object", "properties": {"label": {"type": "string"}}}}}},
            "responses": {"200": one("asked", "BookmarkAsked"), "404": e("unknown machine"), "409": e("the machine replicates to a scale-out process server")}}},
        "/api/groups": {"get": {"summary": "replication groups", "responses": {"200": many("groups", "NamedGroup")}}},
        "/api/groups/{name}": {
            "put": {"summary": "create or replace a replication group", "parameters": [name("name")], "requestBody": body("Group"),
                "responses": {"200": one("saved", "NamedGroup"), "400": e("invalid group (the message names the field)"), "404": e("unknown policy"), "409": e("a machine is in another group")}},
            "delete": {"summary": "delete a replication group", "parameters": [name("name")], "responses": {"204": {"description": "deleted"}, "404": e("unknown group")}}},
        "/api/plans": {"get": {"summary": "recovery plans", "responses": {"200": many("plans", "NamedPlan")}}},
        "/api/plans/{name}": {
            "put": {"summary": "create or replace a recovery plan", "parameters": [name("name")], "requestBody": body("Plan"),
                "responses": {"200": one("saved", "NamedPlan"), "400": e("invalid plan")}},
            "delete": {"summary": "delete a recovery plan", "parameters": [name("name")], "responses": {"204": {"description": "deleted"}, "404": e("unknown plan")}}},
        "/api/jobs": {
            "get": {"summary": "jobs, newest first", "responses": {"200": many("jobs", "Job")}},
            "post": {"summary": "start a job: test failover, cleanup, failover, commit, failback", "requestBody": body("JobRequest"),
                "responses": {"202": one("started", "Job"), "400": e("invalid request (the message names the field)"), "404": e("unknown machine or plan"), "409": e("the machine is already in that state, or another job holds it")}}},
        "/api/jobs/{id}": {"get": {"summary": "one job with live progress", "parameters": [id.clone()], "responses": {"200": one("the job", "Job"), "404": e("unknown job")}}},
        "/api/jobs/{id}/resume": {"post": {"summary": "resume a job paused at a manual step", "parameters": [id], "responses": {"200": one("resumed", "Job"), "404": e("unknown job"), "409": e("not paused")}}},
        "/api/events": {"get": {"summary": "the event log, oldest first",
            "parameters": [{"name": "after", "in": "query", "schema": {"type": "integer"}}, {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 10000}},
                {"name": "machine", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": many("events", "Event")}}},
        "/api/mounts": {"get": {"summary": "`lifeboat mount` clients running now", "responses": {"200": many("mount sessions", "MountSession")}}},
        "/api/mounts/{id}": {
            "put": {"summary": "announce or renew a mount session (a lease of 30 s)", "parameters": [name("id")], "requestBody": body("MountSession"),
                "responses": {"200": one("renewed", "MountSession"), "400": e("invalid id")}},
            "delete": {"summary": "end a mount session", "parameters": [name("id")], "responses": {"204": {"description": "ended"}, "404": e("no such session")}}}
    });
    let str_ = json!({"type": "string"});
    let int = json!({"type": "integer"});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let schemas = json!({
        "Agent": {"type": "object", "properties": {"machine": str_, "version": str_, "registered_ms": int, "last_seen_ms": int}},
        "ProcessServer": {"type": "object", "properties": {"name": str_, "address": str_, "local": {"type": "boolean"},
            "state": {"type": "string", "enum": ["ok", "unreachable"]}, "version": str_, "last_seen_ms": int,
            "cache_used_bytes": int, "cache_limit_bytes": int, "machines": strings, "assigned": strings}},
        "ProcessServerRegistration": {"type": "object", "required": ["name", "address", "certificate_pem", "passphrase"], "properties": {
            "name": str_, "address": {"type": "string", "description": "HOST:PORT agents use"}, "certificate_pem": str_,
            "version": str_, "passphrase": str_, "heartbeat_interval_ms": int}},
        "ProcessServerToken": {"type": "object", "properties": {"name": str_, "token": str_}},
        "Heartbeat": {"type": "object", "required": ["cache_used_bytes", "cache_limit_bytes", "machines"], "properties": {
            "cache_used_bytes": int, "cache_limit_bytes": int, "machines": strings, "version": str_,
            "resync_required": {"type": "object", "additionalProperties": str_, "description": "its machines that must resynchronise, with the reason"}}},
        "HeartbeatAnswer": {"type": "object", "properties": {"assigned": strings,
            "stopped": {"type": "object", "additionalProperties": str_, "description": "assigned machines whose replication is stopped (failed over), with the reason"},
            "resync": {"type": "object", "additionalProperties": str_, "description": "assigned machines to mark resync-required, with the reason"}}},
        "ProcessServerAssignment": {"type": "object", "required": ["process_server"], "properties": {"machine": str_, "process_server": str_}},
        "BookmarkAsked": {"type": "object", "properties": {"machine": str_, "request": int}},
        "Group": {"type": "object", "required": ["machines"], "properties": {"machines": strings, "policy": {"type": "string", "default": "default"}}},
        "NamedGroup": {"allOf": [{"$ref": "#/components/schemas/Group"}, {"type": "object", "properties": {"name": str_}}]},
        "PlanStep": {"oneOf": [
            {"type": "object", "required": ["type", "machines"], "properties": {"type": {"enum": ["machines"]}, "machines": strings}},
            {"type": "object", "required": ["type", "command"], "properties": {"type": {"enum": ["script"]}, "command": str_, "timeout": {"type": "string", "example": "10m"}}},
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["pause"]}, "message": str_}}]},
        "Plan": {"type": "object", "required": ["steps"], "properties": {"steps": {"type": "array", "items": {"$ref": "#/components/schemas/PlanStep"}}}},
        "NamedPlan": {"allOf": [{"$ref": "#/components/schemas/Plan"}, {"type": "object", "properties": {"name": str_}}]},
        "JobRequest": {"type": "object", "required": ["kind"], "properties": {
            "kind": {"type": "string", "enum": ["test-failover", "test-failover-cleanup", "failover", "failover-commit", "failback"]},
            "plan": str_, "machines": strings,
            "point": {"type": "string", "description": "latest (default), latest-app, a point id, or an RFC 3339 time"},
            "target_dir": {"type": "string", "description": "failover: DIR/MACHINE/DISK.img"},
            "targets": {"type": "object", "additionalProperties": {"type": "string"}, "description": "MACHINE/DISK → file or device"},
            "target_blob": {"type": "string", "description": "failover to blob storage: PREFIX/MACHINE/DISK.img|vhd"},
            "image_format": {"type": "string", "enum": ["raw", "vhd"]},
            "source": {"type": "string", "enum": ["failover-copy", "point"]}}},
        "MachineResult": {"type": "object", "properties": {"machine": str_, "point": int, "point_time": str_, "exports": strings,
            "targets": {"type": "object", "additionalProperties": {"type": "string"}},
            "blob_targets": {"type": "object", "additionalProperties": {"type": "string"}},
            "blocks_compared": int, "blocks_written": int, "bytes_written": int}},
        "Job": {"type": "object", "properties": {"id": int, "request": {"$ref": "#/components/schemas/JobRequest"},
            "state": {"type": "string", "enum": ["running", "paused", "succeeded", "failed"]}, "step": int,
            "steps": {"type": "array", "items": {"type": "object", "properties": {"step": str_, "state": str_, "message": str_}}},
            "created_ms": int, "updated_ms": int, "progress_done_bytes": int, "progress_total_bytes": int,
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/MachineResult"}}, "error": str_}},
        "Event": {"type": "object", "properties": {"id": int, "time_ms": int, "severity": {"type": "string", "enum": ["info", "warning", "error"]},
            "kind": str_, "machine": str_, "message": str_}},
        "MountSession": {"type": "object", "required": ["host", "mountpoint"], "properties": {"id": str_, "host": str_, "mountpoint": str_,
            "machine": str_, "pid": int, "since_ms": int, "last_seen_ms": int}}
    });
    (paths, schemas)
}

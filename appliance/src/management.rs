//! The config server's management API (HTTPS, admin bearer token) and the client the operator
//! commands (`lifeboat points ...`) use to reach it. Operator commands never open the
//! appliance's RocksDB themselves.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/api/health` | `{status, version}` (no token needed) |
//! | GET | `/api/openapi.json` | the OpenAPI 3 description (no token needed) |
//! | GET | `/api/machines` | machines and their disks |
//! | GET | `/api/machines/M/points` | recovery points of M, newest first |
//! | PUT | `/api/machines/M/policy` | `{policy}`: M follows that policy from now on |
//! | GET | `/api/policies` | every policy, with the machines assigned to it |
//! | PUT / DELETE | `/api/policies/NAME` | create or replace (checked; 400 names the field) / delete (409 in use) |

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use gateway::policy::{Policies, Policy, PolicyError};
use gateway::server::ErrorBody;
use lifeboat_fs::pit::{PointInfo, Reader};
use serde::{Deserialize, Serialize};

use crate::config::Resolved;

pub struct ManagementState {
    admin_hash: [u8; 32],
    pub(crate) reader: Option<Arc<Reader>>,
    policies: Option<Policies>,
    pub(crate) operations: Option<Arc<crate::operations::Operations>>,
    pub(crate) mounts: Arc<crate::mounts::Mounts>,
}

impl ManagementState {
    pub fn new(
        admin_token: &str,
        reader: Option<Arc<Reader>>,
        policies: Option<Policies>,
        operations: Option<Arc<crate::operations::Operations>>,
        mounts: Arc<crate::mounts::Mounts>,
    ) -> Arc<Self> {
        Arc::new(Self {
            admin_hash: *blake3::hash(admin_token.as_bytes()).as_bytes(),
            reader,
            policies,
            operations,
            mounts,
        })
    }
}

/// A policy with its name and the machines that follow it explicitly.
#[derive(Debug, Serialize, Deserialize)]
pub struct NamedPolicy {
    pub name: String,
    #[serde(flatten)]
    pub policy: Policy,
    #[serde(default)]
    pub machines: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Assignment {
    pub policy: String,
}

pub(crate) fn policy_error(e: PolicyError) -> (StatusCode, Json<ErrorBody>) {
    let status = match &e {
        PolicyError::Invalid { .. } | PolicyError::BadName(_) | PolicyError::DeleteDefault => StatusCode::BAD_REQUEST,
        PolicyError::Unknown(_) | PolicyError::UnknownGroup(_) => StatusCode::NOT_FOUND,
        PolicyError::InUse { .. } | PolicyError::Conflict(_) => StatusCode::CONFLICT,
        PolicyError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

fn policies_of(s: &ManagementState) -> Result<Policies, (StatusCode, Json<ErrorBody>)> {
    s.policies.clone().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this appliance runs no process server role",
        )
    })
}

/// Runs a blocking policy-store call off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PolicyError> + Send + 'static,
) -> Result<T, (StatusCode, Json<ErrorBody>)> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(policy_error)
}

async fn list_policies(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<NamedPolicy>> {
    authorize(&s, &headers)?;
    let p = policies_of(&s)?;
    let list = blocking(move || {
        let assigned = p.assignments()?;
        Ok(p.list()?
            .into_iter()
            .map(|(name, policy)| NamedPolicy {
                machines: assigned
                    .iter()
                    .filter(|(_, n)| *n == name)
                    .map(|(m, _)| m.clone())
                    .collect(),
                name,
                policy,
            })
            .collect())
    })
    .await?;
    Ok(Json(list))
}

async fn put_policy(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<NamedPolicy> {
    authorize(&s, &headers)?;
    let policy: Policy =
        serde_json::from_slice(&body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("policy body: {e}")))?;
    let p = policies_of(&s)?;
    let (n, pol) = (name.clone(), policy.clone());
    blocking(move || p.put(&n, &pol)).await?;
    tracing::info!(policy = %name, "policy saved");
    Ok(Json(NamedPolicy {
        name,
        policy,
        machines: Vec::new(),
    }))
}

async fn delete_policy(
    State(s): State<Arc<ManagementState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, (StatusCode, Json<ErrorBody>)> {
    authorize(&s, &headers)?;
    let p = policies_of(&s)?;
    blocking(move || p.delete(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn assign_policy(
    State(s): State<Arc<ManagementState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
    Json(req): Json<Assignment>,
) -> ApiResult<Assignment> {
    authorize(&s, &headers)?;
    let r = reader(&s)?;
    if r.disks(&machine).is_empty() {
        return Err(error(StatusCode::NOT_FOUND, format!("unknown machine {machine:?}")));
    }
    let p = policies_of(&s)?;
    let name = req.policy.clone();
    blocking(move || p.assign(&machine, &name)).await?;
    Ok(Json(req))
}

pub(crate) type ApiResult<T> = Result<Json<T>, (StatusCode, Json<ErrorBody>)>;

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> (StatusCode, Json<ErrorBody>) {
    (status, Json(ErrorBody { error: message.into() }))
}

pub(crate) fn authorize(s: &ManagementState, headers: &HeaderMap) -> Result<(), (StatusCode, Json<ErrorBody>)> {
    let token = gateway::server::bearer_token(headers).ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "missing admin token (Authorization: Bearer ...)",
        )
    })?;
    // Compare digests: the time taken does not depend on where the tokens differ.
    let presented = blake3::hash(token.trim().as_bytes());
    let admin = presented
        .as_bytes()
        .iter()
        .zip(&s.admin_hash)
        .fold(0u8, |a, (x, y)| a | (x ^ y))
        == 0;
    if admin {
        return Ok(());
    }
    // A valid agent token is authenticated but not allowed here.
    let is_agent = s
        .reader
        .as_ref()
        .and_then(|r| r.journal().token_machine(presented.as_bytes()).ok().flatten())
        .is_some();
    if is_agent {
        return Err(error(
            StatusCode::FORBIDDEN,
            "agent tokens cannot call admin endpoints; use the admin token",
        ));
    }
    Err(error(StatusCode::UNAUTHORIZED, "wrong admin token"))
}

/// The OpenAPI description of this API (served without a token).
fn openapi() -> serde_json::Value {
    let machine = serde_json::json!({"name": "machine", "in": "path", "required": true, "schema": {"type": "string"}});
    let policy_name = serde_json::json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    let error_body = serde_json::json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}});
    let errors = serde_json::json!({
        "401": {"description": "missing or wrong admin token", "content": error_body},
        "403": {"description": "an agent token on an admin endpoint", "content": error_body}
    });
    let mut points_responses = errors.clone();
    points_responses["200"] = serde_json::json!({"description": "recovery points, newest first",
        "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}}}}});
    points_responses["404"] = serde_json::json!({"description": "unknown machine", "content": error_body});
    let mut machines_responses = errors;
    machines_responses["200"] = serde_json::json!({"description": "protected machines and their disks",
        "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Machine"}}}}});
    let mut doc = serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "Lifeboat management API", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"admin": []}],
        "paths": {
            "/api/health": {"get": {"summary": "liveness", "security": [], "responses": {"200": {"description": "ok"}}}},
            "/api/openapi.json": {"get": {"summary": "this document", "security": [], "responses": {"200": {"description": "OpenAPI 3"}}}},
            "/api/machines": {"get": {"summary": "protected machines", "responses": machines_responses}},
            "/api/machines/{machine}/points": {"get": {"summary": "recovery points of a machine", "parameters": [machine], "responses": points_responses}},
            "/api/machines/{machine}/policy": {"put": {"summary": "make a machine follow a policy", "parameters": [machine],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Assignment"}}}},
                "responses": {"200": {"description": "assigned"}, "404": {"description": "unknown machine or policy", "content": error_body}}}},
            "/api/policies": {"get": {"summary": "every policy and the machines assigned to it",
                "responses": {"200": {"description": "policies", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/NamedPolicy"}}}}}}}},
            "/api/policies/{name}": {
                "put": {"summary": "create or replace a policy", "parameters": [policy_name],
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Policy"}}}},
                    "responses": {"200": {"description": "saved"}, "400": {"description": "invalid value; the message names the field", "content": error_body}}},
                "delete": {"summary": "delete a policy no machine follows", "parameters": [policy_name],
                    "responses": {"204": {"description": "deleted"}, "404": {"description": "unknown policy", "content": error_body},
                        "409": {"description": "still assigned to machines", "content": error_body}}}
            }
        },
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer", "description": "the token in DATA_DIR/admin-token"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Disk": {"type": "object", "properties": {
                    "disk": {"type": "string"}, "size": {"type": "integer"},
                    "acked_through": {"type": "integer"}, "uploaded_through": {"type": "integer"}}},
                "Machine": {"type": "object", "properties": {
                    "machine": {"type": "string"},
                    "state": {"type": "string", "enum": ["initial-sync", "protected", "resync-required", "test-failover", "failed-over"]},
                    "policy": {"type": "string"}, "group": {"type": "string"}, "latest_point": {"type": "integer"},
                    "process_server": {"type": "string", "description": "the scale-out process server replicating it (absent: this appliance)"},
                    "disks": {"type": "array", "items": {"$ref": "#/components/schemas/Disk"}}}},
                "Policy": {"type": "object", "additionalProperties": false,
                    "required": ["crash_consistent_interval", "app_consistent_interval", "retention", "rpo_threshold"],
                    "properties": {
                        "crash_consistent_interval": {"type": "string", "example": "5m"},
                        "app_consistent_interval": {"type": "string", "example": "4h"},
                        "retention": {"type": "string", "example": "24h", "description": "at most 72h"},
                        "rpo_threshold": {"type": "string", "example": "15m"}}},
                "NamedPolicy": {"allOf": [{"$ref": "#/components/schemas/Policy"}, {"type": "object", "properties": {
                    "name": {"type": "string"}, "machines": {"type": "array", "items": {"type": "string"}}}}]},
                "Assignment": {"type": "object", "required": ["policy"], "properties": {"policy": {"type": "string"}}},
                "Point": {"type": "object", "required": ["id", "time", "kind", "label"], "properties": {
                    "id": {"type": "integer"}, "machine": {"type": "string"}, "time": {"type": "string", "format": "date-time"},
                    "time_ms": {"type": "integer"}, "kind": {"type": "string", "enum": ["crash-consistent", "app-consistent"]},
                    "label": {"type": "string"}, "seqs": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "readable": {"type": "boolean"}}}
            }
        }
    });
    let (paths, schemas) = crate::operations::openapi();
    for (section, extra) in [("paths", paths), ("schemas", schemas)] {
        let target = if section == "paths" {
            &mut doc["paths"]
        } else {
            &mut doc["components"]["schemas"]
        };
        if let (Some(t), serde_json::Value::Object(extra)) = (target.as_object_mut(), extra) {
            t.extend(extra);
        }
    }
    doc["components"]["securitySchemes"]["process_server"] = serde_json::json!({"type": "http", "scheme": "bearer",
        "description": "the token a scale-out process server got when it registered"});
    doc
}

fn reader(s: &ManagementState) -> Result<Arc<Reader>, (StatusCode, Json<ErrorBody>)> {
    s.reader.clone().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this appliance runs no process server / master target role",
        )
    })
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DiskInfo {
    pub disk: String,
    pub size: u64,
    /// Highest sequence number acknowledged to the agent.
    pub acked_through: u64,
    /// Highest sequence number safely in blob storage.
    pub uploaded_through: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MachineInfo {
    pub machine: String,
    /// `initial-sync` (no recovery point yet), `protected`, `resync-required` (the next sync
    /// compares every block), `test-failover` (protected, with writable test exports open) or
    /// `failed-over` (replication stopped until failback).
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub policy: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// The newest recovery point, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_point: Option<u64>,
    /// The scale-out process server that replicates the machine, when its catalogue here is
    /// followed from that server's log (empty: this appliance's own process server).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub process_server: String,
    pub disks: Vec<DiskInfo>,
}

async fn machines(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<MachineInfo>> {
    authorize(&s, &headers)?;
    let r = reader(&s)?;
    let policies = s.policies.clone();
    let ops = s.operations.clone();
    let list = tokio::task::spawn_blocking(move || {
        let failed: Vec<String> = ops
            .as_ref()
            .and_then(|o| o.jobs.failovers().ok())
            .map(|f| f.into_iter().map(|(m, _)| m).collect())
            .unwrap_or_default();
        let testing: Vec<String> = ops
            .as_ref()
            .and_then(|o| o.jobs.test_failovers().ok())
            .map(|f| f.into_iter().map(|(m, _)| m).collect())
            .unwrap_or_default();
        r.machines()
            .into_iter()
            .map(|m| {
                let latest_point = r.points(&m).ok().and_then(|p| p.first().map(|p| p.id));
                let resync = ops.as_ref().and_then(|o| o.coordinator.resync_required(&m));
                let state = if failed.contains(&m) {
                    "failed-over"
                } else if resync.is_some() {
                    "resync-required"
                } else if testing.contains(&m) {
                    "test-failover"
                } else if latest_point.is_some() {
                    "protected"
                } else {
                    "initial-sync"
                };
                MachineInfo {
                    state: state.into(),
                    policy: policies.as_ref().and_then(|p| p.policy_of(&m).ok()).unwrap_or_default(),
                    group: ops
                        .as_ref()
                        .and_then(|o| o.coordinator.groups().group_of(&m).ok().flatten())
                        .unwrap_or_default(),
                    latest_point,
                    process_server: r
                        .disks(&m)
                        .into_iter()
                        .map(|d| d.followed_from)
                        .find(|p| !p.is_empty())
                        .unwrap_or_default(),
                    disks: r
                        .disks(&m)
                        .into_iter()
                        .map(|d| DiskInfo {
                            disk: d.disk,
                            size: d.size,
                            acked_through: d.next_seq - 1,
                            uploaded_through: d.uploaded_through,
                        })
                        .collect(),
                    machine: m,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(list))
}

async fn points(
    State(s): State<Arc<ManagementState>>,
    Path(machine): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Vec<PointInfo>> {
    authorize(&s, &headers)?;
    let r = reader(&s)?;
    if r.disks(&machine).is_empty() {
        return Err(error(StatusCode::NOT_FOUND, format!("unknown machine {machine:?}")));
    }
    let points = tokio::task::spawn_blocking(move || r.points(&machine))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(points))
}

pub fn router(state: Arc<ManagementState>) -> Router {
    Router::new()
        .route(
            "/api/health",
            get(|| async { Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})) }),
        )
        .route("/api/openapi.json", get(|| async { Json(openapi()) }))
        .route("/api/machines", get(machines))
        .route("/api/machines/{machine}/points", get(points))
        .route("/api/machines/{machine}/policy", axum::routing::put(assign_policy))
        .route("/api/policies", get(list_policies))
        .route(
            "/api/policies/{name}",
            axum::routing::put(put_policy).delete(delete_policy),
        )
        .merge(crate::operations::routes())
        .merge(crate::mounts::routes())
        .with_state(state)
}

/// Where operator commands find the management API.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminConnection {
    /// The appliance's config file: address, certificate and admin token are taken from it
    /// (without --config and --server, the embedded defaults are used).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The management API, e.g. https://appliance:443 (instead of --config).
    #[arg(long, requires = "token_file")]
    pub server: Option<String>,
    /// CA certificate (PEM) to trust for --server.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// File holding the admin token (the appliance writes DATA_DIR/admin-token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn connect(c: &AdminConnection) -> anyhow::Result<Self> {
        let (base, ca, token_file) = match &c.server {
            Some(url) => (
                url.trim_end_matches('/').to_string(),
                c.ca.clone(),
                c.token_file.clone(),
            ),
            None => {
                let cfg: Resolved = crate::config::Config::load(c.config.as_deref())?.resolve()?;
                let mut addr = cfg.raw.listen.management;
                if addr.port() == 0 {
                    // Bound to any free port: the running appliance wrote down which.
                    let ready = cfg.data_dir.join("ready.json");
                    let text = std::fs::read_to_string(&ready).with_context(|| {
                        format!(
                            "management port is 0 in the config and {} is missing: is the appliance running?",
                            ready.display()
                        )
                    })?;
                    let v: serde_json::Value = serde_json::from_str(&text)?;
                    addr = v["management"]
                        .as_str()
                        .context("ready.json names no management address")?
                        .parse()?;
                }
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                (
                    format!("https://{addr}"),
                    Some(c.ca.clone().unwrap_or(cfg.cert.clone())),
                    Some(c.token_file.clone().unwrap_or(cfg.data_dir.join("admin-token"))),
                )
            }
        };
        let token_file = token_file.context("--token-file is needed with --server")?;
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading admin token {}", token_file.display()))?
            .trim()
            .to_string();
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        if let Some(ca) = ca {
            let pem = std::fs::read(&ca).with_context(|| format!("reading CA certificate {}", ca.display()))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Self {
            base,
            token,
            http: builder.build()?,
        })
    }

    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn put<T: serde::de::DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        self.call(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POST without a body, answer without one.
    pub async fn post_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.post(format!("{}{path}", self.base))).await?;
        Ok(())
    }

    /// DELETE; the answer has no body.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(format!("{}{path}", self.base))).await?;
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        Ok(self.send(req).await?.json().await?)
    }

    /// Sends with the admin token; a non-success answer becomes an error with the API's message.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let r = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the management API at {}", self.base))?;
        let status = r.status();
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or(body);
            anyhow::bail!("{status}: {msg}");
        }
        Ok(r)
    }
}

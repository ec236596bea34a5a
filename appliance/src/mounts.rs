//! FUSE mount sessions. Each `lifeboat mount` client announces itself to the management API and
//! renews that lease while it runs; the appliance counts the live sessions (the
//! `lifeboat_fuse_clients` gauge) and lists them (`GET /api/mounts`). A session is live connection
//! state, like an NBD connection, so it is kept in memory only: a restart forgets it and the
//! client's next renewal announces it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::management::{authorize, error, ApiResult, ManagementState};

/// A session not renewed for this long is gone (the client died without saying so).
pub const LEASE: Duration = Duration::from_secs(30);
/// How often a running mount renews its session.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// What a mount client says about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSession {
    /// Chosen by the client: 1 to 64 characters of `[A-Za-z0-9_-]`.
    #[serde(default)]
    pub id: String,
    pub host: String,
    pub mountpoint: String,
    /// The one machine shown, when the mount was limited to it.
    #[serde(default)]
    pub machine: Option<String>,
    #[serde(default)]
    pub pid: u32,
    /// When the appliance first saw the session, and last heard from it (ms since the epoch).
    #[serde(default)]
    pub since_ms: u64,
    #[serde(default)]
    pub last_seen_ms: u64,
}

/// The live mount sessions.
#[derive(Default)]
pub struct Mounts {
    sessions: Mutex<HashMap<String, (MountSession, Instant)>>,
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Mounts {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Announces or renews a session; false when the id is not acceptable.
    pub fn renew(&self, id: &str, mut session: MountSession) -> bool {
        if !valid_id(id) {
            return false;
        }
        let now_ms = lifeboat_fs::pit::now_ms();
        let mut sessions = self.sessions.lock().expect("mounts lock");
        session.id = id.to_string();
        session.since_ms = sessions.get(id).map(|(s, _)| s.since_ms).unwrap_or(now_ms);
        session.last_seen_ms = now_ms;
        sessions.insert(id.to_string(), (session, Instant::now()));
        true
    }

    /// Ends a session (the client unmounted); false when there was none.
    pub fn end(&self, id: &str) -> bool {
        self.sessions.lock().expect("mounts lock").remove(id).is_some()
    }

    /// The sessions renewed within the lease, oldest first; expired ones are dropped.
    pub fn live(&self) -> Vec<MountSession> {
        let mut sessions = self.sessions.lock().expect("mounts lock");
        sessions.retain(|_, (_, seen)| seen.elapsed() < LEASE);
        let mut v: Vec<MountSession> = sessions.values().map(|(s, _)| s.clone()).collect();
        v.sort_by(|a, b| (a.since_ms, &a.id).cmp(&(b.since_ms, &b.id)));
        v
    }
}

async fn list(State(s): State<Arc<ManagementState>>, headers: HeaderMap) -> ApiResult<Vec<MountSession>> {
    authorize(&s, &headers)?;
    Ok(Json(s.mounts.live()))
}

async fn renew(
    State(s): State<Arc<ManagementState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<MountSession> {
    authorize(&s, &headers)?;
    let session: MountSession = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("mount session body: {e}")))?;
    if !s.mounts.renew(&id, session) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "mount id: 1 to 64 characters of letters, digits, '-' and '_'",
        ));
    }
    let live = s.mounts.live();
    let this = live.into_iter().find(|m| m.id == id).unwrap_or_default();
    Ok(Json(this))
}

async fn end(
    State(s): State<Arc<ManagementState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, (StatusCode, Json<gateway::server::ErrorBody>)> {
    authorize(&s, &headers)?;
    if s.mounts.end(&id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(error(StatusCode::NOT_FOUND, format!("no mount session {id:?}")))
    }
}

pub fn routes() -> Router<Arc<ManagementState>> {
    Router::new()
        .route("/api/mounts", get(list))
        .route("/api/mounts/{id}", put(renew).delete(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(mountpoint: &str) -> MountSession {
        MountSession {
            host: "h".into(),
            mountpoint: mountpoint.into(),
            pid: 7,
            ..Default::default()
        }
    }

    #[test]
    fn sessions_are_counted_renewed_and_ended() {
        let m = Mounts::new();
        assert!(m.renew("a1", session("/mnt/a")));
        assert!(m.renew("b2", session("/mnt/b")));
        let first = m.live();
        assert_eq!(first.len(), 2);
        assert!(m.renew("a1", session("/mnt/a")));
        let again = m.live();
        assert_eq!(again.len(), 2, "a renewal is not a new session");
        let a = again.iter().find(|s| s.id == "a1").unwrap();
        assert_eq!(a.since_ms, first.iter().find(|s| s.id == "a1").unwrap().since_ms);
        assert!(m.end("a1"));
        assert!(!m.end("a1"), "ending twice finds nothing");
        assert_eq!(m.live().len(), 1);
    }

    #[test]
    fn bad_ids_are_refused() {
        let m = Mounts::new();
        for id in ["", "a/b", "x y", &"z".repeat(65)] {
            assert!(!m.renew(id, session("/mnt")), "{id:?}");
        }
        assert!(m.live().is_empty());
    }

    #[test]
    fn expired_sessions_are_dropped() {
        let m = Mounts::new();
        assert!(m.renew("old", session("/mnt")));
        if let Some((_, seen)) = m.sessions.lock().unwrap().get_mut("old") {
            *seen = Instant::now() - LEASE - Duration::from_secs(1);
        }
        assert!(m.live().is_empty());
    }
}

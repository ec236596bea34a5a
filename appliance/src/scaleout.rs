//! A scale-out process server's side of the config server link: register with the config
//! server (`[config_server]` in the config) using the passphrase, then send a heartbeat with the
//! cache fill and the machines replicated here on every interval, registering again whenever
//! the config server no longer knows the token (it was restarted from an older state, say).
//! The answer carries the config server's flags for the machines assigned here ("replication
//! stopped" after a failover, "resync required"); they are applied to this process server's
//! coordinator, so an agent here gets the refusals it would get on the config server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gateway::consistency::Coordinator;
use gateway::journal::Journal;
use gateway::process_servers::{apply_flags, Heartbeat, HeartbeatAnswer, Registration};
use tokio::sync::watch;

use crate::config::Resolved;
use crate::operations::ProcessServerToken;

/// What the link needs from the running process server.
pub struct Link {
    http: reqwest::Client,
    base: String,
    registration: Registration,
    interval: Duration,
    journal: Journal,
    coordinator: Arc<Coordinator>,
    /// The machines the config server last said are assigned here.
    assigned: std::sync::Mutex<Vec<String>>,
}

impl Link {
    /// Prepares the link from the config; `replication` is the bound replication address.
    pub fn new(
        cfg: &Resolved,
        replication: &str,
        passphrase: &str,
        journal: Journal,
        coordinator: Arc<Coordinator>,
    ) -> anyhow::Result<Arc<Self>> {
        let cs = &cfg.raw.config_server;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30));
        if !cs.ca.is_empty() {
            let pem = std::fs::read(&cs.ca).with_context(|| format!("reading config_server.ca {}", cs.ca))?;
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).context("config_server.ca")?);
        }
        let certificate_pem = std::fs::read_to_string(&cfg.cert)
            .with_context(|| format!("reading this appliance's certificate {}", cfg.cert.display()))?;
        let name = if cs.name.is_empty() {
            sysinfo::System::host_name().unwrap_or_else(|| "process-server".into())
        } else {
            cs.name.clone()
        };
        let address = match (cs.advertise.is_empty(), replication.parse::<std::net::SocketAddr>()) {
            (false, _) => cs.advertise.clone(),
            // Bound to every interface: agents need a name, not 0.0.0.0.
            (true, Ok(a)) if a.ip().is_unspecified() => {
                let host = sysinfo::System::host_name().context(
                    "config_server.advertise is empty, the replication port listens on every interface and the host has no name",
                )?;
                format!("{host}:{}", a.port())
            }
            (true, _) => replication.to_string(),
        };
        let interval = crate::config::parse_duration(&cs.heartbeat_interval)?;
        Ok(Arc::new(Self {
            http: builder.build()?,
            base: cs.url.trim_end_matches('/').to_string(),
            registration: Registration {
                name,
                address,
                certificate_pem,
                version: env!("CARGO_PKG_VERSION").into(),
                passphrase: passphrase.to_string(),
                heartbeat_interval_ms: interval.as_millis() as u64,
            },
            interval,
            journal,
            coordinator,
            assigned: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Whether the config server's last answer assigned `machine` here (false before the first
    /// answer): retention rolls up only the logs this process server writes now.
    pub fn serves(&self, machine: &str) -> bool {
        self.assigned.lock().expect("lock").iter().any(|m| m == machine)
    }

    async fn register(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .post(format!("{}/api/process-servers/register", self.base))
            .json(&self.registration)
            .send()
            .await
            .with_context(|| format!("cannot reach the config server at {}", self.base))?;
        let status = r.status();
        if !status.is_success() {
            anyhow::bail!(
                "config server refused the registration ({status}): {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(r.json::<ProcessServerToken>().await?.token)
    }

    fn heartbeat_body(&self) -> Heartbeat {
        let mut machines: Vec<String> = self.journal.disks().into_iter().map(|d| d.machine).collect();
        machines.sort();
        machines.dedup();
        // Flags of assigned machines with no disk here yet count too: the config server sends a
        // resync request until it is reported.
        let assigned = self.assigned.lock().expect("lock").clone();
        let resync_required = machines
            .iter()
            .chain(&assigned)
            .filter_map(|m| self.coordinator.resync_required(m).map(|why| (m.clone(), why)))
            .collect();
        Heartbeat {
            cache_used_bytes: self.journal.cache_used(),
            cache_limit_bytes: self.journal.state.max_bytes,
            machines,
            version: env!("CARGO_PKG_VERSION").into(),
            resync_required,
        }
    }

    /// Sends one heartbeat; `Ok(None)` when the config server wants a new registration.
    async fn heartbeat(&self, token: &str) -> anyhow::Result<Option<HeartbeatAnswer>> {
        let r = self
            .http
            .put(format!(
                "{}/api/process-servers/{}/heartbeat",
                self.base, self.registration.name
            ))
            .bearer_auth(token)
            .json(&self.heartbeat_body())
            .send()
            .await
            .with_context(|| format!("cannot reach the config server at {}", self.base))?;
        let status = r.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            anyhow::bail!("heartbeat refused ({status}): {}", r.text().await.unwrap_or_default());
        }
        Ok(Some(r.json().await?))
    }

    /// Registers (retrying with backoff while the config server is away) and sends heartbeats
    /// until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let name = self.registration.name.clone();
        let mut token: Option<String> = None;
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match &token {
                None => match self.register().await {
                    Ok(t) => {
                        tracing::info!(process_server = %name, config_server = %self.base, "registered with the config server");
                        token = Some(t);
                        backoff = Duration::from_secs(1);
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "registration with the config server failed");
                        let w = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        w
                    }
                },
                Some(t) => {
                    match self.heartbeat(t).await {
                        Ok(Some(answer)) => {
                            tracing::debug!(assigned = ?answer.assigned, "heartbeat sent");
                            self.assigned.lock().expect("lock").clone_from(&answer.assigned);
                            let co = self.coordinator.clone();
                            match tokio::task::spawn_blocking(move || apply_flags(&co, &answer)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %e, "cannot apply the config server's machine flags")
                                }
                                Err(e) => tracing::warn!(error = %e, "cannot apply the config server's machine flags"),
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("the config server no longer knows this process server: registering again");
                            token = None;
                            continue;
                        }
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "heartbeat failed"),
                    }
                    self.interval
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

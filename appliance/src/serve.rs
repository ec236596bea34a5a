//! `lifeboat serve`: starts the appliance roles on their listeners and runs until Ctrl-C or
//! SIGTERM. On first start it creates the TLS certificate and the registration passphrase and
//! tells the operator where they are.

use std::time::Duration;

use anyhow::Context;
use gateway::{ProcessServer, ProcessServerConfig};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Resolved;
use crate::{management, metrics, secrets};

/// Resolves once `shutdown` turns true.
async fn until_shutdown(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// How long a scale-out process server keeps the objects a roll-up replaced: the config
/// server's catalogue follower (every 2 s) switches to the new base image well within it.
const SCALE_OUT_DELETE_AFTER: Duration = Duration::from_secs(60);

async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

pub async fn run(cfg: Resolved, json: bool) -> anyhow::Result<()> {
    let tls = secrets::load_or_create_tls(&cfg.cert, &cfg.key, &cfg.raw.tls.san)?;
    let (passphrase, new_passphrase) = match &cfg.raw.security.passphrase {
        Some(p) => (p.clone(), false),
        None => secrets::load_or_create_passphrase(&cfg.passphrase_file)?,
    };
    let (shutdown_tx, shutdown) = watch::channel(false);
    let registry = Registry::new();
    let gw_metrics = gateway::metrics::GatewayMetrics::new(&registry);
    let host = metrics::HostMetrics::new(&registry, cfg.data_dir.clone());

    let roles = &cfg.raw.roles;
    let mut tasks = Vec::new();
    let mut process = None;
    let mut link = None;
    let mut ready = serde_json::Map::new();
    if roles.iter().any(|r| r == "process") {
        let ps_cfg = ProcessServerConfig {
            journal_dir: cfg.data_dir.join("journal"),
            cache_max_bytes: cfg.cache_max_bytes,
            cache_memory_bytes: cfg.cache_memory_bytes,
            blob_url: cfg.blob_url.clone(),
            blob_options: cfg.raw.blob.options.clone(),
            passphrase: passphrase.clone(),
            keyring_cache: cfg.data_dir.join("keyring.json"),
            default_policy: gateway::policy::Policy {
                crash_consistent_interval: cfg.raw.policy.crash_consistent_interval.clone(),
                app_consistent_interval: cfg.raw.policy.app_consistent_interval.clone(),
                retention: cfg.raw.policy.retention.clone(),
                rpo_threshold: cfg.raw.policy.rpo_threshold.clone(),
            },
        };
        let ps = ProcessServer::start(&ps_cfg, gw_metrics.clone(), shutdown.clone()).await?;
        let listener = bind("replication", cfg.raw.listen.replication).await?;
        ready.insert("replication".into(), metrics::addr_of(&listener).to_string().into());
        let router = gateway::server::router(ps.ingest.clone());
        tasks.push(tokio::spawn(gateway::server::serve_tls(
            listener,
            tls.server_config.clone(),
            router,
            shutdown.clone(),
        )));
        tasks.push(tokio::spawn(metrics::register_process_side(
            &host,
            gw_metrics.clone(),
            ps.journal.clone(),
            cfg.policy.rpo_threshold,
            shutdown.clone(),
        )));
        if !cfg.raw.config_server.url.is_empty() {
            // Scale-out: this process server reports to a config server elsewhere.
            let replication = ready
                .get("replication")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            let l = crate::scaleout::Link::new(
                &cfg,
                &replication,
                &passphrase,
                ps.journal.clone(),
                ps.coordinator.clone(),
            )?;
            tasks.push(tokio::spawn(l.clone().run(shutdown.clone())));
            link = Some(l);
        }
        process = Some(ps);
    }
    // The catalogue of what this appliance's process server wrote; the master target reads it.
    let catalogue = process.as_ref().map(|ps| {
        lifeboat_fs::pit::Reader::new(
            ps.journal.clone(),
            ps.blob.store.clone(),
            ps.kek.clone(),
            cfg.chunk_cache_bytes,
        )
    });
    if let (Some(catalogue), Some(ps)) = (&catalogue, &process) {
        // Retention runs where a disk's log is written (it reserves nonce counters from that
        // journal): on every process server, for its own disks; a tenth of the retention
        // window, 1 s to 1 min.
        let every = (cfg.policy.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut retention = lifeboat_fs::retention::Retention::new(
            catalogue.clone(),
            ps.blob.clone(),
            ps.kek.clone(),
            ps.policies.clone(),
        );
        // Only the machines whose log this process server writes now: a machine moved to
        // another one keeps its disks in this journal.
        match &link {
            Some(link) => {
                let link = link.clone();
                retention = retention
                    .only_for(move |m| link.serves(m))
                    // The config server's follower reads these objects until it has switched too.
                    .delete_rolled_after(SCALE_OUT_DELETE_AFTER);
            }
            None => {
                let registry = ps.ingest.process_servers.clone();
                retention = retention.only_for(move |m| matches!(registry.assigned_to(m), Ok(None)));
            }
        }
        tasks.push(tokio::spawn(retention.run(every, shutdown.clone())));
    }
    let reader = catalogue.filter(|_| roles.iter().any(|r| r == "master-target"));
    // The config server follows the logs of machines on scale-out process servers into its
    // catalogue; each heartbeat wakes it.
    let follow_wake = std::sync::Arc::new(tokio::sync::Notify::new());
    if let (Some(reader), Some(ps), true) = (&reader, &process, roles.iter().any(|r| r == "config")) {
        let follower = lifeboat_fs::follow::Follower::new(
            reader.clone(),
            ps.kek.clone(),
            ps.ingest.process_servers.clone(),
            follow_wake.clone(),
        );
        tasks.push(tokio::spawn(
            follower.run(lifeboat_fs::follow::FOLLOW_INTERVAL, shutdown.clone()),
        ));
    }
    let exports = reader
        .as_ref()
        .map(|r| lifeboat_fs::exports::PointExports::new(r.clone()));
    // Jobs (failover, test failover, failback) need both the catalogue and the exports.
    let operations = match (&reader, &exports, &process) {
        (Some(reader), Some(exports), Some(ps)) => {
            let jobs = crate::jobs::Jobs::start(
                ps.journal.clone(),
                reader.clone(),
                exports.clone(),
                ps.coordinator.clone(),
                ps.events.clone(),
                cfg.data_dir.clone(),
                crate::jobs::JobMetrics::register(&registry),
            )
            .await?;
            Some(std::sync::Arc::new(crate::operations::Operations {
                jobs,
                coordinator: ps.coordinator.clone(),
                events: ps.events.clone(),
                ingest: ps.ingest.clone(),
                follow_wake: follow_wake.clone(),
                flags: Default::default(),
                replication_address: ready
                    .get("replication")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string(),
            }))
        }
        _ => None,
    };
    // `lifeboat mount` clients announce themselves to the management API; metrics count them.
    let mounts = crate::mounts::Mounts::new();
    if let (Some(reader), Some(exports)) = (&reader, &exports) {
        let listener = bind("NBD", cfg.raw.listen.nbd).await?;
        ready.insert("nbd".into(), metrics::addr_of(&listener).to_string().into());
        let nbd = std::sync::Arc::new(lifeboat_fs::nbd::NbdServer::new(exports.clone()));
        metrics::register_read_side(&registry, &host, nbd.stats(), reader.clone(), mounts.clone());
        tasks.push(tokio::spawn(nbd.serve(listener, until_shutdown(shutdown.clone()))));
    }
    if roles.iter().any(|r| r == "config") {
        let admin_token = secrets::load_or_create_admin_token(&cfg.data_dir.join("admin-token"))?;
        let listener = bind("management", cfg.raw.listen.management).await?;
        ready.insert("management".into(), metrics::addr_of(&listener).to_string().into());
        ready.insert(
            "admin_token_file".into(),
            cfg.data_dir.join("admin-token").display().to_string().into(),
        );
        tasks.push(tokio::spawn(gateway::server::serve_tls(
            listener,
            tls.server_config.clone(),
            management::router(management::ManagementState::new(
                &admin_token,
                reader.clone(),
                process.as_ref().map(|ps| ps.policies.clone()),
                operations.clone(),
                mounts.clone(),
            )),
            shutdown.clone(),
        )));
    }
    let listener = bind("metrics", cfg.raw.listen.metrics).await?;
    ready.insert("metrics".into(), metrics::addr_of(&listener).to_string().into());
    tasks.push(tokio::spawn(metrics::serve(listener, registry, host, shutdown.clone())));

    ready.insert("event".into(), "ready".into());
    ready.insert("data_dir".into(), cfg.data_dir.display().to_string().into());
    ready.insert("cert".into(), cfg.cert.display().to_string().into());
    ready.insert("fingerprint".into(), tls.fingerprint.clone().into());
    // Operator commands given --config find the real addresses here when a port was 0.
    let ready_file = cfg.data_dir.join("ready.json");
    std::fs::write(&ready_file, serde_json::Value::Object(ready.clone()).to_string())
        .with_context(|| format!("writing {}", ready_file.display()))?;
    if json {
        println!("{}", serde_json::Value::Object(ready.clone()));
    } else {
        println!(
            "Lifeboat {} is running (data in {})",
            env!("CARGO_PKG_VERSION"),
            cfg.data_dir.display()
        );
        for (k, v) in &ready {
            if let (Some(addr), true) = (
                v.as_str(),
                ["management", "replication", "metrics", "nbd"].contains(&k.as_str()),
            ) {
                let scheme = match k.as_str() {
                    "metrics" => "http",
                    "nbd" => "nbd",
                    _ => "https",
                };
                let tail = if k == "metrics" { "/metrics" } else { "" };
                println!("  {k:<12} {scheme}://{addr}{tail}");
            }
        }
        println!(
            "  certificate  {}{}\n  SHA-256      {}",
            cfg.cert.display(),
            if tls.generated {
                " (generated now, self-signed)"
            } else {
                ""
            },
            tls.fingerprint
        );
        if let Some(f) = ready.get("admin_token_file").and_then(|v| v.as_str()) {
            println!("  admin token  {f} (for `lifeboat points`, `lifeboat mount`)");
        }
        if new_passphrase {
            println!(
                "  Registration passphrase (shown once; kept in {}):\n    {passphrase}",
                cfg.passphrase_file.display()
            );
        } else if cfg.raw.security.passphrase.is_none() {
            println!("  registration passphrase in {}", cfg.passphrase_file.display());
        }
    }
    tracing::info!(roles = ?roles, "lifeboat ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(ps) = process {
        ps.join().await;
    }
    Ok(())
}

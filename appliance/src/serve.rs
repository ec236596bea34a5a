//! `lifeboat serve`: starts the appliance roles on their listeners and runs until Ctrl-C or
//! SIGTERM. On first start it creates the TLS certificate and the registration passphrase and
//! tells the operator where they are.

use anyhow::Context;
use axum::routing::get;
use axum::{Json, Router};
use gateway::{ProcessServer, ProcessServerConfig};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Resolved;
use crate::{metrics, secrets};

async fn bind(what: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for {what}"))
}

fn management_router() -> Router {
    Router::new().route(
        "/api/health",
        get(|| async { Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})) }),
    )
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
    let mut ready = serde_json::Map::new();
    if roles.iter().any(|r| r == "process") {
        let ps_cfg = ProcessServerConfig {
            journal_dir: cfg.data_dir.join("journal"),
            cache_max_bytes: cfg.cache_max_bytes,
            blob_url: cfg.blob_url.clone(),
            blob_options: cfg.raw.blob.options.clone(),
            passphrase: passphrase.clone(),
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
        process = Some(ps);
    }
    if roles.iter().any(|r| r == "config") {
        let listener = bind("management", cfg.raw.listen.management).await?;
        ready.insert("management".into(), metrics::addr_of(&listener).to_string().into());
        tasks.push(tokio::spawn(gateway::server::serve_tls(
            listener,
            tls.server_config.clone(),
            management_router(),
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
                ["management", "replication", "metrics"].contains(&k.as_str()),
            ) {
                let scheme = if k == "metrics" { "http" } else { "https" };
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

//! `lifeboat mount MOUNTPOINT`: the recovery points of a running appliance as a read-only FUSE
//! filesystem. The tree (machines, points, disks) comes from the management API, the bytes from
//! the appliance's NBD port; the appliance's RocksDB is never opened here.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use lifeboat_fs::fuse::{self, MachineDisks, MountConfig, PointSource};
use lifeboat_fs::nbd_client::{NbdClientConfig, NbdExport};
use lifeboat_fs::pit::PointInfo;
use lifeboat_fs::view::DiskView;

use crate::management::{AdminConnection, Client};

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// An existing directory to mount on; the tree is MOUNTPOINT/MACHINE/POINT/DISK.img and
    /// MOUNTPOINT/MACHINE/POINT/DISK/pN/... (files of ext2/3/4 partitions).
    pub mountpoint: PathBuf,
    /// Show only this protected machine.
    #[arg(long)]
    pub machine: Option<String>,
    #[command(flatten)]
    pub conn: AdminConnection,
    /// The appliance's NBD address HOST:PORT (needed with --server; with --config it is read
    /// from the config, or from DATA_DIR/ready.json when the port there is 0).
    #[arg(long, value_name = "HOST:PORT")]
    pub nbd: Option<String>,
    /// How often the lists of machines and points are fetched again (new points appear, expired
    /// ones vanish).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
    /// NBD connections per opened disk (the appliance allows several).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

/// The appliance behind the mount: management API for the tree, NBD for the bytes.
struct Appliance {
    api: Client,
    nbd: String,
    connections: usize,
}

fn to_io(e: anyhow::Error) -> io::Error {
    let msg = format!("{e:#}");
    let kind = if msg.starts_with("404") {
        io::ErrorKind::NotFound
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, msg)
}

impl PointSource for Appliance {
    fn machines(&self) -> BoxFuture<'_, io::Result<Vec<MachineDisks>>> {
        Box::pin(async move { self.api.get("/api/machines").await.map_err(to_io) })
    }

    fn points<'a>(&'a self, machine: &'a str) -> BoxFuture<'a, io::Result<Vec<PointInfo>>> {
        Box::pin(async move {
            self.api
                .get(&format!("/api/machines/{machine}/points"))
                .await
                .map_err(to_io)
        })
    }

    fn open<'a>(&'a self, machine: &'a str, disk: &'a str, point: u64) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>> {
        Box::pin(async move {
            let cfg = NbdClientConfig {
                connections: self.connections.max(1),
                ..Default::default()
            };
            let export = NbdExport::connect(&self.nbd, &format!("{machine}/{disk}@{point}"), cfg).await?;
            Ok(export as Arc<dyn DiskView>)
        })
    }
}

/// The appliance's NBD address: --nbd, else from its config (and ready.json for port 0).
fn nbd_address(args: &MountArgs) -> anyhow::Result<String> {
    if let Some(a) = &args.nbd {
        return Ok(a.clone());
    }
    anyhow::ensure!(
        args.conn.server.is_none(),
        "--nbd HOST:PORT is needed with --server (the appliance's NBD port, 10809 by default)"
    );
    let cfg = crate::config::Config::load(args.conn.config.as_deref())?.resolve()?;
    let mut addr = cfg.raw.listen.nbd;
    if addr.port() == 0 {
        let ready = cfg.data_dir.join("ready.json");
        let text = std::fs::read_to_string(&ready).with_context(|| {
            format!(
                "NBD port is 0 in the config and {} is missing: is the appliance running?",
                ready.display()
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        addr = v["nbd"]
            .as_str()
            .context("ready.json names no NBD address (does the appliance run the master-target role?)")?
            .parse()?;
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr.to_string())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Mounts and serves until Ctrl-C / SIGTERM (then unmounts) or an external unmount.
pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.mountpoint.is_dir(),
        "mount point {} is not a directory",
        args.mountpoint.display()
    );
    let api = Client::connect(&args.conn)?;
    let nbd = nbd_address(&args)?;
    // Fail early and clearly when the appliance is unreachable.
    let machines: Vec<MachineDisks> = api.get("/api/machines").await?;
    if let Some(m) = &args.machine {
        anyhow::ensure!(
            machines.iter().any(|x| &x.machine == m),
            "the appliance protects no machine {m:?}"
        );
    }
    let session_id = format!("{:016x}", rand::random::<u64>());
    let session = crate::mounts::MountSession {
        host: sysinfo::System::host_name().unwrap_or_default(),
        mountpoint: std::fs::canonicalize(&args.mountpoint)
            .unwrap_or_else(|_| args.mountpoint.clone())
            .display()
            .to_string(),
        machine: args.machine.clone(),
        pid: std::process::id(),
        ..Default::default()
    };
    let session_path = format!("/api/mounts/{session_id}");
    let session_api = api.clone();
    let source = Arc::new(Appliance {
        api,
        nbd: nbd.clone(),
        connections: args.connections,
    });
    let cfg = MountConfig {
        machine: args.machine.clone(),
        listing_ttl: args.refresh,
        ..Default::default()
    };
    let fs = fuse::LifeboatFs::new(source, cfg, tokio::runtime::Handle::current());
    let mountpoint = args.mountpoint.clone();
    let mounted = tokio::task::spawn_blocking(move || fuse::mount(fs, &mountpoint))
        .await?
        .with_context(|| format!("mounting on {}", args.mountpoint.display()))?;
    eprintln!(
        "lifeboat: recovery points mounted read-only at {} (NBD {nbd}); Ctrl-C or `fusermount3 -u {}` unmounts",
        args.mountpoint.display(),
        args.mountpoint.display()
    );
    let signal = shutdown_signal();
    tokio::pin!(signal);
    // The appliance counts this mount while its session is renewed (`lifeboat_fuse_clients`).
    let mut renew = tokio::time::interval(crate::mounts::RENEW_EVERY);
    let result = loop {
        tokio::select! {
            _ = &mut signal => {
                tracing::info!("unmounting");
                break tokio::task::spawn_blocking(move || mounted.unmount(Duration::from_secs(3))).await?;
            }
            _ = renew.tick() => {
                if let Err(e) = session_api.put::<serde_json::Value>(&session_path, &session).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not renew the mount session");
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if mounted.finished() {
                    break tokio::task::spawn_blocking(move || mounted.join()).await?;
                }
            }
        }
    };
    if let Err(e) = session_api.delete(&session_path).await {
        tracing::debug!(error = %format!("{e:#}"), "mount session already gone");
    }
    Ok(result?)
}

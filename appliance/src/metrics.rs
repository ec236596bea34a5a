//! The metrics endpoint (plain HTTP, `/metrics`, Prometheus text format): the data path's
//! metrics plus build info and host metrics from `sysinfo`, refreshed at each scrape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Gauge, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct HostMetrics {
    system: Mutex<(sysinfo::System, sysinfo::Disks, sysinfo::Networks)>,
    data_dir: PathBuf,
    cpu: Gauge,
    mem_total: IntGauge,
    mem_used: IntGauge,
    disk_free: IntGauge,
    disk_total: IntGauge,
    net_rx: IntGauge,
    net_tx: IntGauge,
    uptime: IntGauge,
    /// More gauges to refresh at each scrape (the read side's).
    hooks: Mutex<Vec<Box<dyn Fn() + Send>>>,
}

impl HostMetrics {
    /// Runs `f` before each scrape is encoded.
    pub fn on_scrape(&self, f: impl Fn() + Send + 'static) {
        self.hooks.lock().expect("lock").push(Box::new(f));
    }

    pub fn new(registry: &Registry, data_dir: PathBuf) -> Arc<Self> {
        let build = IntGaugeVec::new(
            Opts::new("lifeboat_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("register");
        let g = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("metric");
            registry.register(Box::new(m.clone())).expect("register");
            m
        };
        let cpu = Gauge::new(
            "lifeboat_host_cpu_usage_ratio",
            "Host CPU usage, 0 to 1, since the previous scrape.",
        )
        .expect("metric");
        registry.register(Box::new(cpu.clone())).expect("register");
        let m = Self {
            system: Mutex::new((
                sysinfo::System::new(),
                sysinfo::Disks::new_with_refreshed_list(),
                sysinfo::Networks::new_with_refreshed_list(),
            )),
            data_dir,
            cpu,
            mem_total: g("lifeboat_host_memory_total_bytes", "Host memory."),
            mem_used: g("lifeboat_host_memory_used_bytes", "Host memory in use."),
            disk_free: g(
                "lifeboat_host_data_disk_free_bytes",
                "Free space on the filesystem holding the data dir.",
            ),
            disk_total: g(
                "lifeboat_host_data_disk_size_bytes",
                "Size of the filesystem holding the data dir.",
            ),
            net_rx: g(
                "lifeboat_host_network_received_bytes",
                "Bytes received on all interfaces since boot.",
            ),
            net_tx: g(
                "lifeboat_host_network_transmitted_bytes",
                "Bytes transmitted on all interfaces since boot.",
            ),
            uptime: g("lifeboat_host_uptime_seconds", "Host uptime."),
            hooks: Mutex::new(Vec::new()),
        };
        Arc::new(m)
    }

    fn refresh(&self) {
        let mut guard = self.system.lock().expect("lock");
        let (sys, disks, nets) = &mut *guard;
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        disks.refresh(true);
        nets.refresh(true);
        self.cpu.set(f64::from(sys.global_cpu_usage()) / 100.0);
        self.mem_total.set(sys.total_memory() as i64);
        self.mem_used.set(sys.used_memory() as i64);
        // The disk whose mount point is the longest prefix of the data dir.
        if let Some(d) = disks
            .list()
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
        {
            self.disk_free.set(d.available_space() as i64);
            self.disk_total.set(d.total_space() as i64);
        }
        self.net_rx
            .set(nets.values().map(|n| n.total_received()).sum::<u64>() as i64);
        self.net_tx
            .set(nets.values().map(|n| n.total_transmitted()).sum::<u64>() as i64);
        self.uptime.set(sysinfo::System::uptime() as i64);
        drop(guard);
        for hook in self.hooks.lock().expect("lock").iter() {
            hook();
        }
    }
}

/// A counter mirrored from an atomic the read side keeps.
fn mirror(registry: &Registry, name: &str, help: &str) -> impl Fn(u64) {
    let c = IntCounter::new(name, help).expect("metric");
    registry.register(Box::new(c.clone())).expect("register");
    move |v| {
        let now = c.get();
        if v > now {
            c.inc_by(v - now);
        }
    }
}

/// The master target's metrics: NBD clients and traffic, the chunk cache, recovery points.
pub fn register_read_side(
    registry: &Registry,
    host: &HostMetrics,
    nbd: Arc<lifeboat_fs::nbd::NbdStats>,
    reader: Arc<lifeboat_fs::pit::Reader>,
    mounts: Arc<crate::mounts::Mounts>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let clients = IntGauge::new("lifeboat_nbd_clients", "NBD client connections open now.").expect("metric");
    registry.register(Box::new(clients.clone())).expect("register");
    let fuse = IntGauge::new(
        "lifeboat_fuse_clients",
        "`lifeboat mount` FUSE mounts of recovery points running now (live sessions).",
    )
    .expect("metric");
    registry.register(Box::new(fuse.clone())).expect("register");
    let requests = mirror(registry, "lifeboat_nbd_requests_total", "NBD requests served.");
    let read = mirror(registry, "lifeboat_nbd_read_bytes_total", "Bytes read by NBD clients.");
    let errors = mirror(
        registry,
        "lifeboat_nbd_errors_total",
        "NBD requests answered with an error.",
    );
    let hits = mirror(
        registry,
        "lifeboat_chunk_cache_hits_total",
        "Chunk reads served from the chunk cache.",
    );
    let fetches = mirror(
        registry,
        "lifeboat_chunk_fetches_total",
        "Chunks fetched from blob storage (ranged GETs).",
    );
    let fetched = mirror(
        registry,
        "lifeboat_chunk_fetched_bytes_total",
        "Bytes fetched from blob storage by the read side.",
    );
    let points = IntGaugeVec::new(
        Opts::new("lifeboat_recovery_points", "Recovery points per machine."),
        &["machine"],
    )
    .expect("metric");
    registry.register(Box::new(points.clone())).expect("register");
    let oldest = prometheus::GaugeVec::new(
        Opts::new(
            "lifeboat_recovery_point_oldest_age_seconds",
            "Age of the oldest recovery point per machine.",
        ),
        &["machine"],
    )
    .expect("metric");
    registry.register(Box::new(oldest.clone())).expect("register");
    host.on_scrape(move || {
        let s = nbd.snapshot();
        clients.set(s.connections_active as i64);
        fuse.set(mounts.live().len() as i64);
        requests(s.requests);
        read(s.bytes_read);
        errors(s.errors);
        hits(reader.stats.chunk_hits.load(Relaxed));
        fetches(reader.stats.chunk_fetches.load(Relaxed));
        fetched(reader.stats.fetched_bytes.load(Relaxed));
        let now = lifeboat_fs::pit::now_ms();
        for m in reader.machines() {
            if let Ok(p) = reader.points(&m) {
                points.with_label_values(&[&m]).set(p.len() as i64);
                if let Some(o) = p.iter().map(|p| p.time_ms).min() {
                    oldest
                        .with_label_values(&[&m])
                        .set(now.saturating_sub(o) as f64 / 1000.0);
                }
            }
        }
    });
}

/// The process server's derived metrics (RPO, churn, cache time to full, machine state; see
/// `gateway::metrics`): sets the policy's RPO threshold, refreshes them before each scrape, and
/// returns a task that refreshes them every second until shutdown, so the RPO threshold warning
/// is logged even when nothing scrapes.
pub fn register_process_side(
    host: &HostMetrics,
    gw: gateway::metrics::GatewayMetrics,
    journal: gateway::journal::Journal,
    rpo_threshold: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    gw.rpo_threshold_seconds.set(rpo_threshold.as_secs_f64());
    {
        let (gw, journal) = (gw.clone(), journal.clone());
        host.on_scrape(move || gw.refresh(&journal));
    }
    async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let (gw, journal) = (gw.clone(), journal.clone());
            let _ = tokio::task::spawn_blocking(move || gw.refresh(&journal)).await;
        }
    }
}

/// Serves `/metrics` until shutdown.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    host: Arc<HostMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            let host = host.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || {
                    host.refresh();
                    let mut buf = Vec::new();
                    TextEncoder::new()
                        .encode(&registry.gather(), &mut buf)
                        .expect("encode metrics");
                    buf
                })
                .await
                .expect("metrics task");
                ([("content-type", "text/plain; version=0.0.4")], text)
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
}

pub fn addr_of(l: &TcpListener) -> SocketAddr {
    l.local_addr().expect("bound listener")
}

//! The metrics endpoint (plain HTTP, `/metrics`, Prometheus text format): the data path's
//! metrics plus build info and host metrics from `sysinfo`, refreshed at each scrape.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Gauge, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
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
}

impl HostMetrics {
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

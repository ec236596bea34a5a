//! `lifeboat`: the appliance (config server, process server, master target) and the mobility
//! agent in one binary. `lifeboat serve` runs the appliance; `lifeboat agent ...` runs on a
//! protected machine; `lifeboat replay` restores a disk straight from blob storage.

mod config;
mod jobs;
mod management;
mod metrics;
mod mount;
mod mounts;
mod operations;
mod ops_cli;
mod plans;
mod scaleout;
mod secrets;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gateway::agent::{Agent, AgentConfig, DiskSpec};
use indicatif::{ProgressBar, ProgressStyle};

/// mimalloc reuses the multi-megabyte batch buffers instead of mapping and faulting in fresh
/// pages for each (glibc's malloc maps every allocation above 128 KiB anew).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(unsafe_code)]
extern "C" {
    /// mimalloc's option setter (the library is linked in as the global allocator).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// mimalloc's (v3) `mi_option_purge_delay`: how long freed memory stays committed before it is
/// returned to the OS. The default (10 ms) returns a batch buffer's pages between two batches,
/// and the next batch faults them in and the kernel zeroes them again; one second keeps the
/// steady-state buffers (bounded by the batches in flight) committed.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// mimalloc's (v3) `mi_option_allow_thp`: whether it asks for transparent huge pages.
const MI_OPTION_ALLOW_THP: std::ffi::c_int = 43;

/// Sets the purge delay to 1 s and, for the appliance (`huge_pages` false), turns transparent
/// huge pages off for the process, unless `MIMALLOC_PURGE_DELAY` or `MIMALLOC_ALLOW_THP` say
/// otherwise (mimalloc reads those itself). With huge pages, each 2 MiB region the heap touches
/// is faulted in and zeroed whole: the appliance's resident memory was 350–470 MB for a 210 MB
/// peak heap, and zeroing those pages took most of its system time in a 1 GiB sync; with 4 KiB
/// pages it was 240–280 MB and its system time 0.25–0.31 s instead of 0.34–1.0 s (alternating
/// runs, 2026-11-27). The agent keeps huge pages: without them it took 0.1 core-s more.
#[allow(unsafe_code)]
fn tune_allocator(huge_pages: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: stores an integer option in the allocator; valid at any time, from any thread.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
    if !huge_pages && std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above; and PR_SET_THP_DISABLE takes no pointers. It covers the mappings
        // made before this call too (the kernel checks it at each fault).
        unsafe {
            mi_option_set(MI_OPTION_ALLOW_THP, 0);
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "lifeboat",
    version,
    about = "Disaster-recovery storage gateway: replicate disks to blob storage, recover any point in time"
)]
struct Cli {
    /// Log filter (e.g. info, debug, gateway=trace); also RUST_LOG.
    #[arg(long, global = true, env = "LIFEBOAT_LOG", default_value = "info")]
    log: String,
    /// Logs as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance roles (config server, process server, master target).
    Serve {
        /// TOML config file; without it the embedded defaults are used (data in ./lifeboat-data).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the ready message as one JSON line (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// The mobility agent: replicate this machine's disks.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Restore a disk image straight from blob storage (needs the passphrase, not the appliance).
    Replay(ReplayArgs),
    /// Recovery points of protected machines (through the management API).
    #[command(subcommand)]
    Points(PointsCommand),
    /// The read side's catalogue and extent index.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Replication policies: crash-consistent interval, app-consistent frequency, retention, RPO
    /// threshold (through the management API).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Protected machines: state (initial-sync, protected, test-failover, failed-over), policy,
    /// group, newest point; ask for an app-consistent point now.
    #[command(subcommand)]
    Machines(ops_cli::MachinesCommand),
    /// Replication groups: machines that share every recovery point (multi-VM consistency).
    #[command(subcommand)]
    Group(ops_cli::GroupCommand),
    /// Recovery plans: ordered machine groups, script steps and manual pauses.
    #[command(subcommand)]
    Plan(ops_cli::PlanCommand),
    /// Fail machines (or a plan) over: --test for writable test exports, --cleanup to discard
    /// them, plain to materialise a point to files and stop replication, --commit to make it final.
    Failover(ops_cli::FailoverArgs),
    /// Write the failed-over copy (or a point) back onto the on-premises disks — only the blocks
    /// that differ — and re-protect.
    Failback(ops_cli::FailbackArgs),
    /// Failover, test failover and failback jobs: list, show, resume a paused one.
    #[command(subcommand)]
    Jobs(ops_cli::JobsCommand),
    /// The appliance's event log (RPO threshold crossed, jobs, missed app-consistent points).
    Events(ops_cli::EventsArgs),
    /// Registered mobility agents: version, registered, last seen.
    Agents(ops_cli::ListArgs),
    /// Process servers (this appliance's and scale-out ones) and machine assignments.
    #[command(subcommand)]
    ProcessServers(ops_cli::ProcessServersCommand),
    /// The `lifeboat mount` clients running now.
    Mounts(ops_cli::ListArgs),
    /// Browse recovery points as files (FUSE, read-only).
    ///
    /// MOUNTPOINT/MACHINE/POINT/DISK.img is the raw disk at that point; the files of each disk's
    /// ext2/3/4 partitions are under MOUNTPOINT/MACHINE/POINT/DISK/pN/. Stays in the foreground
    /// until Ctrl-C or `fusermount3 -u MOUNTPOINT`.
    Mount(mount::MountArgs),
    /// Print the embedded default configuration as TOML.
    DefaultConfig,
}

#[derive(Args, Clone)]
struct Connection {
    /// The process server, e.g. https://appliance:9443.
    #[arg(long)]
    server: String,
    /// CA certificate (PEM) to trust for the server: the appliance's cert.pem when self-signed.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// File holding the registration passphrase.
    #[arg(long)]
    passphrase_file: PathBuf,
    /// This machine's name, as the appliance will know it.
    #[arg(long)]
    machine: String,
    /// How long to keep retrying when the server goes away mid-sync.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Send block data uncompressed and let the appliance compress it (for machines short of
    /// CPU; by default the agent compresses, and sends and caches about half the bytes).
    #[arg(long)]
    no_compress: bool,
}

/// Commands that make the guest's data consistent around an app-consistent bookmark (e.g.
/// `fsfreeze -f /srv` and `fsfreeze -u /srv`, or a database's backup mode).
#[derive(clap::Args, Clone, Default)]
struct QuiesceHooks {
    /// Run (with `sh -c`) before the final sync of a requested app-consistent bookmark.
    #[arg(long, value_name = "COMMAND")]
    quiesce: Option<String>,
    /// Run after the bookmark is acknowledged (also when it failed).
    #[arg(long, value_name = "COMMAND")]
    thaw: Option<String>,
}

impl QuiesceHooks {
    async fn run(which: &str, cmd: &Option<String>) -> anyhow::Result<()> {
        let Some(cmd) = cmd else { return Ok(()) };
        let status = tokio::process::Command::new("sh").arg("-c").arg(cmd).status().await?;
        anyhow::ensure!(status.success(), "--{which} command {cmd:?} failed: {status}");
        Ok(())
    }
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Copy the disks (first run: all non-zero blocks; later: only changed blocks).
    Sync {
        #[command(flatten)]
        conn: Connection,
        /// A disk to replicate: PATH (named disk0, disk1, ... in order) or NAME=PATH.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Keep syncing every SECONDS until Ctrl-C, and answer the appliance's scheduled
        /// app-consistent bookmark requests (checked every second).
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
        #[command(flatten)]
        hooks: QuiesceHooks,
        /// Print the summary as JSON (and no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Tell the appliance this machine must resynchronise (e.g. from a boot script after an
    /// unclean shutdown); the next sync compares every block and clears it.
    ResyncRequired {
        #[command(flatten)]
        conn: Connection,
        #[arg(long, default_value = "unclean shutdown")]
        reason: String,
    },
    /// Append an app-consistent bookmark (after quiescing applications) to the stream.
    Bookmark {
        #[command(flatten)]
        conn: Connection,
        /// A label for the recovery point.
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PointsCommand {
    /// List a machine's recovery points, newest first.
    List {
        #[command(flatten)]
        conn: management::AdminConnection,
        /// The protected machine.
        #[arg(long)]
        machine: String,
        /// Print a JSON array (id, time, kind, label, seqs, readable).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// List the policies and the machines assigned to each.
    List {
        #[command(flatten)]
        conn: management::AdminConnection,
        #[arg(long)]
        json: bool,
    },
    /// Create or change a policy; unset fields keep their current (or default) values.
    Set {
        #[command(flatten)]
        conn: management::AdminConnection,
        /// The policy's name (`default` is the one every machine follows unless assigned).
        name: String,
        /// How often a crash-consistent point is cut, e.g. 5m.
        #[arg(long)]
        crash_consistent_interval: Option<String>,
        /// How often an app-consistent point is wanted, e.g. 4h.
        #[arg(long)]
        app_consistent_interval: Option<String>,
        /// How long recovery points are kept, at most 72h.
        #[arg(long)]
        retention: Option<String>,
        /// RPO above which a warning is raised, e.g. 15m.
        #[arg(long)]
        rpo_threshold: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make a machine follow a policy.
    Assign {
        #[command(flatten)]
        conn: management::AdminConnection,
        #[arg(long)]
        machine: String,
        /// The policy's name.
        policy: String,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Rebuild the catalogue (disks, recovery points, extent index) from blob storage alone, e.g.
    /// on a new appliance after the old one was lost. Run it before `serve`, with the same
    /// config (blob storage and passphrase) as the lost appliance.
    Rebuild {
        /// The appliance's config file (default: the embedded defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ReplayArgs {
    /// Blob storage URL (file:///path, az://container, s3://bucket).
    #[arg(long)]
    blob_url: String,
    /// object_store option KEY=VALUE (e.g. azure_storage_endpoint=...); repeatable.
    #[arg(long = "blob-option", value_name = "KEY=VALUE")]
    blob_options: Vec<String>,
    #[arg(long)]
    passphrase_file: PathBuf,
    #[arg(long)]
    machine: String,
    #[arg(long)]
    disk: String,
    /// Output image file.
    #[arg(long)]
    out: PathBuf,
    /// Stop after this sequence number (default: everything in blob storage).
    #[arg(long)]
    until_seq: Option<u64>,
    #[arg(long)]
    json: bool,
}

fn init_logging(filter: &str, json: bool) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn parse_disks(specs: &[String]) -> anyhow::Result<Vec<DiskSpec>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (name, path) = match s.split_once('=') {
                Some((n, p)) => (n.to_string(), p),
                None => (format!("disk{i}"), s.as_str()),
            };
            anyhow::ensure!(
                gateway::server::valid_name(&name),
                "invalid disk name {name:?}: use letters, digits, '-', '_' or '.'"
            );
            Ok(DiskSpec {
                name,
                path: PathBuf::from(path),
            })
        })
        .collect()
}

async fn connect(conn: &Connection) -> anyhow::Result<Agent> {
    let passphrase = std::fs::read_to_string(&conn.passphrase_file)
        .with_context(|| format!("reading passphrase file {}", conn.passphrase_file.display()))?
        .trim()
        .to_string();
    let ca_pem = match &conn.ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?),
        None => None,
    };
    let cfg = AgentConfig {
        server: conn.server.clone(),
        ca_pem,
        passphrase,
        machine: conn.machine.clone(),
        retry_for: conn.retry_for,
        compress: !conn.no_compress,
    };
    let agent = Agent::connect(cfg).await?;
    if agent.server() != conn.server.trim_end_matches('/') {
        // Stderr, so `--json` output stays one document.
        eprintln!(
            "{} is assigned to the process server at {}: replicating there",
            conn.machine,
            agent.server()
        );
    }
    Ok(agent)
}

async fn agent_sync(
    conn: Connection,
    disks: Vec<String>,
    watch: Option<u64>,
    hooks: QuiesceHooks,
    json: bool,
) -> anyhow::Result<()> {
    let disks = parse_disks(&disks)?;
    let agent = connect(&conn).await?;
    let mut asked: Option<gateway::consistency::BookmarkAsk> = None;
    loop {
        let total: u64 = disks
            .iter()
            .map(|d| {
                std::fs::File::open(&d.path)
                    .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                    .unwrap_or(0)
            })
            .sum();
        let bar = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("syncing {}", conn.machine));
        let ask = asked.take();
        // Any full sync compares every block; when the appliance asked for a resync, say so after.
        let resync = agent.requests().await.ok().and_then(|r| r.resync);
        if ask.is_some() {
            QuiesceHooks::run("quiesce", &hooks.quiesce).await?;
        }
        let b = bar.clone();
        let synced = agent.sync(&disks, Arc::new(move |n| b.inc(n))).await;
        bar.finish_and_clear();
        let bookmarked = match (&ask, &synced) {
            (Some(a), Ok(_)) => Some(agent.answer_bookmark(&a.label, Some(a.request)).await),
            _ => None,
        };
        if ask.is_some() {
            QuiesceHooks::run("thaw", &hooks.thaw).await?;
        }
        let summary = synced?;
        if let Some(why) = resync {
            agent.report_resync("done", "").await?;
            if !json {
                println!("resynchronised {} ({why})", conn.machine);
            }
        }
        if json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!(
                "synced {}: scanned {}, sent {} ({} on the wire) in {:.1}s",
                summary.machine,
                bytesize::ByteSize(summary.bytes_scanned),
                bytesize::ByteSize(summary.bytes_sent),
                bytesize::ByteSize(summary.wire_bytes),
                summary.seconds
            );
            for d in &summary.disks {
                println!(
                    "  {}: {} changed blocks, {} zeroed, sent {}, acked through seq {}",
                    d.disk,
                    d.blocks_changed,
                    d.blocks_zeroed,
                    bytesize::ByteSize(d.bytes_sent),
                    d.last_seq
                );
            }
        }
        match bookmarked {
            Some(Ok(ack)) if json => println!("{}", serde_json::json!({ "app_consistent_point": ack.point })),
            Some(Ok(ack)) => println!(
                "app-consistent point {} (requested by the appliance)",
                ack.point.unwrap_or(0)
            ),
            // A failed request is the appliance's to report (an event); replication goes on.
            Some(Err(e)) => tracing::warn!(error = %e, "requested app-consistent bookmark failed"),
            None => {}
        }
        let Some(secs) = watch else { return Ok(()) };
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1).min(until - tokio::time::Instant::now())) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
            match agent.requests().await {
                Ok(r) if r.bookmark.is_some() => {
                    asked = r.bookmark;
                    break;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "polling the appliance's requests"),
            }
        }
    }
}

async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let mut opts = std::collections::BTreeMap::new();
    for o in &a.blob_options {
        let (k, v) = o
            .split_once('=')
            .with_context(|| format!("--blob-option {o:?}: expected KEY=VALUE"))?;
        opts.insert(k.to_string(), v.to_string());
    }
    let store = gateway::blob::open_store(&a.blob_url, &opts)?;
    let passphrase = std::fs::read_to_string(&a.passphrase_file)
        .with_context(|| format!("reading {}", a.passphrase_file.display()))?;
    let kek = gateway::blob::open_keyring(store.as_ref(), passphrase.trim())
        .await?
        .with_context(|| format!("{} holds no Lifeboat keyring", a.blob_url))?;
    let path = object_store::path::Path::from(format!(
        "{}/disk.json",
        gateway::blob::layout::disk_prefix(&a.machine, &a.disk)
    ));
    let desc = store
        .get(&path)
        .await
        .with_context(|| format!("disk {}/{} is not in blob storage", a.machine, a.disk))?
        .bytes()
        .await?;
    let desc: gateway::server::DiskDescriptor = serde_json::from_slice(&desc).context("disk descriptor")?;
    let outcome = gateway::replay::replay_disk(
        store.as_ref(),
        &kek,
        &a.machine,
        &a.disk,
        desc.size,
        a.until_seq,
        &a.out,
    )
    .await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"machine": a.machine, "disk": a.disk, "size": desc.size, "segments": outcome.segments, "records": outcome.records, "last_seq": outcome.last_seq})
        );
    } else {
        println!(
            "restored {}/{} to {} ({} bytes) from {} segments, through seq {}",
            a.machine,
            a.disk,
            a.out.display(),
            desc.size,
            outcome.segments,
            outcome.last_seq
        );
    }
    Ok(())
}

async fn points_list(conn: management::AdminConnection, machine: String, json: bool) -> anyhow::Result<()> {
    let client = management::Client::connect(&conn)?;
    let points: Vec<lifeboat_fs::pit::PointInfo> = client.get(&format!("/api/machines/{machine}/points")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(());
    }
    if points.is_empty() {
        println!("{machine} has no recovery points yet");
        return Ok(());
    }
    println!(
        "{:>8}  {:<20}  {:<16}  {:<8}  label",
        "id", "time (UTC)", "kind", "state"
    );
    for p in points {
        let state = if p.readable { "ready" } else { "uploading" };
        println!("{:>8}  {:<20}  {:<16}  {:<8}  {}", p.id, p.time, p.kind, state, p.label);
    }
    Ok(())
}

async fn policy_command(cmd: PolicyCommand) -> anyhow::Result<()> {
    use management::NamedPolicy;
    match cmd {
        PolicyCommand::List { conn, json } => {
            let client = management::Client::connect(&conn)?;
            let list: Vec<NamedPolicy> = client.get("/api/policies").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<16} {:>10} {:>10} {:>10} {:>10}  machines",
                "name", "crash", "app", "retention", "rpo"
            );
            for p in list {
                println!(
                    "{:<16} {:>10} {:>10} {:>10} {:>10}  {}",
                    p.name,
                    p.policy.crash_consistent_interval,
                    p.policy.app_consistent_interval,
                    p.policy.retention,
                    p.policy.rpo_threshold,
                    p.machines.join(", ")
                );
            }
            Ok(())
        }
        PolicyCommand::Set {
            conn,
            name,
            crash_consistent_interval,
            app_consistent_interval,
            retention,
            rpo_threshold,
            json,
        } => {
            let client = management::Client::connect(&conn)?;
            let list: Vec<NamedPolicy> = client.get("/api/policies").await?;
            let mut policy = list
                .into_iter()
                .find(|p| p.name == name)
                .map(|p| p.policy)
                .unwrap_or_default();
            let set = |field: &mut String, v: Option<String>| {
                if let Some(v) = v {
                    *field = v;
                }
            };
            set(&mut policy.crash_consistent_interval, crash_consistent_interval);
            set(&mut policy.app_consistent_interval, app_consistent_interval);
            set(&mut policy.retention, retention);
            set(&mut policy.rpo_threshold, rpo_threshold);
            let saved: NamedPolicy = client.put(&format!("/api/policies/{name}"), &policy).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&saved)?);
            } else {
                println!("policy {name} saved");
            }
            Ok(())
        }
        PolicyCommand::Assign { conn, machine, policy } => {
            let client = management::Client::connect(&conn)?;
            let _: management::Assignment = client
                .put(
                    &format!("/api/machines/{machine}/policy"),
                    &management::Assignment { policy: policy.clone() },
                )
                .await?;
            println!("{machine} now follows policy {policy}");
            Ok(())
        }
    }
}

async fn index_rebuild(config: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let cfg = config::Config::load(config.as_deref())?.resolve()?;
    let passphrase = match &cfg.raw.security.passphrase {
        Some(p) => p.clone(),
        None => std::fs::read_to_string(&cfg.passphrase_file)
            .with_context(|| {
                format!(
                    "reading the passphrase from {} (put the lost appliance's passphrase there)",
                    cfg.passphrase_file.display()
                )
            })?
            .trim()
            .to_string(),
    };
    let store = gateway::blob::open_store(&cfg.blob_url, &cfg.raw.blob.options)?;
    let kek = gateway::blob::open_keyring(store.as_ref(), &passphrase)
        .await?
        .with_context(|| format!("{} holds no Lifeboat keyring", cfg.blob_url))?;
    let dir = cfg.data_dir.join("journal");
    let journal = tokio::task::spawn_blocking(move || gateway::journal::Journal::open(&dir, u64::MAX))
        .await?
        .context("opening the journal (is the appliance running? stop it first)")?;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(ProgressStyle::with_template("{spinner} {pos} segments indexed: {msg}").expect("template"));
    let b = bar.clone();
    let summary = gateway::rebuild::rebuild(&journal, store.as_ref(), &kek, move |seg| {
        b.inc(1);
        b.set_message(seg.to_string());
    })
    .await?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "rebuilt the catalogue from {}: {} machines, {} disks, {} segments, {} records, {} recovery points",
            cfg.blob_url, summary.machines, summary.disks, summary.segments, summary.records, summary.points
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_allocator(!matches!(cli.command, Command::Serve { .. }));
    init_logging(&cli.log, cli.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { config, json } => {
                let cfg = config::Config::load(config.as_deref())?.resolve()?;
                serve::run(cfg, json).await
            }
            Command::Agent(AgentCommand::Sync {
                conn,
                disks,
                watch,
                hooks,
                json,
            }) => agent_sync(conn, disks, watch, hooks, json).await,
            Command::Agent(AgentCommand::ResyncRequired { conn, reason }) => {
                connect(&conn).await?.report_resync("required", &reason).await?;
                println!("{} marked resync-required: {reason}", conn.machine);
                Ok(())
            }
            Command::Agent(AgentCommand::Bookmark { conn, label, json }) => {
                let agent = connect(&conn).await?;
                let ack = agent.bookmark(&label).await?;
                if json {
                    println!("{}", serde_json::to_string(&ack)?);
                } else {
                    println!(
                        "bookmark {:?} recorded as recovery point {}",
                        label,
                        ack.point.unwrap_or(0)
                    );
                }
                Ok(())
            }
            Command::Replay(a) => replay(a).await,
            Command::Points(PointsCommand::List { conn, machine, json }) => points_list(conn, machine, json).await,
            Command::Index(IndexCommand::Rebuild { config, json }) => index_rebuild(config, json).await,
            Command::Policy(cmd) => policy_command(cmd).await,
            Command::Machines(cmd) => ops_cli::machines(cmd).await,
            Command::Group(cmd) => ops_cli::group(cmd).await,
            Command::Plan(cmd) => ops_cli::plan(cmd).await,
            Command::Failover(a) => ops_cli::failover(a).await,
            Command::Failback(a) => ops_cli::failback(a).await,
            Command::Jobs(cmd) => ops_cli::jobs(cmd).await,
            Command::Events(a) => ops_cli::events(a).await,
            Command::Agents(a) => ops_cli::agents(a).await,
            Command::ProcessServers(cmd) => ops_cli::process_servers(cmd).await,
            Command::Mounts(a) => ops_cli::mounts(a).await,
            Command::Mount(args) => mount::run(args).await,
            Command::DefaultConfig => {
                print!("{}", toml::to_string_pretty(&config::Config::default())?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line: the error and its causes.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("lifeboat: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    }

    #[test]
    #[allow(unsafe_code)]
    fn allocator_tuning_turns_huge_pages_off() {
        // SAFETY: reads integer options of the linked allocator.
        let get = |o| unsafe { mi_option_get(o) };
        // The option numbers are mimalloc v3's: allow_thp defaults to 1 and its neighbour
        // page_cross_thread_max_reclaim to 32, so a renumbering shows here.
        assert_eq!((get(MI_OPTION_ALLOW_THP - 1), get(MI_OPTION_ALLOW_THP)), (32, 1));
        tune_allocator(true);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 1);
        tune_allocator(false);
        assert_eq!(get(MI_OPTION_ALLOW_THP), 0);
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains("THP_enabled:\t0"), "{status}");
    }
}

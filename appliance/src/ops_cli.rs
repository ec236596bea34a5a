//! Operator commands for the config server's operations — `machines`, `group`, `plan`,
//! `failover`, `failback`, `jobs`, `events`, `agents`, `process-servers`, `mounts` — each a thin client of the management API
//! (`--json` prints what the API answered, for scripts).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use gateway::events::Event;
use gateway::groups::{Group, NamedGroup};
use indicatif::{ProgressBar, ProgressStyle};

use crate::jobs::{Job, JobKind, JobRequest, JobState};
use crate::management::{AdminConnection, Client, MachineInfo};
use crate::operations::{BookmarkAsked, ProcessServerAssignment, ProcessServerInfo};
use crate::plans::{NamedPlan, Plan};

#[derive(Subcommand)]
pub enum MachinesCommand {
    /// Protected machines: state, policy, group, newest point, disks.
    List {
        #[command(flatten)]
        conn: AdminConnection,
        #[arg(long)]
        json: bool,
    },
    /// Mark a machine resync-required: its agent's next sync compares every block with the
    /// appliance's checksums and sends what differs.
    Resync {
        #[command(flatten)]
        conn: AdminConnection,
        machine: String,
    },
    /// Ask a machine's agent (all agents of its replication group) for an app-consistent point now.
    Bookmark {
        #[command(flatten)]
        conn: AdminConnection,
        machine: String,
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Replication groups and their members.
    List {
        #[command(flatten)]
        conn: AdminConnection,
        #[arg(long)]
        json: bool,
    },
    /// Create or replace a group: its members share every recovery point (multi-VM consistency).
    Set {
        #[command(flatten)]
        conn: AdminConnection,
        name: String,
        /// A member machine (repeat for each).
        #[arg(long = "machine", required = true)]
        machines: Vec<String>,
        /// The policy every member follows.
        #[arg(long, default_value = "default")]
        policy: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group (its members keep their policy and get points of their own).
    Delete {
        #[command(flatten)]
        conn: AdminConnection,
        name: String,
    },
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Recovery plans and their steps.
    List {
        #[command(flatten)]
        conn: AdminConnection,
        #[arg(long)]
        json: bool,
    },
    /// Create or replace a plan from a JSON file:
    /// `{"steps": [{"type": "machines", "machines": ["db"]}, {"type": "script", "command": "..."},
    /// {"type": "pause", "message": "..."}, {"type": "machines", "machines": ["web1", "web2"]}]}`.
    Set {
        #[command(flatten)]
        conn: AdminConnection,
        name: String,
        /// The plan as JSON.
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete a plan.
    Delete {
        #[command(flatten)]
        conn: AdminConnection,
        name: String,
    },
}

/// Which machines a job works on.
#[derive(Args, Clone)]
pub struct JobScope {
    /// A recovery plan.
    #[arg(long, conflicts_with = "machines", required_unless_present = "machines")]
    plan: Option<String>,
    /// A machine (repeat for several; they form one step).
    #[arg(long = "machine")]
    machines: Vec<String>,
}

#[derive(Args)]
pub struct FailoverArgs {
    #[command(flatten)]
    conn: AdminConnection,
    #[command(flatten)]
    scope: JobScope,
    /// Test failover: writable NBD exports (MACHINE/DISK@test-failover) whose writes go to a
    /// copy-on-write overlay; replication keeps running.
    #[arg(long, group = "mode")]
    test: bool,
    /// Discard a test failover's exports and overlays.
    #[arg(long, group = "mode")]
    cleanup: bool,
    /// Make a failover final.
    #[arg(long, group = "mode")]
    commit: bool,
    /// The point: latest, latest-app, an id, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Failover: write each disk to DIR/MACHINE/DISK.img.
    #[arg(long)]
    target_dir: Option<PathBuf>,
    /// Failover: MACHINE/DISK=PATH, a file or block device for one disk.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Failover to the cloud: write each disk as the object PREFIX/MACHINE/DISK.img (or .vhd)
    /// in the appliance's blob storage.
    #[arg(long, value_name = "PREFIX")]
    target_blob: Option<String>,
    /// With --target-blob: raw, or vhd (a fixed VHD that Azure imports as a managed disk).
    #[arg(long, requires = "target_blob", value_parser = ["raw", "vhd"])]
    image_format: Option<String>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args)]
pub struct FailbackArgs {
    #[command(flatten)]
    conn: AdminConnection,
    #[command(flatten)]
    scope: JobScope,
    /// MACHINE/DISK=PATH: the on-premises disk (file or block device) to write back to.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// What to write back: failover-copy (the failed-over disks as they are now) or point.
    #[arg(long, default_value = "failover-copy")]
    source: String,
    /// With --source point: latest, latest-app, an id, or an RFC 3339 time.
    #[arg(long, default_value = "latest")]
    point: String,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args)]
pub struct WaitArgs {
    /// Return as soon as the job started instead of waiting for it to end (or pause).
    #[arg(long)]
    no_wait: bool,
    /// Print the job as JSON (no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Jobs, newest first.
    List {
        #[command(flatten)]
        conn: AdminConnection,
        #[arg(long)]
        json: bool,
    },
    /// One job with its steps and results.
    Show {
        #[command(flatten)]
        conn: AdminConnection,
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Resume a job paused at a manual step.
    Resume {
        #[command(flatten)]
        conn: AdminConnection,
        id: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    conn: AdminConnection,
    /// Only this machine's events.
    #[arg(long, default_value = "")]
    machine: String,
    /// Only events after this id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    #[arg(long)]
    json: bool,
}

/// GETs a list from the management API. With `--json` it is printed as the API answered and
/// `None` comes back; otherwise the caller prints it as a table.
async fn fetch_list<T: serde::de::DeserializeOwned + serde::Serialize>(
    conn: &AdminConnection,
    path: &str,
    json: bool,
) -> anyhow::Result<Option<Vec<T>>> {
    let list: Vec<T> = Client::connect(conn)?.get(path).await?;
    if json {
        print_json(&list)?;
        return Ok(None);
    }
    Ok(Some(list))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn machines(cmd: MachinesCommand) -> anyhow::Result<()> {
    match cmd {
        MachinesCommand::List { conn, json } => {
            let Some(list) = fetch_list::<MachineInfo>(&conn, "/api/machines", json).await? else {
                return Ok(());
            };
            println!(
                "{:<20} {:<14} {:<12} {:<12} {:<12} {:>8}  disks",
                "MACHINE", "STATE", "POLICY", "GROUP", "PROC.SERVER", "POINT"
            );
            for m in list {
                let disks: Vec<String> = m
                    .disks
                    .iter()
                    .map(|d| format!("{} ({})", d.disk, bytesize::ByteSize(d.size)))
                    .collect();
                println!(
                    "{:<20} {:<14} {:<12} {:<12} {:<12} {:>8}  {}",
                    m.machine,
                    m.state,
                    m.policy,
                    if m.group.is_empty() { "-" } else { &m.group },
                    if m.process_server.is_empty() {
                        gateway::process_servers::LOCAL
                    } else {
                        &m.process_server
                    },
                    m.latest_point.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    disks.join(", ")
                );
            }
            Ok(())
        }
        MachinesCommand::Resync { conn, machine } => {
            Client::connect(&conn)?
                .post_empty(&format!("/api/machines/{machine}/resync"))
                .await?;
            println!("{machine} marked resync-required; its next sync compares every block");
            Ok(())
        }
        MachinesCommand::Bookmark {
            conn,
            machine,
            label,
            json,
        } => {
            let asked: BookmarkAsked = Client::connect(&conn)?
                .post(
                    &format!("/api/machines/{machine}/bookmark"),
                    &serde_json::json!({ "label": label }),
                )
                .await?;
            if json {
                return print_json(&asked);
            }
            println!(
                "asked {}'s agent for an app-consistent point (request {}); it answers on its next check",
                asked.machine, asked.request
            );
            Ok(())
        }
    }
}

pub async fn group(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List { conn, json } => {
            let Some(list) = fetch_list::<NamedGroup>(&conn, "/api/groups", json).await? else {
                return Ok(());
            };
            for g in list {
                println!(
                    "{:<20} policy {:<12} {}",
                    g.name,
                    g.group.policy,
                    g.group.machines.join(", ")
                );
            }
            Ok(())
        }
        GroupCommand::Set {
            conn,
            name,
            machines,
            policy,
            json,
        } => {
            let saved: NamedGroup = Client::connect(&conn)?
                .put(&format!("/api/groups/{name}"), &Group { machines, policy })
                .await?;
            if json {
                return print_json(&saved);
            }
            println!(
                "group {} saved: {} share their recovery points (policy {})",
                saved.name,
                saved.group.machines.join(", "),
                saved.group.policy
            );
            Ok(())
        }
        GroupCommand::Delete { conn, name } => {
            Client::connect(&conn)?.delete(&format!("/api/groups/{name}")).await?;
            println!("group {name} deleted");
            Ok(())
        }
    }
}

pub async fn plan(cmd: PlanCommand) -> anyhow::Result<()> {
    match cmd {
        PlanCommand::List { conn, json } => {
            let Some(list) = fetch_list::<NamedPlan>(&conn, "/api/plans", json).await? else {
                return Ok(());
            };
            for p in list {
                println!("{}:", p.name);
                for (i, s) in p.plan.steps.iter().enumerate() {
                    println!("  {}. {}", i + 1, serde_json::to_string(s)?);
                }
            }
            Ok(())
        }
        PlanCommand::Set { conn, name, file, json } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let plan: Plan =
                serde_json::from_str(&text).with_context(|| format!("{} is not a plan", file.display()))?;
            let saved: NamedPlan = Client::connect(&conn)?
                .put(&format!("/api/plans/{name}"), &plan)
                .await?;
            if json {
                return print_json(&saved);
            }
            println!("plan {} saved ({} steps)", saved.name, saved.plan.steps.len());
            Ok(())
        }
        PlanCommand::Delete { conn, name } => {
            Client::connect(&conn)?.delete(&format!("/api/plans/{name}")).await?;
            println!("plan {name} deleted");
            Ok(())
        }
    }
}

fn parse_targets(targets: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    targets
        .iter()
        .map(|t| {
            let (k, v) = t
                .split_once('=')
                .with_context(|| format!("--target {t:?}: expected MACHINE/DISK=PATH"))?;
            anyhow::ensure!(k.contains('/'), "--target {t:?}: expected MACHINE/DISK=PATH");
            Ok((k.to_string(), PathBuf::from(v)))
        })
        .collect()
}

pub async fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    let kind = if a.test {
        JobKind::TestFailover
    } else if a.cleanup {
        JobKind::TestFailoverCleanup
    } else if a.commit {
        JobKind::FailoverCommit
    } else {
        JobKind::Failover
    };
    let req = JobRequest {
        kind,
        plan: a.scope.plan,
        machines: a.scope.machines,
        point: Some(a.point),
        target_dir: a.target_dir.map(|d| std::path::absolute(d).unwrap_or_default()),
        targets: parse_targets(&a.targets)?,
        target_blob: a.target_blob,
        image_format: a.image_format,
        source: None,
    };
    run_job(&a.conn, &req, &a.wait).await
}

pub async fn failback(a: FailbackArgs) -> anyhow::Result<()> {
    let req = JobRequest {
        kind: JobKind::Failback,
        plan: a.scope.plan,
        machines: a.scope.machines,
        point: Some(a.point),
        target_dir: None,
        targets: parse_targets(&a.targets)?,
        target_blob: None,
        image_format: None,
        source: Some(a.source),
    };
    run_job(&a.conn, &req, &a.wait).await
}

async fn run_job(conn: &AdminConnection, req: &JobRequest, wait: &WaitArgs) -> anyhow::Result<()> {
    let client = Client::connect(conn)?;
    let job: Job = client.post("/api/jobs", req).await?;
    follow(&client, job, wait).await
}

/// Waits (unless --no-wait) for the job to end or pause, with a progress bar, then prints it.
async fn follow(client: &Client, mut job: Job, wait: &WaitArgs) -> anyhow::Result<()> {
    if !wait.no_wait {
        let bar = if wait.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(0)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} job {msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        while job.state == JobState::Running {
            bar.set_length(job.progress_total_bytes);
            bar.set_position(job.progress_done_bytes);
            bar.set_message(format!("{} {}", job.id, job.request.kind.name()));
            tokio::time::sleep(Duration::from_millis(300)).await;
            job = client.get(&format!("/api/jobs/{}", job.id)).await?;
        }
        bar.finish_and_clear();
    }
    if wait.json {
        print_json(&job)?;
    } else {
        print_job(&job);
    }
    if job.state == JobState::Failed {
        anyhow::bail!("job {} failed: {}", job.id, job.error);
    }
    Ok(())
}

fn print_job(job: &Job) {
    println!(
        "job {} {} — {}{}",
        job.id,
        job.request.kind.name(),
        job.state.name(),
        if job.error.is_empty() {
            String::new()
        } else {
            format!(": {}", job.error)
        }
    );
    for (i, s) in job.steps.iter().enumerate() {
        println!(
            "  {}. {:<8} {}{}",
            i + 1,
            s.state,
            s.step,
            if s.message.is_empty() {
                String::new()
            } else {
                format!(" — {}", s.message)
            }
        );
    }
    for r in &job.results {
        let mut line = format!("  {}:", r.machine);
        if let Some(p) = r.point {
            line += &format!(" point {p} {}", r.point_time);
        }
        for e in &r.exports {
            line += &format!(" nbd export {e}");
        }
        for (d, t) in &r.targets {
            line += &format!(" {d}→{}", t.display());
        }
        if r.blocks_compared > 0 {
            line += &format!(" ({} of {} blocks written)", r.blocks_written, r.blocks_compared);
        }
        println!("{line}");
    }
}

pub async fn jobs(cmd: JobsCommand) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::List { conn, json } => {
            let Some(list) = fetch_list::<Job>(&conn, "/api/jobs", json).await? else {
                return Ok(());
            };
            println!("{:>5} {:<22} {:<10} {:>5}  scope", "ID", "KIND", "STATE", "STEP");
            for j in list {
                let scope = match &j.request.plan {
                    Some(p) => format!("plan {p}"),
                    None => j.request.machines.join(", "),
                };
                println!(
                    "{:>5} {:<22} {:<10} {:>2}/{:<2}  {scope}",
                    j.id,
                    j.request.kind.name(),
                    j.state.name(),
                    j.step.min(j.steps.len()),
                    j.steps.len()
                );
            }
            Ok(())
        }
        JobsCommand::Show { conn, id, json } => {
            let job: Job = Client::connect(&conn)?.get(&format!("/api/jobs/{id}")).await?;
            if json {
                return print_json(&job);
            }
            print_job(&job);
            Ok(())
        }
        JobsCommand::Resume { conn, id, wait } => {
            let client = Client::connect(&conn)?;
            let job: Job = client
                .post(&format!("/api/jobs/{id}/resume"), &serde_json::json!({}))
                .await?;
            follow(&client, job, &wait).await
        }
    }
}

pub async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let Some(list) = fetch_list::<Event>(
        &a.conn,
        &format!("/api/events?after={}&machine={}", a.after, a.machine),
        a.json,
    )
    .await?
    else {
        return Ok(());
    };
    for e in list {
        println!(
            "{:>6} {} {:<7} {:<28} {}{}",
            e.id,
            lifeboat_fs::pit::format_time(e.time_ms),
            serde_json::to_value(e.severity)?.as_str().unwrap_or(""),
            e.kind,
            if e.machine.is_empty() {
                String::new()
            } else {
                format!("[{}] ", e.machine)
            },
            e.message
        );
    }
    Ok(())
}

/// `--json` and where the management API is: the arguments of the plain list commands.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    conn: AdminConnection,
    #[arg(long)]
    json: bool,
}

/// `lifeboat agents`: registered mobility agents, their version and when they were last heard.
pub async fn agents(a: ListArgs) -> anyhow::Result<()> {
    let Some(list) = fetch_list::<gateway::server::AgentInfo>(&a.conn, "/api/agents", a.json).await? else {
        return Ok(());
    };
    println!("{:<20} {:<10} {:<20} LAST SEEN", "MACHINE", "VERSION", "REGISTERED");
    for ag in list {
        println!(
            "{:<20} {:<10} {:<20} {}",
            ag.machine,
            ag.version,
            lifeboat_fs::pit::format_time(ag.registered_ms),
            lifeboat_fs::pit::format_time(ag.last_seen_ms)
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum ProcessServersCommand {
    /// The process servers: this appliance's (`local`) and scale-out ones, with their state,
    /// cache fill and machines.
    List(ListArgs),
    /// Send a machine's agent to a process server from now on (`local`: this appliance). A
    /// machine moved to another process server starts with a full compare there.
    Assign {
        #[command(flatten)]
        conn: AdminConnection,
        machine: String,
        process_server: String,
    },
}

pub async fn process_servers(cmd: ProcessServersCommand) -> anyhow::Result<()> {
    match cmd {
        ProcessServersCommand::List(a) => {
            let Some(list) = fetch_list::<ProcessServerInfo>(&a.conn, "/api/process-servers", a.json).await? else {
                return Ok(());
            };
            println!(
                "{:<16} {:<12} {:<22} {:>21}  machines (assigned)",
                "NAME", "STATE", "ADDRESS", "CACHE USED / LIMIT"
            );
            for p in list {
                println!(
                    "{:<16} {:<12} {:<22} {:>21}  {} ({})",
                    p.name,
                    p.state,
                    p.address,
                    format!(
                        "{} / {}",
                        bytesize::ByteSize(p.cache_used_bytes),
                        bytesize::ByteSize(p.cache_limit_bytes)
                    ),
                    if p.machines.is_empty() {
                        "-".into()
                    } else {
                        p.machines.join(", ")
                    },
                    p.assigned.join(", ")
                );
            }
            Ok(())
        }
        ProcessServersCommand::Assign {
            conn,
            machine,
            process_server,
        } => {
            let a: ProcessServerAssignment = Client::connect(&conn)?
                .put(
                    &format!("/api/machines/{machine}/process-server"),
                    &serde_json::json!({ "process_server": process_server }),
                )
                .await?;
            println!(
                "{}'s agent is sent to process server {} from its next registration",
                a.machine, a.process_server
            );
            Ok(())
        }
    }
}

/// `lifeboat mounts`: the `lifeboat mount` clients running now.
pub async fn mounts(a: ListArgs) -> anyhow::Result<()> {
    let Some(list) = fetch_list::<crate::mounts::MountSession>(&a.conn, "/api/mounts", a.json).await? else {
        return Ok(());
    };
    println!(
        "{:<20} {:<8} {:<20} {:<12} MOUNTPOINT",
        "HOST", "PID", "SINCE", "MACHINE"
    );
    for m in list {
        println!(
            "{:<20} {:<8} {:<20} {:<12} {}",
            m.host,
            m.pid,
            lifeboat_fs::pit::format_time(m.since_ms),
            m.machine.as_deref().unwrap_or("all"),
            m.mountpoint
        );
    }
    Ok(())
}

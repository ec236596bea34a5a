//! The appliance's init (PID 1 in the initramfs; the builder binary copies itself in as
//! `/init`). In order: mount the kernel filesystems, load the driver modules, read the OVF
//! environment (CD-ROM `ovf-env.xml`, else VMware guestinfo), set the host name and network
//! (DHCP unless a static address is given), format or mount the cache disk, write the
//! `lifeboat` config and passphrase, start `lifeboat serve` with all roles on the appliance
//! ports, print where to reach it and the TLS fingerprint, and keep it running (restart on exit,
//! reap orphans). Every problem is said on the console and the boot goes on with what works.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount, MsFlags};

use crate::firstboot::{self, Blob, Network, Plan, Props};

pub const MODULE_DIR: &str = "/lib/modules/lifeboat";
pub const MODULE_LIST: &str = "/lib/modules/lifeboat/load.list";
pub const BUSYBOX: &str = "/bin/busybox";
pub const LIFEBOAT: &str = "/usr/bin/lifeboat";
pub const MKE2FS: &str = "/sbin/mke2fs";
pub const CONFIG: &str = "/run/lifeboat.toml";
pub const DATA_MOUNT: &str = "/data";
pub const DATA_LABEL: &str = "lifeboat-data";
/// A data disk smaller than this is not used (the appliance runs from RAM instead).
pub const MIN_DATA_DISK: u64 = 1 << 30;

/// True when this process is the kernel's first process.
pub fn is_init() -> bool {
    std::process::id() == 1
}

/// Everything written to the operator goes to every active console (VGA and serial).
#[derive(Clone)]
pub struct Console {
    outs: Arc<Mutex<Vec<File>>>,
}

impl Console {
    fn open() -> Self {
        let mut outs = Vec::new();
        let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
        for name in active.split_whitespace() {
            if let Ok(f) = OpenOptions::new().write(true).open(format!("/dev/{name}")) {
                outs.push(f);
            }
        }
        if outs.is_empty() {
            if let Ok(f) = OpenOptions::new().write(true).open("/dev/console") {
                outs.push(f);
            }
        }
        Self {
            outs: Arc::new(Mutex::new(outs)),
        }
    }

    pub fn say(&self, msg: &str) {
        let mut outs = self.outs.lock().unwrap_or_else(|e| e.into_inner());
        let text = format!("{}\r\n", msg.replace('\n', "\r\n"));
        if outs.is_empty() {
            print!("{text}");
        }
        for o in outs.iter_mut() {
            let _ = o.write_all(text.as_bytes());
        }
    }

    fn problem(&self, problems: &mut Vec<String>, msg: String) {
        self.say(&format!("lifeboat-init: PROBLEM: {msg}"));
        problems.push(msg);
    }
}

fn busybox(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(BUSYBOX).args(args).stdin(Stdio::null()).output()
}

fn mount_kernel_filesystems() {
    let _ = std::fs::create_dir_all("/dev");
    let _ = mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::empty(),
        None::<&str>,
    );
    for (src, dir, fs, flags) in [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        ),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
    ] {
        let _ = std::fs::create_dir_all(dir);
        let _ = mount(Some(src), dir, Some(fs), flags, None::<&str>);
    }
    let _ = std::fs::create_dir_all("/dev/pts");
    let _ = mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::empty(),
        None::<&str>,
    );
}

fn load_modules(con: &Console) {
    let list = std::fs::read_to_string(MODULE_LIST).unwrap_or_default();
    let params = CString::default();
    let mut loaded = 0;
    for file in list.lines().filter(|l| !l.trim().is_empty()) {
        let path = Path::new(MODULE_DIR).join(file);
        let res = match File::open(&path) {
            Ok(f) => nix::kmod::finit_module(&f, &params, nix::kmod::ModuleInitFlags::empty()),
            Err(e) => Err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc_enoent()))),
        };
        match res {
            Ok(()) => loaded += 1,
            // Already loaded, or a CPU-specific module this CPU cannot use.
            Err(nix::Error::EEXIST) | Err(nix::Error::ENODEV) => {}
            Err(e) => con.say(&format!("lifeboat-init: module {file}: {e}")),
        }
    }
    con.say(&format!("lifeboat-init: {loaded} driver modules loaded"));
}

fn libc_enoent() -> i32 {
    nix::Error::ENOENT as i32
}

fn block_devices() -> BTreeSet<String> {
    std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("fd"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the set of block devices has not changed for two seconds (at most 20 s).
fn settle_devices() -> BTreeSet<String> {
    let start = Instant::now();
    let mut last = block_devices();
    let mut since = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        let now = block_devices();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_secs(2) && last.iter().any(|d| !d.starts_with("sr")) {
            break;
        }
    }
    last
}

fn read_sectors(dev: &str, bytes: usize) -> Option<Vec<u8>> {
    let mut f = File::open(format!("/dev/{dev}")).ok()?;
    let mut v = vec![0u8; bytes];
    f.read_exact(&mut v).ok()?;
    Some(v)
}

/// The disk the appliance booted from: GPT whose first entry is named `lifeboat-esp`.
fn is_system_disk(dev: &str) -> bool {
    let Some(d) = read_sectors(dev, 34 * 512) else {
        return false;
    };
    if &d[512..520] != b"EFI PART" {
        return false;
    }
    let name: Vec<u16> = d[1024 + 56..1024 + 128]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&name) == crate::disk::ESP_NAME
}

fn disk_bytes(dev: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/block/{dev}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 512
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Reads `ovf-env.xml` from a CD-ROM, whatever case or ISO version suffix its name has.
fn ovf_env_from_cdrom(con: &Console, devices: &BTreeSet<String>) -> Option<(String, String)> {
    let dir = "/run/ovf-cd";
    let _ = std::fs::create_dir_all(dir);
    for dev in devices.iter().filter(|d| d.starts_with("sr")) {
        let src = format!("/dev/{dev}");
        if let Err(e) = mount(
            Some(src.as_str()),
            dir,
            Some("iso9660"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            con.say(&format!("lifeboat-init: CD-ROM {src}: cannot mount ({e}); skipped"));
            continue;
        }
        let mut found = None;
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let n = e.file_name().to_string_lossy().to_ascii_lowercase();
                let n = n.trim_end_matches(";1").trim_end_matches('.').replace('_', "-");
                if n == "ovf-env.xml" {
                    found = Some(std::fs::read(e.path()));
                    break;
                }
            }
        }
        let _ = umount(dir);
        match found {
            Some(Ok(bytes)) => return Some((format!("{src} (ISO transport)"), String::from_utf8_lossy(&bytes).into())),
            Some(Err(e)) => con.say(&format!("lifeboat-init: {src}: ovf-env.xml unreadable: {e}")),
            None => {}
        }
    }
    None
}

/// Reads `guestinfo.ovfEnv` through the VMware backdoor (only on VMware).
fn ovf_env_from_guestinfo(con: &Console) -> Option<(String, String)> {
    if !vmw_backdoor::is_vmware_cpu() {
        return None;
    }
    let r = (|| -> Result<Option<Vec<u8>>, String> {
        let mut guard = vmw_backdoor::probe_backdoor_privileged().map_err(|e| e.to_string())?;
        let mut chan = guard.open_enhanced_chan().map_err(|e| e.to_string())?;
        chan.get_guestinfo(b"guestinfo.ovfEnv").map_err(|e| e.to_string())
    })();
    match r {
        Ok(Some(v)) if !v.is_empty() => Some(("VMware guestinfo.ovfEnv".into(), String::from_utf8_lossy(&v).into())),
        Ok(_) => None,
        Err(e) => {
            con.say(&format!("lifeboat-init: VMware guestinfo unreadable: {e}"));
            None
        }
    }
}

fn read_properties(con: &Console, devices: &BTreeSet<String>, problems: &mut Vec<String>) -> Props {
    let source = ovf_env_from_cdrom(con, devices).or_else(|| ovf_env_from_guestinfo(con));
    match source {
        None => {
            con.problem(
                problems,
                "no OVF environment (no CD-ROM with ovf-env.xml, no VMware guestinfo): using defaults (DHCP, a generated \
                 passphrase, recovery data on the cache disk)"
                    .into(),
            );
            Props::new()
        }
        Some((from, xml)) => match firstboot::parse_ovf_env(&xml) {
            Ok(p) => {
                con.say(&format!("lifeboat-init: {} properties from {from}", p.len()));
                p
            }
            Err(e) => {
                con.problem(problems, format!("{e} (from {from}); using defaults"));
                Props::new()
            }
        },
    }
}

fn nics() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo" && !n.starts_with("sit") && !n.starts_with("tunl"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The IPv4 address of `ifname`, if it has one.
fn ipv4_of(ifname: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        if a.interface_name != ifname {
            return None;
        }
        a.address?.as_sockaddr_in().map(|s| s.ip())
    })
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# udhcpc hook: apply the lease (busybox ip), write resolv.conf.
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
      ip route del default 2>/dev/null
      for r in $router; do ip route add default via "$r" dev "$interface" && break; done
    fi
    if [ -n "$dns" ] && [ ! -e /run/dns-static ]; then
      : > /etc/resolv.conf
      [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
      for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    fi ;;
esac
exit 0
"#;

fn setup_network(con: &Console, plan: &Plan, problems: &mut Vec<String>) -> Option<(String, Ipv4Addr)> {
    let _ = busybox(&["ip", "link", "set", "lo", "up"]);
    let start = Instant::now();
    let mut ifs = nics();
    while ifs.is_empty() && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(250));
        ifs = nics();
    }
    let Some(eth) = ifs.first().cloned() else {
        con.problem(
            problems,
            "no network adapter found (vmxnet3, e1000 or virtio expected)".into(),
        );
        return None;
    };
    if !plan.dns.is_empty() {
        let text: String = plan.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        let _ = std::fs::write("/etc/resolv.conf", text);
        let _ = std::fs::write("/run/dns-static", b"");
    }
    match &plan.network {
        Network::Static { ip, prefix, gateway } => {
            con.say(&format!("lifeboat-init: {eth}: static address {ip}/{prefix}"));
            let _ = busybox(&["ip", "link", "set", &eth, "up"]);
            let out = busybox(&["ip", "addr", "add", &format!("{ip}/{prefix}"), "dev", &eth]);
            if let Ok(o) = &out {
                if !o.status.success() {
                    con.problem(
                        problems,
                        format!(
                            "{eth}: cannot set {ip}/{prefix}: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                    );
                }
            }
            if let Some(gw) = gateway {
                let o = busybox(&["ip", "route", "add", "default", "via", &gw.to_string(), "dev", &eth]);
                if o.map(|o| !o.status.success()).unwrap_or(true) {
                    con.problem(problems, format!("{eth}: cannot add the default route via {gw}"));
                }
            }
        }
        Network::Dhcp => {
            con.say(&format!("lifeboat-init: {eth}: asking for an address by DHCP"));
            let _ = std::fs::create_dir_all("/etc");
            let _ = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open("/etc/udhcpc.script")
                .and_then(|mut f| f.write_all(UDHCPC_SCRIPT.as_bytes()));
            // Returns once bound (the client stays in the background to renew), or after ~30 s.
            let _ = Command::new(BUSYBOX)
                .args([
                    "udhcpc",
                    "-i",
                    &eth,
                    "-s",
                    "/etc/udhcpc.script",
                    "-t",
                    "10",
                    "-T",
                    "3",
                    "-b",
                    "-S",
                ])
                .args(["-x", &format!("hostname:{}", plan.hostname)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let ip = ipv4_of(&eth);
    if ip.is_none() {
        con.problem(
            problems,
            format!("{eth} has no IPv4 address yet (DHCP keeps trying in the background)"),
        );
    }
    ip.map(|ip| (eth, ip))
}

/// What the data dir ended up on.
struct DataDisk {
    dir: PathBuf,
    fs_bytes: u64,
    what: String,
}

fn ext4_label(dev: &str) -> Option<String> {
    let d = read_sectors(dev, 2048)?;
    let sb = &d[1024..];
    if u16::from_le_bytes([sb[56], sb[57]]) != 0xef53 {
        return None;
    }
    let label = &sb[120..136];
    Some(String::from_utf8_lossy(&label[..label.iter().position(|&b| b == 0).unwrap_or(16)]).into_owned())
}

fn is_blank(dev: &str) -> bool {
    read_sectors(dev, 1 << 20).is_some_and(|d| d.iter().all(|&b| b == 0))
}

fn statvfs_bytes(path: &str) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks() * s.fragment_size())
        .unwrap_or(0)
}

fn ram_data_dir(con: &Console, problems: &mut Vec<String>, why: String) -> DataDisk {
    con.problem(
        problems,
        format!("{why}; the data dir is in RAM for now and nothing survives a reboot: attach a blank disk of at least 1 GiB as the second disk and reboot"),
    );
    let _ = std::fs::create_dir_all(DATA_MOUNT);
    let _ = mount(
        Some("tmpfs"),
        DATA_MOUNT,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("size=50%"),
    );
    DataDisk {
        dir: Path::new(DATA_MOUNT).join("lifeboat"),
        fs_bytes: statvfs_bytes(DATA_MOUNT),
        what: "RAM (tmpfs)".into(),
    }
}

fn setup_data_disk(con: &Console, devices: &BTreeSet<String>, problems: &mut Vec<String>) -> DataDisk {
    let candidates: Vec<&String> = devices
        .iter()
        .filter(|d| !d.starts_with("sr"))
        .filter(|d| {
            std::fs::read_to_string(format!("/sys/block/{d}/ro"))
                .map(|s| s.trim() == "0")
                .unwrap_or(true)
        })
        .filter(|d| !is_system_disk(d))
        .collect();
    let Some(dev) = candidates.first().map(|d| d.to_string()) else {
        return ram_data_dir(con, problems, "no cache disk found (the OVA's second disk)".into());
    };
    let size = disk_bytes(&dev);
    let path = format!("/dev/{dev}");
    match ext4_label(&dev) {
        Some(l) if l == DATA_LABEL => {
            con.say(&format!(
                "lifeboat-init: cache disk {path} ({}) already formatted",
                human(size)
            ));
        }
        Some(other) => {
            return ram_data_dir(
                con,
                problems,
                format!("cache disk {path} holds an ext4 filesystem labelled {other:?}, not {DATA_LABEL:?}; it is left untouched"),
            );
        }
        None if !is_blank(&dev) => {
            return ram_data_dir(
                con,
                problems,
                format!("cache disk {path} is not blank and not a Lifeboat cache disk; it is left untouched"),
            );
        }
        None if size < MIN_DATA_DISK => {
            return ram_data_dir(
                con,
                problems,
                format!(
                    "cache disk {path} is {}, smaller than the 1 GiB minimum (256 GiB recommended)",
                    human(size)
                ),
            );
        }
        None => {
            con.say(&format!(
                "lifeboat-init: formatting the blank cache disk {path} ({}) as ext4",
                human(size)
            ));
            let out = Command::new(MKE2FS)
                .args(["-t", "ext4", "-F", "-q", "-m", "0", "-L", DATA_LABEL])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
                .arg(&path)
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return ram_data_dir(
                        con,
                        problems,
                        format!(
                            "formatting {path} failed: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                    )
                }
                Err(e) => return ram_data_dir(con, problems, format!("cannot run {MKE2FS}: {e}")),
            }
        }
    }
    let _ = std::fs::create_dir_all(DATA_MOUNT);
    if let Err(e) = mount(
        Some(path.as_str()),
        DATA_MOUNT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    ) {
        return ram_data_dir(con, problems, format!("cannot mount the cache disk {path}: {e}"));
    }
    DataDisk {
        dir: Path::new(DATA_MOUNT).join("lifeboat"),
        fs_bytes: statvfs_bytes(DATA_MOUNT),
        what: format!("{path} (ext4, {})", human(size)),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn apply_passphrase(con: &Console, plan: &Plan, data_dir: &Path, problems: &mut Vec<String>) {
    let file = data_dir.join("passphrase");
    let Some(want) = &plan.passphrase else {
        if !file.exists() {
            con.say("lifeboat-init: no passphrase property: the appliance generates one (see the passphrase file in the data dir)");
        }
        return;
    };
    match std::fs::read_to_string(&file) {
        Err(_) => {
            if let Err(e) = write_private(&file, format!("{want}\n").as_bytes()) {
                con.problem(problems, format!("cannot write {}: {e}", file.display()));
            }
        }
        Ok(have) if have.trim_end_matches('\n') == want => {}
        Ok(_) => con.problem(
            problems,
            "the passphrase property differs from the one this appliance was set up with; keeping the original (the \
             keys in blob storage depend on it)"
                .into(),
        ),
    }
}

fn banner(
    con: &Console,
    addr: Option<Ipv4Addr>,
    ready: &serde_json::Value,
    data: &str,
    blob: &str,
    problems: &[String],
) {
    let host = addr.map(|a| a.to_string()).unwrap_or_else(|| "<no address yet>".into());
    let fp = ready["fingerprint"].as_str().unwrap_or("?");
    let line = "=".repeat(72);
    let mut s = format!(
        "{line}\n Lifeboat appliance {} is ready\n\
         \x20 Management   https://{host}/\n\
         \x20 Replication  https://{host}:9443/   (agents: --server https://{host}:9443)\n\
         \x20 NBD          {host}:10809\n\
         \x20 Metrics      http://{host}:9464/metrics\n\
         \x20 TLS certificate SHA-256 fingerprint:\n    {fp}\n\
         \x20 Data:        {data}\n\
         \x20 Blob storage {blob}\n",
        env!("CARGO_PKG_VERSION")
    );
    if !problems.is_empty() {
        s.push_str(" Problems found at boot (the appliance runs with what works):\n");
        for p in problems {
            s.push_str(&format!("  - {p}\n"));
        }
    }
    s.push_str(&line);
    con.say(&s);
}

fn blob_text(b: &Blob) -> String {
    match b {
        Blob::Local => "file://DATA_DIR/blob (on the cache disk; set blob_url for real protection)".into(),
        Blob::Remote { url, .. } => url.clone(),
    }
}

/// Runs as PID 1; never returns.
pub fn run() -> ! {
    mount_kernel_filesystems();
    let con = Console::open();
    con.say(&format!("lifeboat-init {}: starting", env!("CARGO_PKG_VERSION")));
    let r = std::panic::catch_unwind(|| boot(&con));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        con.say(&format!("lifeboat-init: PROBLEM: internal error: {msg}"));
    }
    loop {
        reap_all();
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn reap_all() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(s) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

fn boot(con: &Console) {
    let mut problems = Vec::new();
    load_modules(con);
    let devices = settle_devices();
    con.say(&format!(
        "lifeboat-init: block devices: {}",
        devices.iter().cloned().collect::<Vec<_>>().join(" ")
    ));
    let props = read_properties(con, &devices, &mut problems);
    let mut plan = firstboot::plan(&props);
    for p in std::mem::take(&mut plan.problems) {
        con.problem(&mut problems, p);
    }
    let _ = nix::unistd::sethostname(&plan.hostname);
    let _ = std::fs::create_dir_all("/etc");
    let _ = std::fs::write("/etc/hostname", format!("{}\n", plan.hostname));
    let _ = std::fs::write(
        "/etc/hosts",
        format!("127.0.0.1 localhost\n127.0.1.1 {}\n::1 localhost\n", plan.hostname),
    );
    let net = setup_network(con, &plan, &mut problems);
    if let Some((eth, ip)) = &net {
        con.say(&format!("lifeboat-init: {eth} has address {ip}"));
    }
    let data = setup_data_disk(con, &devices, &mut problems);
    if let Err(e) = std::fs::create_dir_all(&data.dir) {
        con.problem(&mut problems, format!("cannot create {}: {e}", data.dir.display()));
    }
    apply_passphrase(con, &plan, &data.dir, &mut problems);
    let mut san = vec![plan.hostname.clone()];
    if let Some((_, ip)) = &net {
        san.push(ip.to_string());
    }
    let cache = firstboot::cache_limit(data.fs_bytes);
    let data_text = format!("{}, write-ahead cache limit {}", data.what, human(cache));
    supervise(
        con,
        &mut plan,
        &data,
        cache,
        &san,
        &data_text,
        net.as_ref().map(|n| n.0.clone()),
        &mut problems,
    );
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    con: &Console,
    plan: &mut Plan,
    data: &DataDisk,
    cache: u64,
    san: &[String],
    data_text: &str,
    eth: Option<String>,
    problems: &mut Vec<String>,
) {
    use nix::sys::wait::{waitpid, WaitStatus};
    let mut fast_failures = 0;
    loop {
        let toml_text = firstboot::config_toml(plan, &data.dir.to_string_lossy(), cache, san);
        if let Err(e) = std::fs::write(CONFIG, toml_text) {
            con.problem(problems, format!("cannot write {CONFIG}: {e}"));
        }
        let started = Instant::now();
        let child = Command::new(LIFEBOAT)
            .args(["serve", "--json", "--config", CONFIG])
            .env("RUST_LOG", "warn")
            .env("HOME", &data.dir)
            .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                con.problem(problems, format!("cannot start {LIFEBOAT}: {e}"));
                std::thread::sleep(Duration::from_secs(10));
                continue;
            }
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if let Some(err) = child.stderr.take() {
            let con = con.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    con.say(&format!("lifeboat: {l}"));
                }
            });
        }
        if let Some(out) = child.stdout.take() {
            let con = con.clone();
            let (blob, data_text, problems, eth) = (
                blob_text(&plan.blob),
                data_text.to_string(),
                problems.clone(),
                eth.clone(),
            );
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    match serde_json::from_str::<serde_json::Value>(&l) {
                        Ok(v) if v["event"] == "ready" => {
                            let addr = eth.as_deref().and_then(ipv4_of);
                            banner(&con, addr, &v, &data_text, &blob, &problems);
                        }
                        _ => con.say(&format!("lifeboat: {l}")),
                    }
                }
            });
        }
        // Reap everything; stop when it is lifeboat that ended.
        let status = loop {
            match waitpid(nix::unistd::Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(p, code)) if p == pid => break format!("exit code {code}"),
                Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => break format!("signal {sig}"),
                Ok(_) => {}
                Err(nix::Error::ECHILD) => break "lost".into(),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        drop(child);
        let ran = started.elapsed();
        con.say(&format!(
            "lifeboat-init: PROBLEM: lifeboat serve stopped ({status}) after {} s; restarting in 5 s",
            ran.as_secs()
        ));
        fast_failures = if ran < Duration::from_secs(60) {
            fast_failures + 1
        } else {
            0
        };
        if fast_failures >= 3 && plan.blob != Blob::Local {
            con.problem(
                problems,
                format!(
                    "lifeboat would not start with blob storage {}; falling back to the cache disk so agents can still \
                     register: fix the blob properties and reboot",
                    blob_text(&plan.blob)
                ),
            );
            plan.blob = Blob::Local;
            fast_failures = 0;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

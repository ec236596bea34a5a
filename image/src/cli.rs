//! Command-line options of the image build, shared by `lifeboat-image build` and `ova build`.

use std::path::PathBuf;

use anyhow::Context;

use crate::builder::BuildOptions;

/// Inputs of the image build.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// Debian kernel package (linux-image-*-amd64_*.deb). Default: $LIFEBOAT_KERNEL_DEB, else the newest one
    /// in $LIFEBOAT_IMAGE_CACHE or /var/cache/lifeboat-image (where .ci/setup downloads it).
    #[arg(long, value_name = "DEB")]
    pub kernel_deb: Option<PathBuf>,
    /// The release lifeboat binary. Default: $LIFEBOAT_BIN, else `lifeboat` next to this program (built first
    /// with `cargo build --release -p appliance` when run through cargo).
    #[arg(long, value_name = "FILE")]
    pub lifeboat: Option<PathBuf>,
    /// The init for /init. Default: this program (it is the appliance's init when it runs as PID 1).
    #[arg(long, value_name = "FILE")]
    pub init: Option<PathBuf>,
    /// Static busybox for the DHCP client and the shell.
    #[arg(long, default_value = "/bin/busybox", value_name = "FILE")]
    pub busybox: PathBuf,
    /// mke2fs, to format the cache disk on first boot (its libraries are copied too).
    #[arg(long, default_value = "/sbin/mke2fs", value_name = "FILE")]
    pub mke2fs: PathBuf,
    /// systemd-boot's EFI binary (package systemd-boot-efi).
    #[arg(long, default_value = crate::builder::SYSTEMD_BOOT, value_name = "FILE")]
    pub systemd_boot: PathBuf,
    /// Size of the system disk in MiB.
    #[arg(long, default_value_t = 128)]
    pub size_mib: u64,
    /// Kernel command line.
    #[arg(long, default_value = crate::builder::CMDLINE)]
    pub cmdline: String,
    /// zstd level of the initramfs.
    #[arg(long, default_value_t = 12)]
    pub zstd_level: i32,
    /// No progress indicators.
    #[arg(long)]
    pub quiet: bool,
}

/// The lifeboat binary: explicit, $LIFEBOAT_BIN, or `lifeboat` beside the running program (made
/// up to date with cargo first when cargo runs us).
pub fn locate_lifeboat(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("LIFEBOAT_BIN").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("lifeboat");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let profile_release = exe.parent().and_then(|d| d.file_name()).is_some_and(|n| n == "release");
        eprintln!("building lifeboat (cargo build --release -p appliance) ...");
        let mut c = std::process::Command::new(cargo);
        c.args(["build", "-p", "appliance", "--bin", "lifeboat"]);
        if profile_release {
            c.arg("--release");
        }
        let ok = c.status().context("running cargo")?.success();
        anyhow::ensure!(ok, "cargo build -p appliance failed");
    }
    Ok(beside)
}

impl ImageArgs {
    pub fn to_options(&self, out: PathBuf) -> anyhow::Result<BuildOptions> {
        let mut o = BuildOptions::new(out, locate_lifeboat(self.lifeboat.clone())?)?;
        o.kernel_deb = self.kernel_deb.clone();
        if let Some(i) = &self.init {
            o.init = i.clone();
        }
        o.busybox = self.busybox.clone();
        o.mke2fs = self.mke2fs.clone();
        o.systemd_boot = self.systemd_boot.clone();
        o.size_mib = self.size_mib;
        o.cmdline = self.cmdline.clone();
        o.zstd_level = self.zstd_level;
        o.progress = !self.quiet;
        Ok(o)
    }
}

//! `ova build --out DIR`: builds the appliance disk (crate `image`) and packs `DIR/lifeboat.ova`.
//! As PID 1 (inside the image it built) this program is the appliance's init.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "ova",
    version,
    about = "Builds the Lifeboat appliance OVA for VMware ESXi / vSphere"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Build the disk image and pack DIR/lifeboat.ova.
    Build {
        /// Output folder; the OVA is DIR/lifeboat.ova.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Folder for the raw image, VMDK, descriptor and manifest (default DIR/work).
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Pack this raw disk image instead of building one.
        #[arg(long, value_name = "FILE")]
        image: Option<PathBuf>,
        /// Size of the blank cache disk the OVF asks ESXi to create, GiB.
        #[arg(long, default_value_t = 256)]
        cache_disk_gib: u64,
        #[command(flatten)]
        args: image::cli::ImageArgs,
    },
}

fn main() -> anyhow::Result<()> {
    if image::init::is_init() {
        image::init::run();
    }
    let Cmd::Build {
        out,
        work_dir,
        image: prebuilt,
        cache_disk_gib,
        args,
    } = Cli::parse().cmd;
    let t0 = Instant::now();
    let work = work_dir.unwrap_or_else(|| out.join("work"));
    let (raw, image_secs) = match prebuilt {
        Some(p) => (p, 0.0),
        None => {
            let r = image::builder::build(&args.to_options(work.join("lifeboat.img"))?)?;
            (r.out, r.elapsed.as_secs_f64())
        }
    };
    let t1 = Instant::now();
    let pb = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("[ova] {msg:<34} [{bar:30}] {bytes}/{total_bytes}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_draw_target(if !args.quiet && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    pb.set_message("Writing the streamOptimized VMDK");
    if !args.quiet {
        eprintln!("[ova] Writing the streamOptimized VMDK, descriptor, manifest and OVA ...");
    }
    let opts = ova::OvaOptions {
        cache_disk_gib,
        ..Default::default()
    };
    let r = ova::build_ova(&raw, &out, &work, &opts, |n, total| {
        pb.set_length(total);
        pb.set_position(n);
    })?;
    pb.finish_and_clear();
    println!(
        "{}: {:.1} MB (VMDK {:.1} MB for a {} MiB disk, {} grains); image {:.1} s, OVA {:.1} s, total {:.1} s",
        r.ova.display(),
        r.ova_size as f64 / 1e6,
        r.vmdk.file_size as f64 / 1e6,
        r.vmdk.capacity >> 20,
        r.vmdk.grains,
        image_secs,
        t1.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

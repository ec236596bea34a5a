//! `lifeboat-image`: builds the bootable appliance disk; as PID 1 inside that disk's initramfs it
//! is the appliance's init.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lifeboat-image",
    version,
    about = "Builds the bootable Lifeboat appliance disk (raw, GPT, UEFI)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Build the raw disk image.
    Build {
        /// Output file.
        #[arg(long, default_value = "target/lifeboat-image/lifeboat.img")]
        out: PathBuf,
        #[command(flatten)]
        image: image::cli::ImageArgs,
    },
    /// Run as the appliance's init (what /init does as PID 1).
    Init,
}

fn main() -> anyhow::Result<()> {
    if image::init::is_init() {
        image::init::run();
    }
    match Cli::parse().cmd {
        Cmd::Build { out, image } => {
            let r = image::builder::build(&image.to_options(out)?)?;
            println!(
                "{}: {} MiB raw disk, kernel {}, initramfs {:.1} MiB ({:.1} MiB unpacked), built in {:.1} s\nsha256 {}",
                r.out.display(),
                r.size >> 20,
                r.kernel_version,
                r.initrd_bytes as f64 / 1048576.0,
                r.initrd_unpacked as f64 / 1048576.0,
                r.elapsed.as_secs_f64(),
                r.sha256
            );
            Ok(())
        }
        Cmd::Init => image::init::run(),
    }
}

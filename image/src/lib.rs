//! Builds the bootable Lifeboat appliance disk (issue 7) and is the init inside it.
//!
//! The disk (raw, GPT) holds one EFI system partition (FAT32, written from code by [`disk`]):
//! systemd-boot as `\EFI\BOOT\BOOTX64.EFI`, Debian's amd64 kernel taken from its package without
//! installing it ([`kernel`]), and a zstd-compressed initramfs ([`cpio`]) with
//!
//! - `/init`: the builder binary itself, which runs [`init::run`] when it is PID 1;
//! - `/usr/bin/lifeboat` (stripped) and the glibc/libstdc++ libraries `ldd` lists;
//! - static busybox (DHCP client `udhcpc`, `ip`, a shell for inspection), `mke2fs`;
//! - the driver modules for ESXi's and qemu's virtual hardware, in dependency order.
//!
//! The running system lives in RAM; the only state is on the second disk (the OVA's blank cache
//! disk), which the init formats on first boot and mounts at `/data`. Configuration comes from
//! the OVF environment ([`firstboot`], property list in [`properties`]) on every boot.
//!
//! Building needs no root, loop device or mount, and is reproducible: sorted archive entries,
//! zero timestamps, content-derived GUIDs and volume id.

pub mod builder;
pub mod cli;
pub mod cpio;
pub mod disk;
pub mod firstboot;
pub mod init;
pub mod kernel;
pub mod properties;

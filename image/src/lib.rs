//! Builds the bootable appliance disk image (issue 7, not built yet): kernel, initramfs with
//! `lifeboat` as the service, first-boot configuration from OVF properties.

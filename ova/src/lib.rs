//! Packs the appliance image as an OVA for ESXi (issue 7, not built yet): streamOptimized VMDK,
//! OVF descriptor, SHA-256 manifest.

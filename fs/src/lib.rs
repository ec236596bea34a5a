//! The master target's read path (issues 4 and 5, not built yet): recovery-point catalogue and
//! point-in-time views over the segments in blob storage, the NBD server and the FUSE
//! filesystem, and the failback writer. Today the data path's `gateway::replay` is the only reader.

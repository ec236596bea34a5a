//! The master target's read path: point-in-time views of recovery points ([`pit`]) behind one
//! read seam ([`view`]), their export names ([`exports`]), and the NBD server ([`nbd`]) that
//! serves them to standard clients; [`retention`] drops expired points and rolls their log into
//! the base image; [`follow`] keeps the config server's catalogue up with the logs of machines
//! that replicate to scale-out process servers.

pub mod blob_image;
pub mod copy;
pub mod exports;
pub mod follow;
pub mod fuse;
pub mod nbd;
pub mod nbd_client;
pub mod overlay;
pub mod pit;
pub mod retention;
pub mod view;

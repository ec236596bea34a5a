//! Export names of recovery points, as NBD clients (and later FUSE paths) use them:
//! `MACHINE/DISK@POINT_ID`, `MACHINE/DISK@latest`, `MACHINE/DISK@2026-11-22T10:05:00Z` (the newest
//! point at or before that time). Recovery points are read-only; writable overlays (test
//! failover, see [`crate::overlay`]) are registered by name beside them and opened first.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;

use crate::pit::Reader;
use crate::view::{DiskView, ExportCatalog, ExportInfo};

/// Splits `MACHINE/DISK@SELECTOR`.
pub fn parse_export_name(name: &str) -> Option<(&str, &str, &str)> {
    let (path, selector) = name.rsplit_once('@')?;
    let (machine, disk) = path.split_once('/')?;
    if machine.is_empty() || disk.is_empty() || selector.is_empty() || disk.contains('/') {
        return None;
    }
    Some((machine, disk, selector))
}

/// What `list()` says of a registered overlay.
pub const OVERLAY_DESCRIPTION: &str = "test failover (writable)";

/// The recovery points of every protected disk, as exports, plus registered writable overlays.
pub struct PointExports {
    reader: Arc<Reader>,
    /// Writable views by export name (e.g. `MACHINE/DISK@test-failover`); they shadow points.
    overlays: RwLock<BTreeMap<String, Arc<dyn DiskView>>>,
}

impl PointExports {
    pub fn new(reader: Arc<Reader>) -> Arc<Self> {
        Arc::new(Self {
            reader,
            overlays: RwLock::new(BTreeMap::new()),
        })
    }

    /// Serves `view` as the export `name` (replacing one registered under that name) until
    /// [`PointExports::remove_overlay`]. Connections already open keep their view.
    pub fn add_overlay(&self, name: String, view: Arc<dyn DiskView>) {
        self.overlays.write().expect("overlays").insert(name, view);
    }

    /// Stops offering `name`; `false` when no overlay had that name. Open connections keep the
    /// view until they close.
    pub fn remove_overlay(&self, name: &str) -> bool {
        self.overlays.write().expect("overlays").remove(name).is_some()
    }

    fn overlay(&self, name: &str) -> Option<Arc<dyn DiskView>> {
        self.overlays.read().expect("overlays").get(name).cloned()
    }

    fn list_points(reader: &Reader) -> io::Result<Vec<ExportInfo>> {
        let mut out = Vec::new();
        for machine in reader.machines() {
            let points = reader.points(&machine)?;
            let readable: Vec<_> = points.iter().filter(|p| p.readable).collect();
            for disk in reader.disks(&machine) {
                if let Some(newest) = readable.first() {
                    out.push(ExportInfo {
                        name: format!("{machine}/{}@latest", disk.disk),
                        description: format!("newest point ({}, {})", newest.time, newest.kind),
                    });
                }
                for p in &readable {
                    if p.seqs.contains_key(&disk.disk) {
                        let label = if p.label.is_empty() {
                            String::new()
                        } else {
                            format!(" {:?}", p.label)
                        };
                        out.push(ExportInfo {
                            name: format!("{machine}/{}@{}", disk.disk, p.id),
                            description: format!("{} {}{label}", p.time, p.kind),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

impl ExportCatalog for PointExports {
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<ExportInfo>>> {
        Box::pin(async move {
            let mut out: Vec<ExportInfo> = self
                .overlays
                .read()
                .expect("overlays")
                .keys()
                .map(|name| ExportInfo {
                    name: name.clone(),
                    description: OVERLAY_DESCRIPTION.into(),
                })
                .collect();
            let reader = self.reader.clone();
            let points = tokio::task::spawn_blocking(move || Self::list_points(&reader))
                .await
                .map_err(io::Error::other)??;
            out.extend(points.into_iter().filter(|p| self.overlay(&p.name).is_none()));
            Ok(out)
        })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>> {
        Box::pin(async move {
            if let Some(view) = self.overlay(name) {
                return Ok(view);
            }
            let (machine, disk, selector) = parse_export_name(name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("export {name:?} is not MACHINE/DISK@POINT (POINT: an id, latest, or a UTC time)"),
                )
            })?;
            let reader = self.reader.clone();
            let (m, d, s) = (machine.to_owned(), disk.to_owned(), selector.to_owned());
            let view = tokio::task::spawn_blocking(move || {
                let point = reader.resolve(&m, &s)?;
                reader.view(&m, &d, &point)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Arc::new(view) as Arc<dyn DiskView>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names() {
        assert_eq!(parse_export_name("m1/disk0@latest"), Some(("m1", "disk0", "latest")));
        assert_eq!(
            parse_export_name("m1/disk0@2026-11-22T10:05:00Z"),
            Some(("m1", "disk0", "2026-11-22T10:05:00Z"))
        );
        assert_eq!(parse_export_name("m1/disk0@17"), Some(("m1", "disk0", "17")));
        for bad in ["m1/disk0", "m1@1", "/d@1", "m/d@", "m/d/x@1"] {
            assert_eq!(parse_export_name(bad), None, "{bad}");
        }
    }

    /// A writable disk of 4 KiB (the registry only hands views out).
    struct Scratch;

    impl DiskView for Scratch {
        fn size(&self) -> u64 {
            4096
        }
        fn read_at(&self, _offset: u64, len: usize) -> BoxFuture<'_, io::Result<bytes::Bytes>> {
            Box::pin(async move { Ok(bytes::Bytes::from(vec![0; len])) })
        }
        fn writable(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn overlays_are_listed_opened_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = gateway::journal::Journal::open(dir.path(), 1 << 30).unwrap();
        let store = Arc::new(object_store::memory::InMemory::new());
        let exports = PointExports::new(Reader::new(journal, store, gateway::crypto::Key::random(), 16 << 20));
        let name = "m1/disk0@test-failover";
        assert!(exports.open(name).await.is_err(), "no such point");
        assert!(exports.list().await.unwrap().is_empty());

        exports.add_overlay(name.into(), Arc::new(Scratch));
        let view = exports.open(name).await.unwrap();
        assert!(view.writable());
        assert_eq!(view.size(), 4096);
        assert_eq!(
            exports.list().await.unwrap(),
            vec![ExportInfo {
                name: name.into(),
                description: OVERLAY_DESCRIPTION.into()
            }]
        );

        assert!(exports.remove_overlay(name));
        assert!(!exports.remove_overlay(name));
        assert!(exports.open(name).await.is_err(), "no such point");
        assert!(exports.list().await.unwrap().is_empty());
    }
}

//! Export names of recovery points, as NBD clients (and later FUSE paths) use them:
//! `MACHINE/DISK@POINT_ID`, `MACHINE/DISK@latest`, `MACHINE/DISK@2026-11-22T10:05:00Z` (the newest
//! point at or before that time). Every export is read-only.

use std::io;
use std::sync::Arc;

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

/// The recovery points of every protected disk, as exports.
pub struct PointExports {
    reader: Arc<Reader>,
}

impl PointExports {
    pub fn new(reader: Arc<Reader>) -> Arc<Self> {
        Arc::new(Self { reader })
    }

    fn list_blocking(&self) -> io::Result<Vec<ExportInfo>> {
        let mut out = Vec::new();
        for machine in self.reader.machines() {
            let points = self.reader.points(&machine)?;
            let readable: Vec<_> = points.iter().filter(|p| p.readable).collect();
            for disk in self.reader.disks(&machine) {
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
            let me = Self {
                reader: self.reader.clone(),
            };
            tokio::task::spawn_blocking(move || me.list_blocking())
                .await
                .map_err(io::Error::other)?
        })
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, io::Result<Arc<dyn DiskView>>> {
        Box::pin(async move {
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
}

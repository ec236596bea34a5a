//! An initramfs archive: cpio "newc", entries sorted by path, owner 0/0, mtime 0, sequential
//! inode numbers, so equal trees give equal bytes. Device nodes are plain archive entries, so
//! building needs no root.

use std::collections::BTreeMap;

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    /// Character device (major, minor).
    CharDev(u32, u32),
}

/// A file tree for the initramfs, keyed by path without a leading `/`.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    entries: BTreeMap<String, Node>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` and every missing parent folder.
    pub fn add(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Node::Dir);
        }
        self.entries.insert(path, node);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.add(path, Node::File { data, mode });
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// Total bytes of file contents.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// The newc archive.
    pub fn to_newc(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.content_bytes() as usize + self.entries.len() * 256);
        for (ino, (path, node)) in (1u32..).zip(self.entries.iter()) {
            let (mode, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match node {
                Node::Dir => (0o040755, &[], 2, (0, 0)),
                Node::File { data, mode } => (0o100000 | mode, data, 1, (0, 0)),
                Node::Symlink(t) => (0o120777, t.as_bytes(), 1, (0, 0)),
                Node::CharDev(a, b) => (0o020600, &[], 1, (*a, *b)),
            };
            header(&mut out, ino, mode, nlink, data.len() as u32, rdev, path);
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, size: u32, rdev: (u32, u32), name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_added_and_the_archive_is_sorted_and_stable() {
        let mut t = Tree::new();
        t.file("/usr/bin/lifeboat", b"elf".to_vec(), 0o755);
        t.add("dev/console", Node::CharDev(5, 1));
        t.add("bin/sh", Node::Symlink("busybox".into()));
        let paths: Vec<&String> = t.paths().collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "usr",
                "usr/bin",
                "usr/bin/lifeboat"
            ]
        );
        let a = t.to_newc();
        assert_eq!(a, t.clone().to_newc());
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("TRAILER!!!"));
        assert!(s.find("bin/sh").unwrap() < s.find("usr/bin/lifeboat").unwrap());
    }
}

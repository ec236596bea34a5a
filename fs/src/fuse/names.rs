//! Directory names of recovery points: the point's UTC time in a sortable, shell-friendly form
//! plus its kind (`2026-11-22T10-05-00Z-crash`, `2026-11-22T12-00-00Z-app-nightly`).

use std::collections::HashMap;

use crate::pit::{format_time, PointInfo};

/// Longest label kept in a point's name.
const MAX_LABEL: usize = 64;

/// A label reduced to characters that need no quoting in a shell: letters, digits, `.`, `_` and
/// `-`; anything else becomes `_`, and leading dots or dashes are dropped.
pub fn sanitize_label(label: &str) -> String {
    let mut out: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = out.trim_start_matches(['.', '-']).len();
    out.drain(..out.len() - trimmed);
    out.truncate(MAX_LABEL);
    out
}

/// The name of one point, without collision handling.
pub fn point_name(p: &PointInfo) -> String {
    let time = format_time(p.time_ms).replace(':', "-");
    match p.kind.as_str() {
        "crash-consistent" => format!("{time}-crash"),
        "app-consistent" => {
            let label = sanitize_label(&p.label);
            if label.is_empty() {
                format!("{time}-app")
            } else {
                format!("{time}-app-{label}")
            }
        }
        other => format!("{time}-{}", sanitize_label(other)),
    }
}

/// Unique names for `points` (in the same order): points whose names would collide (same
/// second, same kind and label) get their id appended, and so does a name `latest`.
pub fn unique_names(points: &[PointInfo]) -> Vec<String> {
    let names: Vec<String> = points.iter().map(point_name).collect();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in &names {
        *count.entry(n.as_str()).or_default() += 1;
    }
    names
        .iter()
        .zip(points)
        .map(|(n, p)| {
            if count[n.as_str()] > 1 || n == "latest" {
                format!("{n}-{}", p.id)
            } else {
                n.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: u64, time_ms: u64, kind: &str, label: &str) -> PointInfo {
        PointInfo {
            id,
            machine: "m1".into(),
            time: format_time(time_ms),
            time_ms,
            kind: kind.into(),
            label: label.into(),
            seqs: Default::default(),
            readable: true,
        }
    }

    // 2026-11-22T10:05:00Z
    const T: u64 = 1_795_341_900_000;

    #[test]
    fn names_sort_by_time_and_need_no_quoting() {
        assert_eq!(
            point_name(&point(1, T, "crash-consistent", "")),
            "2026-11-22T10-05-00Z-crash"
        );
        assert_eq!(
            point_name(&point(2, T + 6_900_000, "app-consistent", "nightly")),
            "2026-11-22T12-00-00Z-app-nightly"
        );
        assert_eq!(
            point_name(&point(3, T, "app-consistent", "")),
            "2026-11-22T10-05-00Z-app"
        );
        assert_eq!(
            point_name(&point(4, T + 999, "app-consistent", "../etc/passwd me?")),
            "2026-11-22T10-05-00Z-app-_etc_passwd_me_"
        );
        let mut names: Vec<String> = (0..5)
            .map(|i| point_name(&point(i, T + i * 3_600_000, "crash-consistent", "")))
            .collect();
        let sorted = {
            let mut s = names.clone();
            s.sort();
            s
        };
        assert_eq!(names, sorted);
        names.dedup();
        assert_eq!(names.len(), 5);
    }

    #[test]
    fn labels_are_sanitized() {
        assert_eq!(sanitize_label("nightly"), "nightly");
        assert_eq!(sanitize_label("a b/c:d"), "a_b_c_d");
        assert_eq!(sanitize_label("..-x"), "x");
        assert_eq!(sanitize_label("é"), "_");
        assert_eq!(sanitize_label(&"x".repeat(200)).len(), MAX_LABEL);
    }

    #[test]
    fn colliding_names_get_ids() {
        let points = vec![
            point(7, T, "crash-consistent", ""),
            point(8, T + 500, "crash-consistent", ""),
            point(9, T, "app-consistent", "x"),
        ];
        assert_eq!(
            unique_names(&points),
            vec![
                "2026-11-22T10-05-00Z-crash-7",
                "2026-11-22T10-05-00Z-crash-8",
                "2026-11-22T10-05-00Z-app-x"
            ]
        );
    }
}

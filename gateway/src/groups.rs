//! Replication groups (multi-VM consistency): named sets of machines that share recovery points —
//! one point id cut at one position of the log across every member — and one policy. Kept
//! durably in the appliance's RocksDB beside the policies; a machine is in at most one group.

use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use crate::journal::CF_META;
use crate::policy::{Policies, PolicyError, DEFAULT_POLICY};

/// A replication group as the management API shows and takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Member machines, in the order given (sorted and deduplicated when stored).
    pub machines: Vec<String>,
    /// The policy every member follows (its intervals drive the group's shared points).
    #[serde(default = "default_policy")]
    pub policy: String,
}

fn default_policy() -> String {
    DEFAULT_POLICY.into()
}

/// A group with its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedGroup {
    pub name: String,
    #[serde(flatten)]
    pub group: Group,
}

fn group_key(name: &str) -> Vec<u8> {
    format!("group/{name}").into_bytes()
}

pub(crate) fn member_key(machine: &str) -> Vec<u8> {
    format!("machine-group/{machine}").into_bytes()
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// The groups store: blocking RocksDB calls on the journal's database.
#[derive(Clone)]
pub struct Groups {
    policies: Policies,
}

impl Groups {
    pub fn new(policies: Policies) -> Self {
        Self { policies }
    }

    /// Every group, sorted by name.
    pub fn list(&self) -> Result<Vec<NamedGroup>, PolicyError> {
        let db = self.policies.journal().db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"group/") {
            let (k, v) = item?;
            if !k.starts_with(b"group/") {
                break;
            }
            let group: Group = serde_json::from_slice(&v).map_err(|e| PolicyError::Store(e.to_string()))?;
            out.push(NamedGroup {
                name: String::from_utf8_lossy(&k[6..]).into_owned(),
                group,
            });
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Option<Group>, PolicyError> {
        let db = self.policies.journal().db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match db.get_cf(meta, group_key(name))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| PolicyError::Store(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// The group `machine` belongs to, if any.
    pub fn group_of(&self, machine: &str) -> Result<Option<String>, PolicyError> {
        let db = self.policies.journal().db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        Ok(db
            .get_cf(meta, member_key(machine))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Creates or replaces a group: members must not belong to another group; each member is
    /// assigned the group's policy in the same durable write.
    pub fn put(&self, name: &str, group: &Group) -> Result<Group, PolicyError> {
        if !crate::server::valid_name(name) {
            return Err(PolicyError::BadName(name.into()));
        }
        let mut machines = group.machines.clone();
        machines.sort();
        machines.dedup();
        if machines.is_empty() {
            return Err(PolicyError::Invalid {
                field: "machines",
                reason: "a group needs at least one machine".into(),
            });
        }
        if let Some(bad) = machines.iter().find(|m| !crate::server::valid_name(m)) {
            return Err(PolicyError::Invalid {
                field: "machines",
                reason: format!("{bad:?} is not a machine name"),
            });
        }
        self.policies.get(&group.policy).map_err(|e| match e {
            PolicyError::Unknown(p) => PolicyError::Invalid {
                field: "policy",
                reason: format!("no policy named {p:?}"),
            },
            e => e,
        })?;
        for m in &machines {
            if let Some(other) = self.group_of(m)? {
                if other != name {
                    return Err(PolicyError::Conflict(format!(
                        "machine {m:?} is already in group {other:?}"
                    )));
                }
            }
        }
        let stored = Group {
            machines: machines.clone(),
            policy: group.policy.clone(),
        };
        let db = self.policies.journal().db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        if let Some(old) = self.get(name)? {
            for m in old.machines.iter().filter(|m| !machines.contains(m)) {
                wb.delete_cf(meta, member_key(m));
            }
        }
        for m in &machines {
            wb.put_cf(meta, member_key(m), name.as_bytes());
            wb.put_cf(meta, crate::policy::assignment_key(m), stored.policy.as_bytes());
        }
        wb.put_cf(meta, group_key(name), serde_json::to_vec(&stored).expect("json"));
        db.write_opt(wb, &synced())?;
        Ok(stored)
    }

    /// Deletes a group; its members keep their policy and get points of their own again.
    pub fn delete(&self, name: &str) -> Result<(), PolicyError> {
        let group = self.get(name)?.ok_or_else(|| PolicyError::UnknownGroup(name.into()))?;
        let db = self.policies.journal().db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wb = WriteBatch::default();
        for m in &group.machines {
            wb.delete_cf(meta, member_key(m));
        }
        wb.delete_cf(meta, group_key(name));
        db.write_opt(wb, &synced())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::policy::Policy;

    #[test]
    fn members_are_exclusive_and_follow_the_group_policy() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path(), 1 << 30).unwrap();
        let policies = Policies::new(j, Policy::default());
        let fast = Policy {
            crash_consistent_interval: "1s".into(),
            ..Policy::default()
        };
        policies.put("fast", &fast).unwrap();
        let groups = Groups::new(policies.clone());
        let g = Group {
            machines: vec!["web".into(), "db".into(), "web".into()],
            policy: "fast".into(),
        };
        let stored = groups.put("app", &g).unwrap();
        assert_eq!(stored.machines, ["db", "web"]);
        assert_eq!(policies.policy_of("db").unwrap(), "fast");
        assert_eq!(groups.group_of("web").unwrap().as_deref(), Some("app"));
        let other = Group {
            machines: vec!["db".into()],
            policy: DEFAULT_POLICY.into(),
        };
        assert!(matches!(groups.put("other", &other), Err(PolicyError::Conflict(_))));
        assert!(matches!(
            policies.assign("db", DEFAULT_POLICY),
            Err(PolicyError::Conflict(_))
        ));
        let bad = Group {
            machines: vec!["x".into()],
            policy: "nope".into(),
        };
        assert!(matches!(
            groups.put("bad", &bad),
            Err(PolicyError::Invalid { field: "policy", .. })
        ));
        // Shrinking the group frees the machine that left.
        groups
            .put(
                "app",
                &Group {
                    machines: vec!["web".into()],
                    policy: "fast".into(),
                },
            )
            .unwrap();
        assert_eq!(groups.group_of("db").unwrap(), None);
        groups.delete("app").unwrap();
        assert_eq!(groups.group_of("web").unwrap(), None);
        assert!(groups.list().unwrap().is_empty());
        assert!(matches!(groups.delete("app"), Err(PolicyError::UnknownGroup(_))));
    }
}

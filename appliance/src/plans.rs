//! Recovery plans: ordered steps an operator rehearses and runs — groups of machines failed over
//! together, script steps run on the appliance with the plan's context in environment
//! variables, and manual pauses that wait for `resume`. Kept durably in RocksDB.

use gateway::journal::{Journal, CF_META};
use rocksdb::WriteOptions;
use serde::{Deserialize, Serialize};

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PlanStep {
    /// These machines, handled together (a replication group's members get the same point).
    Machines { machines: Vec<String> },
    /// `sh -c COMMAND` on the appliance; a non-zero exit fails the job.
    Script {
        command: String,
        /// Longest run, e.g. `10m` (default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<String>,
    },
    /// Wait until the operator resumes the job.
    Pause {
        #[serde(default)]
        message: String,
    },
}

/// A recovery plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub steps: Vec<PlanStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPlan {
    pub name: String,
    #[serde(flatten)]
    pub plan: Plan,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan field {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("no recovery plan named {0:?}")]
    Unknown(String),
    #[error("plan storage: {0}")]
    Store(String),
}

impl From<rocksdb::Error> for PlanError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Store(e.to_string())
    }
}

fn plan_key(name: &str) -> Vec<u8> {
    format!("recovery-plan/{name}").into_bytes()
}

impl Plan {
    /// Checks the plan; the error names the offending field.
    pub fn validate(&self) -> Result<(), PlanError> {
        let invalid = |i: usize, field: &str, reason: String| PlanError::Invalid {
            field: format!("steps[{i}].{field}"),
            reason,
        };
        if self.steps.is_empty() {
            return Err(PlanError::Invalid {
                field: "steps".into(),
                reason: "a plan needs at least one step".into(),
            });
        }
        if !self.steps.iter().any(|s| matches!(s, PlanStep::Machines { .. })) {
            return Err(PlanError::Invalid {
                field: "steps".into(),
                reason: "a plan needs at least one machines step".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                PlanStep::Machines { machines } => {
                    if machines.is_empty() {
                        return Err(invalid(i, "machines", "empty".into()));
                    }
                    for m in machines {
                        if !gateway::server::valid_name(m) {
                            return Err(invalid(i, "machines", format!("{m:?} is not a machine name")));
                        }
                        if !seen.insert(m.clone()) {
                            return Err(invalid(i, "machines", format!("{m:?} appears twice in the plan")));
                        }
                    }
                }
                PlanStep::Script { command, timeout } => {
                    if command.trim().is_empty() {
                        return Err(invalid(i, "command", "empty".into()));
                    }
                    if let Some(t) = timeout {
                        humantime::parse_duration(t).map_err(|e| invalid(i, "timeout", format!("{t:?}: {e}")))?;
                    }
                }
                PlanStep::Pause { .. } => {}
            }
        }
        Ok(())
    }

    /// Every machine of the plan, in step order.
    pub fn machines(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                PlanStep::Machines { machines } => Some(machines.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// The plan store (blocking RocksDB calls).
#[derive(Clone)]
pub struct Plans {
    journal: Journal,
}

impl Plans {
    pub fn new(journal: Journal) -> Self {
        Self { journal }
    }

    pub fn list(&self) -> Result<Vec<NamedPlan>, PlanError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut out = Vec::new();
        for item in db.prefix_iterator_cf(meta, b"recovery-plan/") {
            let (k, v) = item?;
            if !k.starts_with(b"recovery-plan/") {
                break;
            }
            out.push(NamedPlan {
                name: String::from_utf8_lossy(&k[14..]).into_owned(),
                plan: serde_json::from_slice(&v).map_err(|e| PlanError::Store(e.to_string()))?,
            });
        }
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<Plan, PlanError> {
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        match db.get_cf(meta, plan_key(name))? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| PlanError::Store(e.to_string())),
            None => Err(PlanError::Unknown(name.into())),
        }
    }

    pub fn put(&self, name: &str, plan: &Plan) -> Result<(), PlanError> {
        if !gateway::server::valid_name(name) {
            return Err(PlanError::Invalid {
                field: "name".into(),
                reason: format!("{name:?}: use letters, digits, '-', '_' or '.'"),
            });
        }
        plan.validate()?;
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(meta, plan_key(name), serde_json::to_vec(plan).expect("json"), &wo)?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), PlanError> {
        self.get(name)?;
        let db = self.journal.db();
        let meta = db.cf_handle(CF_META).expect("meta cf");
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.delete_cf_opt(meta, plan_key(name), &wo)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_validate_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let plan: Plan = serde_json::from_value(serde_json::json!({"steps": [
            {"type": "machines", "machines": ["db"]},
            {"type": "script", "command": "echo $LIFEBOAT_JOB", "timeout": "1m"},
            {"type": "pause", "message": "check the database"},
            {"type": "machines", "machines": ["web1", "web2"]}
        ]}))
        .unwrap();
        {
            let plans = Plans::new(Journal::open(dir.path(), 1 << 30).unwrap());
            plans.put("site", &plan).unwrap();
            let twice = Plan {
                steps: vec![
                    PlanStep::Machines {
                        machines: vec!["a".into()],
                    },
                    PlanStep::Machines {
                        machines: vec!["a".into()],
                    },
                ],
            };
            match plans.put("bad", &twice) {
                Err(PlanError::Invalid { field, .. }) => assert_eq!(field, "steps[1].machines"),
                other => panic!("{other:?}"),
            }
            let no_machines = Plan {
                steps: vec![PlanStep::Pause { message: String::new() }],
            };
            assert!(plans.put("bad", &no_machines).is_err());
        }
        let plans = Plans::new(Journal::open(dir.path(), 1 << 30).unwrap());
        assert_eq!(plans.get("site").unwrap(), plan);
        assert_eq!(plan.machines(), ["db", "web1", "web2"]);
        plans.delete("site").unwrap();
        assert!(matches!(plans.get("site"), Err(PlanError::Unknown(_))));
    }
}

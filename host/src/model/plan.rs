//! Dependency analysis of a flow's step graph (petgraph): the order steps
//! can run in, which can run together, the critical path that bounds the
//! run's wall time, and what in the flow is contradictory or redundant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::flow::{Flow, Step};
use super::graph::{self, Reach};

/// Steps that name the same exclusive resource and that nothing orders, so
/// the scheduler must keep them apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Conflict {
    /// The resource.
    pub resource: String,
    /// The steps that could otherwise run at the same time.
    pub steps: Vec<String>,
}

/// A dependency already implied by another one of the same step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Redundant {
    /// The step.
    pub step: String,
    /// The dependency it could drop.
    pub needs: String,
    /// The other dependency that already waits for it.
    pub implied_by: String,
}

/// A flow's dependency analysis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    /// The step ids in an order where each comes after what it needs.
    pub order: Vec<String>,
    /// Parallel groups: group `k` holds the steps whose longest chain of
    /// dependencies has `k` links; each group can run at once.
    pub groups: Vec<Vec<String>>,
    /// The chain of dependent steps with the longest estimated duration: no
    /// schedule finishes sooner.
    pub critical_path: Vec<String>,
    /// Its estimated duration, in ms.
    pub critical_path_ms: f64,
    /// The sum of every step's estimated duration, in ms.
    pub total_ms: f64,
    /// `total_ms / critical_path_ms`: how many times faster than running the
    /// steps one by one the flow can go with enough parallelism.
    pub parallelization: f64,
    /// Whether the durations come from past runs (otherwise each step counts
    /// 1 ms, and the critical path is the longest chain).
    pub estimated: bool,
    /// Resource conflicts.
    pub conflicts: Vec<Conflict>,
    /// Redundant (transitive) dependencies.
    pub redundant: Vec<Redundant>,
    /// For each step, the steps that need it.
    #[serde(skip)]
    pub(crate) dependents: Vec<Vec<usize>>,
    /// For each step, the longest estimated duration from its start to the
    /// end of the flow: the scheduler starts the largest first.
    #[serde(skip)]
    pub(crate) priority: Vec<f64>,
}

/// What a flow's graph says whatever the steps' durations: the order, the
/// parallel groups, redundant needs and resource conflicts. A host keeps
/// it per flow text, so a run only adds the estimates.
#[derive(Debug, Clone)]
pub struct Analysis {
    order: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    groups: Vec<Vec<String>>,
    redundant: Vec<Redundant>,
    conflicts: Vec<Conflict>,
}

impl Analysis {
    /// Analyses `flow`'s graph: O(V·E/64) with reachability bitsets.
    pub fn new(flow: &Flow) -> Analysis {
        let steps = &flow.steps;
        let n = steps.len();
        let deps: Vec<&[usize]> = steps.iter().map(|s| s.deps.as_slice()).collect();
        // Validation rejects cycles; were one to slip through, the steps in
        // it would never become ready and the run would report them skipped.
        let order = graph::order(&deps).unwrap_or_default();
        let mut dependents = vec![Vec::new(); n];
        for (i, step) in steps.iter().enumerate() {
            for &dep in &step.deps {
                dependents[dep].push(i);
            }
        }
        let mut depth = vec![0usize; n];
        for &i in &order {
            depth[i] = steps[i].deps.iter().map(|&d| depth[d] + 1).max().unwrap_or(0);
        }
        let mut groups = vec![Vec::new(); depth.iter().max().map_or(0, |d| d + 1)];
        for (i, step) in steps.iter().enumerate() {
            groups[depth[i]].push(step.id.clone());
        }

        let reach = Reach::new(&deps, &order);
        let mut redundant = Vec::new();
        for step in steps {
            for (need, by) in reach.implied(&step.deps) {
                redundant.push(Redundant {
                    step: step.id.clone(),
                    needs: steps[step.deps[need]].id.clone(),
                    implied_by: steps[step.deps[by]].id.clone(),
                });
            }
        }
        let mut by_resource: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            for resource in &step.resources {
                by_resource.entry(resource).or_default().push(i);
            }
        }
        let mut conflicts = Vec::new();
        for (resource, users) in by_resource {
            // A user overlaps if some other user is unordered with it: one
            // flag each, looked for until found.
            let overlapping: Vec<usize> = users
                .iter()
                .copied()
                .filter(|&a| {
                    users.iter().any(|&b| b != a && !reach.needs(a, b) && !reach.needs(b, a))
                })
                .collect();
            if !overlapping.is_empty() {
                let steps = overlapping.iter().map(|&i| steps[i].id.clone()).collect();
                conflicts.push(Conflict { resource: resource.to_owned(), steps });
            }
        }
        Analysis { order, dependents, groups, redundant, conflicts }
    }
}

impl Plan {
    /// Analyses a flow, counting every step as 1 ms.
    pub fn new(flow: &Flow) -> Plan {
        Plan::with_estimates(flow, |_| None)
    }

    /// Analyses a flow with each step's duration estimated by `estimate`
    /// (in ms; `None` where nothing is known).
    pub fn with_estimates(flow: &Flow, estimate: impl Fn(&Step) -> Option<f64>) -> Plan {
        Plan::estimated(flow, &Analysis::new(flow), estimate)
    }

    /// [`Plan::with_estimates`] on an `analysis` of this flow made before:
    /// linear in the flow.
    pub fn estimated(
        flow: &Flow,
        analysis: &Analysis,
        estimate: impl Fn(&Step) -> Option<f64>,
    ) -> Plan {
        let steps = &flow.steps;
        let n = steps.len();
        let Analysis { order, dependents, .. } = analysis;
        let estimates: Vec<Option<f64>> = steps.iter().map(&estimate).collect();
        let estimated = estimates.iter().any(Option::is_some);
        let known: Vec<f64> = estimates.iter().flatten().copied().collect();
        // Steps never seen take the mean of those that were.
        let fallback =
            if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let weight: Vec<f64> = estimates.iter().map(|e| e.unwrap_or(fallback)).collect();

        let mut priority = vec![0.0; n];
        for &i in order.iter().rev() {
            let longest_after = dependents[i].iter().map(|&d| priority[d]).fold(0.0, f64::max);
            priority[i] = weight[i] + longest_after;
        }
        // The most critical of some steps; on a tie, the first in the flow.
        let most_critical = |candidates: &mut dyn Iterator<Item = usize>| {
            candidates.fold(None, |best: Option<usize>, i| match best {
                Some(b) if priority[b] >= priority[i] => Some(b),
                _ => Some(i),
            })
        };
        let mut critical_path = Vec::new();
        let mut at = most_critical(&mut (0..n).filter(|&i| steps[i].deps.is_empty()));
        while let Some(i) = at {
            critical_path.push(steps[i].id.clone());
            at = most_critical(&mut dependents[i].iter().copied());
        }
        let critical_path_ms = (0..n).map(|i| priority[i]).fold(0.0, f64::max);
        let total_ms: f64 = weight.iter().sum();

        Plan {
            order: order.iter().map(|&i| steps[i].id.clone()).collect(),
            groups: analysis.groups.clone(),
            critical_path,
            critical_path_ms,
            total_ms,
            parallelization: if critical_path_ms > 0.0 { total_ms / critical_path_ms } else { 1.0 },
            estimated,
            conflicts: analysis.conflicts.clone(),
            redundant: analysis.redundant.clone(),
            dependents: dependents.clone(),
            priority,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::Format;

    /// a → b → d, a → c → d, a → d (redundant), e alone; b and e share "db".
    fn flow() -> Flow {
        let toml = r#"
            [flow]
            name = "diamond"
            [[step]]
            id = "a"
            plugin = "x"
            [[step]]
            id = "b"
            plugin = "x"
            needs = ["a"]
            resources = ["db"]
            [[step]]
            id = "c"
            plugin = "x"
            needs = ["a"]
            [[step]]
            id = "d"
            plugin = "x"
            needs = ["b", "c", "a"]
            resources = ["db"]
            [[step]]
            id = "e"
            plugin = "x"
            resources = ["db"]
        "#;
        Flow::parse(toml, Format::Toml, "<test>", Path::new(".")).unwrap()
    }

    #[test]
    fn groups_order_and_the_longest_chain() {
        let plan = Plan::new(&flow());
        assert_eq!(plan.groups, vec![vec!["a", "e"], vec!["b", "c"], vec!["d"]]);
        assert_eq!(plan.critical_path, vec!["a", "b", "d"]);
        assert_eq!((plan.critical_path_ms, plan.total_ms), (3.0, 5.0));
        assert!((plan.parallelization - 5.0 / 3.0).abs() < 1e-9);
        assert!(!plan.estimated);
        let pos = |id: &str| plan.order.iter().position(|s| s == id).unwrap();
        assert!(pos("a") < pos("b") && pos("b") < pos("d") && pos("c") < pos("d"));
    }

    #[test]
    fn estimates_move_the_critical_path() {
        let plan = Plan::with_estimates(&flow(), |s| match s.id.as_str() {
            "b" => Some(10.0),
            "c" => Some(500.0),
            _ => None,
        });
        assert_eq!(plan.critical_path, vec!["a", "c", "d"]);
        // The others take the mean of what is known: 255 ms.
        assert_eq!(plan.critical_path_ms, 255.0 + 500.0 + 255.0);
        assert!(plan.estimated);
    }

    #[test]
    fn redundant_dependencies_and_resource_conflicts() {
        let plan = Plan::new(&flow());
        assert_eq!(
            plan.redundant,
            vec![Redundant { step: "d".into(), needs: "a".into(), implied_by: "b".into() }]
        );
        // b and d are ordered (d needs b); e can overlap either.
        assert_eq!(
            plan.conflicts,
            vec![Conflict {
                resource: "db".into(),
                steps: vec!["b".into(), "d".into(), "e".into()]
            }]
        );
    }
}

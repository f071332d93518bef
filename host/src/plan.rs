//! Dependency analysis of a flow's step graph (petgraph).

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::flow::{Flow, Step};

/// The step graph: an edge runs from a dependency to its dependent.
fn graph(steps: &[Step]) -> DiGraph<usize, ()> {
    let mut graph = DiGraph::with_capacity(steps.len(), steps.iter().map(|s| s.deps.len()).sum());
    let nodes: Vec<NodeIndex> = (0..steps.len()).map(|i| graph.add_node(i)).collect();
    for (i, step) in steps.iter().enumerate() {
        for &dep in &step.deps {
            graph.add_edge(nodes[dep], nodes[i], ());
        }
    }
    graph
}

/// Every cycle among the steps, each as its members in dependency order
/// (a step that needs itself is a cycle of one).
pub(crate) fn cycles(steps: &[Step]) -> Vec<Vec<usize>> {
    let graph = graph(steps);
    let mut cycles: Vec<Vec<usize>> = tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
        .map(|scc| {
            let mut members: Vec<usize> = scc.iter().map(|&n| graph[n]).collect();
            members.sort_unstable();
            order_cycle(steps, &members)
        })
        .collect();
    cycles.sort();
    cycles
}

/// Walks the cycle from its first member along `needs`, so the message reads
/// as a chain: `a -> b -> c` where each needs the one before it.
fn order_cycle(steps: &[Step], members: &[usize]) -> Vec<usize> {
    let mut chain = vec![members[0]];
    while chain.len() < members.len() {
        let last = chain[chain.len() - 1];
        let next =
            members.iter().copied().find(|m| !chain.contains(m) && steps[*m].deps.contains(&last));
        match next {
            Some(next) => chain.push(next),
            // Not a simple cycle: list the rest as they come.
            None => chain
                .extend(members.iter().filter(|m| !chain.contains(m)).copied().collect::<Vec<_>>()),
        }
    }
    chain
}

/// What the scheduler needs of a valid flow's graph.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The steps in an order where each comes after its dependencies.
    pub order: Vec<usize>,
    /// For each step, the steps that need it.
    pub dependents: Vec<Vec<usize>>,
}

impl Plan {
    /// Analyses a flow. A validated flow has no cycles, so this cannot fail.
    pub fn new(flow: &Flow) -> Plan {
        let graph = graph(&flow.steps);
        // Validation rejects cycles; were one to slip through, the steps in
        // it would never become ready and the run would report them skipped.
        let order = toposort(&graph, None)
            .map(|o| o.into_iter().map(|n| graph[n]).collect())
            .unwrap_or_default();
        let mut dependents = vec![Vec::new(); flow.steps.len()];
        for (i, step) in flow.steps.iter().enumerate() {
            for &dep in &step.deps {
                dependents[dep].push(i);
            }
        }
        Plan { order, dependents }
    }
}

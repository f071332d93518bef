//! The step graph over plain indices: node `i` is step `i`, and an edge runs
//! from a dependency to its dependent. Flows are validated and planned on it.

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// The graph of steps whose dependencies are `deps[i]`.
pub(crate) fn graph(deps: &[&[usize]]) -> DiGraph<usize, ()> {
    let mut graph = DiGraph::with_capacity(deps.len(), deps.iter().map(|d| d.len()).sum());
    let nodes: Vec<NodeIndex> = (0..deps.len()).map(|i| graph.add_node(i)).collect();
    for (i, needs) in deps.iter().enumerate() {
        for &dep in needs.iter() {
            graph.add_edge(nodes[dep], nodes[i], ());
        }
    }
    graph
}

/// Every cycle among the steps, each as its members in dependency order
/// (a step that needs itself is a cycle of one).
pub(crate) fn cycles(deps: &[&[usize]]) -> Vec<Vec<usize>> {
    let graph = graph(deps);
    let mut cycles: Vec<Vec<usize>> = tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
        .map(|scc| {
            let mut members: Vec<usize> = scc.iter().map(|&n| graph[n]).collect();
            members.sort_unstable();
            order_cycle(deps, &members)
        })
        .collect();
    cycles.sort();
    cycles
}

/// Walks the cycle from its first member along `needs`, so the message reads
/// as a chain: `a -> b -> c` where each needs the one before it.
fn order_cycle(deps: &[&[usize]], members: &[usize]) -> Vec<usize> {
    let mut chain = vec![members[0]];
    while chain.len() < members.len() {
        let last = chain[chain.len() - 1];
        let next = members.iter().copied().find(|m| !chain.contains(m) && deps[*m].contains(&last));
        match next {
            Some(next) => chain.push(next),
            // Not a simple cycle: list the rest as they come.
            None => chain
                .extend(members.iter().filter(|m| !chain.contains(m)).copied().collect::<Vec<_>>()),
        }
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_and_read_as_chains() {
        // 0 needs 2, 1 needs 0, 2 needs 1; 3 is free; 4 needs itself.
        let deps: [&[usize]; 5] = [&[2], &[0], &[1], &[], &[4]];
        assert_eq!(cycles(&deps), vec![vec![0, 1, 2], vec![4]]);
        let acyclic: [&[usize]; 3] = [&[], &[0], &[0, 1]];
        assert!(cycles(&acyclic).is_empty());
    }
}

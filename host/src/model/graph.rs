//! The step graph over plain indices: node `i` is step `i`, and an edge runs
//! from a dependency to its dependent. Flows are validated and planned on it.
//!
//! Everything here is linear in the flow, or O(V·E/64) with bitsets, and
//! none of it recurses: a flow arrives over the network, and a 10 000-step
//! chain must neither take a minute nor overflow a worker's stack.

use petgraph::algo::{kosaraju_scc, toposort};
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

/// The steps in an order where each comes after what it needs; `None` if
/// they depend on each other in a cycle.
pub(crate) fn order(deps: &[&[usize]]) -> Option<Vec<usize>> {
    let graph = graph(deps);
    toposort(&graph, None).ok().map(|order| order.into_iter().map(|node| graph[node]).collect())
}

/// Every cycle among the steps, each as its members in dependency order
/// (a step that needs itself is a cycle of one). Kosaraju's algorithm,
/// which petgraph runs without recursion, then a linear walk per cycle.
pub(crate) fn cycles(deps: &[&[usize]]) -> Vec<Vec<usize>> {
    let graph = graph(deps);
    let mut cycles: Vec<Vec<usize>> = kosaraju_scc(&graph)
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

/// Walks the cycle from its first member to a member that needs it, and
/// so on, so the message reads as a chain: `a -> b -> c` where each needs
/// the one before it. Linear in the cycle's members and their needs.
fn order_cycle(deps: &[&[usize]], members: &[usize]) -> Vec<usize> {
    // Positions in `members` (sorted), and who needs whom within the cycle.
    let position = |step: usize| members.binary_search(&step).ok();
    let mut needed_by: Vec<Vec<usize>> = vec![Vec::new(); members.len()];
    for (at, &member) in members.iter().enumerate() {
        for &dep in deps[member] {
            if let Some(dep_at) = position(dep) {
                needed_by[dep_at].push(at);
            }
        }
    }
    let mut taken = vec![false; members.len()];
    let mut chain = Vec::with_capacity(members.len());
    let mut at = Some(0);
    while let Some(here) = at {
        taken[here] = true;
        chain.push(members[here]);
        at = needed_by[here].iter().copied().find(|&next| !taken[next]);
    }
    // Not a simple cycle: list the rest as they come.
    chain.extend(members.iter().zip(&taken).filter(|(_, taken)| !**taken).map(|(&m, _)| m));
    chain
}

/// Rows `a` (to change) and `b` (to read) of a bit matrix, `a != b`.
fn two_rows(bits: &mut [u64], words: usize, a: usize, b: usize) -> (&mut [u64], &[u64]) {
    if a < b {
        let (low, high) = bits.split_at_mut(b * words);
        (&mut low[a * words..][..words], &high[..words])
    } else {
        let (low, high) = bits.split_at_mut(a * words);
        (&mut high[..words], &low[b * words..][..words])
    }
}

/// Which steps each step needs, directly or through others: one bitset per
/// step, built in topological order in O(V·E/64).
pub(crate) struct Reach {
    /// Words per row.
    words: usize,
    /// Row `i` (words `i * words ..`) has bit `j` when step `i` needs `j`.
    bits: Vec<u64>,
}

impl Reach {
    /// The reach of steps whose dependencies are `deps`, visited in
    /// `order` (topological: a step after what it needs).
    pub(crate) fn new(deps: &[&[usize]], order: &[usize]) -> Reach {
        let words = deps.len().div_ceil(64);
        let mut bits = vec![0u64; words * deps.len()];
        for &i in order {
            // A step that needs itself is a cycle, which validation refuses.
            for &dep in deps[i].iter().filter(|&&dep| dep != i) {
                // Row `dep` is complete: it came earlier in the order.
                let (row, dep_row) = two_rows(&mut bits, words, i, dep);
                for (word, dep_word) in row.iter_mut().zip(dep_row) {
                    *word |= dep_word;
                }
                row[dep / 64] |= 1 << (dep % 64);
            }
        }
        Reach { words, bits }
    }

    fn row(&self, step: usize) -> &[u64] {
        &self.bits[step * self.words..][..self.words]
    }

    /// Whether step `step` needs `other`, directly or through others.
    pub(crate) fn needs(&self, step: usize, other: usize) -> bool {
        self.row(step)[other / 64] & (1 << (other % 64)) != 0
    }

    /// For each of `needs` (one step's direct dependencies) that another of
    /// them already needs: `(index in needs, index in needs of the first
    /// one, in the order given, that implies it)`. O(|needs|·V/64): every
    /// implied need is found once, by masking those found.
    pub(crate) fn implied(&self, needs: &[usize]) -> Vec<(usize, usize)> {
        if needs.len() < 2 {
            return Vec::new();
        }
        let mut unexplained = vec![0u64; self.words];
        for &need in needs {
            unexplained[need / 64] |= 1 << (need % 64);
        }
        let mut witness: Vec<(usize, usize)> = Vec::new();
        for (by, &other) in needs.iter().enumerate() {
            for (w, (open, reach)) in unexplained.iter_mut().zip(self.row(other)).enumerate() {
                let mut found = *open & reach;
                *open &= !found;
                while found != 0 {
                    let step = w * 64 + found.trailing_zeros() as usize;
                    found &= found - 1;
                    witness.push((step, by));
                }
            }
        }
        let at: std::collections::HashMap<usize, usize> =
            needs.iter().enumerate().map(|(at, &need)| (need, at)).collect();
        let mut implied: Vec<(usize, usize)> =
            witness.into_iter().filter_map(|(step, by)| Some((*at.get(&step)?, by))).collect();
        implied.sort_unstable();
        implied
    }
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

    #[test]
    fn a_long_cycle_is_reported_whole_without_recursion() {
        // Step i needs i - 1, and step 0 needs the last: one cycle of 50 000,
        // deep enough to overflow a recursive search on a 2 MiB stack.
        let n = 50_000;
        let owned: Vec<Vec<usize>> =
            (0..n).map(|i| vec![if i == 0 { n - 1 } else { i - 1 }]).collect();
        let found = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let deps: Vec<&[usize]> = owned.iter().map(Vec::as_slice).collect();
                cycles(&deps)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(found, vec![(0..n).collect::<Vec<_>>()]);
    }

    #[test]
    fn reach_is_transitive_and_implied_needs_name_the_first_witness() {
        // 0; 1 needs 0; 2 needs 1; 3 needs 2, 0 and 1 (0 and 1 implied by 2).
        let deps: [&[usize]; 4] = [&[], &[0], &[1], &[2, 0, 1]];
        let order = order(&deps).unwrap();
        let reach = Reach::new(&deps, &order);
        assert!(reach.needs(2, 0) && reach.needs(3, 0) && !reach.needs(0, 2));
        assert!(!reach.needs(1, 1));
        // needs[1] (= 0) and needs[2] (= 1) are implied by needs[0] (= 2).
        assert_eq!(reach.implied(deps[3]), vec![(1, 0), (2, 0)]);
        assert!(reach.implied(deps[2]).is_empty());
    }

    #[test]
    fn reach_handles_dependencies_numbered_after_their_dependents() {
        // 0 needs 2, 2 needs 1: the numbering is not the order.
        let deps: [&[usize]; 3] = [&[2], &[], &[1]];
        let order = order(&deps).unwrap();
        let reach = Reach::new(&deps, &order);
        assert!(reach.needs(0, 1) && reach.needs(0, 2) && reach.needs(2, 1));
        assert!(!reach.needs(1, 0) && !reach.needs(2, 0));
    }
}

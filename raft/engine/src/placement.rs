//! Where a new runtime goes: among the nodes whose executor serves its type (and its `site`
//! label, if it has one), the one with the fewest runtimes; ties go to the lowest node id. The
//! backend it lands on says what the runtime can do.

use std::collections::BTreeMap;

use runtimeai_model::{BackendInfo, NodeInfo, Placement, RuntimeType};

/// The node and its backend a runtime of `runtime_type` (in `site`, if given) goes to, given
/// the runtimes each node has (`counts`); `None` if no node serves it there.
pub fn place<'a>(
    nodes: &'a [NodeInfo],
    counts: &BTreeMap<u64, u64>,
    runtime_type: RuntimeType,
    site: Option<&str>,
) -> Option<(Placement, &'a BackendInfo)> {
    nodes
        .iter()
        .filter(|node| site.is_none() || node.site.as_deref() == site)
        .filter_map(|node| {
            let backend = node.backends.iter().find(|b| b.runtime_type == runtime_type.as_str())?;
            Some((node, backend))
        })
        .min_by_key(|(node, _)| (counts.get(&node.node_id).copied().unwrap_or(0), node.node_id))
        .map(|(node, backend)| {
            (Placement { node_id: node.node_id, site: node.site.clone(), zone: node.zone.clone() }, backend)
        })
}

/// What the nodes serve, for a refusal to say: `type (driver in site s)`, each once, sorted.
pub fn offered(nodes: &[NodeInfo]) -> Vec<String> {
    let mut offered: Vec<String> = nodes
        .iter()
        .flat_map(|node| {
            let site = node.site.clone().map(|s| format!(" in site {s}")).unwrap_or_default();
            node.backends.iter().map(move |b| format!("{} ({}{site})", b.runtime_type, b.driver))
        })
        .collect();
    offered.sort();
    offered.dedup();
    offered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node_id: u64, site: Option<&str>, types: &[&str]) -> NodeInfo {
        NodeInfo {
            node_id,
            grpc_addr: String::new(),
            http_addr: String::new(),
            version: String::new(),
            backends: types
                .iter()
                .map(|t| BackendInfo {
                    runtime_type: t.to_string(),
                    driver: "simulated".into(),
                    shared: false,
                    capabilities: vec![],
                })
                .collect(),
            site: site.map(str::to_string),
            zone: None,
        }
    }

    #[test]
    fn the_least_loaded_node_serving_the_type_and_site_wins_and_ties_go_to_the_lowest_id() {
        let nodes =
            [node(1, Some("eu"), &["vm"]), node(2, Some("us"), &["vm", "sandbox"]), node(3, Some("us"), &["vm"])];
        let counts = BTreeMap::from([(1, 5), (2, 1), (3, 1)]);
        let id = |placed: Option<(Placement, &BackendInfo)>| placed.map(|(p, _)| p.node_id);
        assert_eq!(id(place(&nodes, &counts, RuntimeType::Vm, None)), Some(2), "fewest runtimes, then the lowest id");
        assert_eq!(id(place(&nodes, &counts, RuntimeType::Vm, Some("eu"))), Some(1), "the site decides first");
        assert_eq!(id(place(&nodes, &counts, RuntimeType::Sandbox, Some("eu"))), None, "none serves it there");
        assert_eq!(id(place(&nodes, &counts, RuntimeType::Vcluster, None)), None);
        assert_eq!(
            offered(&nodes),
            ["sandbox (simulated in site us)", "vm (simulated in site eu)", "vm (simulated in site us)"]
        );
    }
}

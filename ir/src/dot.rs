//! Graphviz DOT export.

use crate::graph::Graph;
use crate::op::{quote, Op};

/// Renders the graph in DOT: one box per node (id, op, attributes, output types), inputs and parameters as
/// ellipses, outputs as double octagons; edges labelled with the output index when a node has several.
pub fn to_dot(g: &Graph) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "digraph {} {{\n  rankdir=TB;\n  node [fontname=\"monospace\", fontsize=10];\n",
        quote(&g.name)
    ));
    for (id, n) in g.nodes() {
        let types: Vec<String> = n.outputs.iter().map(|t| t.to_string()).collect();
        let (label, shape) = match &n.op {
            Op::Input { name, .. } => (
                format!("%{} input {}\n{}", id.index(), name, types.join(", ")),
                "ellipse",
            ),
            Op::Param { name, .. } => (
                format!("%{} param {}\n{}", id.index(), name, types.join(", ")),
                "ellipse",
            ),
            Op::Composite(crate::op::Composite::Fused { body }) => {
                // a fused kernel: its body's ops, not its text
                let ops: Vec<&str> = body
                    .graph()
                    .nodes()
                    .filter(|(_, b)| !b.op.is_input())
                    .map(|(_, b)| b.op.name())
                    .collect();
                let head = match &n.name {
                    Some(nm) => format!("%{} fused ({})", id.index(), nm),
                    None => format!("%{} fused", id.index()),
                };
                (format!("{head}\n{{{}}}\n{}", ops.join(", "), types.join(", ")), "box")
            }
            op => {
                let attrs: Vec<String> = op
                    .attrs()
                    .into_iter()
                    .map(|(k, v)| {
                        let v = v.to_string();
                        let v = if v.len() > 40 {
                            format!("{}…", &v[..v.char_indices().nth(40).map(|c| c.0).unwrap_or(v.len())])
                        } else {
                            v
                        };
                        format!("{k}={v}")
                    })
                    .collect();
                let head = match &n.name {
                    Some(nm) => format!("%{} {} ({})", id.index(), op.name(), nm),
                    None => format!("%{} {}", id.index(), op.name()),
                };
                let a = if attrs.is_empty() {
                    String::new()
                } else {
                    format!("\n[{}]", attrs.join(", "))
                };
                (format!("{head}{a}\n{}", types.join(", ")), "box")
            }
        };
        s.push_str(&format!(
            "  n{} [shape={shape}, label={}];\n",
            id.index(),
            quote(&label)
        ));
        let multi = |v: &crate::Value| g.node(v.node).outputs.len() > 1;
        for v in &n.inputs {
            if multi(v) {
                s.push_str(&format!(
                    "  n{} -> n{} [label=\"#{}\"];\n",
                    v.node.index(),
                    id.index(),
                    v.index
                ));
            } else {
                s.push_str(&format!("  n{} -> n{};\n", v.node.index(), id.index()));
            }
        }
    }
    for (i, (name, v)) in g.outputs().iter().enumerate() {
        s.push_str(&format!("  out{i} [shape=doubleoctagon, label={}];\n", quote(name)));
        s.push_str(&format!("  n{} -> out{i};\n", v.node.index()));
    }
    s.push_str("}\n");
    s
}

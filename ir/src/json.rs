//! JSON form of a graph, through `serde`.
//!
//! `{"name": ..., "nodes": [{"id", "name"?, "op", "inputs": [[node, output], ...], "outputs": [types]}],
//! "outputs": [{"name", "node", "output"}]}`. Reading re-infers every node's types and refuses a file whose
//! stored types disagree, naming the node. Non-finite floats are written as the strings `"nan"`, `"inf"` and
//! `"-inf"`.

use crate::error::{IrError, Result};
use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::TensorType;
use petgraph::graph::NodeIndex;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct JsonGraph {
    name: String,
    nodes: Vec<JsonNode>,
    outputs: Vec<JsonOutput>,
}

#[derive(Serialize, Deserialize)]
struct JsonNode {
    id: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    op: Op,
    inputs: Vec<(u32, u32)>,
    outputs: Vec<TensorType>,
}

#[derive(Serialize, Deserialize)]
struct JsonOutput {
    name: String,
    node: u32,
    output: u32,
}

/// Serialises a graph to pretty-printed JSON.
pub fn to_json(g: &Graph) -> String {
    let jg = JsonGraph {
        name: g.name.clone(),
        nodes: g
            .nodes()
            .map(|(id, n)| JsonNode {
                id: id.index(),
                name: n.name.clone(),
                op: n.op.clone(),
                inputs: n.inputs.iter().map(|v| (v.node.index() as u32, v.index)).collect(),
                outputs: n.outputs.clone(),
            })
            .collect(),
        outputs: g
            .outputs()
            .iter()
            .map(|(name, v)| JsonOutput {
                name: name.clone(),
                node: v.node.index() as u32,
                output: v.index,
            })
            .collect(),
    };
    serde_json::to_string_pretty(&jg).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Reads a graph from JSON, re-inferring and checking every node.
pub fn from_json(s: &str) -> Result<Graph> {
    let jg: JsonGraph = serde_json::from_str(s).map_err(|e| IrError::Graph(format!("invalid graph JSON: {e}")))?;
    let mut g = Graph::new(jg.name);
    for (i, n) in jg.nodes.into_iter().enumerate() {
        if n.id != i {
            return Err(IrError::Graph(format!(
                "node ids must be 0, 1, 2, ... in order; found id {} at position {i}",
                n.id
            )));
        }
        let inputs: Vec<Value> = n
            .inputs
            .iter()
            .map(|&(node, out)| Value::new(NodeIndex::new(node as usize), out))
            .collect();
        let id = g.add_node(n.op, &inputs, n.name)?;
        if g.node(id).outputs != n.outputs {
            let node = g.node(id);
            return Err(IrError::Node {
                id: i,
                name: node.name.clone(),
                op: node.op.name().to_string(),
                message: format!(
                    "stored output types [{}] differ from inferred [{}]",
                    n.outputs.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
                    node.outputs
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    for o in jg.outputs {
        g.add_output(o.name, Value::new(NodeIndex::new(o.node as usize), o.output))?;
    }
    Ok(g)
}

/// Serde helpers writing non-finite f64 values as strings.
pub(crate) mod f64_repr {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(crate) enum Repr {
        Num(f64),
        Str(String),
    }

    pub(crate) fn to_f64(r: Repr) -> Result<f64, String> {
        match r {
            Repr::Num(x) => Ok(x),
            Repr::Str(s) => match s.as_str() {
                "nan" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                _ => Err(format!(
                    "expected a number, \"nan\", \"inf\" or \"-inf\", found \"{s}\""
                )),
            },
        }
    }

    pub(crate) fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_str(&crate::op::format_f64(*x))
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        to_f64(Repr::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub(crate) mod vec {
        use super::*;
        use serde::ser::SerializeSeq;

        pub(crate) fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for x in v {
                if x.is_finite() {
                    seq.serialize_element(x)?;
                } else {
                    seq.serialize_element(&crate::op::format_f64(*x))?;
                }
            }
            seq.end()
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
            let v = Vec::<Repr>::deserialize(d)?;
            v.into_iter()
                .map(|r| to_f64(r).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}

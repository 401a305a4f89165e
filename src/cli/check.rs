//! `fulgur check FILE`: parse and verify a graph, print a summary.

use crate::cli::files::{load_graph, write_stdout};
use anyhow::Result;
use fulgur_ir::{Graph, Op};
use std::fmt::Write;
use std::path::PathBuf;

/// Parameters listed one by one; beyond this many the rest are counted.
const MAX_LISTED_PARAMS: usize = 32;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The graph: `.fir` text, or JSON when the name ends in `.json`.
    pub file: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let g = load_graph(&args.file)?;
    write_stdout(&summary(&g, &args.file.display().to_string()))
}

/// The text `fulgur check` prints.
pub fn summary(g: &Graph, source: &str) -> String {
    let s = g.summary();
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("graph {}: ok ({source})", g.name));
    line(format!("nodes       {}", s.nodes));
    let decls: Vec<(&str, String, bool)> = g
        .nodes()
        .filter_map(|(_, n)| {
            n.op.input_decl()
                .map(|(name, ty, is_param)| (name, ty.to_string(), is_param))
        })
        .collect();
    let width = decls
        .iter()
        .map(|d| d.0.len())
        .chain(g.outputs().iter().map(|(n, _)| n.len()))
        .max()
        .unwrap_or(0);
    line(format!("inputs      {}", s.inputs));
    for (name, ty, _) in decls.iter().filter(|d| !d.2) {
        line(format!("  {name:width$}  {ty}"));
    }
    let symbolic_params = g
        .nodes()
        .filter(|(_, n)| matches!(&n.op, Op::Param { ty, .. } if ty.shape.as_consts().is_none()))
        .count();
    let mut elements = format!("{} elements", group_thousands(s.param_elements));
    if symbolic_params > 0 {
        let _ = write!(elements, ", plus {symbolic_params} of symbolic shape");
    }
    line(format!("parameters  {} ({elements})", s.params));
    let params: Vec<_> = decls.iter().filter(|d| d.2).collect();
    for (name, ty, _) in params.iter().take(MAX_LISTED_PARAMS) {
        line(format!("  {name:width$}  {ty}"));
    }
    if params.len() > MAX_LISTED_PARAMS {
        line(format!("  ... and {} more", params.len() - MAX_LISTED_PARAMS));
    }
    line(format!("outputs     {}", s.outputs));
    for (name, v) in g.outputs() {
        line(format!("  {name:width$}  {}", g.ty(*v)));
    }
    line(format!(
        "symbols     {}",
        if s.symbols.is_empty() {
            "(none)".to_string()
        } else {
            s.symbols.join(", ")
        }
    ));
    let ops: Vec<String> = s.op_counts.iter().map(|(op, n)| format!("{op} {n}")).collect();
    line(format!("ops         {}", ops.join(", ")));
    out
}

/// `1234567` → `1,234,567`.
fn group_thousands(n: u64) -> String {
    let reversed: Vec<char> = n.to_string().chars().rev().collect();
    let groups: Vec<String> = reversed.chunks(3).map(|c| c.iter().rev().collect()).collect();
    groups.into_iter().rev().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::group_thousands;

    #[test]
    fn thousands() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1000), "1,000");
        assert_eq!(group_thousands(1234567), "1,234,567");
    }
}

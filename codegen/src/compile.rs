//! Compile as a library call: a graph and [`CompileOptions`] in, a [`Compiled`] result with its reports out.
//! The command line only parses arguments into options and prints what comes back.
//!
//! ```
//! use fulgur_codegen::compile::{compile, CompileOptions};
//! use fulgur_ir::{DType, Dim, Graph};
//! let mut g = Graph::new("g");
//! let x = g.input("x", DType::F32, vec![Dim::sym("B"), Dim::from(8)]).unwrap();
//! let y = g.exp(x).unwrap();
//! let y = g.neg(y).unwrap();
//! g.add_output("y", y).unwrap();
//! let c = compile(&g, &CompileOptions::default(), None).unwrap();
//! assert_eq!(c.reports.len(), 2); // dead-code elimination, then equality saturation
//! assert!(c.reports[1].kernels_after < c.reports[1].kernels_before); // exp and neg fused
//! ```

use crate::CodegenError;
use fulgur_ir::Graph;
use fulgur_passes::eqsat::EqSat;
use fulgur_passes::rules::{families, RuleConfig};
use fulgur_passes::{standard_pipeline, CostModel, Limits, PassContext, PassReport, Pipeline, Target};
use std::collections::BTreeMap;
use std::path::Path;

/// How much of the optimizer runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptLevel {
    /// The definitional graph as it is.
    None,
    /// Dead-code elimination and equality saturation with every rule family not disabled.
    #[default]
    Full,
}

/// Everything a compile depends on.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub opt: OptLevel,
    /// The cost-model target by name (`H100`, `H200`, `H800`, `H20`, `A100`, `CPU`).
    pub target: String,
    /// Measured ceilings overriding the target's, as the JSON text of a ceilings file, and where it came from
    /// (for errors).
    pub ceilings: Option<(String, String)>,
    /// Symbol values the cost model evaluates shapes at; each a symbol of the graph, at most once.
    pub bind: Vec<(String, i64)>,
    /// Whether f32 matmuls may use TF32 (`docs/numerics.md`): off unless asked.
    pub tf32: bool,
    pub limits: Limits,
    /// Rule families to leave out.
    pub disabled: Vec<String>,
    pub rules: RuleConfig,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            opt: OptLevel::Full,
            target: "H100".into(),
            ceilings: None,
            bind: Vec::new(),
            tf32: false,
            limits: Limits::default(),
            disabled: Vec::new(),
            rules: RuleConfig::default(),
        }
    }
}

/// What a compile produced.
#[derive(Debug)]
pub struct Compiled {
    /// The optimized graph.
    pub graph: Graph,
    /// One report per pass (none at [`OptLevel::None`]).
    pub reports: Vec<PassReport>,
    /// The cost model the optimizer planned with.
    pub model: CostModel,
    /// Lines a command should print as warnings (templates a time limit decided).
    pub warnings: Vec<String>,
}

impl CompileOptions {
    /// The cost model these options describe for graph `g`: the target, its ceilings, the bindings (which
    /// must name `g`'s symbols, each once), and every shape of `g` must have a size at those values.
    pub fn cost_model(&self, g: &Graph) -> Result<CostModel, CodegenError> {
        let opt = |m: String| CodegenError::Options(m);
        let mut t = Target::by_name(&self.target).ok_or_else(|| {
            opt(format!(
                "unknown target `{}` (known: {})",
                self.target,
                Target::all()
                    .iter()
                    .map(|t| t.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if let Some((text, source)) = &self.ceilings {
            t = t.with_overrides(text).map_err(|e| opt(format!("{source}: {e}")))?;
        }
        let mut m = CostModel::new(t);
        m.tf32 = self.tf32;
        let symbols = g.summary().symbols;
        let mut given: BTreeMap<&str, i64> = BTreeMap::new();
        for (k, v) in &self.bind {
            if *v <= 0 {
                return Err(opt(format!("--bind {k}: the value must be positive, found {v}")));
            }
            if !symbols.iter().any(|s| s == k) {
                return Err(opt(format!(
                    "--bind {k}: the graph has no symbol `{k}` (its symbols: {})",
                    if symbols.is_empty() {
                        "none".to_string()
                    } else {
                        symbols.join(", ")
                    }
                )));
            }
            if let Some(prev) = given.insert(k, *v) {
                return Err(opt(format!("--bind {k} is given twice ({prev} and {v})")));
            }
            m.env.insert(k.clone(), *v);
        }
        check_costable(g, &m)?;
        Ok(m)
    }

    /// The optimizer's pipeline for these options.
    pub fn pipeline(&self) -> Result<Pipeline, CodegenError> {
        Ok(standard_pipeline(&self.rules, &self.disabled, self.limits.clone())?)
    }

    /// The equality-saturation pass these options run (for `--why`, which saturates a template again).
    pub fn eqsat(&self) -> Result<EqSat, CodegenError> {
        let fams = families(&self.rules, &self.disabled).map_err(CodegenError::Options)?;
        let mut eq = EqSat::new(fams);
        eq.limits = self.limits.clone();
        Ok(eq)
    }
}

/// Every shape of `g` must have a size at the cost model's symbol values: a dimension or an element count that
/// overflows 64 bits would cost nothing (or everything) without a word.
fn check_costable(g: &Graph, model: &CostModel) -> Result<(), CodegenError> {
    let mut env: Vec<String> = model.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    for (id, n) in g.nodes() {
        for t in &n.outputs {
            let dims: Option<Vec<i64>> = t.dims().iter().map(|d| d.eval_or(&model.env, 1024).ok()).collect();
            let fits = dims.is_some_and(|d| d.iter().try_fold(1i64, |a, &x| a.checked_mul(x.max(0))).is_some());
            if !fits {
                return Err(CodegenError::Options(format!(
                    "the shape {t} of node %{} overflows 64 bits at {} (--bind)",
                    id.index(),
                    env.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Compiles `g`: the optimizer at `opts.opt` under the cost model the options describe; with `dump`, the graph
/// after each pass is written there as `.fir` and `.dot`.
pub fn compile(g: &Graph, opts: &CompileOptions, dump: Option<&Path>) -> Result<Compiled, CodegenError> {
    let model = opts.cost_model(g)?;
    if opts.opt == OptLevel::None {
        return Ok(Compiled {
            graph: g.clone(),
            reports: Vec::new(),
            model,
            warnings: Vec::new(),
        });
    }
    let pipeline = opts.pipeline()?;
    let (graph, reports) = pipeline.run(g, &PassContext { model: model.clone() }, dump)?;
    let warnings = reports
        .iter()
        .filter_map(|r| r.eqsat.as_ref())
        .flat_map(|e| e.warnings.iter().cloned())
        .collect();
    Ok(Compiled {
        graph,
        reports,
        model,
        warnings,
    })
}

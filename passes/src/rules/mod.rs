//! Rule families, one file each. A rule only says what is equal; the cost model and the extractor decide
//! what is built. Every family has soundness property tests: both sides of every rule run through the
//! reference interpreter in f64 on random inputs of random admissible shapes and must agree.

pub mod algebra;
pub mod collectives;
pub mod fusion;
pub mod lightning;
pub mod moe;
mod routed;

use crate::lang::Rewrite;

/// A named set of rules.
pub struct Family {
    pub name: &'static str,
    pub rules: Vec<Rewrite>,
}

/// Options that shape the rules (e.g. the block sizes the lightning family offers).
#[derive(Clone, Debug)]
pub struct RuleConfig {
    /// Candidate lightning block sizes; the extractor picks by cost.
    pub lightning_blocks: Vec<usize>,
    /// Candidate chunk counts for overlapping an expert-parallel all-to-all with expert compute (the
    /// `collectives` family); the extractor picks by cost.
    pub a2a_chunks: Vec<usize>,
}

impl Default for RuleConfig {
    fn default() -> RuleConfig {
        RuleConfig {
            lightning_blocks: vec![64, 128, 256],
            a2a_chunks: vec![2, 4],
        }
    }
}

/// Every family's name, in pipeline order.
pub const FAMILY_NAMES: [&str; 5] = ["algebra", "lightning", "moe", "fusion", "collectives"];

/// The families, minus those named in `disabled`. Unknown names are an error naming them.
pub fn families(cfg: &RuleConfig, disabled: &[String]) -> Result<Vec<Family>, String> {
    for d in disabled {
        if !FAMILY_NAMES.contains(&d.as_str()) {
            return Err(format!(
                "unknown rule family `{d}` (known: {})",
                FAMILY_NAMES.join(", ")
            ));
        }
    }
    let all = vec![
        algebra::family(cfg),
        lightning::family(cfg),
        moe::family(cfg),
        fusion::family(cfg),
        collectives::family(cfg),
    ];
    Ok(all
        .into_iter()
        .filter(|f| !disabled.iter().any(|d| d == f.name))
        .collect())
}

use crate::lang::{EGraph, FNode, ShapeAnalysis};
use egg::{Id, Searcher};

/// A structural test on one e-node of a class: cheap, so a rule that matches nothing costs little.
pub type Probe = fn(&EGraph, Id, &FNode) -> bool;
/// Builds right-hand sides for a matched node (through [`crate::lang::add_checked`], which refuses ill-typed
/// nodes) and returns the classes equal to the matched class.
pub type Build = fn(&mut EGraph, Id, &FNode, &RuleConfig) -> Vec<Id>;
/// Like [`Build`], for rules that also find terms equal to classes other than the matched one: returns
/// `(class, equal class)` pairs.
pub type BuildPairs = fn(&mut EGraph, Id, &FNode, &RuleConfig) -> Vec<(Id, Id)>;

/// What a rule's applier calls.
#[derive(Clone, Copy)]
enum Builder {
    Matched(Build),
    Pairs(BuildPairs),
}

struct FnSearcher {
    probe: Probe,
}

impl Searcher<FNode, ShapeAnalysis> for FnSearcher {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, FNode>> {
        let n = egraph[eclass]
            .nodes
            .iter()
            .filter(|n| (self.probe)(egraph, eclass, n))
            .take(limit)
            .count();
        if n == 0 {
            return None;
        }
        Some(egg::SearchMatches {
            eclass,
            substs: vec![egg::Subst::default(); n],
            ast: None,
        })
    }
    fn vars(&self) -> Vec<egg::Var> {
        vec![]
    }
}

struct FnApplier {
    probe: Probe,
    build: Builder,
    cfg: RuleConfig,
}

impl egg::Applier<FNode, ShapeAnalysis> for FnApplier {
    fn apply_matches(&self, egraph: &mut EGraph, matches: &[egg::SearchMatches<FNode>], rule: egg::Symbol) -> Vec<Id> {
        let mut changed = Vec::new();
        for m in matches {
            let class = egraph.find(m.eclass);
            let nodes: Vec<FNode> = egraph[class]
                .nodes
                .iter()
                .filter(|n| (self.probe)(egraph, class, n))
                .cloned()
                .collect();
            for n in nodes {
                // the matched e-node's own id (with explanations on, each e-node has one): the union is recorded
                // between it and the new term, so an explanation names this rule at this node
                let matched = egraph.add_uncanonical(n.clone());
                let pairs: Vec<(Id, Id)> = match self.build {
                    Builder::Matched(b) => b(egraph, class, &n, &self.cfg)
                        .into_iter()
                        .map(|r| (matched, r))
                        .collect(),
                    Builder::Pairs(b) => b(egraph, class, &n, &self.cfg)
                        .into_iter()
                        .map(|(c, r)| {
                            if egraph.find(c) == egraph.find(class) {
                                (matched, r)
                            } else {
                                (c, r)
                            }
                        })
                        .collect(),
                };
                for (c, rhs) in pairs {
                    if egraph.union_trusted(c, rhs, rule) {
                        changed.push(egraph.find(c));
                    }
                }
            }
        }
        changed
    }
    fn apply_one(
        &self,
        _: &mut EGraph,
        _: Id,
        _: &egg::Subst,
        _: Option<&egg::PatternAst<FNode>>,
        _: egg::Symbol,
    ) -> Vec<Id> {
        Vec::new()
    }
}

fn rule_of(name: &str, probe: Probe, build: Builder, cfg: &RuleConfig) -> Rewrite {
    Rewrite::new(
        name.to_string(),
        FnSearcher { probe },
        FnApplier {
            probe,
            build,
            cfg: cfg.clone(),
        },
    )
    .unwrap_or_else(|e| panic!("rule `{name}` is malformed: {e}"))
}

/// A rule written as Rust code: `probe` selects e-nodes, `build` adds what they equal.
pub fn fn_rule(name: &str, probe: Probe, build: Build, cfg: &RuleConfig) -> Rewrite {
    rule_of(name, probe, Builder::Matched(build), cfg)
}

/// A rule written as Rust code whose `build` may also find terms equal to other classes than the matched one.
pub fn fn_rule_pairs(name: &str, probe: Probe, build: BuildPairs, cfg: &RuleConfig) -> Rewrite {
    rule_of(name, probe, Builder::Pairs(build), cfg)
}

//! # fulgur-passes
//!
//! Graph-to-graph transformations: the pass manager and its reports; the `egg` language and analysis mirroring
//! the IR; rule families (algebra, fusion, lightning attention, MoE, collectives), one file each; the roofline
//! cost model over named targets; DAG-aware extraction; autodiff; sharding. Depends on `fulgur-ir` only.
//!
//! Status: not yet built (the optimizer issue fills it).

//! How the optimizer scales with graph size: the standard pipeline on graphs of about 10k, 100k and 1M nodes,
//! each measured in a process of its own (so peak memory is that graph's alone).
//!
//! ```sh
//! cargo bench --bench scale            # every case
//! cargo bench --bench scale -- chain   # the cases whose name contains `chain`
//! cargo bench --bench scale -- --write-chain 10000 /tmp/chain10000.fir   # a chain as a .fir file, to time
//!                                      # `fulgur inspect` on it (and an older build on the same file)
//! ```
//!
//! Cases: `chain-N`, N elementwise ops in one chain without layer names, the op of each drawn from a seeded
//! generator (so no two windows are alike and nothing is shared: the worst case for templates); `minimax-L`,
//! the MiniMax-Text-01 layout (7 lightning layers to 1 softmax layer, full-size dimensions) with L layers. Each
//! line gives the graph's nodes, the segments and distinct templates, the DCE and equality-saturation times,
//! the whole run (graph construction included), the kernels before and after, and the peak resident memory.

use fulgur::ir::{DType, Dim, Graph, UnaryOp};
use fulgur::models::{forward_graph, ForwardOptions, LayerType, MiniMaxConfig};
use fulgur::passes::rules::RuleConfig;
use fulgur::passes::{standard_pipeline, CostModel, Limits, PassContext, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::process::Command;
use std::time::Instant;

const CASES: [&str; 6] = [
    "chain-10000",
    "chain-100000",
    "chain-1000000",
    "minimax-110",
    "minimax-1100",
    "minimax-11000",
];

fn chain(n: usize) -> Graph {
    let mut rng = StdRng::seed_from_u64(1);
    let mut g = Graph::new("chain");
    let mut v = g
        .input("x", DType::F32, vec![Dim::sym("B"), Dim::from(64)])
        .expect("input");
    let c = g.scalar(0.5, DType::F32).expect("constant");
    let unary = [
        UnaryOp::Exp,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Silu,
    ];
    for _ in 0..n {
        v = if rng.gen_bool(0.5) {
            g.unary(unary[rng.gen_range(0..unary.len())], v)
        } else {
            match rng.gen_range(0..4) {
                0 => g.add(v, c),
                1 => g.mul(v, c),
                2 => g.sub(v, c),
                _ => g.maximum(v, c),
            }
        }
        .expect("op");
    }
    g.add_output("y", v).expect("output");
    g
}

fn minimax(layers: usize) -> Graph {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/configs/minimax-text-01.json");
    let mut cfg = MiniMaxConfig::from_file(std::path::Path::new(path)).expect("config");
    cfg.num_hidden_layers = layers;
    cfg.layer_types = (0..layers)
        .map(|l| if l % 8 == 7 { LayerType::Full } else { LayerType::Linear })
        .collect();
    forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .expect("graph")
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Runs one case in this process and prints its line.
fn run_case(case: &str) {
    let start = Instant::now();
    let (kind, n) = case.split_once('-').expect("case name");
    let n: usize = n.parse().expect("case size");
    let g = match kind {
        "chain" => chain(n),
        _ => minimax(n),
    };
    let cx = PassContext {
        model: CostModel::new(Target::by_name("H100").expect("H100")),
    };
    let p = standard_pipeline(&RuleConfig::default(), &[], Limits::default()).expect("pipeline");
    let (_, reports) = p.run(&g, &cx, None).expect("optimize");
    let eq = reports[1].eqsat.as_ref().expect("eqsat report");
    println!(
        "| {case} | {} | {} / {} | {:.0} ms | {:.0} ms | {:.1} s | {} → {} | {:.0} MiB |",
        g.node_count(),
        eq.segments,
        eq.templates.len(),
        reports[0].wall_ms,
        reports[1].wall_ms,
        start.elapsed().as_secs_f64(),
        reports[0].kernels_before,
        reports[1].kernels_after,
        peak_rss_mib()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    // (a case filter; `cargo bench` also passes `--bench`)
    if let Some(pos) = std::env::args().position(|a| a == "--write-chain") {
        let n: usize = std::env::args()
            .nth(pos + 1)
            .and_then(|n| n.parse().ok())
            .expect("--write-chain N PATH");
        let path = std::env::args().nth(pos + 2).expect("--write-chain N PATH");
        fulgur::ir::tensor::write_atomic(
            std::path::Path::new(&path),
            fulgur::ir::text::print(&chain(n)).as_bytes(),
        )
        .expect("write the chain");
        return;
    }
    if let Some(pos) = std::env::args().position(|a| a == "--case") {
        let case = std::env::args().nth(pos + 1).expect("--case NAME");
        run_case(&case);
        return;
    }
    println!("| graph | nodes | segments / templates | DCE | equality saturation | whole run | kernels | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().expect("current exe");
    for case in CASES {
        if !args.is_empty() && !args.iter().any(|a| case.contains(a.as_str())) {
            continue;
        }
        let out = Command::new(&exe).args(["--case", case]).output().expect("run case");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{case} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

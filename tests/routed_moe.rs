//! The routed MoE exchange (`docs/parallelism.md`, "The routed exchange"): the structural graph's MoE chain
//! (`moe_dispatch` … `moe_combine`) sharded as `all_to_all_dispatch` → the experts on the received rows →
//! `all_to_all_combine` gives the single-device logits and loss, for every plan that splits the experts over
//! adjacent mesh axes; the per-rank programs on simulated ranks equal the simulated graph.

mod common;

use fulgur::ir::{Graph, Interpreter, Precision, Tensor};
use fulgur::models::checkpoint::Checkpoint;
use fulgur::models::{forward_graph, random_tokens, ForwardOptions};
use fulgur::parallel::{minimax_plan, shard_forward, Parallel};
use std::collections::{BTreeMap, HashMap};

fn run(g: &Graph, feed: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    Interpreter::new(Precision::F64).run(g, feed).unwrap()
}

fn worst(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> (f64, String) {
    let mut w = (0.0f64, String::new());
    for (name, t) in want {
        let e = got[name].rel_l2(t);
        if e > w.0 || e.is_nan() {
            w = (e, name.clone());
        }
    }
    w
}

fn loss_graph(cfg: &fulgur::models::MiniMaxConfig) -> Graph {
    forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The forward a plan shards (with expert-tensor parallelism, the gate and up halves apart).
fn plan_graph(cfg: &fulgur::models::MiniMaxConfig, p: &Parallel) -> Graph {
    forward_graph(
        cfg,
        &p.forward_options(&ForwardOptions {
            loss: true,
            ..Default::default()
        }),
    )
    .unwrap()
}

/// tiny-a (4 layers, 4 experts, top-2): every MoE layer routed, the exchange where the experts are split (with
/// `etp=2` their width over `tp` and the exchange over `ep` within each width slice), the logits and loss those
/// of one device within 1e-10 (f64).
#[test]
fn tiny_a_routed_gives_the_single_device_logits() {
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let g = loss_graph(&ck.config);
    let mut feed = ck.load_params(&g).unwrap();
    let layers = ck.config.num_hidden_layers;
    // (plan, batch, exchanges per layer): experts split over ep (and tp, adjacent), or replicated (none)
    for (par, b, exchanged) in [
        ("ep=2", 2, true),
        ("ep=4", 4, true),
        ("dp=2,ep=2", 4, true),
        ("ep=2,tp=2", 2, true),
        ("tp=2", 2, true),
        ("dp=2", 2, false),
        // expert-tensor parallel: each expert's width over tp, the exchange within each width slice
        ("ep=2,tp=2,etp=2", 2, true),
        ("tp=2,etp=2", 2, false),
    ] {
        feed.insert("input_ids".into(), random_tokens(b, 16, ck.config.vocab_size, 3));
        let single = run(&g, &feed);
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, b, 16).unwrap();
        let (_, sg, report) = shard_forward(&plan_graph(&ck.config, &p), &plan, Ok).unwrap();
        assert_eq!(report.routed_moe, layers, "{par}: {report:?}");
        assert_eq!(report.whole_moe, 0, "{par}");
        let dispatches = report.collectives.get("all_to_all_dispatch").copied().unwrap_or(0);
        let combines = report.collectives.get("all_to_all_combine").copied().unwrap_or(0);
        assert_eq!(
            dispatches,
            if exchanged { layers } else { 0 },
            "{par}: {:?}",
            report.collectives
        );
        assert_eq!(combines, dispatches, "{par}");
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("tiny-a {par}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
}

/// The scaled-down MiniMax layout (16 layers, 8 experts): EP2, EP4, EP2 with TP2 and with DP2 routed, within
/// 1e-10 of one device; with sequence parallelism the experts go over `ep·sp`, adjacent too; EP2 and EP4 with
/// ETP2 (each expert's width over `tp`, an exchange per width slice).
#[test]
fn minimax_small_routed_gives_the_single_device_logits() {
    let cfg =
        fulgur::models::MiniMaxConfig::from_file(&common::root().join("models/configs/minimax-small.json")).unwrap();
    let g = loss_graph(&cfg);
    let mut feed = fulgur::models::random_weights(&g, 0.05, 17);
    for (par, b) in [
        ("ep=2", 2),
        ("ep=4", 4),
        ("ep=2,tp=2", 2),
        ("dp=2,ep=2", 4),
        ("ep=2,sp=2", 2),
        ("ep=2,tp=2,etp=2", 2),
        ("ep=4,tp=2,etp=2", 4),
    ] {
        feed.insert("input_ids".into(), random_tokens(b, 32, cfg.vocab_size, 8));
        let single = run(&g, &feed);
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&cfg, &p, b, 32).unwrap();
        let (_, sg, report) = shard_forward(&plan_graph(&cfg, &p), &plan, Ok).unwrap();
        assert_eq!(report.whole_moe, 0, "{par}");
        assert_eq!(report.routed_moe, cfg.num_hidden_layers, "{par}");
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("minimax-small {par}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
}

/// Each rank's program of a routed plan, on simulated ranks (the exchange through the transport), equals the
/// simulated graph on every rank.
#[test]
fn routed_per_rank_programs_equal_the_simulated_graph() {
    use fulgur::passes::shard::lower_rank;
    use fulgur::runtime::ranks::run_ranks;
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let g = loss_graph(&ck.config);
    let mut feed = ck.load_params(&g).unwrap();
    for (par, b) in [("ep=2", 2), ("dp=2,ep=2", 4), ("ep=2,tp=2", 2), ("ep=2,tp=2,etp=2", 2)] {
        feed.insert("input_ids".into(), random_tokens(b, 16, ck.config.vocab_size, 5));
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, b, 16).unwrap();
        let (_, sg, _) = shard_forward(&plan_graph(&ck.config, &p), &plan, Ok).unwrap();
        let sim = run(&sg, &feed);
        let programs: Vec<Graph> = (0..p.ranks())
            .map(|r| lower_rank(&sg, &plan.mesh, r).unwrap())
            .collect();
        let exchanges = programs[0]
            .nodes()
            .filter(|(_, n)| {
                matches!(&n.op, fulgur::ir::Op::Composite(fulgur::ir::Composite::OnRank { op, .. })
                    if op.name() == "all_to_all_dispatch")
            })
            .count();
        assert_eq!(exchanges, ck.config.num_hidden_layers, "{par}");
        let outs = run_ranks(&programs, &feed, Precision::F64, std::time::Duration::from_secs(120)).unwrap();
        for (r, out) in outs.iter().enumerate() {
            let (e, name) = worst(out, &sim);
            assert!(e < 1e-13, "{par}, rank {r}: `{name}` off the simulated graph by {e}");
        }
    }
}

/// Where the experts' axes are not adjacent in the mesh (tiny-a's 4 experts at `ep=2,sp=2,tp=2`: over `ep` and
/// `tp`, not `sp`), the chain does not fit one exchange: the forward is sharded in its dense form instead (the
/// tokens gathered to the experts), still the single device's logits.
#[test]
fn experts_over_axes_apart_fall_back_to_the_dense_form() {
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let g = loss_graph(&ck.config);
    let mut feed = ck.load_params(&g).unwrap();
    feed.insert("input_ids".into(), random_tokens(2, 16, ck.config.vocab_size, 4));
    let single = run(&g, &feed);
    let p = Parallel::parse("ep=2,sp=2,tp=2").unwrap();
    let plan = minimax_plan(&ck.config, &p, 2, 16).unwrap();
    let (_, sg, report) = shard_forward(&g, &plan, Ok).unwrap();
    assert_eq!((report.routed_moe, report.whole_moe), (0, 0), "{report:?}");
    assert!(!report.collectives.contains_key("all_to_all_dispatch"));
    let (e, name) = worst(&run(&sg, &feed), &single);
    assert!(e < 1e-10, "`{name}` off by {e}");
}

/// `generate --parallel ep=2` on a prompt of two sequences: the prefill and every decode step routed (each
/// rank's one token a step dispatched to the experts' ranks), the same greedy tokens as one device, interpreted
/// and compiled for the CPU.
#[test]
fn generate_routed_gives_the_single_device_tokens() {
    use fulgur::ir::tensor::{read_safetensors, write_safetensors};
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompt.safetensors");
    let ids = random_tokens(2, 8, 512, 21);
    write_safetensors(&prompt, &BTreeMap::from([("prompt".to_string(), ids)])).unwrap();
    let run = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![];
        let ck = common::tiny_a();
        let (g, t, n, o, greedy) = ("generate", "--tokens", "--max-new-tokens", "--out", "--greedy");
        args.extend([
            &g as &dyn AsRef<std::ffi::OsStr>,
            &ck,
            &t,
            &prompt,
            &n,
            &"6",
            &greedy,
            &o,
            &out,
        ]);
        for e in extra {
            args.push(e);
        }
        let o = common::fulgur(&args);
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        read_safetensors(&out).unwrap()["generated"].clone()
    };
    // the decode step's graph is routed too: two sequences, one token each per rank
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let p = Parallel::parse("ep=2").unwrap();
    let opts = p.forward_options(&ForwardOptions {
        states: true,
        ..Default::default()
    });
    let decode = fulgur::models::decode_graph_with(&ck.config, &opts).unwrap();
    let (_, _, report) = shard_forward(&decode, &minimax_plan(&ck.config, &p, 2, 1).unwrap(), Ok).unwrap();
    assert_eq!(report.routed_moe, ck.config.num_hidden_layers, "{report:?}");
    assert_eq!(
        report.collectives.get("all_to_all_dispatch"),
        Some(&ck.config.num_hidden_layers)
    );
    let single = run(&[], "single.safetensors");
    assert_eq!(run(&["--parallel", "ep=2"], "ep.safetensors"), single);
    #[cfg(feature = "llvm")]
    assert_eq!(
        run(&["--parallel", "ep=2", "--target", "cpu"], "ep_cpu.safetensors"),
        single
    );
}

/// The training step (loss, autodiff, AdamW) of tiny-a with the MoE as the composites' chain: sharded with
/// the backward autodiff recorded for each chain, every layer routed forward and backward (two exchanges each
/// way per layer: the rows out and back in the forward, the rows' cotangents out and back in the backward),
/// the loss, gradient norm, new weights and moments those of one device within 1e-10 (f64), also with the
/// optimizer state sharded over `dp` and `ep` and with expert-tensor parallelism (each expert's width over
/// `tp`, an exchange per width slice); the per-rank programs on simulated ranks equal the simulated graph.
#[test]
fn training_step_routed_gives_the_single_device_update() {
    use fulgur::passes::autodiff::GradOptions;
    use fulgur::passes::optim::{train_step_with, AdamW};
    use fulgur::passes::shard::{lower_rank, shard_step};
    use fulgur::runtime::ranks::run_ranks;
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let layers = ck.config.num_hidden_layers;
    let hp = AdamW::default();
    // the step of a plan's forward (with expert-tensor parallelism, the gate and up halves apart)
    let step_of = |p: &Parallel| {
        let g = fulgur::parallel::structural(&plan_graph(&ck.config, p), true).unwrap();
        let (step, report) = train_step_with(&g, "loss", &hp, 1, &GradOptions::default()).unwrap();
        assert_eq!(report.moe_chains.len(), layers, "every layer's chain recorded");
        (step, report)
    };
    let params = ck.load_params(&loss_graph(&ck.config)).unwrap();
    let mut feed = params.clone();
    for (i, (name, t)) in params.iter().enumerate() {
        for (j, pre) in ["adam_m.", "adam_v."].into_iter().enumerate() {
            let r = random_tokens(1, t.numel(), 1000, (2 * i + j) as u64 + 7);
            let vals: Vec<f64> = r
                .to_f64()
                .iter()
                .map(|u| {
                    if j == 0 {
                        (u / 1000.0 - 0.5) * 1e-3
                    } else {
                        u / 1000.0 * 1e-6
                    }
                })
                .collect();
            feed.insert(format!("{pre}{name}"), Tensor::from_f64(t.dtype, t.shape.clone(), vals));
        }
    }
    for (k, v) in hp.scalars(1e-3, 3) {
        feed.insert(k.to_string(), Tensor::from_f64(fulgur::ir::DType::F32, vec![], vec![v]));
    }
    for (par, b) in [
        ("ep=2", 2),
        ("ep=4", 4),
        ("dp=2,ep=2", 4),
        ("ep=2,tp=2", 2),
        ("ep=2,tp=2,etp=2", 2),
    ] {
        feed.insert("input_ids".into(), random_tokens(b, 8, ck.config.vocab_size, 31));
        let p = Parallel::parse(par).unwrap();
        let (step, report) = step_of(&p);
        let single = run(&step, &feed);
        let plan = fulgur::parallel::minimax_train_plan(&ck.config, &p, b, 8, &step).unwrap();
        let (sg, sr) = shard_step(&step, &plan, &report.moe_chains).unwrap();
        assert_eq!(
            (sr.routed_moe, sr.whole_moe),
            (layers, 0),
            "{par}: {:?}",
            sr.collectives
        );
        let dispatches = sr.collectives.get("all_to_all_dispatch").copied().unwrap_or(0);
        let combines = sr.collectives.get("all_to_all_combine").copied().unwrap_or(0);
        assert_eq!(
            (dispatches, combines),
            (2 * layers, 2 * layers),
            "{par}: {:?}",
            sr.collectives
        );
        if !par.contains("tp") {
            // the experts' optimizer state lies with them: no all-to-all moves their gradients or weights
            assert!(
                !sr.collectives.contains_key("all_to_all"),
                "{par}: {:?}",
                sr.collectives
            );
        }
        let sim = run(&sg, &feed);
        let (e, name) = worst(&sim, &single);
        println!("training step {par}: worst {e:.1e} ({name}); {:?}", sr.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
        if par == "dp=2,ep=2" {
            let programs: Vec<Graph> = (0..p.ranks())
                .map(|r| lower_rank(&sg, &plan.mesh, r).unwrap())
                .collect();
            let outs = run_ranks(&programs, &feed, Precision::F64, std::time::Duration::from_secs(120)).unwrap();
            for (r, out) in outs.iter().enumerate() {
                let (e, name) = worst(out, &sim);
                assert!(e < 1e-13, "{par}, rank {r}: `{name}` off the simulated graph by {e}");
            }
        }
    }
}

/// On-rank exchanges of a rank's program: (dispatches, combines, those of them with `overlap_flops` > 0).
fn exchanges(g: &Graph) -> (usize, usize, usize) {
    use fulgur::ir::{Composite, Op};
    let (mut d, mut c, mut overlapped) = (0, 0, 0);
    for (_, n) in g.nodes() {
        if let Op::Composite(Composite::OnRank { op, .. }) = &n.op {
            let f = match &**op {
                Op::Composite(Composite::AllToAllDispatch { overlap_flops, .. }) => {
                    d += 1;
                    overlap_flops
                }
                Op::Composite(Composite::AllToAllCombine { overlap_flops, .. }) => {
                    c += 1;
                    overlap_flops
                }
                _ => continue,
            };
            overlapped += usize::from(f.as_const() != Some(0));
        }
    }
    (d, c, overlapped)
}

/// The collectives family's `routed-overlap-chunks` on the real model's per-rank programs: tiny-a's routed
/// plans (the fused SwiGLU experts at `ep=2`, `dp=2,ep=2`, the split form at `ep=2,tp=2,etp=2`), each rank's
/// program optimized by the family under a cost where hiding communication pays (no launch cost, slow links
/// and tensor cores): every layer's exchange is cut into chunks carrying their overlap, and the chunked
/// programs on simulated ranks give the unchunked programs' logits and loss within 1e-12 (f64).
#[test]
fn routed_overlap_chunks_fire_on_the_per_rank_programs() {
    use fulgur::passes::rules::{collectives, RuleConfig};
    use fulgur::passes::shard::lower_rank;
    use fulgur::passes::{CostModel, Dce, EqSat, PassContext, Pipeline, Target};
    use fulgur::runtime::ranks::run_ranks;
    let ck = Checkpoint::open(&common::tiny_a()).unwrap();
    let g = loss_graph(&ck.config);
    let mut feed = ck.load_params(&g).unwrap();
    let layers = ck.config.num_hidden_layers;
    let target = Target::by_name("H100")
        .unwrap()
        .with_overrides(r#"{"launch_s": 0, "link_bw": 1e6, "matmul_flops_bf16": 1e9, "matmul_flops_tf32": 1e9, "vector_flops": 1e12, "mem_bw": 1e15}"#)
        .unwrap();
    let cx = PassContext {
        model: CostModel::new(target),
    };
    for (par, b) in [("ep=2", 2), ("dp=2,ep=2", 4), ("ep=2,tp=2,etp=2", 2)] {
        feed.insert("input_ids".into(), random_tokens(b, 16, ck.config.vocab_size, 7));
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, b, 16).unwrap();
        let (_, sg, _) = shard_forward(&plan_graph(&ck.config, &p), &plan, Ok).unwrap();
        let programs: Vec<Graph> = (0..p.ranks())
            .map(|r| lower_rank(&sg, &plan.mesh, r).unwrap())
            .collect();
        let want = run_ranks(&programs, &feed, Precision::F64, std::time::Duration::from_secs(120)).unwrap();
        let chunked: Vec<Graph> = programs
            .iter()
            .map(|rg| {
                let fams = vec![collectives::family(&RuleConfig::default())];
                let (out, report) = Pipeline::new()
                    .with(Dce)
                    .with(EqSat::new(fams))
                    .run(rg, &cx, None)
                    .unwrap();
                let fired: usize = report
                    .iter()
                    .filter_map(|r| r.eqsat.as_ref())
                    .flat_map(|e| &e.templates)
                    .filter_map(|t| t.rules.get("routed-overlap-chunks"))
                    .map(|s| s.applications)
                    .sum();
                assert!(fired > 0, "{par}: the rule did not fire");
                out
            })
            .collect();
        for (r, rg) in chunked.iter().enumerate() {
            let (d, c, overlapped) = exchanges(rg);
            println!("tiny-a {par}, rank {r}: {d} dispatches, {c} combines, {overlapped} overlapped");
            // every layer in c ∈ {2, 4} chunks: c dispatches and combines, all but chunk 0's dispatch and the
            // last chunk's combine overlapping
            assert_eq!(d, c, "{par}");
            assert!(
                d == 2 * layers || d == 4 * layers,
                "{par}: {d} dispatches for {layers} layers"
            );
            assert_eq!(overlapped, 2 * d - 2 * layers, "{par}");
            // the kernel order issues every chunk's dispatch before the layer's first experts:
            // per layer D…D (c of them), then per chunk its grouped GEMMs and its combine
            let p = fulgur::codegen::program::lower(rg).unwrap();
            let seq: String = p
                .step
                .iter()
                .filter_map(|k| match &k.op {
                    fulgur::ir::Op::Composite(fulgur::ir::Composite::OnRank { op, .. }) => match op.name() {
                        "all_to_all_dispatch" => Some('D'),
                        "all_to_all_combine" => Some('C'),
                        _ => None,
                    },
                    fulgur::ir::Op::Composite(fulgur::ir::Composite::GroupedMatmul { .. }) => Some('G'),
                    _ => None,
                })
                .collect();
            let chunks = d / layers;
            let gemms = seq.matches('G').count() / d;
            let layer = "D".repeat(chunks) + &("G".repeat(gemms) + "C").repeat(chunks);
            assert_eq!(seq, layer.repeat(layers), "{par}, rank {r}: the step kernels' order");
        }
        let got = run_ranks(&chunked, &feed, Precision::F64, std::time::Duration::from_secs(120)).unwrap();
        for (r, (out, want)) in got.iter().zip(&want).enumerate() {
            let (e, name) = worst(out, want);
            assert!(e < 1e-12, "{par}, rank {r}: `{name}` off the unchunked programs by {e}");
        }
    }
}

/// `fulgur compile --parallel ep=2 --ceilings` for a cost where hiding the exchange pays: each rank's artifact
/// holds every layer's routed exchange in chunks carrying their overlap, `fulgur run` on simulated ranks gives
/// transformers' logits and loss, two launched processes (the exchanges over TCP) the same bytes; without the
/// ceilings (the CPU's cost) tiny-a's exchanges stay whole; a ceilings file that does not parse is named.
#[test]
#[cfg(feature = "llvm")]
fn a_chunked_routed_artifact_runs_on_simulated_and_launched_ranks() {
    use fulgur::ir::tensor::read_safetensors;
    let dir = tempfile::tempdir().unwrap();
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let fulgur = |args: &[&str]| common::fulgur_in(dir.path(), args);
    let (ck_s, tokens_s) = (ck.to_str().unwrap(), tokens.to_str().unwrap());
    std::fs::write(
        dir.path().join("slow-links.json"),
        r#"{"launch_s": 0, "link_bw": 1e6, "matmul_flops_bf16": 1e9, "matmul_flops_tf32": 1e9}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.json"), r#"{"link_bw": -1}"#).unwrap();
    let compile = |out: &str, ceilings: Option<&str>| {
        let mut v = vec![
            "compile",
            ck_s,
            "--parallel",
            "ep=2",
            "--batch",
            "2",
            "--seq",
            "40",
            "--loss",
            "-o",
            out,
        ];
        if let Some(c) = ceilings {
            v.extend(["--ceilings", c]);
        }
        fulgur(&v)
    };
    let layers = Checkpoint::open(&ck).unwrap().config.num_hidden_layers;
    let dispatches = |art: &str| -> (usize, usize) {
        let fir = std::fs::read_to_string(dir.path().join(art).join("rank0/graph.fir")).unwrap();
        let lines = fir.lines().filter(|l| l.contains("op=\"all_to_all_dispatch\""));
        let all: Vec<&str> = lines.collect();
        (all.len(), all.iter().filter(|l| l.contains("overlap_flops=")).count())
    };
    let o = compile("whole", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(dispatches("whole"), (layers, 0), "the CPU's cost: whole exchanges");
    let o = compile("chunked", Some("slow-links.json"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (d, overlapped) = dispatches("chunked");
    println!("chunked artifact: {d} dispatches for {layers} layers, {overlapped} overlapping");
    assert!(d == 2 * layers || d == 4 * layers, "{d} dispatches");
    assert_eq!(overlapped, d - layers);
    let want = read_safetensors(&tokens).unwrap();
    let run = |out: &'static str| vec!["run", "chunked", "--weights", ck_s, "--inputs", tokens_s, "-o", out];
    let o = fulgur(&run("sim.safetensors"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sim = read_safetensors(&dir.path().join("sim.safetensors")).unwrap();
    let e = sim["logits"].rel_l2(&want["logits"]);
    println!("chunked ep=2 on simulated ranks: logits {e:.1e} off transformers'");
    assert!(e < 1e-4, "logits off transformers' by {e}");
    assert!((sim["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-4);
    let mut launched = vec!["launch", "-n", "2", "--timeout", "300", "--", "fulgur"];
    launched.extend(run("launched.safetensors"));
    let o = fulgur(&launched);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("launched.safetensors")).unwrap(),
        std::fs::read(dir.path().join("sim.safetensors")).unwrap()
    );
    let o = compile("never", Some("bad.json"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("bad.json: ceiling `link_bw` must be a positive number, found -1"),
        "{err}"
    );
    assert!(!dir.path().join("never").exists());
}

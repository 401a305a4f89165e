//! The sharding pass on MiniMax (`docs/parallelism.md`): tiny-a sharded by tensor, expert and data parallelism
//! and their combinations gives the single-device logits, loss and gradients on the interpreter, the simulated
//! ranks being the oracle for the per-rank programs.

mod common;

use fulgur::ir::tensor::read_safetensors;
use fulgur::ir::{Graph, Interpreter, Precision, Tensor};
use fulgur::models::checkpoint::Checkpoint;
use fulgur::models::{forward_graph, random_tokens, ForwardOptions};
use fulgur::parallel::{minimax_plan, structural, Parallel};
use fulgur::passes::autodiff::{differentiate, GradOptions, GRAD_PREFIX};
use fulgur::passes::shard::shard_graph;
use std::collections::{BTreeMap, HashMap};

fn tiny_a() -> (Checkpoint, Graph, HashMap<String, Tensor>) {
    let dir = common::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let feed = ck.load_params(&g).unwrap();
    (ck, g, feed)
}

fn run(g: &Graph, feed: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    Interpreter::new(Precision::F64).run(g, feed).unwrap()
}

/// A pipeline run's gradients under the names autodiff gives them (`grad.` prefixed).
fn pipeline_grads(out: &fulgur::pipeline::PipelineRun) -> BTreeMap<String, Tensor> {
    out.grads
        .iter()
        .map(|(k, v)| (format!("{GRAD_PREFIX}{k}"), v.clone()))
        .collect()
}

/// The gradients among a run's outputs.
fn grads_only(outputs: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    outputs
        .iter()
        .filter(|(k, _)| k.starts_with(GRAD_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The worst relative (l2) error over the outputs both runs have, and which.
fn worst(got: &BTreeMap<String, Tensor>, want: &BTreeMap<String, Tensor>) -> (f64, String) {
    let mut w = (0.0f64, String::new());
    for (name, t) in want {
        let g = &got[name];
        assert_eq!(g.shape, t.shape, "{name}");
        let e = g.rel_l2(t);
        if e > w.0 || e.is_nan() {
            w = (e, name.clone());
        }
    }
    w
}

/// tiny-a on the fixture's tokens (batch 2), sharded: logits against transformers' and against the single
/// device, the loss, and the collectives each plan inserts.
#[test]
fn tiny_a_sharded_gives_the_single_device_logits() {
    let (ck, g, mut feed) = tiny_a();
    let reference = read_safetensors(&common::tiny_a().join("reference.safetensors")).unwrap();
    feed.insert("input_ids".into(), reference["input_ids"].clone());
    let single = run(&g, &feed);
    for par in ["tp=2", "ep=2", "dp=2", "ep=2,tp=2", "dp=2,tp=2"] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, 2, 40).unwrap();
        let (sg, report) = shard_graph(&g, &plan).unwrap();
        let out = run(&sg, &feed);
        let (e, name) = worst(&out, &single);
        let vs_hf = out["logits"].rel_l2(&reference["logits"]);
        println!(
            "{par}: worst {e:.1e} ({name}); logits vs transformers {vs_hf:.1e}; {:?}",
            report.collectives
        );
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
        assert!(vs_hf < 1e-5, "{par}: logits off transformers' by {vs_hf}");
        assert!((out["loss"].to_f64()[0] - reference["loss"].to_f64()[0]).abs() < 1e-5);
        // every plan communicates; the degrees decide which collectives
        let n = |k: &str| report.collectives.get(k).copied().unwrap_or(0);
        if p.tp > 1 {
            // per layer: the attention's row-parallel output summed, to a token split (`reduce_scatter`, then
            // gathered before the next column-parallel projection: Megatron's sequence parallelism)
            assert!(
                n("all_reduce") + n("reduce_scatter") >= 2 * ck.config.num_hidden_layers,
                "{par}: {:?}",
                report.collectives
            );
        }
        if p.ep > 1 {
            // per layer: the tokens gathered to the experts, the expert outputs scattered back
            assert!(
                n("all_gather") >= ck.config.num_hidden_layers,
                "{par}: {:?}",
                report.collectives
            );
            assert!(
                n("reduce_scatter") >= ck.config.num_hidden_layers,
                "{par}: {:?}",
                report.collectives
            );
        }
    }
}

/// Four ranks on a batch of four: expert parallel over all four, and data parallel with expert parallel.
#[test]
fn tiny_a_ep4_and_dp2_ep2_on_four_sequences() {
    let (ck, g, mut feed) = tiny_a();
    feed.insert("input_ids".into(), random_tokens(4, 24, ck.config.vocab_size, 7));
    let single = run(&g, &feed);
    for par in ["ep=4", "dp=2,ep=2", "dp=2,ep=2,tp=2"] {
        let p = Parallel::parse(par).unwrap();
        if ck.config.num_local_experts % (p.ep * p.tp) != 0 {
            continue;
        }
        let plan = minimax_plan(&ck.config, &p, 4, 24).unwrap();
        let (sg, _) = shard_graph(&g, &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("{par}: worst {e:.1e} ({name})");
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
}

/// The sharded graph is differentiated by the same autodiff: the gradients of every parameter equal the
/// single device's (the collectives' own backward rules at work).
#[test]
fn tiny_a_sharded_gradients_equal_the_single_device_gradients() {
    let (ck, g, mut feed) = tiny_a();
    feed.insert("input_ids".into(), random_tokens(2, 16, ck.config.vocab_size, 3));
    let single = run(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed);
    for par in ["ep=2,tp=2", "dp=2"] {
        let plan = minimax_plan(&ck.config, &Parallel::parse(par).unwrap(), 2, 16).unwrap();
        let (sg, _) = shard_graph(&g, &plan).unwrap();
        let dg = differentiate(&sg, "loss", &GradOptions::default()).unwrap();
        let out = run(&dg, &feed);
        let grads: BTreeMap<String, Tensor> = single
            .iter()
            .filter(|(k, _)| k.starts_with(GRAD_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(grads.len(), 39);
        let (e, name) = worst(&out, &grads);
        println!("{par}: gradients worst {e:.1e} ({name})");
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
}

/// Sequence parallelism on the structural graph: lightning attention by LASP+ (one `all_gather` of the chunk
/// summaries per layer), softmax attention by ring attention (`send_recv` of the key/value blocks), alone and
/// with tensor and data parallelism; the definitional graph sharded by sequence (no composites: the keys are
/// gathered) gives the same.
#[test]
fn tiny_a_sequence_parallel_by_lasp_and_ring_attention() {
    let (ck, g, mut feed) = tiny_a();
    let reference = read_safetensors(&common::tiny_a().join("reference.safetensors")).unwrap();
    feed.insert("input_ids".into(), reference["input_ids"].clone());
    let single = run(&g, &feed);
    let sg0 = structural(&g, false).unwrap();
    let count = |g: &Graph, name: &str| g.nodes().filter(|(_, n)| n.op.name() == name).count();
    assert_eq!(count(&sg0, "lightning_attention"), 3);
    assert_eq!(count(&sg0, "flash_attention_rope"), 1);
    for par in ["sp=2", "sp=4", "sp=2,tp=2", "dp=2,sp=2", "ep=2,sp=2"] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, 2, 40).unwrap();
        let (sg, report) = shard_graph(&sg0, &plan).unwrap();
        let out = run(&sg, &feed);
        let (e, name) = worst(&out, &single);
        println!("{par}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
        // LASP+: the chunks' summaries gathered once per lightning layer; ring: sp − 1 shifts of k and of v
        assert_eq!(count(&sg, "lightning_attention"), 3, "{par}");
        assert_eq!(count(&sg, "send_recv"), 2 * (p.sp - 1), "{par}");
        assert!(report.collectives["all_gather"] >= 3, "{par}");
        let (dg, _) = shard_graph(&g, &plan).unwrap();
        let (e, name) = worst(&run(&dg, &feed), &single);
        assert!(e < 1e-10, "{par}, definitional: `{name}` off by {e}");
    }
    let e = minimax_plan(&ck.config, &Parallel::parse("sp=3").unwrap(), 2, 40).unwrap_err();
    assert_eq!(e, "the sequence length (40) is not divisible by sp (3)");
}

/// The backward of LASP+ and of ring attention: gradients through the sequence-parallel graph equal the
/// single device's.
#[test]
fn tiny_a_sequence_parallel_gradients() {
    let (ck, g, mut feed) = tiny_a();
    feed.insert("input_ids".into(), random_tokens(1, 16, ck.config.vocab_size, 9));
    let single = run(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed);
    let grads: BTreeMap<String, Tensor> = single
        .iter()
        .filter(|(k, _)| k.starts_with(GRAD_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let plan = minimax_plan(&ck.config, &Parallel::parse("sp=2,tp=2").unwrap(), 1, 16).unwrap();
    let (sg, _) = shard_graph(&structural(&g, false).unwrap(), &plan).unwrap();
    let out = run(&differentiate(&sg, "loss", &GradOptions::default()).unwrap(), &feed);
    let (e, name) = worst(&out, &grads);
    println!("sp=2,tp=2: gradients worst {e:.1e} ({name})");
    assert!(e < 1e-10, "`{name}` off by {e}");
}

/// The training step (loss, gradients, clipping, AdamW) sharded as one graph: data parallel with the AdamW
/// moments sharded over `dp` (ZeRO-1: the gradients reduce-scattered, each rank updating its shard, the new
/// weights gathered), with tensor and expert parallelism; the updated weights and moments equal the single
/// device's step.
#[test]
fn tiny_a_training_step_sharded_with_optimizer_state_sharding() {
    use fulgur::passes::optim::{train_step, AdamW};
    let (ck, g, params) = tiny_a();
    let step = train_step(&g, "loss", &AdamW::default()).unwrap();
    let mut feed = params.clone();
    feed.insert("input_ids".into(), random_tokens(4, 8, ck.config.vocab_size, 21));
    let mut rng_state = 1u64;
    for (name, t) in &params {
        for pre in ["adam_m.", "adam_v."] {
            let vals: Vec<f64> = t
                .to_f64()
                .iter()
                .map(|_| {
                    rng_state = rng_state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (rng_state >> 11) as f64 / (1u64 << 53) as f64;
                    if pre == "adam_m." {
                        (u - 0.5) * 1e-3
                    } else {
                        u * 1e-6
                    }
                })
                .collect();
            feed.insert(format!("{pre}{name}"), Tensor::from_f64(t.dtype, t.shape.clone(), vals));
        }
    }
    for (k, v) in AdamW::default().scalars(1e-3, 3) {
        feed.insert(k.to_string(), Tensor::from_f64(fulgur::ir::DType::F32, vec![], vec![v]));
    }
    let single = run(&step, &feed);
    let params: Vec<(String, Vec<fulgur::ir::Dim>)> = g
        .params()
        .into_iter()
        .map(|id| {
            let (n, t, _) = g.node(id).op.input_decl().unwrap();
            (n.to_string(), t.shape.0.clone())
        })
        .collect();
    for (par, experts_sharded) in [
        ("dp=2", false),
        ("dp=2,tp=2", false),
        ("dp=2,ep=2", false),
        ("dp=2", true),
        ("dp=2,tp=2", true),
    ] {
        let p = Parallel::parse(par).unwrap();
        let mut plan = fulgur::parallel::minimax_train_plan(&ck.config, &p, 4, 8, &step).unwrap();
        if experts_sharded {
            fulgur::parallel::store_experts_sharded(&mut plan, &params).unwrap();
            assert_eq!(plan.stored.len(), 8, "two expert weights per layer");
        }
        let (sg, report) = shard_graph(&step, &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!(
            "{par} (experts stored sharded: {experts_sharded}): worst {e:.1e} ({name}); {:?}",
            report.collectives
        );
        assert!(e < 1e-9, "{par}: `{name}` off by {e}");
    }
}

/// Each rank's program (the per-rank lowering of the simulated graph) run on simulated ranks (a thread per rank,
/// collectives through shared memory) gives exactly the simulated graph's outputs, on every rank; a rank that
/// fails or never arrives fails the others naming it.
#[test]
fn per_rank_programs_on_simulated_ranks_equal_the_simulated_graph() {
    use fulgur::ir::Precision;
    use fulgur::passes::shard::lower_rank;
    use fulgur::runtime::ranks::run_ranks;
    use std::time::Duration;
    let (ck, g, mut feed) = tiny_a();
    feed.insert("input_ids".into(), random_tokens(2, 16, ck.config.vocab_size, 5));
    let structural_g = structural(&g, false).unwrap();
    for par in ["tp=2", "ep=2,tp=2", "dp=2,sp=2", "sp=4", "dp=2"] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, 2, 16).unwrap();
        let (sg, _) = shard_graph(&structural_g, &plan).unwrap();
        let sim = run(&sg, &feed);
        let programs: Vec<Graph> = (0..p.ranks())
            .map(|r| lower_rank(&sg, &plan.mesh, r).unwrap())
            .collect();
        let collectives = programs[0].nodes().filter(|(_, n)| n.op.name() == "on_rank").count();
        let outs = run_ranks(&programs, &feed, Precision::F64, Duration::from_secs(120)).unwrap();
        for (r, out) in outs.iter().enumerate() {
            let (e, name) = worst(out, &sim);
            assert!(e < 1e-13, "{par}, rank {r}: `{name}` off the simulated graph by {e}");
        }
        println!(
            "{par}: {} ranks, {collectives} collectives each, outputs equal",
            p.ranks()
        );
    }
    // rank 1 errs before its first collective: the others fail naming it, not waiting for it
    let plan = minimax_plan(&ck.config, &Parallel::parse("tp=2").unwrap(), 2, 16).unwrap();
    let (sg, _) = shard_graph(&g, &plan).unwrap();
    let mut programs: Vec<Graph> = (0..2).map(|r| lower_rank(&sg, &plan.mesh, r).unwrap()).collect();
    let mut broken = Graph::new("broken");
    let x = broken
        .input("not_fed", fulgur::ir::DType::F32, vec![fulgur::ir::Dim::from(1)])
        .unwrap();
    broken.add_output("x", x).unwrap();
    programs[1] = broken;
    let e = run_ranks(&programs, &feed, Precision::F64, Duration::from_secs(60)).unwrap_err();
    assert!(e.starts_with("rank 1: "), "{e}");
    assert!(e.contains("not_fed"), "{e}");
    // rank 1 finishes without the collectives: rank 0 times out naming it
    let mut idle = Graph::new("idle");
    let x = idle
        .input(
            "input_ids",
            fulgur::ir::DType::I64,
            vec![fulgur::ir::Dim::from(2), fulgur::ir::Dim::from(16)],
        )
        .unwrap();
    idle.add_output("x", x).unwrap();
    programs[1] = idle;
    let start = std::time::Instant::now();
    let e = run_ranks(&programs, &feed, Precision::F64, Duration::from_millis(500)).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(e.starts_with("rank 0: "), "{e}");
    assert!(e.contains("rank(s) 1 did not reach collective #0 (`"), "{e}");
    assert!(e.ends_with("`) within 0.5 s"), "{e}");
}

/// `fulgur eval-model --parallel`: tiny-a on four simulated ranks gives transformers' logits and loss; a target
/// other than the reference interpreter, and degrees that do not divide, are refused with the reason.
#[test]
fn eval_model_runs_on_simulated_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"reference",
        &"--parallel",
        &"ep=2,tp=2",
        &"--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ran on 4 simulated ranks (dp=1,ep=2,sp=1,tp=2)"), "{err}");
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&tokens).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-5, "logits off transformers' by {e}");
    assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-5);
    // each rank's program compiled for the CPU
    std::fs::remove_file(&out).unwrap();
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"cpu",
        &"--parallel",
        &"tp=2",
        &"--out",
        &out,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = read_safetensors(&out).unwrap()["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-4, "cpu ranks: logits off transformers' by {e}");
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"cuda",
        &"--parallel",
        &"tp=2",
        &"--out",
        &out,
    ]);
    // each rank's program on the CUDA backend: transformers' logits where a GPU is, else one line naming rank 0
    if o.status.success() {
        let e = read_safetensors(&out).unwrap()["logits"].rel_l2(&want["logits"]);
        assert!(e < 1e-4, "cuda ranks: logits off transformers' by {e}");
    } else {
        common::fails(&o, &["running on simulated ranks: rank 0: "]);
    }
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"reference",
        &"--parallel",
        &"tp=4",
        &"--out",
        &out,
    ]);
    common::fails(
        &o,
        &["--parallel tp=4: num_key_value_heads (2) is not divisible by tp (4)"],
    );
}

/// `fulgur launch -n N -- fulgur eval-model` of tiny-a's reference tokens on `target` at degrees `par` into
/// `out`, with `FULGUR_FAULT_EXIT` set to `fault` where given.
fn launch_eval(target: &str, n: &str, par: &str, fault: Option<&str>, out: &std::path::Path) -> std::process::Output {
    let ck = common::tiny_a();
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fulgur"));
    c.args(["launch", "-n", n, "--timeout", "300", "--", "fulgur", "eval-model"])
        .arg(&ck)
        .arg("--tokens")
        .arg(ck.join("reference.safetensors"))
        .args(["--target", target, "--parallel", par, "--out"])
        .arg(out)
        .current_dir(common::root())
        .env_remove("RUST_LOG")
        .env("FULGUR_RANK_TIMEOUT", "60");
    if let Some(f) = fault {
        c.env("FULGUR_FAULT_EXIT", f);
    }
    c.output().unwrap()
}

/// `fulgur launch -n 4 -- fulgur eval-model ... --parallel ep=2,tp=2`: four processes, one rank each, meeting at
/// the rendezvous and exchanging their collectives over TCP, give transformers' logits; a rank that exits at its
/// first collective makes the launch fail naming it, and rank 0 says which collective it did not reach; a job
/// launched with fewer ranks than the degrees need is refused.
#[test]
fn launched_ranks_in_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let run_on = |target: &str, n: &str, par: &str, fault: Option<&str>| launch_eval(target, n, par, fault, &out);
    let run = |n: &str, par: &str, fault: Option<&str>| run_on("reference", n, par, fault);
    let o = run("4", "ep=2,tp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ran as 4 processes (dp=1,ep=2,sp=1,tp=2)"), "{err}");
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&tokens).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-5, "logits off transformers' by {e}");
    std::fs::remove_file(&out).unwrap();
    let o = run("2", "tp=2", Some("1:0"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("rank 1 did not reach collective #0 (`"), "{err}");
    assert!(
        err.contains("error: rank(s) 1 (exit status 3) of 2 failed")
            || err.contains("error: rank(s) 0 (exit status 1), 1 (exit status 3) of 2 failed"),
        "{err}"
    );
    assert!(!out.exists(), "a failed job leaves no output");
    // two processes, each rank's program compiled for the CPU, collectives over TCP
    let o = run_on("cpu", "2", "tp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let e = read_safetensors(&out).unwrap()["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-4, "launched cpu ranks: logits off transformers' by {e}");
    std::fs::remove_file(&out).unwrap();
    let o = run("2", "ep=2,tp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("launched as 2 ranks (torchrun's variables) but --parallel ep=2,tp=2 needs 4"),
        "{err}"
    );
}

/// A scaled-down MiniMax-01 layout (`models/configs/minimax-small.json`: MiniMax's own config format, 16 layers
/// with a softmax layer in every eight, post-norm, 8 experts, 8 query and 2 key-value heads) with random weights:
/// tensor, expert, expert-tensor, data, sequence and pipeline parallel plans and their combinations give the
/// single-device logits and loss.
#[test]
fn a_scaled_down_minimax_layout_sharded() {
    let cfg =
        fulgur::models::MiniMaxConfig::from_file(&common::root().join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut feed = fulgur::models::random_weights(&g, 0.05, 17);
    feed.insert("input_ids".into(), random_tokens(2, 32, cfg.vocab_size, 8));
    let single = run(&g, &feed);
    let structural_g = structural(&g, false).unwrap();
    for par in [
        "tp=2",
        "ep=2,tp=2",
        "dp=2,ep=1",
        "sp=2",
        "sp=4",
        "dp=2,sp=2,tp=2",
        "ep=2,sp=2",
    ] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&cfg, &p, 2, 32).unwrap();
        let (sg, report) = shard_graph(&structural_g, &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("minimax-small {par}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
    // expert-tensor parallelism (the forward with the gate and up halves apart)
    for par in ["ep=2,tp=2,etp=2", "ep=4,tp=2,etp=2"] {
        let p = Parallel::parse(par).unwrap();
        let fg = forward_graph(
            &cfg,
            &p.forward_options(&ForwardOptions {
                loss: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let b = 2 * p.ep;
        let mut feed = feed.clone();
        feed.insert("input_ids".into(), random_tokens(b, 32, cfg.vocab_size, 8));
        let single = run(&g, &feed);
        let (sg, _) = shard_graph(
            &structural(&fg, false).unwrap(),
            &minimax_plan(&cfg, &p, b, 32).unwrap(),
        )
        .unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("minimax-small {par}: worst {e:.1e} ({name})");
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
    }
    // pipeline stages: its 16 layers in two and four stages (post-norm, a softmax layer in every eight)
    {
        use fulgur::pipeline::{build, concat_batches, micro_batches, run as run_pipeline};
        use fulgur::runtime::ranks::{InterpretedRank, RankProgram};
        let weights = std::sync::Arc::new(feed.clone());
        let make: fulgur::pipeline::MakeProgram = std::sync::Arc::new(move |g: &Graph| {
            let params = g
                .params()
                .into_iter()
                .map(|id| {
                    let (n, _, _) = g.node(id).op.input_decl().unwrap();
                    (n.to_string(), weights[n].clone())
                })
                .collect();
            Ok(Box::new(InterpretedRank {
                graph: g.clone(),
                precision: Precision::F64,
                memory_limit: None,
                weights: params,
            }) as Box<dyn RankProgram>)
        });
        let opts = ForwardOptions {
            loss: true,
            ..Default::default()
        };
        for par in ["pp=2", "pp=4,tp=2"] {
            let p = Parallel::parse(par).unwrap();
            let stages = build(&cfg, &p, 1, 32, &opts, false, false, &|g| Ok(g)).unwrap();
            let micro = micro_batches(&feed["input_ids"], 2).unwrap();
            let out = run_pipeline(
                &stages,
                &micro,
                make.clone(),
                Precision::F64,
                std::time::Duration::from_secs(120),
            )
            .unwrap();
            let logits: Vec<&Tensor> = out.outputs.iter().map(|o| &o["logits"]).collect();
            let e = concat_batches(&logits).unwrap().rel_l2(&single["logits"]);
            println!("minimax-small {par}: logits {e:.1e}");
            assert!(e < 1e-10, "{par}: logits off by {e}");
        }
    }
}

/// Each rank's program compiled by the CPU backend (LLVM JIT), its collectives as host steps through the
/// simulated transport: tiny-a's logits and loss on every rank equal transformers' within the f32 tolerance.
#[test]
#[cfg(feature = "llvm")]
fn per_rank_programs_compiled_for_the_cpu() {
    use fulgur::passes::shard::lower_rank;
    use fulgur::runtime::ranks::run_ranks_cpu;
    let (ck, g, mut feed) = tiny_a();
    let reference = read_safetensors(&common::tiny_a().join("reference.safetensors")).unwrap();
    feed.insert("input_ids".into(), reference["input_ids"].clone());
    for par in ["tp=2", "dp=2,sp=2", "ep=2,tp=2,etp=2"] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(&ck.config, &p, 2, 40).unwrap();
        let g = if p.etp > 1 {
            forward_graph(
                &ck.config,
                &p.forward_options(&ForwardOptions {
                    loss: true,
                    ..Default::default()
                }),
            )
            .unwrap()
        } else {
            g.clone()
        };
        let (sg, _) = shard_graph(&structural(&g, false).unwrap(), &plan).unwrap();
        let programs: Vec<Graph> = (0..p.ranks())
            .map(|r| lower_rank(&sg, &plan.mesh, r).unwrap())
            .collect();
        let outs = run_ranks_cpu(&programs, &feed, std::time::Duration::from_secs(300)).unwrap();
        for (r, out) in outs.iter().enumerate() {
            let e = out["logits"].rel_l2(&reference["logits"]);
            println!("{par}, rank {r}: logits {e:.1e} off transformers'");
            assert!(e < 1e-4, "{par}, rank {r}: logits off transformers' by {e}");
            assert!((out["loss"].to_f64()[0] - reference["loss"].to_f64()[0]).abs() < 1e-4);
        }
    }
}

/// `fulgur plan --json` feeds `eval-model --plan`: tiny-a on the degrees the search chose for 8 GPUs runs on
/// simulated ranks with transformers' logits; a plan that chose nothing is refused, naming the file.
#[test]
fn eval_model_takes_the_plan_a_search_chose() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let out = dir.path().join("out.safetensors");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let o = common::fulgur(&[
        &"plan",
        &ck,
        &"--cluster",
        &"clusters/8xh200.json",
        &"--mode",
        &"infer",
        &"--seq",
        &"40",
        &"--batch",
        &"2",
        &"--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&plan, &o.stdout).unwrap();
    let chosen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let degrees = chosen["best"]["parallel"].as_str().unwrap().to_string();
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"reference",
        &"--plan",
        &plan,
        &"--out",
        &out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("ran on 8 simulated ranks ({degrees})")), "{err}");
    let e = read_safetensors(&out).unwrap()["logits"].rel_l2(&read_safetensors(&tokens).unwrap()["logits"]);
    assert!(e < 1e-5, "logits off transformers' by {e}");
    let mut none = chosen.clone();
    none["best"] = serde_json::Value::Null;
    std::fs::write(&plan, none.to_string()).unwrap();
    let o = common::fulgur(&[
        &"eval-model",
        &ck,
        &"--tokens",
        &tokens,
        &"--target",
        &"reference",
        &"--plan",
        &plan,
        &"--out",
        &out,
    ]);
    common::fails(&o, &["chose nothing (no candidate fit)", "plan.json"]);
}

/// Degrees that do not divide what they split are refused naming both.
#[test]
fn plans_that_do_not_divide_are_refused() {
    let (ck, g, _) = tiny_a();
    let e = minimax_plan(&ck.config, &Parallel::parse("tp=4").unwrap(), 4, 40).unwrap_err();
    assert_eq!(e, "num_key_value_heads (2) is not divisible by tp (4)");
    let e = minimax_plan(&ck.config, &Parallel::parse("ep=2,tp=4").unwrap(), 2, 40).unwrap_err();
    assert_eq!(e, "num_key_value_heads (2) is not divisible by tp (4)");
    let e = minimax_plan(&ck.config, &Parallel::parse("ep=8").unwrap(), 8, 40).unwrap_err();
    assert_eq!(e, "num_local_experts (4) is not divisible by ep·tp (8)");
    let e = minimax_plan(&ck.config, &Parallel::parse("dp=2,ep=2").unwrap(), 2, 40).unwrap_err();
    assert_eq!(e, "the batch (2) is not divisible by dp·ep (4)");
    // the pass itself checks every placement against the graph, naming the value, dim and axis
    let mut plan = minimax_plan(&ck.config, &Parallel::parse("tp=2").unwrap(), 2, 40).unwrap();
    plan.rules.insert(
        0,
        (
            "model.norm.weight".into(),
            vec![("tp".into(), fulgur::passes::shard::Placement::Split(1))],
        ),
    );
    let e = shard_graph(&g, &plan).unwrap_err().to_string();
    assert_eq!(
        e,
        "sharding `model.norm.weight` (param): `model.norm.weight` has 1 dims; mesh axis `tp` cannot split its dim 1"
    );
}

/// Any placement of the parameters is a valid plan: random placements (each parameter replicated, split on a
/// dim its axis degree divides, on each axis of a `[a=2, b=2]` mesh) give the single-device outputs. This runs
/// the propagation rules through their conflicts and every resharding path, not only the presets' patterns,
/// and the embedding's table split by rows (vocabulary parallel: a partial sum of each rank's rows) or by
/// hidden dim.
#[test]
fn random_placements_give_the_single_device_outputs() {
    use fulgur::passes::shard::{Mesh, Placement, ShardPlan};
    use rand::{Rng, SeedableRng};
    let (ck, g, mut feed) = tiny_a();
    feed.insert("input_ids".into(), random_tokens(4, 8, ck.config.vocab_size, 11));
    let single = run(&g, &feed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mesh = Mesh::new(&[("a", 2), ("b", 2)]).unwrap();
    for case in 0..10 {
        let mut rules = Vec::new();
        for id in g.params() {
            let n = g.node(id);
            let (name, ty, _) = n.op.input_decl().unwrap();
            let dims: Vec<usize> = ty.shape.as_consts().unwrap();
            let mut places = Vec::new();
            let mut left = dims.clone();
            for axis in ["a", "b"] {
                let choices: Vec<usize> = (0..dims.len()).filter(|&d| left[d].is_multiple_of(2)).collect();
                if choices.is_empty() || rng.gen_bool(0.3) {
                    continue;
                }
                let d = choices[rng.gen_range(0..choices.len())];
                left[d] /= 2;
                places.push((axis.to_string(), Placement::Split(d)));
            }
            rules.push((name.to_string(), places));
        }
        let ids = match case % 3 {
            0 => vec![],
            1 => vec![("a".to_string(), Placement::Split(0))],
            _ => vec![
                ("a".to_string(), Placement::Split(0)),
                ("b".to_string(), Placement::Split(1)),
            ],
        };
        rules.push(("input_ids".to_string(), ids));
        let plan = ShardPlan {
            mesh: mesh.clone(),
            sizes: HashMap::from([("B".to_string(), 4), ("T".to_string(), 8)]),
            rules,
            stored: Vec::new(),
            constraints: Vec::new(),
        };
        let (sg, report) = shard_graph(&g, &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("case {case}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "case {case}: `{name}` off by {e}");
    }
    // a vocabulary-parallel embedding (rows split on both axes) and one split by hidden dim
    for places in [
        vec![
            ("a".to_string(), Placement::Split(0)),
            ("b".to_string(), Placement::Split(0)),
        ],
        vec![
            ("a".to_string(), Placement::Split(1)),
            ("b".to_string(), Placement::Split(0)),
        ],
    ] {
        let plan = ShardPlan {
            mesh: mesh.clone(),
            sizes: HashMap::from([("B".to_string(), 4), ("T".to_string(), 8)]),
            rules: vec![
                ("model.embed_tokens.weight".to_string(), places),
                ("input_ids".to_string(), vec![("b".to_string(), Placement::Split(1))]),
            ],
            stored: Vec::new(),
            constraints: Vec::new(),
        };
        let (sg, _) = shard_graph(&g, &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        assert!(e < 1e-10, "embedding: `{name}` off by {e}");
    }
}

/// `fulgur compile --parallel` writes one program per rank as one artifact; `fulgur run` runs it on simulated
/// ranks and, started by `fulgur launch`, one rank per process: both give transformers' logits and the same
/// bytes. A launch of the wrong size, a rank's modified program, and what `--parallel` cannot compile are
/// refused with their reasons, and nothing is written.
#[test]
#[cfg(feature = "llvm")]
fn a_parallel_artifact_runs_on_simulated_and_launched_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let fulgur = |args: &[&str]| common::fulgur_in(dir.path(), args);
    let ck_s = ck.to_str().unwrap();
    let tokens_s = tokens.to_str().unwrap();
    let o = fulgur(&[
        "compile",
        ck_s,
        "--parallel",
        "ep=2,tp=2",
        "--batch",
        "2",
        "--seq",
        "40",
        "--loss",
        "-o",
        "art",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("wrote art: 4 programs (dp=1,ep=2,sp=1,tp=2)"), "{text}");
    for r in 0..4 {
        assert!(art.join(format!("rank{r}/program.json")).is_file());
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["parallel"]["ranks"], 4);
    assert_eq!(manifest["inputs"][0]["name"], "input_ids");
    let want = read_safetensors(&tokens).unwrap();
    let run_args = |out: &'static str| vec!["run", "art", "--weights", ck_s, "--inputs", tokens_s, "-o", out];
    let launched = |n: &'static str, out: &'static str| {
        let mut v = vec!["launch", "-n", n, "--timeout", "300", "--", "fulgur"];
        v.extend(run_args(out));
        v
    };
    // simulated ranks
    let o = fulgur(&run_args("sim.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ran on 4 simulated ranks (dp=1,ep=2,sp=1,tp=2)"), "{err}");
    let sim = read_safetensors(&dir.path().join("sim.safetensors")).unwrap();
    let e = sim["logits"].rel_l2(&want["logits"]);
    println!("compiled ep=2,tp=2 on simulated ranks: logits {e:.1e} off transformers'");
    assert!(e < 1e-4, "logits off transformers' by {e}");
    assert!((sim["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-4);
    // four launched processes, collectives over the TCP rendezvous: the same bytes
    let o = fulgur(&launched("4", "launched.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("ran as 4 processes (dp=1,ep=2,sp=1,tp=2)"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("launched.safetensors")).unwrap(),
        std::fs::read(dir.path().join("sim.safetensors")).unwrap()
    );
    // a launch of another size
    let o = fulgur(&launched("2", "two.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("launched as 2 ranks (torchrun's variables) but artifact art has 4 (dp=1,ep=2,sp=1,tp=2)"),
        "{err}"
    );
    assert!(!dir.path().join("two.safetensors").exists());
    // a manifest whose mesh does not hold its ranks
    let mp = art.join("manifest.json");
    let good = std::fs::read_to_string(&mp).unwrap();
    std::fs::write(&mp, good.replace("\"ranks\": 4", "\"ranks\": 0")).unwrap();
    let o = fulgur(&run_args("zero.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("not a valid manifest: `parallel` has 0 ranks on a mesh of 4"),
        "{err}"
    );
    assert!(!dir.path().join("zero.safetensors").exists());
    std::fs::write(&mp, good).unwrap();
    // a rank's program changed after it was written
    let p = art.join("rank2/program.json");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.push(b'\n');
    std::fs::write(&p, bytes).unwrap();
    let o = fulgur(&run_args("bad.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("artifact art was modified after it was written: rank2/program.json does not match its SHA-256"),
        "{err}"
    );
    assert!(!dir.path().join("bad.safetensors").exists());
    // what --parallel refuses
    for (args, msg) in [
        (
            vec!["--parallel", "tp=2"],
            "--parallel needs --batch and --seq: each rank's program is specialised to the batch and sequence it \
             splits",
        ),
        (
            vec!["--parallel", "tp=3", "--batch", "2", "--seq", "40"],
            "--parallel tp=3: num_attention_heads (4) is not divisible by tp (3)",
        ),
        (
            vec!["--parallel", "tp=2", "--batch", "2", "--seq", "40", "--graph", "decode"],
            "--parallel compiles --graph forward only",
        ),
        (
            vec!["--batch", "2"],
            "--batch and --seq apply with --parallel or --plan only",
        ),
    ] {
        let mut v = vec!["compile", ck_s, "-o", "new"];
        v.extend(args);
        let o = fulgur(&v);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains(msg), "{v:?}: {err}");
        assert!(!dir.path().join("new").exists());
    }
}

/// `fulgur compile --parallel pp=2,tp=2`: tiny-a's forward in two pipeline stages of two tensor-parallel programs,
/// each specialised to a micro-batch of one sequence; `fulgur run` on simulated ranks (the batch in two
/// micro-batches through the stages) gives transformers' logits and loss, and four launched processes (the last
/// stage's rank 0 writing) the same bytes; a manifest whose stages do not hold its programs is refused.
#[test]
#[cfg(feature = "llvm")]
fn a_pipeline_artifact_runs_on_simulated_and_launched_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let fulgur = |args: &[&str]| common::fulgur_in(dir.path(), args);
    let (ck_s, tokens_s) = (ck.to_str().unwrap(), tokens.to_str().unwrap());
    let o = fulgur(&[
        "compile",
        ck_s,
        "--parallel",
        "pp=2,tp=2",
        "--batch",
        "2",
        "--seq",
        "40",
        "--loss",
        "-o",
        "art",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains(
            "wrote art: 2 pipeline stages of 2 programs (dp=1,ep=1,sp=1,tp=2,pp=2), 2 micro-batches of 1 sequences"
        ),
        "{text}"
    );
    for r in 0..4 {
        assert!(art.join(format!("rank{r}/program.json")).is_file());
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["parallel"]["ranks"], 4);
    assert_eq!(manifest["parallel"]["pp"], 2);
    assert_eq!(manifest["parallel"]["micro_batches"], 2);
    assert_eq!(manifest["inputs"][0]["name"], "input_ids");
    assert_eq!(
        manifest["weights"].as_array().unwrap().len(),
        39,
        "every stage's weights"
    );
    let outputs: Vec<&str> = manifest["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["logits", "loss"], "the last stage's outputs");
    let want = read_safetensors(&tokens).unwrap();
    let run_args = |out: &'static str| vec!["run", "art", "--weights", ck_s, "--inputs", tokens_s, "-o", out];
    let o = fulgur(&run_args("sim.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ran 2 pipeline stages of 2 simulated ranks each (dp=1,ep=1,sp=1,tp=2,pp=2, 2 micro-batches)"),
        "{err}"
    );
    let sim = read_safetensors(&dir.path().join("sim.safetensors")).unwrap();
    assert_eq!(sim["logits"].shape, vec![2, 40, 512]);
    let e = sim["logits"].rel_l2(&want["logits"]);
    println!("compiled pp=2,tp=2 on simulated ranks: logits {e:.1e} off transformers'");
    assert!(e < 1e-4, "logits off transformers' by {e}");
    assert!((sim["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-4);
    let mut launched = vec!["launch", "-n", "4", "--timeout", "300", "--", "fulgur"];
    launched.extend(run_args("launched.safetensors"));
    let o = fulgur(&launched);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(
            "ran 2 pipeline stages of 2 launched ranks each (dp=1,ep=1,sp=1,tp=2,pp=2, 2 micro-batches); rank 2 \
             (stage 1, rank 0) writes the outputs"
        ),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("launched.safetensors")).unwrap(),
        std::fs::read(dir.path().join("sim.safetensors")).unwrap()
    );
    let mp = art.join("manifest.json");
    let good = std::fs::read_to_string(&mp).unwrap();
    // the tokens of another shape than the artifact's batch and sequence
    let bad_ids = dir.path().join("ids.safetensors");
    let ids = fulgur::ir::Tensor::from_i64(fulgur::ir::DType::I64, vec![4, 40], vec![1; 160]);
    fulgur::ir::tensor::write_safetensors(&bad_ids, &[("input_ids".to_string(), ids)].into()).unwrap();
    let o = fulgur(&[
        "run",
        "art",
        "--weights",
        ck_s,
        "--inputs",
        bad_ids.to_str().unwrap(),
        "-o",
        "ids.out",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("has shape [4, 40], but artifact art takes i64[2, 40]"),
        "{err}"
    );
    assert!(!dir.path().join("ids.out").exists());
    std::fs::write(&mp, good.replace("\"pp\": 2", "\"pp\": 3")).unwrap();
    let o = fulgur(&run_args("bad.safetensors"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("not a valid manifest: `parallel` has 4 ranks on a mesh of 2 in 3 pipeline stages"),
        "{err}"
    );
    assert!(!dir.path().join("bad.safetensors").exists());
}

/// Expert-tensor parallelism (`etp=tp`): the experts split over `ep` only and each expert's width over `tp`
/// (the gate and up halves of `gate_up_proj` and `down_proj` split on the intermediate dim), MiniMax-01's
/// decoupled expert groups: tiny-a's logits and loss equal the single device's (f64), its expert matmuls run on
/// `I/tp` columns, and the gradients through it too.
#[test]
fn expert_tensor_parallel_splits_each_experts_width() {
    let (ck, g, mut feed) = tiny_a();
    let reference = read_safetensors(&common::tiny_a().join("reference.safetensors")).unwrap();
    feed.insert("input_ids".into(), reference["input_ids"].clone());
    let single = run(&g, &feed);
    let cfg = &ck.config;
    for par in [
        "tp=2,etp=2",
        "ep=2,tp=2,etp=2",
        "dp=2,tp=2,etp=2",
        "ep=2,sp=2,tp=2,etp=2",
    ] {
        let p = Parallel::parse(par).unwrap();
        let plan = minimax_plan(cfg, &p, 2, 40).unwrap();
        let fg = forward_graph(
            cfg,
            &p.forward_options(&ForwardOptions {
                loss: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let (sg, report) = shard_graph(&structural(&fg, false).unwrap(), &plan).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("tiny-a {par}: worst {e:.1e} ({name}); {:?}", report.collectives);
        assert!(e < 1e-10, "{par}: `{name}` off by {e}");
        // every expert matmul on the rank's experts and its share of the width: the weight operands are
        // [R, E/experts' group, C, I/tp] (gate, up) and [R, E/group, I/tp, C] (down) (under sp a head's matmul
        // has the down form's shape at tiny-a's sizes, so the count is checked without sp)
        if p.sp > 1 {
            continue;
        }
        let (e_local, i_local) = (
            cfg.num_local_experts / p.expert_group(cfg),
            cfg.intermediate_size / p.tp,
        );
        let c = cfg.hidden_size;
        let weights = |want: [usize; 3]| {
            sg.nodes()
                .filter(|(_, n)| matches!(n.op, fulgur::ir::Op::MatMul))
                .filter(|(_, n)| {
                    let w = sg.node(n.inputs[1].node).outputs[n.inputs[1].index as usize]
                        .shape
                        .as_consts();
                    w.is_some_and(|d| d.len() == 4 && d[1..] == want)
                })
                .count()
        };
        let narrow = weights([e_local, c, i_local]);
        assert_eq!(
            weights([e_local, i_local, c]),
            cfg.num_hidden_layers,
            "{par}: down matmuls"
        );
        assert_eq!(
            narrow,
            2 * cfg.num_hidden_layers,
            "{par}: gate and up matmuls per layer"
        );
    }
    // EP4 with ETP2 (eight ranks, each expert alone on its expert rank, its width over two), four sequences
    {
        let p = Parallel::parse("ep=4,tp=2,etp=2").unwrap();
        let mut feed = feed.clone();
        feed.insert("input_ids".into(), random_tokens(4, 16, cfg.vocab_size, 29));
        let single = run(&g, &feed);
        let fg = forward_graph(
            cfg,
            &p.forward_options(&ForwardOptions {
                loss: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let (sg, _) = shard_graph(&structural(&fg, false).unwrap(), &minimax_plan(cfg, &p, 4, 16).unwrap()).unwrap();
        let (e, name) = worst(&run(&sg, &feed), &single);
        println!("tiny-a ep=4,tp=2,etp=2: worst {e:.1e} ({name})");
        assert!(e < 1e-10, "ep=4,tp=2,etp=2: `{name}` off by {e}");
    }
    // the training step (its parameters inputs) and bf16 compute (f32 master weights cast where read) keep the
    // width split
    for dtype in [fulgur::ir::DType::F32, fulgur::ir::DType::BF16] {
        use fulgur::passes::optim::{train_step, AdamW};
        use fulgur::passes::precision::{keep_f32, master_weights, store_as};
        let p = Parallel::parse("ep=2,tp=2,etp=2").unwrap();
        let fg = forward_graph(
            cfg,
            &p.forward_options(&ForwardOptions {
                loss: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let fg = structural(&fg, false).unwrap();
        let fg = if dtype == fulgur::ir::DType::BF16 {
            master_weights(&store_as(&fg, dtype, &keep_f32).unwrap()).unwrap()
        } else {
            fg
        };
        let step = train_step(&fg, "loss", &AdamW::default()).unwrap();
        let plan = fulgur::parallel::minimax_train_plan(cfg, &p, 2, 16, &step).unwrap();
        let (sg, _) = shard_graph(&step, &plan).unwrap();
        let (e_local, i_local, c) = (cfg.num_local_experts / 2, cfg.intermediate_size / 2, cfg.hidden_size);
        let narrow = sg
            .nodes()
            .filter(|(_, n)| matches!(n.op, fulgur::ir::Op::MatMul))
            .filter(|(_, n)| {
                let w = sg.node(n.inputs[1].node).outputs[n.inputs[1].index as usize]
                    .shape
                    .as_consts();
                w.is_some_and(|d| d.len() == 4 && d[1..] == [e_local, c, i_local])
            })
            .count();
        assert!(
            narrow >= 2 * cfg.num_hidden_layers,
            "{dtype}: {narrow} gate/up matmuls split by width"
        );
    }
    // the gradients through it, by the same autodiff
    feed.insert("input_ids".into(), random_tokens(2, 16, cfg.vocab_size, 3));
    let grads: BTreeMap<String, Tensor> = run(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed)
        .into_iter()
        .filter(|(k, _)| k.starts_with(GRAD_PREFIX))
        .collect();
    let p = Parallel::parse("ep=2,tp=2,etp=2").unwrap();
    let fg = forward_graph(
        cfg,
        &p.forward_options(&ForwardOptions {
            loss: true,
            ..Default::default()
        }),
    )
    .unwrap();
    let (sg, _) = shard_graph(&structural(&fg, false).unwrap(), &minimax_plan(cfg, &p, 2, 16).unwrap()).unwrap();
    let (e, name) = worst(
        &run(&differentiate(&sg, "loss", &GradOptions::default()).unwrap(), &feed),
        &grads,
    );
    println!("ep=2,tp=2,etp=2: gradients worst {e:.1e} ({name})");
    assert!(e < 1e-10, "gradients: `{name}` off by {e}");
    assert_eq!(
        Parallel::parse("tp=2,etp=4").unwrap_err(),
        "`etp=4`: expert-tensor parallelism splits each expert over the tensor-parallel group, so etp is 1 or tp (2)"
    );
    let p = Parallel::parse("ep=8,tp=2,etp=2").unwrap();
    assert_eq!(
        minimax_plan(cfg, &p, 8, 40).unwrap_err(),
        format!(
            "num_local_experts ({}) is not divisible by ep (8)",
            cfg.num_local_experts
        )
    );
}

/// Pipeline parallelism: tiny-a's four layers cut into two and four stages (alone and with tensor and
/// expert-tensor parallelism inside each stage), two micro-batches through the 1F1B schedule on simulated ranks:
/// the logits and loss equal the single device's, and so do the gradients of all 39 parameters (the
/// micro-batches' mean, each stage's backward recomputing its forward from the hidden states it kept).
#[test]
fn pipeline_stages_by_one_f_one_b_give_the_single_device_logits_and_gradients() {
    use fulgur::pipeline::{build, concat_batches, micro_batches, one_f_one_b, run, stage_layers, Op};
    use fulgur::runtime::ranks::{InterpretedRank, RankProgram};
    let (ck, g, mut feed) = tiny_a();
    let cfg = &ck.config;
    let ids = random_tokens(2, 16, cfg.vocab_size, 13);
    feed.insert("input_ids".into(), ids.clone());
    let single = run_f64(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed);
    let weights = std::sync::Arc::new(feed.clone());
    let make: fulgur::pipeline::MakeProgram =
        std::sync::Arc::new(move |g: &Graph| -> Result<Box<dyn RankProgram>, String> {
            let params = g
                .params()
                .into_iter()
                .map(|id| {
                    let (n, _, _) = g.node(id).op.input_decl().unwrap();
                    (n.to_string(), weights[n].clone())
                })
                .collect();
            Ok(Box::new(InterpretedRank {
                graph: g.clone(),
                precision: Precision::F64,
                memory_limit: None,
                weights: params,
            }))
        });
    let opts = ForwardOptions {
        loss: true,
        ..Default::default()
    };
    for par in ["pp=2", "pp=4", "pp=2,tp=2", "pp=2,tp=2,etp=2"] {
        let p = Parallel::parse(par).unwrap();
        let stages = build(cfg, &p, 1, 16, &opts, true, false, &|g| Ok(g)).unwrap();
        assert_eq!(stages.len(), p.pp);
        let micro = micro_batches(&ids, 2).unwrap();
        let out = run(
            &stages,
            &micro,
            make.clone(),
            Precision::F64,
            std::time::Duration::from_secs(120),
        )
        .unwrap();
        let logits: Vec<&Tensor> = out.outputs.iter().map(|o| &o["logits"]).collect();
        let e = concat_batches(&logits).unwrap().rel_l2(&single["logits"]);
        let loss = out.outputs.iter().map(|o| o["loss"].to_f64()[0]).sum::<f64>() / 2.0;
        let grads = pipeline_grads(&out);
        let want = grads_only(&single);
        assert_eq!(grads.len(), 39, "{par}");
        let (eg, name) = worst(&grads, &want);
        println!("{par}: logits {e:.1e}, gradients worst {eg:.1e} ({name})");
        assert!(e < 1e-10, "{par}: logits off by {e}");
        assert!((loss - single["loss"].to_f64()[0]).abs() < 1e-10, "{par}: loss {loss}");
        assert!(eg < 1e-10, "{par}: `{name}` off by {eg}");
    }
    // tied embeddings: the last stage's head reads the embedding's table, and the pipeline sums its gradient
    // over the two stages that read it
    let mut tied_cfg = cfg.clone();
    tied_cfg.tie_word_embeddings = true;
    let tied_g = forward_graph(&tied_cfg, &opts).unwrap();
    let mut tied_feed = feed.clone();
    tied_feed.remove("lm_head.weight");
    let single_tied = run_f64(
        &differentiate(&tied_g, "loss", &GradOptions::default()).unwrap(),
        &tied_feed,
    );
    let stages = build(
        &tied_cfg,
        &Parallel::parse("pp=2").unwrap(),
        1,
        16,
        &opts,
        true,
        false,
        &|g| Ok(g),
    )
    .unwrap();
    let out = run(
        &stages,
        &micro_batches(&ids, 2).unwrap(),
        make.clone(),
        Precision::F64,
        std::time::Duration::from_secs(120),
    )
    .unwrap();
    let grads = pipeline_grads(&out);
    let want = grads_only(&single_tied);
    assert_eq!(grads.len(), 38, "tied: no `lm_head.weight`");
    let (eg, name) = worst(&grads, &want);
    println!("pp=2, tied embeddings: gradients worst {eg:.1e} ({name})");
    assert!(eg < 1e-10, "pp=2, tied: `{name}` off by {eg}");
    // expert parallel stages: each stage's MoE routed (the rows exchanged forward and, in the stage's backward,
    // back), two micro-batches of two sequences
    let ids4 = random_tokens(4, 16, cfg.vocab_size, 17);
    feed.insert("input_ids".into(), ids4.clone());
    let single4 = run_f64(&differentiate(&g, "loss", &GradOptions::default()).unwrap(), &feed);
    let p = Parallel::parse("pp=2,ep=2").unwrap();
    let stages = build(cfg, &p, 2, 16, &opts, true, false, &|g| Ok(g)).unwrap();
    let exchanges = |gs: &[Graph]| {
        gs[0]
            .nodes()
            .filter(|(_, n)| {
                matches!(&n.op, fulgur::ir::Op::Composite(fulgur::ir::Composite::OnRank { op, .. })
                if op.name() == "all_to_all_dispatch")
            })
            .count()
    };
    for st in &stages {
        let layers = st.layers.len();
        assert_eq!(exchanges(&st.forward), layers, "a dispatch per layer in the forward");
        assert_eq!(
            exchanges(st.backward.as_ref().unwrap()),
            2 * layers,
            "the forward recomputed and the cotangents' dispatch"
        );
    }
    let out = run(
        &stages,
        &micro_batches(&ids4, 2).unwrap(),
        make.clone(),
        Precision::F64,
        std::time::Duration::from_secs(120),
    )
    .unwrap();
    let grads = pipeline_grads(&out);
    let want = grads_only(&single4);
    let (eg, name) = worst(&grads, &want);
    println!("pp=2,ep=2: gradients worst {eg:.1e} ({name})");
    assert!(eg < 1e-10, "pp=2,ep=2: `{name}` off by {eg}");
    feed.insert("input_ids".into(), ids.clone());
    // a stage whose program cannot run fails the run naming it; its neighbours do not hang
    let stages = build(
        cfg,
        &Parallel::parse("pp=2").unwrap(),
        1,
        16,
        &opts,
        true,
        false,
        &|g| Ok(g),
    )
    .unwrap();
    let inner = make.clone();
    let broken: fulgur::pipeline::MakeProgram = std::sync::Arc::new(move |g: &Graph| {
        if g.name.contains("stage_2_4") {
            Err("no backend for it".into())
        } else {
            inner(g)
        }
    });
    let micro = micro_batches(&ids, 2).unwrap();
    let e = run(
        &stages,
        &micro,
        broken,
        Precision::F64,
        std::time::Duration::from_secs(60),
    )
    .err()
    .unwrap();
    assert_eq!(e, "stage 1, rank 0: no backend for it");
    // a stage rank whose program fails in a step (its input never given) fails that step naming it, and the
    // pipeline refuses the steps after
    let stages = build(
        cfg,
        &Parallel::parse("pp=2,tp=2").unwrap(),
        1,
        16,
        &opts,
        true,
        true,
        &|g| Ok(g),
    )
    .unwrap();
    let mut threads = fulgur::pipeline::PipelineThreads::new(
        &stages,
        make.clone(),
        Precision::F64,
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let mut weights = feed.clone();
    weights.remove("input_ids");
    let ok = threads.step(&micro, &weights).unwrap();
    assert_eq!(ok.grads.len(), 39);
    weights.remove("model.layers.3.mlp.gate.weight");
    let e = threads.step(&micro, &weights).err().unwrap();
    assert!(e.starts_with("stage 1, rank "), "{e}");
    assert!(e.contains("model.layers.3.mlp.gate.weight"), "{e}");
    let e = threads.step(&micro, &weights).err().unwrap();
    assert!(e.contains("the pipeline failed earlier"), "{e}");
    assert_eq!(stage_layers(5, 2).unwrap(), vec![0..3, 3..5]);
    assert_eq!(
        stage_layers(4, 5).unwrap_err(),
        "a model of 4 layers cuts into 1 to 4 pipeline stages, not 5"
    );
    assert_eq!(
        one_f_one_b(0, 2, 3, true),
        vec![
            Op::Forward(0),
            Op::Forward(1),
            Op::Backward(0),
            Op::Forward(2),
            Op::Backward(1),
            Op::Backward(2)
        ]
    );
    assert_eq!(
        minimax_plan(cfg, &Parallel::parse("pp=2").unwrap(), 2, 16).unwrap_err(),
        "pp=2: pipeline parallelism cuts the model into stages (`fulgur::pipeline`); each stage is sharded with pp=1"
    );
}

fn run_f64(g: &Graph, feed: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    run(g, feed)
}

/// `eval-model --parallel pp=2,tp=2`: tiny-a's two pipeline stages of two tensor-parallel ranks each, compiled for
/// the CPU, on simulated ranks, two micro-batches: transformers' logits and loss.
#[test]
#[cfg(feature = "llvm")]
fn eval_model_runs_pipeline_stages() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_fulgur"))
        .arg("eval-model")
        .arg(&ck)
        .arg("--tokens")
        .arg(&tokens)
        .args(["--target", "cpu", "--parallel", "pp=2,tp=2", "--out"])
        .arg(&out)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ran 2 pipeline stages of 2 simulated ranks each (dp=1,ep=1,sp=1,tp=2,pp=2, 2 micro-batches)"),
        "{err}"
    );
    let got = read_safetensors(&out).unwrap();
    let want = read_safetensors(&tokens).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-4, "logits off transformers' by {e}");
    assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-4);
}

/// `fulgur launch -n 4 -- fulgur eval-model ... --parallel pp=2,tp=2`: two pipeline stages of two ranks, each rank
/// its own process (the stages' collectives each through their own rendezvous, the activations across the cut
/// over a connection between rank `i` of the two stages) give transformers' logits and loss, written by the last
/// stage's rank 0; two processes at `pp=2` compiled for the CPU do too; a rank that exits mid-pipeline makes its
/// neighbours fail naming it and leaves no output; a job of the wrong size is refused with both numbers.
#[test]
fn launched_pipeline_stages_in_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ck = common::tiny_a();
    let tokens = ck.join("reference.safetensors");
    let want = read_safetensors(&tokens).unwrap();
    let run = |target: &str, n: &str, par: &str, fault: Option<&str>| launch_eval(target, n, par, fault, &out);
    let o = run("reference", "4", "pp=2,tp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("ran 2 pipeline stages of 2 launched ranks each (dp=1,ep=1,sp=1,tp=2,pp=2, 2 micro-batches) in ")
            && err.contains("; rank 2 (stage 1, rank 0) writes the outputs"),
        "{err}"
    );
    let got = read_safetensors(&out).unwrap();
    let e = got["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-5, "logits off transformers' by {e}");
    assert!((got["loss"].to_f64()[0] - want["loss"].to_f64()[0]).abs() < 1e-5);
    std::fs::remove_file(&out).unwrap();
    // each stage's program compiled for the CPU
    let o = run("cpu", "2", "pp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let e = read_safetensors(&out).unwrap()["logits"].rel_l2(&want["logits"]);
    assert!(e < 1e-4, "launched cpu stages: logits off transformers' by {e}");
    std::fs::remove_file(&out).unwrap();
    // stage 0's rank 1 (rank 1 of its stage's transport) exits at its stage's second collective
    let o = run("reference", "4", "pp=2,tp=2", Some("1:1"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(
            "rank 3: stage 1, rank 1: the previous stage: stage 0, rank 1 sent nothing: its connection closed"
        ),
        "{err}"
    );
    assert!(err.contains("1 (exit status 3)"), "{err}");
    assert!(!out.exists(), "a failed job leaves no output");
    let o = run("reference", "2", "pp=2,tp=2", None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(
            "launched as 2 ranks (torchrun's variables) but --parallel dp=1,ep=1,sp=1,tp=2,pp=2 needs 4 (2 pipeline \
             stages of 2)"
        ),
        "{err}"
    );
}

/// A launched pipeline's training state is held per stage (`pipeline::StageState`): on tiny-a at `pp=2,tp=2` and
/// `pp=4`, each stage holds the parameters of its own layers (the first stage also the embedding, the last the
/// final norm and the head, nothing tied), and every parameter is given at a checkpoint by exactly one process,
/// the rank 0 of the stage that holds it. With tied embeddings (`pp=2`), the embedding is held by the first and
/// the last stage, is the one tied parameter, and is given by the first stage alone.
#[test]
fn a_launched_pipelines_state_is_held_per_stage() {
    use fulgur::pipeline::{build, stage_layers, StageState};
    let (ck, _, _) = tiny_a();
    let opts = ForwardOptions {
        loss: true,
        ..Default::default()
    };
    let layer_of = |n: &str| -> Option<usize> {
        let rest = &n[n.find("layers.")? + "layers.".len()..];
        rest[..rest.find('.')?].parse().ok()
    };
    for (par, tie) in [("pp=2,tp=2", false), ("pp=4", false), ("pp=2", true)] {
        let mut cfg = ck.config.clone();
        cfg.tie_word_embeddings = tie;
        let g = forward_graph(&cfg, &opts).unwrap();
        let shapes: BTreeMap<String, Vec<usize>> = fulgur::models::random::random_weights(&g, 0.02, 1)
            .into_iter()
            .map(|(n, t)| (n, t.shape))
            .collect();
        let outside: Vec<&String> = shapes.keys().filter(|n| layer_of(n).is_none()).collect();
        assert_eq!(outside.len(), if tie { 2 } else { 3 }, "{par}: {outside:?}");
        let p = Parallel::parse(par).unwrap();
        let stages = build(&cfg, &p, 1, 16, &opts, true, true, &|g| Ok(g)).unwrap();
        let layers = stage_layers(cfg.num_hidden_layers, p.pp).unwrap();
        let r = stages[0].forward.len();
        let mut given: BTreeMap<String, usize> = BTreeMap::new();
        for job_rank in 0..p.pp * r {
            let st = StageState::new(&stages, job_rank, &shapes).unwrap();
            let s = job_rank / r;
            assert_eq!(st.stage, s);
            let held: Vec<&String> = shapes
                .keys()
                .filter(|n| match layer_of(n) {
                    Some(l) => layers[s].contains(&l),
                    None => false,
                })
                .collect();
            let own: Vec<&String> = st.own.iter().map(|(n, _)| n).collect();
            for n in &held {
                assert!(own.contains(n), "{par}: stage {s} does not hold `{n}` of its layers");
            }
            let extra: Vec<&&String> = own.iter().filter(|n| !held.contains(n)).collect();
            let want = match (s == 0, s + 1 == p.pp) {
                (true, false) => 1,
                (false, true) => 2,
                _ => 0,
            };
            assert_eq!(extra.len(), want, "{par}: stage {s} holds beside its layers {extra:?}");
            let tied: Vec<&String> = st.tied.iter().map(|(n, _)| n).collect();
            if tie {
                assert_eq!(tied.len(), 1, "{par}: {tied:?}");
                assert!(
                    own.contains(&tied[0]),
                    "{par}: stage {s} does not hold the tied `{}`",
                    tied[0]
                );
            } else {
                assert!(tied.is_empty(), "{par}: {tied:?}");
            }
            if job_rank % r != 0 {
                assert!(st.gives.is_empty(), "{par}: rank {job_rank} gives {:?}", st.gives);
            }
            for n in &st.gives {
                assert!(own.contains(&n), "{par}: rank {job_rank} gives `{n}` it does not hold");
                if let Some(other) = given.insert(n.clone(), job_rank) {
                    panic!("{par}: `{n}` given by ranks {other} and {job_rank}");
                }
            }
        }
        assert_eq!(
            given.keys().collect::<Vec<_>>(),
            shapes.keys().collect::<Vec<_>>(),
            "{par}: every parameter given once"
        );
        if tie {
            let st = StageState::new(&stages, 0, &shapes).unwrap();
            assert_eq!(
                given[&st.tied[0].0], 0,
                "{par}: the tied embedding given by the first stage"
            );
        }
    }
    // a parameter no stage reads is refused, naming it
    let cfg = ck.config.clone();
    let p = Parallel::parse("pp=2").unwrap();
    let stages = build(&cfg, &p, 1, 16, &opts, true, true, &|g| Ok(g)).unwrap();
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    shapes.insert("stray.weight".into(), vec![2]);
    let e = StageState::new(&stages, 0, &shapes).unwrap_err();
    assert_eq!(e, "parameter `stray.weight` is read by no pipeline stage");
}

//! Lowering: the kernel program, run kernel by kernel on the interpreter with the buffer plan's memory, computes
//! exactly what the graph computes (f32 precision, bit for bit), on every shipped config, the examples and
//! tiny-a, optimized and not; the arena reuses memory; kernels of one template share their code.

use fulgur_codegen::compile::{compile, CompileOptions, OptLevel};
use fulgur_codegen::oracle;
use fulgur_codegen::program::{lower, BufferKind, KernelProgram};
use fulgur_ir::{Graph, Interpreter, Precision, Tensor};
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use fulgur_passes::testing::random_inputs;
use std::collections::HashMap;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn model_graph(cfg: &MiniMaxConfig) -> Graph {
    forward_graph(
        cfg,
        &ForwardOptions {
            loss: true,
            hidden_states: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn compiled(g: &Graph, opt: OptLevel) -> Graph {
    let opts = CompileOptions {
        opt,
        ..CompileOptions::default()
    };
    compile(g, &opts, None).unwrap().graph
}

/// Inputs with weights scaled down (deep products of unit weights explode).
fn inputs(g: &Graph, env: &[(&str, i64)], vocab: i64) -> HashMap<String, Tensor> {
    let env: HashMap<String, i64> = env.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut ins = random_inputs(g, &env, 3, vocab);
    for (name, t) in ins.iter_mut() {
        if !name.ends_with("norm.weight") && !name.ends_with("layernorm.weight") {
            if let fulgur_ir::Buffer::F(v) = &mut t.data {
                v.iter_mut()
                    .for_each(|x| *x = fulgur_ir::tensor::round_to(t.dtype, *x * 0.2));
            }
        }
    }
    ins
}

/// The program on the oracle equals the graph on the interpreter, bit for bit.
fn agrees(g: &Graph, p: &KernelProgram, ins: &HashMap<String, Tensor>, what: &str) {
    let want = Interpreter::new(Precision::F32).run(g, ins).unwrap();
    let got = oracle::run(p, ins, Precision::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(want.len(), got.len(), "{what}");
    for (name, w) in &want {
        let g = &got[name];
        let same = g.dtype == w.dtype
            && g.shape == w.shape
            && g.to_f64()
                .iter()
                .zip(w.to_f64())
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        assert!(same, "{what}: output `{name}` differs: {g:?} vs {w:?}");
    }
}

#[test]
fn shipped_configs_lower_exactly() {
    for file in ["minimax-small.json", "minimax-tiny-hf.json"] {
        let cfg = MiniMaxConfig::from_file(&root().join("models/configs").join(file)).unwrap();
        let g = model_graph(&cfg);
        for opt in [OptLevel::None, OptLevel::Full] {
            let og = compiled(&g, opt);
            let p = lower(&og).unwrap();
            for (b, t) in [(1, 1), (2, 7)] {
                let ins = inputs(&og, &[("B", b), ("T", t)], cfg.vocab_size as i64);
                agrees(&og, &p, &ins, &format!("{file} {opt:?} B={b} T={t}"));
            }
            // memory is reused: the arena is smaller than the transient buffers side by side
            let env: HashMap<String, i64> = [("B".into(), 2), ("T".into(), 64)].into();
            let l = p.layout(&env).unwrap();
            assert!(l.arena_bytes < l.transient_total_bytes, "{file} {opt:?}: {l:?}");
            assert!(l.planned_peak() >= l.persistent_bytes);
        }
    }
}

#[test]
fn tiny_a_lowers_exactly_and_shares_template_code() {
    let dir = fulgur_models::fixtures::dir().join("tiny-a");
    let ck = fulgur_models::checkpoint::Checkpoint::open(&dir).unwrap();
    let reference = fulgur_ir::tensor::read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let g = model_graph(&ck.config);
    let og = compiled(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    let mut ins = ck.load_params(&og).unwrap();
    ins.insert("input_ids".into(), reference["input_ids"].clone());
    agrees(&og, &p, &ins, "tiny-a");
    // three lightning layers share one template: their kernels share codes
    let codes_of = |layer: &str| -> Vec<usize> {
        p.step
            .iter()
            .filter(|k| k.name.starts_with(&format!("{layer}.")))
            .map(|k| k.code)
            .collect()
    };
    assert!(!codes_of("layers.0").is_empty());
    assert_eq!(codes_of("layers.0"), codes_of("layers.1"));
    assert_eq!(codes_of("layers.0"), codes_of("layers.2"));
    assert!(p.codes < p.step.len());
    // what depends on weights alone is prepared at load
    assert!(!p.prepare.is_empty());
    assert!(p.buffers.iter().any(|b| b.kind == BufferKind::Prepared));
}

#[test]
fn examples_lower_exactly() {
    for (name, env) in [
        ("mlp", vec![("B", 3)]),
        ("attention", vec![("T", 5)]),
        ("lightning", vec![("B", 2), ("H", 2), ("T", 9)]),
    ] {
        let src = std::fs::read_to_string(root().join("examples").join(format!("{name}.fir"))).unwrap();
        let g = fulgur_ir::text::parse(&src).unwrap();
        for opt in [OptLevel::None, OptLevel::Full] {
            let og = compiled(&g, opt);
            let p = lower(&og).unwrap();
            let ins = inputs(&og, &env, 4);
            agrees(&og, &p, &ins, &format!("{name} {opt:?}"));
        }
    }
}

/// The full-size config (whose weights cannot be materialised here) lowers, its 80 layers sharing the codes of
/// their templates, and its memory plans at a 4096-token prefill.
#[test]
fn the_full_config_lowers_with_codes_per_template() {
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-text-01.json")).unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let og = compiled(&g, OptLevel::Full);
    let p = lower(&og).unwrap();
    // the codes of the 80 layers are those of two layer templates (and the head's), not 80 layers' worth
    let layer_kernels = p.step.iter().filter(|k| k.name.starts_with("layers.")).count();
    assert!(layer_kernels > 500, "{layer_kernels}");
    assert!(p.codes < 60, "{} codes for {} step kernels", p.codes, p.step.len());
    let env: HashMap<String, i64> = [("B".into(), 1), ("T".into(), 4096)].into();
    let l = p.layout(&env).unwrap();
    // the weights alone are 456B parameters in f32
    assert!(l.persistent_bytes > 456_000_000_000 * 4, "{l:?}");
    assert!(l.arena_bytes < l.transient_total_bytes / 10, "{l:?}");
}

/// A training step writes its new weights and moments into the buffers of the inputs they replace
/// (`program::donate`): each is written by one elementwise kernel that is the last to read the old value, so
/// no transient buffer holds a second copy of the state and a call that carries it needs no copy. The step
/// still computes what the graph computes, bit for bit, on the oracle (which lays the buffers out as a
/// backend does).
#[test]
fn a_training_step_writes_its_new_state_in_place() {
    use fulgur_passes::optim::{train_step, AdamW, ADAM_M, ADAM_V};
    let cfg = MiniMaxConfig::from_file(&root().join("models/configs/minimax-small.json")).unwrap();
    let fwd = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let step = compiled(
        &train_step(&compiled(&fwd, OptLevel::Full), "loss", &AdamW::default()).unwrap(),
        OptLevel::Full,
    );
    let p = lower(&step).unwrap();
    let mut state = 0;
    for o in &p.outputs {
        let Some(i) = p.inputs.iter().find(|i| i.name == o.name) else {
            continue;
        };
        state += 1;
        assert_eq!(
            o.tensor.buffer, i.tensor.buffer,
            "`{}` is not written in place of its input",
            o.name
        );
    }
    let params = fwd.params().len();
    assert_eq!(state, 3 * params, "weights and both moments of {params} parameters");
    // a weight's update, its moments beside it, is one kernel (`merge_siblings`): the gradient read once
    // (123 of minimax-small's 147; the others the optimizer fused with the gradient norm's reduction, or wrote
    // as a kernel reading its sibling's result)
    let state_buffers: std::collections::HashSet<usize> = p
        .inputs
        .iter()
        .filter(|i| p.outputs.iter().any(|o| o.name == i.name))
        .map(|i| i.tensor.buffer)
        .collect();
    let updates = p
        .step
        .iter()
        .filter(|k| k.outputs.len() == 3 && k.outputs.iter().all(|t| state_buffers.contains(&t.buffer)))
        .count();
    assert!(
        4 * updates >= 3 * params,
        "{updates} of {params} updates merged into one kernel"
    );
    assert!(p.outputs.iter().any(|o| o.name.starts_with(ADAM_M)));
    assert!(p.outputs.iter().any(|o| o.name.starts_with(ADAM_V)));
    // the arena holds no new state: less than the state itself for this small model's activations
    let env: HashMap<String, i64> = [("B".to_string(), 2), ("T".to_string(), 8)].into();
    let layout = p.layout(&env).unwrap();
    let state_bytes: u64 = p
        .inputs
        .iter()
        .filter(|i| p.outputs.iter().any(|o| o.name == i.name))
        .map(|i| layout.sizes[i.tensor.buffer])
        .sum();
    assert!(
        layout.arena_bytes < state_bytes,
        "arena {} bytes, state {state_bytes} bytes",
        layout.arena_bytes
    );
    let mut ins = inputs(&step, &[("B", 2), ("T", 8)], cfg.vocab_size as i64);
    for (name, t) in ins.iter_mut() {
        if name.starts_with(ADAM_V) {
            // second moments are non-negative
            if let fulgur_ir::Buffer::F(v) = &mut t.data {
                v.iter_mut().for_each(|x| *x = x.abs());
            }
        }
    }
    agrees(&step, &p, &ins, "minimax-small's training step");
}

/// Donation refuses what would change a result: an output whose input a later kernel reads along with the new
/// value, or computed from its input at another element (a transpose), keeps a buffer of its own; `x · 2 + 1`
/// is written in place, and so is `x + 1` once moved after a later reader of `x` that does not read it. Each program still equals the graph on the oracle.
#[test]
fn donation_keeps_an_output_apart_when_the_input_is_read_after_or_elsewhere() {
    use fulgur_ir::{DType, Dim};
    let ty = |g: &mut Graph| g.input("x", DType::F32, vec![Dim::from(4), Dim::from(4)]).unwrap();
    let x0 = Tensor::from_f64(DType::F32, vec![4, 4], (0..16).map(|i| i as f64 * 0.5 - 3.0).collect());
    let ins: HashMap<String, Tensor> = [("x".to_string(), x0)].into();
    let check = |g: &Graph, donated: bool, what: &str| {
        let p = lower(g).unwrap();
        let (o, i) = (
            p.outputs.iter().find(|o| o.name == "x").unwrap(),
            p.inputs.iter().find(|i| i.name == "x").unwrap(),
        );
        assert_eq!(o.tensor.buffer == i.tensor.buffer, donated, "{what}");
        agrees(g, &p, &ins, what);
    };
    // x · 2 + 1: in place
    let mut g = Graph::new("axpb");
    let x = ty(&mut g);
    let y = g.scale(x, 2.0).unwrap();
    let y = g.add_scalar(y, 1.0).unwrap();
    g.add_output("x", y).unwrap();
    check(&compiled(&g, OptLevel::Full), true, "x · 2 + 1");
    // xᵀ + 1: element (i, j) reads x at (j, i)
    let mut g = Graph::new("transpose");
    let x = ty(&mut g);
    let t = g.transpose(x, 0, 1).unwrap();
    let y = g.add_scalar(t, 1.0).unwrap();
    g.add_output("x", y).unwrap();
    check(&compiled(&g, OptLevel::Full), false, "xᵀ + 1");
    // x + 1, then x read by a later kernel (a sum over rows) that does not read x + 1: the writer moves after
    // it and writes in place
    let mut g = Graph::new("later");
    let x = ty(&mut g);
    let y = g.add_scalar(x, 1.0).unwrap();
    g.add_output("x", y).unwrap();
    let s = g.sum(x, &[1], false).unwrap();
    let s = g.mul(s, s).unwrap();
    g.add_output("s", s).unwrap();
    check(&g, true, "x read after by a kernel independent of x + 1");
    // x + 1, then a kernel reading both x and x + 1: the writer cannot move after it
    let mut g = Graph::new("both");
    let x = ty(&mut g);
    let y = g.add_scalar(x, 1.0).unwrap();
    g.add_output("x", y).unwrap();
    let z = g.mul(x, y).unwrap();
    let s = g.sum(z, &[1], false).unwrap();
    g.add_output("s", s).unwrap();
    check(&g, false, "x read after with its new value");
}

/// A collective may still be reading its input on a stream of its own until its result is first read: the
/// buffer plan keeps that input live until then, so the independent kernel in between gets other bytes.
#[test]
fn a_collectives_input_stays_live_until_its_result_is_read() {
    use fulgur_ir::{Composite, DType, Dim, Graph, Op};
    let on = |g: &mut Graph, c: Composite, x| {
        g.op(
            Op::Composite(Composite::OnRank {
                op: Box::new(Op::Composite(c)),
                rank: 0,
            }),
            &[x],
        )
        .unwrap()[0]
    };
    let mut g = Graph::new("c");
    let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(6)]).unwrap();
    let a = g.mul(x, x).unwrap();
    let r = on(&mut g, Composite::AllReduce { mesh: vec![1], over: 0 }, a);
    let e = g.exp(x).unwrap();
    let e = g.mul(e, x).unwrap();
    let y = g.add(r, e).unwrap();
    g.add_output("y", y).unwrap();
    let p = fulgur_codegen::program::lower(&g).unwrap();
    let id = |name: &str| {
        p.step
            .iter()
            .find(|k| fulgur_codegen::program::op_summary(&k.op).contains(name))
            .unwrap()
    };
    let (coll, reader) = (id("all_reduce"), id("add"));
    let input = coll.inputs[0].buffer;
    let live = p.buffers[input].live.unwrap();
    assert!(
        live.1 >= reader.id,
        "the all_reduce's input lives {live:?}, past the kernel that reads its result ({})",
        reader.id
    );
}

/// Neighbouring elementwise kernels over one shape that read the same input become one kernel of several
/// outputs (`merge_siblings`), equal to the graph on the oracle and on the CPU backend; a kernel reading its
/// neighbour's result, or of another shape, stays apart.
#[test]
fn sibling_kernels_merge_and_dependent_ones_do_not() {
    use fulgur_ir::{DType, Dim};
    let x0 = Tensor::from_f64(DType::F32, vec![4, 8], (0..32).map(|i| i as f64 * 0.25 - 3.0).collect());
    let ins: HashMap<String, Tensor> = [("x".to_string(), x0)].into();
    let mut g = Graph::new("siblings");
    let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(8)]).unwrap();
    let a = g.scale(x, 2.0).unwrap();
    let b = g.add_scalar(x, 1.0).unwrap();
    let c = g.exp(x).unwrap();
    let c = g.cast(c, DType::BF16).unwrap();
    g.add_output("a", a).unwrap();
    g.add_output("b", b).unwrap();
    g.add_output("c", c).unwrap();
    // another shape: apart
    let s = g.sum(x, &[1], false).unwrap();
    g.add_output("s", s).unwrap();
    let p = lower(&compiled(&g, OptLevel::Full)).unwrap();
    let wide: Vec<_> = p.step.iter().filter(|k| k.outputs.len() == 3).collect();
    assert_eq!(wide.len(), 1, "{}", p.text());
    assert_eq!(p.step.len(), 2, "the merged kernel and the sum: {}", p.text());
    agrees(&g, &p, &ins, "three siblings");
    // b reads a: a dependency, not a sibling (lowered as built, a kernel per op)
    let mut g = Graph::new("chain");
    let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(8)]).unwrap();
    let a = g.exp(x).unwrap();
    let b = g.mul(a, x).unwrap();
    g.add_output("a", a).unwrap();
    g.add_output("b", b).unwrap();
    let p = lower(&g).unwrap();
    assert_eq!(p.step.len(), 2, "{}", p.text());
    assert!(p.step.iter().all(|k| k.outputs.len() == 1));
    agrees(&g, &p, &ins, "a chain");
}

/// An elementwise kernel whose one reader is elementwise and reads it at the element it writes is computed in
/// that reader (`fuse_producers`), equal to the graph on the oracle; a reader through a transpose, or a second
/// reader, keeps the producer's kernel.
#[test]
fn a_producer_read_once_elementwise_is_computed_in_its_reader() {
    use fulgur_ir::{DType, Dim};
    let x0 = Tensor::from_f64(DType::F32, vec![4, 4], (0..16).map(|i| i as f64 * 0.25 - 2.0).collect());
    let ins: HashMap<String, Tensor> = [("x".to_string(), x0)].into();
    let build = |how: &str| {
        let mut g = Graph::new(how);
        let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(4)]).unwrap();
        let a = g.exp(x).unwrap();
        let r = match how {
            "transposed" => g.transpose(a, 0, 1).unwrap(),
            _ => a,
        };
        let b = g.scale(r, 2.0).unwrap();
        g.add_output("b", b).unwrap();
        if how == "twice" {
            let c = g.sum(a, &[1], false).unwrap();
            g.add_output("c", c).unwrap();
        }
        g
    };
    for (how, kernels) in [("once", 1), ("transposed", 2), ("twice", 3)] {
        let g = build(how);
        // lowered as built: a kernel per op before the merges
        let p = lower(&g).unwrap();
        assert_eq!(p.step.len(), kernels, "{how}: {}", p.text());
        agrees(&g, &p, &ins, how);
    }
}

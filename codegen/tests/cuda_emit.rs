//! The CUDA C++ Fulgur emits, without NVRTC: deterministic bytes, a header naming every IR node its code runs,
//! and the templates chosen where the loop form would run badly on a GPU.
use fulgur_codegen::compile::{compile, CompileOptions};
use fulgur_codegen::cuda::{emit_program, Launch};
use fulgur_codegen::kernels::{build_program_for, Target};
use fulgur_codegen::program::lower;
use fulgur_models::{forward_graph, ForwardOptions, MiniMaxConfig};
use std::path::PathBuf;

fn small_program() -> fulgur_codegen::program::KernelProgram {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let cfg = MiniMaxConfig::from_file(&root.join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(
        &cfg,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    lower(&compile(&g, &CompileOptions::default(), None).unwrap().graph).unwrap()
}

mod common;
use common::{source_in, source_of};

#[test]
fn sources_are_deterministic_and_name_the_ir_nodes_they_run() {
    let p = small_program();
    let emit = || {
        let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
        emit_program(&p, &mut kernels).unwrap()
    };
    let (a, b) = (emit(), emit());
    assert_eq!(a.len(), p.codes);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.source, y.source, "code {} differs between two emissions", x.code);
    }
    for k in p.prepare.iter().chain(&p.step) {
        let src = &a[k.code].source;
        assert!(
            src.contains(&format!("//   k{} {}\n", k.id, k.name)),
            "code {} does not name k{} {}",
            k.code,
            k.id,
            k.name
        );
    }
}

#[test]
fn flash_attention_moe_combine_and_rms_norm_are_templates() {
    let p = small_program();
    let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
    let cuda = emit_program(&p, &mut kernels).unwrap();
    let template_of = |op: &str| {
        let k = p
            .step
            .iter()
            .find(|k| fulgur_codegen::program::op_summary(&k.op).starts_with(op))
            .unwrap_or_else(|| panic!("no {op} kernel"));
        let c = &cuda[k.code];
        assert!(
            matches!(c.launches.as_slice(), [Launch::Template { .. }]),
            "{op}: {:?}",
            c.launches
        );
        c.source.clone()
    };
    let flash = template_of("flash_attention");
    assert!(flash.contains("extern __shared__ float fulgur_smem[];"), "{flash}");
    // f32 operands keep the f32 arithmetic of the numerics contract: no tensor cores
    assert!(!flash.contains("mma.sync"), "{flash}");
    assert!(template_of("moe_combine").contains("one block per token"));
    assert!(template_of("rms_norm").contains("one block per row"));
    // a grouped GEMM carries its device form for CUDA graphs
    let g = p
        .step
        .iter()
        .find(|k| fulgur_codegen::program::op_summary(&k.op).starts_with("grouped_matmul"))
        .unwrap();
    assert_eq!(cuda[g.code].device_grouped.len(), 1);
}

/// A phase that is one loop of independent stores (an embedding gather: a row per item, a channel per
/// iteration) gets a thread per (item, iteration); one with a reduction keeps a thread per item.
#[test]
fn a_loop_of_independent_stores_gets_a_thread_per_iteration() {
    let p = small_program();
    let code_of = |op: &str| source_in(&p, op);
    let gather = code_of("gather");
    assert!(gather.contains("const i64 v0 = fulgur_t / ("), "{gather}");
    let dispatch = code_of("moe_dispatch");
    // the count phase accumulates: a thread per chunk; the row copy is flat
    assert!(dispatch.contains("// phase `moe_dispatch.count`"));
    assert_eq!(dispatch.matches("fulgur_t / (").count(), 1, "{dispatch}");
}

/// A scatter (the adjoint of a gather: `scatter_add`, the embedding's gradient) adds into places read from
/// memory, which repeat: its loop over the indices stays in one thread per item, in order, never a thread per
/// iteration.
#[test]
fn a_scatter_keeps_its_loop_over_the_indices_in_one_thread() {
    use fulgur_ir::{DType, Dim, Graph};
    let mut g = Graph::new("scatter");
    let data = g.input("data", DType::F32, vec![Dim::from(10), Dim::from(4)]).unwrap();
    let idx = g.input("idx", DType::I64, vec![Dim::from(6)]).unwrap();
    let upd = g.input("upd", DType::F32, vec![Dim::from(6), Dim::from(4)]).unwrap();
    let s = g.scatter_add(data, idx, upd, 0).unwrap();
    g.add_output("o", s).unwrap();
    let src = &source_of(&g, "scatter_add");
    let phase = &src[src.find("// phase `").unwrap()..];
    let add = &phase[phase.rfind("// phase `").unwrap()..];
    assert!(add.contains("for (i64"), "the scatter's loop is kept: {add}");
    assert!(!add.contains("fulgur_t / ("), "no thread per iteration: {add}");
    // its slots stay plain: with `__restrict__` its read-modify-write measured slower (`restrict_slots`)
    assert!(
        !src.contains("__restrict__"),
        "a scatter's slots are not restrict: {src}"
    );
    // an embedding's gradient (2048 columns, 32000 rows): the rows cut into 64 ranges, a thread per (column,
    // range), each still walking the indices in order
    let mut g = Graph::new("embedding_grad");
    let data = g
        .input("data", DType::F32, vec![Dim::from(32000), Dim::from(2048)])
        .unwrap();
    let idx = g.input("idx", DType::I64, vec![Dim::from(8192)]).unwrap();
    let upd = g
        .input("upd", DType::F32, vec![Dim::from(8192), Dim::from(2048)])
        .unwrap();
    let s = g.scatter_add(data, idx, upd, 0).unwrap();
    g.add_output("o", s).unwrap();
    let p = lower(&g).unwrap();
    let kernels = build_program_for(&p, Target::Cuda).unwrap();
    let k = p
        .step
        .iter()
        .find(|k| fulgur_codegen::program::op_summary(&k.op).starts_with("scatter_add"))
        .unwrap();
    let lk = &kernels[k.code];
    let last = lk
        .steps
        .iter()
        .rev()
        .find_map(|s| match s {
            fulgur_codegen::loops::Step::Phase(ph) => Some(ph),
            _ => None,
        })
        .unwrap();
    assert_eq!(lk.pool.eval(last.grid, &[]), Some(2048 * 64), "{}", lk.text());
    let mut cuda_kernels = kernels.clone();
    let cuda = emit_program(&p, &mut cuda_kernels).unwrap();
    let src = &cuda[k.code].source;
    let add = &src[src.rfind("// phase `").unwrap()..];
    assert!(
        add.contains("for (i64") && add.contains("if ("),
        "the loop kept, the range checked: {add}"
    );
}

/// A reduction with few outputs over a long range runs in levels of partials (one thread per output would walk
/// the range alone): a sum of 600001 elements is 1172 chunks, then 3, then the total; three outputs over 40000
/// rows are split; a short range, or many outputs, stay one phase on the CPU. For CUDA a column reduction with
/// too few outputs to fill the device is split too (a norm weight's gradient: 2048 columns over 8192 rows, 32
/// chunks of 256 rows), while a row reduction keeps its item per output (the emitter gives it a warp).
#[test]
fn long_reductions_with_few_outputs_are_split_into_levels() {
    use fulgur_codegen::loops::Step;
    use fulgur_ir::{DType, Dim, Graph};
    let phases_for = |target: Target, dims: &[i64], axes: &[i64]| -> Vec<i64> {
        let mut g = Graph::new("reduce");
        let x = g
            .input("x", DType::F32, dims.iter().map(|&d| Dim::from(d)).collect())
            .unwrap();
        let s = g.sum(x, axes, false).unwrap();
        g.add_output("o", s).unwrap();
        let p = lower(&g).unwrap();
        let kernels = build_program_for(&p, target).unwrap();
        let k = &kernels[p.step[0].code];
        k.steps
            .iter()
            .filter_map(|s| match s {
                Step::Phase(ph) => Some(match k.pool.get(ph.grid) {
                    fulgur_codegen::loops::Expr::I(v) => *v,
                    _ => -1,
                }),
                _ => None,
            })
            .collect()
    };
    let phases = |dims: &[i64], axes: &[i64]| phases_for(Target::Cpu, dims, axes);
    assert_eq!(phases(&[600_001], &[0]), vec![1172, 3, 1]);
    assert_eq!(phases(&[100], &[0]), vec![1]);
    assert_eq!(phases(&[40_000, 3], &[0]), vec![3 * 79, 3]);
    // more outputs than 64, or a range under 32768: one phase, a thread per output
    assert_eq!(phases(&[8192, 2048], &[0]), vec![2048]);
    assert_eq!(phases(&[20_000], &[0]), vec![1]);
    let cuda = |dims: &[i64], axes: &[i64]| phases_for(Target::Cuda, dims, axes);
    assert_eq!(cuda(&[600_001], &[0]), vec![1172, 3, 1]);
    assert_eq!(cuda(&[8192, 2048], &[0]), vec![32 * 2048, 2048]);
    assert_eq!(cuda(&[4, 2048, 2048], &[0, 1]), vec![32 * 2048, 2048]);
    // few columns over a range too short for the few-outputs rule: still split as a column reduction
    assert_eq!(cuda(&[8192, 32], &[0]), vec![32 * 32, 32]);
    assert_eq!(phases(&[8192, 32], &[0]), vec![32]);
    // a row reduction, a short column, or columns enough to fill the device: one phase
    assert_eq!(cuda(&[2048, 8192], &[1]), vec![2048]);
    assert_eq!(cuda(&[2048, 2048], &[0]), vec![2048]);
    assert_eq!(cuda(&[8192, 65536], &[0]), vec![65536]);
}

/// An elementwise kernel over rows longer than a tile: a constant row is split into tiles that divide it, so its
/// loop runs from 0 and the launch gets a thread per element (rows of 8192 were a loop of 4096 per thread:
/// 38 ms for bench-m's swiglu backward on the H200); a row with no such divisor (8191, a prime) keeps the loop.
#[test]
fn long_constant_rows_get_a_thread_per_element() {
    use fulgur_ir::{DType, Dim, Graph};
    let source = |width: i64| {
        let mut g = Graph::new("rows");
        let x = g.input("x", DType::F32, vec![Dim::from(3), Dim::from(width)]).unwrap();
        let y = g.exp(x).unwrap();
        g.add_output("o", y).unwrap();
        let p = lower(&g).unwrap();
        let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
        emit_program(&p, &mut kernels).unwrap()[p.step[0].code].source.clone()
    };
    for width in [8192, 32000, 100] {
        let src = source(width);
        assert!(src.contains("fulgur_t / ("), "width {width}: {src}");
    }
    let src = source(8191);
    assert!(!src.contains("fulgur_t / ("), "{src}");
}

/// A reduction along a row's contiguous axis runs a warp per output: the lanes split the row (coalesced reads)
/// and combine with shuffles. Along a strided axis (a column sum), or over rows shorter than 64, a thread per
/// output stays: there, neighbouring threads already read neighbouring elements.
#[test]
fn row_reductions_run_a_warp_per_output() {
    use fulgur_ir::{DType, Dim, Graph};
    let source = |dims: &[i64], axes: &[i64]| {
        let mut g = Graph::new("reduce");
        let x = g
            .input("x", DType::BF16, dims.iter().map(|&d| Dim::from(d)).collect())
            .unwrap();
        let s = g.sum(x, axes, false).unwrap();
        let m = g.max(x, axes, false).unwrap();
        g.add_output("s", s).unwrap();
        g.add_output("m", m).unwrap();
        let p = lower(&g).unwrap();
        let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
        let cuda = emit_program(&p, &mut kernels).unwrap();
        p.step.iter().map(|k| cuda[k.code].source.clone()).collect::<Vec<_>>()
    };
    for src in source(&[300, 5000], &[1]) {
        assert!(src.contains("const int fulgur_lane = (int)(fulgur_t & 31);"), "{src}");
        assert!(src.contains(" += 32) {"), "{src}");
        assert!(src.contains("__shfl_xor_sync(0xffffffffu, m"), "{src}");
    }
    for src in source(&[5000, 300], &[0]).into_iter().chain(source(&[5000, 40], &[1])) {
        assert!(!src.contains("fulgur_lane"), "{src}");
    }
}

/// A row read through a permuted view in segments of at least 32 contiguous elements (heads side by side:
/// `[B, H, T, D]` read as `[B, T, H·D]`, the norm over a lightning layer's heads) is coalesced for a warp too;
/// segments of 8 are not.
#[test]
fn row_reductions_over_contiguous_segments_run_a_warp_per_output() {
    use fulgur_ir::{DType, Dim, Graph};
    let source = |d: i64| {
        let mut g = Graph::new("reduce");
        let x = g
            .input(
                "x",
                DType::BF16,
                vec![Dim::from(2), Dim::from(16), Dim::from(300), Dim::from(d)],
            )
            .unwrap();
        let p = g.permute(x, &[0, 2, 1, 3]).unwrap();
        let r = g
            .reshape(p, vec![Dim::from(2), Dim::from(300), Dim::from(16 * d)])
            .unwrap();
        let sq = g.mul(r, r).unwrap();
        let s = g.sum(sq, &[2], false).unwrap();
        g.add_output("s", s).unwrap();
        // optimized: the permute and reshape fused into the reduction, read by index arithmetic
        let g = compile(&g, &CompileOptions::default(), None).unwrap().graph;
        let p = lower(&g).unwrap();
        assert_eq!(
            p.step.len(),
            1,
            "{:?}",
            p.step.iter().map(|k| k.name.clone()).collect::<Vec<_>>()
        );
        let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
        let cuda = emit_program(&p, &mut kernels).unwrap();
        p.step
            .iter()
            .map(|k| cuda[k.code].source.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let src = source(128);
    assert!(src.contains("const int fulgur_lane = (int)(fulgur_t & 31);"), "{src}");
    assert!(src.contains(" += 32) {"), "{src}");
    assert!(!source(8).contains("fulgur_lane"));
}

/// Stored in bf16, the flash attention runs on the tensor cores (`mma.m16n8k16`, bf16 operands, f32
/// accumulators): the same template's mma form, still one launch of 4 warps.
#[test]
fn bf16_flash_attention_takes_the_tensor_core_form() {
    use fulgur_passes::precision::{keep_f32, store_as};
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let cfg = MiniMaxConfig::from_file(&root.join("models/configs/minimax-small.json")).unwrap();
    let g = forward_graph(&cfg, &ForwardOptions::default()).unwrap();
    let g = compile(&g, &CompileOptions::default(), None).unwrap().graph;
    let g = store_as(&g, fulgur_ir::DType::BF16, &keep_f32).unwrap();
    let p = lower(&g).unwrap();
    let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
    let cuda = emit_program(&p, &mut kernels).unwrap();
    let k = p
        .step
        .iter()
        .find(|k| fulgur_codegen::program::op_summary(&k.op).starts_with("flash_attention"))
        .expect("a flash_attention kernel");
    let c = &cuda[k.code];
    assert!(
        matches!(c.launches.as_slice(), [Launch::Template { threads: 128, .. }]),
        "{:?}",
        c.launches
    );
    assert!(
        c.source.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
        "{}",
        c.source
    );
}

/// `flash_attention_grad` with bf16 inputs takes the tensor-core form: two templates of 4 warps (dQ with the
/// rows' log-sum-exp, then dK and dV over the query heads sharing the keys) and two scratch vectors, in place of
/// its loop form; f32 inputs, a head dim the tiles do not divide, or a broadcast `q` keep the loop form.
#[test]
fn bf16_flash_attention_grad_takes_the_tensor_core_form() {
    use fulgur_ir::{Composite, DType, Dim, Graph, Op, Value};
    let launches = |dtype: DType, q: [i64; 5], d: i64| {
        let mut g = Graph::new("flash_grad");
        let dims = |v: &[i64]| v.iter().map(|&x| Dim::from(x)).collect::<Vec<_>>();
        let (t, s, dv) = (q[3], 90, 32);
        let ins = vec![
            g.input("q", dtype, dims(&[q[0], q[1], q[2], t, d])).unwrap(),
            g.input("k", dtype, dims(&[2, 2, 1, s, d])).unwrap(),
            g.input("v", dtype, dims(&[2, 2, 1, s, dv])).unwrap(),
            g.input("do", dtype, dims(&[2, 2, 3, t, dv])).unwrap(),
        ];
        let id = g
            .add_node(
                Op::Composite(Composite::FlashAttentionGrad {
                    scale: 0.2,
                    causal: true,
                }),
                &ins,
                None,
            )
            .unwrap();
        for (i, n) in ["dq", "dk", "dv"].iter().enumerate() {
            g.add_output(*n, Value::new(id, i as u32)).unwrap();
        }
        let p = lower(&g).unwrap();
        let mut kernels = build_program_for(&p, Target::Cuda).unwrap();
        let cuda = emit_program(&p, &mut kernels).unwrap();
        let k = &p.step[0];
        (cuda[k.code].clone(), kernels[k.code].scratch.clone())
    };
    let (c, scratch) = launches(DType::BF16, [2, 2, 3, 70, 0], 64);
    assert!(
        matches!(
            c.launches.as_slice(),
            [
                Launch::Template { threads: 128, .. },
                Launch::Template { threads: 128, .. }
            ]
        ),
        "{:?}",
        c.launches
    );
    assert!(c.source.contains("ldmatrix.sync.aligned.m8n8.x4.trans"), "{}", c.source);
    // the rows' log-sum-exp and delta: f32, one per (batch, query row)
    assert_eq!(scratch.len(), 2, "{scratch:?}");
    assert!(scratch
        .iter()
        .all(|(d, n)| *d == DType::F32 && *n == Dim::from(2 * 2 * 3 * 70)));
    for (dtype, q, d) in [
        (DType::F32, [2, 2, 3, 70, 0], 64),
        (DType::BF16, [2, 2, 3, 70, 0], 24),
        (DType::BF16, [2, 1, 3, 70, 0], 64),
    ] {
        let (c, _) = launches(dtype, q, d);
        assert!(
            !c.source.contains("mma.sync"),
            "{dtype:?} q {q:?} d {d}: {:?}",
            c.launches
        );
    }
}

/// A flat phase whose item's own index arithmetic divides by a run-time size (here the time axis `T` of a
/// head-major view read token-major: `[B, 16, T, 128]` as `[B, T, 2048]`) runs a warp per item, the lanes
/// splitting the row, so each lane divides once per row instead of every thread once per element; with a
/// literal `T` (no run-time division), or with rows of under 128, it keeps a thread per element.
#[test]
fn a_row_copy_dividing_by_a_run_time_size_runs_a_warp_per_row() {
    use fulgur_ir::{DType, Dim, Graph};
    let source = |t: Dim, d: i64| {
        let mut g = Graph::new("heads");
        let x = g
            .input(
                "x",
                DType::F32,
                vec![Dim::sym("B"), Dim::from(16), t.clone(), Dim::from(d)],
            )
            .unwrap();
        let y = g.exp(x).unwrap();
        let p = g.permute(y, &[0, 2, 1, 3]).unwrap();
        let r = g.reshape(p, vec![Dim::sym("B"), t, Dim::from(16 * d)]).unwrap();
        g.add_output("o", r).unwrap();
        // the copy the strided reshape makes (the `exp` before it is contiguous: a thread per element)
        source_of(&g, "reshape")
    };
    let src = source(Dim::sym("T"), 128);
    assert!(src.contains("fulgur_t >> 5"), "{src}");
    assert!(!src.contains("fulgur_t / ("), "{src}");
    for (t, d) in [(Dim::from(64), 128), (Dim::sym("T"), 4)] {
        let src = source(t.clone(), d);
        assert!(src.contains("fulgur_t / ("), "T = {t:?}, rows of {d}: {src}");
        assert!(!src.contains("fulgur_t >> 5"), "T = {t:?}, rows of {d}: {src}");
    }
}

/// Slots are declared `__restrict__` by default (what the training step's kernels rely on for it is checked by
/// `no_kernel_of_a_training_step_reads_what_it_writes_but_in_place`), every function of the code alike, and
/// `FULGUR_RESTRICT=0` leaves them plain. (The variable is read at emission; this test is the only one in this
/// binary that sets it, and restores it.)
#[test]
fn slots_are_restrict_by_default_and_plain_when_turned_off() {
    use fulgur_ir::{DType, Dim, Graph};
    let mut g = Graph::new("add");
    let a = g.input("a", DType::F32, vec![Dim::from(64), Dim::from(256)]).unwrap();
    let b = g.input("b", DType::F32, vec![Dim::from(64), Dim::from(256)]).unwrap();
    let c = g.add(a, b).unwrap();
    g.add_output("c", c).unwrap();
    let src = source_of(&g, "add");
    let functions = src.matches("extern \"C\" __global__").count();
    assert!(functions >= 1, "{src}");
    assert_eq!(src.matches("char* __restrict__ s").count(), 3 * functions, "{src}");
    std::env::set_var("FULGUR_RESTRICT", "0");
    let plain = source_of(&g, "add");
    std::env::remove_var("FULGUR_RESTRICT");
    assert!(!plain.contains("__restrict__"), "{plain}");
}

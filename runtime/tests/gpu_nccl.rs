//! The NCCL transport on the GPU, as far as one GPU allows: a job of one rank whose every collective
//! (`all_reduce`, `all_gather`, `reduce_scatter`, `all_to_all`, `send_recv`, on meshes of one and two axes, and
//! the routed exchange `all_to_all_dispatch`/`all_to_all_combine`)
//! goes through a real NCCL communicator and equals the simulated transport's result. The run on two GPUs is
//! issue 12's.
//!
//! Without a GPU each test says why and passes; with `FULGUR_REQUIRE_GPU=1` (set by gpu-pack's runner) a
//! missing GPU fails it.
#![cfg(feature = "cuda")]
use fulgur_ir::{Composite, DType, Op, Precision, Tensor, Transport};
use fulgur_runtime::nccl::NcclTransport;
use fulgur_runtime::ranks::SimTransport;
use std::time::Duration;

mod common;
use common::gpu;

#[test]
fn gpu_nccl_single_rank_collectives_equal_the_simulated_transport() {
    if !gpu() {
        return;
    }
    let x = Tensor::from_f64(
        DType::F32,
        vec![2, 4, 3],
        (0..24).map(|i| (i as f64 * 0.37).sin()).collect(),
    );
    for mesh in [vec![1usize], vec![1, 1]] {
        let nccl = NcclTransport::single(&mesh, 0).unwrap();
        let sim = SimTransport::new(1, Precision::F64, Duration::from_secs(10));
        let over = mesh.len() - 1;
        let ops = [
            Composite::AllReduce {
                mesh: mesh.clone(),
                over,
            },
            Composite::AllGather {
                axis: 2,
                mesh: mesh.clone(),
                over,
            },
            Composite::ReduceScatter {
                axis: -1,
                mesh: mesh.clone(),
                over,
            },
            Composite::AllToAll {
                axis: 1,
                mesh: mesh.clone(),
                over,
            },
            Composite::SendRecv {
                shift: 1,
                mesh: mesh.clone(),
                over,
            },
        ];
        for c in ops {
            let op = Op::Composite(c);
            let got = nccl.collective(&op, 0, &[&x]).unwrap();
            let want = sim.collective(&op, 0, &[&x]).unwrap();
            assert_eq!(got[0].shape, want[0].shape, "{} on {mesh:?}", op.name());
            assert_eq!(got[0].to_f64(), want[0].to_f64(), "{} on {mesh:?}", op.name());
            println!("{} on {mesh:?}: equal", op.name());
        }
        let e = nccl.collective(
            &Op::Composite(Composite::AllReduce {
                mesh: vec![1, 1, 1],
                over: 0,
            }),
            0,
            &[&x],
        );
        assert!(
            e.unwrap_err().contains("is not this transport's"),
            "a mesh of another shape is refused"
        );
    }
    let e = NcclTransport::single(&[2], 0).err().unwrap();
    assert_eq!(e, "a single-rank transport on the mesh [2] of more ranks");
}

/// The routed exchange through NCCL at one rank (its counts and rows point to point over the communicator of
/// every rank, to itself): dispatch pads the sorted rows and returns the counts, combine brings them back, both
/// equal to the simulated transport; counts that route more rows than there are are refused.
#[test]
fn gpu_nccl_single_rank_routed_exchange_equals_the_simulated_transport() {
    if !gpu() {
        return;
    }
    let x = Tensor::from_f64(
        DType::F32,
        vec![6, 2],
        (0..12).map(|i| (i as f64 * 0.53).cos()).collect(),
    );
    let counts = Tensor::from_i64(DType::I64, vec![3], vec![2, 0, 3]);
    for mesh in [vec![1usize], vec![1, 1, 1]] {
        let nccl = NcclTransport::single(&mesh, 0).unwrap();
        let sim = SimTransport::new(1, Precision::F64, Duration::from_secs(10));
        let over = mesh.len() / 2;
        let dispatch = Op::Composite(Composite::dispatch(mesh.clone(), over));
        let got = nccl.collective(&dispatch, 0, &[&x, &counts]).unwrap();
        let want = sim.collective(&dispatch, 0, &[&x, &counts]).unwrap();
        assert_eq!(got.len(), 2);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.shape, w.shape, "dispatch on {mesh:?}");
            assert_eq!(g.to_f64(), w.to_f64(), "dispatch on {mesh:?}");
        }
        let combine = Op::Composite(Composite::combine(mesh.clone(), over));
        let back = nccl.collective(&combine, 0, &[&got[0], &counts]).unwrap();
        let want = sim.collective(&combine, 0, &[&got[0], &counts]).unwrap();
        assert_eq!(back[0].to_f64(), want[0].to_f64(), "combine on {mesh:?}");
        // the five routed rows came back, the sixth (routed nowhere) is zero
        let mut expect = x.to_f64();
        expect[10..].iter_mut().for_each(|v| *v = 0.0);
        assert_eq!(back[0].to_f64(), expect);
        println!("routed exchange on {mesh:?}: equal");
        let over_full = Tensor::from_i64(DType::I64, vec![3], vec![4, 0, 3]);
        let e = nccl.collective(&dispatch, 0, &[&x, &over_full]).unwrap_err();
        assert!(e.contains("the counts sum to 7 but there are 6 rows"), "{e}");
    }
}

/// Each rank's program of tiny-a sharded tensor-parallel two ways runs on the CUDA backend (two programs on the
/// one GPU, a thread each), its collectives as host steps through the simulated transport: both ranks give
/// transformers' logits within the f32 tolerance.
#[test]
fn gpu_per_rank_programs_on_the_cuda_backend() {
    use fulgur_ir::tensor::read_safetensors;
    use fulgur_models::checkpoint::Checkpoint;
    use fulgur_models::{forward_graph, ForwardOptions};
    use fulgur_passes::shard::{lower_rank, shard_graph, Mesh, Placement, ShardPlan};
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    use std::collections::HashMap;
    use std::sync::Arc;
    if !gpu() {
        return;
    }
    let dir = fulgur_models::fixtures::tiny_a();
    let ck = Checkpoint::open(&dir).unwrap();
    let g = forward_graph(
        &ck.config,
        &ForwardOptions {
            loss: true,
            ..Default::default()
        },
    )
    .unwrap();
    let reference = read_safetensors(&dir.join("reference.safetensors")).unwrap();
    let split = |d: usize| vec![("tp".to_string(), Placement::Split(d))];
    let plan = ShardPlan {
        mesh: Mesh::new(&[("tp", 2)]).unwrap(),
        sizes: HashMap::from([("B".to_string(), 2), ("T".to_string(), 40)]),
        rules: vec![
            ("*.qkv_proj.weight".into(), split(0)),
            ("*.output_gate.weight".into(), split(0)),
            ("*.self_attn.norm.weight".into(), split(0)),
            ("*.out_proj.weight".into(), split(1)),
            ("*.q_proj.weight".into(), split(0)),
            ("*.k_proj.weight".into(), split(0)),
            ("*.v_proj.weight".into(), split(0)),
            ("*.o_proj.weight".into(), split(1)),
            ("*.mlp.experts.*".into(), split(0)),
        ],
        stored: vec![],
        constraints: Vec::new(),
    };
    let (sg, _) = shard_graph(&g, &plan).unwrap();
    let programs: Vec<_> = (0..2).map(|r| lower_rank(&sg, &plan.mesh, r).unwrap()).collect();
    let weights = ck.load_params(&g).unwrap();
    let t: Arc<dyn Transport + Send + Sync> = Arc::new(SimTransport::new(2, Precision::F32, Duration::from_secs(120)));
    let outs: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = programs
            .iter()
            .map(|p| {
                let (t, weights, ids) = (t.clone(), &weights, reference["input_ids"].clone());
                s.spawn(move || {
                    let kp = fulgur_codegen::program::lower(p).unwrap();
                    let mut cuda = CudaProgram::new(kp, CudaOptions::default()).unwrap();
                    cuda.set_transport(t);
                    cuda.load_weights_from(|name, _| weights.get(name).cloned().ok_or(format!("no `{name}`")))
                        .unwrap();
                    cuda.run(&[("input_ids".to_string(), ids)].into()).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, out) in outs.iter().enumerate() {
        let e = out["logits"].rel_l2(&reference["logits"]);
        println!("rank {r}: logits {e:.1e} off transformers'");
        assert!(e < 1e-4, "rank {r}: logits off transformers' by {e}");
    }
}

/// A rank's program on the CUDA backend with the NCCL transport runs its collectives on the device: NCCL on the
/// transport's own stream, ordered with the program's by events, no host staging (`all_reduce` in f32 and
/// bf16, `all_gather`, `reduce_scatter` and `all_to_all` along the leading axis, `send_recv`); a gather along an
/// inner axis (whose chunks interleave in memory) goes through the host. A kernel waits only for the collectives
/// whose bytes it touches. The outputs equal the same program's with every collective staged through the
/// simulated transport.
#[test]
fn gpu_nccl_collectives_run_on_the_device_in_a_cuda_program() {
    use fulgur_ir::{Dim, Graph};
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    use std::collections::HashMap;
    use std::sync::Arc;
    if !gpu() {
        return;
    }
    let mesh = vec![1usize, 1];
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
    let mut g = Graph::new("collectives");
    let x = g.input("x", DType::F32, vec![Dim::from(4), Dim::from(6)]).unwrap();
    let a = g.mul(x, x).unwrap();
    let m = mesh.clone();
    let a = on(
        &mut g,
        Composite::AllReduce {
            mesh: m.clone(),
            over: 1,
        },
        a,
    );
    // work independent of the collectives, placed right after the first, on buffers too large for the ones
    // the collective's input leaves free (a buffer reused under a running collective makes its kernel wait)
    let z = g.input("z", DType::F32, vec![Dim::from(32), Dim::from(32)]).unwrap();
    let e = g.exp(z).unwrap();
    let e = g.matmul(e, z).unwrap();
    let a = on(
        &mut g,
        Composite::AllGather {
            axis: 1,
            mesh: m.clone(),
            over: 0,
        },
        a,
    );
    let a = on(
        &mut g,
        Composite::ReduceScatter {
            axis: 1,
            mesh: m.clone(),
            over: 1,
        },
        a,
    );
    let a = on(
        &mut g,
        Composite::AllToAll {
            axis: -2,
            mesh: m.clone(),
            over: 0,
        },
        a,
    );
    let a = on(
        &mut g,
        Composite::SendRecv {
            shift: 1,
            mesh: m.clone(),
            over: 1,
        },
        a,
    );
    let b = g.cast(a, DType::BF16).unwrap();
    let b = on(
        &mut g,
        Composite::AllReduce {
            mesh: m.clone(),
            over: 0,
        },
        b,
    );
    let b = g.cast(b, DType::F32).unwrap();
    // along the inner axis: host-staged
    let c = on(
        &mut g,
        Composite::AllGather {
            axis: 2,
            mesh: m.clone(),
            over: 1,
        },
        b,
    );
    let y = g.add(c, x).unwrap();
    g.add_output("y", y).unwrap();
    g.add_output("e", e).unwrap();
    let feed: HashMap<String, Tensor> = [
        (
            "x".to_string(),
            Tensor::from_f64(
                DType::F32,
                vec![4, 6],
                (0..24).map(|i| (i as f64 * 0.29).sin()).collect(),
            ),
        ),
        (
            "z".to_string(),
            Tensor::from_f64(
                DType::F32,
                vec![32, 32],
                (0..1024).map(|i| (i as f64 * 0.013).cos()).collect(),
            ),
        ),
    ]
    .into();
    let run = |t: Arc<dyn Transport + Send + Sync>| {
        let kp = fulgur_codegen::program::lower(&g).unwrap();
        let mut cuda = CudaProgram::new(kp, CudaOptions::default()).unwrap();
        cuda.set_transport(t);
        let out = cuda.run(&feed).unwrap();
        let (d, h) = cuda.collectives_run();
        let alongside = cuda.overlapped_kernels();
        println!("{d} collectives on the device, {alongside} kernels alongside one");
        assert_eq!(
            alongside > 0,
            d > 0,
            "a kernel independent of a device collective does not wait for it"
        );
        assert_eq!(out["e"].to_f64().len(), 1024);
        ([out["y"].to_f64(), out["e"].to_f64()].concat(), d, h)
    };
    let (host, d0, h0) = run(Arc::new(SimTransport::new(1, Precision::F32, Duration::from_secs(10))));
    assert_eq!(
        (d0, h0),
        (0, 7),
        "the simulated transport stages every collective through the host"
    );
    let (dev, d1, h1) = run(Arc::new(NcclTransport::single(&mesh, 0).unwrap()));
    println!("NCCL in a CUDA program: {d1} collectives on the device, {h1} through the host");
    assert_eq!(
        (d1, h1),
        (6, 1),
        "six on the device, the inner-axis gather through the host"
    );
    assert_eq!(dev, host, "the device path gives the host path's values");
}

/// Five tokens of width 3 (`x`) and their two experts of three (`ids`): the routed exchange tests' inputs.
fn routed_feed() -> std::collections::HashMap<String, Tensor> {
    [
        (
            "x".to_string(),
            Tensor::from_f64(
                DType::F32,
                vec![5, 3],
                (0..15).map(|i| (i as f64 * 0.41).sin()).collect(),
            ),
        ),
        (
            "ids".to_string(),
            Tensor::from_i64(DType::I64, vec![5, 2], vec![2, 0, 0, 1, 2, 1, 0, 2, 2, 1]),
        ),
    ]
    .into()
}

/// The routed exchange in a CUDA program with the NCCL transport runs on device memory (the counts read back,
/// every expert's rows sent from the program's buffer into the receiver's): after a `moe_dispatch` of five
/// tokens' two slots over three experts, dispatch and combine give the simulated transport's values.
#[test]
fn gpu_nccl_routed_exchange_runs_on_the_device_in_a_cuda_program() {
    use fulgur_ir::{Dim, Graph};
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    use std::sync::Arc;
    if !gpu() {
        return;
    }
    let mesh = vec![1usize, 1, 1];
    let on = |g: &mut Graph, c: Composite, ins: &[fulgur_ir::Value]| {
        g.op(
            Op::Composite(Composite::OnRank {
                op: Box::new(Op::Composite(c)),
                rank: 0,
            }),
            ins,
        )
        .unwrap()
    };
    let mut g = Graph::new("routed");
    let x = g.input("x", DType::F32, vec![Dim::from(5), Dim::from(3)]).unwrap();
    let ids = g.input("ids", DType::I64, vec![Dim::from(5), Dim::from(2)]).unwrap();
    let d = g
        .op(Op::Composite(Composite::MoeDispatch { experts: 3 }), &[x, ids])
        .unwrap();
    let sent = on(&mut g, Composite::dispatch(mesh.clone(), 1), &[d[0], d[2]]);
    let y = g.mul(sent[0], sent[0]).unwrap();
    let back = on(&mut g, Composite::combine(mesh.clone(), 1), &[y, d[2]]);
    g.add_output("y", sent[0]).unwrap();
    g.add_output("got", sent[1]).unwrap();
    g.add_output("back", back[0]).unwrap();
    let feed = routed_feed();
    let run = |t: Arc<dyn Transport + Send + Sync>| {
        let kp = fulgur_codegen::program::lower(&g).unwrap();
        let mut cuda = CudaProgram::new(kp, CudaOptions::default()).unwrap();
        cuda.set_transport(t);
        let out = cuda.run(&feed).unwrap();
        (out, cuda.collectives_run())
    };
    let (host, on_host) = run(Arc::new(SimTransport::new(1, Precision::F32, Duration::from_secs(10))));
    assert_eq!(on_host, (0, 2));
    let (dev, on_dev) = run(Arc::new(NcclTransport::single(&mesh, 0).unwrap()));
    assert_eq!(on_dev, (2, 0), "dispatch and combine on the device");
    for name in ["y", "got", "back"] {
        assert_eq!(dev[name].to_f64(), host[name].to_f64(), "{name}");
    }
    assert_eq!(dev["got"].to_f64(), vec![3.0, 3.0, 4.0]);
}

/// The routed exchange chunked for overlap, as the collectives family's `routed-overlap-chunks` writes it (its
/// rows in two halves, each half's counts from the clamped cumsums), in a CUDA program with the NCCL
/// transport: after a `moe_dispatch` of five tokens' two slots over three experts, both chunks' dispatches are
/// issued before the first chunk's grouped GEMM (the step order, checked without a GPU too), that GEMM runs
/// while the second chunk's rows are still on the transport's stream (a kernel launched alongside a pending
/// collective), and the outputs equal the unchunked program's through the simulated transport. (At one rank
/// the exchange moves nothing, so the cost model would not chunk it: the form is written here.)
#[test]
fn gpu_nccl_chunked_routed_exchange_overlaps_in_a_cuda_program() {
    use fulgur_ir::{BinaryOp, ConstData, Dim, Graph, Value};
    use fulgur_runtime::cuda::{CudaOptions, CudaProgram};
    use std::sync::Arc;
    let mesh = vec![1usize, 1, 1];
    let on = |g: &mut Graph, c: Composite, ins: &[Value]| {
        g.op(
            Op::Composite(Composite::OnRank {
                op: Box::new(Op::Composite(c)),
                rank: 0,
            }),
            ins,
        )
        .unwrap()
    };
    let konst = |g: &mut Graph, dtype: DType, shape: Vec<usize>, data: ConstData| {
        g.op(Op::Constant { dtype, shape, data }, &[]).unwrap()[0]
    };
    // (graph, chunks): the MoE's exchange whole (1) or in two chunks of five rows
    let build = |chunks: i64| {
        let mut g = Graph::new("routed");
        let x = g.input("x", DType::F32, vec![Dim::from(5), Dim::from(3)]).unwrap();
        let ids = g.input("ids", DType::I64, vec![Dim::from(5), Dim::from(2)]).unwrap();
        let w = konst(
            &mut g,
            DType::F32,
            vec![3, 3, 3],
            ConstData::Float((0..27).map(|i| (i as f64 * 0.37).cos()).collect()),
        );
        let d = g
            .op(Op::Composite(Composite::MoeDispatch { experts: 3 }), &[x, ids])
            .unwrap();
        let (xs, counts) = (d[0], d[2]);
        let m = 10 / chunks;
        let cum = |g: &mut Graph, exclusive: bool| {
            g.op(
                Op::CumSum {
                    axis: 0,
                    exclusive,
                    reverse: false,
                },
                &[counts],
            )
            .unwrap()[0]
        };
        let (hi, lo) = (cum(&mut g, false), cum(&mut g, true));
        let int = |g: &mut Graph, v: i64| konst(g, DType::I64, vec![], ConstData::Int(vec![v]));
        let (zero, width) = (int(&mut g, 0), int(&mut g, m));
        let mut outs = Vec::new();
        for i in 0..chunks {
            let start = int(&mut g, i * m);
            let mut clamp = |v: Value| {
                let a = g.op(Op::Binary(BinaryOp::Sub), &[v, start]).unwrap()[0];
                let a = g.op(Op::Binary(BinaryOp::Max), &[a, zero]).unwrap()[0];
                g.op(Op::Binary(BinaryOp::Min), &[a, width]).unwrap()[0]
            };
            let (h, l) = (clamp(hi), clamp(lo));
            let ci = if chunks == 1 {
                counts
            } else {
                g.op(Op::Binary(BinaryOp::Sub), &[h, l]).unwrap()[0]
            };
            let xi = g.slice(xs, 0, (i * m) as usize, ((i + 1) * m) as usize).unwrap();
            let overlap = |yes: bool| Dim::from(if yes { 90usize } else { 0 });
            let sent = on(
                &mut g,
                Composite::AllToAllDispatch {
                    mesh: mesh.clone(),
                    over: 1,
                    overlap_flops: overlap(i > 0),
                },
                &[xi, ci],
            );
            let y = g
                .op(
                    Op::Composite(Composite::GroupedMatmul { swiglu: false }),
                    &[sent[0], sent[1], w],
                )
                .unwrap()[0];
            outs.push(
                on(
                    &mut g,
                    Composite::AllToAllCombine {
                        mesh: mesh.clone(),
                        over: 1,
                        overlap_flops: overlap(i + 1 < chunks),
                    },
                    &[y, ci],
                )[0],
            );
        }
        let back = g.op(Op::Concat { axis: 0 }, &outs).unwrap()[0];
        g.add_output("back", back).unwrap();
        g
    };
    let (whole, chunked) = (build(1), build(2));
    let kp = fulgur_codegen::program::lower(&chunked).unwrap();
    let order: String = kp
        .step
        .iter()
        .filter_map(|k| match &k.op {
            Op::Composite(Composite::OnRank { op, .. }) if op.name() == "all_to_all_dispatch" => Some('D'),
            Op::Composite(Composite::OnRank { .. }) => Some('C'),
            Op::Composite(Composite::GroupedMatmul { .. }) => Some('G'),
            _ => None,
        })
        .collect();
    assert_eq!(
        order, "DDGCGC",
        "both chunks dispatched before the first chunk's experts"
    );
    if !gpu() {
        return;
    }
    let feed = routed_feed();
    let run = |g: &Graph, t: Arc<dyn Transport + Send + Sync>| {
        let kp = fulgur_codegen::program::lower(g).unwrap();
        let mut cuda = CudaProgram::new(kp, CudaOptions::default()).unwrap();
        cuda.set_transport(t);
        let out = cuda.run(&feed).unwrap();
        (out, cuda.collectives_run(), cuda.overlapped_kernels())
    };
    let (want, _, _) = run(
        &whole,
        Arc::new(SimTransport::new(1, Precision::F32, Duration::from_secs(10))),
    );
    let (dev, on_dev, overlapped) = run(&chunked, Arc::new(NcclTransport::single(&mesh, 0).unwrap()));
    println!(
        "chunked routed exchange through NCCL: {on_dev:?} collectives (device, host), {overlapped} kernels alongside one"
    );
    assert_eq!(on_dev, (4, 0), "two chunks' dispatch and combine on the device");
    assert!(
        overlapped >= 1,
        "the first chunk's experts ran alongside the second chunk's exchange"
    );
    let (a, b) = (dev["back"].to_f64(), want["back"].to_f64());
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(err < 1e-6, "chunked off the whole exchange by {err}");
}

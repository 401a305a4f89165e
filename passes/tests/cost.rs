//! The cost model follows the numerics contract (`docs/numerics.md`): an f32 matmul is IEEE f32 (the vector
//! peak) unless TF32 is allowed; bf16 and f16 matmuls use the bf16 tensor-core peak.

use fulgur_ir::{DType, Dim, Op, TensorType};
use fulgur_passes::{CostModel, Target};

fn matmul_seconds(m: &CostModel, dtype: DType) -> f64 {
    // 4096 × 4096 × 4096: compute-bound on every target
    let t = |r: i64, c: i64| TensorType::new(dtype, vec![Dim::from(r), Dim::from(c)]);
    let (a, b, out) = (t(4096, 4096), t(4096, 4096), t(4096, 4096));
    let c = m.node_cost(&Op::MatMul, &[&a, &b], &[out]);
    m.time(&c, dtype)
}

#[test]
fn f32_matmuls_are_ieee_unless_tf32_is_asked_for() {
    let h100 = Target::by_name("H100").unwrap();
    let flops = 2.0 * 4096f64.powi(3);
    let launch = h100.launch_s;
    let ieee = CostModel::new(h100.clone());
    let got = matmul_seconds(&ieee, DType::F32) - launch;
    assert!((got - flops / h100.vector_flops).abs() < 1e-12, "{got}");
    let mut tf32 = CostModel::new(h100.clone());
    tf32.tf32 = true;
    let got = matmul_seconds(&tf32, DType::F32) - launch;
    assert!((got - flops / h100.matmul_flops_tf32).abs() < 1e-12, "{got}");
    for dt in [DType::BF16, DType::F16] {
        let got = matmul_seconds(&ieee, dt) - launch;
        assert!((got - flops / h100.matmul_flops_bf16).abs() < 1e-12, "{dt}: {got}");
    }
    // the contract costs an f32 matmul 7.4 times the TF32 one on an H100
    assert!(matmul_seconds(&ieee, DType::F32) > 7.0 * matmul_seconds(&tf32, DType::F32));
}

/// The grouped collectives are priced as ring algorithms within their groups (summed over the simulated ranks
/// like every cost): an all-reduce moves 2(G−1)/G of its input's bytes, a reduce-scatter (G−1)/G, an
/// all-gather (G−1)/G of its output (G times its input), an all-to-all (G−1)/G of its input; a send-receive its
/// whole input, nothing for a shift of a whole turn.
#[test]
fn grouped_collectives_move_ring_bytes() {
    use fulgur_ir::Composite;
    let m = CostModel::new(Target::by_name("H100").unwrap());
    let x = TensorType::new(DType::F32, vec![Dim::from(6), Dim::from(1032)]);
    let bytes = 6.0 * 1032.0 * 4.0;
    for (c, g, want) in [
        (
            Composite::AllReduce {
                mesh: vec![2, 3],
                over: 1,
            },
            3.0,
            2.0 * 2.0 / 3.0,
        ),
        (Composite::AllReduce { mesh: vec![], over: 0 }, 6.0, 2.0 * 5.0 / 6.0),
        (
            Composite::ReduceScatter {
                axis: 1,
                mesh: vec![2, 3],
                over: 0,
            },
            2.0,
            0.5,
        ),
        (
            Composite::AllGather {
                axis: 1,
                mesh: vec![2, 3],
                over: 1,
            },
            3.0,
            2.0,
        ),
        (
            Composite::AllToAll {
                axis: 1,
                mesh: vec![2, 3],
                over: 0,
            },
            2.0,
            0.5,
        ),
        (
            Composite::AllToAll {
                axis: 1,
                mesh: vec![],
                over: 0,
            },
            6.0,
            5.0 / 6.0,
        ),
        (
            Composite::SendRecv {
                shift: 1,
                mesh: vec![2, 3],
                over: 1,
            },
            3.0,
            1.0,
        ),
        (
            Composite::SendRecv {
                shift: 3,
                mesh: vec![2, 3],
                over: 1,
            },
            3.0,
            0.0,
        ),
    ] {
        let op = Op::Composite(c.clone());
        let out = fulgur_ir::infer::infer(&op, &[&x]).unwrap();
        let cost = m.node_cost(&op, &[&x], &out);
        assert!(
            (cost.comm_bytes - want * bytes).abs() < 1e-6,
            "{c:?} (G {g}): {}",
            cost.comm_bytes
        );
    }
}

/// The routed exchange's chunks: `overlap_flops` hides the transfer behind at most half the time of those
/// FLOPs at the tensor-core peak, never more than the transfer; a rank's view (`on_rank`) costs the simulated
/// exchange over the ranks, its FLOPs one rank's.
#[test]
fn routed_exchange_chunks_are_credited_with_their_overlap() {
    use fulgur_ir::Composite;
    let m = CostModel::new(Target::by_name("H800").unwrap());
    let (ranks, rows, c) = (4usize, 4096i64, 1024i64);
    let x = TensorType::new(DType::BF16, vec![Dim::from(ranks), Dim::from(rows), Dim::from(c)]);
    let counts = TensorType::new(DType::I64, vec![Dim::from(ranks), Dim::from(8)]);
    let moved = (ranks as i64 * rows * c * 2) as f64 * 3.0 / 4.0;
    let transfer = moved / m.target.link_bw;
    let cost = |flops: usize| {
        let op = Op::Composite(Composite::AllToAllDispatch {
            mesh: vec![ranks],
            over: 0,
            overlap_flops: Dim::from(flops),
        });
        let out = fulgur_ir::infer::infer(&op, &[&x, &counts]).unwrap();
        m.node_cost(&op, &[&x, &counts], &out).comm_bytes
    };
    assert!((cost(0) - moved).abs() < 1e-3, "{}", cost(0));
    // a third of the transfer hidden: FLOPs for 2/3 of its time at the peak (half of it counts)
    let f = (2.0 / 3.0 * transfer * m.target.matmul_flops_bf16) as usize;
    let want = moved * (1.0 - 1.0 / 3.0);
    assert!((cost(f) - want).abs() / want < 1e-6, "{} vs {want}", cost(f));
    // never more than the transfer
    assert_eq!(cost(f * 100), 0.0);
    // one rank's view: its share of the whole, its FLOPs one rank's
    let local = |flops: usize| {
        let op = Op::Composite(Composite::OnRank {
            op: Box::new(Op::Composite(Composite::AllToAllDispatch {
                mesh: vec![ranks],
                over: 0,
                overlap_flops: Dim::from(flops),
            })),
            rank: 1,
        });
        let xl = TensorType::new(DType::BF16, vec![Dim::from(rows), Dim::from(c)]);
        let cl = TensorType::new(DType::I64, vec![Dim::from(8)]);
        let out = fulgur_ir::infer::infer(&op, &[&xl, &cl]).unwrap();
        m.node_cost(&op, &[&xl, &cl], &out).comm_bytes
    };
    assert!((local(0) - moved / ranks as f64).abs() < 1e-3, "{}", local(0));
    let per_rank = f / ranks;
    assert!(
        (local(per_rank) - want / ranks as f64).abs() / want < 1e-6,
        "{}",
        local(per_rank)
    );
}

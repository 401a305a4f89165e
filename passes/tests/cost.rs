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

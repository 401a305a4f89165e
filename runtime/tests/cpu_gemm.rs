//! The CPU GEMM driver on the paths a model's kernels take: several threads (row blocks dealt over them,
//! column panels split when rows are few), depth past one block, edges of every tile, B packed per call and
//! packed once, A transposed by strides, bf16 operands, against an f64 reference.
#![cfg(feature = "llvm")]
use fulgur_codegen::llvm::{compile, LlvmOptions};
use fulgur_ir::DType;
use fulgur_runtime::cpu::gemm::{gemm, sgemm, BOperand, Kernel, Mat, PackedB};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

#[test]
fn gemm_paths_match_an_f64_reference() {
    let jit = compile(&[], &LlvmOptions::default()).unwrap();
    let kern = Kernel::of(&jit);
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    // (m, k, n): parallel with an odd row count and depth past KC; few rows (panels split); a vector; tiny
    for (m, k, n) in [
        (1023, 600, 100),
        (13, 700, 2100),
        (1, 512, 77),
        (3, 300, 70),
        (4, 513, 2048),
        (5, 3, 7),
        (256, 1024, 512),
    ] {
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let want: Vec<f64> = (0..m * n)
            .map(|idx| {
                let (i, j) = (idx / n, idx % n);
                (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum()
            })
            .collect();
        let check = |got: &[f32], what: &str| {
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{what} {m}x{k}x{n} at {idx}: {g} vs {w}"
                );
            }
        };
        let ma = Mat {
            ptr: a.as_ptr() as *const u8,
            dtype: DType::F32,
            rs: k as isize,
            cs: 1,
        };
        let mb = Mat {
            ptr: b.as_ptr() as *const u8,
            dtype: DType::F32,
            rs: n as isize,
            cs: 1,
        };
        for (pool, threads) in [(&two, 2), (&one, 1)] {
            let mut c = vec![0f32; m * n];
            unsafe { sgemm(pool, kern, m, n, k, ma, BOperand::Mat(mb), c.as_mut_ptr(), n) };
            check(&c, &format!("{threads} threads, B packed per call"));
            let p = unsafe { PackedB::pack(pool, &mb, k, n, kern.nr) };
            let mut c = vec![0f32; m * n];
            unsafe { sgemm(pool, kern, m, n, k, ma, BOperand::Packed(&p), c.as_mut_ptr(), n) };
            check(&c, &format!("{threads} threads, B packed once"));
        }
        // A stored transposed (read by strides), C written into a wider row-major buffer
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let mat = Mat {
            ptr: at.as_ptr() as *const u8,
            dtype: DType::F32,
            rs: 1,
            cs: m as isize,
        };
        let ldc = n + 3;
        let mut c = vec![0f32; m * ldc];
        unsafe { sgemm(&two, kern, m, n, k, mat, BOperand::Mat(mb), c.as_mut_ptr(), ldc) };
        let c: Vec<f32> = (0..m * n).map(|idx| c[(idx / n) * ldc + idx % n]).collect();
        check(&c, "A transposed");
        // bf16 B (rounded first, so the reference is exact for it) into a bf16 C: within bf16 rounding
        let bq: Vec<u16> = b.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let mbq = Mat {
            ptr: bq.as_ptr() as *const u8,
            dtype: DType::BF16,
            rs: n as isize,
            cs: 1,
        };
        let mut cq = vec![0u16; m * n];
        unsafe {
            gemm(
                &two,
                kern,
                m,
                n,
                k,
                ma,
                BOperand::Mat(mbq),
                cq.as_mut_ptr() as *mut u8,
                DType::BF16,
                n as isize,
                1,
            )
        };
        for (idx, g) in cq.iter().enumerate() {
            let (i, j) = (idx / n, idx % n);
            let w: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * half::bf16::from_bits(bq[p * n + j]).to_f64())
                .sum();
            let g = half::bf16::from_bits(*g).to_f64();
            assert!(
                (g - w).abs() <= 1e-2 * (1.0 + w.abs()),
                "bf16 {m}x{k}x{n} at {idx}: {g} vs {w}"
            );
        }
    }
}

/// A batch of GEMMs each just over the size the driver splits over threads (180·180·64 multiply-adds): the
/// batch ran in parallel while each GEMM could split again, and a thread waiting on its own split could take
/// another batch element and borrow its pack buffer twice (a panic that depends on scheduling, not seen in
/// this test's runs). The batch now runs in parallel only GEMMs the driver runs serially; it equals the
/// interpreter.
#[test]
fn a_batch_of_mid_sized_gemms_runs() {
    use fulgur_codegen::program::lower;
    use fulgur_ir::{Dim, Graph, Interpreter, Precision, Tensor};
    use fulgur_runtime::cpu::{CpuOptions, CpuProgram};
    let mut g = Graph::new("bmm");
    let a = g
        .input("a", DType::F32, vec![Dim::from(16), Dim::from(180), Dim::from(64)])
        .unwrap();
    let b = g
        .input("b", DType::F32, vec![Dim::from(16), Dim::from(64), Dim::from(180)])
        .unwrap();
    let y = g.matmul(a, b).unwrap();
    g.add_output("y".to_string(), y).unwrap();
    let feed: std::collections::HashMap<String, Tensor> = [
        (
            "a".to_string(),
            Tensor::from_f64(
                DType::F32,
                vec![16, 180, 64],
                data(16 * 180 * 64, 5).iter().map(|&x| x as f64).collect(),
            ),
        ),
        (
            "b".to_string(),
            Tensor::from_f64(
                DType::F32,
                vec![16, 64, 180],
                data(16 * 64 * 180, 6).iter().map(|&x| x as f64).collect(),
            ),
        ),
    ]
    .into();
    let want = Interpreter::new(Precision::F64).run(&g, &feed).unwrap();
    let mut cpu = CpuProgram::new(
        lower(&g).unwrap(),
        CpuOptions {
            threads: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    let got = cpu.run(&feed).unwrap();
    let e = got["y"].rel_l2(&want["y"]);
    assert!(e < 1e-6, "relative error {e}");
}

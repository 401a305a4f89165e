//! The CPU backend's GEMM (blocked and packed around the generated micro-kernel) against the `gemm` crate, on
//! the shapes of `models/configs/bench-s.json` at 1 × 1024 tokens (projection, expert, LM head) and a decode
//! step, f32, all cores.
//!
//! `cargo bench --bench gemm`. Built without the `llvm` feature it only says so.

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "llvm")]
fn bench(c: &mut Criterion) {
    use fulgur::codegen::llvm::{compile, LlvmOptions};
    use fulgur::ir::DType;
    use fulgur::runtime::cpu::gemm::{sgemm, BOperand, Kernel, Mat, PackedB};
    let jit = compile(&[], &LlvmOptions::default()).expect("jit");
    let kern = Kernel::of(&jit);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let mut group = c.benchmark_group("gemm_f32");
    group.sample_size(20);
    for (m, k, n) in [(1024, 512, 2048), (256, 512, 2048), (1024, 512, 4096), (1, 512, 2048)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.01).collect();
        let mut out = vec![0f32; m * n];
        group.throughput(criterion::Throughput::Elements((2 * m * n * k) as u64));
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
        group.bench_function(format!("fulgur_{m}x{k}x{n}"), |bch| {
            bch.iter(|| unsafe { sgemm(&pool, kern, m, n, k, ma, BOperand::Mat(mb), out.as_mut_ptr(), n) })
        });
        // B a weight, packed once (what the runtime does for weights)
        let packed = unsafe { PackedB::pack(&pool, &mb, k, n, kern.nr) };
        let mut out3 = vec![0f32; m * n];
        group.bench_function(format!("fulgur_packed_{m}x{k}x{n}"), |bch| {
            bch.iter(|| unsafe {
                sgemm(
                    &pool,
                    kern,
                    m,
                    n,
                    k,
                    ma,
                    BOperand::Packed(&packed),
                    out3.as_mut_ptr(),
                    n,
                )
            })
        });
        assert_eq!(out, out3, "packing B once changes nothing");
        // the same on one thread: how the driver scales
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("pool");
        group.bench_function(format!("fulgur_packed_1thread_{m}x{k}x{n}"), |bch| {
            bch.iter(|| unsafe { sgemm(&one, kern, m, n, k, ma, BOperand::Packed(&packed), out3.as_mut_ptr(), n) })
        });
        let mut out2 = vec![0f32; m * n];
        group.bench_function(format!("gemm_crate_{m}x{k}x{n}"), |bch| {
            bch.iter(|| unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out2.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            })
        });
        for (x, y) in out.iter().zip(&out2) {
            assert!((x - y).abs() <= 1e-3 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
    group.finish();
    // the micro-kernel alone on L1-resident panels, one thread: the ceiling the driver works under
    let (mr, nr) = (kern.mr, kern.nr);
    let kc = 256;
    let ap: Vec<f32> = (0..mr * kc).map(|i| (i % 7) as f32 * 0.1).collect();
    let bp: Vec<f32> = (0..nr * kc).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut cp = vec![0f32; mr * nr];
    let mut group = c.benchmark_group("microkernel_f32");
    group.throughput(criterion::Throughput::Elements((2 * mr * nr * kc) as u64));
    group.bench_function(format!("{mr}x{nr}x{kc}"), |bch| {
        bch.iter(|| unsafe { (kern.ukr)(kc as i64, ap.as_ptr(), bp.as_ptr(), cp.as_mut_ptr(), nr as i64, 1) })
    });
    group.finish();
}

#[cfg(not(feature = "llvm"))]
fn bench(_: &mut Criterion) {
    eprintln!("skipping: built without the `llvm` feature");
}

criterion_group!(benches, bench);
criterion_main!(benches);

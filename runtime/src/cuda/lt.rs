//! The experts' GEMMs of a grouped GEMM through cuBLASLt, each algorithm chosen once per bucket of sizes.
//!
//! An expert's row count changes with the routing, so from step to step (the weights change) and from layer to
//! layer nearly every expert product has sizes cuBLAS has not seen. `cublasGemmEx` then runs its algorithm
//! heuristic on the host for the call, while the device, which has just drained its queue for the group sizes,
//! waits for the product. Here the heuristic runs once per [`Key`]: sizes rounded up to a bucket (eight per
//! octave), the operands' types, transposes, leading dimensions and pointer alignments. It is asked about the
//! bucket's own sizes ([`canonical`]), not those of whichever product reached the bucket first, so the
//! algorithm, and with it a product's bits, is a function of the key alone: a run resumed from a checkpoint
//! computes what the uninterrupted run did. A product the bucket's algorithm is refused for gets the algorithm
//! chosen for its exact sizes, kept apart.

use super::{plan_gemm, Mat};
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::driver::sys;
use fulgur_ir::DType;
use std::collections::HashMap;
use std::ffi::c_void;

/// What an algorithm is chosen for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    /// The operands' and the output's dtypes.
    types: [DType; 2],
    /// Whether the first and second operands are read transposed.
    trans: [bool; 2],
    /// `m`, `n` and `k` of the column-major product, each rounded up by [`bucket`].
    sizes: [i64; 3],
    /// The leading dimensions of the two operands and the output.
    lds: [i64; 3],
    /// The byte alignment of the two operands' and the output's first elements (at most 256).
    align: [u32; 3],
}

/// `x` rounded up to its bucket: exact up to 64, then eight buckets per octave (1793 to 1920 share one, 1921
/// to 2048 the next).
pub(super) fn bucket(x: i64) -> i64 {
    if x <= 64 {
        return x;
    }
    let step = 1i64 << (63 - x.leading_zeros() as i64 - 3);
    (x + step - 1) / step * step
}

/// The largest power of two dividing `ptr`, at most 256.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

fn dtype(d: DType) -> Result<lt_sys::cudaDataType, String> {
    match d {
        DType::F32 => Ok(lt_sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Ok(lt_sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Ok(lt_sys::cudaDataType::CUDA_R_16F),
        d => Err(format!("a GEMM on {d}")),
    }
}

fn status(what: &str) -> impl Fn(lt::CublasError) -> String + '_ {
    move |e| format!("cuBLASLt {what}: {e:?}")
}

/// One product's descriptors, destroyed when dropped.
struct Descs {
    op: lt_sys::cublasLtMatmulDesc_t,
    layouts: Vec<lt_sys::cublasLtMatrixLayout_t>,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: created by `ExpertLt::descs`, destroyed once
        unsafe {
            for &l in &self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.op);
        }
    }
}

/// The sizes the heuristic is asked about for a bucket: each of `m`, `n`, `k` of plan `p` rounded up to its
/// bucket, but no longer than a leading dimension it is the row count of (a column-major layout's rows fit its
/// leading dimension): a function of the [`Key`] alone, and never smaller than the product's own sizes.
fn canonical(p: &super::GemmPlan, k: i64) -> (i64, i64, i64) {
    let mut m = bucket(p.m).min(p.ldc);
    let mut n = bucket(p.n);
    let mut kk = bucket(k);
    if p.trans_first {
        kk = kk.min(p.ld_first);
    } else {
        m = m.min(p.ld_first);
    }
    if p.trans_second {
        n = n.min(p.ld_second);
    } else {
        kk = kk.min(p.ld_second);
    }
    (m, n, kk)
}

/// A cuBLASLt handle and the algorithms chosen so far.
pub(super) struct ExpertLt {
    handle: lt_sys::cublasLtHandle_t,
    /// By bucket, chosen for the bucket's own sizes.
    algos: HashMap<Key, lt_sys::cublasLtMatmulAlgo_t>,
    /// By exact sizes, for products their bucket's algorithm was refused for.
    exact: HashMap<Key, lt_sys::cublasLtMatmulAlgo_t>,
    /// Heuristic queries made so far.
    pub queries: usize,
}

impl ExpertLt {
    pub fn new() -> Result<ExpertLt, String> {
        Ok(ExpertLt {
            handle: lt::create_handle().map_err(status("handle"))?,
            algos: HashMap::new(),
            exact: HashMap::new(),
            queries: 0,
        })
    }

    /// `c = a · b` (`m × n`, depth `k ≥ 1`; row-major views as [`plan_gemm`] reads them) enqueued on `stream`,
    /// with the workspace `(pointer, bytes)` (used by this stream alone).
    pub fn gemm(
        &mut self,
        stream: sys::CUstream,
        (workspace, bytes): (u64, usize),
        (m, n, k): (i64, i64, i64),
        a: Mat,
        b: Mat,
        c: Mat,
    ) -> Result<(), String> {
        if m <= 0 || n <= 0 {
            return Ok(());
        }
        if k <= 0 {
            return Err(format!("a product of depth {k}"));
        }
        if a.dtype != b.dtype {
            return Err(format!("operands of different dtypes ({} and {})", a.dtype, b.dtype));
        }
        let p = plan_gemm(m, n, k, a, b, c, [0, 0, 0])?;
        let ptr = |x: &Mat| x.base + (x.offset * x.dtype.size_bytes() as i64) as u64;
        let (pa, pb, pc) = (ptr(&p.first), ptr(&p.second), ptr(&c));
        let key = Key {
            types: [a.dtype, c.dtype],
            trans: [p.trans_first, p.trans_second],
            sizes: [bucket(p.m), bucket(p.n), bucket(k)],
            lds: [p.ld_first, p.ld_second, p.ldc],
            align: [alignment(pa), alignment(pb), alignment(pc)],
        };
        let d = self.descs(&p, (p.m, p.n, k), a.dtype, c.dtype)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let handle = self.handle;
        let run = |algo: &lt_sys::cublasLtMatmulAlgo_t| {
            // SAFETY: the operands are views of live device buffers (check_views), the descriptors describe
            // them, and the workspace serves this stream alone
            unsafe {
                lt::matmul(
                    handle,
                    d.op,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    pa as *const c_void,
                    d.layouts[0],
                    pb as *const c_void,
                    d.layouts[1],
                    pc as *const c_void,
                    d.layouts[2],
                    pc as *mut c_void,
                    d.layouts[2],
                    algo,
                    workspace as *mut c_void,
                    bytes,
                    stream as lt_sys::cudaStream_t,
                )
            }
        };
        let chosen = match self.algos.get(&key) {
            Some(algo) => Some(*algo),
            None => {
                let q = self.descs(&p, canonical(&p, k), a.dtype, c.dtype)?;
                // no algorithm for the bucket's sizes: every product of it takes its exact sizes' below
                let algo = self.query(&q, key.align, bytes).ok();
                if let Some(algo) = algo {
                    self.algos.insert(key, algo);
                }
                algo
            }
        };
        if let Some(algo) = chosen {
            if run(&algo).is_ok() {
                return Ok(());
            }
        }
        // refused for these exact sizes: the algorithm chosen for them
        let exact = Key {
            sizes: [p.m, p.n, k],
            ..key
        };
        let algo = match self.exact.get(&exact) {
            Some(algo) => *algo,
            None => {
                let algo = self.query(&d, key.align, bytes)?;
                self.exact.insert(exact, algo);
                algo
            }
        };
        run(&algo).map_err(status("matmul"))
    }

    /// The descriptors of the column-major product `p` (its transposes and leading dimensions) at sizes
    /// `(m, n, k)`.
    fn descs(
        &self,
        p: &super::GemmPlan,
        (m, n, k): (i64, i64, i64),
        operands: DType,
        output: DType,
    ) -> Result<Descs, String> {
        let op = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(status("descriptor"))?;
        let mut d = Descs {
            op,
            layouts: Vec::with_capacity(3),
        };
        for (attr, t) in [
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                p.trans_first,
            ),
            (
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                p.trans_second,
            ),
        ] {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            let v: i32 = t as i32;
            // SAFETY: the descriptor is live; the attribute is a 32-bit integer
            unsafe { lt::set_matmul_desc_attribute(d.op, attr, &v as *const i32 as *const c_void, 4) }
                .map_err(status("transpose"))?;
        }
        let shape = |t: bool, rows: i64, cols: i64| if t { (cols, rows) } else { (rows, cols) };
        for ((rows, cols), ld, ty) in [
            (shape(p.trans_first, m, k), p.ld_first, operands),
            (shape(p.trans_second, k, n), p.ld_second, operands),
            ((m, n), p.ldc, output),
        ] {
            let l = lt::create_matrix_layout(dtype(ty)?, rows as u64, cols as u64, ld).map_err(status("layout"))?;
            d.layouts.push(l);
        }
        Ok(d)
    }

    /// The heuristic's best algorithm for the product `d` with operands aligned to `align` bytes and `bytes` of
    /// workspace.
    fn query(&mut self, d: &Descs, align: [u32; 3], bytes: usize) -> Result<lt_sys::cublasLtMatmulAlgo_t, String> {
        use lt_sys::cublasLtMatmulPreferenceAttributes_t as P;
        self.queries += 1;
        let pref = lt::create_matmul_pref().map_err(status("preference"))?;
        let ws = bytes as u64;
        let mut set: Vec<(P, *const c_void, usize)> = vec![(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const c_void,
            8,
        )];
        for (attr, v) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2]),
        ] {
            set.push((attr, v as *const u32 as *const c_void, 4));
        }
        // SAFETY: the preference and descriptors are live; each attribute's buffer outlives its setting
        let result = unsafe {
            set.iter()
                .try_for_each(|&(attr, v, size)| lt::set_matmul_pref_attribute(pref, attr, v, size))
                .map_err(status("preference"))
                .and_then(|()| {
                    lt::get_matmul_algo_heuristic(
                        self.handle,
                        d.op,
                        d.layouts[0],
                        d.layouts[1],
                        d.layouts[2],
                        d.layouts[2],
                        pref,
                    )
                    .map_err(status("heuristic"))
                })
        };
        // SAFETY: created above, destroyed once
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        Ok(result?.algo)
    }
}

impl Drop for ExpertLt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, after the program's streams are synchronized
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{plan_gemm, Mat};
    use super::{alignment, bucket, canonical};
    use fulgur_ir::DType;

    /// A grouped GEMM's experts: `rows × 2048` row-major activations times a `2048 × 8192` weight, and the
    /// weight gradient `2048 × rows` (transposed activations) times `rows × 8192`.
    fn plans(rows: i64) -> [(super::super::GemmPlan, i64); 2] {
        let mat = |rs, cs| Mat {
            base: 1 << 20,
            dtype: DType::BF16,
            offset: 0,
            rs,
            cs,
        };
        [
            (
                plan_gemm(rows, 8192, 2048, mat(2048, 1), mat(8192, 1), mat(8192, 1), [0, 0, 0]).unwrap(),
                2048,
            ),
            (
                plan_gemm(2048, 8192, rows, mat(1, 2048), mat(8192, 1), mat(8192, 1), [0, 0, 0]).unwrap(),
                rows,
            ),
        ]
    }

    #[test]
    fn the_sizes_asked_about_depend_on_the_bucket_alone_and_fit_the_layouts() {
        for (x, y) in [(1900, 1795), (2000, 2048), (300, 290), (65, 72)] {
            assert_eq!(bucket(x), bucket(y), "{x} and {y} share a bucket");
            for ((p, k), (q, l)) in plans(x).into_iter().zip(plans(y)) {
                let (cp, cq) = (canonical(&p, k), canonical(&q, l));
                assert_eq!(cp, cq, "rows {x} and {y}");
                assert!(cp.0 >= p.m && cp.1 >= p.n && cp.2 >= k, "{cp:?} against {p:?}, k {k}");
                // a column-major layout's rows fit its leading dimension
                let a_rows = if p.trans_first { cp.2 } else { cp.0 };
                let b_rows = if p.trans_second { cp.1 } else { cp.2 };
                assert!(
                    a_rows <= p.ld_first && b_rows <= p.ld_second && cp.0 <= p.ldc,
                    "{cp:?} against {p:?}"
                );
            }
        }
    }

    #[test]
    fn buckets_are_eight_an_octave_and_never_smaller() {
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(64), 64);
        assert_eq!(bucket(65), 72);
        assert_eq!(bucket(1900), 1920);
        assert_eq!(bucket(1921), 2048);
        assert_eq!(bucket(2048), 2048);
        assert_eq!(bucket(2049), 2304);
        for x in 1..5000 {
            let b = bucket(x);
            assert!(b >= x && b - x < (x / 8).max(1), "{x} -> {b}");
            assert_eq!(bucket(b), b, "{x} -> {b}");
        }
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1080), 128);
    }
}

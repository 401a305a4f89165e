//! The GEMM driver of the CPU backend: cache blocking, packing and threading around the generated
//! micro-kernel (`fulgur_codegen::llvm::MicroKernel`).
//!
//! The loops are the classic ones of BLIS-style GEMMs: `C` in blocks of `NC` columns; `k` in blocks of `KC`;
//! a `KC × NC` block of `B` packed once into `NR`-wide panels (shared by the threads); the rows of `C` in blocks
//! of `MC`, each thread packing its `MC × KC` block of `A` into `MR`-tall panels and running the micro-kernel on
//! every `MR × NR` tile. Operands may be f32, bf16 or f16 with any strides (transposes are strides): packing
//! converts to f32. `C` is written directly when it is row-major f32; otherwise through an f32 buffer.

use super::SendPtr;
use fulgur_codegen::llvm::MicroKernel;
use fulgur_ir::DType;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// Depth of a packed block.
const KC: usize = 512;

/// A strided matrix operand (strides in elements).
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const u8,
    pub dtype: DType,
    pub rs: isize,
    pub cs: isize,
}

unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

#[inline(always)]
unsafe fn read(m: &Mat, i: isize, j: isize) -> f32 {
    let at = i * m.rs + j * m.cs;
    match m.dtype {
        DType::F32 => *(m.ptr as *const f32).offset(at),
        DType::BF16 => bf16::from_bits(*(m.ptr as *const u16).offset(at)).to_f32(),
        DType::F16 => f16::from_bits(*(m.ptr as *const u16).offset(at)).to_f32(),
        _ => 0.0,
    }
}

/// The micro-kernel and its tile.
#[derive(Clone, Copy)]
pub struct Kernel {
    pub ukr: MicroKernel,
    pub mr: usize,
    pub nr: usize,
    /// Micro-kernels of fewer rows (same `nr`), by row count: a product of `m` rows uses the smallest that
    /// covers them when that is fewer than `mr`.
    pub short: [Option<(usize, MicroKernel)>; 2],
}

impl Kernel {
    /// The kernel of JIT-compiled code: its main micro-kernel and its short ones.
    pub fn of(jit: &fulgur_codegen::llvm::JitProgram) -> Kernel {
        let mut short = [None, None];
        for (slot, k) in short.iter_mut().zip(&jit.short_kernels) {
            *slot = Some(*k);
        }
        Kernel {
            ukr: jit.micro_kernel,
            mr: jit.tile.0,
            nr: jit.tile.1,
            short,
        }
    }

    /// The micro-kernel and its row count for a product of `m` rows.
    fn for_rows(&self, m: usize) -> (MicroKernel, usize) {
        self.short
            .iter()
            .flatten()
            .find(|(r, _)| m <= *r)
            .map(|&(r, k)| (k, r))
            .unwrap_or((self.ukr, self.mr))
    }
}

thread_local! {
    static APACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's buffer for a packed block of `B` (reused: a fresh one per call costs page faults).
    static BPACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Whether [`sgemm`] splits an `m × k × n` product over `threads` threads (below this size the threads cost
/// more than they give). Callers that run many small GEMMs in parallel run only those this says are serial.
pub fn runs_parallel(threads: usize, m: usize, n: usize, k: usize) -> bool {
    // a product of a few rows is bound by reading B: worth both threads' bandwidth from 256 Ki elements of B
    threads > 1 && ((m * n * k) as f64 > 2e6 || (m <= 4 && n * k >= 1 << 18))
}

/// Columns of `C` per outer block: `NC = NR · 64`.
fn nc_max(nr: usize) -> usize {
    nr * 64
}

/// A whole `B [k, n]` packed once (a weight): every `KC × NC` block as [`sgemm`] packs it, in the order it reads
/// them (column blocks outer, depth blocks inner).
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    pub nr: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs `b` (`[k, n]`, any dtype and strides) for micro-kernels `nr` wide, on `pool`.
    ///
    /// # Safety
    /// `b` must be valid for `[k, n]` with its strides.
    pub unsafe fn pack(pool: &rayon::ThreadPool, b: &Mat, k: usize, n: usize, nr: usize) -> PackedB {
        let ncm = nc_max(nr);
        let mut data = vec![0f32; n.div_ceil(nr) * nr * k];
        let mut blocks: Vec<(usize, usize, usize)> = Vec::new(); // (offset, jc, pc)
        for jc in (0..n).step_by(ncm) {
            for pc in (0..k).step_by(KC) {
                blocks.push((Self::offset(k, n, nr, jc, pc), jc, pc));
            }
        }
        let dp = SendPtr(data.as_mut_ptr() as *mut u8);
        let bm = *b;
        pool.install(|| {
            blocks.par_iter().for_each(|&(off, jc, pc)| {
                let dp = &dp;
                let nc = ncm.min(n - jc);
                let kc = KC.min(k - pc);
                for p in 0..nc.div_ceil(nr) {
                    let j0 = jc + p * nr;
                    let dst = std::slice::from_raw_parts_mut((dp.0 as *mut f32).add(off + p * kc * nr), kc * nr);
                    pack_b_panel(dst, &bm, pc, kc, j0, nr.min(n - j0), nr);
                }
            })
        });
        PackedB { k, n, nr, data }
    }

    /// Where block `(jc, pc)` starts.
    fn offset(k: usize, n: usize, nr: usize, jc: usize, pc: usize) -> usize {
        let ncm = nc_max(nr);
        let npanels = ncm.min(n - jc).div_ceil(nr);
        jc * k + pc * npanels * nr
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// The `B` operand of [`sgemm`]: a matrix packed per call, or a weight packed once.
#[derive(Clone, Copy)]
pub enum BOperand<'a> {
    Mat(Mat),
    Packed(&'a PackedB),
}

/// Packs rows `i0..i0+mc`, columns `p0..p0+kc` of `a` into `MR`-tall panels (zero-padded).
unsafe fn pack_a(out: &mut [f32], a: &Mat, i0: usize, mc: usize, p0: usize, kc: usize, mr: usize) {
    let panels = mc.div_ceil(mr);
    assert!(out.len() >= panels * kc * mr, "the A pack buffer is too small");
    for q in 0..panels {
        let dst = out.as_mut_ptr().add(q * kc * mr);
        let rows = mr.min(mc - q * mr);
        let r0 = (i0 + q * mr) as isize;
        if a.dtype == DType::F32 && a.cs == 1 && rows == mr {
            // the common case: whole panels of f32 rows, written in order
            match mr {
                12 => pack_a_rows::<12>(dst, a, r0, p0, kc),
                6 => pack_a_rows::<6>(dst, a, r0, p0, kc),
                4 => pack_a_rows::<4>(dst, a, r0, p0, kc),
                1 => pack_a_rows::<1>(dst, a, r0, p0, kc),
                _ => pack_a_any(dst, a, r0, rows, p0, kc, mr),
            }
        } else if a.dtype == DType::F32 && a.rs == 1 {
            // A stored transposed (column-major): each k's MR values are contiguous
            let base = a.ptr as *const f32;
            for kk in 0..kc {
                let src = base.offset((p0 + kk) as isize * a.cs + r0);
                let o = dst.add(kk * mr);
                std::ptr::copy_nonoverlapping(src, o, rows);
                std::ptr::write_bytes(o.add(rows), 0, mr - rows);
            }
        } else {
            pack_a_any(dst, a, r0, rows, p0, kc, mr);
        }
    }
}

/// One whole `MR`-tall panel of f32 rows with unit column stride: for each `k` the `MR` values side by side.
#[inline(always)]
unsafe fn pack_a_rows<const MR: usize>(dst: *mut f32, a: &Mat, r0: isize, p0: usize, kc: usize) {
    let base = a.ptr as *const f32;
    let mut src = [std::ptr::null::<f32>(); MR];
    for (i, p) in src.iter_mut().enumerate() {
        *p = base.offset((r0 + i as isize) * a.rs + p0 as isize);
    }
    for kk in 0..kc {
        let o = dst.add(kk * MR);
        for (i, p) in src.iter().enumerate() {
            *o.add(i) = *p.add(kk);
        }
    }
}

/// Any panel: any dtype and strides, rows past the matrix zero.
unsafe fn pack_a_any(dst: *mut f32, a: &Mat, r0: isize, rows: usize, p0: usize, kc: usize, mr: usize) {
    for kk in 0..kc {
        let o = dst.add(kk * mr);
        for i in 0..mr {
            *o.add(i) = if i < rows {
                read(a, r0 + i as isize, (p0 + kk) as isize)
            } else {
                0.0
            };
        }
    }
}

/// Packs rows `p0..p0+kc`, columns of panel `p` (from `j0`) of `b` into one `NR`-wide panel (zero-padded).
unsafe fn pack_b_panel(dst: &mut [f32], b: &Mat, p0: usize, kc: usize, j0: usize, cols: usize, nr: usize) {
    assert!(dst.len() >= kc * nr, "the B pack buffer is too small");
    let d = dst.as_mut_ptr();
    if b.dtype == DType::F32 && b.cs == 1 {
        for kk in 0..kc {
            let src = (b.ptr as *const f32).offset((p0 + kk) as isize * b.rs + j0 as isize);
            let row = d.add(kk * nr);
            std::ptr::copy_nonoverlapping(src, row, cols);
            std::ptr::write_bytes(row.add(cols), 0, nr - cols);
        }
    } else {
        for kk in 0..kc {
            let row = d.add(kk * nr);
            let r = (p0 + kk) as isize;
            for j in 0..nr {
                *row.add(j) = if j < cols { read(b, r, (j0 + j) as isize) } else { 0.0 };
            }
        }
    }
}

/// `C = A · B` with `A [m, k]`, `B [k, n]`, `C [m, n]` row-major f32 (leading dimension `ldc`).
///
/// # Safety
/// The pointers must be valid for the shapes and strides given, and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    pool: &rayon::ThreadPool,
    kern: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: BOperand,
    c: *mut f32,
    ldc: usize,
) {
    if let BOperand::Packed(p) = b {
        assert!(p.k == k && p.n == n && p.nr == kern.nr, "a packed B of another shape");
    }
    if m == 0 || n == 0 {
        return;
    }
    let cp = SendPtr(c as *mut u8);
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(c.add(i * ldc), 0, n);
        }
        return;
    }
    let (ukr, mr) = kern.for_rows(m);
    let nr = kern.nr;
    let threads = pool.current_num_threads().max(1);
    let parallel = runs_parallel(threads, m, n, k);
    // row blocks: whole MR panels, at most 16 per block, as many blocks as a multiple of the threads, the
    // panels dealt evenly (blocks of 1024 rows cut 192-sized left one thread 576 rows and the other 448)
    let mc_max = mr * 16;
    let row_panels = m.div_ceil(mr);
    let mblocks = if parallel {
        threads * row_panels.div_ceil(threads * 16)
    } else {
        row_panels.div_ceil(16)
    }
    .clamp(1, row_panels);
    // rows of block `mb`: [start, end)
    let block_rows = move |mb: usize| {
        let (p0, p1) = (row_panels * mb / mblocks, row_panels * (mb + 1) / mblocks);
        (p0 * mr, (p1 * mr).min(m))
    };
    debug_assert!((0..mblocks).all(|b| block_rows(b).1 - block_rows(b).0 <= mc_max));
    let nc_max = nc_max(nr);
    // the pack buffer is taken out of its cell for the call (a GEMM started on this thread while this one
    // waits for its tasks gets a buffer of its own instead of a second borrow)
    let mut bpack = BPACK.with(|b| std::mem::take(&mut *b.borrow_mut()));
    {
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            let npanels = nc.div_ceil(nr);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let first = pc == 0;
                let bptr = match b {
                    BOperand::Packed(p) => p.data.as_ptr().add(PackedB::offset(k, n, nr, jc, pc)),
                    BOperand::Mat(b) => {
                        bpack.resize(npanels * kc * nr, 0.0);
                        let buf: &mut [f32] = &mut bpack[..npanels * kc * nr];
                        let chunk = kc * nr;
                        let fill = |(p, dst): (usize, &mut [f32])| {
                            let j0 = jc + p * nr;
                            let cols = nr.min(n - j0);
                            pack_b_panel(dst, &b, pc, kc, j0, cols, nr);
                        };
                        if parallel && npanels > 1 {
                            pool.install(|| buf.par_chunks_mut(chunk).enumerate().for_each(fill));
                        } else {
                            buf.chunks_mut(chunk).enumerate().for_each(fill);
                        }
                        bpack.as_ptr()
                    }
                };
                // split the panels too when there are fewer row blocks than threads (splitting more packs A
                // once per split: measured slower, see docs/perf.md)
                let nsplit = if parallel && mblocks < threads {
                    threads.div_ceil(mblocks).min(npanels)
                } else {
                    1
                };
                let bp = SendPtr(bptr as *mut u8);
                let task = |t: usize| {
                    let (cp, bp) = (&cp, &bp);
                    let (mb, ns) = (t / nsplit, t % nsplit);
                    let (i0, i1) = block_rows(mb);
                    let mcb = i1 - i0;
                    if mcb == 0 {
                        return;
                    }
                    let (p_lo, p_hi) = (npanels * ns / nsplit, npanels * (ns + 1) / nsplit);
                    if p_lo == p_hi {
                        return;
                    }
                    APACK.with(|ap| {
                        let mut ap = ap.borrow_mut();
                        let panels_a = mcb.div_ceil(mr);
                        ap.resize(panels_a * kc * mr, 0.0);
                        pack_a(&mut ap, &a, i0, mcb, pc, kc, mr);
                        let bpk = bp.0 as *const f32;
                        let mut tile = [0f32; 16 * 64];
                        for p in p_lo..p_hi {
                            let j0 = jc + p * nr;
                            let cols = nr.min(n - j0);
                            let bpanel = bpk.add(p * kc * nr);
                            for q in 0..panels_a {
                                let r0 = i0 + q * mr;
                                let rows = mr.min(m - r0);
                                let apanel = ap.as_ptr().add(q * kc * mr);
                                let cptr = (cp.0 as *mut f32).add(r0 * ldc + j0);
                                if rows == mr && cols == nr {
                                    (ukr)(kc as i64, apanel, bpanel, cptr, ldc as i64, i64::from(!first));
                                } else {
                                    (ukr)(kc as i64, apanel, bpanel, tile.as_mut_ptr(), nr as i64, 0);
                                    for i in 0..rows {
                                        let dst = cptr.add(i * ldc);
                                        for j in 0..cols {
                                            let v = tile[i * nr + j];
                                            if first {
                                                *dst.add(j) = v;
                                            } else {
                                                *dst.add(j) += v;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    });
                };
                let ntasks = mblocks * nsplit;
                if parallel && ntasks > 1 {
                    pool.install(|| (0..ntasks).into_par_iter().for_each(task));
                } else {
                    (0..ntasks).for_each(task);
                }
            }
        }
    }
    BPACK.with(|b| *b.borrow_mut() = bpack);
}

/// `C = A · B` into a `C` of any dtype and strides: straight into it when it is row-major f32, else through
/// an f32 buffer.
///
/// # Safety
/// As [`sgemm`]; `c` is a strided matrix of `c_dtype`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    pool: &rayon::ThreadPool,
    kern: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: BOperand,
    c: *mut u8,
    c_dtype: DType,
    c_rs: isize,
    c_cs: isize,
) {
    if c_dtype == DType::F32 && c_cs == 1 && c_rs >= n as isize {
        return sgemm(pool, kern, m, n, k, a, b, c as *mut f32, c_rs as usize);
    }
    let mut tmp = vec![0f32; m * n];
    sgemm(pool, kern, m, n, k, a, b, tmp.as_mut_ptr(), n);
    for i in 0..m {
        for j in 0..n {
            let v = tmp[i * n + j];
            let at = i as isize * c_rs + j as isize * c_cs;
            match c_dtype {
                DType::F32 => *(c as *mut f32).offset(at) = v,
                DType::BF16 => *(c as *mut u16).offset(at) = bf16::from_f32(v).to_bits(),
                DType::F16 => *(c as *mut u16).offset(at) = f16::from_f32(v).to_bits(),
                _ => {}
            }
        }
    }
}

//! CUDA C++ emission: the loop IR of every kernel code as CUDA C++ source for NVRTC.
//!
//! One translation unit per kernel code (`kernels/codeN.cu` in an artifact). Each code becomes a list of
//! [`Launch`]es, in the order of its loop kernel's steps:
//! - a **phase** is a `__global__` function over its grid of independent items, one thread per item with a
//!   grid-stride loop (the items of a phase are independent by the loop IR's contract). Its body is the phase's
//!   statements, printed as C: every expression a `const` temporary declared where its statement needs it
//!   (shared sub-expressions once, as in the LLVM emitter), a guarded load (`Expr::Cond`) as an `if`, a checked
//!   index recording its failure in the kernel's error word. Thread-local arrays larger than
//!   [`SPILL_BYTES`] live in a spill area of global memory interleaved by thread (coalesced), so that a large
//!   accumulator row does not make the driver reserve its size for every resident thread;
//! - a **GEMM** or **grouped GEMM** step is a library launch (cuBLAS, by the runtime);
//! - `flash_attention[_rope]` is a **template**: blocks of 64 query rows sharing key/value tiles in shared
//!   memory, the online softmax a tile at a time, grouped KV heads by broadcasting and the rotary embedding
//!   applied to `q` and `k` as they load, instead of the loop form's per-thread query blocks; `moe_combine`
//!   is one too (a block per token, its threads along the channels, where the loop form's thread per token
//!   reads a row each, uncoalesced).
//!
//! Sources are deterministic: the same kernel program gives the same bytes (the NVRTC cache key hashes them).
//! Each file's header names its code's op and the IR nodes whose kernels run it.
//!
//! Arithmetic follows the numerics contract (`docs/numerics.md`): f32 compute, loads convert from the storage
//! dtype, stores round to it (bf16 to nearest even), IEEE division and square root (no fast math), `max`/`min`
//! propagate NaN, float → int conversions saturate with NaN → 0, as the CPU backend does.

mod flash_mma;

use crate::kernels::View;
use crate::loops::{Acc, Expr, LoopKernel, Phase, Scalar, Slot, Step, Stmt, Table, E};
use crate::program::{Kernel, KernelProgram};
use crate::CodegenError;
use fulgur_ir::{BinaryOp, CmpOp, Composite, DType, Dim, Op, UnaryOp};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;

/// Threads per block of a phase launch.
pub const BLOCK: u32 = 128;
/// Thread-local arrays of more bytes than this go to the spill area.
pub const SPILL_BYTES: usize = 512;
/// Warps per block of the flash-attention template (each takes `FLASH_BQ / FLASH_WARPS` query rows).
pub const FLASH_WARPS: u32 = 4;

/// One launch of a kernel code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Launch {
    /// `function` over `grid` items (an expression of the loop kernel), `spill` bytes of spilled local arrays
    /// per thread.
    Phase { function: String, grid: E, spill: usize },
    /// Step `step` of the loop kernel, a GEMM or grouped GEMM, run by the runtime's BLAS.
    Library { step: usize },
    /// `function` over `items` items, `per_block` of them in each block of `threads` threads, with `smem`
    /// bytes of dynamic shared memory.
    Template {
        function: String,
        items: E,
        per_block: u32,
        threads: u32,
        #[serde(default)]
        smem: u32,
    },
}

/// The CUDA form of one kernel code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CudaKernel {
    pub code: usize,
    /// The file name in an artifact (`codeN.cu`).
    pub file: String,
    pub source: String,
    pub launches: Vec<Launch>,
    /// For each grouped-GEMM step: a device function computing it with the group sizes read on the device
    /// (what a CUDA graph captures, since the cuBLAS path reads them back to the host), over `items` outputs.
    pub device_grouped: Vec<(usize, String, E)>,
}

/// The name of phase or template function `s` of code `code`.
pub fn function_name(code: usize, step: usize) -> String {
    format!("fulgur_code{code}_step{step}")
}

/// The CUDA form of every code of `p`. `kernels` are the loop kernels by code ([`crate::kernels::build_program`]);
/// a template may add parameters to its code's loop kernel, which the runtime then evaluates like the others.
pub fn emit_program(p: &KernelProgram, kernels: &mut [LoopKernel]) -> Result<Vec<CudaKernel>, CodegenError> {
    let mut users: Vec<Vec<String>> = vec![Vec::new(); kernels.len()];
    let mut first: Vec<Option<&Kernel>> = vec![None; kernels.len()];
    for k in p.prepare.iter().chain(&p.step) {
        if let Some(u) = users.get_mut(k.code) {
            u.push(format!("k{} {}", k.id, k.name));
            first[k.code].get_or_insert(k);
        }
    }
    let mut out = Vec::with_capacity(kernels.len());
    for (c, lk) in kernels.iter_mut().enumerate() {
        out.push(emit(c, lk, first[c], &users[c]).map_err(|e| match e {
            CodegenError::Options(m) => CodegenError::Options(format!("CUDA code {c} ({}): {m}", lk.name)),
            e => e,
        })?);
    }
    Ok(out)
}

/// Whether `lightning_attention` may take its tensor-core template (`FULGUR_LIGHTNING_MMA=0` keeps the staged
/// block form, for measuring and as a fallback).
fn lightning_mma() -> bool {
    std::env::var("FULGUR_LIGHTNING_MMA").map_or(true, |v| v != "0")
}

/// The CUDA form of code `code`, whose kernels (for the header) are `users`; `kernel` is one of them (the
/// templates read its views).
pub fn emit(
    code: usize,
    lk: &mut LoopKernel,
    kernel: Option<&Kernel>,
    users: &[String],
) -> Result<CudaKernel, CodegenError> {
    let mut bodies: Vec<String> = Vec::new();
    let mut launches = Vec::new();
    let mut device_grouped = Vec::new();
    // templates first: they may add parameters, which every function's signature lists
    let flash = match kernel.map(|k| &k.op) {
        Some(Op::Composite(Composite::FlashAttention { scale, causal })) => Some((*scale, *causal, None)),
        Some(Op::Composite(Composite::FlashAttentionRope { scale, causal, rotary })) => {
            Some((*scale, *causal, Some(*rotary)))
        }
        _ => None,
    };
    let flash_text = match (flash, kernel) {
        (Some((scale, causal, rotary)), Some(k)) if lk.steps.len() == 1 => {
            flash_template(lk, k, scale, causal, rotary)?
        }
        (None, Some(k)) if lk.steps.len() == 1 && matches!(k.op, Op::Composite(Composite::MoeCombine)) => {
            combine_template(lk, k)
        }
        (None, Some(k)) => match k.op {
            Op::Composite(Composite::RmsNorm { eps }) => rms_norm_template(lk, k, eps),
            _ => None,
        },
        _ => None,
    };
    // `flash_attention_grad`'s tensor-core form replaces its loop form's steps, their slots and scratch
    let templates = match kernel {
        Some(k) => match k.op {
            Op::Composite(Composite::FlashAttentionGrad { scale, causal }) if flash_mma::grad_applies(k) => {
                lk.steps.clear();
                lk.scratch.clear();
                lk.slots.clear();
                Some(flash_mma::grad_templates(lk, k, scale, causal))
            }
            // `lightning_attention`'s tensor-core form likewise replaces its staged block form
            Op::Composite(Composite::LightningAttention { block })
                if lightning_mma() && flash_mma::lightning_applies(k, block) =>
            {
                lk.steps.clear();
                lk.scratch.clear();
                lk.slots.clear();
                Some(flash_mma::lightning_templates(lk, k))
            }
            _ => None,
        },
        None => None,
    };
    if let Some(ts) = templates {
        for (i, (text, items, smem)) in ts.into_iter().enumerate() {
            let f = function_name(code, i);
            bodies.push(text.replace("FULGUR_FN", &f));
            launches.push(Launch::Template {
                function: f,
                items,
                per_block: 1,
                threads: FLASH_WARPS * 32,
                smem,
            });
        }
    } else if let Some((text, items, smem)) = flash_text {
        let f = function_name(code, 0);
        bodies.push(text.replace("FULGUR_FN", &f));
        launches.push(Launch::Template {
            function: f,
            items,
            per_block: 1,
            threads: if flash.is_some() { FLASH_WARPS * 32 } else { BLOCK },
            smem,
        });
    } else {
        // phases that are one loop of independent stores run a thread per (item, iteration), unless the
        // item's own index arithmetic divides by a run-time size (`flat_by_rows`): then a warp per item
        let by_rows: Vec<bool> = (0..lk.steps.len())
            .map(|s| match &lk.steps[s] {
                Step::Phase(p) => flat_loop(lk, p).is_some_and(|f| flat_by_rows(lk, &f)),
                _ => false,
            })
            .collect();
        let trips: Vec<Option<(E, E)>> = (0..lk.steps.len())
            .map(|s| match &lk.steps[s] {
                Step::Phase(p) if !by_rows[s] => flat_loop(lk, p).map(|f| (f.n, p.grid)),
                _ => None,
            })
            .collect();
        let mut totals: Vec<Option<E>> = trips
            .into_iter()
            .map(|x| x.map(|(n, grid)| lk.pool.mul(grid, n)))
            .collect();
        // phases run by a warp per item: 32 threads an item
        let warps: Vec<bool> = (0..lk.steps.len())
            .map(|s| match &lk.steps[s] {
                Step::Phase(p) => totals[s].is_none() && (by_rows[s] || warp_phase(lk, p)),
                _ => false,
            })
            .collect();
        for s in 0..lk.steps.len() {
            if let (true, Step::Phase(p)) = (warps[s], &lk.steps[s]) {
                let grid = p.grid;
                let lanes = lk.pool.i(32);
                totals[s] = Some(lk.pool.mul(grid, lanes));
            }
        }
        for (s, step) in lk.steps.iter().enumerate() {
            match step {
                Step::Phase(p) => {
                    let f = function_name(code, s);
                    let mut em = PhaseEmitter::new(lk, p);
                    em.flat = flat_loop(lk, p).filter(|_| !by_rows[s]);
                    em.warp = warps[s];
                    let (text, spill) = em.emit(&f)?;
                    bodies.push(text);
                    launches.push(Launch::Phase {
                        function: f,
                        grid: totals[s].unwrap_or(p.grid),
                        spill,
                    });
                }
                Step::Gemm(_) => launches.push(Launch::Library { step: s }),
                Step::GroupedGemm(_) => launches.push(Launch::Library { step: s }),
                // run on the host by the program's transport, between launches
                Step::Collective(_) => launches.push(Launch::Library { step: s }),
            }
        }
        for s in 0..lk.steps.len() {
            if let Step::GroupedGemm(g) = lk.steps[s].clone() {
                let f = format!("{}_grouped", function_name(code, s));
                let (text, items) = if g.depth {
                    grouped_depth_template(lk, &g, &f)
                } else {
                    grouped_template(lk, &g, &f)
                };
                bodies.push(text);
                device_grouped.push((s, f, items));
            }
        }
    }
    let mut src = String::new();
    let _ = writeln!(src, "// Fulgur kernel code {code}: {}", lk.name.replace('\n', " "));
    let _ = writeln!(src, "// IR nodes run by this code ({}):", users.len());
    for u in users {
        let _ = writeln!(src, "//   {}", u.replace('\n', " "));
    }
    let _ = writeln!(src, "// launches:");
    for l in &launches {
        let _ = match l {
            Launch::Phase { function, grid, spill } => writeln!(
                src,
                "//   {function}: phase over {} items{}",
                lk.expr(*grid),
                if *spill > 0 {
                    format!(", {spill} spilled bytes per thread")
                } else {
                    String::new()
                }
            ),
            Launch::Library { step } => writeln!(
                src,
                "//   step {step}: {}",
                match lk.steps[*step] {
                    Step::GroupedGemm(_) => "grouped GEMM (cuBLAS)",
                    Step::Collective(_) => "collective (the program's transport, on the host)",
                    _ => "GEMM (cuBLAS)",
                }
            ),
            Launch::Template {
                function, items, smem, ..
            } => writeln!(
                src,
                "//   {function}: template over {} blocks, {smem} bytes of shared memory",
                lk.expr(*items)
            ),
        };
    }
    src.push_str(PRELUDE);
    for (i, t) in lk.tables.iter().enumerate() {
        match t {
            Table::F32(v) => {
                let _ = write!(
                    src,
                    "__device__ const unsigned int fulgur_t{i}[{}] = {{",
                    v.len().max(1)
                );
                for (j, x) in v.iter().enumerate() {
                    let _ = write!(src, "{}0x{:08x}u", if j % 8 == 0 { "\n  " } else { " " }, x.to_bits());
                    src.push(',');
                }
                if v.is_empty() {
                    src.push('0');
                }
                src.push_str("\n};\n");
            }
            Table::I64(v) => {
                let _ = write!(src, "__device__ const long long fulgur_t{i}[{}] = {{", v.len().max(1));
                for (j, x) in v.iter().enumerate() {
                    let _ = write!(src, "{}{},", if j % 8 == 0 { "\n  " } else { " " }, int_lit(*x));
                }
                if v.is_empty() {
                    src.push('0');
                }
                src.push_str("\n};\n");
            }
        }
    }
    let sig = signature(lk, restrict_slots(kernel));
    for b in bodies {
        src.push('\n');
        src.push_str(&b.replace("FULGUR_SIGNATURE", &sig));
    }
    Ok(CudaKernel {
        code,
        file: format!("code{code}.cu"),
        source: src,
        launches,
        device_grouped,
    })
}

/// Whether a code's slots are declared `__restrict__`, so the compiler may keep a thread's loads ahead of its
/// earlier stores and read through the read-only cache: what a launch writes through a slot it reads back, if
/// at all, through the same slot. The one exception is an update in place (`reads_in_place`), whose input and
/// output slots view one buffer; there every element is read once, by the thread that then writes it, so no
/// load can see a store it was moved across (`no_kernel_of_a_training_step_reads_what_it_writes_but_in_place`
/// in `src/cli/train.rs` checks this on the training steps). The templates' scratch slots are their own
/// buffers. On by default (the GPU tests pass with it, `docs/perf.md`); `FULGUR_RESTRICT=0` turns it off. A
/// scatter keeps plain slots: its read-modify-write through data-dependent places measured slower with them
/// (the embedding's gradient, 1.13 → 1.68 ms on the H200).
fn restrict_slots(kernel: Option<&Kernel>) -> bool {
    if std::env::var("FULGUR_RESTRICT").is_ok_and(|v| v == "0") {
        return false;
    }
    fn scatters(op: &Op) -> bool {
        match op {
            Op::ScatterAdd { .. } => true,
            Op::Composite(Composite::Fused { body }) => body.graph().nodes().any(|(_, n)| scatters(&n.op)),
            _ => false,
        }
    }
    !kernel.is_some_and(|k| scatters(&k.op))
}

/// The parameters every function of a code takes, in the order the runtime passes them: the slots (declared
/// `__restrict__` where `restrict`, [`restrict_slots`]), the kernel parameters, the item count, the error
/// word, the spill area and the number of threads launched.
fn signature(lk: &LoopKernel, restrict: bool) -> String {
    let restrict = if restrict { " __restrict__" } else { "" };
    let mut args: Vec<String> = (0..lk.slots.len()).map(|i| format!("char*{restrict} s{i}")).collect();
    args.extend((0..lk.params.len()).map(|i| format!("const long long p{i}")));
    args.push("const long long fulgur_grid".into());
    args.push("long long* fulgur_err".into());
    args.push("char* fulgur_spill".into());
    args.push("const long long fulgur_threads".into());
    args.join(", ")
}

/// What every source begins with: storage conversions and the semantics of the loop IR's operations.
const PRELUDE: &str = r#"
typedef long long i64;
// bf16 and f16 storage (round to nearest even; a NaN stays a quiet NaN)
__device__ __forceinline__ float fulgur_from_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short fulgur_to_bf16(float x) {
  unsigned int b = __float_as_uint(x);
  if (x != x) return (unsigned short)((b >> 16) | 0x40u);
  return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float fulgur_from_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short fulgur_to_f16(float x) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x)); return h; }
// max and min propagate NaN
__device__ __forceinline__ float fulgur_fmax(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }
__device__ __forceinline__ float fulgur_fmin(float a, float b) { return (a != a || b != b) ? a + b : fminf(a, b); }
__device__ __forceinline__ i64 fulgur_imax(i64 a, i64 b) { return a > b ? a : b; }
__device__ __forceinline__ i64 fulgur_imin(i64 a, i64 b) { return a < b ? a : b; }
// float -> int saturates, NaN -> 0
__device__ __forceinline__ i64 fulgur_f2i(float x) {
  if (x != x) return 0;
  if (x >= 9.22337204e18f) return 9223372036854775807LL;
  if (x <= -9.22337204e18f) return -9223372036854775807LL - 1;
  return (i64)x;
}
__device__ __forceinline__ float fulgur_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float fulgur_silu(float x) { return x / (1.0f + expf(-x)); }
// the first failed check of a launch: its number (from 1) and the offending value
__device__ __noinline__ void fulgur_fail(i64* err, i64 check, i64 value) {
  if (atomicCAS((unsigned long long*)err, 0ull, (unsigned long long)check) == 0ull) err[1] = value;
}
"#;

fn int_lit(x: i64) -> String {
    if x == i64::MIN {
        "(-9223372036854775807LL - 1)".into()
    } else {
        format!("{x}LL")
    }
}

fn float_lit(bits: u32) -> String {
    let f = f32::from_bits(bits);
    if f.is_finite() {
        let s = format!("{f:?}");
        let s = if s.contains('.') || s.contains('e') || s.contains("inf") {
            s
        } else {
            format!("{s}.0")
        };
        format!("{s}f")
    } else {
        format!("__uint_as_float(0x{bits:08x}u)")
    }
}

fn ctype(s: Scalar) -> &'static str {
    match s {
        Scalar::F32 => "float",
        Scalar::I64 => "i64",
        Scalar::Bool => "bool",
    }
}

fn local_bytes(s: Scalar) -> usize {
    match s {
        Scalar::F32 => 4,
        Scalar::I64 => 8,
        Scalar::Bool => 1,
    }
}

/// The element of storage dtype `dtype` at index `i` of slot `s`, in its compute type.
fn load_text(slot: u32, dtype: DType, i: &str) -> String {
    match dtype {
        DType::F32 => format!("((const float*)s{slot})[{i}]"),
        DType::BF16 => format!("fulgur_from_bf16(((const unsigned short*)s{slot})[{i}])"),
        DType::F16 => format!("fulgur_from_f16(((const unsigned short*)s{slot})[{i}])"),
        DType::I32 => format!("(i64)((const int*)s{slot})[{i}]"),
        DType::I64 => format!("((const i64*)s{slot})[{i}]"),
        DType::Bool => format!("(((const unsigned char*)s{slot})[{i}] != 0)"),
    }
}

fn store_text(slot: u32, dtype: DType, i: &str, v: &str) -> String {
    match dtype {
        DType::F32 => format!("((float*)s{slot})[{i}] = {v};"),
        DType::BF16 => format!("((unsigned short*)s{slot})[{i}] = fulgur_to_bf16({v});"),
        DType::F16 => format!("((unsigned short*)s{slot})[{i}] = fulgur_to_f16({v});"),
        DType::I32 => format!("((int*)s{slot})[{i}] = (int){v};"),
        DType::I64 => format!("((i64*)s{slot})[{i}] = {v};"),
        DType::Bool => format!("((unsigned char*)s{slot})[{i}] = (unsigned char)({v});"),
    }
}

/// Prints one phase as a `__global__` function.
struct PhaseEmitter<'a> {
    lk: &'a LoopKernel,
    phase: &'a Phase,
    out: String,
    depth: usize,
    /// Per C block: the temporaries declared, with the statement they belong to (`None`: valid for the
    /// block, the expression reads nothing a statement changes).
    scopes: Vec<HashMap<E, (String, Option<u64>)>>,
    unstable: Vec<bool>,
    statement: u64,
    temps: usize,
    /// Spilled local arrays: their byte offset in a thread's part of the spill area.
    spilled: HashMap<u32, usize>,
    /// A phase that is one loop of independent stores ([`flat_loop`]): the launch then has a thread per
    /// (item, iteration), consecutive threads on consecutive iterations.
    flat: Option<Flat<'a>>,
    /// A phase run by a warp per item ([`warp_phase`]).
    warp: bool,
    /// Row loops of a warp phase entered and not left.
    rows: usize,
}

impl<'a> PhaseEmitter<'a> {
    fn new(lk: &'a LoopKernel, phase: &'a Phase) -> Self {
        let mut stored = std::collections::HashSet::new();
        collect_stores(&phase.body, &mut stored);
        let n = lk.pool.len();
        let mut unstable = vec![false; n];
        for e in 0..n {
            unstable[e] = match lk.pool.get(e as E) {
                Expr::Get(_) | Expr::LoadLocal { .. } => true,
                Expr::Load { arg, index, .. } => stored.contains(arg) || unstable[*index as usize],
                x => children(x).iter().any(|&c| unstable[c as usize]),
            };
        }
        PhaseEmitter {
            lk,
            phase,
            out: String::new(),
            depth: 1,
            scopes: vec![HashMap::new()],
            unstable,
            statement: 0,
            temps: 0,
            spilled: HashMap::new(),
            flat: None,
            warp: false,
            rows: 0,
        }
    }

    fn line(&mut self, s: &str) {
        for _ in 0..self.depth {
            self.out.push_str("  ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn emit(mut self, name: &str) -> Result<(String, usize), CodegenError> {
        let mut vars = std::collections::BTreeSet::new();
        let mut locals = std::collections::BTreeSet::new();
        collect_state(&self.phase.body, &self.lk.pool, &mut vars, &mut locals);
        let mut head = String::new();
        let _ = writeln!(head, "// phase `{}`", self.phase.name);
        let _ = writeln!(
            head,
            "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {name}(FULGUR_SIGNATURE) {{"
        );
        let _ = writeln!(
            head,
            "  const i64 fulgur_tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;"
        );
        let mut spill = 0usize;
        for &l in &locals {
            let decl = self.lk.locals[l as usize];
            let bytes = decl.len * local_bytes(decl.ty);
            if bytes > SPILL_BYTES {
                self.spilled.insert(l, spill);
                spill += bytes.div_ceil(8) * 8;
            } else {
                let _ = writeln!(head, "  {} l{l}[{}];", ctype(decl.ty), decl.len);
            }
        }
        for &v in &vars {
            let ty = self.lk.vars[v as usize].ty;
            let zero = match ty {
                Scalar::F32 => "0.0f",
                Scalar::I64 => "0",
                Scalar::Bool => "false",
            };
            let _ = writeln!(head, "  {} m{v} = {zero};", ctype(ty));
        }
        let item = self.phase.item;
        match self.flat.clone() {
            Some(flat) => {
                let n = c_expr(self.lk, flat.n);
                let _ = writeln!(
                    head,
                    "  for (i64 fulgur_t = fulgur_tid; fulgur_t < fulgur_grid; fulgur_t += fulgur_threads) {{"
                );
                let _ = writeln!(
                    head,
                    "    const i64 v{item} = fulgur_t / ({n}), v{} = fulgur_t % ({n});",
                    flat.var
                );
                self.depth = 2;
                // the variables the one-iteration loops bind, in order
                for (v, at) in &flat.binds {
                    self.statement += 1;
                    let x = self.val(*at)?;
                    self.line(&format!("const i64 v{v} = {x};"));
                }
                self.stmts(flat.body)?;
            }
            None if self.warp => {
                // a warp per item: the launch has 32 threads per item, and every warp is whole inside the loop
                let _ = writeln!(
                    head,
                    "  for (i64 fulgur_t = fulgur_tid; fulgur_t < fulgur_grid; fulgur_t += fulgur_threads) {{"
                );
                let _ = writeln!(
                    head,
                    "    const i64 v{item} = fulgur_t >> 5; const int fulgur_lane = (int)(fulgur_t & 31);"
                );
                self.depth = 2;
                self.stmts(&self.phase.body)?;
            }
            None => {
                let _ = writeln!(
                    head,
                    "  for (i64 v{item} = fulgur_tid; v{item} < fulgur_grid; v{item} += fulgur_threads) {{"
                );
                self.depth = 2;
                self.stmts(&self.phase.body)?;
            }
        }
        let mut s = head;
        s.push_str(&self.out);
        s.push_str("  }\n}\n");
        Ok((s, spill))
    }

    fn stmts(&mut self, body: &'a [Stmt]) -> Result<(), CodegenError> {
        let mut i = 0;
        while i < body.len() {
            self.statement += 1;
            // consecutive stores are simultaneous (`Stmt::Store`): their values first, then the stores
            let run = body[i..].iter().take_while(|s| matches!(s, Stmt::Store { .. })).count();
            if run > 1 {
                let mut lines = Vec::with_capacity(run);
                for st in &body[i..i + run] {
                    if let Stmt::Store {
                        arg,
                        dtype,
                        index,
                        value,
                    } = st
                    {
                        let ix = self.val(*index)?;
                        let v = self.val(*value)?;
                        lines.push(store_text(*arg, *dtype, &ix, &v));
                    }
                }
                for l in lines {
                    self.line(&l);
                }
                i += run;
                continue;
            }
            self.stmt(&body[i])?;
            i += 1;
        }
        Ok(())
    }

    fn block(&mut self, body: &'a [Stmt]) -> Result<(), CodegenError> {
        self.depth += 1;
        self.scopes.push(HashMap::new());
        self.stmts(body)?;
        self.scopes.pop();
        self.depth -= 1;
        Ok(())
    }

    fn stmt(&mut self, st: &'a Stmt) -> Result<(), CodegenError> {
        match st {
            Stmt::For { var, lo, hi, body } => {
                let lo = self.val(*lo)?;
                let hi = self.val(*hi)?;
                // the bound is evaluated once, before the loop (a mutable it reads may change inside)
                let hb = format!("e{}", self.temps);
                self.temps += 1;
                self.line(&format!("const i64 {hb} = {hi};"));
                if self.warp && self.rows == 0 {
                    // a row loop: the lanes take every 32nd iteration, from a partial of the identity but
                    // lane 0 (which keeps the value from before the loop), then combine with shuffles
                    let mut acc = Vec::new();
                    accumulated(body, &mut acc);
                    for &(v, op) in &acc {
                        let id = identity(op, self.lk.vars[v as usize].ty);
                        self.line(&format!("if (fulgur_lane != 0) m{v} = {id};"));
                    }
                    if hoist_divisions() {
                        for e in row_invariant_divisions(self.lk, *var, body) {
                            self.val(e)?;
                        }
                    }
                    self.line(&format!(
                        "for (i64 v{var} = {lo} + fulgur_lane; v{var} < {hb}; v{var} += 32) {{"
                    ));
                    self.rows += 1;
                    self.block(body)?;
                    self.rows -= 1;
                    self.line("}");
                    for &(v, op) in &acc {
                        let ty = self.lk.vars[v as usize].ty;
                        let other = format!("__shfl_xor_sync(0xffffffffu, m{v}, fulgur_o)");
                        let combine = combined(op, ty, &format!("m{v}"), &other);
                        self.line(&format!(
                            "for (int fulgur_o = 16; fulgur_o > 0; fulgur_o >>= 1) m{v} = {combine};"
                        ));
                    }
                    // what one lane stored in the loop is read by the others after it
                    self.line("__syncwarp();");
                } else {
                    self.line(&format!("for (i64 v{var} = {lo}; v{var} < {hb}; ++v{var}) {{"));
                    self.block(body)?;
                    self.line("}");
                }
            }
            Stmt::If { cond, then, els } => {
                let c = self.val(*cond)?;
                self.line(&format!("if ({c}) {{"));
                self.block(then)?;
                if els.is_empty() {
                    self.line("}");
                } else {
                    self.line("} else {");
                    self.block(els)?;
                    self.line("}");
                }
            }
            Stmt::Store {
                arg,
                dtype,
                index,
                value,
            } => {
                let i = self.val(*index)?;
                let v = self.val(*value)?;
                let s = store_text(*arg, *dtype, &i, &v);
                self.line(&s);
            }
            Stmt::StoreLocal { local, index, value } => {
                let i = self.val(*index)?;
                let v = self.val(*value)?;
                let at = self.local_at(*local, &i);
                self.line(&format!("{at} = {v};"));
            }
            Stmt::Set { var, value } => {
                let v = self.val(*value)?;
                self.line(&format!("m{var} = {v};"));
            }
            Stmt::Accumulate { var, op, value } => {
                let v = self.val(*value)?;
                let ty = self.lk.vars[*var as usize].ty;
                let s = combined(*op, ty, &format!("m{var}"), &v);
                self.line(&format!("m{var} = {s};"));
            }
        }
        Ok(())
    }

    /// Where element `i` of local array `l` is.
    fn local_at(&self, l: u32, i: &str) -> String {
        match self.spilled.get(&l) {
            Some(off) => {
                let ty = ctype(self.lk.locals[l as usize].ty);
                format!("(({ty}*)(fulgur_spill + {off}LL * fulgur_threads))[({i}) * fulgur_threads + fulgur_tid]")
            }
            None => format!("l{l}[{i}]"),
        }
    }

    fn lookup(&self, e: E) -> Option<String> {
        for scope in self.scopes.iter().rev() {
            if let Some((name, at)) = scope.get(&e) {
                if at.is_none() || *at == Some(self.statement) {
                    return Some(name.clone());
                }
            }
        }
        None
    }

    /// The C text of expression `e` at this point: a literal or a variable, declaring temporaries as needed.
    fn val(&mut self, e: E) -> Result<String, CodegenError> {
        if let Some(s) = self.lookup(e) {
            return Ok(s);
        }
        let p = &self.lk.pool;
        let x = p.get(e).clone();
        let ty = p.ty(e);
        // leaves are written where they are used
        match &x {
            Expr::F(b) => return Ok(float_lit(*b)),
            Expr::I(i) => return Ok(int_lit(*i)),
            Expr::B(b) => return Ok(b.to_string()),
            Expr::Var(v) => return Ok(format!("v{v}")),
            Expr::Param(i) => return Ok(format!("p{i}")),
            Expr::Get(v) => return Ok(format!("m{v}")),
            _ => {}
        }
        let name = format!("e{}", self.temps);
        self.temps += 1;
        let rhs: String = match x {
            Expr::F(_) | Expr::I(_) | Expr::B(_) | Expr::Var(_) | Expr::Param(_) | Expr::Get(_) => unreachable!(),
            Expr::Load { arg, dtype, index } => {
                let i = self.val(index)?;
                load_text(arg, dtype, &i)
            }
            Expr::LoadLocal { local, index } => {
                let i = self.val(index)?;
                self.local_at(local, &i)
            }
            Expr::LoadConst { table, index } => {
                let i = self.val(index)?;
                match self.lk.tables.get(table as usize) {
                    Some(Table::F32(_)) => format!("__uint_as_float(fulgur_t{table}[{i}])"),
                    _ => format!("fulgur_t{table}[{i}]"),
                }
            }
            Expr::Un(op, a) => {
                let a_ty = self.lk.pool.ty(a);
                let a = self.val(a)?;
                if a_ty == Scalar::F32 {
                    match op {
                        UnaryOp::Neg => format!("-({a})"),
                        UnaryOp::Abs => format!("fabsf({a})"),
                        UnaryOp::Exp => format!("expf({a})"),
                        UnaryOp::Log => format!("logf({a})"),
                        UnaryOp::Sqrt => format!("sqrtf({a})"),
                        UnaryOp::Rsqrt => format!("1.0f / sqrtf({a})"),
                        UnaryOp::Recip => format!("1.0f / {a}"),
                        UnaryOp::Sigmoid => format!("fulgur_sigmoid({a})"),
                        UnaryOp::Silu => format!("fulgur_silu({a})"),
                        UnaryOp::Tanh => format!("tanhf({a})"),
                        UnaryOp::Sin => format!("sinf({a})"),
                        UnaryOp::Cos => format!("cosf({a})"),
                    }
                } else {
                    match op {
                        UnaryOp::Neg => format!("-({a})"),
                        UnaryOp::Abs => format!("({a} < 0 ? -({a}) : {a})"),
                        _ => return Err(CodegenError::Options(format!("`{}` on an integer", op.name()))),
                    }
                }
            }
            Expr::Bin(op, a, b) => {
                let a_ty = self.lk.pool.ty(a);
                let a = self.val(a)?;
                let b = self.val(b)?;
                match (op, a_ty) {
                    (BinaryOp::Add, _) => format!("{a} + {b}"),
                    (BinaryOp::Sub, _) => format!("{a} - {b}"),
                    (BinaryOp::Mul, _) => format!("{a} * {b}"),
                    (BinaryOp::Div, _) => format!("{a} / {b}"),
                    (BinaryOp::Max, Scalar::F32) => format!("fulgur_fmax({a}, {b})"),
                    (BinaryOp::Min, Scalar::F32) => format!("fulgur_fmin({a}, {b})"),
                    (BinaryOp::Max, _) => format!("fulgur_imax({a}, {b})"),
                    (BinaryOp::Min, _) => format!("fulgur_imin({a}, {b})"),
                    (BinaryOp::Pow, Scalar::F32) => format!("powf({a}, {b})"),
                    (BinaryOp::Pow, _) => return Err(CodegenError::Options("integer pow".into())),
                }
            }
            Expr::Rem(a, b) => {
                let a = self.val(a)?;
                let b = self.val(b)?;
                format!("{a} % {b}")
            }
            Expr::Cmp(op, a, b) => {
                let a = self.val(a)?;
                let b = self.val(b)?;
                let o = match op {
                    CmpOp::Eq => "==",
                    CmpOp::Ne => "!=",
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                format!("{a} {o} {b}")
            }
            Expr::Logic(l, a, b) => {
                let a = self.val(a)?;
                let b = self.val(b)?;
                format!("{a} {} {b}", if l == crate::loops::Logic::And { "&&" } else { "||" })
            }
            Expr::Not(a) => format!("!{}", self.val(a)?),
            Expr::Select(c, a, b) => {
                let c = self.val(c)?;
                let a = self.val(a)?;
                let b = self.val(b)?;
                format!("{c} ? {a} : {b}")
            }
            Expr::Cond(c, a, b) => {
                // only the branch taken is evaluated
                let c = self.val(c)?;
                self.line(&format!("{} {name};", ctype(ty)));
                self.line(&format!("if ({c}) {{"));
                for (branch, close) in [(a, "} else {"), (b, "}")] {
                    self.depth += 1;
                    self.scopes.push(HashMap::new());
                    let v = self.val(branch)?;
                    self.line(&format!("{name} = {v};"));
                    self.scopes.pop();
                    self.depth -= 1;
                    self.line(close);
                }
                self.remember(e, &name);
                return Ok(name);
            }
            Expr::Cast(to, a) => {
                let from = self.lk.pool.ty(a);
                let a = self.val(a)?;
                match (from, to) {
                    (Scalar::F32, Scalar::I64) => format!("fulgur_f2i({a})"),
                    (Scalar::F32, Scalar::Bool) => format!("{a} != 0.0f"),
                    (Scalar::I64, Scalar::Bool) => format!("{a} != 0"),
                    (_, Scalar::F32) => format!("(float){a}"),
                    (_, Scalar::I64) => format!("(i64){a}"),
                    (Scalar::Bool, Scalar::Bool) => a,
                }
            }
            Expr::Round(d, a) => {
                let a = self.val(a)?;
                match d {
                    DType::BF16 => format!("fulgur_from_bf16(fulgur_to_bf16({a}))"),
                    DType::F16 => format!("fulgur_from_f16(fulgur_to_f16({a}))"),
                    _ => a,
                }
            }
            Expr::Checked { index, bound, check } => {
                let i = self.val(index)?;
                let n = self.val(bound)?;
                self.line(&format!("i64 {name} = {i};"));
                self.line(&format!(
                    "if ((unsigned long long){name} >= (unsigned long long){n}) {{ fulgur_fail(fulgur_err, {}, {name}); {name} = 0; }}",
                    check + 1
                ));
                self.remember(e, &name);
                return Ok(name);
            }
        };
        self.line(&format!("const {} {name} = {rhs};", ctype(ty)));
        self.remember(e, &name);
        Ok(name)
    }

    fn remember(&mut self, e: E, name: &str) {
        let at = self.unstable[e as usize].then_some(self.statement);
        self.scopes
            .last_mut()
            .expect("a scope")
            .insert(e, (name.to_string(), at));
    }
}

/// A phase that is, below loops of one iteration that bind variables (`for b in x..x+1`), one loop
/// `for v in 0..n` (`n` of literals and parameters) of stores alone, each store's place moving with `v`, reading
/// no local or mutable, and reading a slot the phase writes only at the place the same store writes it: its
/// iterations are independent (each item's stores are its own), so a launch may give each (item, iteration)
/// a thread.
#[derive(Clone, Debug)]
struct Flat<'a> {
    binds: Vec<(u32, E)>,
    var: u32,
    n: E,
    body: &'a [Stmt],
}

fn flat_loop<'a>(lk: &LoopKernel, p: &'a Phase) -> Option<Flat<'a>> {
    let mut binds = Vec::new();
    let mut body: &'a [Stmt] = &p.body;
    loop {
        let [Stmt::For {
            var,
            lo,
            hi,
            body: inner,
        }] = body
        else {
            return None;
        };
        let one_iteration = matches!(lk.pool.get(*hi), Expr::Bin(BinaryOp::Add, a, b)
            if a == lo && matches!(lk.pool.get(*b), Expr::I(1)));
        if one_iteration {
            binds.push((*var, *lo));
            body = inner;
            continue;
        }
        if !matches!(lk.pool.get(*lo), Expr::I(0)) || !is_static(lk, *hi) || inner.is_empty() {
            return None;
        }
        // the places each slot is written at
        let mut written: HashMap<u32, Vec<E>> = HashMap::new();
        let mut roots = Vec::new();
        for st in inner.iter() {
            match st {
                // a store whose place does not move with the loop variable keeps the last iteration's value;
                // one whose place is read from memory at a place that moves with it (a scatter) may repeat a
                // place across iterations, whose order then matters: both stay a loop in one thread
                Stmt::Store { arg, index, value, .. }
                    if reads_var(lk, *index, *var) && !loads_at_var(lk, *index, *var) =>
                {
                    written.entry(*arg).or_default().push(*index);
                    roots.extend([*index, *value]);
                }
                _ => return None,
            }
        }
        let mut seen = vec![false; lk.pool.len()];
        while let Some(e) = roots.pop() {
            if std::mem::replace(&mut seen[e as usize], true) {
                continue;
            }
            match lk.pool.get(e) {
                Expr::Get(_) | Expr::LoadLocal { .. } => return None,
                // a written slot read anywhere but at the one place it is written
                Expr::Load { arg, index, .. } if written.contains_key(arg) => {
                    if written[arg].iter().any(|w| w != index) {
                        return None;
                    }
                    roots.push(*index);
                }
                x => roots.extend(children(x)),
            }
        }
        return Some(Flat {
            binds,
            var: *var,
            n: *hi,
            body: inner,
        });
    }
}

/// Whether flat phase `f` runs better as a warp per item, its lanes splitting the row loop: it binds no
/// variable, its loop has a literal length of at least 128, and a place or value it computes divides or takes a
/// remainder by a run-time size (a parameter, not a literal) of something that does not move with the loop
/// variable (the item's own coordinates in a permuted or reshaped view). With a thread per (item, iteration)
/// every thread pays that 64-bit division; with a warp per item each lane pays it once for the row's
/// iterations it takes (the compiler hoists it out of the lane's loop), and consecutive lanes take consecutive
/// iterations, as consecutive threads did. A size left as an unfolded product of literals counts as run-time
/// here: that costs speed, not correctness.
/// (`FULGUR_FLAT_BY_ROWS=0` keeps a thread per element, for measuring.)
fn flat_by_rows(lk: &LoopKernel, f: &Flat) -> bool {
    if std::env::var("FULGUR_FLAT_BY_ROWS").is_ok_and(|v| v == "0")
        || !f.binds.is_empty()
        || !matches!(lk.pool.get(f.n), Expr::I(n) if *n >= 128)
    {
        return false;
    }
    let mut roots = Vec::new();
    for st in f.body {
        if let Stmt::Store { index, value, .. } = st {
            roots.extend([*index, *value]);
        }
    }
    let mut seen = vec![false; lk.pool.len()];
    while let Some(e) = roots.pop() {
        if std::mem::replace(&mut seen[e as usize], true) {
            continue;
        }
        let x = lk.pool.get(e);
        if let Expr::Bin(BinaryOp::Div, a, b) | Expr::Rem(a, b) = x {
            // a size of parameters (an integer division), not a literal
            let run_time = is_static(lk, *b) && !matches!(lk.pool.get(*b), Expr::I(_));
            if run_time && !reads_var(lk, *a, f.var) {
                return true;
            }
        }
        roots.extend(children(x));
    }
    false
}

/// Whether phase `p` runs a warp per item: every loop at its top level (through `if`s) is a *row loop*, not
/// known to be shorter than 64 iterations, whose
/// iterations are independent but for accumulations (`+`, max, min) into mutable variables that the loop
/// itself does not read, that reads memory along its variable with unit stride (a row's contiguous axis) and
/// stores only at places that move with it (and reads back none of them); no local arrays. The lanes then
/// split each row loop's iterations (coalesced reads where a thread per item read 32 rows apart), combine
/// the accumulations with shuffles, and the statements between loops run in every lane on the same values.
fn warp_phase(lk: &LoopKernel, p: &Phase) -> bool {
    let mut vars = std::collections::BTreeSet::new();
    let mut locals = std::collections::BTreeSet::new();
    collect_state(&p.body, &lk.pool, &mut vars, &mut locals);
    if !locals.is_empty() {
        return false;
    }
    fn top(lk: &LoopKernel, body: &[Stmt], rows: &mut usize) -> bool {
        for st in body {
            match st {
                Stmt::For { var, lo, hi, body } => {
                    // a loop known to be short keeps its thread (a warp of lanes would mostly wait)
                    let short = match (lk.pool.get(*lo), lk.pool.get(*hi)) {
                        (Expr::I(a), Expr::I(b)) => b - a < 64,
                        (_, Expr::Bin(BinaryOp::Add, a, b)) if a == lo => {
                            matches!(lk.pool.get(*b), Expr::I(n) if *n < 64)
                        }
                        _ => false,
                    };
                    if short || !row_loop(lk, *var, body) {
                        return false;
                    }
                    *rows += 1;
                }
                Stmt::If { then, els, .. } => {
                    if !top(lk, then, rows) || !top(lk, els, rows) {
                        return false;
                    }
                }
                Stmt::StoreLocal { .. } => return false,
                Stmt::Store { .. } | Stmt::Set { .. } | Stmt::Accumulate { .. } => {}
            }
        }
        true
    }
    let mut rows = 0;
    top(lk, &p.body, &mut rows) && rows > 0
}

/// The variables a body accumulates into, and whether it has no other kind of assignment (see [`warp_phase`]).
fn accumulations(
    lk: &LoopKernel,
    body: &[Stmt],
    acc: &mut Vec<u32>,
    roots: &mut Vec<E>,
    stores: &mut Vec<(u32, E, E)>,
) -> bool {
    for st in body {
        match st {
            Stmt::For { lo, hi, body, .. } => {
                roots.extend([*lo, *hi]);
                if !accumulations(lk, body, acc, roots, stores) {
                    return false;
                }
            }
            Stmt::If { cond, then, els } => {
                roots.push(*cond);
                if !accumulations(lk, then, acc, roots, stores) || !accumulations(lk, els, acc, roots, stores) {
                    return false;
                }
            }
            Stmt::Accumulate { var, value, .. } => {
                if lk.vars[*var as usize].ty == Scalar::Bool {
                    return false;
                }
                if !acc.contains(var) {
                    acc.push(*var);
                }
                roots.push(*value);
            }
            Stmt::Store { arg, index, value, .. } => {
                stores.push((*arg, *index, *value));
                roots.extend([*index, *value]);
            }
            Stmt::Set { .. } | Stmt::StoreLocal { .. } => return false,
        }
    }
    true
}

/// Whether index `e` moves with loop variable `v` with stride one: `v` itself, plus or minus terms free of it.
fn unit_stride(lk: &LoopKernel, e: E, v: u32) -> bool {
    segment(lk, e, v) == Some(i64::MAX)
}

/// Whether consecutive values of `v` read consecutive elements through index `e` in runs of at least 32 (a
/// warp's lanes then read one contiguous span): unit stride, or a row cut into segments of `c ≥ 32`
/// contiguous elements, `f(v / c) + v % c` (a row of heads side by side read through a permuted view, as
/// the norm over a lightning layer's heads reads them).
fn coalesced(lk: &LoopKernel, e: E, v: u32) -> bool {
    segment(lk, e, v).is_some_and(|c| c >= 32)
}

/// The run of [`coalesced`]: `i64::MAX` for unit stride, `c` for `f(v / c) + v % c`.
fn segment(lk: &LoopKernel, e: E, v: u32) -> Option<i64> {
    // every use of `v` in `e` is `v / c`
    fn only_div(lk: &LoopKernel, e: E, v: u32, c: i64) -> bool {
        match lk.pool.get(e) {
            Expr::Var(w) => *w != v,
            Expr::Bin(BinaryOp::Div, x, d) if matches!(lk.pool.get(*x), Expr::Var(w) if *w == v) => {
                matches!(lk.pool.get(*d), Expr::I(k) if *k == c)
            }
            x => children(x).into_iter().all(|ch| only_div(lk, ch, v, c)),
        }
    }
    match lk.pool.get(e) {
        Expr::Var(w) if *w == v => Some(i64::MAX),
        Expr::Rem(x, d) if matches!(lk.pool.get(*x), Expr::Var(w) if *w == v) => match lk.pool.get(*d) {
            Expr::I(c) if *c > 0 => Some(*c),
            _ => None,
        },
        Expr::Bin(BinaryOp::Add, a, b) => match (reads_var(lk, *a, v), reads_var(lk, *b, v)) {
            (true, false) => segment(lk, *a, v),
            (false, true) => segment(lk, *b, v),
            (true, true) => [(*a, *b), (*b, *a)]
                .into_iter()
                .find_map(|(x, y)| segment(lk, x, v).filter(|&c| c != i64::MAX && only_div(lk, y, v, c))),
            (false, false) => None,
        },
        Expr::Bin(BinaryOp::Sub, a, b) if !reads_var(lk, *b, v) => segment(lk, *a, v),
        Expr::Checked { index, bound, .. } if !reads_var(lk, *bound, v) => segment(lk, *index, v),
        _ => None,
    }
}

/// A loop of [`warp_phase`]'s kind over variable `v`.
fn row_loop(lk: &LoopKernel, v: u32, body: &[Stmt]) -> bool {
    let (mut acc, mut roots, mut stores) = (Vec::new(), Vec::new(), Vec::new());
    if !accumulations(lk, body, &mut acc, &mut roots, &mut stores) {
        return false;
    }
    let stored: std::collections::HashSet<u32> = stores.iter().map(|s| s.0).collect();
    for (_, index, _) in &stores {
        if !reads_var(lk, *index, v) || !unit_stride(lk, *index, v) {
            return false;
        }
    }
    let mut along = 0;
    let mut seen = vec![false; lk.pool.len()];
    while let Some(e) = roots.pop() {
        if std::mem::replace(&mut seen[e as usize], true) {
            continue;
        }
        match lk.pool.get(e) {
            Expr::Get(w) if acc.contains(w) => return false,
            Expr::LoadLocal { .. } => return false,
            Expr::Load { arg, index, .. } => {
                if stored.contains(arg) {
                    return false;
                }
                if reads_var(lk, *index, v) {
                    if !coalesced(lk, *index, v) {
                        return false;
                    }
                    along += 1;
                }
                roots.push(*index);
            }
            x => roots.extend(children(x)),
        }
    }
    along > 0
}

/// The value no accumulation of `op` changes, for a variable of type `ty`.
fn identity(op: Acc, ty: Scalar) -> &'static str {
    match (op, ty) {
        (Acc::Add, Scalar::F32) => "0.0f",
        (Acc::Add, _) => "0LL",
        (Acc::Max, Scalar::F32) => "__uint_as_float(0xff800000u)",
        (Acc::Min, Scalar::F32) => "__uint_as_float(0x7f800000u)",
        (Acc::Max, _) => "(-9223372036854775807LL - 1)",
        (Acc::Min, _) => "9223372036854775807LL",
    }
}

/// The C text of `a ⊕ b` for accumulation `op` on values of type `ty`.
fn combined(op: Acc, ty: Scalar, a: &str, b: &str) -> String {
    match (op, ty) {
        (Acc::Add, _) => format!("{a} + {b}"),
        (Acc::Max, Scalar::F32) => format!("fulgur_fmax({a}, {b})"),
        (Acc::Min, Scalar::F32) => format!("fulgur_fmin({a}, {b})"),
        (Acc::Max, _) => format!("fulgur_imax({a}, {b})"),
        (Acc::Min, _) => format!("fulgur_imin({a}, {b})"),
    }
}

/// The accumulations of a body with their operation.
fn accumulated(body: &[Stmt], out: &mut Vec<(u32, Acc)>) {
    for st in body {
        match st {
            Stmt::For { body, .. } => accumulated(body, out),
            Stmt::If { then, els, .. } => {
                accumulated(then, out);
                accumulated(els, out);
            }
            Stmt::Accumulate { var, op, .. } if !out.iter().any(|(v, _)| v == var) => out.push((*var, *op)),
            _ => {}
        }
    }
}

/// Whether `e` reads loop variable `v`.
fn reads_var(lk: &LoopKernel, e: E, v: u32) -> bool {
    let mut seen = vec![false; lk.pool.len()];
    let mut todo = vec![e];
    while let Some(x) = todo.pop() {
        if std::mem::replace(&mut seen[x as usize], true) {
            continue;
        }
        match lk.pool.get(x) {
            Expr::Var(w) if *w == v => return true,
            y => todo.extend(children(y)),
        }
    }
    false
}

/// Whether `e` reads memory at a place that depends on loop variable `v` (its value then changes with `v`
/// in a way only the data knows).
fn loads_at_var(lk: &LoopKernel, e: E, v: u32) -> bool {
    let mut seen = vec![false; lk.pool.len()];
    let mut todo = vec![e];
    while let Some(x) = todo.pop() {
        if std::mem::replace(&mut seen[x as usize], true) {
            continue;
        }
        match lk.pool.get(x) {
            Expr::Load { index, .. } | Expr::LoadLocal { index, .. } if reads_var(lk, *index, v) => return true,
            Expr::Get(_) => return true,
            y => todo.extend(children(y)),
        }
    }
    false
}

/// Whether `e` is built of literals and parameters alone.
fn is_static(lk: &LoopKernel, e: E) -> bool {
    match lk.pool.get(e) {
        Expr::I(_) | Expr::Param(_) => true,
        Expr::Bin(_, a, b) | Expr::Rem(a, b) => is_static(lk, *a) && is_static(lk, *b),
        _ => false,
    }
}

fn children(x: &Expr) -> Vec<E> {
    match x {
        Expr::Load { index, .. } | Expr::LoadLocal { index, .. } | Expr::LoadConst { index, .. } => vec![*index],
        Expr::Un(_, a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Round(_, a) => vec![*a],
        Expr::Bin(_, a, b) | Expr::Rem(a, b) | Expr::Cmp(_, a, b) | Expr::Logic(_, a, b) => vec![*a, *b],
        Expr::Select(c, a, b) | Expr::Cond(c, a, b) => vec![*c, *a, *b],
        Expr::Checked { index, bound, .. } => vec![*index, *bound],
        _ => vec![],
    }
}

/// Whether a warp's row loop computes its invariant integer divisions before it: on by default (measured faster
/// on the GPU, `docs/perf.md`); `FULGUR_HOIST=0` keeps them in the loop (`docs/codegen.md`).
fn hoist_divisions() -> bool {
    !std::env::var("FULGUR_HOIST").is_ok_and(|v| v == "0")
}

/// The integer divisions and remainders in `body` (a row loop over `var`) that read neither a variable the loop
/// binds (its own, a nested loop's) nor memory, nor a mutable, nor a check: the same in every iteration, so the
/// row loop may compute them once before it. Those inside a lazily evaluated arm (`Cond`) are among them: on
/// the GPU an integer division by zero does not trap, and the arm's other reads stay in the arm.
fn row_invariant_divisions(lk: &LoopKernel, var: u32, body: &[Stmt]) -> Vec<E> {
    fn roots(body: &[Stmt], bound: &mut std::collections::HashSet<u32>, out: &mut Vec<E>) {
        for st in body {
            match st {
                Stmt::For { var, lo, hi, body } => {
                    out.extend([*lo, *hi]);
                    bound.insert(*var);
                    roots(body, bound, out);
                }
                Stmt::If { cond, then, els } => {
                    out.push(*cond);
                    roots(then, bound, out);
                    roots(els, bound, out);
                }
                Stmt::Store { index, value, .. } | Stmt::StoreLocal { index, value, .. } => {
                    out.extend([*index, *value])
                }
                Stmt::Set { value, .. } | Stmt::Accumulate { value, .. } => out.push(*value),
            }
        }
    }
    fn invariant(lk: &LoopKernel, e: E, bound: &std::collections::HashSet<u32>, memo: &mut HashMap<E, bool>) -> bool {
        if let Some(&v) = memo.get(&e) {
            return v;
        }
        let v = match lk.pool.get(e) {
            Expr::Var(v) => !bound.contains(v),
            Expr::Load { .. }
            | Expr::LoadLocal { .. }
            | Expr::LoadConst { .. }
            | Expr::Get(_)
            | Expr::Checked { .. }
            | Expr::Cond(..) => false,
            x => children(x).into_iter().all(|c| invariant(lk, c, bound, memo)),
        };
        memo.insert(e, v);
        v
    }
    let mut bound = std::collections::HashSet::from([var]);
    let mut todo = Vec::new();
    roots(body, &mut bound, &mut todo);
    let (mut memo, mut seen, mut out) = (HashMap::new(), std::collections::HashSet::new(), Vec::new());
    while let Some(e) = todo.pop() {
        if !seen.insert(e) {
            continue;
        }
        let x = lk.pool.get(e);
        let division = matches!(x, Expr::Bin(BinaryOp::Div, ..) | Expr::Rem(..)) && lk.pool.ty(e) == Scalar::I64;
        if division && invariant(lk, e, &bound, &mut memo) {
            out.push(e);
        } else {
            todo.extend(children(x));
        }
    }
    out.sort_unstable();
    out
}

fn collect_stores(body: &[Stmt], out: &mut std::collections::HashSet<u32>) {
    for s in body {
        match s {
            Stmt::Store { arg, .. } => {
                out.insert(*arg);
            }
            Stmt::For { body, .. } => collect_stores(body, out),
            Stmt::If { then, els, .. } => {
                collect_stores(then, out);
                collect_stores(els, out);
            }
            _ => {}
        }
    }
}

/// The mutable variables and local arrays a body uses.
fn collect_state(
    body: &[Stmt],
    pool: &crate::loops::Pool,
    vars: &mut std::collections::BTreeSet<u32>,
    locals: &mut std::collections::BTreeSet<u32>,
) {
    let mut roots = Vec::new();
    fn walk(
        body: &[Stmt],
        roots: &mut Vec<E>,
        vars: &mut std::collections::BTreeSet<u32>,
        locals: &mut std::collections::BTreeSet<u32>,
    ) {
        for s in body {
            match s {
                Stmt::For { lo, hi, body, .. } => {
                    roots.extend([*lo, *hi]);
                    walk(body, roots, vars, locals);
                }
                Stmt::If { cond, then, els } => {
                    roots.push(*cond);
                    walk(then, roots, vars, locals);
                    walk(els, roots, vars, locals);
                }
                Stmt::Store { index, value, .. } => roots.extend([*index, *value]),
                Stmt::StoreLocal { local, index, value } => {
                    locals.insert(*local);
                    roots.extend([*index, *value]);
                }
                Stmt::Set { var, value } | Stmt::Accumulate { var, value, .. } => {
                    vars.insert(*var);
                    roots.push(*value);
                }
            }
        }
    }
    walk(body, &mut roots, vars, locals);
    let mut seen = vec![false; pool.len()];
    while let Some(e) = roots.pop() {
        if std::mem::replace(&mut seen[e as usize], true) {
            continue;
        }
        match pool.get(e) {
            Expr::Get(v) => {
                vars.insert(*v);
            }
            Expr::LoadLocal { local, .. } => {
                locals.insert(*local);
            }
            _ => {}
        }
        roots.extend(children(pool.get(e)));
    }
}

/// Query rows per block of the flash-attention template, and keys per tile.
pub const FLASH_BQ: usize = 64;
pub const FLASH_BK: usize = 64;

/// The flash-attention template for kernel `k` (its loop form's single phase replaced): a block of
/// [`FLASH_WARPS`] warps takes [`FLASH_BQ`] query rows of one batch index, the keys come in tiles of
/// [`FLASH_BK`] staged in shared memory (rotated as they load) and shared by all the block's rows; per row
/// the lanes split the tile's keys for the scores, the online softmax works a tile at a time, and the lanes
/// split the value columns for the accumulator. Returns the function text (name `FULGUR_FN`), the number of
/// blocks and the bytes of shared memory.
fn flash_template(
    lk: &mut LoopKernel,
    k: &Kernel,
    scale: f64,
    causal: bool,
    rotary: Option<usize>,
) -> Result<Option<(String, E, u32)>, CodegenError> {
    // bf16 operands of head dims the tensor cores' tiles divide take the mma form
    if flash_mma::forward_applies(k) {
        return Ok(Some(flash_mma::forward_template(lk, k, scale, causal, rotary)));
    }
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.outputs[0]);
    let (rq, rk, rv, ro) = (qt.shape.len(), kt.shape.len(), vt.shape.len(), ot.shape.len());
    let (Some(d), Some(dv)) = (qt.shape[rq - 1].as_const(), vt.shape[rv - 1].as_const()) else {
        return Ok(None);
    };
    if !qt.dtype.is_float() || d <= 0 || dv <= 0 || ro < 2 || d > 256 || dv > 256 {
        return Ok(None);
    }
    let (d, dv) = (d as usize, dv as usize);
    let (sq, sk, sv, so) = (
        lk.slot(Slot::Input(0)),
        lk.slot(Slot::Input(1)),
        lk.slot(Slot::Input(2)),
        lk.slot(Slot::Output(0)),
    );
    let q = View::of(sq, qt);
    let kv = View::of(sk, kt);
    let v = View::of(sv, vt);
    let o = View::of(so, ot);
    let nb = ro - 2;
    let dim = dim_text;
    let (bq, bk, warps) = (FLASH_BQ, FLASH_BK, FLASH_WARPS as usize);
    let rows_per_warp = bq / warps;
    let dvpl = dv.div_ceil(32);
    let kstride = d + 1; // a padded row: lanes reading different keys hit different banks
    let smem = (bk * kstride + bk * dv + bq * d) * 4;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// flash attention{}: blocks of {bq} query rows, key/value tiles of {bk} in shared memory, online \
         softmax per tile (scale {scale:e}{})",
        if rotary.is_some() { " with rotary q and k" } else { "" },
        if causal { ", causal" } else { "" }
    );
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({}) FULGUR_FN(FULGUR_SIGNATURE) {{",
        FLASH_WARPS * 32
    );
    let t = dim(lk, &qt.shape[rq - 2]);
    let sdim = dim(lk, &kt.shape[rk - 2]);
    let _ = writeln!(s, "  extern __shared__ float fulgur_smem[];");
    let _ = writeln!(s, "  float* Ks = fulgur_smem;                 // [{bk}][{kstride}]");
    let _ = writeln!(
        s,
        "  float* Vs = Ks + {};                    // [{bk}][{dv}]",
        bk * kstride
    );
    let _ = writeln!(s, "  float* Qs = Vs + {};                    // [{bq}][{d}]", bk * dv);
    let _ = writeln!(s, "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;");
    let _ = writeln!(s, "  if ((i64)blockIdx.x >= fulgur_grid) return;");
    let _ = writeln!(s, "  const i64 T = {t}, S = {sdim};");
    let _ = writeln!(s, "  const i64 nqb = (T + {}) / {bq};", bq - 1);
    let _ = writeln!(s, "  const i64 t0 = ((i64)blockIdx.x % nqb) * {bq};");
    let _ = writeln!(s, "  i64 rest = (i64)blockIdx.x / nqb;");
    let _ = writeln!(s, "  const i64 rows = T - t0 < {bq} ? T - t0 : {bq};");
    for (name, view) in [("q", &q), ("k", &kv), ("v", &v), ("o", &o)] {
        let off = dim(lk, &view.offset);
        let _ = writeln!(s, "  i64 {name}_off = {off};");
    }
    for a in (0..nb).rev() {
        let ext = dim(lk, &ot.shape[a]);
        let _ = writeln!(s, "  {{ const i64 c = rest % {ext}; rest /= {ext};");
        for (name, view, r) in [("q", &q, rq), ("k", &kv, rk), ("v", &v, rv), ("o", &o, ro)] {
            if let Some(j) = (a + r - 2).checked_sub(nb) {
                if !view.shape[j].is_one() {
                    let st = dim(lk, &view.strides[j]);
                    let _ = writeln!(s, "    {name}_off += c * {st};");
                }
            }
        }
        let _ = writeln!(s, "  }}");
    }
    let (qrs, qcs) = (dim(lk, &q.strides[rq - 2]), dim(lk, &q.strides[rq - 1]));
    let (krs, kcs) = (dim(lk, &kv.strides[rk - 2]), dim(lk, &kv.strides[rk - 1]));
    let (vrs, vcs) = (dim(lk, &v.strides[rv - 2]), dim(lk, &v.strides[rv - 1]));
    let (ors, ocs) = (dim(lk, &o.strides[ro - 2]), dim(lk, &o.strides[ro - 1]));
    let rot_tables = match rotary {
        Some(r) => {
            let (sc, ss) = (lk.slot(Slot::Input(3)), lk.slot(Slot::Input(4)));
            let cv = View::of(sc, &k.inputs[3]);
            let sv_ = View::of(ss, &k.inputs[4]);
            let c_off = dim(lk, &cv.offset);
            let c_rs = dim(lk, &cv.strides[0]);
            let c_cs = dim(lk, &cv.strides[1]);
            let s_off = dim(lk, &sv_.offset);
            let s_rs = dim(lk, &sv_.strides[0]);
            let s_cs = dim(lk, &sv_.strides[1]);
            Some((r, sc, cv.dtype, c_off, c_rs, c_cs, ss, sv_.dtype, s_off, s_rs, s_cs))
        }
        None => None,
    };
    let elem = |slot: u32, dt: DType, base: &str, rs: &str, cs: &str, pos: &str, dd: &str| -> String {
        let raw = load_text(slot, dt, &format!("{base} + {pos} * {rs} + ({dd}) * {cs}"));
        match &rot_tables {
            None => raw,
            Some((r, sc, cdt, c_off, c_rs, c_cs, ss, sdt, s_off, s_rs, s_cs)) => {
                let h = r / 2;
                let pair = load_text(
                    slot,
                    dt,
                    &format!("{base} + {pos} * {rs} + (({dd}) < {h} ? ({dd}) + {h} : ({dd}) - {h}) * {cs}"),
                );
                let c = load_text(*sc, *cdt, &format!("{c_off} + {pos} * {c_rs} + ({dd}) * {c_cs}"));
                let sn = load_text(*ss, *sdt, &format!("{s_off} + {pos} * {s_rs} + ({dd}) * {s_cs}"));
                format!("(({dd}) < {r} ? {raw} * {c} + (({dd}) < {h} ? -{pair} : {pair}) * {sn} : {raw})")
            }
        }
    };
    let threads = FLASH_WARPS * 32;
    // the keys the block's rows see: all of them, or (causal) up to its last row's limit
    let kend = if causal {
        "  i64 kend = t0 + rows + (S - T); if (kend > S) kend = S; if (kend < 0) kend = 0;"
    } else {
        "  const i64 kend = S;"
    };
    // the block's queries, rotated
    let _ = writeln!(s, "  for (int x = threadIdx.x; x < {}; x += {threads}) {{", bq * d);
    let _ = writeln!(s, "    const i64 r = x / {d}, dd = x % {d};");
    let _ = writeln!(
        s,
        "    Qs[x] = r < rows ? {} : 0.0f;",
        elem(sq, q.dtype, "q_off", &qrs, &qcs, "(t0 + r)", "dd")
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(
        s,
        "  float m[{rows_per_warp}], l[{rows_per_warp}], acc[{rows_per_warp}][{dvpl}];"
    );
    let _ = writeln!(s, "  #pragma unroll");
    let _ = writeln!(s, "  for (int i = 0; i < {rows_per_warp}; ++i) {{");
    let _ = writeln!(s, "    m[i] = __uint_as_float(0xff800000u); l[i] = 0.0f;");
    let _ = writeln!(s, "    #pragma unroll");
    let _ = writeln!(s, "    for (int c = 0; c < {dvpl}; ++c) acc[i][c] = 0.0f;");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "{kend}");
    let _ = writeln!(s, "  for (i64 u0 = 0; u0 < kend; u0 += {bk}) {{");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    for (int x = threadIdx.x; x < {}; x += {threads}) {{", bk * d);
    let _ = writeln!(s, "      const i64 j = x / {d}, dd = x % {d}, u = u0 + j;");
    let _ = writeln!(
        s,
        "      Ks[j * {kstride} + dd] = u < kend ? {} : 0.0f;",
        elem(sk, kv.dtype, "k_off", &krs, &kcs, "u", "dd")
    );
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    for (int x = threadIdx.x; x < {}; x += {threads}) {{", bk * dv);
    let _ = writeln!(s, "      const i64 j = x / {dv}, c = x % {dv}, u = u0 + j;");
    let _ = writeln!(
        s,
        "      Vs[x] = u < kend ? {} : 0.0f;",
        load_text(sv, v.dtype, &format!("v_off + u * {vrs} + c * {vcs}"))
    );
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    #pragma unroll");
    let _ = writeln!(s, "    for (int i = 0; i < {rows_per_warp}; ++i) {{");
    let _ = writeln!(s, "      const int r = warp * {rows_per_warp} + i;");
    let _ = writeln!(s, "      if (r < rows) {{");
    let _ = writeln!(s, "        const i64 lim = t0 + r + (S - T);");
    let _ = writeln!(s, "        const float* qr = Qs + r * {d};");
    let _ = writeln!(s, "        float sa = 0.0f, sb = 0.0f;");
    let _ = writeln!(s, "        for (int dd = 0; dd < {d}; ++dd) {{");
    let _ = writeln!(s, "          const float qd = qr[dd];");
    let _ = writeln!(s, "          sa += qd * Ks[lane * {kstride} + dd];");
    let _ = writeln!(s, "          sb += qd * Ks[(lane + 32) * {kstride} + dd];");
    let _ = writeln!(s, "        }}");
    let _ = writeln!(s, "        const i64 ua = u0 + lane, ub = u0 + lane + 32;");
    let vis = |u: &str| {
        if causal {
            format!("{u} < kend && {u} <= lim")
        } else {
            format!("{u} < kend")
        }
    };
    let ninf = "__uint_as_float(0xff800000u)";
    let sc = float_lit((scale as f32).to_bits());
    let _ = writeln!(s, "        const bool va = {}, vb = {};", vis("ua"), vis("ub"));
    let _ = writeln!(s, "        sa = va ? sa * {sc} : {ninf};");
    let _ = writeln!(s, "        sb = vb ? sb * {sc} : {ninf};");
    let _ = writeln!(s, "        float mx = fulgur_fmax(sa, sb);");
    let _ = writeln!(s, "        #pragma unroll");
    let _ = writeln!(
        s,
        "        for (int w = 16; w > 0; w >>= 1) mx = fulgur_fmax(mx, __shfl_xor_sync(0xffffffffu, mx, w));"
    );
    let _ = writeln!(s, "        const float mn = fulgur_fmax(m[i], mx);");
    let _ = writeln!(s, "        if (mn != {ninf}) {{");
    let _ = writeln!(s, "          const float corr = expf(m[i] - mn);");
    let _ = writeln!(s, "          const float pa = va ? expf(sa - mn) : 0.0f;");
    let _ = writeln!(s, "          const float pb = vb ? expf(sb - mn) : 0.0f;");
    let _ = writeln!(s, "          float ps = pa + pb;");
    let _ = writeln!(s, "          #pragma unroll");
    let _ = writeln!(
        s,
        "          for (int w = 16; w > 0; w >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, w);"
    );
    let _ = writeln!(s, "          l[i] = l[i] * corr + ps;");
    let _ = writeln!(s, "          m[i] = mn;");
    let _ = writeln!(s, "          #pragma unroll");
    let _ = writeln!(s, "          for (int c = 0; c < {dvpl}; ++c) acc[i][c] *= corr;");
    let _ = writeln!(s, "          for (int j = 0; j < 32; ++j) {{");
    let _ = writeln!(s, "            const float pj = __shfl_sync(0xffffffffu, pa, j);");
    let _ = writeln!(s, "            const float pk = __shfl_sync(0xffffffffu, pb, j);");
    let _ = writeln!(s, "            #pragma unroll");
    let _ = writeln!(s, "            for (int c = 0; c < {dvpl}; ++c) {{");
    let _ = writeln!(s, "              const int cc = lane + 32 * c;");
    let _ = writeln!(
        s,
        "              if (cc < {dv}) acc[i][c] += pj * Vs[j * {dv} + cc] + pk * Vs[(j + 32) * {dv} + cc];"
    );
    let _ = writeln!(s, "            }}");
    let _ = writeln!(s, "          }}");
    let _ = writeln!(s, "        }}");
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  #pragma unroll");
    let _ = writeln!(s, "  for (int i = 0; i < {rows_per_warp}; ++i) {{");
    let _ = writeln!(s, "    const int r = warp * {rows_per_warp} + i;");
    let _ = writeln!(s, "    if (r < rows) {{");
    let _ = writeln!(s, "      #pragma unroll");
    let _ = writeln!(s, "      for (int c = 0; c < {dvpl}; ++c) {{");
    let _ = writeln!(s, "        const i64 cc = lane + 32 * c;");
    let _ = writeln!(
        s,
        "        if (cc < {dv}) {}",
        store_text(
            so,
            o.dtype,
            &format!("o_off + (t0 + r) * {ors} + cc * {ocs}"),
            "acc[i][c] / l[i]"
        )
    );
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    Ok(Some((s, flash_blocks(lk, ot, bq), smem as u32)))
}

/// The blocks of a flash-attention launch: the output's batch × its blocks of `bq` query rows.
fn flash_blocks(lk: &mut LoopKernel, ot: &crate::program::TensorRef, bq: usize) -> E {
    let ro = ot.shape.len();
    let batch: Dim = ot.shape[..ro - 2].iter().fold(Dim::from(1), |a, d| a * d.clone());
    let qblocks = ot.shape[ro - 2].ceil_div(&Dim::from(bq as i64));
    lk.dim(&(batch * qblocks))
}

/// `moe_combine` as a template: one block per token, its threads along the channels (coalesced), each output
/// `Σ_slot w[n, slot] · ys[pos[n, slot], c]` summed in slot order as the loop form does; a row index out of
/// range fails the loop form's check.
fn combine_template(lk: &mut LoopKernel, k: &Kernel) -> Option<(String, E, u32)> {
    let (yt, pt, wt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.outputs[0]);
    let kk = pt.shape.get(1)?.as_const()?;
    let check = lk
        .checks
        .iter()
        .position(|c| c.starts_with("a row index of `moe_combine`"))?
        + 1;
    let (sy, sp, sw, so) = (
        lk.slot(Slot::Input(0)),
        lk.slot(Slot::Input(1)),
        lk.slot(Slot::Input(2)),
        lk.slot(Slot::Output(0)),
    );
    let dim = dim_text;
    let rows = dim(lk, &yt.shape[0]);
    let c = dim(lk, &yt.shape[1]);
    let (yo, yrs, ycs) = (dim(lk, &yt.offset), dim(lk, &yt.strides[0]), dim(lk, &yt.strides[1]));
    let (po, prs, pcs) = (dim(lk, &pt.offset), dim(lk, &pt.strides[0]), dim(lk, &pt.strides[1]));
    let (wo, wrs, wcs) = (dim(lk, &wt.offset), dim(lk, &wt.strides[0]), dim(lk, &wt.strides[1]));
    let (oo, ors, ocs) = (dim(lk, &ot.offset), dim(lk, &ot.strides[0]), dim(lk, &ot.strides[1]));
    let mut s = String::new();
    let _ = writeln!(s, "// moe_combine: one block per token, the threads along the channels");
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({BLOCK}) FULGUR_FN(FULGUR_SIGNATURE) {{"
    );
    let _ = writeln!(s, "  const i64 n = blockIdx.x;");
    let _ = writeln!(s, "  if (n >= fulgur_grid) return;");
    let _ = writeln!(s, "  i64 p[{kk}]; float w[{kk}];");
    let _ = writeln!(s, "  #pragma unroll");
    let _ = writeln!(s, "  for (int sl = 0; sl < {kk}; ++sl) {{");
    let _ = writeln!(
        s,
        "    i64 r = {};",
        load_text(sp, pt.dtype, &format!("{po} + n * {prs} + sl * {pcs}"))
    );
    let _ = writeln!(
        s,
        "    if ((unsigned long long)r >= (unsigned long long){rows}) {{ if (threadIdx.x == 0) fulgur_fail(fulgur_err, {check}, r); r = 0; }}"
    );
    let _ = writeln!(s, "    p[sl] = r;");
    let _ = writeln!(
        s,
        "    w[sl] = (float){};",
        load_text(sw, wt.dtype, &format!("{wo} + n * {wrs} + sl * {wcs}"))
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  for (i64 c = threadIdx.x; c < {c}; c += {BLOCK}) {{");
    let _ = writeln!(s, "    float acc = 0.0f;");
    let _ = writeln!(s, "    #pragma unroll");
    let _ = writeln!(s, "    for (int sl = 0; sl < {kk}; ++sl)");
    let _ = writeln!(
        s,
        "      acc = acc + w[sl] * {};",
        load_text(sy, yt.dtype, &format!("{yo} + p[sl] * {yrs} + c * {ycs}"))
    );
    let _ = writeln!(
        s,
        "    {}",
        store_text(so, ot.dtype, &format!("{oo} + n * {ors} + c * {ocs}"), "acc")
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    let items = lk.dim(&pt.shape[0]);
    Some((s, items, 0))
}

/// `rms_norm` as a template: one block per row, the threads along the channels (coalesced), the sum of squares
/// reduced across the block (shuffles, then one word per warp in shared memory), `x · rsqrt(mean + eps) · w`
/// written by the same threads. The loop form's thread per row reads whole rows, uncoalesced.
fn rms_norm_template(lk: &mut LoopKernel, k: &Kernel, eps: f64) -> Option<(String, E, u32)> {
    let (xt, wt, ot) = (&k.inputs[0], &k.inputs[1], &k.outputs[0]);
    let r = xt.shape.len();
    if r == 0 || wt.shape.len() != 1 || !xt.dtype.is_float() {
        return None;
    }
    let (sx, sw, so) = (
        lk.slot(Slot::Input(0)),
        lk.slot(Slot::Input(1)),
        lk.slot(Slot::Output(0)),
    );
    let dim = dim_text;
    let c = dim(lk, &xt.shape[r - 1]);
    let (xo, xcs) = (dim(lk, &xt.offset), dim(lk, &xt.strides[r - 1]));
    let (oo, ocs) = (dim(lk, &ot.offset), dim(lk, &ot.strides[r - 1]));
    let (wo, wcs) = (dim(lk, &wt.offset), dim(lk, &wt.strides[0]));
    let warps = BLOCK / 32;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// rms_norm: one block per row, the threads along the channels (eps {eps:e})"
    );
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({BLOCK}) FULGUR_FN(FULGUR_SIGNATURE) {{"
    );
    let _ = writeln!(s, "  __shared__ float part[{warps}];");
    let _ = writeln!(s, "  const i64 row = blockIdx.x;");
    let _ = writeln!(s, "  if (row >= fulgur_grid) return;");
    let _ = writeln!(s, "  i64 rest = row, x_off = {xo}, o_off = {oo};");
    for a in (0..r - 1).rev() {
        let ext = dim(lk, &xt.shape[a]);
        let xs = dim(lk, &xt.strides[a]);
        let os = dim(lk, &ot.strides[a]);
        let _ = writeln!(
            s,
            "  {{ const i64 q = rest % {ext}; rest /= {ext}; x_off += q * {xs}; o_off += q * {os}; }}"
        );
    }
    let x_at = |i: &str| load_text(sx, xt.dtype, &format!("x_off + {i} * {xcs}"));
    let _ = writeln!(s, "  float sq = 0.0f;");
    let _ = writeln!(
        s,
        "  for (i64 c = threadIdx.x; c < {c}; c += {BLOCK}) {{ const float v = {}; sq += v * v; }}",
        x_at("c")
    );
    let _ = writeln!(s, "  #pragma unroll");
    let _ = writeln!(
        s,
        "  for (int w = 16; w > 0; w >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, w);"
    );
    let _ = writeln!(s, "  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = sq;");
    let _ = writeln!(s, "  __syncthreads();");
    let _ = writeln!(s, "  float tot = 0.0f;");
    let _ = writeln!(s, "  #pragma unroll");
    let _ = writeln!(s, "  for (int w = 0; w < {warps}; ++w) tot += part[w];");
    let _ = writeln!(
        s,
        "  const float rs = 1.0f / sqrtf(tot / (float){c} + {});",
        float_lit((eps as f32).to_bits())
    );
    let _ = writeln!(s, "  for (i64 c = threadIdx.x; c < {c}; c += {BLOCK}) {{");
    let _ = writeln!(
        s,
        "    {}",
        store_text(
            so,
            ot.dtype,
            "o_off + c * OCS",
            &format!(
                "{} * rs * {}",
                x_at("c"),
                load_text(sw, wt.dtype, &format!("{wo} + c * {wcs}"))
            )
        )
        .replace("OCS", &ocs)
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    let rows: Dim = xt.shape[..r - 1].iter().fold(Dim::from(1), |a, d| a * d.clone());
    let items = lk.dim(&rows);
    Some((s, items, 0))
}

/// A grouped GEMM with the group sizes read on the device (the decode step under CUDA graphs, a few rows per
/// expert): a block per (chunk of up to `GROUPED_ROWS` rows of one expert, 32 columns). A lane owns a column
/// (consecutive lanes read consecutive weights), the block's warps split `k` (warp `w` takes `k ≡ w`, so more
/// loads are in flight than one walk over `k` allows), and warp 0 adds the warps' partial sums in warp order:
/// the result does not depend on the launch. Each expert's weights are read once per chunk of rows. The
/// expert's first row is found by summing the counts before it.
fn grouped_template(lk: &mut LoopKernel, g: &crate::loops::GroupedGemmStep, name: &str) -> (String, E) {
    let e = |lk: &LoopKernel, x: E| -> String {
        // the step's sizes are literals, parameters or products of them
        c_expr(lk, x)
    };
    let lit = |lk: &mut LoopKernel, v: i64| lk.pool.add(Expr::I(v));
    let (r, r1, t, t1) = (
        lit(lk, GROUPED_ROWS),
        lit(lk, GROUPED_ROWS - 1),
        lit(lk, 32),
        lit(lk, 31),
    );
    let m_up = lk.pool.addi(g.m, r1);
    let chunks = lk.pool.div(m_up, r);
    let n_up = lk.pool.addi(g.n, t1);
    let tiles = lk.pool.div(n_up, t);
    let en = lk.pool.mul(g.experts, tiles);
    let blocks = lk.pool.mul(chunks, en);
    let block = lit(lk, BLOCK as i64);
    let items = lk.pool.mul(blocks, block);
    let count = |ex: &str| group_count(lk, g, ex);
    let warps = BLOCK / 32;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// grouped GEMM with the group sizes read on the device (for CUDA graphs): a block per (chunk of \
         {GROUPED_ROWS} rows of one expert, 32 columns), its {warps} warps splitting k"
    );
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {name}(FULGUR_SIGNATURE) {{"
    );
    let _ = writeln!(
        s,
        "  const i64 M = {}, N = {}, K = {}, E = {}, R = {GROUPED_ROWS}, W = {warps};",
        e(lk, g.m),
        e(lk, g.n),
        e(lk, g.k),
        e(lk, g.experts)
    );
    let _ = writeln!(s, "  __shared__ float part[{warps}][{GROUPED_ROWS}][32];");
    let _ = writeln!(s, "  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;");
    let _ = writeln!(s, "  const i64 tiles = (N + 31) / 32;");
    // element (row, col) of the output set to `v`
    let store_out = |lk: &LoopKernel, row: &str, col: &str, v: &str| {
        store_text(
            g.out.arg,
            g.out.dtype,
            &format!(
                "{} + ({row}) * {} + ({col}) * {}",
                e(lk, g.out.offset),
                e(lk, g.out.rs),
                e(lk, g.out.cs)
            ),
            v,
        )
    };
    // rows past every group (a routed exchange's padding) belong to none: zeros
    let _ = writeln!(s, "  i64 total = 0;");
    let _ = writeln!(s, "  for (i64 e2 = 0; e2 < E; ++e2) total += {};", count("e2"));
    let _ = writeln!(
        s,
        "  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < (M - total) * N; t += (i64)gridDim.x * blockDim.x) {{"
    );
    let _ = writeln!(s, "    {}", store_out(lk, "total + t / N", "t % N", "0.0f"));
    let _ = writeln!(s, "  }}");
    let _ = writeln!(
        s,
        "  for (i64 blk = blockIdx.x; blk < (M + R - 1) / R * E * tiles; blk += gridDim.x) {{"
    );
    let _ = writeln!(
        s,
        "    const i64 tn = blk % tiles, ex = (blk / tiles) % E, j = blk / (tiles * E);"
    );
    let _ = writeln!(s, "    i64 start = 0;");
    let _ = writeln!(s, "    for (i64 e2 = 0; e2 < ex; ++e2) start += {};", count("e2"));
    let _ = writeln!(s, "    const i64 cnt = {};", count("ex"));
    let _ = writeln!(s, "    const i64 r0 = start + j * R;");
    let _ = writeln!(s, "    const i64 nr = min(min(R, cnt - j * R), M - r0);");
    let _ = writeln!(s, "    if (nr <= 0) continue;  // the same for the whole block");
    let _ = writeln!(s, "    const i64 c = tn * 32 + lane;");
    let _ = writeln!(s, "    float acc[{GROUPED_ROWS}];");
    let _ = writeln!(s, "#pragma unroll");
    let _ = writeln!(s, "    for (int q = 0; q < R; ++q) acc[q] = 0.0f;");
    let _ = writeln!(s, "    if (c < N) {{");
    let _ = writeln!(s, "#pragma unroll 4");
    let _ = writeln!(s, "      for (i64 kk = w; kk < K; kk += W) {{");
    let _ = writeln!(
        s,
        "        const float wv = {};",
        load_text(
            g.w.arg,
            g.w.dtype,
            &format!(
                "{} + ex * {} + kk * {} + c * {}",
                e(lk, g.w.offset),
                e(lk, g.expert_stride),
                e(lk, g.w.rs),
                e(lk, g.w.cs)
            )
        )
    );
    let _ = writeln!(s, "#pragma unroll");
    let _ = writeln!(
        s,
        "        for (int q = 0; q < R; ++q) if (q < nr) acc[q] += {} * wv;",
        load_text(
            g.x.arg,
            g.x.dtype,
            &format!(
                "{} + (r0 + q) * {} + kk * {}",
                e(lk, g.x.offset),
                e(lk, g.x.rs),
                e(lk, g.x.cs)
            )
        )
    );
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "#pragma unroll");
    let _ = writeln!(s, "    for (int q = 0; q < R; ++q) part[w][q][lane] = acc[q];");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "    if (w == 0 && c < N) {{");
    let _ = writeln!(s, "      for (int q = 0; q < nr; ++q) {{");
    let _ = writeln!(s, "        float v = part[0][q][lane];");
    let _ = writeln!(s, "        for (int w2 = 1; w2 < W; ++w2) v += part[w2][q][lane];");
    let _ = writeln!(s, "        {}", store_out(lk, "r0 + q", "c", "v"));
    let _ = writeln!(s, "      }}");
    let _ = writeln!(s, "    }}");
    let _ = writeln!(s, "    __syncthreads();");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    (s, items)
}

/// The device form of a grouped GEMM over the depth (`grouped_matmul_wgrad` under CUDA graphs): a thread per
/// element `(e, i, j)` of `out`, summing over its group's rows. Plain and slow; the eager path calls cuBLAS per
/// group. The kernel's zeroing phase has already written the empty groups.
fn grouped_depth_template(lk: &mut LoopKernel, g: &crate::loops::GroupedGemmStep, name: &str) -> (String, E) {
    let e = |lk: &LoopKernel, x: E| -> String { c_expr(lk, x) };
    let mn = lk.pool.mul(g.m, g.n);
    let items = lk.pool.mul(g.experts, mn);
    let count = |ex: &str| group_count(lk, g, ex);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// grouped GEMM over the depth with the group sizes read on the device: a thread per output element"
    );
    let _ = writeln!(
        s,
        "extern \"C\" __global__ void __launch_bounds__({BLOCK}) {name}(FULGUR_SIGNATURE) {{"
    );
    let _ = writeln!(
        s,
        "  const i64 M = {}, N = {}, K = {}, E = {};",
        e(lk, g.m),
        e(lk, g.n),
        e(lk, g.k),
        e(lk, g.experts)
    );
    let _ = writeln!(
        s,
        "  for (i64 it = (i64)blockIdx.x * blockDim.x + threadIdx.x; it < E * M * N; it += (i64)gridDim.x * blockDim.x) {{"
    );
    let _ = writeln!(s, "    const i64 j = it % N, i = (it / N) % M, ex = it / (M * N);");
    let _ = writeln!(s, "    i64 start = 0;");
    let _ = writeln!(s, "    for (i64 e2 = 0; e2 < ex; ++e2) start += {};", count("e2"));
    let _ = writeln!(s, "    const i64 stop = min(start + {}, K);", count("ex"));
    let _ = writeln!(s, "    if (start >= stop) continue;");
    let _ = writeln!(s, "    float acc = 0.0f;");
    let _ = writeln!(
        s,
        "    for (i64 kk = start; kk < stop; ++kk) acc += {} * {};",
        load_text(
            g.x.arg,
            g.x.dtype,
            &format!("{} + i * {} + kk * {}", e(lk, g.x.offset), e(lk, g.x.rs), e(lk, g.x.cs))
        ),
        load_text(
            g.w.arg,
            g.w.dtype,
            &format!("{} + kk * {} + j * {}", e(lk, g.w.offset), e(lk, g.w.rs), e(lk, g.w.cs))
        )
    );
    let _ = writeln!(
        s,
        "    {}",
        store_text(
            g.out.arg,
            g.out.dtype,
            &format!(
                "{} + ex * {} + i * {} + j * {}",
                e(lk, g.out.offset),
                e(lk, g.expert_stride),
                e(lk, g.out.rs),
                e(lk, g.out.cs)
            ),
            "acc"
        )
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    (s, items)
}

/// The size of group `ex` (a C expression) of a grouped GEMM step, read on the device.
fn group_count(lk: &LoopKernel, g: &crate::loops::GroupedGemmStep, ex: &str) -> String {
    load_text(
        g.counts_arg,
        g.counts_dtype,
        &format!(
            "{} + {ex} * {}",
            c_expr(lk, g.counts_offset),
            c_expr(lk, g.counts_stride)
        ),
    )
}

/// Rows of one expert a block of the device grouped GEMM accumulates together.
const GROUPED_ROWS: i64 = 8;

/// Dimension `d` of a kernel as C: a literal, or the parameter the kernel evaluates it into.
fn dim_text(lk: &mut LoopKernel, d: &Dim) -> String {
    let e = lk.dim(d);
    c_expr(lk, e)
}

/// An expression of literals and parameters as C.
fn c_expr(lk: &LoopKernel, x: E) -> String {
    match lk.pool.get(x) {
        Expr::I(i) => int_lit(*i),
        Expr::Param(p) => format!("p{p}"),
        Expr::Bin(op, a, b) => {
            let (a, b) = (c_expr(lk, *a), c_expr(lk, *b));
            match op {
                BinaryOp::Add => format!("({a} + {b})"),
                BinaryOp::Sub => format!("({a} - {b})"),
                BinaryOp::Mul => format!("({a} * {b})"),
                BinaryOp::Div => format!("({a} / {b})"),
                BinaryOp::Max => format!("fulgur_imax({a}, {b})"),
                BinaryOp::Min => format!("fulgur_imin({a}, {b})"),
                BinaryOp::Pow => "0".into(),
            }
        }
        Expr::Rem(a, b) => format!("({} % {})", c_expr(lk, *a), c_expr(lk, *b)),
        _ => "0".into(),
    }
}

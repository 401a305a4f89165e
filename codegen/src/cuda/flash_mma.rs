//! Flash attention on the tensor cores: the forward and the backward as templates for bf16 operands whose
//! head dims are multiples of 16 up to 128 (other dtypes and dims keep the SIMT template or the loop form).
//!
//! Tiles of 64 rows are staged in shared memory as bf16, row-major with rows padded by 16 bytes (a warp's
//! fragment loads then fall in 32 different banks); they load 16 bytes a thread where a row is contiguous and
//! 16-byte aligned, element by element otherwise. Products are `mma.m16n8k16` (bf16 operands, f32
//! accumulators), a warp taking 16 rows; an operand a product needs transposed is read from its row-major tile
//! by `ldmatrix.trans`. Rotated `q` and `k`, the probabilities and `dS` are rounded to bf16 for the products,
//! as flash attention does (`docs/numerics.md`).
//!
//! **Forward** (`flash_attention[_rope]`): a block per 64 query rows, key/value tiles of 64 in turn (the
//! rotary embedding applied to the staged `q` and `k` tiles in place), `S = Q Kᵀ`, online softmax in f32,
//! `O += P V`.
//!
//! **Backward** (`flash_attention_grad`). The composite's inputs are `q`, `k`, `v` and `do`, not the forward's
//! output or its log-sum-exp, so the first of its two templates recomputes them:
//! 1. **dQ**, a block per 64 query rows: a first pass over the key tiles is the forward, which gives each row's
//!    log-sum-exp `lse` and `delta = Σ O ⊙ dO` (the `rowsum(P ⊙ dP)` of the decomposition), written to two
//!    scratch vectors; a second pass forms `P = exp(S · scale − lse)`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − delta)`
//!    and accumulates `dQ += dS K` in registers.
//! 2. **dK and dV**, a block per 64 keys of one key/value batch index, looping over the query heads that share
//!    those keys (grouped-query attention's broadcast axes) and their query tiles (from the first one the
//!    causal mask lets see the block): `Sᵀ = K Qᵀ`, `Pᵀ` from the first template's `lse`, `dPᵀ = V dOᵀ`, `dSᵀ`,
//!    then `dV += Pᵀ dO` and `dK += dSᵀ Q` in registers.
//!
//! Every gradient is written once by the block that owns it, summed in a fixed order: no atomics, the same
//! bits on every run. The price is recomputing `S` and `dP` in both templates (9 tile products per key and
//! query tile pair against the 7 of an atomic `dQ`).

use super::{dim_text, float_lit, load_text, FLASH_WARPS};
use crate::kernels::View;
use crate::loops::{LoopKernel, Slot, E};
use crate::program::{Kernel, TensorRef};
use fulgur_ir::{DType, Dim};
use std::fmt::Write as _;

/// Rows of a tile: query rows per block of the first template, keys per block of the second, and the tiles
/// each walks.
const B: usize = 64;

/// Whether a `flash_attention_grad` kernel takes the tensor-core form: bf16 throughout, head dims multiples of 16 up to
/// 128, `q` not broadcast, and `k` and `v` broadcast along the same batch axes.
pub(super) fn grad_applies(k: &Kernel) -> bool {
    if k.inputs.len() != 4 || k.outputs.len() != 3 {
        return false;
    }
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.inputs[3]);
    let (rq, rk, rv, ro) = (qt.shape.len(), kt.shape.len(), vt.shape.len(), ot.shape.len());
    if ro < 2 || rq != ro {
        return false;
    }
    if [qt, kt, vt, ot].iter().any(|t| t.dtype != DType::BF16) || k.outputs.iter().any(|t| t.dtype != DType::BF16) {
        return false;
    }
    let (Some(d), Some(dv)) = (qt.shape[rq - 1].as_const(), vt.shape[rv - 1].as_const()) else {
        return false;
    };
    if d <= 0 || dv <= 0 || d % 16 != 0 || dv % 16 != 0 || d > 128 || dv > 128 {
        return false;
    }
    let nb = ro - 2;
    (0..nb).all(|a| {
        let at = |t: &TensorRef, r: usize| (a + r - 2).checked_sub(nb).map(|j| t.shape[j].clone());
        let one = |x: &Option<Dim>| x.as_ref().is_none_or(|d| d.is_one());
        let out = &ot.shape[a];
        // q is not broadcast (its gradient would need a sum), and k and v share their broadcast axes
        at(qt, rq).as_ref() == Some(out) && (out.is_one() || one(&at(kt, rk)) == one(&at(vt, rv)))
    })
}

/// Whether a `flash_attention[_rope]` kernel takes the tensor-core form: bf16 `q`, `k` and `v`, head dims
/// multiples of 16 up to 128.
pub(super) fn forward_applies(k: &Kernel) -> bool {
    if k.inputs.len() < 3 {
        return false;
    }
    let (qt, kt, vt) = (&k.inputs[0], &k.inputs[1], &k.inputs[2]);
    let head = |t: &TensorRef| t.shape[t.shape.len() - 1].as_const();
    [qt, kt, vt]
        .iter()
        .all(|t| t.dtype == DType::BF16 && t.shape.len() >= 2)
        && k.outputs.len() == 1
        && k.outputs[0].shape.len() >= 2
        && [head(qt), head(vt)]
            .iter()
            .all(|d| d.is_some_and(|d| d > 0 && d % 16 == 0 && d <= 128))
}

/// The forward template of a kernel [`forward_applies`] holds for (`rotary`: `flash_attention_rope`'s rotated
/// dims, its tables inputs 3 and 4): the function text (name `FULGUR_FN`), its number of blocks and its bytes
/// of shared memory.
pub(super) fn forward_template(
    lk: &mut LoopKernel,
    k: &Kernel,
    scale: f64,
    causal: bool,
    rotary: Option<usize>,
) -> (String, E, u32) {
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.outputs[0]);
    let views = [
        ("q", Slot::Input(0), qt),
        ("k", Slot::Input(1), kt),
        ("v", Slot::Input(2), vt),
        ("out", Slot::Output(0), ot),
    ];
    let mut ctx = Ctx::new(lk, &views, ot, kt, scale, causal);
    if let Some(r) = rotary {
        let mut table = |i: usize| {
            let slot = lk.slot(Slot::Input(i));
            let v = View::of(slot, &k.inputs[i]);
            let (off, rs, cs) = (
                dim_text(lk, &v.offset),
                dim_text(lk, &v.strides[0]),
                dim_text(lk, &v.strides[1]),
            );
            (slot, v.dtype, off, rs, cs)
        };
        ctx.rope = Some((r, table(3), table(4)));
    }
    let (dp, dvp) = (ctx.d + 8, ctx.dv + 8);
    let smem = (2 * B * dp + B * dvp) * 2;
    let items = ctx.blocks(lk, ot.shape[ot.shape.len() - 2].clone(), None);
    (ctx.forward_text(), items, smem as u32)
}

/// The two templates of a kernel [`grad_applies`] holds for: each its function text (name `FULGUR_FN`), its
/// number of blocks and its bytes of shared memory. Builds its own slots and scratch: the caller has dropped
/// the loop form's.
pub(super) fn grad_templates(lk: &mut LoopKernel, k: &Kernel, scale: f64, causal: bool) -> Vec<(String, E, u32)> {
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.inputs[3]);
    let views = [
        ("q", Slot::Input(0), qt),
        ("k", Slot::Input(1), kt),
        ("v", Slot::Input(2), vt),
        ("o", Slot::Input(3), ot),
        ("dq", Slot::Output(0), &k.outputs[0]),
        ("dk", Slot::Output(1), &k.outputs[1]),
        ("dv", Slot::Output(2), &k.outputs[2]),
    ];
    let mut ctx = Ctx::new(lk, &views, ot, kt, scale, causal);
    let nb = ctx.nb;
    let batch: Dim = ot.shape[..nb].iter().fold(Dim::from(1), |a, x| a * x.clone());
    let t_dim = ot.shape[nb].clone();
    let s_dim = kt.shape[kt.shape.len() - 2].clone();
    ctx.lse = lk.scratch(DType::F32, batch.clone() * t_dim.clone());
    ctx.delta = lk.scratch(DType::F32, batch * t_dim.clone());
    // the out's batch axes k (and v) are broadcast along: the second template loops over them
    let bcast: Vec<bool> = (0..nb)
        .map(|a| {
            let r = kt.shape.len();
            !ot.shape[a].is_one() && (a + r - 2).checked_sub(nb).is_none_or(|j| kt.shape[j].is_one())
        })
        .collect();
    let dq_items = ctx.blocks(lk, t_dim, None);
    let kv_items = ctx.blocks(lk, s_dim, Some(&bcast));
    let (dp, dvp) = (ctx.d + 8, ctx.dv + 8);
    let smem1 = (2 * B * dp + 2 * B * dvp) * 2;
    let smem2 = smem1 + 2 * B * 4;
    vec![
        (ctx.dq_template(), dq_items, smem1 as u32),
        (ctx.dkv_template(&bcast), kv_items, smem2 as u32),
    ]
}

/// The blocks an SM should hold at once of the backward's dQ template (`FULGUR_FLASH_DQ_BLOCKS`, default 0:
/// the compiler's choice, which takes 255 registers a thread at head dim 128 and so two blocks an SM; at 3 it
/// takes 168 and spills a few hundred bytes). The dK/dV template holds both gradients' accumulators (128
/// registers at head dim 128) and spills three times as much at 168, so it is left to the compiler.
fn grad_min_blocks() -> u32 {
    std::env::var("FULGUR_FLASH_DQ_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const NINF: &str = "__uint_as_float(0xff800000u)";
const PINF: &str = "__uint_as_float(0x7f800000u)";

/// A rotary table: slot, dtype, offset, row and column strides.
type Table = (u32, DType, String, String, String);

/// What the templates' text needs of a kernel: head dims, the views (by name) with their offsets and strides
/// as C expressions, the out's batch axes, the scale and the mask.
struct Ctx {
    d: usize,
    dv: usize,
    /// The out's batch axes (all but its last two).
    nb: usize,
    scale: String,
    causal: bool,
    /// The backward's scratch slots: the rows' log-sum-exp and delta.
    lse: u32,
    delta: u32,
    /// Per view: its slot.
    slots: Vec<u32>,
    /// The query and key counts.
    tt: String,
    st: String,
    /// Per view: its name, offset, and per out batch axis its stride (`None` where the view does not vary
    /// along it).
    offsets: Vec<(String, String, Vec<Option<String>>)>,
    /// Per view: the strides of its rows and columns.
    strides: Vec<(String, String)>,
    /// Per out batch axis: its extent (as a dim and as C), and the product of the extents after it.
    batch: Vec<Dim>,
    exts: Vec<String>,
    inner: Vec<String>,
    /// The forward's rotary embedding: rotated dims, cos and sin tables.
    rope: Option<(usize, Table, Table)>,
}

impl Ctx {
    /// The context of views `views` (name, slot, tensor); `out` gives the batch axes and the query count, `k`
    /// the key count.
    fn new(
        lk: &mut LoopKernel,
        views: &[(&str, Slot, &TensorRef)],
        out: &TensorRef,
        k: &TensorRef,
        scale: f64,
        causal: bool,
    ) -> Ctx {
        let ro = out.shape.len();
        let nb = ro - 2;
        let head = |t: &TensorRef| t.shape[t.shape.len() - 1].as_const().unwrap_or(16) as usize;
        let mut ctx = Ctx {
            d: head(views[0].2),
            dv: head(views[2].2),
            nb,
            scale: float_lit((scale as f32).to_bits()),
            causal,
            lse: 0,
            delta: 0,
            slots: Vec::new(),
            tt: dim_text(lk, &out.shape[ro - 2]),
            st: dim_text(lk, &k.shape[k.shape.len() - 2]),
            offsets: Vec::new(),
            strides: Vec::new(),
            batch: out.shape[..nb].to_vec(),
            exts: (0..nb).map(|a| dim_text(lk, &out.shape[a])).collect(),
            inner: (0..nb)
                .map(|a| {
                    let p = out.shape[a + 1..nb].iter().fold(Dim::from(1), |x, y| x * y.clone());
                    dim_text(lk, &p)
                })
                .collect(),
            rope: None,
        };
        for &(name, slot, t) in views {
            let slot = lk.slot(slot);
            let v = View::of(slot, t);
            let off = dim_text(lk, &v.offset);
            let r = v.shape.len();
            let axes: Vec<Option<String>> = (0..nb)
                .map(|a| {
                    (a + r - 2)
                        .checked_sub(nb)
                        .filter(|&j| !v.shape[j].is_one())
                        .map(|j| dim_text(lk, &v.strides[j]))
                })
                .collect();
            let (rs, cs) = (dim_text(lk, &v.strides[r - 2]), dim_text(lk, &v.strides[r - 1]));
            ctx.slots.push(slot);
            ctx.offsets.push((name.to_string(), off, axes));
            ctx.strides.push((rs, cs));
        }
        ctx
    }

    /// The blocks of a launch over `rows` in tiles of [`B`], times the out's batch axes (but those `skip`
    /// marks).
    fn blocks(&self, lk: &mut LoopKernel, rows: Dim, skip: Option<&[bool]>) -> E {
        let batch = (0..self.nb)
            .filter(|&a| skip.is_none_or(|s| !s[a]))
            .fold(Dim::from(1), |x, a| x * self.batch[a].clone());
        lk.dim(&(batch * rows.ceil_div(&Dim::from(B as i64))))
    }

    /// The helpers of one function: the product, the bf16 pair, the transposed fragment load and the tile load.
    fn helpers(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "__device__ __forceinline__ void FULGUR_FN_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {{\n  \
             asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, \
             {{%8,%9}}, {{%0,%1,%2,%3}};\" : \"+f\"(c[0]), \"+f\"(c[1]), \"+f\"(c[2]), \"+f\"(c[3]) : \"r\"(a[0]), \
             \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"r\"(b0), \"r\"(b1));\n}}"
        );
        let _ = writeln!(
            s,
            "__device__ __forceinline__ unsigned FULGUR_FN_pack(float lo, float hi) {{ return \
             (unsigned)fulgur_to_bf16(lo) | ((unsigned)fulgur_to_bf16(hi) << 16); }}"
        );
        // four 8×8 bf16 matrices transposed: lanes 8m..8m+7 give the rows of matrix m
        let _ = writeln!(
            s,
            "__device__ __forceinline__ void FULGUR_FN_ldt(unsigned* r, const unsigned short* p) {{\n  \
             const unsigned a = (unsigned)__cvta_generic_to_shared(p);\n  \
             asm volatile(\"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{%0,%1,%2,%3}}, [%4];\" : \"=r\"(r[0]), \
             \"=r\"(r[1]), \"=r\"(r[2]), \"=r\"(r[3]) : \"r\"(a));\n}}"
        );
        // A fragment of 16 rows × 16 columns from a row-major tile
        let _ = writeln!(
            s,
            "__device__ __forceinline__ void FULGUR_FN_lda(unsigned* a, const unsigned short* p, int ld) {{\n  \
             const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;\n  \
             const unsigned short* x = p + g * ld + 2 * c;\n  \
             a[0] = *(const unsigned*)x; a[1] = *(const unsigned*)(x + 8 * ld);\n  \
             a[2] = *(const unsigned*)(x + 8); a[3] = *(const unsigned*)(x + 8 * ld + 8);\n}}"
        );
        let _ = writeln!(
            s,
            "// rows [r0, r0 + {B}) of a bf16 matrix at element offset off (row stride rs, column stride cs) into a \
             shared tile of row pitch ld, zeros from row n on\n\
             __device__ __forceinline__ void FULGUR_FN_tile(unsigned short* dst, int ld, const unsigned short* src, \
             i64 off, i64 rs, i64 cs, i64 r0, i64 n, int w) {{\n  \
             const int chunks = w >> 3;\n  \
             const bool vec = cs == 1 && (rs & 7) == 0 && (off & 7) == 0;\n  \
             for (int x = threadIdx.x; x < {B} * chunks; x += {threads}) {{\n    \
             const int r = x / chunks, ch = x - r * chunks;\n    \
             uint4 val = make_uint4(0u, 0u, 0u, 0u);\n    \
             if (r0 + r < n) {{\n      \
             const i64 at = off + (r0 + r) * rs + (i64)(ch * 8) * cs;\n      \
             if (vec) val = *(const uint4*)(src + at);\n      \
             else {{\n        \
             unsigned e[8];\n        \
             for (int i = 0; i < 8; ++i) e[i] = src[at + i * cs];\n        \
             val = make_uint4(e[0] | (e[1] << 16), e[2] | (e[3] << 16), e[4] | (e[5] << 16), e[6] | (e[7] << 16));\n      \
             }}\n    \
             }}\n    \
             *(uint4*)(dst + r * ld + ch * 8) = val;\n  \
             }}\n}}",
            threads = FLASH_WARPS * 32
        );
    }

    /// Declares `NAME_off` for every view and `bflat` (the out's flat batch index), with the coordinates of
    /// the out batch axes `take` decoded from `from` (last axis fastest); adds to them where `add`.
    fn decode(&self, s: &mut String, from: &str, take: &dyn Fn(usize) -> bool, add: bool) {
        let (exts, inner) = (&self.exts, &self.inner);
        if !add {
            for (name, off, _) in &self.offsets {
                let _ = writeln!(s, "  i64 {name}_off = {off};");
            }
            let _ = writeln!(s, "  i64 bflat = 0;");
        }
        for a in (0..self.nb).rev().filter(|&a| take(a)) {
            let ext = &exts[a];
            let _ = writeln!(s, "  {{ const i64 c = {from} % {ext}; {from} /= {ext};");
            for (name, _, axes) in &self.offsets {
                if let Some(st) = &axes[a] {
                    let _ = writeln!(s, "    {name}_off += c * {st};");
                }
            }
            let _ = writeln!(s, "    bflat += c * {}; }}", inner[a]);
        }
    }

    fn ptr(&self, i: usize) -> String {
        format!("(const unsigned short*)s{}", self.slots[i])
    }

    /// `FULGUR_FN_tile` of view `i` (q 0, k 1, v 2, o 3) into `dst` from row `r0`, `n` rows in all.
    fn tile(&self, i: usize, dst: &str, ld: usize, r0: &str, n: &str, w: usize) -> String {
        let name = &self.offsets[i].0;
        let (rs, cs) = &self.strides[i];
        format!(
            "FULGUR_FN_tile({dst}, {ld}, {}, {name}_off, {rs}, {cs}, {r0}, {n}, {w});",
            self.ptr(i)
        )
    }

    /// `acc = A Bᵀ` over 16 rows × 64 columns: A's rows from tile `a` (its pitch `lda`; the warp's 16), B's
    /// from tile `b` (pitch `ldb`), `kd` slabs of 16 along the shared dim.
    fn product_abt(&self, s: &mut String, acc: &str, (a, lda): (&str, usize), (b, ldb): (&str, usize), kd: usize) {
        let _ = writeln!(s, "    float {acc}[{}][4];", B / 8);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(
            s,
            "    for (int n = 0; n < {}; ++n) {acc}[n][0] = {acc}[n][1] = {acc}[n][2] = {acc}[n][3] = 0.0f;",
            B / 8
        );
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int kk = 0; kk < {kd}; ++kk) {{");
        let _ = writeln!(s, "      unsigned fa[4];");
        let _ = writeln!(s, "      FULGUR_FN_lda(fa, {a} + wr * {lda} + kk * 16, {lda});");
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(
            s,
            "        const unsigned short* b0 = {b} + (n * 8 + g) * {ldb} + kk * 16 + 2 * c;"
        );
        let _ = writeln!(
            s,
            "        FULGUR_FN_mma({acc}[n], fa, *(const unsigned*)b0, *(const unsigned*)(b0 + 8));"
        );
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
    }

    /// `out[n] += P X` where P (16 rows × 64, the accumulators `p`) is the A operand, rounded to bf16, and X
    /// (64 rows × `w` columns, row-major at `x` with pitch `ld`) is read transposed by `ldmatrix`.
    fn product_px(&self, s: &mut String, out: &str, p: &str, x: &str, ld: usize, w: usize) {
        let fill = [
            format!("pa[0] = FULGUR_FN_pack({p}[2 * kt][0], {p}[2 * kt][1]);"),
            format!("pa[1] = FULGUR_FN_pack({p}[2 * kt][2], {p}[2 * kt][3]);"),
            format!("pa[2] = FULGUR_FN_pack({p}[2 * kt + 1][0], {p}[2 * kt + 1][1]);"),
            format!("pa[3] = FULGUR_FN_pack({p}[2 * kt + 1][2], {p}[2 * kt + 1][3]);"),
        ];
        self.product_ax(s, out, (B / 16, "pa", &fill), x, ld, w);
    }

    /// `out[n] += A X` over `kts` slabs of 16 along the shared dim: A's fragment `a` (16 rows × 16) filled by the
    /// statements `fill` for slab `kt`, X (`16 · kts` rows × `w` columns, row-major at `x` with pitch `ld`) read
    /// transposed by `ldmatrix`.
    fn product_ax(
        &self,
        s: &mut String,
        out: &str,
        (kts, a, fill): (usize, &str, &[String]),
        x: &str,
        ld: usize,
        w: usize,
    ) {
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int kt = 0; kt < {kts}; ++kt) {{");
        let _ = writeln!(s, "      unsigned {a}[4];");
        for line in fill {
            let _ = writeln!(s, "      {line}");
        }
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int np = 0; np < {}; ++np) {{", w / 16);
        let _ = writeln!(s, "        unsigned fb[4];");
        let _ = writeln!(
            s,
            "        FULGUR_FN_ldt(fb, {x} + (kt * 16 + (lane >> 3 & 1) * 8 + (lane & 7)) * {ld} + np * 16 + (lane >> 4) * 8);"
        );
        let _ = writeln!(s, "        FULGUR_FN_mma({out}[2 * np], {a}, fb[0], fb[1]);");
        let _ = writeln!(s, "        FULGUR_FN_mma({out}[2 * np + 1], {a}, fb[2], fb[3]);");
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
    }

    fn zero(&self, s: &mut String, name: &str, w: usize) {
        let _ = writeln!(s, "  float {name}[{}][4];", w / 8);
        let _ = writeln!(s, "  #pragma unroll");
        let _ = writeln!(
            s,
            "  for (int n = 0; n < {}; ++n) {name}[n][0] = {name}[n][1] = {name}[n][2] = {name}[n][3] = 0.0f;",
            w / 8
        );
    }

    /// Stores accumulators `acc` (rows `r0`, `r0 + 8` of the tile starting at row `base`, `w` columns) times
    /// `muls` (the suffix of row `r0`'s value, then `r1`'s) into view `i`, the rows below `n`.
    fn store(&self, s: &mut String, i: usize, acc: &str, (base, n): (&str, &str), w: usize, muls: [&str; 2]) {
        let name = &self.offsets[i].0;
        let (rs, cs) = &self.strides[i];
        let slot = self.slots[i];
        let _ = writeln!(s, "  #pragma unroll");
        let _ = writeln!(s, "  for (int n = 0; n < {}; ++n) {{", w / 8);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int e = 0; e < 2; ++e) {{");
        let _ = writeln!(s, "      const i64 cc = n * 8 + 2 * c + e;");
        for (h, row, mul) in [(0, "r0", muls[0]), (2, "r1", muls[1])] {
            let _ = writeln!(
                s,
                "      if ({base} + {row} < {n}) ((unsigned short*)s{slot})[{name}_off + ({base} + {row}) * {rs} + cc * {cs}] \
                 = fulgur_to_bf16({acc}[n][{h} + e]{mul});"
            );
        }
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "  }}");
    }

    /// The validity `v0`, `v1` of key `u` (column `n * 8 + 2c + e` of tile `u0`) for the lane's two rows.
    fn mask(&self, s: &mut String) {
        let _ = writeln!(s, "        const i64 u = u0 + n * 8 + 2 * c + e;");
        if self.causal {
            let _ = writeln!(
                s,
                "        const bool v0 = u < kend && u <= lim0, v1 = u < kend && u <= lim1;"
            );
        } else {
            let _ = writeln!(s, "        const bool v0 = u < kend, v1 = v0;");
        }
    }

    /// Key and value tile `u0` into `Ks` and `Vs` (the keys rotated where the template has a rotary embedding).
    fn load_kv(&self, s: &mut String) {
        let (d, dv) = (self.d, self.dv);
        let _ = writeln!(s, "    __syncthreads();");
        let _ = writeln!(s, "    {}", self.tile(1, "Ks", d + 8, "u0", "kend", d));
        let _ = writeln!(s, "    {}", self.tile(2, "Vs", dv + 8, "u0", "kend", dv));
        let _ = writeln!(s, "    __syncthreads();");
        if self.rope.is_some() {
            self.rotate(s, "Ks", "u0", "kend");
        }
    }

    /// Rotates the first dims of the staged rows of `tile` (rows from `r0`, those below `n`) in place, in f32
    /// from their bf16 values, rounding back to bf16: `x · cos + rotate_half(x) · sin` at each row's position.
    fn rotate(&self, s: &mut String, tile: &str, r0: &str, n: &str) {
        let Some((r, cos, sin)) = &self.rope else {
            return;
        };
        let (h, ld) = (r / 2, self.d + 8);
        let at = |t: &Table, col: &str| {
            let (slot, dt, off, rs, cs) = t;
            load_text(*slot, *dt, &format!("{off} + pos * {rs} + ({col}) * {cs}"))
        };
        let _ = writeln!(
            s,
            "    for (int x = threadIdx.x; x < {}; x += {}) {{",
            B * h,
            FLASH_WARPS * 32
        );
        let _ = writeln!(s, "      const int r = x / {h}, i = x - r * {h};");
        let _ = writeln!(s, "      const i64 pos = {r0} + r;");
        let _ = writeln!(s, "      if (pos < {n}) {{");
        let _ = writeln!(s, "        unsigned short* row = {tile} + r * {ld};");
        let _ = writeln!(
            s,
            "        const float a = fulgur_from_bf16(row[i]), b = fulgur_from_bf16(row[i + {h}]);"
        );
        let _ = writeln!(
            s,
            "        row[i] = fulgur_to_bf16(a * {} + -b * {});",
            at(cos, "i"),
            at(sin, "i")
        );
        let _ = writeln!(
            s,
            "        row[i + {h}] = fulgur_to_bf16(b * {} + a * {});",
            at(cos, &format!("i + {h}")),
            at(sin, &format!("i + {h}"))
        );
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "    __syncthreads();");
    }

    /// A function's start: its helpers, its signature, and its shared tiles (`(name, pitch, note)`, bf16 rows of
    /// [`B`] one after the other).
    /// `min_blocks`: the blocks an SM should hold at once (`__launch_bounds__`' second argument, which caps
    /// the registers a thread may take); 0 leaves it to the compiler.
    fn header(&self, s: &mut String, tiles: &[(&str, usize, &str)], min_blocks: u32) {
        self.helpers(s);
        let bounds = if min_blocks > 0 {
            format!("{}, {min_blocks}", FLASH_WARPS * 32)
        } else {
            format!("{}", FLASH_WARPS * 32)
        };
        let _ = writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({bounds}) FULGUR_FN(FULGUR_SIGNATURE) {{"
        );
        let _ = writeln!(s, "  extern __shared__ float fulgur_smem[];");
        let mut prev: Option<(&str, usize)> = None;
        for &(name, pitch, note) in tiles {
            match prev {
                None => {
                    let _ = writeln!(
                        s,
                        "  unsigned short* {name} = (unsigned short*)fulgur_smem; // {note}[{B}][{pitch}]"
                    );
                }
                Some((p, pp)) => {
                    let _ = writeln!(
                        s,
                        "  unsigned short* {name} = {p} + {};  // {note}[{B}][{pitch}]",
                        B * pp
                    );
                }
            }
            prev = Some((name, pitch));
        }
    }

    /// The lane's place in its warp's fragments, the grid guard, and the query and key counts.
    fn locals(&self, s: &mut String) {
        let _ = writeln!(s, "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;");
        let _ = writeln!(s, "  const int g = lane >> 2, c = lane & 3, wr = warp * 16;");
        let _ = writeln!(s, "  if ((i64)blockIdx.x >= fulgur_grid) return;");
        let _ = writeln!(s, "  const i64 T = {}, S = {};", self.tt, self.st);
    }

    /// The block's query tile `t0` (its `rows`) and its batch index decoded into every view's offset. Blocks
    /// go tile by tile, every batch index of a tile together; under a causal mask the last tile (which sees
    /// every key) first, so that the longest blocks start in the first wave and the short ones fill the tail.
    fn query_block(&self, s: &mut String) {
        let _ = writeln!(s, "  const i64 nqb = (T + {}) / {B};", B - 1);
        let _ = writeln!(s, "  const i64 nbat = fulgur_grid / nqb;");
        let _ = writeln!(s, "  const i64 qb = (i64)blockIdx.x / nbat;");
        if self.causal {
            let _ = writeln!(s, "  const i64 t0 = (nqb - 1 - qb) * {B};");
        } else {
            let _ = writeln!(s, "  const i64 t0 = qb * {B};");
        }
        let _ = writeln!(s, "  i64 rest = (i64)blockIdx.x % nbat;");
        let _ = writeln!(s, "  const i64 rows = T - t0 < {B} ? T - t0 : {B};");
        self.decode(s, "rest", &|_| true, false);
    }

    /// Combines `a` and `b` across the 4 lanes that hold a row (`+`, or the maximum), at `indent`.
    fn quad(&self, s: &mut String, indent: &str, [a, b]: [&str; 2], max: bool) {
        let _ = writeln!(s, "{indent}#pragma unroll");
        let _ = writeln!(s, "{indent}for (int w = 1; w < 4; w <<= 1) {{");
        for v in [a, b] {
            if max {
                let _ = writeln!(
                    s,
                    "{indent}  {v} = fulgur_fmax({v}, __shfl_xor_sync(0xffffffffu, {v}, w));"
                );
            } else {
                let _ = writeln!(s, "{indent}  {v} += __shfl_xor_sync(0xffffffffu, {v}, w);");
            }
        }
        let _ = writeln!(s, "{indent}}}");
    }

    /// The forward template's text.
    fn forward_text(&self) -> String {
        let (d, dv) = (self.d, self.dv);
        let (dp, dvp) = (d + 8, dv + 8);
        let mut s = String::new();
        let _ =
            writeln!(
            s,
            "// flash attention{} on the tensor cores: blocks of {B} query rows (16 a warp), key/value tiles of {B} \
             in shared memory as bf16, S = Q Kᵀ and O += P V by mma.m16n8k16 (bf16 in, f32 accumulate), online \
             softmax per tile in f32 (scale {}{})",
            if self.rope.is_some() { " with rotary q and k" } else { "" },
            self.scale,
            if self.causal { ", causal" } else { "" }
        );
        self.header(&mut s, &[("Qs", dp, ""), ("Ks", dp, ""), ("Vs", dvp, "")], 0);
        self.locals(&mut s);
        self.query_block(&mut s);
        let _ = writeln!(s, "  {}", self.tile(0, "Qs", dp, "t0", "T", d));
        let _ = writeln!(s, "  __syncthreads();");
        self.rotate(&mut s, "Qs", "t0", "T");
        self.forward_pass(&mut s);
        self.quad(&mut s, "  ", ["l0", "l1"], false);
        let _ = writeln!(s, "  const int r0 = wr + g, r1 = r0 + 8;");
        self.store(&mut s, 3, "acc", ("t0", "T"), dv, [" / l0", " / l1"]);
        let _ = writeln!(s, "}}");
        s
    }

    /// The forward over the key tiles for the block's query rows (staged in `Qs`): declares `kend`, `lim0`,
    /// `lim1`, and leaves the rows' unnormalised outputs in `acc`, their running maxima in `m0`, `m1` and this
    /// lane's share of their sums in `l0`, `l1`. Key and value tiles go through `Ks` and `Vs`, the keys
    /// rotated in place where the template has a rotary embedding.
    fn forward_pass(&self, s: &mut String) {
        let (d, dv) = (self.d, self.dv);
        let (dp, dvp) = (d + 8, dv + 8);
        let sc = &self.scale;
        if self.causal {
            let _ = writeln!(
                s,
                "  i64 kend = t0 + rows + (S - T); if (kend > S) kend = S; if (kend < 0) kend = 0;"
            );
        } else {
            let _ = writeln!(s, "  const i64 kend = S;");
        }
        let _ = writeln!(s, "  const i64 lim0 = t0 + wr + g + (S - T), lim1 = lim0 + 8;");
        // pass 1: the forward
        self.zero(s, "acc", dv);
        let _ = writeln!(s, "  float m0 = {NINF}, m1 = {NINF}, l0 = 0.0f, l1 = 0.0f;");
        let _ = writeln!(s, "  for (i64 u0 = 0; u0 < kend; u0 += {B}) {{");
        self.load_kv(s);
        self.product_abt(s, "sc", ("Qs", dp), ("Ks", dp), d / 16);
        let _ = writeln!(s, "    float x0 = {NINF}, x1 = {NINF};");
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int e = 0; e < 2; ++e) {{");
        self.mask(s);
        let _ = writeln!(s, "        sc[n][e] = v0 ? sc[n][e] * {sc} : {NINF};");
        let _ = writeln!(s, "        sc[n][2 + e] = v1 ? sc[n][2 + e] * {sc} : {NINF};");
        let _ = writeln!(
            s,
            "        x0 = fulgur_fmax(x0, sc[n][e]); x1 = fulgur_fmax(x1, sc[n][2 + e]);"
        );
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        self.quad(s, "    ", ["x0", "x1"], true);
        let _ = writeln!(s, "    const float n0 = fulgur_fmax(m0, x0), n1 = fulgur_fmax(m1, x1);");
        let _ = writeln!(
            s,
            "    const float z0 = n0 == {NINF} ? 0.0f : n0, z1 = n1 == {NINF} ? 0.0f : n1;"
        );
        let _ = writeln!(s, "    const float f0 = expf(m0 - z0), f1 = expf(m1 - z1);");
        let _ = writeln!(s, "    m0 = n0; m1 = n1; l0 *= f0; l1 *= f1;");
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(
            s,
            "    for (int n = 0; n < {}; ++n) {{ acc[n][0] *= f0; acc[n][1] *= f0; acc[n][2] *= f1; acc[n][3] *= f1; }}",
            dv / 8
        );
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(
            s,
            "      sc[n][0] = expf(sc[n][0] - z0); sc[n][1] = expf(sc[n][1] - z0);"
        );
        let _ = writeln!(
            s,
            "      sc[n][2] = expf(sc[n][2] - z1); sc[n][3] = expf(sc[n][3] - z1);"
        );
        let _ = writeln!(s, "      l0 += sc[n][0] + sc[n][1]; l1 += sc[n][2] + sc[n][3];");
        let _ = writeln!(s, "    }}");
        self.product_px(s, "acc", "sc", "Vs", dvp, dv);
        let _ = writeln!(s, "  }}");
    }

    fn dq_template(&self) -> String {
        let (d, dv) = (self.d, self.dv);
        let (dp, dvp) = (d + 8, dv + 8);
        let sc = &self.scale;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// flash attention's gradient, dq: blocks of {B} query rows (16 a warp); a forward pass over the key \
             tiles for each row's log-sum-exp and Σ O ⊙ dO, then dQ += dS K (scale {sc}{})",
            if self.causal { ", causal" } else { "" }
        );
        self.header(
            &mut s,
            &[("Qs", dp, ""), ("Os", dvp, "dO "), ("Ks", dp, ""), ("Vs", dvp, "")],
            grad_min_blocks(),
        );
        self.locals(&mut s);
        self.query_block(&mut s);
        let _ = writeln!(s, "  {}", self.tile(0, "Qs", dp, "t0", "T", d));
        let _ = writeln!(s, "  {}", self.tile(3, "Os", dvp, "t0", "T", dv));
        self.forward_pass(&mut s);
        // the rows' log-sum-exp and delta = Σ O ⊙ dO (a row that sees no key: lse +∞, so that P is 0)
        self.quad(&mut s, "  ", ["l0", "l1"], false);
        let _ = writeln!(s, "  const int r0 = wr + g, r1 = r0 + 8;");
        let _ = writeln!(s, "  float d0 = 0.0f, d1 = 0.0f;");
        let _ = writeln!(s, "  #pragma unroll");
        let _ = writeln!(s, "  for (int n = 0; n < {}; ++n) {{", dv / 8);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int e = 0; e < 2; ++e) {{");
        let _ = writeln!(s, "      const int cc = n * 8 + 2 * c + e;");
        let _ = writeln!(s, "      d0 += acc[n][e] * fulgur_from_bf16(Os[r0 * {dvp} + cc]);");
        let _ = writeln!(s, "      d1 += acc[n][2 + e] * fulgur_from_bf16(Os[r1 * {dvp} + cc]);");
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "  }}");
        self.quad(&mut s, "  ", ["d0", "d1"], false);
        let _ = writeln!(s, "  const float lse0 = l0 > 0.0f ? m0 + logf(l0) : {PINF};");
        let _ = writeln!(s, "  const float lse1 = l1 > 0.0f ? m1 + logf(l1) : {PINF};");
        let _ = writeln!(
            s,
            "  const float dl0 = l0 > 0.0f ? d0 / l0 : 0.0f, dl1 = l1 > 0.0f ? d1 / l1 : 0.0f;"
        );
        let _ = writeln!(s, "  if (c == 0) {{");
        for (row, l, dl) in [("r0", "lse0", "dl0"), ("r1", "lse1", "dl1")] {
            let _ = writeln!(s, "    if ({row} < rows) {{");
            let _ = writeln!(s, "      ((float*)s{})[bflat * T + t0 + {row}] = {l};", self.lse);
            let _ = writeln!(s, "      ((float*)s{})[bflat * T + t0 + {row}] = {dl};", self.delta);
            let _ = writeln!(s, "    }}");
        }
        let _ = writeln!(s, "  }}");
        // pass 2: dQ
        self.zero(&mut s, "dq", d);
        let _ = writeln!(s, "  for (i64 u0 = 0; u0 < kend; u0 += {B}) {{");
        self.load_kv(&mut s);
        self.product_abt(&mut s, "sc", ("Qs", dp), ("Ks", dp), d / 16);
        self.product_abt(&mut s, "dp", ("Os", dvp), ("Vs", dvp), dv / 16);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int e = 0; e < 2; ++e) {{");
        self.mask(&mut s);
        let _ = writeln!(
            s,
            "        sc[n][e] = v0 ? expf(sc[n][e] * {sc} - lse0) * (dp[n][e] - dl0) : 0.0f;"
        );
        let _ = writeln!(
            s,
            "        sc[n][2 + e] = v1 ? expf(sc[n][2 + e] * {sc} - lse1) * (dp[n][2 + e] - dl1) : 0.0f;"
        );
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        self.product_px(&mut s, "dq", "sc", "Ks", dp, d);
        let _ = writeln!(s, "  }}");
        let m = format!(" * {sc}");
        self.store(&mut s, 4, "dq", ("t0", "T"), d, [&m, &m]);
        let _ = writeln!(s, "}}");
        s
    }

    fn dkv_template(&self, bcast: &[bool]) -> String {
        let (d, dv) = (self.d, self.dv);
        let (dp, dvp) = (d + 8, dv + 8);
        let sc = &self.scale;
        let groups: Vec<usize> = (0..self.nb).filter(|&a| bcast[a]).collect();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// flash attention's gradient, dk and dv: blocks of {B} keys (16 a warp) of one key/value batch index, \
             over the query heads sharing them ({} broadcast axes) and their query tiles: dV += Pᵀ dO, dK += dSᵀ Q \
             (scale {sc}{})",
            groups.len(),
            if self.causal { ", causal" } else { "" }
        );
        self.header(
            &mut s,
            &[("Ks", dp, ""), ("Vs", dvp, ""), ("Qs", dp, ""), ("Os", dvp, "dO ")],
            0,
        );
        let _ = writeln!(
            s,
            "  float* Ls = (float*)(Os + {});  // the tile's lse and delta",
            B * dvp
        );
        let _ = writeln!(s, "  float* Ds = Ls + {B};");
        self.locals(&mut s);
        let _ = writeln!(s, "  const i64 nsb = (S + {}) / {B};", B - 1);
        // key tile by key tile, every key/value batch index of a tile together: the first tile (which every
        // query under a causal mask sees, the longest block) first
        let _ = writeln!(s, "  const i64 nkb = fulgur_grid / nsb;");
        let _ = writeln!(s, "  const i64 kb0 = ((i64)blockIdx.x / nkb) * {B};");
        let _ = writeln!(s, "  i64 rest = (i64)blockIdx.x % nkb;");
        self.decode(&mut s, "rest", &|a| !bcast[a], false);
        let _ = writeln!(s, "  {}", self.tile(1, "Ks", dp, "kb0", "S", d));
        let _ = writeln!(s, "  {}", self.tile(2, "Vs", dvp, "kb0", "S", dv));
        self.zero(&mut s, "dk", d);
        self.zero(&mut s, "dv", dv);
        let _ = writeln!(s, "  const i64 key0 = kb0 + wr + g, key1 = key0 + 8;");
        // the first query that sees the block's first key: t + (S − T) >= s0
        if self.causal {
            let _ = writeln!(
                s,
                "  i64 qstart = kb0 - (S - T); if (qstart < 0) qstart = 0; qstart = qstart / {B} * {B};"
            );
        } else {
            let _ = writeln!(s, "  const i64 qstart = 0;");
        }
        let gcount = if groups.is_empty() {
            "1".to_string()
        } else {
            groups
                .iter()
                .map(|&a| self.exts[a].clone())
                .collect::<Vec<_>>()
                .join(" * ")
        };
        let _ = writeln!(s, "  const i64 qo_off = q_off, oo_off = o_off, bflat0 = bflat;");
        let _ = writeln!(s, "  for (i64 gi = 0; gi < {gcount}; ++gi) {{");
        let _ = writeln!(s, "  q_off = qo_off; o_off = oo_off; bflat = bflat0;");
        let _ = writeln!(s, "  i64 grest = gi;");
        // only q, o and bflat vary along the broadcast axes (k, v and their gradients do not)
        let mut g = String::new();
        self.decode(&mut g, "grest", &|a| bcast[a], true);
        s.push_str(&g);
        let _ = writeln!(s, "  for (i64 t0 = qstart; t0 < T; t0 += {B}) {{");
        let _ = writeln!(s, "    __syncthreads();");
        let _ = writeln!(s, "    {}", self.tile(0, "Qs", dp, "t0", "T", d));
        let _ = writeln!(s, "    {}", self.tile(3, "Os", dvp, "t0", "T", dv));
        let _ = writeln!(
            s,
            "    for (int x = threadIdx.x; x < {B}; x += {}) {{",
            FLASH_WARPS * 32
        );
        let _ = writeln!(s, "      const i64 t = t0 + x;");
        let _ = writeln!(
            s,
            "      Ls[x] = t < T ? ((const float*)s{})[bflat * T + t] : {PINF};",
            self.lse
        );
        let _ = writeln!(
            s,
            "      Ds[x] = t < T ? ((const float*)s{})[bflat * T + t] : 0.0f;",
            self.delta
        );
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "    __syncthreads();");
        self.product_abt(&mut s, "sc", ("Ks", dp), ("Qs", dp), d / 16);
        self.product_abt(&mut s, "dp", ("Vs", dvp), ("Os", dvp), dv / 16);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int e = 0; e < 2; ++e) {{");
        let _ = writeln!(s, "        const int j = n * 8 + 2 * c + e;");
        let _ = writeln!(s, "        const float ls = Ls[j], dl = Ds[j];");
        if self.causal {
            let _ = writeln!(s, "        const i64 lim = t0 + j + (S - T);");
            let _ = writeln!(s, "        const bool v0 = key0 <= lim, v1 = key1 <= lim;");
        } else {
            let _ = writeln!(s, "        const bool v0 = true, v1 = true;");
        }
        let _ = writeln!(s, "        const float p0 = v0 ? expf(sc[n][e] * {sc} - ls) : 0.0f;");
        let _ = writeln!(
            s,
            "        const float p1 = v1 ? expf(sc[n][2 + e] * {sc} - ls) : 0.0f;"
        );
        let _ = writeln!(
            s,
            "        dp[n][e] = p0 * (dp[n][e] - dl); dp[n][2 + e] = p1 * (dp[n][2 + e] - dl);"
        );
        let _ = writeln!(s, "        sc[n][e] = p0; sc[n][2 + e] = p1;");
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        self.product_px(&mut s, "dv", "sc", "Os", dvp, dv);
        self.product_px(&mut s, "dk", "dp", "Qs", dp, d);
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "  const int r0 = wr + g, r1 = r0 + 8;");
        let m = format!(" * {sc}");
        self.store(&mut s, 5, "dk", ("kb0", "S"), d, [&m, &m]);
        self.store(&mut s, 6, "dv", ("kb0", "S"), dv, ["", ""]);
        let _ = writeln!(s, "}}");
        s
    }
}

/// Value columns per block of the lightning template (the state's columns a block carries).
const LIGHTNING_COLS: usize = 64;

/// Whether a `lightning_attention` kernel takes the tensor-core form: blocks of 64, bf16 `q`, `k`, `v` and
/// out, one sequence length, a key dim of 64 or 128 (each warp carries a quarter of the state's rows) and a
/// value dim that is a multiple of 16 up to 64, or 128.
pub(super) fn lightning_applies(k: &Kernel, block: usize) -> bool {
    if block != B || k.inputs.len() != 4 || k.outputs.len() != 1 {
        return false;
    }
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.outputs[0]);
    let r = qt.shape.len();
    if r < 2 || kt.shape.len() != r || vt.shape.len() != r || ot.shape.len() != r || !k.inputs[3].dtype.is_float() {
        return false;
    }
    if [qt, kt, vt, ot].iter().any(|t| t.dtype != DType::BF16) {
        return false;
    }
    if qt.shape[r - 2] != kt.shape[r - 2] || qt.shape[r - 2] != vt.shape[r - 2] || ot.shape[r - 2] != qt.shape[r - 2] {
        return false;
    }
    let (Some(d), Some(dk), Some(dv)) = (
        qt.shape[r - 1].as_const(),
        kt.shape[r - 1].as_const(),
        vt.shape[r - 1].as_const(),
    ) else {
        return false;
    };
    d == dk
        && (d == 64 || d == 128)
        && ot.shape[r - 1].as_const() == Some(dv)
        && ((dv > 0 && dv <= 64 && dv % 16 == 0) || dv == 128)
}

/// Rows of a chunk of the lightning templates: the sequence is cut into chunks of this many rows, each
/// walked by its own thread blocks (the state entering a chunk comes from the chunk-state pass).
const LIGHTNING_CHUNK: usize = 1024;

/// The lightning templates of a kernel [`lightning_applies`] holds for: each its function text (name
/// `FULGUR_FN`), its number of blocks and its bytes of shared memory. Builds its own slots and scratch: the
/// caller has dropped the loop form's.
///
/// The sequence is cut into chunks of [`LIGHTNING_CHUNK`] rows, so that a sequence-head's rows run in
/// parallel: a long single sequence of few heads fills the GPU as a batch of short ones does. Both passes run a
/// block of four warps per (sequence-head, chunk, slice of up to [`LIGHTNING_COLS`] value columns), carrying
/// the state `P [D, cols]` in f32 registers (each warp a quarter of its rows) across the chunk's blocks of 64
/// rows, with the decays `dec[n] = exp(−λ n)` and `KD = k ⊙ dec[63 − j]` (rounded to bf16):
///
/// 1. the chunk states: from zero, `P ← dec[64] P + KDᵀ V` over the chunk's blocks, written as f32 scratch
///    (the last chunk's is never read and not computed);
/// 2. the outputs: the state entering chunk `c` is `Σ_{c' < c} dec[chunk]^(c − 1 − c') P_{c'}`; then per block
///    `S = Q Kᵀ` (a warp's 16 rows), masked to `dec[i − j]` on and below the diagonal; `O = S V + dec[i + 1] ·
///    (Q P)`, with `P` staged as bf16; then `P ← dec[64] P + KDᵀ V`.
///
/// The numerics are the loop form's: the state carried in f32 and rounded where it is an operand, the masked
/// scores rounded to bf16 for `S V` (`docs/numerics.md`); the chunks only change the order of the f32 sums.
pub(super) fn lightning_templates(lk: &mut LoopKernel, k: &Kernel) -> Vec<(String, E, u32)> {
    let (qt, kt, vt, ot) = (&k.inputs[0], &k.inputs[1], &k.inputs[2], &k.outputs[0]);
    let views = [
        ("q", Slot::Input(0), qt),
        ("k", Slot::Input(1), kt),
        ("v", Slot::Input(2), vt),
        ("out", Slot::Output(0), ot),
        ("lam", Slot::Input(3), &k.inputs[3]),
    ];
    let ctx = Ctx::new(lk, &views, ot, kt, 1.0, true);
    let (d, dv) = (ctx.d, ctx.dv);
    let cols = dv.min(LIGHTNING_COLS);
    let slices = dv / cols;
    let rows = ot.shape[ot.shape.len() - 2].clone();
    let chunks = rows.ceil_div(&Dim::from(LIGHTNING_CHUNK as i64));
    let batch = (0..ctx.nb).fold(Dim::from(1), |x, a| x * ctx.batch[a].clone());
    let blocks = batch * chunks * Dim::from(slices as i64);
    // the chunk states, f32, [blocks][d][cols]: a block's own index places its chunk's state
    let states = lk.scratch(DType::F32, blocks.clone() * Dim::from((d * cols) as i64));
    let items = lk.dim(&blocks);
    let (dp, cp) = (d + 8, cols + 8);
    let lt = LightningText {
        ctx: &ctx,
        lam: super::load_text(ctx.slots[4], k.inputs[3].dtype, "lam_off"),
        states,
        d,
        cols,
        slices,
        dp,
        cp,
    };
    let smem_states = (B + 8) * 4 + (2 * B * dp + B * cp) * 2;
    let smem_out = (B + 8) * 4 + (3 * B * dp + B * cp + d * cp) * 2;
    vec![
        (lt.states_text(), items, smem_states as u32),
        (lt.outputs_text(), items, smem_out as u32),
    ]
}

/// What both lightning templates' text needs.
struct LightningText<'a> {
    ctx: &'a Ctx,
    /// λ's load (C), from `lam_off`.
    lam: String,
    /// The chunk states' scratch slot.
    states: u32,
    d: usize,
    cols: usize,
    slices: usize,
    /// Pitches of the staged tiles: key dims and value columns, padded.
    dp: usize,
    cp: usize,
}

impl LightningText<'_> {
    /// The signature, shared memory, the block's coordinates (`cb` its first value column, `chunk`, `nc` the
    /// chunks, the views' offsets), λ, the decays `dec[0..=64]`, the state `st` at zero and the chunk's rows
    /// `[c0, c1)`.
    fn prologue(&self, s: &mut String, tiles: &[(&str, usize)]) {
        let (ctx, d, cols, slices) = (self.ctx, self.d, self.cols, self.slices);
        let threads = FLASH_WARPS as usize * 32;
        ctx.helpers(s);
        let _ = writeln!(
            s,
            "extern \"C\" __global__ void __launch_bounds__({threads}) FULGUR_FN(FULGUR_SIGNATURE) {{"
        );
        let _ = writeln!(s, "  extern __shared__ float fulgur_smem[];");
        let _ = writeln!(s, "  float* dec = fulgur_smem; // [{}]", B + 8);
        let mut prev = format!("(unsigned short*)(dec + {})", B + 8);
        for (name, len) in tiles {
            let _ = writeln!(s, "  unsigned short* {name} = {prev}; // {len} elements");
            prev = format!("{name} + {len}");
        }
        let _ = writeln!(s, "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;");
        let _ = writeln!(s, "  const int g = lane >> 2, c = lane & 3, wr = warp * 16;");
        let _ = writeln!(s, "  if ((i64)blockIdx.x >= fulgur_grid) return;");
        let _ = writeln!(s, "  const i64 T = {};", ctx.tt);
        let _ = writeln!(s, "  const i64 nc = (T + {LIGHTNING_CHUNK} - 1) / {LIGHTNING_CHUNK};");
        let _ = writeln!(s, "  const i64 cb = ((i64)blockIdx.x % {slices}) * {cols};");
        let _ = writeln!(s, "  i64 rest = (i64)blockIdx.x / {slices};");
        let _ = writeln!(s, "  const i64 chunk = rest % nc;");
        let _ = writeln!(s, "  rest /= nc;");
        let _ = writeln!(s, "  const i64 c0 = chunk * {LIGHTNING_CHUNK};");
        let _ = writeln!(s, "  const i64 c1 = min(T, c0 + {LIGHTNING_CHUNK});");
        ctx.decode(s, "rest", &|_| true, false);
        let (v_cs, o_cs) = (&ctx.strides[2].1, &ctx.strides[3].1);
        let _ = writeln!(s, "  v_off += cb * {v_cs};");
        let _ = writeln!(s, "  out_off += cb * {o_cs};");
        let _ = writeln!(s, "  const float lam = {};", self.lam);
        let _ = writeln!(
            s,
            "  for (int x = threadIdx.x; x <= {B}; x += {threads}) dec[x] = expf(-(lam * (float)x));"
        );
        let _ = writeln!(s, "  float st[{}][{}][4];", d / 64, cols / 8);
        let _ = writeln!(s, "  #pragma unroll");
        let _ = writeln!(s, "  for (int m = 0; m < {}; ++m)", d / 64);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(
            s,
            "    for (int n = 0; n < {}; ++n) st[m][n][0] = st[m][n][1] = st[m][n][2] = st[m][n][3] = 0.0f;",
            cols / 8
        );
        let _ = writeln!(s, "  const int r0 = wr + g, r1 = r0 + 8;");
        let _ = writeln!(s, "  float* states = (float*)s{};", self.states);
    }

    /// For every element of the warp's rows of the state: `body` with `m`, `n`, the element's row `row`,
    /// column `col` and accumulator pair `h` (0: `st[m][n][0..2]`, 1: `[2..4]`) in scope.
    fn each_pair(&self, s: &mut String, body: &str) {
        let _ = writeln!(s, "  #pragma unroll");
        let _ = writeln!(s, "  for (int m = 0; m < {}; ++m) {{", self.d / 64);
        let _ = writeln!(s, "    const int m0 = warp * {} + m * 16;", self.d / 4);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", self.cols / 8);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int h = 0; h < 2; ++h) {{");
        let _ = writeln!(s, "        const int row = m0 + g + 8 * h, col = n * 8 + 2 * c;");
        let _ = writeln!(s, "        {body}");
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "  }}");
    }

    /// `KD = K ⊙ dec[63 − j]` into `KDs` (rows past the end are zero in `Ks`), then `P ← dec[64] P + KDᵀ V`:
    /// the warp's rows of the state, KD read transposed as the A operand.
    fn advance_state(&self, s: &mut String) {
        let (d, dp, cp, cols) = (self.d, self.dp, self.cp, self.cols);
        let threads = FLASH_WARPS as usize * 32;
        let _ = writeln!(s, "    for (int x = threadIdx.x; x < {}; x += {threads}) {{", B * d);
        let _ = writeln!(s, "      const int j = x / {d}, i = x - j * {d};");
        let _ = writeln!(
            s,
            "      KDs[j * {dp} + i] = fulgur_to_bf16(fulgur_from_bf16(Ks[j * {dp} + i]) * dec[{} - j]);",
            B - 1
        );
        let _ = writeln!(s, "    }}");
        let _ = writeln!(s, "    __syncthreads();");
        let _ = writeln!(s, "    const float bd = dec[{B}];");
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int m = 0; m < {}; ++m) {{", d / 64);
        let _ = writeln!(s, "      const int m0 = warp * {} + m * 16;", d / 4);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int n = 0; n < {}; ++n) {{", cols / 8);
        let _ = writeln!(
            s,
            "        st[m][n][0] *= bd; st[m][n][1] *= bd; st[m][n][2] *= bd; st[m][n][3] *= bd;"
        );
        let _ = writeln!(s, "      }}");
        let fill = [format!(
            "FULGUR_FN_ldt(fa, KDs + (kt * 16 + (lane & 7) + (lane >> 4) * 8) * {dp} + m0 + (lane >> 3 & 1) * 8);"
        )];
        self.ctx.product_ax(s, "st[m]", (B / 16, "fa", &fill), "Vs", cp, cols);
        let _ = writeln!(s, "    }}");
    }

    /// Pass 1: each chunk's own state contribution, from zero, into the scratch at the block's index.
    fn states_text(&self) -> String {
        let (ctx, d, dp, cp, cols) = (self.ctx, self.d, self.dp, self.cp, self.cols);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// lightning attention, pass 1 of 2: the state each chunk of {LIGHTNING_CHUNK} rows adds, \
             P_c = Σ_blocks dec[64]^(later blocks) (K ⊙ k_decay)ᵀ V, for {cols} value columns, by \
             mma.m16n8k16 (bf16 in, f32 accumulate)"
        );
        self.prologue(&mut s, &[("Ks", B * dp), ("KDs", B * dp), ("Vs", B * cp)]);
        let _ = writeln!(
            s,
            "  if (chunk == nc - 1) return;  // the last chunk's state is never read"
        );
        let _ = writeln!(s, "  for (i64 t0 = c0; t0 < c1; t0 += {B}) {{");
        let _ = writeln!(s, "    __syncthreads();");
        let _ = writeln!(s, "    {}", ctx.tile(1, "Ks", dp, "t0", "c1", d));
        let _ = writeln!(s, "    {}", ctx.tile(2, "Vs", cp, "t0", "c1", cols));
        let _ = writeln!(s, "    __syncthreads();");
        self.advance_state(&mut s);
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "  float* own = states + (i64)blockIdx.x * {};", d * cols);
        self.each_pair(
            &mut s,
            &format!("*(float2*)(own + row * {cols} + col) = make_float2(st[m][n][2 * h], st[m][n][2 * h + 1]);"),
        );
        let _ = writeln!(s, "}}");
        s
    }

    /// Pass 2: the state entering the chunk from the earlier chunks' states, then the chunk's outputs.
    fn outputs_text(&self) -> String {
        let (ctx, d, dp, cp, cols, slices) = (self.ctx, self.d, self.dp, self.cp, self.cols, self.slices);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "// lightning attention, pass 2 of 2: a block per (sequence-head, chunk of {LIGHTNING_CHUNK} rows, \
             {cols} value columns), the state [{d}][{cols}] entering the chunk summed from pass 1's and carried in \
             f32 registers across blocks of {B} rows; S = Q Kᵀ, O = (S ⊙ M) V + q_decay ⊙ (Q P), P ← e^(-64λ) P + \
             (K ⊙ k_decay)ᵀ V by mma.m16n8k16 (bf16 in, f32 accumulate)"
        );
        self.prologue(
            &mut s,
            &[
                ("Qs", B * dp),
                ("Ks", B * dp),
                ("KDs", B * dp),
                ("Vs", B * cp),
                ("Ps", d * cp),
            ],
        );
        // the entering state: P = Σ_{c' < chunk} dec[chunk]^(chunk − 1 − c') P_c' (chunk 0's block for c' = 0)
        let _ = writeln!(s, "  const float cd = expf(-(lam * (float){LIGHTNING_CHUNK}));");
        let _ = writeln!(
            s,
            "  const float* first = states + ((i64)blockIdx.x - chunk * {slices}) * {};",
            d * cols
        );
        let _ = writeln!(s, "  for (i64 cc = 0; cc < chunk; ++cc) {{");
        let _ = writeln!(s, "    const float* prior = first + cc * {};", slices * d * cols);
        self.each_pair(
            &mut s,
            &format!(
                "const float2 x = *(const float2*)(prior + row * {cols} + col); \
                 st[m][n][2 * h] = st[m][n][2 * h] * cd + x.x; st[m][n][2 * h + 1] = st[m][n][2 * h + 1] * cd + x.y;"
            ),
        );
        let _ = writeln!(s, "  }}");
        // its staged copy (as after every block below)
        let stage_ps =
            format!("*(unsigned*)(Ps + row * {cp} + col) = FULGUR_FN_pack(st[m][n][2 * h], st[m][n][2 * h + 1]);");
        self.each_pair(&mut s, &stage_ps);
        let _ = writeln!(s, "  for (i64 t0 = c0; t0 < c1; t0 += {B}) {{");
        let _ = writeln!(s, "    __syncthreads();");
        let _ = writeln!(s, "    {}", ctx.tile(0, "Qs", dp, "t0", "c1", d));
        let _ = writeln!(s, "    {}", ctx.tile(1, "Ks", dp, "t0", "c1", d));
        let _ = writeln!(s, "    {}", ctx.tile(2, "Vs", cp, "t0", "c1", cols));
        let _ = writeln!(s, "    __syncthreads();");
        // S = Q Kᵀ, masked: row r keeps key u <= r, times dec[r − u]
        ctx.product_abt(&mut s, "sc", ("Qs", dp), ("Ks", dp), d / 16);
        let _ = writeln!(s, "    #pragma unroll");
        let _ = writeln!(s, "    for (int n = 0; n < {}; ++n) {{", B / 8);
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int e = 0; e < 2; ++e) {{");
        let _ = writeln!(s, "        const int u = n * 8 + 2 * c + e;");
        let _ = writeln!(s, "        sc[n][e] = u <= r0 ? sc[n][e] * dec[r0 - u] : 0.0f;");
        let _ = writeln!(s, "        sc[n][2 + e] = u <= r1 ? sc[n][2 + e] * dec[r1 - u] : 0.0f;");
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        // O = S V
        ctx.zero(&mut s, "acc", cols);
        ctx.product_px(&mut s, "acc", "sc", "Vs", cp, cols);
        // X = Q P (P staged as bf16, read transposed from its row-major tile), then O += q_decay ⊙ X
        ctx.zero(&mut s, "xq", cols);
        let fill = [format!("FULGUR_FN_lda(fa, Qs + wr * {dp} + kt * 16, {dp});")];
        ctx.product_ax(&mut s, "xq", (d / 16, "fa", &fill), "Ps", cp, cols);
        let _ = writeln!(s, "    {{");
        let _ = writeln!(s, "      const float q0 = dec[r0 + 1], q1 = dec[r1 + 1];");
        let _ = writeln!(s, "      #pragma unroll");
        let _ = writeln!(s, "      for (int n = 0; n < {}; ++n) {{", cols / 8);
        let _ = writeln!(s, "        acc[n][0] += q0 * xq[n][0]; acc[n][1] += q0 * xq[n][1];");
        let _ = writeln!(s, "        acc[n][2] += q1 * xq[n][2]; acc[n][3] += q1 * xq[n][3];");
        let _ = writeln!(s, "      }}");
        let _ = writeln!(s, "    }}");
        let mut store = String::new();
        ctx.store(&mut store, 3, "acc", ("t0", "c1"), cols, ["", ""]);
        for line in store.lines() {
            let _ = writeln!(s, "  {line}");
        }
        // KD's tile was last read before the previous block's staging barrier
        self.advance_state(&mut s);
        // every warp has read KD and V: stage the new state
        let _ = writeln!(s, "    __syncthreads();");
        let mut stage = String::new();
        self.each_pair(&mut stage, &stage_ps);
        for line in stage.lines() {
            let _ = writeln!(s, "  {line}");
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(s, "}}");
        s
    }
}

//! The kernel program: the boundary between the optimizer and every backend, and the only thing backends
//! consume.
//!
//! [`lower`] turns an optimized graph into:
//! - **kernels**, each of a [`KernelKind`] (the classification shared with the cost model,
//!   `fulgur_passes::classify`), each naming the IR node it covers and computing that node's op on strided
//!   views of buffers. Kernels with the same op over the same view shapes share a **code** (`Kernel::code`):
//!   a layer template's kernels are generated once, not once per layer;
//! - a **prepare** program (what depends on weights and constants alone: transposed layouts, concatenated
//!   projections, decay tables; run once at load) and a **step** program (run per call);
//! - a **buffer plan**: every tensor is a buffer or a view of one ([`TensorRef`]: offset and strides in
//!   elements, symbolic in the graph's symbols). Reshapes of contiguous data, broadcasts and slices are views
//!   (no copies); a reshape of data that is not contiguous becomes a copy kernel. Persistent buffers (inputs,
//!   weights, constants, prepared values) are apart from transient ones, which [`KernelProgram::layout`] packs
//!   into one arena by liveness over the step order once the symbols are bound;
//! - a **schedule**: every step kernel has a stream (0 computes, 1 communicates: `all_to_all_start`) and the
//!   kernels of other streams it waits for. Executing on one stream in step order is always correct.
//!
//! Generated values (`full`, `iota`) that are not inside a fused kernel are filled by a small kernel of their
//! own (the cost model counts them free; inside fused bodies, where the optimizer puts them, they are).

use crate::CodegenError;
use fulgur_ir::{DType, Dim, Graph, NodeId, Op, TensorType, Value};
use fulgur_passes::classify::{classify, KernelKind, NodeClass};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

/// What a buffer holds and how long it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufferKind {
    /// A data input, given per call.
    Input,
    /// A weight (graph parameter), loaded once.
    Weight,
    /// A constant of the graph, filled at load.
    Constant,
    /// Computed by the prepare program from weights and constants, once at load.
    Prepared,
    /// Written and read within one step: packed into the arena by liveness.
    Transient,
}

/// One buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferSpec {
    pub id: usize,
    pub kind: BufferKind,
    pub dtype: DType,
    /// Size in elements (symbolic).
    pub elements: Dim,
    /// The input's or weight's name.
    pub name: Option<String>,
    /// A constant's values.
    pub init: Option<Op>,
    /// For a transient buffer: the step kernels that write it first and read it last (the end of the step for
    /// one an output views).
    pub live: Option<(usize, usize)>,
}

/// A tensor as a strided view of a buffer (offset and strides in elements).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorRef {
    pub buffer: usize,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub strides: Vec<Dim>,
    pub offset: Dim,
}

impl TensorRef {
    /// The whole of `buffer` as a row-major tensor of `shape`.
    pub fn contiguous(buffer: usize, ty: &TensorType) -> TensorRef {
        TensorRef {
            buffer,
            dtype: ty.dtype,
            shape: ty.dims().to_vec(),
            strides: row_major(ty.dims()),
            offset: Dim::from(0),
        }
    }

    /// Whether the elements are laid out row-major without gaps (axes of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        is_row_major(&self.shape, &self.strides)
    }

    fn signature(&self) -> String {
        let dims = |v: &[Dim]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",");
        format!(
            "{}[{}]/[{}]+{}",
            self.dtype,
            dims(&self.shape),
            dims(&self.strides),
            self.offset
        )
    }
}

impl std::fmt::Display for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims = |v: &[Dim]| v.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ");
        write!(f, "b{}:{}[{}]", self.buffer, self.dtype, dims(&self.shape))?;
        if !self.is_contiguous() {
            write!(f, " strides [{}]", dims(&self.strides))?;
        }
        if self.offset != Dim::from(0) {
            write!(f, " +{}", self.offset)?;
        }
        Ok(())
    }
}

/// Whether `strides` lay `shape` out row-major without gaps (axes of size 1 may have any stride).
pub fn is_row_major(shape: &[Dim], strides: &[Dim]) -> bool {
    let want = row_major(shape);
    shape
        .iter()
        .zip(strides.iter().zip(&want))
        .all(|(d, (s, w))| d.is_one() || s == w)
}

/// Row-major strides of `shape`, in elements.
pub fn row_major(shape: &[Dim]) -> Vec<Dim> {
    let mut s = vec![Dim::from(1); shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].clone() * shape[i + 1].clone();
    }
    s
}

/// One kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub id: usize,
    /// The IR node it covers (its name in the optimized graph, or `%N`).
    pub name: String,
    pub kind: KernelKind,
    /// What it computes, over its inputs in order.
    pub op: Op,
    pub inputs: Vec<TensorRef>,
    pub outputs: Vec<TensorRef>,
    /// Kernels with the same code run the same generated code (the same op over the same view shapes).
    pub code: usize,
    /// The stream it runs on (0: compute, 1: communication).
    pub stream: usize,
    /// Step kernels of other streams it waits for.
    pub waits: Vec<usize>,
}

/// A named input, weight or output of the program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Io {
    pub name: String,
    pub ty: TensorType,
    pub tensor: TensorRef,
}

/// The kernel program of a graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelProgram {
    pub name: String,
    pub symbols: Vec<String>,
    pub buffers: Vec<BufferSpec>,
    pub inputs: Vec<Io>,
    pub params: Vec<Io>,
    pub outputs: Vec<Io>,
    /// Run once at load, in order.
    pub prepare: Vec<Kernel>,
    /// Run per call, in order (the schedule: each kernel's stream and waits).
    pub step: Vec<Kernel>,
    /// The number of distinct codes (generated kernels).
    pub codes: usize,
}

/// Where the transient buffers lie in the arena once the symbols are bound, and what memory the program needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Byte offset in the arena of every transient buffer (by buffer id; `None` for persistent ones).
    pub offsets: Vec<Option<u64>>,
    /// Bytes of every buffer (by buffer id).
    pub sizes: Vec<u64>,
    /// The arena's size: the peak of the transient buffers live at once, as packed.
    pub arena_bytes: u64,
    /// Bytes of the persistent buffers (inputs, weights, constants, prepared values).
    pub persistent_bytes: u64,
    /// Bytes of every transient buffer if each had its own allocation.
    pub transient_total_bytes: u64,
}

impl Layout {
    /// The planned peak: the persistent buffers and the arena.
    pub fn planned_peak(&self) -> u64 {
        self.persistent_bytes.saturating_add(self.arena_bytes)
    }
}

/// Arena offsets are multiples of this (bytes).
pub const ALIGN: u64 = 64;

impl KernelProgram {
    /// Packs the transient buffers into one arena at the symbol values `env`: the buffers in decreasing size,
    /// each at the lowest aligned offset that overlaps no placed buffer whose live range meets its own.
    pub fn layout(&self, env: &HashMap<String, i64>) -> Result<Layout, CodegenError> {
        let n = self.buffers.len();
        let mut sizes = vec![0u64; n];
        for b in &self.buffers {
            let e = b
                .elements
                .eval(env)
                .map_err(|m| CodegenError::Options(format!("buffer b{} ({} elements): {m}", b.id, b.elements)))?;
            sizes[b.id] = (e.max(0) as u64)
                .checked_mul(b.dtype.size_bytes() as u64)
                .ok_or_else(|| CodegenError::Options(format!("buffer b{}: its size overflows 64 bits", b.id)))?;
        }
        let mut transient: Vec<&BufferSpec> = self
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::Transient)
            .collect();
        transient.sort_by(|a, b| sizes[b.id].cmp(&sizes[a.id]).then(a.id.cmp(&b.id)));
        let mut offsets: Vec<Option<u64>> = vec![None; n];
        let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new(); // (offset, end, live from, live to)
        let mut arena = 0u64;
        for b in transient {
            let (from, to) = b.live.unwrap_or((0, usize::MAX));
            let size = sizes[b.id];
            let mut clashes: Vec<(u64, u64)> = placed
                .iter()
                .filter(|p| p.2 <= to && from <= p.3)
                .map(|p| (p.0, p.1))
                .collect();
            clashes.sort();
            let mut at = 0u64;
            for (s, e) in clashes {
                if at.saturating_add(size) <= s {
                    break;
                }
                at = at.max(e.div_ceil(ALIGN) * ALIGN);
            }
            let end = at.saturating_add(size);
            placed.push((at, end, from, to));
            offsets[b.id] = Some(at);
            arena = arena.max(end);
        }
        let persistent_bytes = self
            .buffers
            .iter()
            .filter(|b| b.kind != BufferKind::Transient)
            .map(|b| sizes[b.id])
            .fold(0u64, u64::saturating_add);
        let transient_total_bytes = self
            .buffers
            .iter()
            .filter(|b| b.kind == BufferKind::Transient)
            .map(|b| sizes[b.id])
            .fold(0u64, u64::saturating_add);
        Ok(Layout {
            offsets,
            sizes,
            arena_bytes: arena,
            persistent_bytes,
            transient_total_bytes,
        })
    }

    /// The program as text for people: buffers, then the prepare and step kernels.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let count = |k: BufferKind| self.buffers.iter().filter(|b| b.kind == k).count();
        let _ = writeln!(
            s,
            "kernel program {}: {} prepare and {} step kernels, {} distinct codes; buffers: {} input, {} weight, \
             {} constant, {} prepared, {} transient; symbols: {}",
            self.name,
            self.prepare.len(),
            self.step.len(),
            self.codes,
            count(BufferKind::Input),
            count(BufferKind::Weight),
            count(BufferKind::Constant),
            count(BufferKind::Prepared),
            count(BufferKind::Transient),
            if self.symbols.is_empty() {
                "none".to_string()
            } else {
                self.symbols.join(", ")
            }
        );
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for k in &self.step {
            *kinds.entry(k.kind.name()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(s, "step kernels by kind: {}", kinds.join(", "));
        for (title, ks) in [("prepare", &self.prepare), ("step", &self.step)] {
            let _ = writeln!(s, "{title}:");
            for k in ks.iter() {
                let ins: Vec<String> = k.inputs.iter().map(|t| t.to_string()).collect();
                let outs: Vec<String> = k.outputs.iter().map(|t| t.to_string()).collect();
                let mut extra = String::new();
                if k.stream != 0 {
                    let _ = write!(extra, " stream {}", k.stream);
                }
                if !k.waits.is_empty() {
                    let w: Vec<String> = k.waits.iter().map(|w| format!("k{w}")).collect();
                    let _ = write!(extra, " waits {}", w.join(" "));
                }
                let _ = writeln!(
                    s,
                    "  k{} {} {} ({}) code {}{extra}: {} -> {}",
                    k.id,
                    k.kind.name(),
                    op_summary(&k.op),
                    k.name,
                    k.code,
                    ins.join(", "),
                    outs.join(", ")
                );
            }
        }
        s
    }
}

/// An op for a report line: a fused kernel as its body's ops.
pub fn op_summary(op: &Op) -> String {
    match op {
        Op::Composite(fulgur_ir::Composite::Fused { body }) => {
            let ops: Vec<&str> = body
                .graph()
                .nodes()
                .filter(|(_, n)| !n.op.is_input())
                .map(|(_, n)| n.op.name())
                .collect();
            format!("fused{{{}}}", ops.join(", "))
        }
        op => fulgur_passes::lang::op_text(op),
    }
}

/// What the lowering knows of a value.
#[derive(Clone)]
struct Val {
    tensor: TensorRef,
    /// The step kernel that produced it (for waits across streams), if any.
    producer: Option<usize>,
}

/// Lowers an (optimized) graph to its kernel program.
pub fn lower(g: &Graph) -> Result<KernelProgram, CodegenError> {
    let param_only = fulgur_passes::pass::param_only_nodes(g);
    let mut p = KernelProgram {
        name: g.name.clone(),
        symbols: g.summary().symbols,
        buffers: Vec::new(),
        inputs: Vec::new(),
        params: Vec::new(),
        outputs: Vec::new(),
        prepare: Vec::new(),
        step: Vec::new(),
        codes: 0,
    };
    let mut vals: HashMap<Value, Val> = HashMap::new();
    let mut codes: HashMap<String, usize> = HashMap::new();
    // what the prepare program computes: values of weights and constants alone whose sizes do not depend on
    // the call (a value of the sequence length, such as the unfused graph's [H, T, T] decay masks, is computed
    // in the step instead, where the arena reuses its memory, rather than held for the program's life and
    // recomputed whenever the length changes); a value read by one computed in the step is so too
    let mut in_prepare = vec![false; g.node_count()];
    for (id, n) in g.nodes() {
        let fixed = n.outputs.iter().all(|t| t.shape.numel().symbols().is_empty());
        let inputs_ready = n.inputs.iter().all(|v| {
            let src = g.node(v.node);
            src.op.is_input() || matches!(src.op, Op::Constant { .. }) || in_prepare[v.node.index()]
        });
        in_prepare[id.index()] = param_only[id.index()] && fixed && inputs_ready;
    }
    let new_buffer = |p: &mut KernelProgram, kind: BufferKind, ty: &TensorType, name: Option<String>| -> usize {
        let id = p.buffers.len();
        p.buffers.push(BufferSpec {
            id,
            kind,
            dtype: ty.dtype,
            elements: ty.shape.numel(),
            name,
            init: None,
            live: None,
        });
        id
    };
    for id in step_order(g) {
        let n = g.node(id);
        let name = n.name.clone().unwrap_or_else(|| format!("%{}", id.index()));
        let ins: Vec<Val> = n.inputs.iter().map(|v| vals[v].clone()).collect();
        let prepared = in_prepare[id.index()];
        let set = |vals: &mut HashMap<Value, Val>, i: usize, v: Val| {
            vals.insert(Value::new(id, i as u32), v);
        };
        match (&n.op, classify(&n.op)) {
            (Op::Input { name: iname, ty }, _) | (Op::Param { name: iname, ty }, _) => {
                let is_param = matches!(n.op, Op::Param { .. });
                let kind = if is_param {
                    BufferKind::Weight
                } else {
                    BufferKind::Input
                };
                let b = new_buffer(&mut p, kind, ty, Some(iname.clone()));
                let tensor = TensorRef::contiguous(b, ty);
                let io = Io {
                    name: iname.clone(),
                    ty: ty.clone(),
                    tensor: tensor.clone(),
                };
                if is_param {
                    p.params.push(io);
                } else {
                    p.inputs.push(io);
                }
                set(&mut vals, 0, Val { tensor, producer: None });
            }
            (Op::Constant { .. }, _) => {
                let b = new_buffer(&mut p, BufferKind::Constant, &n.outputs[0], None);
                p.buffers[b].init = Some(n.op.clone());
                set(
                    &mut vals,
                    0,
                    Val {
                        tensor: TensorRef::contiguous(b, &n.outputs[0]),
                        producer: None,
                    },
                );
            }
            // a permute is a view too (its readers take strided operands: GEMMs transpose, loops index); the
            // optimizer still prices it as the copy it would be in a fused body
            (op, NodeClass::View) | (op @ Op::Permute { .. }, _) => match view(op, &ins[0].tensor, &n.outputs[0]) {
                Some(t) => set(
                    &mut vals,
                    0,
                    Val {
                        tensor: t,
                        producer: ins[0].producer,
                    },
                ),
                // a reshape of data that is not contiguous: copied
                None => {
                    let outs = emit(
                        &mut p,
                        &mut codes,
                        &name,
                        KernelKind::Copy,
                        op,
                        &ins,
                        &n.outputs,
                        prepared,
                    );
                    set(&mut vals, 0, outs.into_iter().next().expect("one output"));
                }
            },
            (_, NodeClass::Sync) => {
                // a wait: the value is its input's; the wait is recorded on the readers (stream order)
                set(&mut vals, 0, ins[0].clone());
            }
            (op, NodeClass::Generated) => {
                let outs = emit(
                    &mut p,
                    &mut codes,
                    &name,
                    KernelKind::Elementwise,
                    op,
                    &ins,
                    &n.outputs,
                    prepared,
                );
                set(&mut vals, 0, outs.into_iter().next().expect("one output"));
            }
            (op, NodeClass::Kernel(kind)) => {
                let outs = emit(&mut p, &mut codes, &name, kind, op, &ins, &n.outputs, prepared);
                for (i, v) in outs.into_iter().enumerate() {
                    set(&mut vals, i, v);
                }
            }
            (_, NodeClass::Leaf) => unreachable!("leaves are matched above"),
        }
    }
    for (name, v) in g.outputs() {
        p.outputs.push(Io {
            name: name.clone(),
            ty: g.ty(*v).clone(),
            tensor: vals[v].tensor.clone(),
        });
    }
    p.codes = codes.len();
    donate(&mut p);
    // `FULGUR_KERNEL_MERGE=0` leaves both merges out: the comparison `docs/perf.md` measures them by
    if std::env::var("FULGUR_KERNEL_MERGE").map_or(true, |v| v != "0") {
        merge_siblings(&mut p);
        fuse_producers(&mut p);
    }
    liveness(&mut p);
    check_symbols(&p)?;
    Ok(p)
}

/// The most step kernels [`merge_siblings`] puts into one.
const MERGE_MAX_KERNELS: usize = 8;
/// The most distinct inputs a merged kernel reads.
const MERGE_MAX_INPUTS: usize = 24;

/// Merges runs of neighbouring elementwise step kernels over the same output shape that read some of the same
/// memory into one kernel (a `fused` body of several outputs, computed by one loop), so that what they share is
/// read once: AdamW's update of a weight is three kernels after fusion (the first moment, the second, and the
/// weight, which recomputes both moments from the old ones), each reading the gradient. A kernel joins a run
/// when it writes one contiguous output of the run's shape into a buffer no kernel of the run writes, reads
/// nothing the run writes (no kernel of the run needs another's result), and every kernel of the run that
/// reads the buffer it writes reads it through exactly its output's view and elementwise (so each element is
/// read before it is overwritten, by the same thread: the emitters compute a run of stores' values before
/// storing any, `loops::Stmt::Store`). Only on one stream (a second stream's waits name kernels). Returns the
/// number of kernels merged away; codes are renumbered.
pub fn merge_siblings(p: &mut KernelProgram) -> usize {
    if p.step.iter().any(|k| k.stream != 0 || !k.waits.is_empty()) {
        return 0;
    }
    let candidate = |k: &Kernel| inlinable(k) && k.outputs.len() == 1 && k.outputs[0].is_contiguous();
    let joins = |run: &[Kernel], b: &Kernel| -> bool {
        let shape = &run[0].outputs[0].shape;
        let out = &b.outputs[0];
        if !candidate(b) || out.shape != *shape || run.len() >= MERGE_MAX_KERNELS {
            return false;
        }
        let written: std::collections::HashSet<usize> =
            run.iter().flat_map(|k| k.outputs.iter().map(|t| t.buffer)).collect();
        if written.contains(&out.buffer) || b.inputs.iter().any(|t| written.contains(&t.buffer)) {
            return false;
        }
        let in_place = run.iter().all(|a| {
            a.inputs
                .iter()
                .enumerate()
                .all(|(i, t)| t.buffer != out.buffer || (t == out && reads_in_place(&a.op, i)))
        });
        let read: std::collections::HashSet<usize> =
            run.iter().flat_map(|k| k.inputs.iter().map(|t| t.buffer)).collect();
        let shares = b.inputs.iter().any(|t| read.contains(&t.buffer)) || read.contains(&out.buffer);
        let mut distinct: Vec<&TensorRef> = Vec::new();
        for t in run.iter().chain(std::iter::once(b)).flat_map(|k| &k.inputs) {
            if !distinct.contains(&t) {
                distinct.push(t);
            }
        }
        in_place && shares && distinct.len() <= MERGE_MAX_INPUTS
    };
    let mut merged = 0;
    let mut out: Vec<Kernel> = Vec::with_capacity(p.step.len());
    let mut i = 0;
    while i < p.step.len() {
        let mut j = i + 1;
        if candidate(&p.step[i]) {
            while j < p.step.len() && joins(&p.step[i..j], &p.step[j]) {
                j += 1;
            }
        }
        match (j - i > 1).then(|| merged_kernel(&p.step[i..j])).flatten() {
            Some(k) => {
                merged += j - i - 1;
                out.push(k);
                i = j;
            }
            None => {
                out.push(p.step[i].clone());
                i += 1;
            }
        }
    }
    if merged == 0 {
        return 0;
    }
    p.step = out;
    renumber(p);
    merged
}

/// Step kernel ids in order again, and the codes: the same op over the same views, the same code.
fn renumber(p: &mut KernelProgram) {
    for (n, k) in p.step.iter_mut().enumerate() {
        k.id = n;
    }
    let mut codes: HashMap<String, usize> = HashMap::new();
    for k in p.prepare.iter_mut().chain(p.step.iter_mut()) {
        let mut key = fulgur_passes::lang::op_text(&k.op);
        for t in k.inputs.iter().chain(&k.outputs) {
            key.push('|');
            key.push_str(&t.signature());
        }
        let next = codes.len();
        k.code = *codes.entry(key).or_insert(next);
    }
    p.codes = codes.len();
}

/// Whether step kernel `k` is elementwise with a body the merges can inline: a primitive elementwise op or a
/// `fused` body of elementwise ops.
fn inlinable(k: &Kernel) -> bool {
    k.kind == KernelKind::Elementwise
        && !k.inputs.is_empty()
        && (matches!(
            k.op,
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }
        ) || matches!(k.op, Op::Composite(fulgur_ir::Composite::Fused { .. })))
}

/// Appends kernel `k`'s op to `g` on `ins`: its outputs.
fn inline_kernel(g: &mut Graph, k: &Kernel, ins: &[Value]) -> Option<Vec<Value>> {
    match &k.op {
        Op::Composite(fulgur_ir::Composite::Fused { body }) => {
            fulgur_ir::composite::fused::inline_all(g, body, ins).ok()
        }
        op => g.op(op.clone(), ins).ok(),
    }
}

/// Computes an elementwise step kernel's one output where its one reader needs it, when that reader is
/// elementwise too and reads it through the same view at the element it writes (`reads_in_place`), and no
/// kernel from the producer to the reader writes what the producer reads: the value is never stored (the
/// cast of a bf16 gradient to f32 that only the weight's update reads, once `merge_siblings` has made the
/// update one kernel). The output must be a transient buffer that no program output views. Returns the number
/// of kernels folded into their readers.
pub fn fuse_producers(p: &mut KernelProgram) -> usize {
    if p.step.iter().any(|k| k.stream != 0 || !k.waits.is_empty()) {
        return 0;
    }
    let viewed: std::collections::HashSet<usize> = p.outputs.iter().map(|o| o.tensor.buffer).collect();
    let mut folded = 0;
    let mut i = 0;
    while i < p.step.len() {
        let prod = &p.step[i];
        let out = &prod.outputs[0];
        let fits = inlinable(prod)
            && prod.outputs.len() == 1
            && out.is_contiguous()
            && p.buffers[out.buffer].kind == BufferKind::Transient
            && !viewed.contains(&out.buffer);
        let reader = fits
            .then(|| {
                let readers: Vec<usize> = (i + 1..p.step.len())
                    .filter(|&j| p.step[j].inputs.iter().any(|t| t.buffer == out.buffer))
                    .collect();
                let rewritten = p.step[i + 1..]
                    .iter()
                    .any(|k| k.outputs.iter().any(|t| t.buffer == out.buffer));
                match readers[..] {
                    [j] if !rewritten => Some(j),
                    _ => None,
                }
            })
            .flatten()
            .filter(|&j| {
                let c = &p.step[j];
                inlinable(c)
                    && c.inputs
                        .iter()
                        .enumerate()
                        .all(|(a, t)| t.buffer != out.buffer || (t == out && reads_in_place(&c.op, a)))
                    && p.step[i + 1..=j].iter().all(|k| {
                        k.outputs
                            .iter()
                            .all(|o| prod.inputs.iter().all(|t| t.buffer != o.buffer))
                    })
            });
        let Some(j) = reader else {
            i += 1;
            continue;
        };
        match folded_kernel(&p.step[i], &p.step[j]) {
            Some(k) => {
                // the produced value is never stored: its buffer goes unused
                let b = p.step[i].outputs[0].buffer;
                p.buffers[b].elements = Dim::from(0);
                p.step[j] = k;
                p.step.remove(i);
                folded += 1;
            }
            None => i += 1,
        }
    }
    if folded > 0 {
        renumber(p);
    }
    folded
}

/// A fused body over the distinct tensors of `refs` (in first-seen order) as its arguments: `build` inlines
/// kernels into the body's graph, reading an argument through the lookup it is given, and returns the
/// outputs. Returns the arguments and the `fused` op; `None` where the body cannot be written.
fn body_over<'a>(
    refs: impl IntoIterator<Item = &'a TensorRef>,
    build: impl FnOnce(&mut Graph, &dyn Fn(&TensorRef) -> Value) -> Option<Vec<Value>>,
) -> Option<(Vec<TensorRef>, Op)> {
    let mut args: Vec<TensorRef> = Vec::new();
    for t in refs {
        if !args.contains(t) {
            args.push(t.clone());
        }
    }
    let mut g = Graph::new("fused");
    let mut vals = Vec::with_capacity(args.len());
    for (n, t) in args.iter().enumerate() {
        vals.push(g.input(&format!("arg{n}"), t.dtype, t.shape.clone()).ok()?);
    }
    let at = |t: &TensorRef| vals[args.iter().position(|a| a == t).expect("an argument")];
    let outs = build(&mut g, &at)?;
    for (n, v) in outs.iter().enumerate() {
        g.add_output(format!("out{n}"), *v).ok()?;
    }
    let body = fulgur_ir::op::FusedBody::from_graph(&g).ok()?;
    Some((args, Op::Composite(fulgur_ir::Composite::Fused { body })))
}

/// Reader `c` with producer `prod`'s op inlined where it read `prod`'s output (see [`fuse_producers`]).
fn folded_kernel(prod: &Kernel, c: &Kernel) -> Option<Kernel> {
    let produced = &prod.outputs[0];
    let refs = c.inputs.iter().filter(|t| *t != produced).chain(&prod.inputs);
    let (inputs, op) = body_over(refs, |g, at| {
        let pins: Vec<Value> = prod.inputs.iter().map(at).collect();
        let pv = inline_kernel(g, prod, &pins)?[0];
        let cins: Vec<Value> = c
            .inputs
            .iter()
            .map(|t| if t == produced { pv } else { at(t) })
            .collect();
        inline_kernel(g, c, &cins)
    })?;
    Some(Kernel {
        name: format!("{} + {}", prod.name, c.name),
        op,
        inputs,
        ..c.clone()
    })
}

/// One kernel for the run `run` (see [`merge_siblings`]): a body of the kernels' bodies over their distinct
/// inputs, their outputs in order. `None` where the body cannot be written (a symbol of an attribute that no
/// argument has as a whole dimension).
fn merged_kernel(run: &[Kernel]) -> Option<Kernel> {
    let (args, op) = body_over(run.iter().flat_map(|k| &k.inputs), |g, at| {
        let mut outs = Vec::new();
        for k in run {
            let ins: Vec<Value> = k.inputs.iter().map(at).collect();
            outs.extend(inline_kernel(g, k, &ins)?);
        }
        Some(outs)
    })?;
    Some(Kernel {
        id: run[0].id,
        name: run.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(" + "),
        kind: KernelKind::Elementwise,
        op,
        inputs: args,
        outputs: run.iter().flat_map(|k| k.outputs.iter().cloned()).collect(),
        code: 0,
        stream: 0,
        waits: Vec::new(),
    })
}

/// Writes each output that has the name of an input (a training step's new weights and moments: the state a
/// call carries to the next) into that input's buffer, when that is safe: the output is the whole of a
/// transient buffer written by one step kernel `K`, of the input's dtype and size; `K` is elementwise in the
/// input (it reads it only through the output's own view and only at the element it writes, see
/// [`reads_in_place`]); no kernel after `K` reads the input and no other output views it. The call's result
/// is unchanged (every backend copies inputs into their buffers before a call), the transient buffer is not
/// needed (its size becomes 0), and a call that carries its state to the next needs no copy. Returns the
/// names donated.
pub fn donate(p: &mut KernelProgram) -> Vec<String> {
    let mut donated = Vec::new();
    // with a second stream, step order is not the order kernels run in
    if p.step.iter().any(|k| k.stream != 0) {
        return donated;
    }
    for oi in 0..p.outputs.len() {
        let out = p.outputs[oi].clone();
        let Some(inp) = p.inputs.iter().find(|i| i.name == out.name).cloned() else {
            continue;
        };
        let (bi, bo) = (inp.tensor.buffer, out.tensor.buffer);
        if bi == bo
            || p.buffers[bo].kind != BufferKind::Transient
            || p.buffers[bi].kind != BufferKind::Input
            || out.ty.dtype != inp.ty.dtype
            || p.buffers[bo].elements != p.buffers[bi].elements
            || out.tensor.offset != Dim::from(0)
            || !out.tensor.is_contiguous()
            || out.tensor.shape.iter().fold(Dim::from(1), |a, d| a * d.clone()) != p.buffers[bo].elements
        {
            continue;
        }
        // the one kernel writing the output's buffer
        let writers: Vec<usize> = p
            .step
            .iter()
            .filter(|k| k.outputs.iter().any(|t| t.buffer == bo))
            .map(|k| k.id)
            .collect();
        let [mut w] = writers[..] else { continue };
        // a writer followed by readers of the old value moves after the last of them, when none of those reads
        // what it writes (AdamW's moment kernels: the weight's update after them recomputes the moments from
        // the old values)
        if let Some(last) = p.step.iter().rposition(|k| k.inputs.iter().any(|t| t.buffer == bi)) {
            if last > w {
                let outs: Vec<usize> = p.step[w].outputs.iter().map(|t| t.buffer).collect();
                let uses = p.step[w + 1..=last]
                    .iter()
                    .any(|k| k.inputs.iter().any(|t| outs.contains(&t.buffer)));
                if !uses {
                    let k = p.step.remove(w);
                    p.step.insert(last, k);
                    for (i, k) in p.step.iter_mut().enumerate() {
                        k.id = i;
                    }
                    w = last;
                }
            }
        }
        let k = &p.step[w];
        let same_view = |t: &TensorRef| {
            t.shape == out.tensor.shape && t.strides == out.tensor.strides && t.offset == out.tensor.offset
        };
        let in_place = k.outputs.iter().filter(|t| t.buffer == bo).all(same_view)
            && k.inputs
                .iter()
                .enumerate()
                .filter(|(_, t)| t.buffer == bi)
                .all(|(i, t)| same_view(t) && reads_in_place(&k.op, i));
        let read_later = p.step[w + 1..].iter().any(|k| k.inputs.iter().any(|t| t.buffer == bi));
        let viewed = p
            .outputs
            .iter()
            .enumerate()
            .any(|(j, o)| j != oi && (o.tensor.buffer == bi || o.tensor.buffer == bo));
        if !in_place || read_later || viewed || p.prepare.iter().any(|k| k.inputs.iter().any(|t| t.buffer == bi)) {
            continue;
        }
        for k in p.step.iter_mut() {
            for t in k.inputs.iter_mut().chain(k.outputs.iter_mut()) {
                if t.buffer == bo {
                    t.buffer = bi;
                }
            }
        }
        p.outputs[oi].tensor.buffer = bi;
        p.buffers[bo].elements = Dim::from(0);
        donated.push(out.name.clone());
    }
    donated
}

/// Whether `op` reads its input `i` only at the element of its output it computes: an elementwise primitive,
/// or a fused body in which every op the input reaches is one (no view, broadcast or reduction of it).
pub fn reads_in_place(op: &Op, i: usize) -> bool {
    let elementwise = |op: &Op| {
        matches!(
            op,
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Select | Op::Cast { .. }
        )
    };
    match op {
        Op::Composite(fulgur_ir::Composite::Fused { body }) => {
            let bg = body.graph();
            let Some(&arg) = bg.inputs().get(i) else {
                return false;
            };
            let mut reached = vec![false; bg.node_count()];
            reached[arg.index()] = true;
            for (id, n) in bg.nodes() {
                if n.inputs.iter().any(|v| reached[v.node.index()]) {
                    if !elementwise(&n.op) {
                        return false;
                    }
                    reached[id.index()] = true;
                }
            }
            true
        }
        op => elementwise(op),
    }
}

/// Refuses a program with a size no input can bind: every symbol of a buffer or kernel view must be a whole
/// dimension of some input, or the program could never run.
fn check_symbols(p: &KernelProgram) -> Result<(), CodegenError> {
    // a symbol is bound by an input that has it as a whole dimension (the runtimes bind from those)
    let bound: std::collections::HashSet<String> = p
        .inputs
        .iter()
        .flat_map(|io| io.ty.dims().iter())
        .filter_map(|d| match d.symbols().as_slice() {
            [s] if *d == Dim::sym(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let names = if bound.is_empty() {
        "no symbol".to_string()
    } else {
        let mut v: Vec<String> = bound.iter().map(|s| format!("`{s}`")).collect();
        v.sort();
        v.join(", ")
    };
    for b in &p.buffers {
        if let Some(s) = b.elements.symbols().into_iter().find(|s| !bound.contains(s)) {
            return Err(CodegenError::Options(format!(
                "buffer b{} ({} elements{}): its size depends on symbol `{s}`, which no input of graph `{}` has \
                 as a dimension (inputs bind {names}): the program could never run",
                b.id,
                b.elements,
                b.name.as_ref().map(|n| format!(", `{n}`")).unwrap_or_default(),
                p.name
            )));
        }
    }
    for k in p.prepare.iter().chain(&p.step) {
        for t in k.inputs.iter().chain(&k.outputs) {
            for d in t.shape.iter().chain(&t.strides).chain([&t.offset]) {
                if let Some(s) = d.symbols().into_iter().find(|s| !bound.contains(s)) {
                    return Err(CodegenError::Options(format!(
                        "kernel k{} ({}, {}): its size depends on symbol `{s}`, which no input of graph `{}` has as a dimension (inputs bind {}): the program could never run",
                        k.id,
                        k.name,
                        op_summary(&k.op),
                        p.name,
                        names
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The view `op` makes of `t` (a reshape, broadcast, slice or permute), or `None` when it needs a copy (a
/// reshape of data that is not contiguous).
fn view(op: &Op, t: &TensorRef, out: &TensorType) -> Option<TensorRef> {
    match op {
        Op::Reshape { .. } if t.is_contiguous() => Some(TensorRef {
            shape: out.dims().to_vec(),
            strides: row_major(out.dims()),
            ..t.clone()
        }),
        Op::Reshape { .. } => merged_strides(&t.shape, &t.strides, out.dims()).map(|strides| TensorRef {
            shape: out.dims().to_vec(),
            strides,
            ..t.clone()
        }),
        Op::Broadcast { .. } => {
            let (r_in, r_out) = (t.shape.len(), out.rank());
            // right-aligned: an axis the input has with the same size keeps its stride; new or stretched
            // axes have stride 0
            let strides: Vec<Dim> = (0..r_out)
                .map(|j| match (j + r_in).checked_sub(r_out) {
                    Some(i) if t.shape[i] == out.dims()[j] => t.strides[i].clone(),
                    _ => Dim::from(0),
                })
                .collect();
            Some(TensorRef {
                shape: out.dims().to_vec(),
                strides,
                ..t.clone()
            })
        }
        Op::Slice { axis, start, .. } => {
            let a = fulgur_ir::infer::norm_axis(*axis, t.shape.len()).ok()?;
            let offset = t.offset.clone() + start.clone() * t.strides[a].clone();
            Some(TensorRef {
                shape: out.dims().to_vec(),
                offset,
                ..t.clone()
            })
        }
        Op::Permute { perm } => (perm.len() == t.shape.len()).then(|| TensorRef {
            shape: perm.iter().map(|&p| t.shape[p].clone()).collect(),
            strides: perm.iter().map(|&p| t.strides[p].clone()).collect(),
            ..t.clone()
        }),
        _ => None,
    }
}

/// The strides of a reshape of strided data that only merges runs of adjacent dims (each output dim the product
/// of consecutive input dims, size-1 dims anywhere), where every run is itself laid out as one dim: `[M, B, T]`
/// with strides `[1, M·T, M]` (a transposed `[B, T, M]`) is `[M, B·T]` with strides `[1, M]`. `None` for a split
/// or a run whose strides do not chain: the reshape is then a copy.
fn merged_strides(shape: &[Dim], strides: &[Dim], out: &[Dim]) -> Option<Vec<Dim>> {
    let one = Dim::from(1);
    let mut i = 0;
    let mut res = Vec::with_capacity(out.len());
    for o in out {
        let mut prod = one.clone();
        // the run's innermost dim of size other than 1 (its stride is the merged dim's), and the one before
        let mut last: Option<usize> = None;
        while prod != *o {
            if i >= shape.len() {
                return None;
            }
            let k = i;
            i += 1;
            if shape[k].is_one() {
                continue;
            }
            if let Some(l) = last {
                if strides[l] != strides[k].clone() * shape[k].clone() {
                    return None;
                }
            }
            last = Some(k);
            prod = prod * shape[k].clone();
        }
        res.push(last.map(|l| strides[l].clone()).unwrap_or_else(|| one.clone()));
    }
    shape[i..].iter().all(|d| d.is_one()).then_some(res)
}

/// Adds a kernel computing `op` over `ins` into new buffers; to the prepare program when it depends on weights
/// and constants alone.
#[allow(clippy::too_many_arguments)]
fn emit(
    p: &mut KernelProgram,
    codes: &mut HashMap<String, usize>,
    name: &str,
    kind: KernelKind,
    op: &Op,
    ins: &[Val],
    outs: &[TensorType],
    prepared: bool,
) -> Vec<Val> {
    let buffer_kind = if prepared {
        BufferKind::Prepared
    } else {
        BufferKind::Transient
    };
    let mut outputs = Vec::new();
    for t in outs {
        let id = p.buffers.len();
        p.buffers.push(BufferSpec {
            id,
            kind: buffer_kind,
            dtype: t.dtype,
            elements: t.shape.numel(),
            name: None,
            init: None,
            live: None,
        });
        outputs.push(TensorRef::contiguous(id, t));
    }
    let inputs: Vec<TensorRef> = ins.iter().map(|v| v.tensor.clone()).collect();
    let key = {
        let mut k = fulgur_passes::lang::op_text(op);
        for t in inputs.iter().chain(&outputs) {
            k.push('|');
            k.push_str(&t.signature());
        }
        k
    };
    let next = codes.len();
    let code = *codes.entry(key).or_insert(next);
    let stream = usize::from(matches!(op, Op::Composite(fulgur_ir::Composite::AllToAllStart { .. })));
    let list = if prepared { &mut p.prepare } else { &mut p.step };
    let kid = list.len();
    let mut waits: Vec<usize> = Vec::new();
    if !prepared {
        for v in ins {
            if let Some(pk) = v.producer {
                if p.step[pk].stream != stream && !waits.contains(&pk) {
                    waits.push(pk);
                }
            }
        }
    }
    let list = if prepared { &mut p.prepare } else { &mut p.step };
    list.push(Kernel {
        id: kid,
        name: name.to_string(),
        kind,
        op: op.clone(),
        inputs,
        outputs: outputs.clone(),
        code,
        stream,
        waits,
    });
    outputs
        .into_iter()
        .map(|tensor| Val {
            tensor,
            producer: (!prepared).then_some(kid),
        })
        .collect()
}

/// The order the nodes are lowered in (the step kernels' order): the graph's, except that every routed
/// exchange's dispatch (`on_rank[all_to_all_dispatch]`) is issued as soon as its operands are, together with
/// the cheap ops computing them from earlier values (slices, which are views, and integer `binary`, `cumsum`,
/// `cast` and constants: a chunk's rows and counts). A chunked exchange (the collectives family's `routed-overlap-chunks`) then sends
/// every chunk before the first chunk's experts run, and a transport that reads an exchange's counts on the
/// host (NCCL) waits for no expert kernel to read them (`docs/parallelism.md` §4.2). Every other node keeps
/// its place relative to the others; a hoisted node goes right after the last of its operands (ties in the
/// graph's order), so the order stays topological and is the same on every rank.
pub fn step_order(g: &Graph) -> Vec<NodeId> {
    let ids: Vec<NodeId> = g.nodes().map(|(id, _)| id).collect();
    let dispatch = |op: &Op| {
        matches!(op, Op::Composite(fulgur_ir::Composite::OnRank { op, .. })
            if matches!(&**op, Op::Composite(fulgur_ir::Composite::AllToAllDispatch { .. })))
    };
    // the hoisted nodes: the dispatches and, walking back from them, the cheap ops that feed them
    let mut hoist = vec![false; g.node_count()];
    let mut stack: Vec<NodeId> = ids.iter().copied().filter(|&id| dispatch(&g.node(id).op)).collect();
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut hoist[id.index()], true) {
            continue;
        }
        for v in &g.node(id).inputs {
            let src = g.node(v.node);
            // a slice is a view; integer arithmetic is the counts' (float compute keeps its place)
            let counts = src.outputs.iter().all(|t| t.dtype.is_int());
            let cheap = match &src.op {
                Op::Slice { .. } => true,
                Op::Binary(_) | Op::CumSum { .. } | Op::Cast { .. } | Op::Constant { .. } => counts,
                _ => false,
            };
            if cheap && !hoist[v.node.index()] {
                stack.push(v.node);
            }
        }
    }
    if !hoist.iter().any(|&h| h) {
        return ids;
    }
    // (anchor, depth): a kept node at its own place, a hoisted one after the latest of its operands
    let mut key: Vec<(usize, usize)> = vec![(0, 0); g.node_count()];
    for (at, &id) in ids.iter().enumerate() {
        let i = id.index();
        key[i] = if hoist[i] {
            let (a, d) = g
                .node(id)
                .inputs
                .iter()
                .map(|v| key[v.node.index()])
                .max()
                .unwrap_or((0, 0));
            (a, d + 1)
        } else {
            (at, 0)
        };
    }
    let mut order: Vec<(usize, NodeId)> = ids.into_iter().enumerate().collect();
    order.sort_by_key(|&(at, id)| (key[id.index()], at));
    order.into_iter().map(|(_, id)| id).collect()
}

/// The live range of every transient buffer over the step kernels: from its writer to its last reader (to the
/// end of the step when an output views it); a collective's inputs until its result is first read.
fn liveness(p: &mut KernelProgram) {
    let mut first: HashMap<usize, usize> = HashMap::new();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for k in &p.step {
        for t in &k.outputs {
            first.entry(t.buffer).or_insert(k.id);
            last.insert(t.buffer, k.id);
        }
        for t in &k.inputs {
            let e = last.entry(t.buffer).or_insert(k.id);
            *e = (*e).max(k.id);
        }
    }
    let end = p.step.len();
    // a collective may run on a stream of its own (NCCL on the device) until its result is first read: its
    // inputs stay live until then, so that no kernel in between is given their bytes
    for k in &p.step {
        if matches!(k.op, Op::Composite(fulgur_ir::Composite::OnRank { .. })) {
            let outs: std::collections::HashSet<usize> = k.outputs.iter().map(|t| t.buffer).collect();
            let until = p
                .step
                .iter()
                .filter(|j| j.id > k.id)
                .find(|j| j.inputs.iter().any(|t| outs.contains(&t.buffer)))
                .map_or(end, |j| j.id);
            for t in &k.inputs {
                let e = last.entry(t.buffer).or_insert(k.id);
                *e = (*e).max(until);
            }
        }
    }
    for o in &p.outputs {
        last.insert(o.tensor.buffer, end);
    }
    for b in &mut p.buffers {
        if b.kind == BufferKind::Transient {
            let f = first.get(&b.id).copied().unwrap_or(0);
            b.live = Some((f, last.get(&b.id).copied().unwrap_or(f)));
        }
    }
}

/// The graph node ids of a program's kernels, for reports (the node of each kernel by name).
pub fn kernel_nodes(g: &Graph) -> HashMap<String, NodeId> {
    g.nodes()
        .filter_map(|(id, n)| n.name.clone().map(|name| (name, id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::merged_strides;
    use fulgur_ir::Dim;

    fn d(v: &[i64]) -> Vec<Dim> {
        v.iter().map(|&x| Dim::from(x)).collect()
    }

    /// Merged strides agree with the element each index reaches: a transposed `[B, T, M]` merged to
    /// `[M, B·T]`, size-1 dims dropped and added, symbolic dims; a split and a run that does not chain copy.
    #[test]
    fn a_reshape_of_strided_data_is_a_view_where_its_runs_chain() {
        let (b, t, m) = (Dim::sym("B"), Dim::sym("T"), Dim::from(8));
        // [M, B, T] with strides [1, M·T, M] (permute [2, 0, 1] of a contiguous [B, T, M])
        let shape = vec![m.clone(), b.clone(), t.clone()];
        let strides = vec![Dim::from(1), m.clone() * t.clone(), m.clone()];
        let got = merged_strides(&shape, &strides, &[m.clone(), b.clone() * t.clone()]);
        assert_eq!(got, Some(vec![Dim::from(1), m.clone()]));
        // numerically: every element of [3, 2·5] reaches the same offset as in [3, 2, 5]
        let (sh, st) = (d(&[3, 2, 5]), d(&[1, 15, 3]));
        let got = merged_strides(&sh, &st, &d(&[3, 10])).unwrap();
        for i in 0..3i64 {
            for j in 0..10i64 {
                let want = i + (j / 5) * 15 + (j % 5) * 3;
                let at = Dim::from(i) * got[0].clone() + Dim::from(j) * got[1].clone();
                assert_eq!(at, Dim::from(want));
            }
        }
        // size-1 dims on either side
        let got = merged_strides(&d(&[1, 4, 1, 6]), &d(&[99, 1, 7, 4]), &d(&[4, 6, 1]));
        assert_eq!(got, Some(d(&[1, 4, 1])));
        // [B, T, 16, 128] strides [2048·T, 128, 128·T, 1] to [B, T, 2048]: 16 and 128 do not chain
        let st = vec![
            Dim::from(2048) * t.clone(),
            Dim::from(128),
            Dim::from(128) * t.clone(),
            Dim::from(1),
        ];
        let sh = vec![b.clone(), t.clone(), Dim::from(16), Dim::from(128)];
        assert_eq!(merged_strides(&sh, &st, &[b, t, Dim::from(2048)]), None);
        // a split is a copy
        assert_eq!(merged_strides(&d(&[6, 4]), &d(&[1, 6]), &d(&[2, 3, 4])), None);
    }
}

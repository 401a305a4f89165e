//! The CPU backend: a kernel program JIT-compiled through LLVM and run on the host's cores.
//!
//! A [`CpuProgram`] holds the compiled code, the weights (loaded once, in their dtype, and kept resident), the
//! values the prepare program computes from them, and the memory of a step: one arena for the transient
//! buffers, packed by the buffer plan at the bound symbols, and one scratch area for the kernels' own scratch
//! buffers. Tensors are typed bytes (f32, bf16, f16, i32, i64, bool), never f64.
//!
//! Each step kernel runs its code's steps in order: a phase is split across the threads of a `rayon` pool
//! (items in contiguous ranges; a phase too small to be worth it runs on the calling thread), a GEMM step runs
//! the blocked GEMM ([`gemm`]). A kernel that finds bad data (an index out of range) stops the step with an
//! error naming the kernel and the value.

pub mod gemm;

pub use crate::host::encode_into;
use crate::host::{check_views, decode_view, grown};

use crate::RuntimeError;
use fulgur_codegen::kernels::build_program;
use fulgur_codegen::llvm::{compile, JitProgram, LlvmOptions};
use fulgur_codegen::loops::{LoopKernel, Slot, Step};
use fulgur_codegen::program::{BufferKind, Kernel, KernelProgram, Layout, TensorRef};
use fulgur_ir::{DType, Dim, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Carried inputs: placeholders of their types and shapes (for binding), and their bytes.
type Held = (HashMap<String, Tensor>, HashMap<String, Vec<u8>>);

/// A raw pointer that may cross threads (the kernels' memory is disjoint per item range by construction).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Zeroed bytes aligned to 64.
pub struct Bytes {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

unsafe impl Send for Bytes {}
unsafe impl Sync for Bytes {}

impl Bytes {
    /// `len` zero bytes; an error (not an abort) when the system cannot give them.
    pub fn zeroed(len: usize, what: &str) -> Result<Bytes, RuntimeError> {
        if len == 0 {
            return Ok(Bytes {
                ptr: std::ptr::NonNull::dangling(),
                len: 0,
            });
        }
        let layout = std::alloc::Layout::from_size_align(len, 64)
            .map_err(|_| RuntimeError::Other(format!("{what}: {len} bytes is not an allocatable size")))?;
        // SAFETY: the layout has a non-zero size
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(p).ok_or_else(|| {
            RuntimeError::Other(format!(
                "{what}: cannot allocate {} (out of memory)",
                fulgur_ir::interp::fmt_bytes(len as u64)
            ))
        })?;
        Ok(Bytes { ptr, len })
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated (or a dangling pointer with length 0)
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated with this layout in `zeroed`
            unsafe {
                std::alloc::dealloc(
                    self.ptr.as_ptr(),
                    std::alloc::Layout::from_size_align_unchecked(self.len, 64),
                )
            };
        }
    }
}

/// Options of the CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuOptions {
    /// Threads (`None`: one per core).
    pub threads: Option<usize>,
    /// The most bytes a binding may plan (persistent buffers, arena and scratch); `None`: no limit.
    pub max_memory: Option<u64>,
    pub llvm: LlvmOptions,
    /// After every step kernel, check its float outputs and stop at the first NaN, naming the kernel (slow:
    /// for finding where a run went wrong).
    pub check_finite: bool,
}

/// Time spent per kernel code, for `fulgur bench`.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Seconds per step kernel (by kernel id), summed over the runs since the last reset.
    pub kernel_seconds: Vec<f64>,
    /// Seconds outside the kernels: binding and writing the inputs, reading the outputs into host tensors.
    pub host_seconds: f64,
    /// Seconds per step of every step kernel (by kernel id, then step index: its phases and GEMMs).
    pub step_seconds: Vec<Vec<f64>>,
    pub runs: usize,
}

/// The view a packed GEMM operand was packed from (buffer, element offset, strides, `[k, n]`): reused only
/// for exactly this view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedView {
    buffer: usize,
    offset: i64,
    rs: i64,
    cs: i64,
    k: usize,
    n: usize,
}

/// The memory and parameters of one binding of the symbols.
struct Binding {
    env: HashMap<String, i64>,
    layout: Layout,
    /// Parameters of every code.
    params: Vec<Vec<i64>>,
    /// Byte offsets of every code's scratch buffers in the scratch area.
    scratch: Vec<Vec<usize>>,
    scratch_bytes: usize,
}

/// A kernel program compiled for the CPU, with its weights resident.
pub struct CpuProgram {
    pub program: KernelProgram,
    pub kernels: Vec<LoopKernel>,
    pub jit: JitProgram,
    pool: rayon::ThreadPool,
    options: CpuOptions,
    /// Persistent buffers by buffer id (inputs, constants, prepared values).
    persistent: Vec<Option<Bytes>>,
    /// Weights by buffer id: shared (never copied) with other programs of the same model
    /// ([`CpuProgram::share_weights`]).
    weights: Vec<Option<Arc<Bytes>>>,
    arena: Bytes,
    scratch: Bytes,
    binding: Option<Binding>,
    /// The symbols the prepare program depends on (those of its kernels' views and of the buffers it fills):
    /// a binding that changes only others (a decode step's cache length) does not rerun it.
    prepare_symbols: BTreeSet<String>,
    /// Those symbols' values when the prepare program last ran (`None`: not run since the weights changed).
    prepared_at: Option<BTreeMap<String, i64>>,
    /// The `B` operands of GEMMs that read weights (or values prepared from them), packed once per prepare:
    /// by (step kernel id, step index, expert).
    packed: HashMap<(usize, usize, usize), (PackedView, gemm::PackedB)>,
    /// Prepared buffers read by step kernels only as packed GEMM operands: freed once packed (and made again
    /// when the prepare program reruns).
    pack_only: Vec<bool>,
    dropped: Vec<bool>,
    /// Keep every prepared value (a traced run reads them all).
    keep_prepared: bool,
    /// How many times the prepare program ran.
    prepare_runs: usize,
    /// Seconds per step of every step kernel while profiling (run_kernel borrows the program immutably).
    step_profile: std::sync::Mutex<Vec<Vec<f64>>>,
    /// Seconds the JIT took (emit, optimise, compile) and building the loop forms.
    pub compile_seconds: f64,
    pub profile: Option<Profile>,
    /// How many calls took their carried inputs as the bytes of their previous outputs ([`CpuProgram::run_carried`]).
    pub carried_runs: usize,
    /// The transport of a rank's program: runs its collectives (`on_rank`).
    transport: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
}

fn other(m: impl Into<String>) -> RuntimeError {
    RuntimeError::Other(m.into())
}

impl CpuProgram {
    /// Builds the loop form of every kernel and JIT-compiles it for this CPU.
    pub fn new(program: KernelProgram, options: CpuOptions) -> Result<CpuProgram, RuntimeError> {
        let t = Instant::now();
        let kernels = build_program(&program).map_err(|e| other(e.to_string()))?;
        let jit = compile(&kernels, &options.llvm).map_err(|e| other(e.to_string()))?;
        let compile_seconds = t.elapsed().as_secs_f64();
        let threads = options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .stack_size(16 << 20)
            .thread_name(|i| format!("fulgur-cpu-{i}"))
            .build()
            .map_err(|e| other(format!("cannot start the CPU threads: {e}")))?;
        let n = program.buffers.len();
        let prepare_symbols = crate::host::prepare_symbols(&program);
        let pack_only = pack_only_buffers(&program, &kernels);
        Ok(CpuProgram {
            prepare_symbols,
            persistent: (0..n).map(|_| None).collect(),
            weights: (0..n).map(|_| None).collect(),
            program,
            kernels,
            jit,
            pool,
            options,
            arena: Bytes::zeroed(0, "arena")?,
            scratch: Bytes::zeroed(0, "scratch")?,
            binding: None,
            prepared_at: None,
            packed: HashMap::new(),
            pack_only,
            dropped: vec![false; n],
            keep_prepared: false,
            prepare_runs: 0,
            step_profile: std::sync::Mutex::new(Vec::new()),
            compile_seconds,
            profile: None,
            carried_runs: 0,
            transport: None,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Loads one weight (converted to the parameter's dtype); its shape must be the parameter's.
    pub fn set_weight(&mut self, name: &str, t: &Tensor) -> Result<(), RuntimeError> {
        let io = crate::host::weight_param(&self.program, name, t)?.clone();
        let bytes = t.numel() * io.ty.dtype.size_bytes();
        let mut buf = Bytes::zeroed(bytes, &format!("weight `{name}`"))?;
        encode_into(t, io.ty.dtype, buf.as_mut_slice());
        self.weights[io.tensor.buffer] = Some(Arc::new(buf));
        self.prepared_at = None;
        Ok(())
    }

    /// Uses the weights `from` holds for every parameter of the same name, dtype and shape (without copying
    /// them: both programs read the same memory); returns how many were shared.
    pub fn share_weights(&mut self, from: &CpuProgram) -> usize {
        let mut shared = 0;
        for io in &self.program.params {
            let Some(src) = from.program.params.iter().find(|p| p.name == io.name) else {
                continue;
            };
            if src.ty != io.ty {
                continue;
            }
            if let Some(w) = &from.weights[src.tensor.buffer] {
                self.weights[io.tensor.buffer] = Some(Arc::clone(w));
                shared += 1;
            }
        }
        if shared > 0 {
            self.prepared_at = None;
        }
        shared
    }

    /// Loads every weight from `weights` (by name); all must be present.
    pub fn load_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        let names: Vec<String> = self.program.params.iter().map(|p| p.name.clone()).collect();
        for name in names {
            let t = weights
                .get(&name)
                .ok_or_else(|| other(format!("weight `{name}` is missing")))?;
            self.set_weight(&name, t)?;
        }
        Ok(())
    }

    /// Loads every weight from `fetch(name, type)`, one at a time (a weight's host copy is dropped as soon as
    /// it is in the program's memory): the way to load a large checkpoint without holding it twice.
    pub fn load_weights_from<E: std::fmt::Display>(
        &mut self,
        mut fetch: impl FnMut(&str, &fulgur_ir::TensorType) -> Result<Tensor, E>,
    ) -> Result<(), RuntimeError> {
        let params: Vec<(String, fulgur_ir::TensorType)> = self
            .program
            .params
            .iter()
            .map(|p| (p.name.clone(), p.ty.clone()))
            .collect();
        for (name, ty) in params {
            let t = fetch(&name, &ty).map_err(|e| other(e.to_string()))?;
            self.set_weight(&name, &t)?;
        }
        Ok(())
    }

    /// The names of the weights not loaded yet.
    pub fn missing_weights(&self) -> Vec<String> {
        self.program
            .params
            .iter()
            .filter(|p| self.weights[p.tensor.buffer].is_none())
            .map(|p| p.name.clone())
            .collect()
    }

    /// Binds the symbols from the inputs' shapes, checking every input's dtype and shape.
    fn bind_inputs(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, i64>, RuntimeError> {
        crate::host::bind_inputs(&self.program, inputs)
    }

    /// Plans the memory of a binding (and allocates it), unless already bound to `env`.
    fn bind(&mut self, env: HashMap<String, i64>) -> Result<(), RuntimeError> {
        if self.binding.as_ref().map(|b| &b.env) == Some(&env) {
            return Ok(());
        }
        let layout = self.program.layout(&env).map_err(|e| other(e.to_string()))?;
        check_views(&self.program, &layout, &env)?;
        let (params, scratch, scratch_bytes) = crate::host::kernel_params(&self.kernels, &env, 64)?;
        let planned = layout.planned_peak().saturating_add(scratch_bytes as u64);
        if let Some(limit) = self.options.max_memory {
            if planned > limit {
                let mut syms: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                syms.sort();
                return Err(other(format!(
                    "at {} the program needs {} (planned peak {}: persistent {}, arena {}; kernel scratch {}), \
                     more than the limit of {}",
                    syms.join(", "),
                    fulgur_ir::interp::fmt_bytes(planned),
                    fulgur_ir::interp::fmt_bytes(layout.planned_peak()),
                    fulgur_ir::interp::fmt_bytes(layout.persistent_bytes),
                    fulgur_ir::interp::fmt_bytes(layout.arena_bytes),
                    fulgur_ir::interp::fmt_bytes(scratch_bytes as u64),
                    fulgur_ir::interp::fmt_bytes(limit)
                )));
            }
        }
        // memory that must grow grows by half again, so that a symbol growing by one per call (a decode
        // step's cache length) reallocates (and faults in fresh pages) rarely, not at every call
        if self.arena.len() < layout.arena_bytes as usize {
            let size = grown(layout.arena_bytes as usize, self.arena.len());
            self.arena = Bytes::zeroed(size, "the arena")?;
        }
        if self.scratch.len() < scratch_bytes {
            self.scratch = Bytes::zeroed(grown(scratch_bytes, self.scratch.len()), "kernel scratch")?;
        }
        // persistent buffers whose size depends on the binding are reallocated
        for b in &self.program.buffers {
            // weights are loaded, not allocated; a freed prepared value is made again by the prepare program
            if b.kind == BufferKind::Transient || b.kind == BufferKind::Weight || self.dropped[b.id] {
                continue;
            }
            let size = layout.sizes[b.id] as usize;
            let have = self.persistent[b.id].as_ref().map(|x| x.len());
            // an input's buffer may be larger than the call needs (it only ever holds the call's values)
            let ok = match have {
                Some(len) if b.kind == BufferKind::Input => len >= size,
                Some(len) => len == size,
                None => false,
            };
            if !ok {
                let alloc = if b.kind == BufferKind::Input {
                    grown(size, have.unwrap_or(0))
                } else {
                    size
                };
                self.persistent[b.id] = Some(Bytes::zeroed(alloc, &format!("buffer b{}", b.id))?);
                if b.kind == BufferKind::Prepared || b.kind == BufferKind::Constant {
                    self.prepared_at = None;
                }
            }
        }
        self.binding = Some(Binding {
            env,
            layout,
            params,
            scratch,
            scratch_bytes,
        });
        Ok(())
    }

    /// Memory of the current binding: (planned peak with scratch, bytes actually allocated).
    pub fn memory(&self) -> Option<(u64, u64)> {
        let b = self.binding.as_ref()?;
        let planned = b.layout.planned_peak() + b.scratch_bytes as u64;
        let held: usize = self.persistent.iter().flatten().map(|x| x.len()).sum::<usize>()
            + self.weights.iter().flatten().map(|x| x.len()).sum::<usize>()
            + self.packed.values().map(|p| p.1.bytes()).sum::<usize>()
            + self.arena.len()
            + self.scratch.len();
        Some((planned, held as u64))
    }

    /// The base pointer of buffer `b`.
    fn buffer_ptr(&self, b: usize) -> Result<*mut u8, RuntimeError> {
        let binding = self.binding.as_ref().ok_or_else(|| other("no binding"))?;
        match binding.layout.offsets[b] {
            Some(off) => Ok(unsafe { self.arena.as_ptr().add(off as usize) }),
            None if self.dropped[b] => Ok(std::ptr::NonNull::<u8>::dangling().as_ptr()),
            None if self.program.buffers[b].kind == BufferKind::Weight => self.weights[b]
                .as_ref()
                .map(|x| x.as_ptr())
                .ok_or_else(|| other(format!("buffer b{b} has no memory (a weight not loaded?)"))),
            None => self.persistent[b]
                .as_ref()
                .map(|x| x.as_ptr())
                .ok_or_else(|| other(format!("buffer b{b} has no memory (a weight not loaded?)"))),
        }
    }

    fn fill_constants(&mut self) -> Result<(), RuntimeError> {
        for b in self.program.buffers.clone() {
            if let Some(t) = crate::host::constant_tensor(&b) {
                let buf = self.persistent[b.id]
                    .as_mut()
                    .ok_or_else(|| other(format!("constant b{} has no memory", b.id)))?;
                encode_into(&t, b.dtype, buf.as_mut_slice());
            }
        }
        Ok(())
    }

    /// Runs the prepare program (once per weights and binding).
    fn prepare(&mut self) -> Result<(), RuntimeError> {
        let env: Option<BTreeMap<String, i64>> = self.binding.as_ref().map(|b| {
            b.env
                .iter()
                .filter(|(k, _)| self.prepare_symbols.contains(*k))
                .map(|(k, v)| (k.clone(), *v))
                .collect()
        });
        if self.prepared_at.is_some() && self.prepared_at == env {
            return Ok(());
        }
        // until this run completes, nothing prepared is valid (a failed one leaves zeroed values behind)
        self.prepared_at = None;
        let missing = self.missing_weights();
        if !missing.is_empty() {
            return Err(crate::host::missing_weights_error(&missing));
        }
        self.fill_constants()?;
        self.packed.clear();
        if let Some(binding) = &self.binding {
            for b in 0..self.dropped.len() {
                if self.dropped[b] {
                    let size = binding.layout.sizes[b] as usize;
                    self.persistent[b] = Some(Bytes::zeroed(size, &format!("buffer b{b}"))?);
                    self.dropped[b] = false;
                }
            }
        }
        let kernels = self.program.prepare.clone();
        for k in &kernels {
            self.run_kernel(k, false)?;
        }
        self.pack_weights()?;
        self.prepare_runs += 1;
        // a prepared value read only as packed GEMM operands is no longer needed
        for b in 0..self.pack_only.len() {
            if self.pack_only[b] && !self.keep_prepared {
                self.persistent[b] = None;
                self.dropped[b] = true;
            }
        }
        self.prepared_at = env;
        Ok(())
    }

    /// Packs the `B` operand of every GEMM step that reads a weight, a constant or a prepared value (and
    /// whose shape does not depend on the call), once: per call those GEMMs then only pack `A`.
    fn pack_weights(&mut self) -> Result<(), RuntimeError> {
        self.packed.clear();
        let binding = self.binding.as_ref().ok_or_else(|| other("no binding"))?;
        let nr = self.jit.tile.1;
        let mut packed = HashMap::new();
        let mut unpacked = Vec::new();
        for k in &self.program.step {
            let lk = &self.kernels[k.code];
            let params = &binding.params[k.code];
            let ev = |e| lk.pool.eval(e, params);
            let fixed = |slot: u32| match lk.slots.get(slot as usize) {
                Some(Slot::Input(i)) => {
                    let b = k.inputs[*i].buffer;
                    matches!(
                        self.program.buffers[b].kind,
                        BufferKind::Weight | BufferKind::Prepared | BufferKind::Constant
                    )
                    .then_some(b)
                }
                _ => None,
            };
            for (s, st) in lk.steps.iter().enumerate() {
                // (operand, k, n, [(expert, element offset)])
                let (op, kk, n, starts) = match st {
                    Step::Gemm(g) if b_shared_by_batch(lk, g) => {
                        let (Some(kk), Some(n), Some(o)) = (ev(g.k), ev(g.n), ev(g.b.offset)) else {
                            continue;
                        };
                        (&g.b, kk, n, vec![(0usize, o)])
                    }
                    Step::GroupedGemm(g) if !g.depth => {
                        let (Some(kk), Some(n), Some(o), Some(e), Some(es)) =
                            (ev(g.k), ev(g.n), ev(g.w.offset), ev(g.experts), ev(g.expert_stride))
                        else {
                            continue;
                        };
                        (
                            &g.w,
                            kk,
                            n,
                            (0..e.max(0) as usize).map(|x| (x, o + x as i64 * es)).collect(),
                        )
                    }
                    _ => continue,
                };
                let Some(buf) = fixed(op.arg) else { continue };
                let (Some(rs), Some(cs)) = (ev(op.rs), ev(op.cs)) else {
                    unpacked.push(buf);
                    continue;
                };
                if kk <= 0 || n <= 0 {
                    unpacked.push(buf);
                    continue;
                }
                let base = self.buffer_ptr(buf)?;
                for (e, off) in starts {
                    let mat = gemm::Mat {
                        // SAFETY: the operand's view lies in its buffer
                        ptr: unsafe { base.offset(off as isize * op.dtype.size_bytes() as isize) },
                        dtype: op.dtype,
                        rs: rs as isize,
                        cs: cs as isize,
                    };
                    // SAFETY: as above, for [kk, n] with these strides
                    let p = unsafe { gemm::PackedB::pack(&self.pool, &mat, kk as usize, n as usize, nr) };
                    let view = PackedView {
                        buffer: buf,
                        offset: off,
                        rs,
                        cs,
                        k: kk as usize,
                        n: n as usize,
                    };
                    packed.insert((k.id, s, e), (view, p));
                }
            }
        }
        self.packed = packed;
        for b in unpacked {
            self.pack_only[b] = false;
        }
        Ok(())
    }

    /// How many times the prepare program (and the packing of weights) ran: once per weights and values of
    /// the symbols it depends on.
    pub fn prepare_runs(&self) -> usize {
        self.prepare_runs
    }

    /// Bytes of the weights packed for GEMMs (allocated at the first run after the weights change; counted in
    /// [`CpuProgram::memory`]'s allocated bytes, not in the planned peak).
    pub fn packed_bytes(&self) -> usize {
        self.packed.values().map(|p| p.1.bytes()).sum()
    }

    /// The packed `B` of (kernel, step, expert) when one was packed for this view (the packing is redone
    /// whenever the prepare program runs, which every change of the weights triggers); else `b` itself, which
    /// must then have its memory.
    fn packed_b(
        &self,
        key: (usize, usize, usize),
        view: PackedView,
        b: &gemm::Mat,
    ) -> Result<gemm::BOperand<'_>, RuntimeError> {
        match self.packed.get(&key) {
            Some((v, p)) if *v == view => Ok(gemm::BOperand::Packed(p)),
            _ if self.dropped.get(view.buffer).copied().unwrap_or(false) => Err(other(format!(
                "buffer b{} was freed after packing, but kernel k{} step {} needs it unpacked",
                view.buffer, key.0, key.1
            ))),
            _ => Ok(gemm::BOperand::Mat(*b)),
        }
    }

    /// Binds the symbols from `inputs`, runs the prepare program if needed, and writes the inputs.
    fn begin_step(&mut self, inputs: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        self.begin_step_holding(inputs, &HashMap::new())
    }

    /// [`CpuProgram::begin_step`] where the inputs in `held` are given as their bytes (`inputs` holds a
    /// placeholder of their type and shape, for binding).
    fn begin_step_holding(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        held: &HashMap<String, Vec<u8>>,
    ) -> Result<(), RuntimeError> {
        let env = self.bind_inputs(inputs)?;
        self.bind(env)?;
        self.prepare()?;
        for io in &self.program.inputs {
            let buf = self.persistent[io.tensor.buffer]
                .as_mut()
                .ok_or_else(|| other(format!("input `{}` has no memory", io.name)))?;
            match held.get(&io.name) {
                // (no bytes: a donated output, already in this buffer)
                Some(bytes) => buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes),
                None => encode_into(&inputs[&io.name], io.ty.dtype, buf.as_mut_slice()),
            }
        }
        Ok(())
    }

    /// Every output of the step just run.
    fn outputs(&self) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.outputs_except(&[])
    }

    /// Every output of the step just run but those named in `skip`.
    fn outputs_except(&self, skip: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let mut out = BTreeMap::new();
        for io in &self.program.outputs {
            if !skip.contains(&io.name) {
                out.insert(io.name.clone(), self.read(&io.tensor)?);
            }
        }
        Ok(out)
    }

    /// The bytes of every carried output of the last call, with placeholders of their types and shapes for
    /// binding; `None` when one cannot be carried (see [`crate::Executable::run_carried`]).
    fn carried_outputs(&self, carried: &[String]) -> Option<Result<Held, RuntimeError>> {
        let binding = self.binding.as_ref()?;
        let mut views = Vec::new();
        for name in carried {
            let out = self.program.outputs.iter().find(|o| &o.name == name)?;
            let inp = self.program.inputs.iter().find(|i| &i.name == name)?;
            if out.ty.dtype != inp.ty.dtype || !out.tensor.is_contiguous() || self.dropped[out.tensor.buffer] {
                return None;
            }
            views.push((name.clone(), out.tensor.clone(), out.tensor.buffer == inp.tensor.buffer));
        }
        Some((|| {
            let (mut shapes, mut held) = (HashMap::new(), HashMap::new());
            for (name, t, donated) in views {
                let ev = |d: &Dim| d.eval(&binding.env).map_err(other);
                let shape: Vec<usize> = t
                    .shape
                    .iter()
                    .map(|d| ev(d).map(|x| x.max(0) as usize))
                    .collect::<Result<_, _>>()?;
                if donated {
                    // already in its input's buffer (the program wrote it there): no bytes to copy back
                    shapes.insert(name.clone(), crate::host::placeholder(t.dtype, shape));
                    held.insert(name, Vec::new());
                    continue;
                }
                let es = t.dtype.size_bytes();
                let n: usize = shape.iter().product();
                let off = ev(&t.offset)? as usize * es;
                let base = self.buffer_ptr(t.buffer)?;
                // SAFETY: the view lies in its buffer (check_views)
                let bytes = unsafe { std::slice::from_raw_parts(base.add(off), n * es) }.to_vec();
                shapes.insert(name.clone(), crate::host::placeholder(t.dtype, shape));
                held.insert(name, bytes);
            }
            Ok((shapes, held))
        })())
    }

    /// Runs one step: binds the symbols from `inputs`, runs the prepare program if needed, then the step
    /// kernels; returns every output.
    pub fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.run_holding(inputs, &HashMap::new(), &[])
    }

    /// [`crate::Executable::run_carried`]: the carried outputs' bytes copied to their inputs' buffers, never
    /// converted to host tensors.
    pub fn run_carried(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        carried: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        let held = self.carried_outputs(carried)?;
        Some(held.and_then(|(shapes, held)| {
            let mut all = inputs.clone();
            all.extend(shapes);
            let r = self.run_holding(&all, &held, carried);
            if r.is_ok() {
                self.carried_runs += 1;
            }
            r
        }))
    }

    fn run_holding(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        held: &HashMap<String, Vec<u8>>,
        skip: &[String],
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let t0 = Instant::now();
        self.begin_step_holding(inputs, held)?;
        let profile = self.profile.is_some();
        let mut host = t0.elapsed().as_secs_f64();
        if let Some(p) = &mut self.profile {
            p.kernel_seconds.resize(self.program.step.len(), 0.0);
            if p.runs == 0 {
                if let Ok(mut steps) = self.step_profile.lock() {
                    steps.clear();
                }
            }
            p.runs += 1;
        }
        let kernels = std::mem::take(&mut self.program.step);
        let mut result = Ok(());
        for k in &kernels {
            let t = profile.then(Instant::now);
            if let Err(e) = self.run_kernel(k, true) {
                result = Err(e);
                break;
            }
            if self.options.check_finite {
                if let Err(e) = self.check_finite(k) {
                    result = Err(e);
                    break;
                }
            }
            if let (Some(t), Some(p)) = (t, &mut self.profile) {
                p.kernel_seconds[k.id] += t.elapsed().as_secs_f64();
            }
        }
        self.program.step = kernels;
        result?;
        let t1 = Instant::now();
        let out = self.outputs_except(skip);
        host += t1.elapsed().as_secs_f64();
        if let Some(p) = &mut self.profile {
            p.host_seconds += host;
            if let Ok(steps) = self.step_profile.lock() {
                p.step_seconds = steps.clone();
            }
        }
        out
    }

    /// Runs one step like [`CpuProgram::run`], calling `trace` after every step kernel with the kernel, the
    /// values of its inputs (read before it ran) and of its outputs: the way to check each kernel against the
    /// interpreter on real data.
    pub fn run_traced(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        mut trace: impl FnMut(&Kernel, &[Tensor], &[Tensor]) -> Result<(), RuntimeError>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        if !self.keep_prepared {
            self.keep_prepared = true;
            if self.dropped.iter().any(|&d| d) {
                self.prepared_at = None;
            }
        }
        self.begin_step(inputs)?;
        for k in self.program.step.clone() {
            let ins: Vec<Tensor> = k.inputs.iter().map(|t| self.read(t)).collect::<Result<_, _>>()?;
            self.run_kernel(&k, true)?;
            let outs: Vec<Tensor> = k.outputs.iter().map(|t| self.read(t)).collect::<Result<_, _>>()?;
            trace(&k, &ins, &outs)?;
        }
        self.outputs()
    }

    /// Reads a view of the current memory as a host tensor.
    /// Stops at a kernel whose float outputs hold a NaN (an infinity alone is not an error: causal masks hold
    /// −inf; an overflow shows as a NaN where it is used).
    fn check_finite(&self, k: &Kernel) -> Result<(), RuntimeError> {
        for (i, t) in k.outputs.iter().enumerate() {
            if !t.dtype.is_float() {
                continue;
            }
            let v = self.read(t)?;
            if let fulgur_ir::Buffer::F(data) = &v.data {
                if let Some((at, x)) = data.iter().enumerate().find(|(_, x)| x.is_nan()) {
                    return Err(other(format!(
                        "kernel k{} ({}, {}) produced {x} at element {at} of output {i} ({} {:?}): the first \
                         kernel of the step to produce a NaN",
                        k.id,
                        k.name,
                        fulgur_codegen::program::op_summary(&k.op),
                        t.dtype,
                        v.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// Makes this program one rank's: its collectives (`on_rank`) go through `t`.
    pub fn set_transport(&mut self, t: std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>) {
        self.transport = Some(t);
    }

    /// Writes `v` into the contiguous view `t` (a collective's output).
    fn write(&self, t: &TensorRef, v: &Tensor) -> Result<(), RuntimeError> {
        if !t.is_contiguous() {
            return Err(other(format!("a collective's output b{} is not contiguous", t.buffer)));
        }
        let env = &self.binding.as_ref().ok_or_else(|| other("no binding"))?.env;
        let offset = t.offset.eval(env).map_err(other)?;
        let bytes = v.numel() * t.dtype.size_bytes();
        let mut buf = vec![0u8; bytes];
        crate::host::encode_into(v, t.dtype, &mut buf);
        let base = self.buffer_ptr(t.buffer)?;
        // SAFETY: the view lies in its buffer by construction of the program, and no kernel runs beside this one
        unsafe {
            let dst = base.add(offset as usize * t.dtype.size_bytes());
            std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, bytes);
        }
        Ok(())
    }

    fn read(&self, t: &TensorRef) -> Result<Tensor, RuntimeError> {
        let env = &self.binding.as_ref().ok_or_else(|| other("no binding"))?.env;
        let ev = |d: &Dim| d.eval(env).map_err(other);
        let shape: Vec<usize> = t
            .shape
            .iter()
            .map(|d| ev(d).map(|x| x.max(0) as usize))
            .collect::<Result<_, _>>()?;
        let strides: Vec<i64> = t.strides.iter().map(ev).collect::<Result<_, _>>()?;
        let offset = ev(&t.offset)?;
        if self.dropped[t.buffer] {
            return Err(other(format!(
                "buffer b{} was freed once its GEMM operands were packed",
                t.buffer
            )));
        }
        let base = self.buffer_ptr(t.buffer)?;
        // SAFETY: the view lies in its buffer by construction of the program
        Ok(unsafe { decode_view(&self.pool, base, t.dtype, &shape, &strides, offset) })
    }

    fn run_kernel(&self, k: &Kernel, step: bool) -> Result<(), RuntimeError> {
        let binding = self.binding.as_ref().ok_or_else(|| other("no binding"))?;
        let lk = &self.kernels[k.code];
        let params = &binding.params[k.code];
        let mut slots: Vec<*mut u8> = Vec::with_capacity(lk.slots.len());
        for s in &lk.slots {
            slots.push(match *s {
                Slot::Input(i) => self.buffer_ptr(k.inputs[i].buffer)?,
                Slot::Output(i) => self.buffer_ptr(k.outputs[i].buffer)?,
                Slot::Scratch(i) => unsafe { self.scratch.as_ptr().add(binding.scratch[k.code][i]) },
            });
        }
        let what = if step { "kernel" } else { "prepare kernel" };
        let fail = |m: String| other(format!("{what} k{} ({}): {m}", k.id, k.name));
        let ev = |e| {
            lk.pool
                .eval(e, params)
                .ok_or_else(|| fail("a size of its code cannot be evaluated".into()))
        };
        let kern = gemm::Kernel::of(&self.jit);
        // the buffer behind a slot (usize::MAX for scratch)
        let slot_buffer = |slot: u32| match lk.slots[slot as usize] {
            Slot::Input(i) => k.inputs[i].buffer,
            Slot::Output(i) => k.outputs[i].buffer,
            Slot::Scratch(_) => usize::MAX,
        };
        // element `off` of a slot holding `dt` values
        // (wrapping: a freed buffer's slot is a dangling pointer, never dereferenced)
        let at = |slot: u32, dt: DType, off: i64| {
            slots[slot as usize].wrapping_offset(off as isize * dt.size_bytes() as isize)
        };
        let profiling = step && self.profile.is_some();
        let mut step_times: Vec<f64> = Vec::new();
        for (s, st) in lk.steps.iter().enumerate() {
            let t_step = profiling.then(Instant::now);
            match st {
                Step::Collective(op) => {
                    let fulgur_ir::Op::Composite(fulgur_ir::Composite::OnRank { op: inner, rank }) = op else {
                        return Err(fail(format!("a collective step of `{}`", op.name())));
                    };
                    let t = self.transport.as_ref().ok_or_else(|| {
                        fail(
                            "a collective (`on_rank`) needs a transport: run the rank's program on simulated ranks"
                                .into(),
                        )
                    })?;
                    let args: Vec<Tensor> = k.inputs.iter().map(|r| self.read(r)).collect::<Result<_, _>>()?;
                    let refs: Vec<&Tensor> = args.iter().collect();
                    let outs = t.collective(inner, *rank, &refs).map_err(fail)?;
                    for (r, o) in k.outputs.iter().zip(&outs) {
                        self.write(r, o)?;
                    }
                }
                Step::Phase(p) => {
                    let f = self.jit.phases[k.code][s].ok_or_else(|| fail("a phase without code".into()))?;
                    let grid = ev(p.grid)?;
                    let cost = ev(p.item_cost).unwrap_or(1).max(1);
                    if let Some((code, val)) = self.run_phase(f, &slots, params, grid, cost) {
                        let check = lk
                            .checks
                            .get(code as usize - 1)
                            .cloned()
                            .unwrap_or_else(|| "a check failed".into());
                        return Err(fail(format!("{check}: got {val}")));
                    }
                }
                Step::Gemm(g) => {
                    let (m, n, kk) = (ev(g.m)?, ev(g.n)?, ev(g.k)?);
                    let batch: Vec<[i64; 4]> = g
                        .batch
                        .iter()
                        .map(|b| Ok([ev(b[0])?, ev(b[1])?, ev(b[2])?, ev(b[3])?]))
                        .collect::<Result<_, RuntimeError>>()?;
                    let total: i64 = batch.iter().map(|b| b[0]).product();
                    let (ao, bo, co) = (ev(g.a.offset)?, ev(g.b.offset)?, ev(g.c.offset)?);
                    let (ars, acs, brs, bcs, crs, ccs) = (
                        ev(g.a.rs)?,
                        ev(g.a.cs)?,
                        ev(g.b.rs)?,
                        ev(g.b.cs)?,
                        ev(g.c.rs)?,
                        ev(g.c.cs)?,
                    );
                    // every batch element's operands
                    let mut calls: Vec<(gemm::Mat, gemm::BOperand, SendPtr)> =
                        Vec::with_capacity(total.max(0) as usize);
                    let mut idx = vec![0i64; batch.len()];
                    for _ in 0..total.max(0) {
                        let (mut da, mut db, mut dc) = (ao, bo, co);
                        for (j, b) in batch.iter().enumerate() {
                            da += idx[j] * b[1];
                            db += idx[j] * b[2];
                            dc += idx[j] * b[3];
                        }
                        let b_op = self.packed_b(
                            (k.id, s, 0),
                            PackedView {
                                buffer: slot_buffer(g.b.arg),
                                offset: db,
                                rs: brs,
                                cs: bcs,
                                k: kk as usize,
                                n: n as usize,
                            },
                            &gemm::Mat {
                                ptr: at(g.b.arg, g.b.dtype, db),
                                dtype: g.b.dtype,
                                rs: brs as isize,
                                cs: bcs as isize,
                            },
                        )?;
                        let a_op = gemm::Mat {
                            ptr: at(g.a.arg, g.a.dtype, da),
                            dtype: g.a.dtype,
                            rs: ars as isize,
                            cs: acs as isize,
                        };
                        calls.push((a_op, b_op, SendPtr(at(g.c.arg, g.c.dtype, dc))));
                        for a in (0..batch.len()).rev() {
                            idx[a] += 1;
                            if idx[a] < batch[a][0] {
                                break;
                            }
                            idx[a] = 0;
                        }
                    }
                    let one = |(a_op, b_op, c): &(gemm::Mat, gemm::BOperand, SendPtr)| {
                        // SAFETY: the operands are views of their buffers (the program's construction), and
                        // the batch elements write disjoint parts of C
                        unsafe {
                            gemm::gemm(
                                &self.pool,
                                kern,
                                m as usize,
                                n as usize,
                                kk as usize,
                                *a_op,
                                *b_op,
                                c.0,
                                g.c.dtype,
                                crs as isize,
                                ccs as isize,
                            );
                        }
                    };
                    // many small GEMMs (a block-form kernel's): one per thread at a time, each serial (only
                    // those the driver itself runs serially, so that no GEMM nests parallel work)
                    let threads = self.pool.current_num_threads();
                    let small = !gemm::runs_parallel(threads, m as usize, n as usize, kk as usize);
                    if calls.len() > 1 && small && threads > 1 {
                        self.pool.install(|| calls.par_iter().for_each(one));
                    } else {
                        calls.iter().for_each(one);
                    }
                }
                Step::GroupedGemm(g) => {
                    let (m, n, kk, experts) = (ev(g.m)?, ev(g.n)?, ev(g.k)?, ev(g.experts)?);
                    let (co, cst) = (ev(g.counts_offset)?, ev(g.counts_stride)?);
                    let mut counts = Vec::with_capacity(experts as usize);
                    for e in 0..experts {
                        let at = (co + e * cst) as isize;
                        // SAFETY: the counts view lies in its buffer
                        let c = unsafe {
                            match g.counts_dtype {
                                DType::I32 => *(slots[g.counts_arg as usize] as *const i32).offset(at) as i64,
                                _ => *(slots[g.counts_arg as usize] as *const i64).offset(at),
                            }
                        };
                        if c < 0 {
                            return Err(fail(format!("`grouped_matmul`: expert {e} has a negative count {c}")));
                        }
                        counts.push(c);
                    }
                    let total: i64 = counts.iter().sum();
                    if g.depth {
                        // out[e] = A[:, group e] · B[group e, :]; rows past the groups belong to none
                        let (xo, xrs, xcs) = (ev(g.x.offset)?, ev(g.x.rs)?, ev(g.x.cs)?);
                        let (wo, wrs, wcs) = (ev(g.w.offset)?, ev(g.w.rs)?, ev(g.w.cs)?);
                        let (oo, ors, ocs, es) =
                            (ev(g.out.offset)?, ev(g.out.rs)?, ev(g.out.cs)?, ev(g.expert_stride)?);
                        let mut start = 0i64;
                        for (e, &c) in counts.iter().enumerate() {
                            let depth = c.min(kk - start);
                            if depth <= 0 {
                                start += c;
                                continue;
                            }
                            // SAFETY: as for GEMM steps: the operands are views of their buffers
                            unsafe {
                                gemm::gemm(
                                    &self.pool,
                                    kern,
                                    m as usize,
                                    n as usize,
                                    depth as usize,
                                    gemm::Mat {
                                        ptr: at(g.x.arg, g.x.dtype, xo + start * xcs),
                                        dtype: g.x.dtype,
                                        rs: xrs as isize,
                                        cs: xcs as isize,
                                    },
                                    gemm::BOperand::Mat(gemm::Mat {
                                        ptr: at(g.w.arg, g.w.dtype, wo + start * wrs),
                                        dtype: g.w.dtype,
                                        rs: wrs as isize,
                                        cs: wcs as isize,
                                    }),
                                    at(g.out.arg, g.out.dtype, oo + e as i64 * es),
                                    g.out.dtype,
                                    ors as isize,
                                    ocs as isize,
                                );
                            }
                            start += c;
                        }
                        continue;
                    }
                    let (xo, xrs, xcs) = (ev(g.x.offset)?, ev(g.x.rs)?, ev(g.x.cs)?);
                    let (wo, wrs, wcs, ws) = (ev(g.w.offset)?, ev(g.w.rs)?, ev(g.w.cs)?, ev(g.expert_stride)?);
                    let (oo, ors, ocs) = (ev(g.out.offset)?, ev(g.out.rs)?, ev(g.out.cs)?);
                    // rows past every group (a routed exchange's padding) belong to none: zeros
                    let size = g.out.dtype.size_bytes();
                    for r in total.max(0)..m {
                        for c in 0..n {
                            // SAFETY: the output view lies in its buffer; all-zero bytes are 0 in every float dtype
                            unsafe {
                                std::ptr::write_bytes(at(g.out.arg, g.out.dtype, oo + r * ors + c * ocs), 0, size)
                            };
                        }
                    }
                    let mut start = 0i64;
                    for (e, &c) in counts.iter().enumerate() {
                        let rows = c.min(m - start);
                        if rows <= 0 {
                            continue;
                        }
                        let w_off = wo + e as i64 * ws;
                        let w_op = self.packed_b(
                            (k.id, s, e),
                            PackedView {
                                buffer: slot_buffer(g.w.arg),
                                offset: w_off,
                                rs: wrs,
                                cs: wcs,
                                k: kk as usize,
                                n: n as usize,
                            },
                            &gemm::Mat {
                                ptr: at(g.w.arg, g.w.dtype, w_off),
                                dtype: g.w.dtype,
                                rs: wrs as isize,
                                cs: wcs as isize,
                            },
                        )?;
                        // SAFETY: as for GEMM steps
                        unsafe {
                            gemm::gemm(
                                &self.pool,
                                kern,
                                rows as usize,
                                n as usize,
                                kk as usize,
                                gemm::Mat {
                                    ptr: at(g.x.arg, g.x.dtype, xo + start * xrs),
                                    dtype: g.x.dtype,
                                    rs: xrs as isize,
                                    cs: xcs as isize,
                                },
                                w_op,
                                at(g.out.arg, g.out.dtype, oo + start * ors),
                                g.out.dtype,
                                ors as isize,
                                ocs as isize,
                            );
                        }
                        start += rows;
                    }
                }
            }
            if let Some(t) = t_step {
                step_times.push(t.elapsed().as_secs_f64());
            }
        }
        if profiling {
            if let Ok(mut steps) = self.step_profile.lock() {
                if steps.len() <= k.id {
                    steps.resize(k.id + 1, Vec::new());
                }
                let acc = &mut steps[k.id];
                acc.resize(step_times.len(), 0.0);
                acc.iter_mut().zip(&step_times).for_each(|(a, t)| *a += t);
            }
        }
        Ok(())
    }

    /// Runs a phase over `0..grid`; returns a failed check `(check + 1, value)`.
    fn run_phase(
        &self,
        f: fulgur_codegen::llvm::PhaseFn,
        slots: &[*mut u8],
        params: &[i64],
        grid: i64,
        cost: i64,
    ) -> Option<(i64, i64)> {
        if grid <= 0 {
            return None;
        }
        let threads = self.pool.current_num_threads() as i64;
        let work = grid.saturating_mul(cost);
        if threads <= 1 || grid == 1 || work < 1 << 15 {
            let mut err = [0i64; 2];
            // SAFETY: the slots and parameters are the ones the code was generated for
            unsafe { f(slots.as_ptr(), params.as_ptr(), 0, grid, err.as_mut_ptr()) };
            return (err[0] != 0).then_some((err[0], err[1]));
        }
        let chunks = grid.min(threads * 4);
        let sp = SendPtr(slots.as_ptr() as *mut u8);
        let pp = SendPtr(params.as_ptr() as *mut u8);
        let failed = std::sync::Mutex::new(None);
        self.pool.install(|| {
            (0..chunks).into_par_iter().for_each(|c| {
                let lo = grid * c / chunks;
                let hi = grid * (c + 1) / chunks;
                let mut err = [0i64; 2];
                let (sp, pp) = (&sp, &pp);
                // SAFETY: disjoint item ranges of independent items
                unsafe { f(sp.0 as *const *mut u8, pp.0 as *const i64, lo, hi, err.as_mut_ptr()) };
                if err[0] != 0 {
                    if let Ok(mut g) = failed.lock() {
                        g.get_or_insert((err[0], err[1]));
                    }
                }
            })
        });
        failed.into_inner().ok().flatten()
    }
}

impl crate::Executable for CpuProgram {
    fn name(&self) -> &str {
        "cpu"
    }
    fn input_names(&self) -> Vec<String> {
        self.program.inputs.iter().map(|io| io.name.clone()).collect()
    }
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        CpuProgram::run(self, inputs)
    }
    fn run_carried(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        carried: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        CpuProgram::run_carried(self, inputs, carried)
    }
    fn run_keeping(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        keep: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        Some(self.run_holding(inputs, &HashMap::new(), keep))
    }
    fn last_outputs(&mut self, names: &[String]) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        self.binding.as_ref()?;
        let skip: Vec<String> = self
            .program
            .outputs
            .iter()
            .filter(|o| !names.contains(&o.name))
            .map(|o| o.name.clone())
            .collect();
        Some(self.outputs_except(&skip))
    }
}

/// The prepared buffers that step kernels read only as the `B` operand of GEMM steps that the runtime packs, or
/// not at all (intermediates of the prepare program), and that no output views: once the prepare program has
/// run and the operands are packed, they can be freed.
fn pack_only_buffers(program: &KernelProgram, kernels: &[LoopKernel]) -> Vec<bool> {
    let mut ok: Vec<bool> = program.buffers.iter().map(|b| b.kind == BufferKind::Prepared).collect();
    for io in &program.outputs {
        ok[io.tensor.buffer] = false;
    }
    for k in &program.step {
        let lk = &kernels[k.code];
        for (s, slot) in lk.slots.iter().enumerate() {
            let Slot::Input(i) = *slot else { continue };
            let b = k.inputs[i].buffer;
            if !ok[b] {
                continue;
            }
            let s = s as u32;
            let mut only_b = !lk.pool.loads_slot(s);
            for st in &lk.steps {
                match st {
                    Step::Gemm(g) => {
                        if g.a.arg == s || g.c.arg == s || (g.b.arg == s && !b_shared_by_batch(lk, g)) {
                            only_b = false;
                        }
                    }
                    Step::GroupedGemm(g) => {
                        if g.x.arg == s || g.out.arg == s || g.counts_arg == s || (g.depth && g.w.arg == s) {
                            only_b = false;
                        }
                    }
                    Step::Phase(_) => {}
                    Step::Collective(_) => only_b = false,
                }
            }
            // the slot must actually be a packed operand somewhere
            let as_b = lk.steps.iter().any(|st| match st {
                Step::Gemm(g) => g.b.arg == s,
                Step::GroupedGemm(g) => g.w.arg == s,
                Step::Phase(_) | Step::Collective(_) => false,
            });
            if !(only_b && as_b) {
                ok[b] = false;
            }
        }
    }
    ok
}

/// Whether every batch element of a GEMM step reads the same `B` (no batch axes, or a `B` stride of zero
/// along each): such a `B` is packed once for all of them (a decode step's `[B, 1, C] · W`).
fn b_shared_by_batch(lk: &LoopKernel, g: &fulgur_codegen::loops::GemmStep) -> bool {
    g.batch
        .iter()
        .all(|b| matches!(lk.pool.get(b[2]), fulgur_codegen::loops::Expr::I(0)))
}

//! The CUDA backend: a kernel program compiled by NVRTC and run on one GPU through the driver API and cuBLAS.
//!
//! `libcuda`, `libnvrtc` and `libcublas` are opened at run time (cudarc's dynamic loading): the backend builds
//! on machines without CUDA, and [`device_info`] says why it cannot run where it cannot.
//!
//! A [`CudaProgram`] holds:
//! - the compiled code: per kernel code, the CUDA C++ of [`fulgur_codegen::cuda`] compiled for the device's
//!   architecture (through the on-disk NVRTC cache) and loaded as a module;
//! - the weights, uploaded once in their dtype and kept resident (shared by `Arc` with another program of the
//!   same model: prefill and decode);
//! - the persistent buffers (inputs, constants, prepared values) and one device arena for the transient
//!   buffers, packed by the buffer plan at the bound symbols; the kernels' scratch; the spill area of their
//!   large thread-local arrays; one error record per kernel.
//!
//! A step runs the kernels in order on one stream (the schedule's order is always correct; the communication
//! stream matters only once collectives exist). Phases and templates launch generated functions; GEMM steps
//! call cuBLAS (`cublasGemmStridedBatchedEx`, f32 or bf16 operands, f32 accumulation, TF32 off); grouped GEMMs
//! read their group sizes back to the host and call one GEMM per group (through cuBLASLt, `lt`). Every launch
//! is checked: a launch error names the kernel and its IR node, and after the step the error records name the
//! kernel whose check failed (an index out of range) with the value.

use crate::host::{check_views, decode_view, encode_into, grown};
use crate::RuntimeError;
use cudarc::cublas::result as blas;
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::result as drv;
use cudarc::driver::sys;
use fulgur_codegen::cuda::{emit_program, CudaKernel, Launch, BLOCK};
use fulgur_codegen::kernels::{build_program_for, Target};
use fulgur_codegen::loops::{LoopKernel, Operand, Slot, Step};
use fulgur_codegen::program::{op_summary, BufferKind, Kernel, KernelProgram, Layout, TensorRef};
use fulgur_ir::{DType, Dim, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

mod lt;

fn other(m: impl Into<String>) -> RuntimeError {
    RuntimeError::Other(m.into())
}

fn fmt_bytes(b: u64) -> String {
    fulgur_ir::interp::fmt_bytes(b)
}

/// Spilled thread-local arrays of one launch take at most this many bytes (the launch uses fewer threads).
const SPILL_BUDGET: u64 = 256 << 20;

/// What the device is.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    /// Compute capability.
    pub major: i32,
    pub minor: i32,
    pub multiprocessors: i32,
    pub total_memory: u64,
}

impl DeviceInfo {
    /// The NVRTC architecture of the device (`sm_90` on Hopper).
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }
}

/// Device 0, or why CUDA cannot run here (no driver library, no device).
pub fn device_info() -> Result<DeviceInfo, String> {
    // SAFETY: only tries to open the library
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda cannot be opened)".into());
    }
    drv::init().map_err(|e| format!("the CUDA driver does not start: {e}"))?;
    let n = drv::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
    if n < 1 {
        return Err("the CUDA driver sees no device".into());
    }
    let dev = drv::device::get(0).map_err(|e| format!("CUDA device 0: {e}"))?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(|e| format!("CUDA device 0: {e}"));
    Ok(DeviceInfo {
        name: drv::device::get_name(dev).map_err(|e| format!("CUDA device 0: {e}"))?,
        major: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        minor: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        multiprocessors: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        total_memory: unsafe { drv::device::total_mem(dev) }.map_err(|e| format!("CUDA device 0: {e}"))? as u64,
    })
}

/// Device memory, freed on drop.
pub struct DevBuf {
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl DevBuf {
    /// `len` zeroed bytes of device memory; an error naming `what` when the device cannot give them.
    fn zeroed(len: usize, what: &str) -> Result<DevBuf, RuntimeError> {
        if len == 0 {
            return Ok(DevBuf { ptr: 0, len: 0 });
        }
        // SAFETY: a plain allocation, freed in Drop
        let ptr = unsafe { drv::malloc_sync(len) }.map_err(|e| {
            let free = drv::mem_get_info()
                .map(|(f, _)| fmt_bytes(f as u64))
                .unwrap_or_else(|_| "?".into());
            other(format!(
                "{what}: cannot allocate {} on the GPU ({e}; {free} free)",
                fmt_bytes(len as u64)
            ))
        })?;
        let buf = DevBuf { ptr, len };
        // SAFETY: `ptr` holds `len` bytes
        unsafe { drv::memset_d8_sync(ptr, 0, len) }.map_err(|e| other(format!("{what}: memset failed: {e}")))?;
        Ok(buf)
    }

    fn upload(bytes: &[u8], what: &str) -> Result<DevBuf, RuntimeError> {
        let b = DevBuf::zeroed(bytes.len(), what)?;
        if !bytes.is_empty() {
            // SAFETY: `b` holds `bytes.len()` bytes
            unsafe { drv::memcpy_htod_sync(b.ptr, bytes) }.map_err(|e| other(format!("{what}: upload failed: {e}")))?;
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_sync, freed once
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// Options of the CUDA backend.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// The NVRTC architecture (`None`: the device's, e.g. `sm_90`).
    pub arch: Option<String>,
    /// The NVRTC cache directory (`None`: [`fulgur_codegen::nvrtc::cache_dir`]).
    pub cache: Option<PathBuf>,
    /// After every step kernel, check its float outputs for NaN and infinity and stop at the first kernel
    /// that produced one.
    pub check_finite: bool,
    /// Capture each step into a CUDA graph and launch that (updating the one instantiated before when only
    /// the kernels' arguments changed): one launch per step instead of one per kernel. Grouped GEMMs then
    /// read their group sizes on the device.
    pub graphs: bool,
}

struct Binding {
    env: HashMap<String, i64>,
    layout: Layout,
    /// Per code: its parameters at the bound symbols.
    params: Vec<Vec<i64>>,
    /// Per code: the byte offset of each scratch buffer in the scratch area.
    scratch: Vec<Vec<usize>>,
    scratch_bytes: usize,
    spill_bytes: usize,
}

/// A kernel program compiled for the GPU, with its weights resident.
pub struct CudaProgram {
    pub program: KernelProgram,
    pub kernels: Vec<LoopKernel>,
    pub cuda: Vec<CudaKernel>,
    pub device: DeviceInfo,
    options: CudaOptions,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    blas: blas_sys::cublasHandle_t,
    modules: Vec<sys::CUmodule>,
    /// Per code, per launch: the function (None for library launches).
    functions: Vec<Vec<Option<sys::CUfunction>>>,
    weights: Vec<Option<Arc<DevBuf>>>,
    persistent: Vec<Option<DevBuf>>,
    arena: DevBuf,
    scratch: DevBuf,
    spill: DevBuf,
    /// Two i64 per kernel (prepare kernels first): the failed check and its value.
    errors: DevBuf,
    binding: Option<Binding>,
    prepare_symbols: BTreeSet<String>,
    prepared_at: Option<BTreeMap<String, i64>>,
    prepare_runs: usize,
    pool: rayon::ThreadPool,
    /// Seconds spent emitting and compiling (NVRTC, or its cache) and loading the modules.
    pub compile_seconds: f64,
    /// How many codes came from the NVRTC cache.
    pub cached_codes: usize,
    /// Device time of the last step's kernels, by CUDA events (ms).
    pub last_step_ms: f64,
    /// When set, every step kernel is timed by CUDA events into it.
    pub profile: Option<CudaProfile>,
    /// Events: the start of the step, then one after each step kernel.
    events: Vec<sys::CUevent>,
    /// The instantiated graph of the last captured step.
    graph_exec: Option<sys::CUgraphExec>,
    /// Whether launches are being captured (no host synchronisation then).
    capturing: bool,
    /// The transport of a rank's program: runs its collectives (`on_rank`) on the host between launches.
    transport: Option<std::sync::Arc<dyn fulgur_ir::Transport + Send + Sync>>,
    /// How many collectives ran on the device (an NCCL transport's, on its own stream: [`DeviceCollectives`]),
    /// and how many through the host ([`CudaProgram::collectives_run`]).
    collectives_run: std::cell::Cell<(usize, usize)>,
    /// Collectives still running on the transport's stream: the byte ranges they read and write, and the event
    /// after them; a kernel touching a range waits for its event first, every other kernel runs alongside.
    pending: std::cell::RefCell<Vec<Pending>>,
    /// How many kernels were launched while a collective was still running (and did not wait for it).
    overlapped: std::cell::Cell<usize>,
    /// How many steps ran as a graph, and how many of those updated the instantiated graph in place.
    pub graph_launches: usize,
    pub graph_updates: usize,
    /// How many calls kept their carried inputs on the device ([`CudaProgram::run_carried`]).
    pub carried_runs: usize,
    /// Carried outputs held between calls: the buffer and the bytes it holds.
    carry: HashMap<String, (DevBuf, usize)>,
    /// The inputs of the call being bound that come from `carry`.
    carrying: Vec<String>,
    /// The group sizes of grouped GEMMs read back in this call, by their view of a transient buffer (written
    /// once per call): the later GEMMs over the same groups (the layer's second expert GEMM, the backward's)
    /// reuse them instead of synchronising with the stream again.
    group_sizes: std::cell::RefCell<HashMap<TensorRef, Vec<i64>>>,
    /// Side streams the experts of a grouped GEMM run on side by side (made at the first grouped GEMM).
    lanes: std::cell::RefCell<Option<Lanes>>,
    /// This call's waits on the stream between kernels (group sizes read back): how many, and seconds.
    host_waits: std::cell::Cell<(usize, f64)>,
    /// The experts' products through cuBLASLt, their algorithms chosen once per bucket of sizes (made at the
    /// first grouped GEMM, unless `FULGUR_EXPERT_GEMM=cublas`).
    lt: std::cell::RefCell<Option<lt::ExpertLt>>,
    /// This call's experts' products: how many, and the host's seconds enqueueing them.
    expert_enqueue: std::cell::Cell<(usize, f64)>,
    /// cuBLASLt's heuristic queries made before this call.
    queries_before: usize,
    /// The last step's host phases (ms): binding and uploading, enqueueing, finishing, reading outputs.
    phases: [f64; 4],
    _workspace: DevBuf,
}

/// A collective running on a transport's stream: the byte ranges it reads and writes, and the event after it.
type Pending = (Vec<(u64, u64)>, sys::CUevent);

/// A collective's operand on the device: a contiguous buffer of `shape` elements of `dtype` at `ptr`.
#[derive(Clone, Debug)]
pub struct DeviceOperand {
    pub ptr: u64,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// Collectives a transport runs on device memory (NCCL), on a stream of its own ordered with the program's
/// stream by events: the program enqueues the collective after its kernels and goes on enqueueing, without
/// synchronising the host.
pub trait DeviceCollectives: Send + Sync {
    /// Whether `op` (a collective with its `mesh`) runs on the device for operands of these dtypes and per-rank
    /// shapes; otherwise the program stages it through the host transport.
    fn on_device(&self, op: &fulgur_ir::Op, ins: &[(DType, Vec<usize>)]) -> bool;
    /// Rank `rank`'s part of `op`: reads `ins`, writes `outs`, after the work enqueued on `stream` so far.
    /// Returns an event recorded after it on the transport's stream: the caller makes `stream` wait for it
    /// before work that touches the operands (and destroys it), so that independent kernels overlap it.
    ///
    /// # Safety
    /// The operands are live device allocations of the program's context, of the sizes given.
    unsafe fn run(
        &self,
        op: &fulgur_ir::Op,
        rank: usize,
        ins: &[DeviceOperand],
        outs: &[DeviceOperand],
        stream: sys::CUstream,
    ) -> Result<sys::CUevent, String>;
}

/// What of `t` runs collectives on the device: an NCCL transport, unless `FULGUR_NCCL_HOST=1` stages every
/// collective through the host (for comparison).
fn device_collectives(t: &(dyn fulgur_ir::Transport + Send + Sync)) -> Option<&dyn DeviceCollectives> {
    if std::env::var("FULGUR_NCCL_HOST").is_ok_and(|v| v == "1") {
        return None;
    }
    let n = t.as_any()?.downcast_ref::<crate::nccl::NcclTransport>()?;
    Some(n)
}

/// The elements a view of `shape`, `strides` and `offset` spans: the lowest and highest it addresses.
fn element_span(shape: &[usize], strides: &[i64], offset: i64) -> (i64, i64) {
    let (mut lo, mut hi) = (offset, offset);
    for (&d, &s) in shape.iter().zip(strides) {
        if d > 0 {
            let span = (d as i64 - 1) * s;
            if span < 0 {
                lo += span;
            } else {
                hi += span;
            }
        }
    }
    (lo, hi)
}

/// Device time per step kernel, summed over the runs since it was set.
#[derive(Clone, Debug, Default)]
pub struct CudaProfile {
    /// Milliseconds per step kernel (by kernel id).
    pub kernel_ms: Vec<f64>,
    pub runs: usize,
}

impl CudaProgram {
    /// Emits CUDA C++ for every kernel code, compiles it for the device (through the cache) and loads it.
    pub fn new(program: KernelProgram, options: CudaOptions) -> Result<CudaProgram, RuntimeError> {
        let t = Instant::now();
        let device = device_info().map_err(other)?;
        let arch = options.arch.clone().unwrap_or_else(|| device.arch());
        let mut kernels = build_program_for(&program, Target::Cuda).map_err(|e| other(e.to_string()))?;
        let cuda = emit_program(&program, &mut kernels).map_err(|e| other(e.to_string()))?;
        // SAFETY: device 0 exists (device_info); its primary context is retained for the program's life
        let ctx = unsafe {
            let dev = drv::device::get(0).map_err(|e| other(format!("CUDA device 0: {e}")))?;
            let ctx = drv::primary_ctx::retain(dev).map_err(|e| other(format!("CUDA context: {e}")))?;
            drv::ctx::set_current(ctx).map_err(|e| other(format!("CUDA context: {e}")))?;
            ctx
        };
        // a blocking stream: the synchronous uploads and memsets (on the legacy stream) are ordered with its
        // kernels both ways, so a kernel never reads an input whose copy has not landed, nor a buffer whose
        // zeroing is still to come
        let stream =
            drv::stream::create(drv::stream::StreamKind::Default).map_err(|e| other(format!("CUDA stream: {e}")))?;
        let blas = blas::create_handle().map_err(|e| other(format!("cuBLAS: {e:?}")))?;
        // cuBLAS's workspace is ours, so that no allocation happens while a graph is captured; the buffer
        // outlives the handle (both dropped with the program, the handle first)
        let workspace = DevBuf::zeroed(32 << 20, "the cuBLAS workspace")?;
        configure_blas(blas, stream, &workspace).map_err(other)?;
        let cache = options.cache.clone().or_else(fulgur_codegen::nvrtc::cache_dir);
        let mut modules = Vec::with_capacity(cuda.len());
        let mut functions = Vec::with_capacity(cuda.len());
        // NVRTC compiles the codes in parallel (each its own program); the modules load in order after
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(cuda.len().max(1));
        let compiled: Vec<Result<fulgur_codegen::nvrtc::Compiled, String>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (cuda, arch, cache) = (&cuda, &arch, &cache);
                    sc.spawn(move || {
                        (t..cuda.len())
                            .step_by(threads)
                            .map(|i| {
                                let ck = &cuda[i];
                                (
                                    i,
                                    fulgur_codegen::nvrtc::compile(&ck.file, &ck.source, arch, cache.as_deref())
                                        .map_err(|e| e.to_string()),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut all: Vec<(usize, Result<_, String>)> = handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .unwrap_or_else(|_| vec![(usize::MAX, Err("an NVRTC thread panicked".into()))])
                })
                .collect();
            all.sort_by_key(|x| x.0);
            all.into_iter().map(|x| x.1).collect()
        });
        if compiled.len() != cuda.len() {
            return Err(other("an NVRTC compile thread failed"));
        }
        let mut cached_codes = 0;
        for (ck, c) in cuda.iter().zip(compiled) {
            let c = c.map_err(other)?;
            cached_codes += usize::from(c.cached);
            // SAFETY: a cubin NVRTC produced for this device's architecture
            let module = unsafe { drv::module::load_data(c.cubin.as_ptr() as *const c_void) }
                .map_err(|e| other(format!("loading {} ({}): {e}", ck.file, kernels[ck.code].name)))?;
            let mut fs = Vec::new();
            for l in &ck.launches {
                fs.push(match l {
                    Launch::Phase { function, .. } | Launch::Template { function, .. } => {
                        let name = CString::new(function.as_str()).map_err(|_| other("a function name with NUL"))?;
                        // SAFETY: the module is loaded
                        let f = unsafe { drv::module::get_function(module, name) }
                            .map_err(|e| other(format!("{}: function {function}: {e}", ck.file)))?;
                        if let Launch::Template { smem, .. } = l {
                            // past 48 KiB a block's dynamic shared memory must be asked for
                            if *smem > 48 << 10 {
                                // SAFETY: the function exists; the size is the template's own
                                unsafe {
                                    drv::function::set_function_attribute(
                                        f,
                                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                        *smem as i32,
                                    )
                                }
                                .map_err(|e| {
                                    other(format!(
                                        "{}: {function} needs {smem} bytes of shared memory per block: {e}",
                                        ck.file
                                    ))
                                })?;
                            }
                        }
                        Some(f)
                    }
                    Launch::Library { .. } => None,
                });
            }
            for (_, f, _) in &ck.device_grouped {
                let name = CString::new(f.as_str()).map_err(|_| other("a function name with NUL"))?;
                // SAFETY: the module is loaded
                fs.push(Some(
                    unsafe { drv::module::get_function(module, name) }
                        .map_err(|e| other(format!("{}: function {f}: {e}", ck.file)))?,
                ));
            }
            modules.push(module);
            functions.push(fs);
        }
        let n = program.buffers.len();
        let prepare_symbols = crate::host::prepare_symbols(&program);
        let errors = DevBuf::zeroed(
            16 * (program.prepare.len() + program.step.len()).max(1),
            "error records",
        )?;
        let pool = rayon::ThreadPoolBuilder::new()
            .build()
            .map_err(|e| other(format!("cannot start host threads: {e}")))?;
        Ok(CudaProgram {
            program,
            kernels,
            cuda,
            device,
            options,
            ctx,
            stream,
            blas,
            modules,
            functions,
            weights: (0..n).map(|_| None).collect(),
            persistent: (0..n).map(|_| None).collect(),
            arena: DevBuf::zeroed(0, "arena")?,
            scratch: DevBuf::zeroed(0, "scratch")?,
            spill: DevBuf::zeroed(0, "spill")?,
            errors,
            binding: None,
            prepare_symbols,
            prepared_at: None,
            prepare_runs: 0,
            pool,
            compile_seconds: t.elapsed().as_secs_f64(),
            cached_codes,
            last_step_ms: 0.0,
            profile: None,
            events: Vec::new(),
            graph_exec: None,
            capturing: false,
            transport: None,
            collectives_run: std::cell::Cell::new((0, 0)),
            pending: std::cell::RefCell::new(Vec::new()),
            overlapped: std::cell::Cell::new(0),
            graph_launches: 0,
            graph_updates: 0,
            carried_runs: 0,
            carry: HashMap::new(),
            carrying: Vec::new(),
            group_sizes: Default::default(),
            host_waits: Default::default(),
            lt: Default::default(),
            expert_enqueue: Default::default(),
            queries_before: 0,
            lanes: Default::default(),
            phases: [0.0; 4],
            _workspace: workspace,
        })
    }

    fn current(&self) -> Result<(), RuntimeError> {
        // SAFETY: the context is retained for the program's life
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(|e| other(format!("CUDA context: {e}")))
    }

    /// Uploads one weight (converted to the parameter's dtype); its shape must be the parameter's.
    pub fn set_weight(&mut self, name: &str, t: &Tensor) -> Result<(), RuntimeError> {
        self.current()?;
        let io = crate::host::weight_param(&self.program, name, t)?.clone();
        let mut bytes = vec![0u8; t.numel() * io.ty.dtype.size_bytes()];
        encode_into(t, io.ty.dtype, &mut bytes);
        self.weights[io.tensor.buffer] = Some(Arc::new(DevBuf::upload(&bytes, &format!("weight `{name}`"))?));
        self.prepared_at = None;
        Ok(())
    }

    /// Checks that the weights fit the device before any is uploaded: their bytes against the free memory.
    pub fn check_weights_fit(&self) -> Result<(), RuntimeError> {
        self.current()?;
        let need: u64 = self
            .program
            .params
            .iter()
            .filter(|p| self.weights[p.tensor.buffer].is_none())
            .filter_map(|p| {
                p.ty.shape
                    .as_consts()
                    .map(|s| s.iter().product::<usize>() * p.ty.dtype.size_bytes())
            })
            .map(|b| b as u64)
            .sum();
        let (free, _) = drv::mem_get_info().map_err(|e| other(format!("cuMemGetInfo: {e}")))?;
        if need > free as u64 {
            return Err(other(format!(
                "the weights need {} on the GPU but {} has {} free",
                fmt_bytes(need),
                self.device.name,
                fmt_bytes(free as u64)
            )));
        }
        Ok(())
    }

    /// Uses the weights `from` holds for every parameter of the same name and type (the same device memory);
    /// returns how many were shared.
    pub fn share_weights(&mut self, from: &CudaProgram) -> usize {
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

    /// Loads every weight from `fetch(name, type)`, one at a time, after checking that they fit.
    pub fn load_weights_from<E: std::fmt::Display>(
        &mut self,
        mut fetch: impl FnMut(&str, &fulgur_ir::TensorType) -> Result<Tensor, E>,
    ) -> Result<(), RuntimeError> {
        self.check_weights_fit()?;
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

    /// Loads every weight from `weights` (by name); all must be present.
    pub fn load_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        self.load_weights_from(|name, _| {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| format!("weight `{name}` is missing"))
        })
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

    /// How many times the prepare program ran.
    pub fn prepare_runs(&self) -> usize {
        self.prepare_runs
    }

    /// The symbols the program is bound to (after a call).
    pub fn bound_env(&self) -> Option<&HashMap<String, i64>> {
        self.binding.as_ref().map(|b| &b.env)
    }

    /// Memory of the current binding: (planned peak with scratch and spill, bytes allocated).
    pub fn memory(&self) -> Option<(u64, u64)> {
        let b = self.binding.as_ref()?;
        let planned = b.layout.planned_peak() + b.scratch_bytes as u64 + b.spill_bytes as u64;
        let held: usize = self.persistent.iter().flatten().map(|x| x.len()).sum::<usize>()
            + self.weights.iter().flatten().map(|x| x.len()).sum::<usize>()
            + self.arena.len()
            + self.scratch.len()
            + self.spill.len();
        Some((planned, held as u64))
    }

    /// The device's memory in use now, as the driver counts it (`cuMemGetInfo`: total − free): this program's
    /// buffers, cuBLAS's workspace, the loaded modules and the CUDA context, and whatever else this process or
    /// another holds on the device.
    pub fn device_used(&self) -> Result<u64, RuntimeError> {
        self.current()?;
        let (free, total) = drv::mem_get_info().map_err(|e| other(format!("cuMemGetInfo: {e}")))?;
        Ok(total.saturating_sub(free) as u64)
    }

    fn bind_inputs(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, i64>, RuntimeError> {
        crate::host::bind_inputs(&self.program, inputs)
    }

    /// The threads and blocks a phase of `grid` items with `spill` spilled bytes per thread launches.
    fn phase_shape(&self, grid: i64, spill: usize) -> (u32, i64) {
        let mut blocks = (grid.max(0) as u64).div_ceil(BLOCK as u64);
        blocks = blocks.min(self.device.multiprocessors.max(1) as u64 * 16).max(1);
        if spill > 0 {
            let max_threads = (SPILL_BUDGET / spill as u64).max(BLOCK as u64);
            blocks = blocks.min((max_threads / BLOCK as u64).max(1));
        }
        (blocks as u32, blocks as i64 * BLOCK as i64)
    }

    /// Plans the memory of a binding (and allocates it), unless already bound to `env`; refuses, before any
    /// allocation, a binding whose planned peak exceeds the free device memory.
    fn bind(&mut self, env: HashMap<String, i64>) -> Result<(), RuntimeError> {
        if self.binding.as_ref().map(|b| &b.env) == Some(&env) {
            return Ok(());
        }
        let layout = self.program.layout(&env).map_err(|e| other(e.to_string()))?;
        check_views(&self.program, &layout, &env)?;
        let (params, scratch, scratch_bytes) = crate::host::kernel_params(&self.kernels, &env, 256)?;
        let mut spill_bytes = 0usize;
        for ((lk, ck), ps) in self.kernels.iter().zip(&self.cuda).zip(&params) {
            for l in &ck.launches {
                if let Launch::Phase { grid, spill, .. } = l {
                    if *spill > 0 {
                        let g = lk.pool.eval(*grid, ps).unwrap_or(0);
                        let (_, threads) = self.phase_shape(g, *spill);
                        spill_bytes = spill_bytes.max(threads as usize * spill);
                    }
                }
            }
        }
        // what this binding allocates beyond what is held: checked against the free memory first
        let mut need = 0u64;
        need += (layout.arena_bytes as usize).saturating_sub(self.arena.len()) as u64;
        need += scratch_bytes.saturating_sub(self.scratch.len()) as u64;
        need += spill_bytes.saturating_sub(self.spill.len()) as u64;
        for b in &self.program.buffers {
            if b.kind != BufferKind::Transient && b.kind != BufferKind::Weight {
                let have = self.persistent[b.id].as_ref().map_or(0, |x| x.len());
                need += (layout.sizes[b.id] as usize).saturating_sub(have) as u64;
            }
        }
        self.current()?;
        let (free, _) = drv::mem_get_info().map_err(|e| other(format!("cuMemGetInfo: {e}")))?;
        if need > free as u64 {
            let mut syms: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            syms.sort();
            return Err(other(format!(
                "at {} the program needs {} more on the GPU (planned peak {}: persistent {}, arena {}; scratch {}, \
                 spill {}) but {} has {} free",
                syms.join(", "),
                fmt_bytes(need),
                fmt_bytes(layout.planned_peak() + scratch_bytes as u64 + spill_bytes as u64),
                fmt_bytes(layout.persistent_bytes),
                fmt_bytes(layout.arena_bytes),
                fmt_bytes(scratch_bytes as u64),
                fmt_bytes(spill_bytes as u64),
                self.device.name,
                fmt_bytes(free as u64)
            )));
        }
        // memory that must grow grows by half again (the old buffer freed first), so that a decode step's
        // growing cache length reallocates rarely
        if self.arena.len() < layout.arena_bytes as usize {
            let have = self.arena.len();
            self.arena = DevBuf::zeroed(0, "arena")?;
            self.arena = DevBuf::zeroed(grown(layout.arena_bytes as usize, have), "the arena")?;
        }
        if self.scratch.len() < scratch_bytes {
            let have = self.scratch.len();
            self.scratch = DevBuf::zeroed(0, "kernel scratch")?;
            self.scratch = DevBuf::zeroed(grown(scratch_bytes, have), "kernel scratch")?;
        }
        if self.spill.len() < spill_bytes {
            self.spill = DevBuf::zeroed(0, "spill area")?;
            self.spill = DevBuf::zeroed(spill_bytes, "spill area")?;
        }
        for b in &self.program.buffers {
            if b.kind == BufferKind::Transient || b.kind == BufferKind::Weight {
                continue;
            }
            let size = layout.sizes[b.id] as usize;
            let have = self.persistent[b.id].as_ref().map(|x| x.len());
            let ok = match have {
                Some(len) if b.kind == BufferKind::Input => len >= size,
                Some(len) => len == size,
                None => false,
            };
            if !ok {
                self.persistent[b.id] = None;
                let alloc = if b.kind == BufferKind::Input {
                    grown(size, have.unwrap_or(0))
                } else {
                    size
                };
                self.persistent[b.id] = Some(DevBuf::zeroed(alloc, &format!("buffer b{}", b.id))?);
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
            spill_bytes,
        });
        Ok(())
    }

    /// The device address of buffer `b`.
    fn buffer_ptr(&self, b: usize) -> Result<sys::CUdeviceptr, RuntimeError> {
        let binding = self.binding.as_ref().ok_or_else(|| other("no binding"))?;
        match binding.layout.offsets[b] {
            Some(off) => Ok(self.arena.ptr + off),
            None if self.program.buffers[b].kind == BufferKind::Weight => self.weights[b]
                .as_ref()
                .map(|x| x.ptr)
                .ok_or_else(|| other(format!("buffer b{b} has no memory (a weight not loaded?)"))),
            None => self.persistent[b]
                .as_ref()
                .map(|x| x.ptr)
                .ok_or_else(|| other(format!("buffer b{b} has no memory"))),
        }
    }

    fn fill_constants(&mut self) -> Result<(), RuntimeError> {
        for b in &self.program.buffers {
            if let Some(t) = crate::host::constant_tensor(b) {
                let buf = self.persistent[b.id]
                    .as_ref()
                    .ok_or_else(|| other(format!("constant b{} has no memory", b.id)))?;
                let mut bytes = vec![0u8; t.numel() * b.dtype.size_bytes()];
                encode_into(&t, b.dtype, &mut bytes);
                if bytes.len() > buf.len {
                    return Err(other(format!("constant b{} does not fit its buffer", b.id)));
                }
                // SAFETY: the buffer holds the bytes (checked)
                unsafe { drv::memcpy_htod_sync(buf.ptr, &bytes) }
                    .map_err(|e| other(format!("constant b{}: upload failed: {e}", b.id)))?;
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
        self.prepared_at = None;
        let missing = self.missing_weights();
        if !missing.is_empty() {
            return Err(crate::host::missing_weights_error(&missing));
        }
        self.fill_constants()?;
        let kernels = std::mem::take(&mut self.program.prepare);
        let r = kernels
            .iter()
            .enumerate()
            .try_for_each(|(i, k)| self.launch_kernel(k, false, i));
        self.program.prepare = kernels;
        r?;
        self.finish(false)?;
        self.prepare_runs += 1;
        self.prepared_at = env;
        Ok(())
    }

    /// Waits for the stream and reports the first failed check of the kernels just run.
    fn finish(&mut self, step: bool) -> Result<(), RuntimeError> {
        self.await_pending(None)?;
        // SAFETY: the stream is live
        unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| {
            other(format!(
                "a kernel of the {} failed on the GPU: {e} (set FULGUR_CUDA_SYNC=1 to find which)",
                if step { "step" } else { "prepare program" }
            ))
        })?;
        let n = self.program.prepare.len() + self.program.step.len();
        let mut rec = vec![0i64; 2 * n.max(1)];
        // SAFETY: the error area holds 2 i64 per kernel
        unsafe { drv::memcpy_dtoh_sync(&mut rec, self.errors.ptr) }
            .map_err(|e| other(format!("reading errors: {e}")))?;
        for i in 0..n {
            if rec[2 * i] != 0 {
                let (k, what) = if i < self.program.prepare.len() {
                    (&self.program.prepare[i], "prepare kernel")
                } else {
                    (&self.program.step[i - self.program.prepare.len()], "kernel")
                };
                let lk = &self.kernels[k.code];
                let check = lk
                    .checks
                    .get(rec[2 * i] as usize - 1)
                    .cloned()
                    .unwrap_or_else(|| "a check failed".into());
                let m = format!("{what} k{} ({}): {check}: got {}", k.id, k.name, rec[2 * i + 1]);
                // clear the records for the next call
                // SAFETY: the error area is `errors.len` bytes
                let _ = unsafe { drv::memset_d8_sync(self.errors.ptr, 0, self.errors.len) };
                return Err(other(m));
            }
        }
        Ok(())
    }

    /// Launches kernel `k` (the `index`-th of its program; prepare kernels first) on the stream.
    /// Makes the stream wait for the running collectives whose byte ranges kernel `k`'s views touch (all of
    /// them with `all`), releasing their events.
    fn await_pending(&self, k: Option<&Kernel>) -> Result<(), RuntimeError> {
        if self.pending.borrow().is_empty() {
            return Ok(());
        }
        let spans: Option<Vec<(u64, u64)>> = match k {
            None => None,
            Some(k) => Some(
                k.inputs
                    .iter()
                    .chain(&k.outputs)
                    .map(|t| self.view_span(t))
                    .collect::<Result<_, _>>()?,
            ),
        };
        let mut pending = self.pending.borrow_mut();
        let mut kept = Vec::new();
        for (ranges, ev) in pending.drain(..) {
            let touched = spans
                .as_ref()
                .is_none_or(|sp| sp.iter().any(|&(lo, hi)| ranges.iter().any(|&(a, b)| lo < b && a < hi)));
            if touched {
                // SAFETY: the event was recorded on the transport's stream and is released once waited on
                unsafe {
                    drv::stream::wait_event(self.stream, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                        .map_err(|e| other(format!("waiting for a collective: {e}")))?;
                    let _ = drv::event::destroy(ev);
                }
            } else {
                kept.push((ranges, ev));
            }
        }
        if !kept.is_empty() && k.is_some() {
            self.overlapped.set(self.overlapped.get() + 1);
        }
        *pending = kept;
        Ok(())
    }

    /// View `t` at the bound sizes: its shape, strides and offset (in elements).
    fn view_at(&self, t: &TensorRef) -> Result<(Vec<usize>, Vec<i64>, i64), RuntimeError> {
        let env = &self.binding.as_ref().ok_or_else(|| other("no binding"))?.env;
        let ev = |d: &Dim| d.eval(env).map_err(other);
        let shape: Vec<usize> = t
            .shape
            .iter()
            .map(|d| ev(d).map(|x| x.max(0) as usize))
            .collect::<Result<_, _>>()?;
        let strides: Vec<i64> = t.strides.iter().map(ev).collect::<Result<_, _>>()?;
        Ok((shape, strides, ev(&t.offset)?))
    }

    /// The bytes view `t` addresses in its buffer: `[lo, hi)`.
    fn view_span(&self, t: &TensorRef) -> Result<(u64, u64), RuntimeError> {
        let (shape, strides, offset) = self.view_at(t)?;
        let (lo, hi) = element_span(&shape, &strides, offset);
        let (base, es) = (self.buffer_ptr(t.buffer)? as i64, t.dtype.size_bytes() as i64);
        Ok(((base + lo * es) as u64, (base + (hi + 1) * es) as u64))
    }

    fn launch_kernel(&self, k: &Kernel, step: bool, index: usize) -> Result<(), RuntimeError> {
        self.await_pending(Some(k))?;
        let binding = self.binding.as_ref().ok_or_else(|| other("no binding"))?;
        let lk = &self.kernels[k.code];
        let ck = &self.cuda[k.code];
        let params = &binding.params[k.code];
        let what = if step { "kernel" } else { "prepare kernel" };
        let fail = |m: String| other(format!("{what} k{} ({}, {}): {m}", k.id, k.name, op_summary(&k.op)));
        let ev = |e| {
            lk.pool
                .eval(e, params)
                .ok_or_else(|| fail("a size of its code cannot be evaluated".into()))
        };
        let mut slots: Vec<u64> = Vec::with_capacity(lk.slots.len());
        for s in &lk.slots {
            slots.push(match *s {
                Slot::Input(i) => self.buffer_ptr(k.inputs[i].buffer)?,
                Slot::Output(i) => self.buffer_ptr(k.outputs[i].buffer)?,
                Slot::Scratch(i) => self.scratch.ptr + binding.scratch[k.code][i] as u64,
            });
        }
        let err_ptr: u64 = self.errors.ptr + 16 * index as u64;
        for (li, l) in ck.launches.iter().enumerate() {
            match l {
                Launch::Phase { grid, spill, .. } => {
                    let g = ev(*grid)?;
                    if g <= 0 {
                        continue;
                    }
                    let (blocks, threads) = self.phase_shape(g, *spill);
                    let f = self.functions[k.code][li].ok_or_else(|| fail("a phase without code".into()))?;
                    self.launch(f, (blocks, BLOCK, 0), &slots, params, g, err_ptr, threads)
                        .map_err(|e| fail(format!("launch of phase {li}: {e}")))?;
                }
                Launch::Template {
                    items,
                    per_block,
                    threads,
                    smem,
                    ..
                } => {
                    let g = ev(*items)?;
                    if g <= 0 {
                        continue;
                    }
                    let blocks = (g as u64).div_ceil(*per_block as u64);
                    if blocks > i32::MAX as u64 {
                        return Err(fail(format!("{g} rows need more blocks than a launch has")));
                    }
                    let f = self.functions[k.code][li].ok_or_else(|| fail("a template without code".into()))?;
                    self.launch(f, (blocks as u32, *threads, *smem), &slots, params, g, err_ptr, 0)
                        .map_err(|e| fail(format!("launch: {e}")))?;
                }
                Launch::Library { step: s } => match &lk.steps[*s] {
                    Step::Gemm(g) => {
                        let (m, n, kk) = (ev(g.m)?, ev(g.n)?, ev(g.k)?);
                        let batch: Vec<[i64; 4]> = g
                            .batch
                            .iter()
                            .map(|b| Ok([ev(b[0])?, ev(b[1])?, ev(b[2])?, ev(b[3])?]))
                            .collect::<Result<_, RuntimeError>>()?;
                        let a = self.operand(&slots, &g.a, &ev)?;
                        let b = self.operand(&slots, &g.b, &ev)?;
                        let c = self.operand(&slots, &g.c, &ev)?;
                        // the last batch axis goes to cuBLAS, the others loop here
                        let (outer, inner) = match batch.split_last() {
                            Some((last, rest)) => (rest.to_vec(), *last),
                            None => (Vec::new(), [1, 0, 0, 0]),
                        };
                        let total: i64 = outer.iter().map(|b| b[0]).product();
                        let mut idx = vec![0i64; outer.len()];
                        for _ in 0..total.max(0) {
                            let (mut da, mut db, mut dc) = (0, 0, 0);
                            for (j, b) in outer.iter().enumerate() {
                                da += idx[j] * b[1];
                                db += idx[j] * b[2];
                                dc += idx[j] * b[3];
                            }
                            self.gemm(
                                self.blas,
                                m,
                                n,
                                kk,
                                a.shifted(da),
                                b.shifted(db),
                                c.shifted(dc),
                                inner[0],
                                [inner[1], inner[2], inner[3]],
                            )
                            .map_err(|e| fail(format!("GEMM (step {s}): {e}")))?;
                            for ax in (0..outer.len()).rev() {
                                idx[ax] += 1;
                                if idx[ax] < outer[ax][0] {
                                    break;
                                }
                                idx[ax] = 0;
                            }
                        }
                    }
                    Step::GroupedGemm(_) if self.capturing => {
                        let at = ck
                            .device_grouped
                            .iter()
                            .position(|(st, _, _)| st == s)
                            .ok_or_else(|| fail("a grouped GEMM without its device form".into()))?;
                        let items = ev(ck.device_grouped[at].2)?;
                        if items > 0 {
                            let f = self.functions[k.code][ck.launches.len() + at]
                                .ok_or_else(|| fail("a grouped GEMM without code".into()))?;
                            let (blocks, threads) = self.phase_shape(items, 0);
                            self.launch(f, (blocks, BLOCK, 0), &slots, params, items, err_ptr, threads)
                                .map_err(|e| fail(format!("launch of the device grouped GEMM: {e}")))?;
                        }
                    }
                    Step::GroupedGemm(g) => {
                        let (m, n, kk, experts) = (ev(g.m)?, ev(g.n)?, ev(g.k)?, ev(g.experts)?);
                        let (co, cst) = (ev(g.counts_offset)?, ev(g.counts_stride)?);
                        let es = g.counts_dtype.size_bytes();
                        // the kernel input the counts slot reads: a transient buffer's view is written once
                        // per call, so its values read back once serve every later GEMM over it
                        let key = match lk.slots.get(g.counts_arg as usize) {
                            Some(Slot::Input(i)) => Some(k.inputs[*i].clone()),
                            _ => None,
                        }
                        .filter(|t| self.program.buffers[t.buffer].kind == BufferKind::Transient);
                        let known = key.as_ref().and_then(|t| self.group_sizes.borrow().get(t).cloned());
                        let counts: Vec<i64> = match known {
                            Some(c) => c,
                            None => {
                                // the group sizes, read back (the stream is synchronized by the copy)
                                let waited = std::time::Instant::now();
                                let mut raw = vec![0u8; (experts.max(0) as usize) * es];
                                // contiguous counts come back in one copy, others one by one
                                let (copies, each) = if cst == 1 {
                                    (usize::from(!raw.is_empty()), raw.len())
                                } else {
                                    (experts.max(0) as usize, es)
                                };
                                for e in 0..copies {
                                    let at = slots[g.counts_arg as usize] + ((co + e as i64 * cst) * es as i64) as u64;
                                    // SAFETY: the counts view lies in its buffer (check_views)
                                    unsafe {
                                        drv::memcpy_dtoh_async(&mut raw[e * each..(e + 1) * each], at, self.stream)
                                            .map_err(|x| fail(format!("reading the group sizes: {x}")))?;
                                    }
                                }
                                // SAFETY: the stream is live
                                unsafe { drv::stream::synchronize(self.stream) }
                                    .map_err(|x| fail(format!("a kernel before it failed: {x}")))?;
                                let (n, s) = self.host_waits.get();
                                self.host_waits.set((n + 1, s + waited.elapsed().as_secs_f64()));
                                let c: Vec<i64> = raw
                                    .chunks(es)
                                    .map(|c| match es {
                                        4 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                                        _ => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
                                    })
                                    .collect();
                                if let Some(t) = key {
                                    self.group_sizes.borrow_mut().insert(t, c.clone());
                                }
                                c
                            }
                        };
                        if let Some((e, c)) = counts.iter().enumerate().find(|(_, c)| **c < 0) {
                            return Err(fail(format!("`grouped_matmul`: expert {e} has a negative count {c}")));
                        }
                        let total: i64 = counts.iter().sum();
                        if g.depth {
                            // out[e] = A[:, group e] · B[group e, :] (the kernel zeroed out first)
                            let a = self.operand(&slots, &g.x, &ev)?;
                            let b = self.operand(&slots, &g.w, &ev)?;
                            let out = self.operand(&slots, &g.out, &ev)?;
                            let es = ev(g.expert_stride)?;
                            let mut start = 0i64;
                            let mut jobs = Vec::with_capacity(counts.len());
                            for (e, &c) in counts.iter().enumerate() {
                                let depth = c.min(kk - start);
                                if depth > 0 {
                                    jobs.push(ExpertGemm {
                                        expert: e,
                                        m,
                                        n,
                                        k: depth,
                                        a: a.shifted(start * a.cs),
                                        b: b.shifted(start * b.rs),
                                        c: out.shifted(e as i64 * es),
                                    });
                                }
                                start += c;
                            }
                            self.expert_gemms(&jobs)
                                .map_err(|(e, x)| fail(format!("grouped weight-gradient GEMM, expert {e}: {x}")))?;
                            continue;
                        }
                        let x = self.operand(&slots, &g.x, &ev)?;
                        let w = self.operand(&slots, &g.w, &ev)?;
                        let out = self.operand(&slots, &g.out, &ev)?;
                        // rows past every group (a routed exchange's padding) belong to none: zeros
                        let size = out.dtype.size_bytes() as i64;
                        let dense = out.cs == 1 && out.rs == n;
                        let zeroed: Vec<i64> = if dense && total < m {
                            vec![total.max(0)]
                        } else {
                            (total.max(0)..m).collect()
                        };
                        for r in zeroed {
                            let runs: Vec<(i64, i64)> = if dense {
                                vec![(out.offset + r * out.rs, (m - r) * n)]
                            } else if out.cs == 1 {
                                vec![(out.offset + r * out.rs, n)]
                            } else {
                                (0..n).map(|c| (out.offset + r * out.rs + c * out.cs, 1)).collect()
                            };
                            for (at, len) in runs {
                                // SAFETY: the output view lies in its buffer (check_views)
                                unsafe {
                                    drv::memset_d8_async(
                                        out.base + (at * size) as u64,
                                        0,
                                        (len * size) as usize,
                                        self.stream,
                                    )
                                }
                                .map_err(|x| fail(format!("zeroing the rows past the groups: {x}")))?;
                            }
                        }
                        let ws = ev(g.expert_stride)?;
                        let mut start = 0i64;
                        let mut jobs = Vec::with_capacity(counts.len());
                        for (e, &c) in counts.iter().enumerate() {
                            let rows = c.min(m - start);
                            if rows <= 0 {
                                continue;
                            }
                            jobs.push(ExpertGemm {
                                expert: e,
                                m: rows,
                                n,
                                k: kk,
                                a: x.shifted(start * x.rs),
                                b: w.shifted(e as i64 * ws),
                                c: out.shifted(start * out.rs),
                            });
                            start += rows;
                        }
                        self.expert_gemms(&jobs)
                            .map_err(|(e, x)| fail(format!("grouped GEMM, expert {e}: {x}")))?;
                    }
                    Step::Phase(_) => return Err(fail("a library launch of a phase".into())),
                    Step::Collective(op) => {
                        if self.capturing {
                            return Err(fail("a collective cannot run inside a CUDA graph".into()));
                        }
                        let fulgur_ir::Op::Composite(fulgur_ir::Composite::OnRank { op: inner, rank }) = op else {
                            return Err(fail(format!("a collective step of `{}`", op.name())));
                        };
                        let transport = self.transport.clone();
                        if let Some(dt) = transport.as_deref().and_then(device_collectives) {
                            let ins = self.device_operands(&k.inputs)?;
                            let outs = self.device_operands(&k.outputs)?;
                            if let (Some(ins), Some(outs)) = (ins, outs) {
                                let shapes: Vec<(DType, Vec<usize>)> =
                                    ins.iter().map(|o| (o.dtype, o.shape.clone())).collect();
                                if dt.on_device(inner, &shapes) {
                                    // SAFETY: the operands are the program's live buffers (device_operands)
                                    let done =
                                        unsafe { dt.run(inner, *rank, &ins, &outs, self.stream) }.map_err(|e| {
                                            fail(format!("collective `{}` on the device: {e}", inner.name()))
                                        })?;
                                    let ranges = ins
                                        .iter()
                                        .chain(&outs)
                                        .map(|o| {
                                            let n = o.shape.iter().product::<usize>() * o.dtype.size_bytes();
                                            (o.ptr, o.ptr + n as u64)
                                        })
                                        .collect();
                                    self.pending.borrow_mut().push((ranges, done));
                                    let (d, h) = self.collectives_run.get();
                                    self.collectives_run.set((d + 1, h));
                                    continue;
                                }
                            }
                        }
                        let t = self.transport.as_ref().ok_or_else(|| {
                            fail("a collective (`on_rank`) needs a transport: run the rank's program on ranks".into())
                        })?;
                        let (d, h) = self.collectives_run.get();
                        self.collectives_run.set((d, h + 1));
                        // the launches before it have written its inputs
                        // SAFETY: the stream is live
                        unsafe { drv::stream::synchronize(self.stream) }
                            .map_err(|e| fail(format!("failed on the GPU: {e}")))?;
                        let args: Vec<Tensor> = k.inputs.iter().map(|r| self.read(r)).collect::<Result<_, _>>()?;
                        let refs: Vec<&Tensor> = args.iter().collect();
                        let outs = t.collective(inner, *rank, &refs).map_err(fail)?;
                        for (r, o) in k.outputs.iter().zip(&outs) {
                            self.write(r, o)?;
                        }
                    }
                },
            }
        }
        if !self.capturing && std::env::var("FULGUR_CUDA_SYNC").is_ok_and(|v| v == "1") {
            // SAFETY: the stream is live
            unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| fail(format!("failed on the GPU: {e}")))?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        f: sys::CUfunction,
        (blocks, threads, smem): (u32, u32, u32),
        slots: &[u64],
        params: &[i64],
        grid: i64,
        err: u64,
        launched: i64,
    ) -> Result<(), String> {
        let mut ptrs: Vec<u64> = slots.to_vec();
        let mut ints: Vec<i64> = params.to_vec();
        ints.push(grid);
        let mut tail: [u64; 2] = [err, self.spill.ptr];
        let mut launched = launched;
        let mut args: Vec<*mut c_void> = Vec::with_capacity(ptrs.len() + ints.len() + 3);
        for p in ptrs.iter_mut() {
            args.push(p as *mut u64 as *mut c_void);
        }
        for i in ints.iter_mut() {
            args.push(i as *mut i64 as *mut c_void);
        }
        for t in tail.iter_mut() {
            args.push(t as *mut u64 as *mut c_void);
        }
        args.push(&mut launched as *mut i64 as *mut c_void);
        // SAFETY: the arguments match the generated signature (slots, parameters, grid, error record, spill
        // area, threads launched), each pointing at a value that lives through the call
        unsafe { drv::launch_kernel(f, (blocks, 1, 1), (threads, 1, 1), smem, self.stream, &mut args) }
            .map_err(|e| e.to_string())
    }

    fn operand(
        &self,
        slots: &[u64],
        o: &Operand,
        ev: &dyn Fn(u32) -> Result<i64, RuntimeError>,
    ) -> Result<Mat, RuntimeError> {
        Ok(Mat {
            base: slots[o.arg as usize],
            dtype: o.dtype,
            offset: ev(o.offset)?,
            rs: ev(o.rs)?,
            cs: ev(o.cs)?,
        })
    }

    /// The experts' GEMMs of one grouped GEMM, each `C = A · B` alone: on the program's stream one after the
    /// other when there is one (or `FULGUR_GROUPED_STREAMS` is 0 or 1), else spread over side streams that
    /// start after everything enqueued before and that the program's stream waits for after: an expert's
    /// product is often a single wave of thread blocks with a ragged tail, and those tails overlap. An error
    /// names the expert.
    fn expert_gemms(&self, jobs: &[ExpertGemm]) -> Result<(), (usize, String)> {
        let began = Instant::now();
        let result = self.enqueue_expert_gemms(jobs);
        let (n, s) = self.expert_enqueue.get();
        self.expert_enqueue
            .set((n + jobs.len(), s + began.elapsed().as_secs_f64()));
        result
    }

    /// One expert's product `j` on `stream`: through cuBLASLt with `workspace` (the stream's own: `(pointer,
    /// bytes)`), or through `handle` (cuBLAS) with `FULGUR_EXPERT_GEMM=cublas` or where cuBLASLt cannot.
    fn expert_gemm(
        &self,
        j: &ExpertGemm,
        handle: blas_sys::cublasHandle_t,
        stream: sys::CUstream,
        workspace: (u64, usize),
    ) -> Result<(), (usize, String)> {
        // where cuBLASLt cannot (no handle, no algorithm, a refused call), cuBLAS computes the product
        let mut refused = None;
        if j.k > 0 && expert_gemm_through_lt() {
            let mut lt = self.lt.borrow_mut();
            if lt.is_none() {
                match lt::ExpertLt::new() {
                    Ok(l) => *lt = Some(l),
                    Err(x) => refused = Some(x),
                }
            }
            if let Some(l) = lt.as_mut() {
                match l.gemm(stream, workspace, (j.m, j.n, j.k), j.a, j.b, j.c) {
                    Ok(()) => return Ok(()),
                    Err(x) => refused = Some(x),
                }
            }
        }
        self.gemm(handle, j.m, j.n, j.k, j.a, j.b, j.c, 1, [0, 0, 0])
            .map_err(|x| match refused {
                Some(r) => (j.expert, format!("{x} (and cuBLASLt: {r})")),
                None => (j.expert, x),
            })
    }

    fn enqueue_expert_gemms(&self, jobs: &[ExpertGemm]) -> Result<(), (usize, String)> {
        let want = grouped_streams();
        if jobs.len() < 2 || want < 2 {
            let ws = (self._workspace.ptr, self._workspace.len);
            for j in jobs {
                self.expert_gemm(j, self.blas, self.stream, ws)?;
            }
            return Ok(());
        }
        let mut lanes = self.lanes.borrow_mut();
        if lanes.is_none() {
            *lanes = Some(Lanes::new(want).map_err(|x| (jobs[0].expert, x))?);
        }
        let l = lanes.as_ref().ok_or((jobs[0].expert, "no side streams".to_string()))?;
        let used = jobs.len().min(l.streams.len());
        let first = jobs[0].expert;
        // SAFETY: the events and streams are live; every side stream waits for the fork before its GEMMs
        unsafe {
            drv::event::record(l.fork, self.stream).map_err(|x| (first, format!("CUDA event: {x}")))?;
            for &st in &l.streams[..used] {
                drv::stream::wait_event(st, l.fork, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                    .map_err(|x| (first, format!("CUDA stream wait: {x}")))?;
            }
        }
        let mut result = Ok(());
        for (i, j) in jobs.iter().enumerate() {
            let lane = i % used;
            let ws = (l._workspaces[lane].ptr, l._workspaces[lane].len);
            if let Err(x) = self.expert_gemm(j, l.handles[lane], l.streams[lane], ws) {
                result = Err(x);
                break;
            }
        }
        // the join, also after a failed call: the program's stream never runs ahead of its side streams
        // SAFETY: as above
        unsafe {
            for (lane, &st) in l.streams[..used].iter().enumerate() {
                drv::event::record(l.joins[lane], st).map_err(|x| (first, format!("CUDA event: {x}")))?;
                drv::stream::wait_event(
                    self.stream,
                    l.joins[lane],
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(|x| (first, format!("CUDA stream wait: {x}")))?;
            }
        }
        result
    }

    /// `C = A · B` for `count` batch elements `strides` apart (A, B, C), through cuBLAS handle `handle` (on the
    /// stream it is bound to: the program's `blas` or a side stream's): the row-major product written as the
    /// column-major one cuBLAS computes.
    #[allow(clippy::too_many_arguments)] // cuBLAS's own sizes, operands and batch strides
    fn gemm(
        &self,
        handle: blas_sys::cublasHandle_t,
        m: i64,
        n: i64,
        k: i64,
        a: Mat,
        b: Mat,
        c: Mat,
        count: i64,
        strides: [i64; 3],
    ) -> Result<(), String> {
        if m <= 0 || n <= 0 || count <= 0 {
            return Ok(());
        }
        if a.dtype != b.dtype {
            return Err(format!("operands of different dtypes ({} and {})", a.dtype, b.dtype));
        }
        let plan = plan_gemm(m, n, k, a, b, c, strides)?;
        let int =
            |x: i64, what: &str| i32::try_from(x).map_err(|_| format!("{what} = {x} is beyond cuBLAS's 32-bit sizes"));
        let ty = |d: DType| match d {
            DType::F32 => Ok(blas_sys::cudaDataType_t::CUDA_R_32F),
            DType::BF16 => Ok(blas_sys::cudaDataType_t::CUDA_R_16BF),
            DType::F16 => Ok(blas_sys::cudaDataType_t::CUDA_R_16F),
            d => Err(format!("a GEMM on {d}")),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ptr = |x: &Mat| x.base + (x.offset * x.dtype.size_bytes() as i64) as u64;
        let (pa, pb) = (ptr(&plan.first), ptr(&plan.second));
        // SAFETY: the operands are views of live device buffers (check_views); sizes checked above
        unsafe {
            blas::gemm_strided_batched_ex(
                handle,
                op(plan.trans_first),
                op(plan.trans_second),
                int(plan.m, "m")?,
                int(plan.n, "n")?,
                int(k, "k")?,
                &alpha as *const f32 as *const c_void,
                pa as *const c_void,
                ty(a.dtype)?,
                int(plan.ld_first, "lda")?,
                plan.stride_first,
                pb as *const c_void,
                ty(b.dtype)?,
                int(plan.ld_second, "ldb")?,
                plan.stride_second,
                &beta as *const f32 as *const c_void,
                ptr(&c) as *mut c_void,
                ty(c.dtype)?,
                int(plan.ldc, "ldc")?,
                strides[2],
                int(count, "batch")?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("cuBLAS: {e:?}"))
    }

    /// Binds the symbols from `inputs`, runs the prepare program if needed, and uploads the inputs.
    fn begin_step(&mut self, inputs: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        self.current()?;
        self.group_sizes.borrow_mut().clear();
        self.host_waits.set((0, 0.0));
        self.expert_enqueue.set((0, 0.0));
        self.queries_before = self.lt.borrow().as_ref().map_or(0, |l| l.queries);
        // records a failed launch of the last call left behind are not this call's
        // SAFETY: the error area is `errors.len` bytes
        unsafe { drv::memset_d8_sync(self.errors.ptr, 0, self.errors.len) }
            .map_err(|e| other(format!("clearing the error records: {e}")))?;
        let env = self.bind_inputs(inputs)?;
        self.bind(env)?;
        self.prepare()?;
        for io in &self.program.inputs {
            if self.carrying.contains(&io.name) {
                // a carried output: held on the device since the last call, or already in the input's buffer
                // (donated: the program wrote it there)
                if let Some(h) = self.carry.get(&io.name) {
                    let buf = self.persistent[io.tensor.buffer]
                        .as_ref()
                        .ok_or_else(|| other(format!("input `{}` has no memory", io.name)))?;
                    if h.1 > 0 {
                        // SAFETY: the holding buffer has h.1 bytes; the input's buffer at least as many (bind)
                        unsafe { drv::memcpy_dtod_async(buf.ptr, h.0.ptr, h.1, self.stream) }
                            .map_err(|e| other(format!("input `{}`: device copy failed: {e}", io.name)))?;
                    }
                }
                continue;
            }
            let t = &inputs[&io.name];
            let mut bytes = vec![0u8; t.numel() * io.ty.dtype.size_bytes()];
            encode_into(t, io.ty.dtype, &mut bytes);
            let buf = self.persistent[io.tensor.buffer]
                .as_ref()
                .ok_or_else(|| other(format!("input `{}` has no memory", io.name)))?;
            if !bytes.is_empty() {
                // SAFETY: the buffer holds at least the input's bytes (bind)
                unsafe { drv::memcpy_htod_sync(buf.ptr, &bytes) }
                    .map_err(|e| other(format!("input `{}`: upload failed: {e}", io.name)))?;
            }
        }
        Ok(())
    }

    /// The device operands of views `ts`, or `None` when one is not a contiguous run of its buffer (the host
    /// path then gathers it).
    fn device_operands(&self, ts: &[TensorRef]) -> Result<Option<Vec<DeviceOperand>>, RuntimeError> {
        let mut out = Vec::with_capacity(ts.len());
        for t in ts {
            let (shape, _, offset) = self.view_at(t)?;
            if !t.is_contiguous() || shape.contains(&0) {
                return Ok(None);
            }
            out.push(DeviceOperand {
                ptr: self.buffer_ptr(t.buffer)? + (offset as usize * t.dtype.size_bytes()) as u64,
                dtype: t.dtype,
                shape,
            });
        }
        Ok(Some(out))
    }

    /// How many collectives this program has run on the device (an NCCL transport's, on its own stream) and how
    /// many through the host transport.
    pub fn collectives_run(&self) -> (usize, usize) {
        self.collectives_run.get()
    }

    /// How many kernels ran alongside a collective still running on the transport's stream (launched without
    /// waiting for it, touching none of its bytes).
    pub fn overlapped_kernels(&self) -> usize {
        self.overlapped.get()
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
        let es = t.dtype.size_bytes();
        let mut bytes = vec![0u8; v.numel() * es];
        crate::host::encode_into(v, t.dtype, &mut bytes);
        if bytes.is_empty() {
            return Ok(());
        }
        let at = self.buffer_ptr(t.buffer)? + (offset as usize * es) as u64;
        // SAFETY: the view lies in its buffer (check_views); the stream was synchronised before the step
        unsafe { drv::memcpy_htod_sync(at, &bytes) }.map_err(|e| other(format!("upload failed: {e}")))?;
        Ok(())
    }

    /// Reads a view of device memory as a host tensor.
    fn read(&self, t: &TensorRef) -> Result<Tensor, RuntimeError> {
        let (shape, strides, offset) = self.view_at(t)?;
        // the elements the view spans
        let (lo, hi) = element_span(&shape, &strides, offset);
        let empty = shape.contains(&0);
        let es = t.dtype.size_bytes();
        let mut host = vec![0u8; if empty { 0 } else { (hi - lo + 1) as usize * es }];
        if !host.is_empty() {
            let base = self.buffer_ptr(t.buffer)? + (lo as usize * es) as u64;
            // SAFETY: the view lies in its buffer (check_views)
            unsafe { drv::memcpy_dtoh_sync(&mut host, base) }.map_err(|e| other(format!("download failed: {e}")))?;
        }
        // SAFETY: `host` holds every element the view addresses, shifted by `lo`
        Ok(unsafe { decode_view(&self.pool, host.as_ptr(), t.dtype, &shape, &strides, offset - lo) })
    }

    /// [`crate::Executable::run_carried`]: each carried output copied on the device into a holding buffer,
    /// then into its input's buffer once the call is bound; never downloaded.
    pub fn run_carried(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        carried: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        let binding = self.binding.as_ref()?;
        let mut views = Vec::new();
        for name in carried {
            let out = self.program.outputs.iter().find(|o| &o.name == name)?;
            let inp = self.program.inputs.iter().find(|i| &i.name == name)?;
            if out.ty.dtype != inp.ty.dtype || !out.tensor.is_contiguous() {
                return None;
            }
            views.push((name.clone(), out.tensor.clone(), out.tensor.buffer == inp.tensor.buffer));
        }
        let env = binding.env.clone();
        Some((|| {
            self.current()?;
            let mut all = inputs.clone();
            for (name, t, donated) in views {
                let ev = |d: &Dim| d.eval(&env).map_err(other);
                let shape: Vec<usize> = t
                    .shape
                    .iter()
                    .map(|d| ev(d).map(|x| x.max(0) as usize))
                    .collect::<Result<_, _>>()?;
                if donated {
                    // the output is already in its input's buffer: nothing to hold
                    self.carry.remove(&name);
                    all.insert(name, crate::host::placeholder(t.dtype, shape));
                    continue;
                }
                let es = t.dtype.size_bytes();
                let n: usize = shape.iter().product::<usize>() * es;
                let src = self.buffer_ptr(t.buffer)? + (ev(&t.offset)? as usize * es) as u64;
                let have = self.carry.get(&name).map_or(0, |h| h.0.len());
                if have < n {
                    self.carry.remove(&name);
                    let b = DevBuf::zeroed(grown(n, have), &format!("carried `{name}`"))?;
                    self.carry.insert(name.clone(), (b, 0));
                }
                let h = self.carry.get_mut(&name).ok_or_else(|| other("no holding buffer"))?;
                h.1 = n;
                if n > 0 {
                    // SAFETY: both hold n bytes; ordered after the last call's kernels on the stream
                    unsafe { drv::memcpy_dtod_async(h.0.ptr, src, n, self.stream) }
                        .map_err(|e| other(format!("carrying `{name}`: device copy failed: {e}")))?;
                }
                all.insert(name, crate::host::placeholder(t.dtype, shape));
            }
            // the copies finish before binding may free the arena they read
            // SAFETY: the stream is live
            unsafe { drv::stream::synchronize(self.stream) }.map_err(|e| other(format!("carrying: {e}")))?;
            self.carrying = carried.to_vec();
            let r = self.run_skipping(&all, carried);
            self.carrying.clear();
            if r.is_ok() {
                self.carried_runs += 1;
            }
            r
        })())
    }

    /// Runs one step: binds the symbols from `inputs`, runs the prepare program if needed, then the step
    /// kernels; returns every output.
    pub fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.run_skipping(inputs, &[])
    }

    fn run_skipping(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        skip: &[String],
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        let t0 = std::time::Instant::now();
        self.begin_step(inputs)?;
        self.phases = [t0.elapsed().as_secs_f64() * 1e3, 0.0, 0.0, 0.0];
        if self.options.graphs && self.profile.is_none() && !self.options.check_finite {
            return self.run_graph(skip);
        }
        let t1 = std::time::Instant::now();
        let kernels = std::mem::take(&mut self.program.step);
        let np = self.program.prepare.len();
        let profiling = self.profile.is_some();
        let want = if profiling { kernels.len() + 1 } else { 2 };
        while self.events.len() < want {
            let e = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| other(format!("CUDA event: {e}")))?;
            self.events.push(e);
        }
        // SAFETY: the event and stream are live
        unsafe { drv::event::record(self.events[0], self.stream) }.map_err(|e| other(format!("CUDA event: {e}")))?;
        let mut result = Ok(());
        for (i, k) in kernels.iter().enumerate() {
            if let Err(e) = self.launch_kernel(k, true, np + i) {
                result = Err(e);
                break;
            }
            if profiling {
                // SAFETY: as above
                if let Err(e) = unsafe { drv::event::record(self.events[i + 1], self.stream) } {
                    result = Err(other(format!("CUDA event: {e}")));
                    break;
                }
            }
            if self.options.check_finite {
                if let Err(e) = self.check_finite(k) {
                    result = Err(e);
                    break;
                }
            }
        }
        let last = if profiling { kernels.len() } else { 1 };
        self.program.step = kernels;
        result?;
        if !profiling {
            // SAFETY: as above
            unsafe { drv::event::record(self.events[1], self.stream) }
                .map_err(|e| other(format!("CUDA event: {e}")))?;
        }
        self.phases[1] = t1.elapsed().as_secs_f64() * 1e3;
        let t2 = std::time::Instant::now();
        self.finish(true)?;
        self.phases[2] = t2.elapsed().as_secs_f64() * 1e3;
        // SAFETY: both events were recorded on the stream, which has finished
        self.last_step_ms = unsafe { drv::event::elapsed(self.events[0], self.events[last]) }
            .map_err(|e| other(format!("CUDA event: {e}")))? as f64;
        if let Some(p) = &mut self.profile {
            p.kernel_ms.resize(self.program.step.len(), 0.0);
            for i in 0..self.program.step.len() {
                // SAFETY: as above
                let ms = unsafe { drv::event::elapsed(self.events[i], self.events[i + 1]) }
                    .map_err(|e| other(format!("CUDA event: {e}")))?;
                p.kernel_ms[i] += ms as f64;
            }
            p.runs += 1;
        }
        let t3 = std::time::Instant::now();
        let out = self.outputs_except(skip);
        self.phases[3] = t3.elapsed().as_secs_f64() * 1e3;
        out
    }

    /// The step as a CUDA graph: captured, instantiated (or the last instantiated graph updated in place),
    /// launched once.
    fn run_graph(&mut self, skip: &[String]) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        while self.events.len() < 2 {
            let e = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
                .map_err(|e| other(format!("CUDA event: {e}")))?;
            self.events.push(e);
        }
        let kernels = std::mem::take(&mut self.program.step);
        let np = self.program.prepare.len();
        // SAFETY: the stream is live; capture ends below on every path
        unsafe {
            drv::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| other(format!("CUDA graph capture: {e}")))?;
        self.capturing = true;
        let mut result = Ok(());
        for (i, k) in kernels.iter().enumerate() {
            if let Err(e) = self.launch_kernel(k, true, np + i) {
                result = Err(e);
                break;
            }
        }
        self.capturing = false;
        self.program.step = kernels;
        // SAFETY: capture began above
        let graph = unsafe { drv::stream::end_capture(self.stream) };
        let graph = match (result, graph) {
            (Err(e), g) => {
                if let Ok(g) = g {
                    // SAFETY: the captured graph is destroyed once
                    let _ = unsafe { drv::graph::destroy(g) };
                }
                return Err(e);
            }
            (Ok(()), g) => g.map_err(|e| other(format!("CUDA graph capture: {e}")))?,
        };
        let mut updated = false;
        if let Some(exec) = self.graph_exec {
            let mut info = std::mem::MaybeUninit::<sys::CUgraphExecUpdateResultInfo>::zeroed();
            // SAFETY: both are live; the exec is replaced when the update is refused
            updated = unsafe { sys::cuGraphExecUpdate_v2(exec, graph, info.as_mut_ptr()) }
                .result()
                .is_ok();
            if !updated {
                // SAFETY: destroyed once, replaced below
                let _ = unsafe { drv::graph::exec_destroy(exec) };
                self.graph_exec = None;
            }
        }
        if self.graph_exec.is_none() {
            // SAFETY: the graph was captured above
            let exec = unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
            match exec {
                Ok(x) => self.graph_exec = Some(x),
                Err(e) => {
                    // SAFETY: as above
                    let _ = unsafe { drv::graph::destroy(graph) };
                    return Err(other(format!("CUDA graph instantiation: {e}")));
                }
            }
        }
        // SAFETY: the exec holds its own copy of the graph
        let _ = unsafe { drv::graph::destroy(graph) };
        let exec = self.graph_exec.ok_or_else(|| other("no CUDA graph"))?;
        // SAFETY: the events, exec and stream are live
        unsafe {
            drv::event::record(self.events[0], self.stream).map_err(|e| other(format!("CUDA event: {e}")))?;
            drv::graph::launch(exec, self.stream).map_err(|e| other(format!("CUDA graph launch: {e}")))?;
            drv::event::record(self.events[1], self.stream).map_err(|e| other(format!("CUDA event: {e}")))?;
        }
        self.finish(true)?;
        // SAFETY: both events were recorded on the finished stream
        self.last_step_ms = unsafe { drv::event::elapsed(self.events[0], self.events[1]) }
            .map_err(|e| other(format!("CUDA event: {e}")))? as f64;
        self.graph_launches += 1;
        self.graph_updates += usize::from(updated);
        self.outputs_except(skip)
    }

    /// Runs one step like [`CudaProgram::run`], calling `trace` after every step kernel with the kernel, the
    /// values of its inputs (read before it ran) and of its outputs: the way to check each generated kernel
    /// against the interpreter on real data.
    pub fn run_traced(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        mut trace: impl FnMut(&Kernel, &[Tensor], &[Tensor]) -> Result<(), RuntimeError>,
    ) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        self.begin_step(inputs)?;
        let np = self.program.prepare.len();
        for (i, k) in self.program.step.clone().iter().enumerate() {
            let ins: Vec<Tensor> = k.inputs.iter().map(|t| self.read(t)).collect::<Result<_, _>>()?;
            self.launch_kernel(k, true, np + i)?;
            self.finish(true)?;
            let outs: Vec<Tensor> = k.outputs.iter().map(|t| self.read(t)).collect::<Result<_, _>>()?;
            trace(k, &ins, &outs)?;
        }
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

    /// Stops at a kernel whose float outputs hold a NaN (an infinity alone is not an error: causal masks hold
    /// −inf; an overflow shows as a NaN where it is used).
    fn check_finite(&mut self, k: &Kernel) -> Result<(), RuntimeError> {
        self.finish(true)?;
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
                        op_summary(&k.op),
                        t.dtype,
                        v.shape
                    )));
                }
            }
        }
        Ok(())
    }
}

impl Drop for CudaProgram {
    fn drop(&mut self) {
        let _ = self.current();
        // SAFETY: created in `new`, destroyed once; device memory is freed by the DevBufs after this
        unsafe {
            let _ = drv::stream::synchronize(self.stream);
            self.lanes.borrow_mut().take();
            self.lt.borrow_mut().take();
            let _ = blas::destroy_handle(self.blas);
            for m in &self.modules {
                let _ = drv::module::unload(*m);
            }
            for e in &self.events {
                let _ = drv::event::destroy(*e);
            }
            if let Some(x) = self.graph_exec {
                let _ = drv::graph::exec_destroy(x);
            }
            let _ = drv::stream::destroy(self.stream);
        }
    }
}

impl crate::Executable for CudaProgram {
    fn name(&self) -> &str {
        "cuda"
    }
    fn input_names(&self) -> Vec<String> {
        self.program.inputs.iter().map(|i| i.name.clone()).collect()
    }
    fn run(&mut self, inputs: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, RuntimeError> {
        CudaProgram::run(self, inputs)
    }
    fn run_carried(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        carried: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        CudaProgram::run_carried(self, inputs, carried)
    }
    fn run_keeping(
        &mut self,
        inputs: &HashMap<String, Tensor>,
        keep: &[String],
    ) -> Option<Result<BTreeMap<String, Tensor>, RuntimeError>> {
        Some(self.run_skipping(inputs, keep))
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
    fn last_timing(&self) -> Option<crate::CallTiming> {
        let (host_waits, s) = self.host_waits.get();
        let (expert_gemms, e) = self.expert_enqueue.get();
        Some(crate::CallTiming {
            device_ms: self.last_step_ms,
            host_waits,
            host_wait_ms: s * 1e3,
            expert_gemms,
            expert_enqueue_ms: e * 1e3,
            expert_queries: self.lt.borrow().as_ref().map_or(0, |l| l.queries) - self.queries_before,
            begin_ms: self.phases[0],
            launch_ms: self.phases[1],
            finish_ms: self.phases[2],
            outputs_ms: self.phases[3],
        })
    }
}

/// One `cublasGemmStridedBatchedEx` call (column-major): `C = op(first) · op(second)`, `m × n`, depth `k`.
#[derive(Clone, Copy, Debug)]
struct GemmPlan {
    m: i64,
    n: i64,
    first: Mat,
    trans_first: bool,
    ld_first: i64,
    stride_first: i64,
    second: Mat,
    trans_second: bool,
    ld_second: i64,
    stride_second: i64,
    ldc: i64,
}

/// The cuBLAS call computing the row-major strided `C [m, n] = A [m, k] · B [k, n]` (batch strides
/// `[A, B, C]`): directly when `C` reads as column-major, else as `Cᵀ = Bᵀ · Aᵀ`; each operand transposed or
/// not by its layout. An operand or output with no unit stride is refused.
fn plan_gemm(m: i64, n: i64, k: i64, a: Mat, b: Mat, c: Mat, strides: [i64; 3]) -> Result<GemmPlan, String> {
    let (m2, n2, (fa, fl), (sb_, sl), ldc, (s1, s2)) = if let Some(ldc) = c.col_major(m, n) {
        (
            m,
            n,
            (a, a.as_cm(m, k)),
            (b, b.as_cm(k, n)),
            ldc,
            (strides[0], strides[1]),
        )
    } else if let Some(ldc) = c.transposed().col_major(n, m) {
        let (at, bt) = (a.transposed(), b.transposed());
        (
            n,
            m,
            (b, bt.as_cm(n, k)),
            (a, at.as_cm(k, m)),
            ldc,
            (strides[1], strides[0]),
        )
    } else {
        return Err(format!(
            "an output [{m}, {n}] with strides ({}, {}) (neither is 1)",
            c.rs, c.cs
        ));
    };
    let (trans_first, ld_first) = fl.ok_or("an operand with no unit stride")?;
    let (trans_second, ld_second) = sl.ok_or("an operand with no unit stride")?;
    Ok(GemmPlan {
        m: m2,
        n: n2,
        first: fa,
        trans_first,
        ld_first,
        stride_first: s1,
        second: sb_,
        trans_second,
        ld_second,
        stride_second: s2,
        ldc,
    })
}

/// One expert's product of a grouped GEMM: `c = a · b`, `m × n`, depth `k`.
struct ExpertGemm {
    expert: usize,
    m: i64,
    n: i64,
    k: i64,
    a: Mat,
    b: Mat,
    c: Mat,
}

/// How many side streams a grouped GEMM's experts spread over (`FULGUR_GROUPED_STREAMS`, default 4; 0 or 1:
/// one after the other on the program's stream).
fn grouped_streams() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("FULGUR_GROUPED_STREAMS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4)
            .min(16)
    })
}

/// Whether the experts' products go through cuBLASLt (the default) or, with `FULGUR_EXPERT_GEMM=cublas`,
/// through `cublasGemmStridedBatchedEx` like the other GEMMs (which runs cuBLAS's heuristic for each new size).
fn expert_gemm_through_lt() -> bool {
    static LT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LT.get_or_init(|| std::env::var("FULGUR_EXPERT_GEMM").map_or(true, |v| v != "cublas"))
}

/// Binds cuBLAS handle `h` to `stream` with IEEE f32 math (no TF32) and `workspace` as its workspace, which must
/// outlive the handle.
fn configure_blas(h: blas_sys::cublasHandle_t, stream: sys::CUstream, workspace: &DevBuf) -> Result<(), String> {
    // SAFETY: the handle and stream are live; the caller keeps the workspace until the handle is destroyed
    unsafe {
        blas::set_stream(h, stream as blas_sys::cudaStream_t).map_err(|e| format!("cuBLAS: {e:?}"))?;
        blas_sys::cublasSetMathMode(h, blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
            .result()
            .map_err(|e| format!("cuBLAS: {e:?}"))?;
        blas_sys::cublasSetWorkspace_v2(h, workspace.ptr as *mut c_void, workspace.len)
            .result()
            .map_err(|e| format!("cuBLAS workspace: {e:?}"))
    }
}

/// Side streams, each with its own cuBLAS handle and workspace (a handle's workspace serves one stream at a
/// time), and the events that fork them from the program's stream and join them back.
struct Lanes {
    streams: Vec<sys::CUstream>,
    handles: Vec<blas_sys::cublasHandle_t>,
    fork: sys::CUevent,
    joins: Vec<sys::CUevent>,
    /// Dropped after the handles (`Drop` runs first).
    _workspaces: Vec<DevBuf>,
}

impl Lanes {
    fn new(n: usize) -> Result<Lanes, String> {
        let mut l = Lanes {
            streams: Vec::new(),
            handles: Vec::new(),
            fork: drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| format!("CUDA event: {e}"))?,
            joins: Vec::new(),
            _workspaces: Vec::new(),
        };
        for _ in 0..n {
            // blocking, like the program's stream: ordered with the synchronous uploads and memsets
            let st = drv::stream::create(drv::stream::StreamKind::Default).map_err(|e| format!("CUDA stream: {e}"))?;
            l.streams.push(st);
            l.joins.push(
                drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                    .map_err(|e| format!("CUDA event: {e}"))?,
            );
            let h = blas::create_handle().map_err(|e| format!("cuBLAS: {e:?}"))?;
            l.handles.push(h);
            // the workspace outlives the handle (`Drop` destroys the handles first)
            let ws = DevBuf::zeroed(32 << 20, "a side stream's cuBLAS workspace").map_err(|e| e.to_string())?;
            configure_blas(h, st, &ws)?;
            l._workspaces.push(ws);
        }
        Ok(l)
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, after their work is done
        unsafe {
            for &st in &self.streams {
                let _ = drv::stream::synchronize(st);
            }
            for &h in &self.handles {
                let _ = blas::destroy_handle(h);
            }
            for &e in self.joins.iter().chain([&self.fork]) {
                let _ = drv::event::destroy(e);
            }
            for &st in &self.streams {
                let _ = drv::stream::destroy(st);
            }
        }
    }
}

/// A strided matrix operand in device memory.
#[derive(Clone, Copy, Debug)]
struct Mat {
    base: u64,
    dtype: DType,
    offset: i64,
    rs: i64,
    cs: i64,
}

impl Mat {
    fn shifted(self, by: i64) -> Mat {
        Mat {
            offset: self.offset + by,
            ..self
        }
    }
    fn transposed(self) -> Mat {
        Mat {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
    /// The leading dimension of this `[rows, cols]` matrix read as column-major (element `(i, j)` at
    /// `i + j·ld`), or `None` when it is not laid out so.
    fn col_major(self, rows: i64, cols: i64) -> Option<i64> {
        if rows != 1 && self.rs != 1 {
            return None;
        }
        if cols == 1 {
            return Some(rows.max(1));
        }
        (self.cs >= rows.max(1)).then_some(self.cs)
    }

    /// This `[rows, cols]` matrix as cuBLAS reads it: (transposed?, leading dimension), or `None` when it
    /// is neither column- nor row-major.
    fn as_cm(self, rows: i64, cols: i64) -> Option<(bool, i64)> {
        if let Some(ld) = self.col_major(rows, cols) {
            return Some((false, ld));
        }
        self.transposed().col_major(cols, rows).map(|ld| (true, ld))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cuBLAS computes (column-major, one batch element): `C = op(A) · op(B)`.
    #[allow(clippy::too_many_arguments)]
    fn cublas(
        ta: bool,
        tb: bool,
        m: i64,
        n: i64,
        k: i64,
        a: &[f64],
        lda: i64,
        b: &[f64],
        ldb: i64,
        c: &mut [f64],
        ldc: i64,
    ) {
        assert!(lda >= if ta { k } else { m }.max(1) && ldb >= if tb { n } else { k }.max(1) && ldc >= m.max(1));
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0.0;
                for p in 0..k {
                    let x = if ta {
                        a[(p + i * lda) as usize]
                    } else {
                        a[(i + p * lda) as usize]
                    };
                    let y = if tb {
                        b[(j + p * ldb) as usize]
                    } else {
                        b[(p + j * ldb) as usize]
                    };
                    acc += x * y;
                }
                c[(i + j * ldc) as usize] = acc;
            }
        }
    }

    fn mat(offset: i64, rs: i64, cs: i64) -> Mat {
        Mat {
            base: 0,
            dtype: DType::F32,
            offset,
            rs,
            cs,
        }
    }

    /// Every layout the lowering gives a GEMM (row- and column-major operands and outputs, padded leading
    /// dimensions, offsets, size-1 rows and columns): the planned call, run as cuBLAS would, gives the
    /// row-major product.
    #[test]
    fn the_planned_cublas_call_computes_the_row_major_product() {
        let mut seed = 1u64;
        let mut rnd = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 33) % 17) as f64 - 8.0
                })
                .collect()
        };
        let mut checked = 0;
        for (m, n, k) in [(1, 1, 1), (1, 5, 3), (4, 1, 3), (3, 4, 1), (5, 7, 6), (2, 3, 4)] {
            // (row-major?, padding) for A, B, C
            for lay in 0..8u32 {
                for pad in [0, 2] {
                    let (ar, br, cr) = (lay & 1 == 0, lay & 2 == 0, lay & 4 == 0);
                    let layout = |rows: i64, cols: i64, row_major: bool, off: i64| {
                        if row_major {
                            mat(off, cols + pad, 1)
                        } else {
                            mat(off, 1, rows + pad)
                        }
                    };
                    let (a, b, c) = (layout(m, k, ar, 3), layout(k, n, br, 1), layout(m, n, cr, 2));
                    let size =
                        |x: &Mat, rows: i64, cols: i64| (x.offset + (rows - 1) * x.rs + (cols - 1) * x.cs + 1) as usize;
                    let av = rnd(size(&a, m, k));
                    let bv = rnd(size(&b, k, n));
                    let plan = plan_gemm(m, n, k, a, b, c, [0, 0, 0]).unwrap();
                    let mut cv = vec![f64::NAN; size(&c, m, n)];
                    let (fv, sv) = if plan.first.offset == a.offset && plan.first.rs == a.rs && plan.first.cs == a.cs {
                        (&av, &bv)
                    } else {
                        (&bv, &av)
                    };
                    let (f0, s0) = (plan.first.offset as usize, plan.second.offset as usize);
                    cublas(
                        plan.trans_first,
                        plan.trans_second,
                        plan.m,
                        plan.n,
                        k,
                        &fv[f0..],
                        plan.ld_first,
                        &sv[s0..],
                        plan.ld_second,
                        &mut cv[c.offset as usize..],
                        plan.ldc,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|p| {
                                    av[(a.offset + i * a.rs + p * a.cs) as usize]
                                        * bv[(b.offset + p * b.rs + j * b.cs) as usize]
                                })
                                .sum();
                            let got = cv[(c.offset + i * c.rs + j * c.cs) as usize];
                            assert_eq!(
                                got, want,
                                "m {m} n {n} k {k} layout {lay} pad {pad} at ({i}, {j}): {plan:?}"
                            );
                        }
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 96);
    }

    #[test]
    fn an_operand_with_no_unit_stride_is_refused() {
        let e = plan_gemm(3, 4, 5, mat(0, 10, 2), mat(0, 4, 1), mat(0, 4, 1), [0, 0, 0]).unwrap_err();
        assert_eq!(e, "an operand with no unit stride");
        let e = plan_gemm(3, 4, 5, mat(0, 5, 1), mat(0, 4, 1), mat(0, 8, 2), [0, 0, 0]).unwrap_err();
        assert_eq!(e, "an output [3, 4] with strides (8, 2) (neither is 1)");
    }
}

//! The CPU backend's code generator: loop IR to LLVM IR through `inkwell`, optimised at O3 and JIT-compiled
//! for the host CPU (cargo feature `llvm`).
//!
//! Every [`Phase`] of every kernel code becomes one function
//! `void phase(ptr slots, ptr params, i64 lo, i64 hi, ptr err)` running items `lo..hi` of its grid (the runtime
//! calls it from several threads on disjoint ranges). `slots[i]` is the base of argument slot `i`, `params`
//! the kernel's parameters at the bound symbols; a failed [`Expr::Checked`] leaves `err[0] = check + 1` and
//! `err[1] = the value`. Loads and stores carry scoped `noalias` metadata per slot (the slots of one kernel
//! never overlap: the buffer plan keeps a kernel's outputs apart from its inputs), so LLVM hoists invariant
//! loads and vectorises without run-time alias checks.
//!
//! Floats compute in f32 (loads widen bf16/f16, stores round to nearest even), integers in i64. `exp` (and so
//! `sigmoid`, `silu`) is an inline polynomial so that loops using it vectorise; `log`, `tanh`, `sin`, `cos`,
//! `pow` call the C library's `f32` functions. Reductions are reassociable (`reassoc` on their updates), as
//! every parallel reduction is; nothing else is: no contraction, no approximate functions.
//!
//! The GEMM micro-kernel ([`gemm_geometry`]) is generated here too, for the host's vector width: an
//! `MR × NR` tile of `C` kept in registers, `NR` two vectors wide, `MR` broadcasts of `A` per step of `k`.

use crate::loops::{Acc, Expr, Logic, LoopKernel, Phase, Scalar, Step, Stmt, Table, E};
use crate::CodegenError;
use fulgur_ir::{BinaryOp, CmpOp, DType, UnaryOp};
use inkwell::attributes::AttributeLoc;
use inkwell::basic_block::BasicBlock;
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, InitializationConfig, RelocMode, Target, TargetMachine};
use inkwell::types::{BasicType, BasicTypeEnum, FloatType, IntType, VectorType};
use inkwell::values::{
    AnyValue, BasicMetadataValueEnum, BasicValue, BasicValueEnum, FastMathFlags, FloatValue, FunctionValue,
    InstructionValue, IntValue, MetadataValue, PointerValue,
};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate, OptimizationLevel};
use std::collections::{HashMap, HashSet};
use std::mem::ManuallyDrop;
use std::time::Instant;

/// A compiled phase: `(slots, params, lo, hi, err)`.
pub type PhaseFn = unsafe extern "C" fn(*const *mut u8, *const i64, i64, i64, *mut i64);

/// The GEMM micro-kernel: `(kc, a_packed, b_packed, c, ldc, accumulate)` computes the `MR × NR` tile
/// `C (+)= Ap · Bp` where `Ap` holds `kc` columns of `MR` values and `Bp` `kc` rows of `NR` values; `C` is
/// row-major with leading dimension `ldc` (in floats).
pub type MicroKernel = unsafe extern "C" fn(i64, *const f32, *const f32, *mut f32, i64, i64);

/// The register tile of the GEMM micro-kernel for the host: `(MR, NR, vector width)`.
pub fn gemm_geometry(features: &str) -> (usize, usize, usize) {
    if features.contains("+avx512f") {
        (12, 32, 16)
    } else if features.contains("+avx2") || features.contains("+avx") {
        (6, 16, 8)
    } else {
        (4, 8, 4)
    }
}

/// The host CPU as LLVM names it, and its features.
pub fn host_cpu() -> (String, String) {
    let _ = Target::initialize_native(&InitializationConfig::default());
    (
        TargetMachine::get_host_cpu_name().to_string(),
        TargetMachine::get_host_cpu_features().to_string(),
    )
}

/// The LLVM version this build links.
pub fn llvm_version() -> String {
    let (a, b, c) = inkwell::support::get_llvm_version();
    format!("{a}.{b}.{c}")
}

/// Code generation options.
#[derive(Clone, Debug)]
pub struct LlvmOptions {
    /// LLVM's optimisation pipeline level (0 to 3).
    pub opt_level: u8,
    /// Keep the LLVM IR text of every function as emitted (before optimisation).
    pub keep_ir: bool,
    /// Write the whole module after optimisation to this file (for looking at what LLVM made of it).
    pub dump_optimized: Option<std::path::PathBuf>,
}

impl Default for LlvmOptions {
    fn default() -> LlvmOptions {
        LlvmOptions {
            opt_level: 3,
            keep_ir: false,
            dump_optimized: std::env::var_os("FULGUR_LLVM_DUMP").map(std::path::PathBuf::from),
        }
    }
}

/// JIT-compiled code of a kernel program.
pub struct JitProgram {
    engine: ManuallyDrop<ExecutionEngine<'static>>,
    context: ManuallyDrop<Box<Context>>,
    /// `phases[code][step]`: the function of each phase step (`None` for GEMM steps).
    pub phases: Vec<Vec<Option<PhaseFn>>>,
    pub micro_kernel: MicroKernel,
    /// `(MR, NR)` of the micro-kernel.
    pub tile: (usize, usize),
    /// Micro-kernels of 1 and 4 rows (the same `NR`), for products of a few rows (a decode step's): the full
    /// tile would compute padding rows.
    pub short_kernels: Vec<(usize, MicroKernel)>,
    /// The IR of each code as emitted (with [`LlvmOptions::keep_ir`]).
    pub ir: Vec<String>,
    /// Seconds spent emitting, optimising and compiling.
    pub emit_seconds: f64,
    pub optimize_seconds: f64,
    pub codegen_seconds: f64,
    pub cpu: String,
}

// The engine and context are only touched again when dropped; the compiled functions are plain code.
unsafe impl Send for JitProgram {}
unsafe impl Sync for JitProgram {}

impl Drop for JitProgram {
    fn drop(&mut self) {
        // SAFETY: the engine (and the module it owns) must go before the context they borrow
        unsafe {
            ManuallyDrop::drop(&mut self.engine);
            ManuallyDrop::drop(&mut self.context);
        }
    }
}

fn err(m: impl std::fmt::Display) -> CodegenError {
    CodegenError::Options(format!("LLVM: {m}"))
}

extern "C" fn fulgur_logf(x: f32) -> f32 {
    x.ln()
}
extern "C" fn fulgur_sinf(x: f32) -> f32 {
    x.sin()
}
extern "C" fn fulgur_cosf(x: f32) -> f32 {
    x.cos()
}
extern "C" fn fulgur_tanhf(x: f32) -> f32 {
    x.tanh()
}
extern "C" fn fulgur_powf(x: f32, y: f32) -> f32 {
    x.powf(y)
}

/// The name of the function of step `s` of code `c`.
pub fn phase_name(code: usize, step: usize) -> String {
    format!("k{code}_s{step}")
}

/// Emits the LLVM IR of every kernel code as text (one module), for artifacts and inspection.
pub fn emit_text(kernels: &[LoopKernel]) -> Result<Vec<String>, CodegenError> {
    let (cpu, features) = host_cpu();
    let ctx = Context::create();
    let m = ctx.create_module("fulgur");
    let mut cg = Codegen::new(&ctx, &m, &cpu, &features);
    let mut out = Vec::with_capacity(kernels.len());
    for (c, lk) in kernels.iter().enumerate() {
        let fns = cg.kernel(c, lk)?;
        out.push(
            fns.iter()
                .map(|f| f.print_to_string().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    Ok(out)
}

/// Emits, optimises and JIT-compiles every kernel code (and the GEMM micro-kernel) for the host CPU.
pub fn compile(kernels: &[LoopKernel], opts: &LlvmOptions) -> Result<JitProgram, CodegenError> {
    let t0 = Instant::now();
    let (cpu, features) = host_cpu();
    let context = Box::new(Context::create());
    // SAFETY: the context is boxed (its address is stable) and outlives the engine (see `Drop`)
    let ctx: &'static Context = unsafe { &*(context.as_ref() as *const Context) };
    let m = ctx.create_module("fulgur");
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(err)?;
    let level = match opts.opt_level {
        0 => OptimizationLevel::None,
        1 => OptimizationLevel::Less,
        2 => OptimizationLevel::Default,
        _ => OptimizationLevel::Aggressive,
    };
    let tm = target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            level,
            RelocMode::Default,
            CodeModel::JITDefault,
        )
        .ok_or_else(|| err("no target machine for the host"))?;
    m.set_triple(&triple);
    m.set_data_layout(&tm.get_target_data().get_data_layout());
    let mut cg = Codegen::new(ctx, &m, &cpu, &features);
    let mut names: Vec<Vec<Option<String>>> = Vec::with_capacity(kernels.len());
    let mut ir = Vec::new();
    for (c, lk) in kernels.iter().enumerate() {
        let fns = cg.kernel(c, lk)?;
        if opts.keep_ir {
            ir.push(
                fns.iter()
                    .map(|f| f.print_to_string().to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        names.push(
            lk.steps
                .iter()
                .enumerate()
                .map(|(s, st)| matches!(st, Step::Phase(_)).then(|| phase_name(c, s)))
                .collect(),
        );
    }
    let (mr, nr, vw) = gemm_geometry(&features);
    cg.micro_kernel("fulgur_ukr", mr, nr, vw)?;
    let short_rows: Vec<usize> = [1usize, 4].into_iter().filter(|&r| r < mr).collect();
    for &r in &short_rows {
        cg.micro_kernel(&format!("fulgur_ukr_m{r}"), r, nr, vw)?;
    }
    let libm = cg.libm.clone();
    drop(cg);
    m.verify()
        .map_err(|e| err(format!("the emitted module does not verify: {e}")))?;
    let emit_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    if opts.opt_level > 0 {
        let po = PassBuilderOptions::create();
        po.set_loop_vectorization(true);
        po.set_loop_slp_vectorization(true);
        po.set_loop_unrolling(true);
        po.set_loop_interleaving(true);
        m.run_passes(&format!("default<O{}>", opts.opt_level.min(3)), &tm, po)
            .map_err(err)?;
    }
    let optimize_seconds = t1.elapsed().as_secs_f64();
    if let Some(dir) = &opts.dump_optimized {
        let _ = std::fs::write(dir, m.print_to_string().to_string());
    }
    let t2 = Instant::now();
    let engine = m.create_jit_execution_engine(level).map_err(err)?;
    for (name, f) in libm {
        let addr = match name.as_str() {
            "fulgur_logf" => fulgur_logf as *const () as usize,
            "fulgur_sinf" => fulgur_sinf as *const () as usize,
            "fulgur_cosf" => fulgur_cosf as *const () as usize,
            "fulgur_tanhf" => fulgur_tanhf as *const () as usize,
            _ => fulgur_powf as *const () as usize,
        };
        engine.add_global_mapping(&f, addr);
    }
    let mut phases = Vec::with_capacity(names.len());
    for code in &names {
        let mut v = Vec::with_capacity(code.len());
        for n in code {
            v.push(match n {
                Some(n) => {
                    let addr = engine
                        .get_function_address(n)
                        .map_err(|e| err(format!("function {n}: {e:?}")))?;
                    // SAFETY: emitted with exactly this signature
                    Some(unsafe { std::mem::transmute::<usize, PhaseFn>(addr) })
                }
                None => None,
            });
        }
        phases.push(v);
    }
    let addr = engine
        .get_function_address("fulgur_ukr")
        .map_err(|e| err(format!("micro-kernel: {e:?}")))?;
    // SAFETY: emitted with exactly this signature
    let micro_kernel = unsafe { std::mem::transmute::<usize, MicroKernel>(addr) };
    let mut short_kernels = Vec::new();
    for &r in &short_rows {
        let addr = engine
            .get_function_address(&format!("fulgur_ukr_m{r}"))
            .map_err(|e| err(format!("micro-kernel of {r} rows: {e:?}")))?;
        // SAFETY: as above
        short_kernels.push((r, unsafe { std::mem::transmute::<usize, MicroKernel>(addr) }));
    }
    let codegen_seconds = t2.elapsed().as_secs_f64();
    Ok(JitProgram {
        engine: ManuallyDrop::new(engine),
        context: ManuallyDrop::new(context),
        phases,
        micro_kernel,
        tile: (mr, nr),
        short_kernels,
        ir,
        emit_seconds,
        optimize_seconds,
        codegen_seconds,
        cpu,
    })
}

/// Module-wide state: types, helper functions, alias scopes.
struct Codegen<'a, 'ctx> {
    ctx: &'ctx Context,
    m: &'a Module<'ctx>,
    f32t: FloatType<'ctx>,
    i64t: IntType<'ctx>,
    cpu: String,
    features: String,
    expf: Option<FunctionValue<'ctx>>,
    libm: Vec<(String, FunctionValue<'ctx>)>,
    /// Per slot: its scope list and the list of every other slot's scope.
    scopes: Vec<(MetadataValue<'ctx>, MetadataValue<'ctx>)>,
    domain: MetadataValue<'ctx>,
    scope_nodes: Vec<MetadataValue<'ctx>>,
}

impl<'a, 'ctx> Codegen<'a, 'ctx> {
    fn new(ctx: &'ctx Context, m: &'a Module<'ctx>, cpu: &str, features: &str) -> Self {
        let domain = ctx.metadata_node(&[ctx.metadata_string("fulgur slots").into()]);
        Codegen {
            ctx,
            m,
            f32t: ctx.f32_type(),
            i64t: ctx.i64_type(),
            cpu: cpu.to_string(),
            features: features.to_string(),
            expf: None,
            libm: Vec::new(),
            scopes: Vec::new(),
            domain,
            scope_nodes: Vec::new(),
        }
    }

    /// Alias metadata for `n` slots: each slot its own scope, not aliasing any other.
    fn ensure_scopes(&mut self, n: usize) {
        if self.scope_nodes.len() >= n {
            return;
        }
        while self.scope_nodes.len() < n.max(1) {
            let i = self.scope_nodes.len();
            let s = self.ctx.metadata_node(&[
                self.ctx.metadata_string(&format!("slot {i}")).into(),
                self.domain.into(),
            ]);
            self.scope_nodes.push(s);
        }
        self.scopes.clear();
        for i in 0..self.scope_nodes.len() {
            let own = self.ctx.metadata_node(&[self.scope_nodes[i].into()]);
            let others: Vec<BasicMetadataValueEnum> = self
                .scope_nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, s)| (*s).into())
                .collect();
            let other = self.ctx.metadata_node(&others);
            self.scopes.push((own, other));
        }
    }

    fn set_target(&self, f: FunctionValue<'ctx>) {
        f.add_attribute(
            AttributeLoc::Function,
            self.ctx.create_string_attribute("target-cpu", &self.cpu),
        );
        f.add_attribute(
            AttributeLoc::Function,
            self.ctx.create_string_attribute("target-features", &self.features),
        );
        // LLVM prefers 256-bit vectors on AVX-512 CPUs (for fear of down-clocking); the GEMM micro-kernel runs
        // 512-bit FMAs anyway, so the phases use the full width too
        if self.features.contains("+avx512f") {
            f.add_attribute(
                AttributeLoc::Function,
                self.ctx.create_string_attribute("prefer-vector-width", "512"),
            );
        }
        let nounwind = inkwell::attributes::Attribute::get_named_enum_kind_id("nounwind");
        f.add_attribute(AttributeLoc::Function, self.ctx.create_enum_attribute(nounwind, 0));
    }

    fn libm_fn(&mut self, name: &str, args: usize) -> FunctionValue<'ctx> {
        if let Some((_, f)) = self.libm.iter().find(|(n, _)| n == name) {
            return *f;
        }
        let params: Vec<inkwell::types::BasicMetadataTypeEnum> = (0..args).map(|_| self.f32t.into()).collect();
        let f = self
            .m
            .add_function(name, self.f32t.fn_type(&params, false), Some(Linkage::External));
        self.libm.push((name.to_string(), f));
        f
    }

    /// `expf` as an inline polynomial (Cody–Waite reduction, degree-6 minimax; within 2 ulp, exact at ±inf and
    /// NaN, gradual underflow), so that loops calling it vectorise.
    fn expf(&mut self) -> Result<FunctionValue<'ctx>, CodegenError> {
        if let Some(f) = self.expf {
            return Ok(f);
        }
        let ctx = self.ctx;
        let f32t = self.f32t;
        let i32t = ctx.i32_type();
        let f = self.m.add_function(
            "fulgur_expf",
            f32t.fn_type(&[f32t.into()], false),
            Some(Linkage::Internal),
        );
        self.set_target(f);
        let inline = inkwell::attributes::Attribute::get_named_enum_kind_id("alwaysinline");
        f.add_attribute(AttributeLoc::Function, ctx.create_enum_attribute(inline, 0));
        let b = ctx.create_builder();
        let bb = ctx.append_basic_block(f, "entry");
        b.position_at_end(bb);
        let x = f.get_nth_param(0).expect("one parameter").into_float_value();
        let c = |v: f32| f32t.const_float(v as f64);
        let fma = Intrinsic::find("llvm.fma")
            .and_then(|i| i.get_declaration(self.m, &[f32t.into()]))
            .ok_or_else(|| err("llvm.fma"))?;
        let rint = Intrinsic::find("llvm.rint")
            .and_then(|i| i.get_declaration(self.m, &[f32t.into()]))
            .ok_or_else(|| err("llvm.rint"))?;
        let call1 = |fv: FunctionValue<'ctx>, a: FloatValue<'ctx>| -> Result<FloatValue<'ctx>, CodegenError> {
            Ok(b.build_call(fv, &[a.into()], "")
                .map_err(err)?
                .try_as_basic_value()
                .basic()
                .ok_or_else(|| err("call"))?
                .into_float_value())
        };
        let call3 = |a: FloatValue<'ctx>,
                     bb: FloatValue<'ctx>,
                     cc: FloatValue<'ctx>|
         -> Result<FloatValue<'ctx>, CodegenError> {
            Ok(b.build_call(fma, &[a.into(), bb.into(), cc.into()], "")
                .map_err(err)?
                .try_as_basic_value()
                .basic()
                .ok_or_else(|| err("call"))?
                .into_float_value())
        };
        let e = |r: Result<FloatValue<'ctx>, inkwell::builder::BuilderError>| r.map_err(err);
        // keep n in range; the result is fixed up for out-of-range x at the end. Below the underflow threshold
        // (a causal mask's −inf) the polynomial runs on 0 instead of a clamped −104: its 2^n scaling would
        // produce a subnormal, which x86 computes in a microcode assist (half of a causal attention's
        // probabilities took that path; `flash_attention_grad` on tiny-hf's shapes 77 → 40 ms on the CPU)
        let under_x = c(-103.972_08);
        let hi = c(89.0);
        let xc = b
            .build_select(
                b.build_float_compare(FloatPredicate::OLT, x, under_x, "")
                    .map_err(err)?,
                c(0.0),
                x,
                "",
            )
            .map_err(err)?
            .into_float_value();
        let xc = b
            .build_select(
                b.build_float_compare(FloatPredicate::OGT, xc, hi, "").map_err(err)?,
                hi,
                xc,
                "",
            )
            .map_err(err)?
            .into_float_value();
        let t = e(b.build_float_mul(xc, c(std::f32::consts::LOG2_E), ""))?;
        let n = call1(rint, t)?;
        // r = x − n·ln2 (two parts)
        let r = call3(n, c(-0.693_359_4), xc)?;
        let r = call3(n, c(2.121_944_4e-4), r)?;
        let mut p = c(1.987_569_1e-4);
        for k in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = call3(p, r, c(k))?;
        }
        let r2 = e(b.build_float_mul(r, r, ""))?;
        let p = call3(p, r2, r)?;
        let p = e(b.build_float_add(p, c(1.0), ""))?;
        // 2^n as two factors 2^(n/2) · 2^(n − n/2), each a normal float
        let ni = b.build_float_to_signed_int(n, i32t, "").map_err(err)?;
        let n1 = b
            .build_right_shift(ni, i32t.const_int(1, false), true, "")
            .map_err(err)?;
        let n2 = b.build_int_sub(ni, n1, "").map_err(err)?;
        let pow2 = |k: IntValue<'ctx>| -> Result<FloatValue<'ctx>, CodegenError> {
            let biased = b.build_int_add(k, i32t.const_int(127, false), "").map_err(err)?;
            let bits = b.build_left_shift(biased, i32t.const_int(23, false), "").map_err(err)?;
            Ok(b.build_bit_cast(bits, f32t, "").map_err(err)?.into_float_value())
        };
        let y = e(b.build_float_mul(p, pow2(n1)?, ""))?;
        let y = e(b.build_float_mul(y, pow2(n2)?, ""))?;
        let over = b
            .build_float_compare(FloatPredicate::OGT, x, c(88.722_84), "")
            .map_err(err)?;
        let under = b
            .build_float_compare(FloatPredicate::OLT, x, c(-103.972_08), "")
            .map_err(err)?;
        let y = b.build_select(over, c(f32::INFINITY), y, "").map_err(err)?;
        let y = b.build_select(under, c(0.0), y.into_float_value(), "").map_err(err)?;
        // NaN in, NaN out
        let nan = b.build_float_compare(FloatPredicate::UNO, x, x, "").map_err(err)?;
        let y = b.build_select(nan, x, y.into_float_value(), "").map_err(err)?;
        b.build_return(Some(&y)).map_err(err)?;
        self.expf = Some(f);
        Ok(f)
    }

    /// Emits every phase of kernel code `code`; returns the functions.
    fn kernel(&mut self, code: usize, lk: &LoopKernel) -> Result<Vec<FunctionValue<'ctx>>, CodegenError> {
        self.ensure_scopes(lk.slots.len());
        let tables: Vec<PointerValue<'ctx>> = lk
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (ty, init): (BasicTypeEnum, BasicValueEnum) = match t {
                    Table::F32(v) => {
                        let vals: Vec<FloatValue> = v.iter().map(|&x| self.f32t.const_float(x as f64)).collect();
                        (
                            self.f32t.array_type(v.len() as u32).into(),
                            self.f32t.const_array(&vals).into(),
                        )
                    }
                    Table::I64(v) => {
                        let vals: Vec<IntValue> = v.iter().map(|&x| self.i64t.const_int(x as u64, true)).collect();
                        (
                            self.i64t.array_type(v.len() as u32).into(),
                            self.i64t.const_array(&vals).into(),
                        )
                    }
                };
                let g = self.m.add_global(ty, None, &format!("k{code}_t{i}"));
                g.set_initializer(&init);
                g.set_constant(true);
                g.set_linkage(Linkage::Private);
                g.as_pointer_value()
            })
            .collect();
        let mut fns = Vec::new();
        for (s, step) in lk.steps.iter().enumerate() {
            if let Step::Phase(p) = step {
                let f = self.phase(&phase_name(code, s), lk, p, &tables)?;
                fns.push(f);
            }
        }
        Ok(fns)
    }

    fn phase(
        &mut self,
        name: &str,
        lk: &LoopKernel,
        p: &Phase,
        tables: &[PointerValue<'ctx>],
    ) -> Result<FunctionValue<'ctx>, CodegenError> {
        let ctx = self.ctx;
        let ptr = ctx.ptr_type(AddressSpace::default());
        let fty = ctx.void_type().fn_type(
            &[ptr.into(), ptr.into(), self.i64t.into(), self.i64t.into(), ptr.into()],
            false,
        );
        let f = self.m.add_function(name, fty, None);
        self.set_target(f);
        let noalias = inkwell::attributes::Attribute::get_named_enum_kind_id("noalias");
        for i in [0u32, 1, 4] {
            f.add_attribute(AttributeLoc::Param(i), ctx.create_enum_attribute(noalias, 0));
        }
        let b = ctx.create_builder();
        let entry = ctx.append_basic_block(f, "entry");
        b.position_at_end(entry);
        // slots written in this phase: loads from them are not invariant
        let mut stored = HashSet::new();
        collect_stores(&p.body, &mut stored);
        let mut unstable = vec![false; lk.pool.len()];
        for e in 0..lk.pool.len() {
            unstable[e] = match lk.pool.get(e as E) {
                Expr::Get(_) | Expr::LoadLocal { .. } => true,
                Expr::Load { arg, index, .. } => stored.contains(arg) || unstable[*index as usize],
                x => children(x).iter().any(|&c| unstable[c as usize]),
            };
        }
        let slots_p = f.get_nth_param(0).expect("param").into_pointer_value();
        let params_p = f.get_nth_param(1).expect("param").into_pointer_value();
        let lo = f.get_nth_param(2).expect("param").into_int_value();
        let hi = f.get_nth_param(3).expect("param").into_int_value();
        let err_p = f.get_nth_param(4).expect("param").into_pointer_value();
        let mut slots = Vec::with_capacity(lk.slots.len());
        for i in 0..lk.slots.len() {
            let at = unsafe {
                b.build_in_bounds_gep(ptr, slots_p, &[self.i64t.const_int(i as u64, false)], "")
                    .map_err(err)?
            };
            slots.push(
                b.build_load(ptr, at, &format!("slot{i}"))
                    .map_err(err)?
                    .into_pointer_value(),
            );
        }
        let mut params = Vec::with_capacity(lk.params.len());
        for i in 0..lk.params.len() {
            let at = unsafe {
                b.build_in_bounds_gep(self.i64t, params_p, &[self.i64t.const_int(i as u64, false)], "")
                    .map_err(err)?
            };
            params.push(
                b.build_load(self.i64t, at, &format!("p{i}"))
                    .map_err(err)?
                    .into_int_value(),
            );
        }
        let mut mutables = HashMap::new();
        let (used, used_locals) = collect_state(&p.body, &lk.pool);
        for v in used {
            let ty = basic(ctx, lk.vars[v as usize].ty);
            mutables.insert(v, b.build_alloca(ty, &format!("m{v}")).map_err(err)?);
        }
        let mut locals = HashMap::new();
        for l in used_locals {
            let decl = lk.locals[l as usize];
            let ty = local_type(ctx, decl.ty).array_type(decl.len as u32);
            let a = b.build_alloca(ty, &format!("l{l}")).map_err(err)?;
            a.as_instruction()
                .map(|i| i.set_alignment(64))
                .transpose()
                .map_err(|e| err(format!("{e:?}")))?;
            locals.insert(l, a);
        }
        let err_code = b.build_alloca(self.i64t, "err_code").map_err(err)?;
        let err_val = b.build_alloca(self.i64t, "err_val").map_err(err)?;
        b.build_store(err_code, self.i64t.const_zero()).map_err(err)?;
        b.build_store(err_val, self.i64t.const_zero()).map_err(err)?;
        let expf = if uses_exp(&lk.pool) { Some(self.expf()?) } else { None };
        let mut libm = HashMap::new();
        for (u, nm, n) in [
            (UnaryOp::Log, "fulgur_logf", 1),
            (UnaryOp::Sin, "fulgur_sinf", 1),
            (UnaryOp::Cos, "fulgur_cosf", 1),
            (UnaryOp::Tanh, "fulgur_tanhf", 1),
        ] {
            if (0..lk.pool.len()).any(|e| matches!(lk.pool.get(e as E), Expr::Un(x, _) if *x == u)) {
                libm.insert(nm, self.libm_fn(nm, n));
            }
        }
        if (0..lk.pool.len()).any(|e| matches!(lk.pool.get(e as E), Expr::Bin(BinaryOp::Pow, _, _))) {
            libm.insert("fulgur_powf", self.libm_fn("fulgur_powf", 2));
        }
        let alias_kinds = (ctx.get_kind_id("alias.scope"), ctx.get_kind_id("noalias"));
        let mut fe = FnEmitter {
            ctx,
            m: self.m,
            b: &b,
            f,
            lk,
            slots,
            params,
            vars: HashMap::new(),
            mutables,
            locals,
            tables: tables.to_vec(),
            cache: vec![HashMap::new()],
            epoch: 0,
            unstable,
            err_code,
            err_val,
            expf,
            libm,
            scopes: self.scopes.clone(),
            alias_kinds,
            f32t: self.f32t,
            i64t: self.i64t,
        };
        // for item in lo..hi
        let item_loop = vec![Stmt::For {
            var: p.item,
            lo: u32::MAX,
            hi: u32::MAX,
            body: p.body.clone(),
        }];
        fe.stmts_with_bounds(&item_loop, lo, hi)?;
        // report a failed check
        let code = b.build_load(self.i64t, err_code, "").map_err(err)?.into_int_value();
        let failed = b
            .build_int_compare(IntPredicate::NE, code, self.i64t.const_zero(), "")
            .map_err(err)?;
        let report = ctx.append_basic_block(f, "report");
        let done = ctx.append_basic_block(f, "done");
        b.build_conditional_branch(failed, report, done).map_err(err)?;
        b.position_at_end(report);
        let val = b.build_load(self.i64t, err_val, "").map_err(err)?;
        b.build_store(err_p, code).map_err(err)?;
        let at1 = unsafe {
            b.build_in_bounds_gep(self.i64t, err_p, &[self.i64t.const_int(1, false)], "")
                .map_err(err)?
        };
        b.build_store(at1, val).map_err(err)?;
        b.build_unconditional_branch(done).map_err(err)?;
        b.position_at_end(done);
        b.build_return(None).map_err(err)?;
        Ok(f)
    }

    /// A micro-kernel `name` for an `mr × nr` tile, `vw` floats per vector.
    fn micro_kernel(&mut self, name: &str, mr: usize, nr: usize, vw: usize) -> Result<(), CodegenError> {
        let ctx = self.ctx;
        let ptr = ctx.ptr_type(AddressSpace::default());
        let i64t = self.i64t;
        let f32t = self.f32t;
        let fty = ctx.void_type().fn_type(
            &[
                i64t.into(),
                ptr.into(),
                ptr.into(),
                ptr.into(),
                i64t.into(),
                i64t.into(),
            ],
            false,
        );
        let f = self.m.add_function(name, fty, None);
        self.set_target(f);
        let noalias = inkwell::attributes::Attribute::get_named_enum_kind_id("noalias");
        for i in [1u32, 2, 3] {
            f.add_attribute(AttributeLoc::Param(i), ctx.create_enum_attribute(noalias, 0));
        }
        let vt: VectorType = f32t.vec_type(vw as u32);
        let nv = nr / vw;
        let fma = Intrinsic::find("llvm.fma")
            .and_then(|i| i.get_declaration(self.m, &[vt.into()]))
            .ok_or_else(|| err("llvm.fma"))?;
        let b = ctx.create_builder();
        let entry = ctx.append_basic_block(f, "entry");
        let body = ctx.append_basic_block(f, "k");
        let store = ctx.append_basic_block(f, "store");
        b.position_at_end(entry);
        let kc = f.get_nth_param(0).expect("param").into_int_value();
        let ap = f.get_nth_param(1).expect("param").into_pointer_value();
        let bp = f.get_nth_param(2).expect("param").into_pointer_value();
        let cp = f.get_nth_param(3).expect("param").into_pointer_value();
        let ldc = f.get_nth_param(4).expect("param").into_int_value();
        let accumulate = f.get_nth_param(5).expect("param").into_int_value();
        let zero = vt.const_zero();
        let has = b
            .build_int_compare(IntPredicate::SGT, kc, i64t.const_zero(), "")
            .map_err(err)?;
        b.build_conditional_branch(has, body, store).map_err(err)?;
        b.position_at_end(body);
        let kphi = b.build_phi(i64t, "kk").map_err(err)?;
        kphi.add_incoming(&[(&i64t.const_zero(), entry)]);
        let mut accs = Vec::with_capacity(mr * nv);
        for _ in 0..mr * nv {
            let phi = b.build_phi(vt, "acc").map_err(err)?;
            phi.add_incoming(&[(&zero, entry)]);
            accs.push(phi);
        }
        let kv = kphi.as_basic_value().into_int_value();
        let boff = b.build_int_mul(kv, i64t.const_int(nr as u64, false), "").map_err(err)?;
        let mut bvec = Vec::with_capacity(nv);
        for h in 0..nv {
            let o = b
                .build_int_add(boff, i64t.const_int((h * vw) as u64, false), "")
                .map_err(err)?;
            let at = unsafe { b.build_in_bounds_gep(f32t, bp, &[o], "").map_err(err)? };
            let l = b.build_load(vt, at, "b").map_err(err)?;
            set_align(l, 4)?;
            bvec.push(l.into_vector_value());
        }
        let aoff = b.build_int_mul(kv, i64t.const_int(mr as u64, false), "").map_err(err)?;
        let mut next = Vec::with_capacity(mr * nv);
        for i in 0..mr {
            let o = b
                .build_int_add(aoff, i64t.const_int(i as u64, false), "")
                .map_err(err)?;
            let at = unsafe { b.build_in_bounds_gep(f32t, ap, &[o], "").map_err(err)? };
            let a = b.build_load(f32t, at, "a").map_err(err)?;
            let undef = vt.get_undef();
            let ins = b.build_insert_element(undef, a, i64t.const_zero(), "").map_err(err)?;
            let mask = ctx.i32_type().vec_type(vw as u32).const_zero();
            let splat = b.build_shuffle_vector(ins, undef, mask, "").map_err(err)?;
            for (h, bv) in bvec.iter().enumerate() {
                let acc = accs[i * nv + h].as_basic_value();
                let r = b
                    .build_call(fma, &[splat.into(), (*bv).into(), acc.into()], "")
                    .map_err(err)?
                    .try_as_basic_value()
                    .basic()
                    .ok_or_else(|| err("fma"))?;
                next.push(r);
            }
        }
        let k1 = b.build_int_add(kv, i64t.const_int(1, false), "").map_err(err)?;
        let latch = b.get_insert_block().expect("block");
        kphi.add_incoming(&[(&k1, latch)]);
        for (phi, v) in accs.iter().zip(&next) {
            phi.add_incoming(&[(v as &dyn BasicValue, latch)]);
        }
        let more = b.build_int_compare(IntPredicate::SLT, k1, kc, "").map_err(err)?;
        b.build_conditional_branch(more, body, store).map_err(err)?;
        // store: C (+)= acc
        b.position_at_end(store);
        let mut fin = Vec::with_capacity(mr * nv);
        for nx in next.iter().take(accs.len()) {
            let v = b.build_phi(vt, "").map_err(err)?;
            v.add_incoming(&[(&zero, entry), (nx as &dyn BasicValue, latch)]);
            fin.push(v);
        }
        let add_bb = ctx.append_basic_block(f, "add");
        let set_bb = ctx.append_basic_block(f, "set");
        let end = ctx.append_basic_block(f, "end");
        let acc_flag = b
            .build_int_compare(IntPredicate::NE, accumulate, i64t.const_zero(), "")
            .map_err(err)?;
        b.build_conditional_branch(acc_flag, add_bb, set_bb).map_err(err)?;
        for (bb, add) in [(add_bb, true), (set_bb, false)] {
            b.position_at_end(bb);
            for i in 0..mr {
                let row = b.build_int_mul(i64t.const_int(i as u64, false), ldc, "").map_err(err)?;
                for h in 0..nv {
                    let o = b
                        .build_int_add(row, i64t.const_int((h * vw) as u64, false), "")
                        .map_err(err)?;
                    let at = unsafe { b.build_in_bounds_gep(f32t, cp, &[o], "").map_err(err)? };
                    let mut v = fin[i * nv + h].as_basic_value().into_vector_value();
                    if add {
                        let old = b.build_load(vt, at, "").map_err(err)?;
                        set_align(old, 4)?;
                        v = b.build_float_add(old.into_vector_value(), v, "").map_err(err)?;
                    }
                    let st = b.build_store(at, v).map_err(err)?;
                    st.set_alignment(4).map_err(|e| err(format!("{e:?}")))?;
                }
            }
            b.build_unconditional_branch(end).map_err(err)?;
        }
        b.position_at_end(end);
        b.build_return(None).map_err(err)?;
        Ok(())
    }
}

fn set_align(v: BasicValueEnum, a: u32) -> Result<(), CodegenError> {
    if let Some(i) = v.as_instruction_value() {
        i.set_alignment(a).map_err(|e| err(format!("{e:?}")))?;
    }
    Ok(())
}

fn basic(ctx: &Context, s: Scalar) -> BasicTypeEnum<'_> {
    match s {
        Scalar::F32 => ctx.f32_type().into(),
        Scalar::I64 => ctx.i64_type().into(),
        Scalar::Bool => ctx.bool_type().into(),
    }
}

/// Storage type of a thread-local array's elements (bools as bytes).
fn local_type(ctx: &Context, s: Scalar) -> BasicTypeEnum<'_> {
    match s {
        Scalar::F32 => ctx.f32_type().into(),
        Scalar::I64 => ctx.i64_type().into(),
        Scalar::Bool => ctx.i8_type().into(),
    }
}

fn children(x: &Expr) -> Vec<E> {
    match x {
        Expr::F(_) | Expr::I(_) | Expr::B(_) | Expr::Var(_) | Expr::Param(_) | Expr::Get(_) => vec![],
        Expr::Load { index, .. } | Expr::LoadLocal { index, .. } | Expr::LoadConst { index, .. } => vec![*index],
        Expr::Un(_, a) | Expr::Not(a) | Expr::Cast(_, a) | Expr::Round(_, a) => vec![*a],
        Expr::Bin(_, a, b) | Expr::Rem(a, b) | Expr::Cmp(_, a, b) | Expr::Logic(_, a, b) => vec![*a, *b],
        Expr::Select(c, a, b) | Expr::Cond(c, a, b) => vec![*c, *a, *b],
        Expr::Checked { index, bound, .. } => vec![*index, *bound],
    }
}

fn uses_exp(p: &crate::loops::Pool) -> bool {
    (0..p.len()).any(|e| {
        matches!(
            p.get(e as E),
            Expr::Un(UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Silu, _)
        )
    })
}

fn collect_stores(body: &[Stmt], out: &mut HashSet<u32>) {
    for s in body {
        match s {
            Stmt::For { body, .. } => collect_stores(body, out),
            Stmt::If { then, els, .. } => {
                collect_stores(then, out);
                collect_stores(els, out);
            }
            Stmt::Store { arg, .. } => {
                out.insert(*arg);
            }
            _ => {}
        }
    }
}

fn exprs_of(body: &[Stmt], out: &mut Vec<E>) {
    for s in body {
        match s {
            Stmt::For { lo, hi, body, .. } => {
                out.push(*lo);
                out.push(*hi);
                exprs_of(body, out);
            }
            Stmt::If { cond, then, els } => {
                out.push(*cond);
                exprs_of(then, out);
                exprs_of(els, out);
            }
            Stmt::Store { index, value, .. } | Stmt::StoreLocal { index, value, .. } => {
                out.push(*index);
                out.push(*value);
            }
            Stmt::Set { value, .. } | Stmt::Accumulate { value, .. } => out.push(*value),
        }
    }
}

fn reachable(p: &crate::loops::Pool, roots: Vec<E>) -> Vec<E> {
    let mut seen = HashSet::new();
    let mut stack = roots;
    let mut out = Vec::new();
    while let Some(e) = stack.pop() {
        if e == u32::MAX || !seen.insert(e) {
            continue;
        }
        out.push(e);
        stack.extend(children(p.get(e)));
    }
    out
}

/// The mutable variables and the thread-local arrays a phase body uses (written by its statements or read by
/// its expressions).
fn collect_state(body: &[Stmt], p: &crate::loops::Pool) -> (HashSet<u32>, HashSet<u32>) {
    fn walk(body: &[Stmt], vars: &mut HashSet<u32>, locals: &mut HashSet<u32>) {
        for s in body {
            match s {
                Stmt::For { body, .. } => walk(body, vars, locals),
                Stmt::If { then, els, .. } => {
                    walk(then, vars, locals);
                    walk(els, vars, locals);
                }
                Stmt::Set { var, .. } | Stmt::Accumulate { var, .. } => {
                    vars.insert(*var);
                }
                Stmt::StoreLocal { local, .. } => {
                    locals.insert(*local);
                }
                Stmt::Store { .. } => {}
            }
        }
    }
    let (mut vars, mut locals) = (HashSet::new(), HashSet::new());
    walk(body, &mut vars, &mut locals);
    let mut roots = Vec::new();
    exprs_of(body, &mut roots);
    for e in reachable(p, roots) {
        match p.get(e) {
            Expr::Get(v) => {
                vars.insert(*v);
            }
            Expr::LoadLocal { local, .. } => {
                locals.insert(*local);
            }
            _ => {}
        }
    }
    (vars, locals)
}

/// Emits one function's statements and expressions.
struct FnEmitter<'a, 'b, 'ctx> {
    ctx: &'ctx Context,
    m: &'a Module<'ctx>,
    b: &'b Builder<'ctx>,
    f: FunctionValue<'ctx>,
    lk: &'a LoopKernel,
    slots: Vec<PointerValue<'ctx>>,
    params: Vec<IntValue<'ctx>>,
    vars: HashMap<u32, IntValue<'ctx>>,
    mutables: HashMap<u32, PointerValue<'ctx>>,
    locals: HashMap<u32, PointerValue<'ctx>>,
    tables: Vec<PointerValue<'ctx>>,
    /// Scopes of emitted values: (value, epoch; `u64::MAX` for values valid for the whole scope).
    cache: Vec<HashMap<E, (BasicValueEnum<'ctx>, u64)>>,
    /// Bumped before every statement: values that read mutable state are valid within one statement.
    epoch: u64,
    unstable: Vec<bool>,
    err_code: PointerValue<'ctx>,
    err_val: PointerValue<'ctx>,
    expf: Option<FunctionValue<'ctx>>,
    libm: HashMap<&'static str, FunctionValue<'ctx>>,
    scopes: Vec<(MetadataValue<'ctx>, MetadataValue<'ctx>)>,
    alias_kinds: (u32, u32),
    f32t: FloatType<'ctx>,
    i64t: IntType<'ctx>,
}

type R<T> = Result<T, CodegenError>;

impl<'a, 'b, 'ctx> FnEmitter<'a, 'b, 'ctx> {
    fn block(&self, name: &str) -> BasicBlock<'ctx> {
        self.ctx.append_basic_block(self.f, name)
    }

    fn current(&self) -> BasicBlock<'ctx> {
        self.b.get_insert_block().expect("positioned")
    }

    fn alias(&self, slot: u32, inst: InstructionValue<'ctx>) -> R<()> {
        if let Some((own, other)) = self.scopes.get(slot as usize) {
            inst.set_metadata(*own, self.alias_kinds.0)
                .map_err(|e| err(format!("{e:?}")))?;
            inst.set_metadata(*other, self.alias_kinds.1)
                .map_err(|e| err(format!("{e:?}")))?;
        }
        Ok(())
    }

    fn intrinsic(&self, name: &str, tys: &[BasicTypeEnum<'ctx>]) -> R<FunctionValue<'ctx>> {
        Intrinsic::find(name)
            .and_then(|i| i.get_declaration(self.m, tys))
            .ok_or_else(|| err(format!("intrinsic {name}")))
    }

    fn call(&self, f: FunctionValue<'ctx>, args: &[BasicValueEnum<'ctx>]) -> R<BasicValueEnum<'ctx>> {
        let args: Vec<BasicMetadataValueEnum> = args.iter().map(|a| (*a).into()).collect();
        self.b
            .build_call(f, &args, "")
            .map_err(err)?
            .try_as_basic_value()
            .basic()
            .ok_or_else(|| err("a call without a value"))
    }

    fn stmts_with_bounds(&mut self, body: &[Stmt], lo: IntValue<'ctx>, hi: IntValue<'ctx>) -> R<()> {
        // the phase's item loop, whose bounds are the function's parameters
        if let [Stmt::For { var, body, .. }] = body {
            return self.for_loop(*var, lo, hi, body);
        }
        self.stmts(body)
    }

    fn stmts(&mut self, body: &[Stmt]) -> R<()> {
        let mut i = 0;
        while i < body.len() {
            self.epoch += 1;
            // consecutive stores are simultaneous (`Stmt::Store`): their values first, then the stores
            let run = body[i..].iter().take_while(|s| matches!(s, Stmt::Store { .. })).count();
            if run > 1 {
                let mut stores = Vec::with_capacity(run);
                for st in &body[i..i + run] {
                    if let Stmt::Store {
                        arg,
                        dtype,
                        index,
                        value,
                    } = st
                    {
                        let ix = self.e(*index)?.into_int_value();
                        let v = self.e(*value)?;
                        stores.push((*arg, *dtype, ix, v));
                    }
                }
                for (arg, dtype, ix, v) in stores {
                    self.store(arg, dtype, ix, v)?;
                }
                i += run;
                continue;
            }
            self.stmt(&body[i])?;
            i += 1;
        }
        Ok(())
    }

    fn for_loop(&mut self, var: u32, lo: IntValue<'ctx>, hi: IntValue<'ctx>, body: &[Stmt]) -> R<()> {
        let pre = self.current();
        let head = self.block("loop");
        let exit = self.block("exit");
        let any = self.b.build_int_compare(IntPredicate::SLT, lo, hi, "").map_err(err)?;
        self.b.build_conditional_branch(any, head, exit).map_err(err)?;
        self.b.position_at_end(head);
        let phi = self.b.build_phi(self.i64t, &format!("v{var}")).map_err(err)?;
        phi.add_incoming(&[(&lo, pre)]);
        let iv = phi.as_basic_value().into_int_value();
        self.vars.insert(var, iv);
        self.cache.push(HashMap::new());
        self.stmts(body)?;
        self.cache.pop();
        let next = self
            .b
            .build_int_add(iv, self.i64t.const_int(1, false), "")
            .map_err(err)?;
        let latch = self.current();
        phi.add_incoming(&[(&next, latch)]);
        let more = self.b.build_int_compare(IntPredicate::SLT, next, hi, "").map_err(err)?;
        self.b.build_conditional_branch(more, head, exit).map_err(err)?;
        self.b.position_at_end(exit);
        self.epoch += 1;
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::For { var, lo, hi, body } => {
                let lo = self.e(*lo)?.into_int_value();
                let hi = self.e(*hi)?.into_int_value();
                self.for_loop(*var, lo, hi, body)
            }
            Stmt::If { cond, then, els } => {
                let c = self.e(*cond)?.into_int_value();
                let t = self.block("then");
                let e = self.block("else");
                let join = self.block("join");
                self.b.build_conditional_branch(c, t, e).map_err(err)?;
                for (bb, body) in [(t, then), (e, els)] {
                    self.b.position_at_end(bb);
                    self.cache.push(HashMap::new());
                    self.stmts(body)?;
                    self.cache.pop();
                    self.b.build_unconditional_branch(join).map_err(err)?;
                }
                self.b.position_at_end(join);
                self.epoch += 1;
                Ok(())
            }
            Stmt::Store {
                arg,
                dtype,
                index,
                value,
            } => {
                let i = self.e(*index)?.into_int_value();
                let v = self.e(*value)?;
                self.store(*arg, *dtype, i, v)
            }
            Stmt::StoreLocal { local, index, value } => {
                let i = self.e(*index)?.into_int_value();
                let mut v = self.e(*value)?;
                let decl = self.lk.locals[*local as usize];
                let ty = local_type(self.ctx, decl.ty);
                if decl.ty == Scalar::Bool {
                    v = self
                        .b
                        .build_int_z_extend(v.into_int_value(), self.ctx.i8_type(), "")
                        .map_err(err)?
                        .into();
                }
                let base = self.locals[local];
                let at = unsafe { self.b.build_in_bounds_gep(ty, base, &[i], "").map_err(err)? };
                self.b.build_store(at, v).map_err(err)?;
                Ok(())
            }
            Stmt::Set { var, value } => {
                let v = self.e(*value)?;
                self.b.build_store(self.mutables[var], v).map_err(err)?;
                Ok(())
            }
            Stmt::Accumulate { var, op, value } => {
                let v = self.e(*value)?;
                let ptr = self.mutables[var];
                let ty = basic(self.ctx, self.lk.vars[*var as usize].ty);
                let cur = self.b.build_load(ty, ptr, "").map_err(err)?;
                let r = match (cur, op) {
                    (BasicValueEnum::FloatValue(c), Acc::Add) => {
                        let r = self.b.build_float_add(c, v.into_float_value(), "").map_err(err)?;
                        if let Some(i) = r.as_instruction() {
                            let _ = i.set_fast_math_flags(FastMathFlags::AllowReassoc | FastMathFlags::NoSignedZeros);
                        }
                        r.into()
                    }
                    (BasicValueEnum::FloatValue(c), Acc::Max | Acc::Min) => {
                        let name = if *op == Acc::Max {
                            "llvm.maximum"
                        } else {
                            "llvm.minimum"
                        };
                        let f = self.intrinsic(name, &[self.f32t.into()])?;
                        self.call(f, &[c.into(), v])?
                    }
                    (BasicValueEnum::IntValue(c), Acc::Add) => {
                        self.b.build_int_add(c, v.into_int_value(), "").map_err(err)?.into()
                    }
                    (BasicValueEnum::IntValue(c), _) => {
                        let name = if *op == Acc::Max { "llvm.smax" } else { "llvm.smin" };
                        let f = self.intrinsic(name, &[self.i64t.into()])?;
                        self.call(f, &[c.into(), v])?
                    }
                    _ => return Err(err("accumulate on a value of no number type")),
                };
                self.b.build_store(ptr, r).map_err(err)?;
                Ok(())
            }
        }
    }

    fn store(&mut self, arg: u32, dtype: DType, i: IntValue<'ctx>, v: BasicValueEnum<'ctx>) -> R<()> {
        let ctx = self.ctx;
        let b = self.b;
        let (ty, sv): (BasicTypeEnum, BasicValueEnum) = match dtype {
            DType::F32 => (self.f32t.into(), v),
            DType::BF16 => (ctx.i16_type().into(), self.to_bf16_bits(v.into_float_value())?.into()),
            DType::F16 => (
                ctx.f16_type().into(),
                b.build_float_trunc(v.into_float_value(), ctx.f16_type(), "")
                    .map_err(err)?
                    .into(),
            ),
            DType::I32 => (
                ctx.i32_type().into(),
                b.build_int_truncate(v.into_int_value(), ctx.i32_type(), "")
                    .map_err(err)?
                    .into(),
            ),
            DType::I64 => (self.i64t.into(), v),
            DType::Bool => (
                ctx.i8_type().into(),
                b.build_int_z_extend(v.into_int_value(), ctx.i8_type(), "")
                    .map_err(err)?
                    .into(),
            ),
        };
        let at = unsafe {
            b.build_in_bounds_gep(ty, self.slots[arg as usize], &[i], "")
                .map_err(err)?
        };
        let st = b.build_store(at, sv).map_err(err)?;
        self.alias(arg, st)
    }

    /// f32 → bf16 bits, rounding to nearest even (NaN stays a quiet NaN).
    fn to_bf16_bits(&self, x: FloatValue<'ctx>) -> R<IntValue<'ctx>> {
        let b = self.b;
        let i32t = self.ctx.i32_type();
        let bits = b.build_bit_cast(x, i32t, "").map_err(err)?.into_int_value();
        let lsb = b
            .build_right_shift(bits, i32t.const_int(16, false), false, "")
            .map_err(err)?;
        let lsb = b.build_and(lsb, i32t.const_int(1, false), "").map_err(err)?;
        let bias = b.build_int_add(lsb, i32t.const_int(0x7fff, false), "").map_err(err)?;
        let r = b.build_int_add(bits, bias, "").map_err(err)?;
        let r = b
            .build_right_shift(r, i32t.const_int(16, false), false, "")
            .map_err(err)?;
        let nan = b.build_float_compare(FloatPredicate::UNO, x, x, "").map_err(err)?;
        let q = b
            .build_right_shift(bits, i32t.const_int(16, false), false, "")
            .map_err(err)?;
        let q = b.build_or(q, i32t.const_int(0x40, false), "").map_err(err)?;
        let r = b.build_select(nan, q, r, "").map_err(err)?.into_int_value();
        b.build_int_truncate(r, self.ctx.i16_type(), "").map_err(err)
    }

    fn bf16_bits_to_f32(&self, h: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        let i32t = self.ctx.i32_type();
        let w = self.b.build_int_z_extend(h, i32t, "").map_err(err)?;
        let w = self.b.build_left_shift(w, i32t.const_int(16, false), "").map_err(err)?;
        Ok(self.b.build_bit_cast(w, self.f32t, "").map_err(err)?.into_float_value())
    }

    fn lookup(&self, e: E) -> Option<BasicValueEnum<'ctx>> {
        for scope in self.cache.iter().rev() {
            if let Some(&(v, ep)) = scope.get(&e) {
                if ep == u64::MAX || ep == self.epoch {
                    return Some(v);
                }
            }
        }
        None
    }

    /// The value of expression `e` at the current point.
    fn e(&mut self, e: E) -> R<BasicValueEnum<'ctx>> {
        if let Some(v) = self.lookup(e) {
            return Ok(v);
        }
        let v = self.compute(e)?;
        let ep = if self.unstable[e as usize] {
            self.epoch
        } else {
            u64::MAX
        };
        self.cache.last_mut().expect("a scope").insert(e, (v, ep));
        Ok(v)
    }

    fn fv(&mut self, e: E) -> R<FloatValue<'ctx>> {
        Ok(self.e(e)?.into_float_value())
    }

    fn iv(&mut self, e: E) -> R<IntValue<'ctx>> {
        Ok(self.e(e)?.into_int_value())
    }

    fn compute(&mut self, e: E) -> R<BasicValueEnum<'ctx>> {
        let p = &self.lk.pool;
        let x = p.get(e).clone();
        let b = self.b;
        let ctx = self.ctx;
        Ok(match x {
            Expr::F(bits) => self.f32t.const_float(f32::from_bits(bits) as f64).into(),
            Expr::I(i) => self.i64t.const_int(i as u64, true).into(),
            Expr::B(v) => ctx.bool_type().const_int(u64::from(v), false).into(),
            Expr::Var(v) => (*self
                .vars
                .get(&v)
                .ok_or_else(|| err(format!("loop variable v{v} used outside its loop")))?)
            .into(),
            Expr::Param(i) => self.params[i as usize].into(),
            Expr::Get(v) => {
                let ty = basic(ctx, self.lk.vars[v as usize].ty);
                b.build_load(ty, self.mutables[&v], "").map_err(err)?
            }
            Expr::Load { arg, dtype, index } => {
                let i = self.iv(index)?;
                let ty: BasicTypeEnum = match dtype {
                    DType::F32 => self.f32t.into(),
                    DType::BF16 => ctx.i16_type().into(),
                    DType::F16 => ctx.f16_type().into(),
                    DType::I32 => ctx.i32_type().into(),
                    DType::I64 => self.i64t.into(),
                    DType::Bool => ctx.i8_type().into(),
                };
                let at = unsafe {
                    b.build_in_bounds_gep(ty, self.slots[arg as usize], &[i], "")
                        .map_err(err)?
                };
                let l = b.build_load(ty, at, "").map_err(err)?;
                if let Some(inst) = l.as_instruction_value() {
                    self.alias(arg, inst)?;
                }
                match dtype {
                    DType::F32 | DType::I64 => l,
                    DType::BF16 => self.bf16_bits_to_f32(l.into_int_value())?.into(),
                    DType::F16 => b
                        .build_float_ext(l.into_float_value(), self.f32t, "")
                        .map_err(err)?
                        .into(),
                    DType::I32 => b
                        .build_int_s_extend(l.into_int_value(), self.i64t, "")
                        .map_err(err)?
                        .into(),
                    DType::Bool => b
                        .build_int_compare(IntPredicate::NE, l.into_int_value(), ctx.i8_type().const_zero(), "")
                        .map_err(err)?
                        .into(),
                }
            }
            Expr::LoadLocal { local, index } => {
                let i = self.iv(index)?;
                let decl = self.lk.locals[local as usize];
                let ty = local_type(ctx, decl.ty);
                let at = unsafe { b.build_in_bounds_gep(ty, self.locals[&local], &[i], "").map_err(err)? };
                let l = b.build_load(ty, at, "").map_err(err)?;
                if decl.ty == Scalar::Bool {
                    b.build_int_compare(IntPredicate::NE, l.into_int_value(), ctx.i8_type().const_zero(), "")
                        .map_err(err)?
                        .into()
                } else {
                    l
                }
            }
            Expr::LoadConst { table, index } => {
                let i = self.iv(index)?;
                let ty: BasicTypeEnum = match p.ty(e) {
                    Scalar::F32 => self.f32t.into(),
                    _ => self.i64t.into(),
                };
                let at = unsafe {
                    b.build_in_bounds_gep(ty, self.tables[table as usize], &[i], "")
                        .map_err(err)?
                };
                b.build_load(ty, at, "").map_err(err)?
            }
            Expr::Un(op, a) => {
                let av = self.e(a)?;
                match av {
                    BasicValueEnum::FloatValue(x) => self.unary_f(op, x)?.into(),
                    BasicValueEnum::IntValue(x) => match op {
                        UnaryOp::Neg => b.build_int_neg(x, "").map_err(err)?.into(),
                        UnaryOp::Abs => {
                            let f = self.intrinsic("llvm.abs", &[self.i64t.into()])?;
                            self.call(f, &[x.into(), ctx.bool_type().const_zero().into()])?
                        }
                        _ => return Err(err(format!("`{}` on an integer", op.name()))),
                    },
                    _ => return Err(err("a unary op on a vector")),
                }
            }
            Expr::Bin(op, a, c) => {
                let av = self.e(a)?;
                let cv = self.e(c)?;
                match (av, cv) {
                    (BasicValueEnum::FloatValue(x), BasicValueEnum::FloatValue(y)) => match op {
                        BinaryOp::Add => b.build_float_add(x, y, "").map_err(err)?.into(),
                        BinaryOp::Sub => b.build_float_sub(x, y, "").map_err(err)?.into(),
                        BinaryOp::Mul => b.build_float_mul(x, y, "").map_err(err)?.into(),
                        BinaryOp::Div => b.build_float_div(x, y, "").map_err(err)?.into(),
                        BinaryOp::Max => {
                            let f = self.intrinsic("llvm.maximum", &[self.f32t.into()])?;
                            self.call(f, &[x.into(), y.into()])?
                        }
                        BinaryOp::Min => {
                            let f = self.intrinsic("llvm.minimum", &[self.f32t.into()])?;
                            self.call(f, &[x.into(), y.into()])?
                        }
                        BinaryOp::Pow => {
                            let f = self.libm["fulgur_powf"];
                            self.call(f, &[x.into(), y.into()])?
                        }
                    },
                    (BasicValueEnum::IntValue(x), BasicValueEnum::IntValue(y)) => match op {
                        BinaryOp::Add => b.build_int_add(x, y, "").map_err(err)?.into(),
                        BinaryOp::Sub => b.build_int_sub(x, y, "").map_err(err)?.into(),
                        BinaryOp::Mul => b.build_int_mul(x, y, "").map_err(err)?.into(),
                        BinaryOp::Div => b.build_int_signed_div(x, y, "").map_err(err)?.into(),
                        BinaryOp::Max => {
                            let f = self.intrinsic("llvm.smax", &[self.i64t.into()])?;
                            self.call(f, &[x.into(), y.into()])?
                        }
                        BinaryOp::Min => {
                            let f = self.intrinsic("llvm.smin", &[self.i64t.into()])?;
                            self.call(f, &[x.into(), y.into()])?
                        }
                        BinaryOp::Pow => return Err(err("integer pow")),
                    },
                    _ => return Err(err("binary operands of different types")),
                }
            }
            Expr::Rem(a, c) => {
                let x = self.iv(a)?;
                let y = self.iv(c)?;
                b.build_int_signed_rem(x, y, "").map_err(err)?.into()
            }
            Expr::Cmp(op, a, c) => {
                let av = self.e(a)?;
                let cv = self.e(c)?;
                match (av, cv) {
                    (BasicValueEnum::FloatValue(x), BasicValueEnum::FloatValue(y)) => {
                        let pred = match op {
                            CmpOp::Eq => FloatPredicate::OEQ,
                            CmpOp::Ne => FloatPredicate::UNE,
                            CmpOp::Lt => FloatPredicate::OLT,
                            CmpOp::Le => FloatPredicate::OLE,
                            CmpOp::Gt => FloatPredicate::OGT,
                            CmpOp::Ge => FloatPredicate::OGE,
                        };
                        b.build_float_compare(pred, x, y, "").map_err(err)?.into()
                    }
                    (BasicValueEnum::IntValue(x), BasicValueEnum::IntValue(y)) => {
                        let unsigned = x.get_type().get_bit_width() == 1;
                        let pred = match (op, unsigned) {
                            (CmpOp::Eq, _) => IntPredicate::EQ,
                            (CmpOp::Ne, _) => IntPredicate::NE,
                            (CmpOp::Lt, false) => IntPredicate::SLT,
                            (CmpOp::Le, false) => IntPredicate::SLE,
                            (CmpOp::Gt, false) => IntPredicate::SGT,
                            (CmpOp::Ge, false) => IntPredicate::SGE,
                            (CmpOp::Lt, true) => IntPredicate::ULT,
                            (CmpOp::Le, true) => IntPredicate::ULE,
                            (CmpOp::Gt, true) => IntPredicate::UGT,
                            (CmpOp::Ge, true) => IntPredicate::UGE,
                        };
                        b.build_int_compare(pred, x, y, "").map_err(err)?.into()
                    }
                    _ => return Err(err("compare operands of different types")),
                }
            }
            Expr::Logic(l, a, c) => {
                let x = self.iv(a)?;
                let y = self.iv(c)?;
                match l {
                    Logic::And => b.build_and(x, y, "").map_err(err)?.into(),
                    Logic::Or => b.build_or(x, y, "").map_err(err)?.into(),
                }
            }
            Expr::Not(a) => {
                let x = self.iv(a)?;
                b.build_not(x, "").map_err(err)?.into()
            }
            Expr::Select(c, a, d) => {
                let cv = self.iv(c)?;
                let x = self.e(a)?;
                let y = self.e(d)?;
                b.build_select(cv, x, y, "").map_err(err)?
            }
            Expr::Cond(c, a, d) => {
                let cv = self.iv(c)?;
                let t = self.block("cond.then");
                let f = self.block("cond.else");
                let join = self.block("cond.join");
                b.build_conditional_branch(cv, t, f).map_err(err)?;
                let mut arms = Vec::new();
                for (bb, x) in [(t, a), (f, d)] {
                    b.position_at_end(bb);
                    self.cache.push(HashMap::new());
                    let v = self.e(x)?;
                    self.cache.pop();
                    arms.push((v, self.current()));
                    b.build_unconditional_branch(join).map_err(err)?;
                }
                b.position_at_end(join);
                let phi = b.build_phi(arms[0].0.get_type(), "").map_err(err)?;
                phi.add_incoming(&[(&arms[0].0, arms[0].1), (&arms[1].0, arms[1].1)]);
                phi.as_basic_value()
            }
            Expr::Cast(to, a) => {
                let av = self.e(a)?;
                match (av, to) {
                    (BasicValueEnum::FloatValue(x), Scalar::F32) => x.into(),
                    (BasicValueEnum::FloatValue(x), Scalar::I64) => {
                        let f = self.intrinsic("llvm.fptosi.sat", &[self.i64t.into(), self.f32t.into()])?;
                        self.call(f, &[x.into()])?
                    }
                    (BasicValueEnum::FloatValue(x), Scalar::Bool) => b
                        .build_float_compare(FloatPredicate::UNE, x, self.f32t.const_zero(), "")
                        .map_err(err)?
                        .into(),
                    (BasicValueEnum::IntValue(x), Scalar::F32) => {
                        if x.get_type().get_bit_width() == 1 {
                            b.build_unsigned_int_to_float(x, self.f32t, "").map_err(err)?.into()
                        } else {
                            b.build_signed_int_to_float(x, self.f32t, "").map_err(err)?.into()
                        }
                    }
                    (BasicValueEnum::IntValue(x), Scalar::I64) => {
                        if x.get_type().get_bit_width() == 1 {
                            b.build_int_z_extend(x, self.i64t, "").map_err(err)?.into()
                        } else {
                            x.into()
                        }
                    }
                    (BasicValueEnum::IntValue(x), Scalar::Bool) => {
                        let z = x.get_type().const_zero();
                        b.build_int_compare(IntPredicate::NE, x, z, "").map_err(err)?.into()
                    }
                    _ => return Err(err("a cast of a vector")),
                }
            }
            Expr::Round(d, a) => {
                let x = self.fv(a)?;
                match d {
                    DType::BF16 => {
                        let h = self.to_bf16_bits(x)?;
                        self.bf16_bits_to_f32(h)?.into()
                    }
                    DType::F16 => {
                        let h = b.build_float_trunc(x, ctx.f16_type(), "").map_err(err)?;
                        b.build_float_ext(h, self.f32t, "").map_err(err)?.into()
                    }
                    _ => x.into(),
                }
            }
            Expr::Checked { index, bound, check } => {
                let i = self.iv(index)?;
                let n = self.iv(bound)?;
                // 0 <= i < n as one unsigned compare
                let ok = b.build_int_compare(IntPredicate::ULT, i, n, "").map_err(err)?;
                let code = b.build_load(self.i64t, self.err_code, "").map_err(err)?;
                let c = b
                    .build_select(ok, code, self.i64t.const_int(check as u64 + 1, false).into(), "")
                    .map_err(err)?;
                b.build_store(self.err_code, c).map_err(err)?;
                let old = b.build_load(self.i64t, self.err_val, "").map_err(err)?;
                let v = b.build_select(ok, old, i.into(), "").map_err(err)?;
                b.build_store(self.err_val, v).map_err(err)?;
                b.build_select(ok, i, self.i64t.const_zero(), "").map_err(err)?
            }
        })
    }

    fn unary_f(&mut self, op: UnaryOp, x: FloatValue<'ctx>) -> R<FloatValue<'ctx>> {
        let b = self.b;
        let one = self.f32t.const_float(1.0);
        let exp = |s: &mut Self, v: FloatValue<'ctx>| -> R<FloatValue<'ctx>> {
            let f = s.expf.ok_or_else(|| err("exp without its helper"))?;
            Ok(s.call(f, &[v.into()])?.into_float_value())
        };
        Ok(match op {
            UnaryOp::Neg => b.build_float_neg(x, "").map_err(err)?,
            UnaryOp::Abs => {
                let f = self.intrinsic("llvm.fabs", &[self.f32t.into()])?;
                self.call(f, &[x.into()])?.into_float_value()
            }
            UnaryOp::Exp => exp(self, x)?,
            UnaryOp::Sqrt => {
                let f = self.intrinsic("llvm.sqrt", &[self.f32t.into()])?;
                self.call(f, &[x.into()])?.into_float_value()
            }
            UnaryOp::Rsqrt => {
                let f = self.intrinsic("llvm.sqrt", &[self.f32t.into()])?;
                let s = self.call(f, &[x.into()])?.into_float_value();
                b.build_float_div(one, s, "").map_err(err)?
            }
            UnaryOp::Recip => b.build_float_div(one, x, "").map_err(err)?,
            UnaryOp::Sigmoid | UnaryOp::Silu => {
                let n = b.build_float_neg(x, "").map_err(err)?;
                let e = exp(self, n)?;
                let d = b.build_float_add(one, e, "").map_err(err)?;
                let num = if op == UnaryOp::Silu { x } else { one };
                b.build_float_div(num, d, "").map_err(err)?
            }
            UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Tanh => {
                let name = match op {
                    UnaryOp::Log => "fulgur_logf",
                    UnaryOp::Sin => "fulgur_sinf",
                    UnaryOp::Cos => "fulgur_cosf",
                    _ => "fulgur_tanhf",
                };
                let f = self.libm[name];
                self.call(f, &[x.into()])?.into_float_value()
            }
        })
    }
}

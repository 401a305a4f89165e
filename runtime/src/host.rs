//! Host-side helpers every compiled backend shares: typed bytes from and to host tensors, and the checks of a
//! program's views against its buffer plan.

use crate::RuntimeError;
use fulgur_codegen::program::{KernelProgram, Layout, TensorRef};
use fulgur_ir::{Buffer, DType, Dim, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::collections::HashMap;

fn other(m: impl Into<String>) -> RuntimeError {
    RuntimeError::Other(m.into())
}

/// Writes `t` (converted to `dtype`) as `dtype` bytes into `out`.
pub fn encode_into(t: &Tensor, dtype: DType, out: &mut [u8]) {
    let es = dtype.size_bytes();
    match &t.data {
        Buffer::F(v) => {
            for (i, &x) in v.iter().enumerate() {
                put(dtype, x, x as i64, &mut out[i * es..(i + 1) * es]);
            }
        }
        Buffer::I(v) => {
            for (i, &x) in v.iter().enumerate() {
                put(dtype, x as f64, x, &mut out[i * es..(i + 1) * es]);
            }
        }
        Buffer::B(v) => {
            for (i, &x) in v.iter().enumerate() {
                put(
                    dtype,
                    f64::from(u8::from(x)),
                    i64::from(x),
                    &mut out[i * es..(i + 1) * es],
                );
            }
        }
    }
}

fn put(dtype: DType, f: f64, i: i64, out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(&(f as f32).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16::from_f64(f).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f64(f).to_le_bytes()),
        DType::I32 => out.copy_from_slice(&(i as i32).to_le_bytes()),
        DType::I64 => out.copy_from_slice(&i.to_le_bytes()),
        DType::Bool => out[0] = u8::from(i != 0),
    }
}

/// Reads a strided view of typed memory as a host tensor.
///
/// # Safety
/// `base` must hold every element the view addresses.
pub(crate) unsafe fn decode_view(
    pool: &rayon::ThreadPool,
    base: *const u8,
    dtype: DType,
    shape: &[usize],
    strides: &[i64],
    offset: i64,
) -> Tensor {
    let n: usize = shape.iter().product();
    let es = dtype.size_bytes() as isize;
    // row-major f32 (the usual output): one pass over a slice
    let mut want = 1i64;
    let row_major = shape.iter().zip(strides).rev().all(|(&d, &st)| {
        let ok = d == 1 || st == want;
        want *= d as i64;
        ok
    });
    if dtype == DType::F32 && row_major && n > 0 {
        let src = std::slice::from_raw_parts((base as *const f32).offset(offset as isize), n);
        // a large output (the logits) is converted by every thread: the new pages fault in parallel
        let mut data = vec![0f64; n];
        const CHUNK: usize = 1 << 16;
        if n > 4 * CHUNK {
            pool.install(|| {
                data.par_chunks_mut(CHUNK)
                    .zip(src.par_chunks(CHUNK))
                    .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = s as f64))
            });
        } else {
            data.iter_mut().zip(src).for_each(|(d, &s)| *d = s as f64);
        }
        return Tensor {
            dtype,
            shape: shape.to_vec(),
            data: Buffer::F(data),
        };
    }
    let mut idx = vec![0usize; shape.len()];
    let mut f = Vec::new();
    let mut iv = Vec::new();
    let mut bv = Vec::new();
    for _ in 0..n {
        let e = offset + idx.iter().zip(strides).map(|(&i, &s)| i as i64 * s).sum::<i64>();
        let p = base.offset(e as isize * es);
        match dtype {
            DType::F32 => f.push((p as *const f32).read_unaligned() as f64),
            DType::BF16 => f.push(bf16::from_bits((p as *const u16).read_unaligned()).to_f64()),
            DType::F16 => f.push(f16::from_bits((p as *const u16).read_unaligned()).to_f64()),
            DType::I32 => iv.push((p as *const i32).read_unaligned() as i64),
            DType::I64 => iv.push((p as *const i64).read_unaligned()),
            DType::Bool => bv.push(*p != 0),
        }
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    let data = if dtype.is_float() {
        Buffer::F(f)
    } else if dtype.is_int() {
        Buffer::I(iv)
    } else {
        Buffer::B(bv)
    };
    Tensor {
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// Checks that every view of the program lies inside its buffer at the symbol values `env`: the generated
/// code indexes buffers without bounds checks, so a program read from disk (an artifact's `program.json`)
/// whose views do not fit is refused here, naming the kernel, instead of reading or writing out of bounds.
pub(crate) fn check_views(
    program: &KernelProgram,
    layout: &Layout,
    env: &HashMap<String, i64>,
) -> Result<(), RuntimeError> {
    let check = |t: &TensorRef, what: &dyn Fn() -> String| -> Result<(), RuntimeError> {
        let ev = |d: &Dim| d.eval(env).map_err(|m| other(format!("{}: {m}", what())));
        if t.shape.len() != t.strides.len() {
            return Err(other(format!(
                "{}: a view of rank {} has {} strides",
                what(),
                t.shape.len(),
                t.strides.len()
            )));
        }
        let mut lo = ev(&t.offset)? as i128;
        let mut hi = lo;
        for (d, st) in t.shape.iter().zip(&t.strides) {
            let (d, st) = (ev(d)? as i128, ev(st)? as i128);
            if d <= 0 {
                return Ok(());
            }
            let span = (d - 1) * st;
            if span < 0 {
                lo += span;
            } else {
                hi += span;
            }
        }
        let b = program
            .buffers
            .get(t.buffer)
            .ok_or_else(|| other(format!("{}: buffer b{} does not exist", what(), t.buffer)))?;
        let elements = (layout.sizes[t.buffer] / b.dtype.size_bytes().max(1) as u64) as i128;
        if t.dtype != b.dtype {
            return Err(other(format!(
                "{}: a {} view of buffer b{}, which holds {}",
                what(),
                t.dtype,
                t.buffer,
                b.dtype
            )));
        }
        if lo < 0 || hi >= elements {
            return Err(other(format!(
                "{}: its view of buffer b{} spans elements {lo}..={hi}, outside the buffer's {elements}",
                what(),
                t.buffer
            )));
        }
        Ok(())
    };
    for (title, ks) in [("prepare kernel", &program.prepare), ("kernel", &program.step)] {
        for k in ks.iter() {
            for (i, t) in k.inputs.iter().chain(&k.outputs).enumerate() {
                check(t, &|| format!("{title} k{} ({}) operand {i}", k.id, k.name))?;
            }
        }
    }
    for io in program.inputs.iter().chain(&program.params).chain(&program.outputs) {
        check(&io.tensor, &|| format!("`{}`", io.name))?;
    }
    Ok(())
}

/// The size to allocate for `need` bytes where `have` were too few: half again as much as before when that
/// covers the need.
pub(crate) fn grown(need: usize, have: usize) -> usize {
    if have == 0 {
        need
    } else {
        need.max(have.saturating_add(have / 2))
    }
}

/// Binds the symbols from the inputs' shapes, checking every input's dtype and shape.
pub(crate) fn bind_inputs(
    program: &KernelProgram,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, i64>, RuntimeError> {
    let mut env: HashMap<String, i64> = HashMap::new();
    for io in &program.inputs {
        let t = inputs
            .get(&io.name)
            .ok_or_else(|| other(format!("input `{}` ({}) is missing", io.name, io.ty)))?;
        if t.dtype != io.ty.dtype {
            return Err(other(format!(
                "input `{}`: expected dtype {}, got {}",
                io.name, io.ty.dtype, t.dtype
            )));
        }
        if t.shape.len() != io.ty.rank() {
            return Err(other(format!(
                "input `{}`: expected rank {} ({}), got shape {:?}",
                io.name,
                io.ty.rank(),
                io.ty,
                t.shape
            )));
        }
        for (d, &got) in io.ty.dims().iter().zip(&t.shape) {
            if let [s] = d.symbols().as_slice() {
                if *d == Dim::sym(s) {
                    match env.get(s) {
                        Some(&v) if v != got as i64 => {
                            return Err(other(format!(
                                "input `{}`: symbol `{s}` is {v} from an earlier input but {got} here",
                                io.name
                            )))
                        }
                        _ => {
                            env.insert(s.clone(), got as i64);
                        }
                    }
                }
            }
        }
    }
    for io in &program.inputs {
        let t = &inputs[&io.name];
        for (d, &got) in io.ty.dims().iter().zip(&t.shape) {
            let want = d.eval(&env).map_err(|m| other(format!("input `{}`: {m}", io.name)))?;
            if want != got as i64 {
                return Err(other(format!(
                    "input `{}`: expected {} (= {want} here), got shape {:?}",
                    io.name, io.ty, t.shape
                )));
            }
        }
    }
    for s in &program.symbols {
        if !env.contains_key(s) {
            return Err(other(format!(
                "symbol `{s}` is not bound: no input has it as a whole dimension"
            )));
        }
    }
    Ok(env)
}

/// A tensor of `dtype` and `shape` without values: what binding reads of an input whose bytes are held.
pub(crate) fn placeholder(dtype: DType, shape: Vec<usize>) -> Tensor {
    let data = if dtype.is_float() {
        fulgur_ir::Buffer::F(Vec::new())
    } else if dtype.is_int() {
        fulgur_ir::Buffer::I(Vec::new())
    } else {
        fulgur_ir::Buffer::B(Vec::new())
    };
    Tensor { dtype, shape, data }
}

/// The symbols the prepare program's views and the prepared and constant buffers' sizes use: the prepare
/// program reruns when one of them changes.
pub(crate) fn prepare_symbols(program: &KernelProgram) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for k in &program.prepare {
        for t in k.inputs.iter().chain(&k.outputs) {
            for d in t.shape.iter().chain(&t.strides).chain([&t.offset]) {
                out.extend(d.symbols());
            }
        }
    }
    for b in &program.buffers {
        if matches!(
            b.kind,
            fulgur_codegen::program::BufferKind::Prepared | fulgur_codegen::program::BufferKind::Constant
        ) {
            out.extend(b.elements.symbols());
        }
    }
    out
}

/// The parameter of `program` weight `name` is for, after checking `t`'s shape against it.
pub(crate) fn weight_param<'p>(
    program: &'p KernelProgram,
    name: &str,
    t: &Tensor,
) -> Result<&'p fulgur_codegen::program::Io, RuntimeError> {
    let io = program
        .params
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| other(format!("weight `{name}`: the program has no parameter of that name")))?;
    let want = io.ty.shape.as_consts().ok_or_else(|| {
        other(format!(
            "weight `{name}`: the parameter's shape {} is symbolic",
            io.ty.shape
        ))
    })?;
    if t.shape != want {
        return Err(other(format!(
            "weight `{name}`: expected shape {want:?} ({}), got {:?}",
            io.ty, t.shape
        )));
    }
    Ok(io)
}

/// The error for weights not loaded when a program must run (the first three named).
pub(crate) fn missing_weights_error(missing: &[String]) -> RuntimeError {
    let more = if missing.len() > 3 {
        format!(" and {} more", missing.len() - 3)
    } else {
        String::new()
    };
    other(format!(
        "weights not loaded: {}{more}",
        missing.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    ))
}

/// The values of a constant buffer as a host tensor (`None` for a buffer that is not a constant).
pub(crate) fn constant_tensor(b: &fulgur_codegen::program::BufferSpec) -> Option<Tensor> {
    let Some(fulgur_ir::Op::Constant { dtype, data, .. }) = &b.init else {
        return None;
    };
    Some(match data {
        fulgur_ir::ConstData::Float(v) => Tensor::from_f64(*dtype, vec![v.len()], v.clone()),
        fulgur_ir::ConstData::Int(v) => Tensor::from_i64(*dtype, vec![v.len()], v.clone()),
        fulgur_ir::ConstData::Bool(v) => Tensor::from_bool(vec![v.len()], v.clone()),
    })
}

/// Per kernel code its parameters, per kernel code the byte offset of each of its scratch buffers, and the
/// scratch area's size.
pub(crate) type CodeBindings = (Vec<Vec<i64>>, Vec<Vec<usize>>, usize);

/// Per kernel code at the symbol values `env`: its parameters, and the byte offset of each of its scratch
/// buffers in a scratch area (each rounded up to `align`); and the scratch area's size (the largest code's).
pub(crate) fn kernel_params(
    kernels: &[fulgur_codegen::loops::LoopKernel],
    env: &HashMap<String, i64>,
    align: usize,
) -> Result<CodeBindings, RuntimeError> {
    let mut params = Vec::with_capacity(kernels.len());
    let mut scratch = Vec::with_capacity(kernels.len());
    let mut scratch_bytes = 0usize;
    for (c, lk) in kernels.iter().enumerate() {
        let ps = lk
            .params
            .iter()
            .map(|d| d.eval(env))
            .collect::<Result<Vec<i64>, String>>()
            .map_err(|m| other(format!("kernel code {c}: {m}")))?;
        let mut offs = Vec::with_capacity(lk.scratch.len());
        let mut at = 0usize;
        for (dt, n) in &lk.scratch {
            let n = n.eval(env).map_err(|m| other(format!("kernel code {c}: {m}")))?;
            offs.push(at);
            at = at
                .checked_add((n.max(0) as usize).saturating_mul(dt.size_bytes()).div_ceil(align) * align)
                .ok_or_else(|| other("scratch size overflows"))?;
        }
        scratch_bytes = scratch_bytes.max(at);
        params.push(ps);
        scratch.push(offs);
    }
    Ok((params, scratch, scratch_bytes))
}

//! The reference interpreter running a kernel program kernel by kernel: the oracle for the lowering.
//!
//! Memory is what a backend would have: every persistent buffer its own bytes, the transient buffers at their
//! offsets in one arena of [`Layout::arena_bytes`], every value stored in its dtype (f32, bf16, f16 as their
//! bytes; integers as i32 or i64; bool as one byte). Each kernel reads its input views from those bytes, runs
//! its op on the interpreter, and writes its outputs back. An f32 program therefore computes exactly what the
//! interpreter computes on the graph in f32 precision (the same op, the same rounding after each op): a
//! wrong view, offset or arena overlap shows as a difference.

use crate::program::{BufferKind, KernelProgram, Layout, TensorRef};
use crate::CodegenError;
use fulgur_ir::{Buffer, DType, Dim, Graph, Interpreter, Op, Precision, Tensor, Value};
use half::{bf16, f16};
use std::collections::{BTreeMap, HashMap};

/// The bytes of every buffer: persistent ones apart, transient ones in the arena.
struct Memory {
    arena: Vec<u8>,
    persistent: HashMap<usize, Vec<u8>>,
    layout: Layout,
}

impl Memory {
    /// The bytes of buffer `b` and where it starts in them.
    fn region(&mut self, b: usize) -> (&mut Vec<u8>, usize) {
        match self.layout.offsets[b] {
            Some(off) => (&mut self.arena, off as usize),
            None => (
                self.persistent.get_mut(&b).expect("persistent buffers are allocated"),
                0,
            ),
        }
    }
}

fn size_of(d: DType) -> usize {
    d.size_bytes()
}

fn encode(d: DType, x: f64, out: &mut [u8]) {
    match d {
        DType::F32 => out.copy_from_slice(&(x as f32).to_le_bytes()),
        DType::BF16 => out.copy_from_slice(&bf16::from_f32(x as f32).to_le_bytes()),
        DType::F16 => out.copy_from_slice(&f16::from_f64(x).to_le_bytes()),
        DType::I32 => out.copy_from_slice(&(x as i64 as i32).to_le_bytes()),
        DType::I64 => out.copy_from_slice(&(x as i64).to_le_bytes()),
        DType::Bool => out[0] = u8::from(x != 0.0),
    }
}

fn encode_int(d: DType, x: i64, out: &mut [u8]) {
    match d {
        DType::I32 => out.copy_from_slice(&(x as i32).to_le_bytes()),
        DType::I64 => out.copy_from_slice(&x.to_le_bytes()),
        _ => encode(d, x as f64, out),
    }
}

fn decode(d: DType, b: &[u8]) -> f64 {
    match d {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])) as f64,
        DType::Bool => f64::from(b[0] != 0),
    }
}

fn decode_int(d: DType, b: &[u8]) -> i64 {
    match d {
        DType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
        DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
        _ => decode(d, b) as i64,
    }
}

/// The concrete shape, strides and offset of a view.
fn concrete(t: &TensorRef, env: &HashMap<String, i64>) -> Result<(Vec<usize>, Vec<i64>, i64), CodegenError> {
    let ev = |d: &Dim| {
        d.eval(env)
            .map_err(|m| CodegenError::Options(format!("a view of buffer b{}: {m}", t.buffer)))
    };
    let shape = t
        .shape
        .iter()
        .map(|d| ev(d).map(|x| x.max(0) as usize))
        .collect::<Result<_, _>>()?;
    let strides = t.strides.iter().map(ev).collect::<Result<_, _>>()?;
    Ok((shape, strides, ev(&t.offset)?))
}

/// Element offsets of a view, in row-major order of its shape.
fn element_offsets(shape: &[usize], strides: &[i64], offset: i64) -> Vec<i64> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(offset + idx.iter().zip(strides).map(|(&i, &s)| i as i64 * s).sum::<i64>());
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

fn read(mem: &mut Memory, t: &TensorRef, env: &HashMap<String, i64>) -> Result<Tensor, CodegenError> {
    let (shape, strides, offset) = concrete(t, env)?;
    let es = size_of(t.dtype);
    let (bytes, base) = mem.region(t.buffer);
    let at = |e: i64| base + e as usize * es;
    let offs = element_offsets(&shape, &strides, offset);
    let data = if t.dtype.is_float() {
        Buffer::F(
            offs.iter()
                .map(|&e| decode(t.dtype, &bytes[at(e)..at(e) + es]))
                .collect(),
        )
    } else if t.dtype.is_int() {
        Buffer::I(
            offs.iter()
                .map(|&e| decode_int(t.dtype, &bytes[at(e)..at(e) + es]))
                .collect(),
        )
    } else {
        Buffer::B(offs.iter().map(|&e| bytes[at(e)] != 0).collect())
    };
    Ok(Tensor {
        dtype: t.dtype,
        shape,
        data,
    })
}

fn write(mem: &mut Memory, t: &TensorRef, v: &Tensor, env: &HashMap<String, i64>) -> Result<(), CodegenError> {
    let (shape, strides, offset) = concrete(t, env)?;
    let es = size_of(t.dtype);
    let (bytes, base) = mem.region(t.buffer);
    let offs = element_offsets(&shape, &strides, offset);
    for (i, &e) in offs.iter().enumerate() {
        let at = base + e as usize * es;
        let out = &mut bytes[at..at + es];
        match &v.data {
            Buffer::F(x) => encode(t.dtype, x[i], out),
            Buffer::I(x) => encode_int(t.dtype, x[i], out),
            Buffer::B(x) => encode(t.dtype, f64::from(u8::from(x[i])), out),
        }
    }
    Ok(())
}

/// Runs `op` on concrete tensors through the interpreter.
fn run_op(
    op: &Op,
    args: &[Tensor],
    env: &HashMap<String, i64>,
    precision: Precision,
) -> Result<Vec<Tensor>, CodegenError> {
    let dims: HashMap<String, Dim> = env.iter().map(|(k, v)| (k.clone(), Dim::from(*v))).collect();
    let op = op.substitute_dims(&dims);
    let mut g = Graph::new("kernel");
    let mut ins = Vec::new();
    let mut feed = HashMap::new();
    for (i, t) in args.iter().enumerate() {
        let name = format!("i{i}");
        ins.push(g.input(&name, t.dtype, t.shape.iter().map(|&d| Dim::from(d as i64)).collect())?);
        feed.insert(name, t.clone());
    }
    let id = g.add_node(op, &ins, None)?;
    let n_out = g.node(id).outputs.len();
    for i in 0..n_out {
        g.add_output(format!("o{i}"), Value::new(id, i as u32))?;
    }
    let out = Interpreter::new(precision).run(&g, &feed)?;
    Ok((0..n_out).map(|i| out[&format!("o{i}")].clone()).collect())
}

/// Runs `program` on `inputs` (every data input and weight, by name), kernel by kernel: the prepare program,
/// then the step program in order. Returns every output by name.
pub fn run(
    program: &KernelProgram,
    inputs: &HashMap<String, Tensor>,
    precision: Precision,
) -> Result<BTreeMap<String, Tensor>, CodegenError> {
    // bind the symbols, checking every input as the interpreter does
    let mut decl = Graph::new(program.name.clone());
    for io in &program.inputs {
        decl.input(&io.name, io.ty.dtype, io.ty.dims().to_vec())?;
    }
    for io in &program.params {
        decl.param(&io.name, io.ty.dtype, io.ty.dims().to_vec())?;
    }
    let env = Interpreter::new(precision).bind(&decl, inputs)?;
    let layout = program.layout(&env)?;
    let mut mem = Memory {
        arena: vec![0u8; layout.arena_bytes as usize],
        persistent: HashMap::new(),
        layout,
    };
    for b in &program.buffers {
        if b.kind != BufferKind::Transient {
            mem.persistent.insert(b.id, vec![0u8; mem.layout.sizes[b.id] as usize]);
        }
    }
    for io in program.inputs.iter().chain(&program.params) {
        write(&mut mem, &io.tensor, &inputs[&io.name], &env)?;
    }
    for b in &program.buffers {
        if let Some(op) = &b.init {
            let v = run_op(op, &[], &env, precision)?;
            let t = TensorRef::contiguous(
                b.id,
                &fulgur_ir::TensorType::new(b.dtype, v[0].shape.iter().map(|&d| Dim::from(d as i64)).collect()),
            );
            write(&mut mem, &t, &v[0], &env)?;
        }
    }
    for k in program.prepare.iter().chain(&program.step) {
        let args: Vec<Tensor> = k
            .inputs
            .iter()
            .map(|t| read(&mut mem, t, &env))
            .collect::<Result<_, _>>()?;
        let outs = run_op(&k.op, &args, &env, precision)
            .map_err(|e| CodegenError::Options(format!("kernel k{} ({}): {e}", k.id, k.name)))?;
        for (t, v) in k.outputs.iter().zip(&outs) {
            write(&mut mem, t, v, &env)?;
        }
    }
    let mut out = BTreeMap::new();
    for io in &program.outputs {
        out.insert(io.name.clone(), read(&mut mem, &io.tensor, &env)?);
    }
    Ok(out)
}

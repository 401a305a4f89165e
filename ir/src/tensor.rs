//! Host tensors for the reference interpreter, and their safetensors I/O.
//!
//! Values are held widened: floats as `f64`, integers as `i64`, booleans as `bool`; the tensor's [`DType`]
//! says what they are stored as. Converting from and to safetensors narrows or widens exactly (bf16/f16 through
//! `half`).

use crate::dtype::DType;
use crate::error::{IrError, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::Path;

/// Widened element storage.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer {
    F(Vec<f64>),
    I(Vec<i64>),
    B(Vec<bool>),
}

impl Buffer {
    pub fn len(&self) -> usize {
        match self {
            Buffer::F(v) => v.len(),
            Buffer::I(v) => v.len(),
            Buffer::B(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Buffer,
}

/// Rounds `x` to what `dtype` can store (identity for non-float dtypes).
pub fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        // through f32: `bf16::from_f64` in half 2.7 mis-rounds some values just above a midpoint
        DType::BF16 => bf16::from_f32(x as f32).to_f64(),
        DType::F16 => f16::from_f64(x).to_f64(),
        _ => x,
    }
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A float tensor from f64 values (rounded to `dtype`).
    pub fn from_f64(dtype: DType, shape: Vec<usize>, values: Vec<f64>) -> Tensor {
        assert!(dtype.is_float(), "from_f64 needs a float dtype");
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape and value count differ"
        );
        Tensor {
            dtype,
            shape,
            data: Buffer::F(values.into_iter().map(|x| round_to(dtype, x)).collect()),
        }
    }

    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape and value count differ"
        );
        Tensor {
            dtype: DType::F32,
            shape,
            data: Buffer::F(values.into_iter().map(f64::from).collect()),
        }
    }

    pub fn from_i64(dtype: DType, shape: Vec<usize>, values: Vec<i64>) -> Tensor {
        assert!(dtype.is_int(), "from_i64 needs an integer dtype");
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape and value count differ"
        );
        Tensor {
            dtype,
            shape,
            data: Buffer::I(values),
        }
    }

    pub fn from_bool(shape: Vec<usize>, values: Vec<bool>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "shape and value count differ"
        );
        Tensor {
            dtype: DType::Bool,
            shape,
            data: Buffer::B(values),
        }
    }

    pub fn scalar_f32(x: f32) -> Tensor {
        Tensor::from_f32(vec![], vec![x])
    }

    /// All elements as f64 (ints and bools converted).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Buffer::F(v) => v.clone(),
            Buffer::I(v) => v.iter().map(|&x| x as f64).collect(),
            Buffer::B(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// All elements as i64 (floats truncated toward zero).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            Buffer::F(v) => v.iter().map(|&x| x as i64).collect(),
            Buffer::I(v) => v.clone(),
            Buffer::B(v) => v.iter().map(|&x| i64::from(x)).collect(),
        }
    }

    /// Float values, or `None` for integer and bool tensors.
    pub fn floats(&self) -> Option<&[f64]> {
        match &self.data {
            Buffer::F(v) => Some(v),
            _ => None,
        }
    }

    /// The same values converted to `dtype` (float→int truncates toward zero, ints wrap to i32, nonzero → true).
    pub fn cast(&self, dtype: DType) -> Tensor {
        let data = match dtype {
            DType::F32 | DType::BF16 | DType::F16 => {
                Buffer::F(self.to_f64().into_iter().map(|x| round_to(dtype, x)).collect())
            }
            DType::I64 => Buffer::I(self.to_i64_saturating()),
            DType::I32 => Buffer::I(match &self.data {
                // float → i32 saturates (and NaN → 0), like the i64 case
                Buffer::F(v) => v.iter().map(|&x| x as i32 as i64).collect(),
                _ => self.to_i64().into_iter().map(|x| x as i32 as i64).collect(),
            }),
            DType::Bool => Buffer::B(match &self.data {
                Buffer::F(v) => v.iter().map(|&x| x != 0.0).collect(),
                Buffer::I(v) => v.iter().map(|&x| x != 0).collect(),
                Buffer::B(v) => v.clone(),
            }),
        };
        Tensor {
            dtype,
            shape: self.shape.clone(),
            data,
        }
    }

    fn to_i64_saturating(&self) -> Vec<i64> {
        match &self.data {
            // `as` saturates and maps NaN to 0
            Buffer::F(v) => v.iter().map(|&x| x as i64).collect(),
            _ => self.to_i64(),
        }
    }

    /// Relative L2 distance `‖a−b‖/‖b‖` (f64), the agreement measure used throughout the tests.
    pub fn rel_l2(&self, reference: &Tensor) -> f64 {
        let a = self.to_f64();
        let b = reference.to_f64();
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        }
    }

    /// Whether any float element is NaN or infinite.
    pub fn has_non_finite(&self) -> bool {
        self.floats().is_some_and(|v| v.iter().any(|x| !x.is_finite()))
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::I32 => StDtype::I32,
        DType::I64 => StDtype::I64,
        DType::Bool => StDtype::BOOL,
    }
}

/// What a safetensors error means, in words (the library's own messages are its enum's names).
pub fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::InvalidHeader => "its header is not valid UTF-8 text".into(),
        E::InvalidHeaderStart => "its header does not start with `{` (is it a safetensors file?)".into(),
        E::InvalidHeaderDeserialization => "its header is not valid JSON".into(),
        E::HeaderTooLarge => {
            "its first 8 bytes announce a header larger than 100 MB (is it a safetensors file?)".into()
        }
        E::HeaderTooSmall => "it is shorter than the 8 bytes that give the header's length (empty or truncated)".into(),
        E::InvalidHeaderLength => {
            "the header length in its first 8 bytes runs past the end of the file (truncated, or not a safetensors \
             file)"
                .into()
        }
        E::TensorNotFound(n) => format!("it holds no tensor `{n}`"),
        E::TensorInvalidInfo => "a tensor's shape, dtype and data offsets disagree".into(),
        E::InvalidOffset(n) => format!(
            "the data offsets of tensor `{n}` are invalid (overlapping, out of order, or past the end of the file)"
        ),
        E::IoError(e) => format!("it cannot be read: {e}"),
        E::JsonError(e) => format!("its header is not valid JSON: {e}"),
        E::InvalidTensorView(dt, shape, n) => {
            format!("a {dt:?} tensor of shape {shape:?} cannot be made of {n} bytes")
        }
        E::MetadataIncompleteBuffer => {
            "the tensors' data does not match the rest of the file (truncated, or bytes added at the end)".into()
        }
        E::ValidationOverflow => "a tensor's size in its header overflows (the header is corrupt)".into(),
    }
}

/// Converts a safetensors view to a host tensor. `what` names the tensor and file in errors.
pub fn tensor_from_view(view: &TensorView<'_>, what: &str) -> Result<Tensor> {
    let shape = view.shape().to_vec();
    let b = view.data();
    let n: usize = shape.iter().product();
    let bad = |m: String| IrError::Input {
        name: what.to_string(),
        message: m,
    };
    let (dtype, data) = match view.dtype() {
        StDtype::F32 => (
            DType::F32,
            Buffer::F(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
            ),
        ),
        StDtype::F64 => {
            return Err(bad(
                "holds F64 values; Fulgur's float dtypes are f32, bf16 and f16 (f64 is only the interpreter's \
                 arithmetic): store the tensor as F32"
                    .into(),
            ))
        }
        StDtype::BF16 => (
            DType::BF16,
            Buffer::F(
                b.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
            ),
        ),
        StDtype::F16 => (
            DType::F16,
            Buffer::F(
                b.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                    .collect(),
            ),
        ),
        StDtype::I32 => (
            DType::I32,
            Buffer::I(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
        ),
        StDtype::I64 => (
            DType::I64,
            Buffer::I(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
        ),
        StDtype::BOOL => (DType::Bool, Buffer::B(b.iter().map(|&x| x != 0).collect())),
        other => {
            return Err(bad(format!(
                "holds {other:?} values, which Fulgur does not read (it reads F32, BF16, F16, I64, I32 and BOOL)"
            )))
        }
    };
    if data.len() != n {
        return Err(bad(format!(
            "holds {} elements, its shape {shape:?} needs {n}",
            data.len()
        )));
    }
    Ok(Tensor { dtype, shape, data })
}

/// Reads every tensor of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| IrError::Graph(format!("cannot read `{}`: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        IrError::Graph(format!(
            "`{}` is not a valid safetensors file: {}",
            path.display(),
            describe_safetensors_error(&e)
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = tensor_from_view(&view, &format!("{name}` in `{}", path.display()))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Serialises tensors to safetensors bytes.
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let mut bytes = Vec::with_capacity(t.numel() * t.dtype.size_bytes());
        match (&t.data, t.dtype) {
            (Buffer::F(v), DType::F32) => v
                .iter()
                .for_each(|&x| bytes.extend_from_slice(&(x as f32).to_le_bytes())),
            (Buffer::F(v), DType::BF16) => v
                .iter()
                .for_each(|&x| bytes.extend_from_slice(&bf16::from_f32(x as f32).to_le_bytes())),
            (Buffer::F(v), DType::F16) => v
                .iter()
                .for_each(|&x| bytes.extend_from_slice(&f16::from_f64(x).to_le_bytes())),
            (Buffer::I(v), DType::I32) => v
                .iter()
                .for_each(|&x| bytes.extend_from_slice(&(x as i32).to_le_bytes())),
            (Buffer::I(v), DType::I64) => v.iter().for_each(|&x| bytes.extend_from_slice(&x.to_le_bytes())),
            (Buffer::B(v), DType::Bool) => v.iter().for_each(|&x| bytes.push(u8::from(x))),
            _ => {
                return Err(IrError::Graph(format!(
                    "tensor `{name}`: storage does not match dtype {}",
                    t.dtype
                )))
            }
        }
        bufs.push((name.clone(), t.dtype, t.shape.clone(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(st_dtype(*d), s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| IrError::Graph(format!("tensor `{n}`: {}", describe_safetensors_error(&e))))
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, &None).map_err(|e| IrError::Graph(format!("serialising safetensors: {e}")))
}

/// Writes tensors to `path` atomically: a temporary file in the same folder, renamed at the end, so a failure
/// leaves no partial file under the final name.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let bytes = safetensors_bytes(tensors)?;
    write_atomic(path, &bytes)
}

/// Where writing to `path` puts the bytes: the final target of a symbolic link (followed through every link,
/// the links themselves left as they are), else `path` itself.
pub fn write_target(path: &Path) -> Result<std::path::PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = std::fs::read_link(&p)
                    .map_err(|e| IrError::Graph(format!("cannot follow the link `{}`: {e}", p.display())))?;
                p = if t.is_absolute() {
                    t
                } else {
                    p.parent().unwrap_or(Path::new(".")).join(t)
                };
            }
            _ => return Ok(p),
        }
    }
    Err(IrError::Graph(format!(
        "cannot write `{}`: too many levels of symbolic links",
        path.display()
    )))
}

/// Writes `bytes` to `path` so that a failure never leaves a partial file under that name, and never replaces
/// what is not a plain file:
/// - a plain file (or a new one) is written to a temporary file beside it, then renamed over it (keeping the
///   replaced file's permissions);
/// - a symbolic link is followed: its final target is written as above, and the link stays a link;
/// - a device, FIFO or socket (`/dev/null`, `/dev/stdout`) is written through, never replaced;
/// - a directory is an error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let target = write_target(path)?;
    let fail = |e: &dyn std::fmt::Display| IrError::Graph(format!("cannot write `{}`: {e}", path.display()));
    let existing = std::fs::metadata(&target).ok();
    match &existing {
        Some(m) if m.is_dir() => return Err(fail(&"it is a directory")),
        Some(m) if !m.is_file() => {
            // a device, FIFO or socket: written through
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .map_err(|e| fail(&e))?;
            return f.write_all(bytes).and_then(|_| f.flush()).map_err(|e| fail(&e));
        }
        _ => {}
    }
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let fname = target.file_name().ok_or_else(|| fail(&"not a file path"))?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{n}.tmp", fname.to_string_lossy(), std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(m) = &existing {
            std::fs::set_permissions(&tmp, m.permissions())?;
        }
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(&e));
    }
    Ok(())
}

//! `fulgur eval FILE --inputs IN.safetensors --out OUT.safetensors [--precision f32|f64] [--print]`: run a
//! graph on the reference interpreter.
//!
//! The inputs file holds one tensor per graph input and parameter, by name; symbols are bound from their
//! shapes. Outputs are written by output name, atomically (a temporary file renamed at the end), so a failure
//! leaves no file under the final name. The output path is checked before any work starts.

use crate::cli::files::{check_output, load_graph, write_stdout, InputFile};
use anyhow::{anyhow, Result};
use fulgur_ir::tensor::{read_safetensors, write_safetensors};
use fulgur_ir::{Buffer, Interpreter, IrError, Precision, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

/// How many leading values `--print` shows per output.
const PRINTED_VALUES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// Round every float result to its node's dtype (f32, bf16, f16) after each op.
    F32,
    /// Keep every float result in f64: the exact oracle.
    F64,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Precision {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::F64 => Precision::F64,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The graph: `.fir` text, or JSON when the name ends in `.json`.
    pub file: PathBuf,
    /// Safetensors file with one tensor per graph input and parameter, by name.
    #[arg(long, short)]
    pub inputs: PathBuf,
    /// Safetensors file to write, one tensor per graph output, by name.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Interpreter precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Print every output: dtype, shape, first values, min/max/mean.
    #[arg(long)]
    pub print: bool,
    /// The most memory the interpreter may hold at once, e.g. `8GiB` (default: the memory available); a node
    /// that would need more is an error naming it and the sizes.
    #[arg(long, value_name = "SIZE", value_parser = crate::cli::files::parse_bytes)]
    pub memory_limit: Option<u64>,
}

pub fn run(args: Args) -> Result<()> {
    check_output(
        &args.out,
        &[
            InputFile::new("the graph file", &args.file),
            InputFile::new("the inputs file", &args.inputs),
        ],
    )?;
    let g = load_graph(&args.file)?;
    let tensors = read_safetensors(&args.inputs)?;
    // Warnings are printed only once the run has succeeded: a failure prints its one `error:` line alone.
    let mut warnings = Vec::new();
    let mut unused = Vec::new();
    let mut inputs: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        if g.input_by_name(&name).is_none() {
            unused.push(name);
            continue;
        }
        warnings.extend(non_finite_warning("input", &name, &t));
        inputs.insert(name, t);
    }
    // An error about the inputs also names the tensors of the file that the graph does not declare: most
    // often a misspelt name.
    let failed = |e: anyhow::Error| {
        let hint = match e.downcast_ref::<IrError>() {
            Some(IrError::Input { .. }) if !unused.is_empty() => format!(
                " ({} holds tensors that graph `{}` does not declare: {})",
                args.inputs.display(),
                g.name,
                unused.join(", ")
            ),
            _ => String::new(),
        };
        anyhow!("evaluating graph `{}` ({}): {e:#}{hint}", g.name, args.file.display())
    };
    let interp = Interpreter {
        precision: args.precision.into(),
        memory_limit: args.memory_limit,
    };
    let start = Instant::now();
    let outputs = interp.run(&g, &inputs).map_err(|e| failed(e.into()))?;
    tracing::info!(graph = %g.name, elapsed = ?start.elapsed(), precision = ?args.precision, "evaluated");
    if !unused.is_empty() {
        warnings.push(format!(
            "{} holds tensors that graph `{}` does not declare, ignored: {}",
            args.inputs.display(),
            g.name,
            unused.join(", ")
        ));
    }
    for (name, t) in &outputs {
        warnings.extend(non_finite_warning("output", name, t));
    }
    write_safetensors(&args.out, &outputs)?;
    tracing::info!(path = %args.out.display(), outputs = outputs.len(), "wrote outputs");
    for w in warnings {
        eprintln!("warning: {w}");
    }
    if args.print {
        write_stdout(&describe_all(&outputs))?;
    }
    Ok(())
}

/// A warning when a float tensor holds NaN or infinite values (they propagate; the run goes on).
fn non_finite_warning(what: &str, name: &str, t: &Tensor) -> Option<String> {
    if !t.has_non_finite() {
        return None;
    }
    let (nan, inf) = count_non_finite(t);
    Some(format!(
        "{what} `{name}` contains {nan} NaN and {inf} infinite value(s) of {}; they propagate",
        t.numel()
    ))
}

fn count_non_finite(t: &Tensor) -> (usize, usize) {
    match t.floats() {
        Some(v) => (
            v.iter().filter(|x| x.is_nan()).count(),
            v.iter().filter(|x| x.is_infinite()).count(),
        ),
        None => (0, 0),
    }
}

fn describe_all(outputs: &BTreeMap<String, Tensor>) -> String {
    outputs.iter().map(|(name, t)| describe(name, t)).collect()
}

/// `--print`'s text for one tensor: `name: dtype[shape]`, the first values, then min/max/mean of the finite
/// values and the count of the others.
pub fn describe(name: &str, t: &Tensor) -> String {
    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!("{name}: {}[{}]\n", t.dtype, dims.join(", "));
    let vals = t.to_f64();
    if vals.is_empty() {
        s.push_str("  (no elements)\n");
        return s;
    }
    let first: Vec<String> = match &t.data {
        Buffer::F(v) => v.iter().take(PRINTED_VALUES).map(|&x| fmt_num(x)).collect(),
        Buffer::I(v) => v.iter().take(PRINTED_VALUES).map(|x| x.to_string()).collect(),
        Buffer::B(v) => v.iter().take(PRINTED_VALUES).map(|x| x.to_string()).collect(),
    };
    let more = if vals.len() > PRINTED_VALUES {
        format!(", ... ({} values)", vals.len())
    } else {
        String::new()
    };
    let _ = writeln!(s, "  values  [{}{more}]", first.join(", "));
    let finite: Vec<f64> = vals.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        s.push_str("  min/max/mean: no finite values\n");
    } else {
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = finite.iter().sum::<f64>() / finite.len() as f64;
        let _ = write!(
            s,
            "  min {}  max {}  mean {}",
            fmt_num(min),
            fmt_num(max),
            fmt_num(mean)
        );
        let (nan, inf) = count_non_finite(t);
        if nan + inf > 0 {
            let _ = write!(s, "  (of the finite values; {nan} NaN, {inf} infinite)");
        }
        s.push('\n');
    }
    s
}

/// Six significant digits, in scientific notation when very large or small.
fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return fulgur_ir::op::format_f64(x);
    }
    let a = x.abs();
    if a == 0.0 {
        "0".to_string()
    } else if (1e-3..1e6).contains(&a) {
        let digits = (5 - a.log10().floor() as i32).max(0) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.5e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.00123), "0.00123000");
        assert_eq!(fmt_num(1.5), "1.50000");
        assert_eq!(fmt_num(-123.25), "-123.250");
        assert_eq!(fmt_num(1.0e-5), "1.00000e-5");
        assert_eq!(fmt_num(f64::NAN), "nan");
        assert_eq!(fmt_num(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn describe_counts_non_finite() {
        let t = Tensor::from_f32(vec![3], vec![1.0, f32::NAN, 3.0]);
        let s = describe("y", &t);
        assert!(s.starts_with("y: f32[3]\n"), "{s}");
        assert!(s.contains("min 1.00000  max 3.00000  mean 2.00000"), "{s}");
        assert!(s.contains("1 NaN, 0 infinite"), "{s}");
    }
}

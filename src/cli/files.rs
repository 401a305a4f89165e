//! Reading graphs and checking output paths, with error messages that name the file.

use anyhow::{anyhow, bail, Context, Result};
use fulgur_ir::{json, text, Graph, IrError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The formats a graph file can be read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    /// `.fir` text (any extension other than `.json`).
    Fir,
    /// The JSON form written by `fulgur show --format json`.
    Json,
}

impl GraphFormat {
    /// Chooses the format by the file's extension: `.json` is JSON, anything else is `.fir` text.
    pub fn of(path: &Path) -> GraphFormat {
        match path.extension() {
            Some(e) if e.eq_ignore_ascii_case("json") => GraphFormat::Json,
            _ => GraphFormat::Fir,
        }
    }
}

/// Reads, parses and verifies a graph. Errors name the file, and parse errors its line and column
/// (`examples/bad.fir:3:7: expected ...`).
pub fn load_graph(path: &Path) -> Result<Graph> {
    let src = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let format = GraphFormat::of(path);
    let g = match format {
        GraphFormat::Fir => text::parse(&src),
        GraphFormat::Json => json::from_json(&src),
    }
    .map_err(|e| located(path, e))?;
    g.verify()
        .map_err(|e| anyhow!("{}: graph `{}` does not verify: {e}", path.display(), g.name))?;
    tracing::info!(path = %path.display(), graph = %g.name, nodes = g.node_count(), ?format, "loaded graph");
    Ok(g)
}

/// Prefixes an error with the file's path: `path:line:col: message` for parse errors, `path: message` else.
fn located(path: &Path, e: IrError) -> anyhow::Error {
    match e {
        IrError::Parse { .. } => anyhow!("{}:{e}", path.display()),
        e => anyhow!("{}: {e}", path.display()),
    }
}

/// A file a command reads, and what it is to the command (for error messages).
#[derive(Clone, Debug)]
pub struct InputFile {
    pub what: String,
    pub path: PathBuf,
}

impl InputFile {
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> InputFile {
        InputFile {
            what: what.into(),
            path: path.into(),
        }
    }
}

/// The files a checkpoint directory is read from: `config.json`, `model.safetensors`, the shard index and every
/// other `.safetensors` file in it.
pub fn checkpoint_files(dir: &Path) -> Vec<InputFile> {
    let mut out = vec![InputFile::new("the checkpoint's config", dir.join("config.json"))];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                n.ends_with(".safetensors") || n == "model.safetensors.index.json"
            })
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|p| InputFile::new("a checkpoint file", p)));
    }
    out
}

/// Whether `a` and `b` are the same file (after following symbolic links; hard links included).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        #[cfg(unix)]
        (Ok(x), Ok(y)) => {
            use std::os::unix::fs::MetadataExt;
            x.dev() == y.dev() && x.ino() == y.ino()
        }
        #[cfg(not(unix))]
        (Ok(_), Ok(_)) => matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y),
        _ => false,
    }
}

/// Checks an output path before any work: it must not be any of the command's `inputs` (the same file, through
/// a symbolic or hard link as well), and it must be writable (see [`ensure_writable`]). The rule for every
/// command is written down in `docs/cli.md` ("Output files").
pub fn check_output(path: &Path, inputs: &[InputFile]) -> Result<()> {
    check_not_input(path, inputs)?;
    ensure_writable(path)
}

/// The first half of [`check_output`]: `path` is none of `inputs`.
pub fn check_not_input(path: &Path, inputs: &[InputFile]) -> Result<()> {
    for i in inputs {
        if same_file(path, &i.path) {
            let via = if path != i.path {
                format!(" {}", i.path.display())
            } else {
                String::new()
            };
            bail!(
                "refusing to write {}: it is {}{via}, which this command reads; choose another output path",
                path.display(),
                i.what
            );
        }
    }
    Ok(())
}

/// Checks, before any long work, that `path` can be written: a symbolic link is followed to its final target;
/// a device, FIFO or socket (`/dev/null`) is accepted as it is (it is written through, never replaced);
/// otherwise the target's folder must exist, be a folder and accept a new file, and the target must not be a
/// folder. Leaves nothing behind.
pub fn ensure_writable(path: &Path) -> Result<()> {
    let shown = path.display();
    if path.file_name().is_none() {
        bail!("cannot write {shown}: not a file path");
    }
    let target = fulgur_ir::tensor::write_target(path)?;
    match std::fs::metadata(&target) {
        Ok(m) if m.is_dir() => bail!("cannot write {shown}: it is a directory"),
        Ok(m) if !m.is_file() => return Ok(()),
        _ => {}
    }
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("cannot write {shown}: {} is not a directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot write {shown}: directory {} does not exist", dir.display())
        }
        Err(e) => bail!("cannot write {shown}: {}: {e}", dir.display()),
    }
    // Probe with a new file in the same folder: permission bits alone do not tell (root, read-only mounts).
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let probe = dir.join(format!(".{name}.{}.probe", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!("cannot write {shown}: {e}"),
    }
}

/// What a command says about a model config it used: one `warning:` text per line, naming the file.
pub fn config_warnings(path: &Path, cfg: &fulgur_models::MiniMaxConfig) -> Vec<String> {
    cfg.warnings()
        .into_iter()
        .map(|w| format!("{}: {w}", path.display()))
        .collect()
}

/// A size in bytes as a user writes it: `1000000`, `512MiB`, `8 GiB`, `1.5GB` (binary units KiB, MiB, GiB, TiB;
/// decimal KB, MB, GB, TB; a bare number is bytes; case does not matter).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let scale: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => {
            return Err(format!(
                "`{s}` is not a size (write e.g. 512MiB, 8GiB or a number of bytes)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (write e.g. 512MiB, 8GiB or a number of bytes)"))?;
    let bytes = v * scale;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(format!("`{s}`: a memory limit must be at least 1 byte and fit 64 bits"));
    }
    Ok(bytes as u64)
}

/// Writes `s` to stdout. A closed pipe (`fulgur show g.fir | head`) is not an error.
pub fn write_stdout(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("8 GiB"), Ok(8 << 30));
        assert_eq!(parse_bytes("1.5gb"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("2KB"), Ok(2000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-5MiB").is_err());
        assert!(parse_bytes("5 apples").is_err());
        assert!(parse_bytes("1e30").is_err());
    }
}

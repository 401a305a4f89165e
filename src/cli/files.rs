//! Reading graphs and checking output paths, with error messages that name the file.

use anyhow::{anyhow, bail, Context, Result};
use fulgur_ir::{json, text, Graph, IrError};
use std::io::Write;
use std::path::Path;

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

/// Checks, before any long work, that `path` can be created: its folder exists, is a folder and accepts a
/// new file, and `path` itself is not a folder. Leaves nothing behind.
pub fn ensure_writable(path: &Path) -> Result<()> {
    let shown = path.display();
    if path.file_name().is_none() {
        bail!("cannot write {shown}: not a file path");
    }
    if path.is_dir() {
        bail!("cannot write {shown}: it is a directory");
    }
    let dir = match path.parent() {
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
    let name = path
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

/// Writes `s` to stdout. A closed pipe (`fulgur show g.fir | head`) is not an error.
pub fn write_stdout(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

//! Compiled artifacts: a kernel program written to a directory with everything a person needs to read what
//! was compiled, and everything a runtime needs to run it.
//!
//! ```text
//! DIR/manifest.json        format and version, target, symbols, inputs, weights, outputs, SHA-256 of every file
//! DIR/program.json         the kernel program (kernels, buffer plan, schedule): what the runtime loads
//! DIR/program.txt          the same for people (`fulgur inspect --kernels`)
//! DIR/graph.fir            the optimized graph the program was lowered from
//! DIR/kernels/codeN.loops  the loop form of kernel code N
//! DIR/kernels/codeN.ll     its LLVM IR (CPU target, builds with the `llvm` feature)
//! DIR/kernels/codeN.cu     its CUDA C++ (CUDA target)
//! DIR/kernels/codeN.ARCH.cubin  that source compiled by NVRTC for ARCH (CUDA target, where NVRTC is present)
//! ```
//! A **parallel artifact** (`fulgur compile --parallel`, `docs/parallelism.md` §5.4) holds one program per rank:
//! the files above under `DIR/rankR/` for every rank `R`, and one `manifest.json` at the top whose
//! [`Manifest::parallel`] names the mesh; every rank's program has the interface the manifest lists (the
//! sharded graph keeps the single device's inputs, weights and outputs), except in pipeline stages
//! ([`ParallelManifest::pp`]), where the manifest lists the whole pipeline's and each stage's programs take
//! their part of it. [`load`] refuses it and
//! [`load_rank`] reads one rank's program.
//! [`write`] writes a new directory beside the destination and renames it into place, so a failed compile
//! leaves nothing and an existing artifact is replaced only by a whole new one (its files flushed to disk
//! first); a destination that exists and is not an artifact (nor empty), or an artifact holding files its
//! manifest does not list, is refused. [`load`] refuses an artifact of another format or Fulgur version,
//! one whose files are missing or differ from the hashes in its manifest, and one whose manifest disagrees
//! with its program.

use crate::program::KernelProgram;
use crate::CodegenError;
use fulgur_ir::TensorType;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `format` field of every manifest.
pub const FORMAT: &str = "fulgur-artifact";
/// The layout version of the artifact directory; a change to it or to [`KernelProgram`]'s serialised form
/// bumps it.
pub const FORMAT_VERSION: u32 = 2;
/// The Fulgur version that writes and reads artifacts: one built by another version is refused.
pub const FULGUR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A named tensor of the artifact's interface.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decl {
    pub name: String,
    pub ty: TensorType,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub fulgur_version: String,
    /// The backend it was compiled for (`cpu`, `cuda`).
    pub target: String,
    /// The graph's name.
    pub name: String,
    /// The symbols bound at run time from the inputs' shapes.
    pub symbols: Vec<String>,
    pub inputs: Vec<Decl>,
    /// The weights the runtime must be given (by name, with their types).
    pub weights: Vec<Decl>,
    pub outputs: Vec<Decl>,
    /// Prepare and step kernels, and distinct kernel codes.
    pub prepare_kernels: usize,
    pub step_kernels: usize,
    pub codes: usize,
    /// What produced the code (e.g. `LLVM 19.1.7 for znver3`), for people.
    pub codegen: String,
    /// SHA-256 (hex) of every other file of the artifact, by path relative to it.
    pub files: BTreeMap<String, String>,
    /// A parallel artifact's mesh: one program per rank under `rankR/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelManifest>,
}

/// The mesh of a parallel artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelManifest {
    /// The degrees as `--parallel` spells them (e.g. `dp=1,ep=2,sp=1,tp=2`).
    pub degrees: String,
    /// The mesh's axes (name, degree), ranks row-major over them.
    pub mesh: Vec<(String, usize)>,
    /// The number of ranks (the product of the degrees): programs `rank0` .. `rank{ranks-1}`.
    pub ranks: usize,
    /// The collectives in each rank's program, by kind.
    pub collectives: BTreeMap<String, usize>,
    /// Pipeline stages: `ranks / pp` ranks each, program `rankG` being rank `G mod (ranks / pp)` of stage
    /// `G / (ranks / pp)`, each stage's programs its layers alone (`docs/parallelism.md` §5.4).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub pp: usize,
    /// With stages: the micro-batches a run cuts the batch into (each program takes one).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub micro_batches: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl ParallelManifest {
    /// The directory of rank `r`'s program inside the artifact.
    pub fn rank_dir(r: usize) -> String {
        format!("rank{r}")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CodegenError {
    CodegenError::Options(format!("{what} {}: {e}", path.display()))
}

/// The manifest of `program` with the hashes of `files`.
pub fn manifest(program: &KernelProgram, target: &str, codegen: &str, files: &[(String, Vec<u8>)]) -> Manifest {
    let decls = |v: &[crate::program::Io]| {
        v.iter()
            .map(|io| Decl {
                name: io.name.clone(),
                ty: io.ty.clone(),
            })
            .collect()
    };
    Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        fulgur_version: FULGUR_VERSION.into(),
        target: target.into(),
        name: program.name.clone(),
        symbols: program.symbols.clone(),
        inputs: decls(&program.inputs),
        weights: decls(&program.params),
        outputs: decls(&program.outputs),
        prepare_kernels: program.prepare.len(),
        step_kernels: program.step.len(),
        codes: program.codes,
        codegen: codegen.into(),
        files: files.iter().map(|(p, b)| (p.clone(), sha256_hex(b))).collect(),
        parallel: None,
    }
}

/// The files of an artifact of `program` lowered from `graph_text` (the `.fir` of the optimized graph), with
/// the kernels' loop forms and, where given, their target code (`(extension, text)` per code).
pub fn files(
    program: &KernelProgram,
    graph_text: &str,
    loops: &[String],
    code: Option<(&str, &[String])>,
) -> Result<Vec<(String, Vec<u8>)>, CodegenError> {
    let json = serde_json::to_vec_pretty(program)
        .map_err(|e| CodegenError::Options(format!("cannot serialise the kernel program: {e}")))?;
    let mut v = vec![
        ("program.json".to_string(), json),
        ("program.txt".to_string(), program.text().into_bytes()),
        ("graph.fir".to_string(), graph_text.as_bytes().to_vec()),
    ];
    for (c, text) in loops.iter().enumerate() {
        v.push((format!("kernels/code{c}.loops"), text.clone().into_bytes()));
    }
    if let Some((ext, texts)) = code {
        for (c, text) in texts.iter().enumerate() {
            v.push((format!("kernels/code{c}.{ext}"), text.clone().into_bytes()));
        }
    }
    Ok(v)
}

/// The files an artifact's manifest lists (of any version), or `None` when `dir` holds no artifact manifest.
fn artifact_files(dir: &Path) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return None;
    }
    Some(v.get("files")?.as_object()?.keys().cloned().collect())
}

/// Every file under `dir`, as paths relative to it.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            walk(&e.path(), &r, out)?;
        } else {
            out.push(r.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// Checks before any work that `dir` can receive an artifact: it does not exist (its parent does), is empty,
/// or holds an artifact (which will be replaced).
pub fn check_destination(dir: &Path) -> Result<(), CodegenError> {
    let shown = dir.display();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !parent.is_dir() {
                return Err(CodegenError::Options(format!(
                    "cannot write the artifact {shown}: directory {} does not exist",
                    parent.display()
                )));
            }
            Ok(())
        }
        Err(e) => Err(io_err("cannot write the artifact", dir, e)),
        Ok(m) if !m.is_dir() => Err(CodegenError::Options(format!(
            "cannot write the artifact {shown}: it exists and is not a directory"
        ))),
        Ok(_) => {
            let empty = std::fs::read_dir(dir)
                .map_err(|e| io_err("cannot read", dir, e))?
                .next()
                .is_none();
            if empty {
                return Ok(());
            }
            let Some(listed) = artifact_files(dir) else {
                return Err(CodegenError::Options(format!(
                    "refusing to write the artifact into {shown}: the directory exists, is not empty and holds \
                     no Fulgur artifact (manifest.json); choose a new directory"
                )));
            };
            // replacing an artifact must not take anything else with it
            let mut present = Vec::new();
            walk(dir, Path::new(""), &mut present).map_err(|e| io_err("cannot read", dir, e))?;
            if let Some(extra) = present
                .iter()
                .find(|f| f.as_str() != "manifest.json" && !listed.contains(f))
            {
                return Err(CodegenError::Options(format!(
                    "refusing to replace the artifact {shown}: it holds {extra}, which is not part of the \
                     artifact; move it away or choose a new directory"
                )));
            }
            Ok(())
        }
    }
}

/// Writes `files` and their manifest as the artifact `dir`: into a new directory beside it, renamed into
/// place at the end (replacing an artifact or an empty directory there, never anything else).
pub fn write(dir: &Path, manifest: &Manifest, files: &[(String, Vec<u8>)]) -> Result<(), CodegenError> {
    check_destination(dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| CodegenError::Options(format!("cannot write the artifact {}: no name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // names no other run uses (a process id alone repeats across containers)
    let unique = format!(
        "{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = parent.join(format!(".{name}.{unique}.new"));
    let old = parent.join(format!(".{name}.{unique}.old"));
    let result = (|| {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
        let json = serde_json::to_vec_pretty(manifest)
            .map_err(|e| CodegenError::Options(format!("cannot serialise the manifest: {e}")))?;
        let all = files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .chain([("manifest.json", json.as_slice())]);
        let mut dirs = std::collections::BTreeSet::from([tmp.clone()]);
        for (path, bytes) in all {
            let p = tmp.join(path);
            if let Some(parent) = p.parent() {
                if dirs.insert(parent.to_path_buf()) {
                    std::fs::create_dir_all(parent).map_err(|e| io_err("cannot create", parent, e))?;
                }
            }
            // written and flushed to disk before the directory takes the artifact's name
            let mut f = std::fs::File::create(&p).map_err(|e| io_err("cannot write", &p, e))?;
            std::io::Write::write_all(&mut f, bytes).map_err(|e| io_err("cannot write", &p, e))?;
            f.sync_all().map_err(|e| io_err("cannot write", &p, e))?;
        }
        for d in dirs.iter().rev() {
            if let Ok(f) = std::fs::File::open(d) {
                let _ = f.sync_all();
            }
        }
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| io_err("cannot move the old artifact", dir, e))?;
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            if old.exists() && std::fs::rename(&old, dir).is_err() {
                return Err(CodegenError::Options(format!(
                    "cannot move the new artifact to {}: {e}; the previous artifact is kept in {}",
                    dir.display(),
                    old.display()
                )));
            }
            return Err(io_err("cannot move the new artifact to", dir, e));
        }
        if let Ok(f) = std::fs::File::open(&parent) {
            let _ = f.sync_all();
        }
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Reads and checks the artifact `dir` for `target`: its manifest and kernel program. A parallel artifact is
/// refused (its programs are per rank: [`load_rank`]).
pub fn load(dir: &Path, targets: &[&str]) -> Result<(Manifest, KernelProgram), CodegenError> {
    load_program(dir, targets, None)
}

/// Reads and checks the parallel artifact `dir` for `target`: its manifest and rank `rank`'s kernel program.
/// An artifact of one program, or a rank past the artifact's, is refused.
pub fn load_rank(dir: &Path, targets: &[&str], rank: usize) -> Result<(Manifest, KernelProgram), CodegenError> {
    load_program(dir, targets, Some(rank))
}

/// The manifest of the artifact `dir`, checked for format and version but not its files' hashes: enough to tell
/// a parallel artifact from another before loading a rank.
pub fn read_manifest(dir: &Path) -> Result<Manifest, CodegenError> {
    let shown = dir.display();
    let bad = |m: String| CodegenError::Options(m);
    if !dir.is_dir() {
        return Err(bad(format!("{shown} is not a Fulgur artifact: not a directory")));
    }
    let mpath = dir.join("manifest.json");
    let text = match std::fs::read_to_string(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(format!(
                "{shown} is not a Fulgur artifact: it has no manifest.json (write one with `fulgur compile`)"
            )))
        }
        Err(e) => return Err(io_err("cannot read", &mpath, e)),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("{}: not valid JSON: {e}", mpath.display())))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(bad(format!(
            "{}: not a Fulgur artifact manifest (its `format` is not \"{FORMAT}\")",
            mpath.display()
        )));
    }
    let version = v.get("fulgur_version").and_then(|f| f.as_str()).unwrap_or("unknown");
    let fv = v.get("format_version").and_then(|f| f.as_u64());
    if version != FULGUR_VERSION || fv != Some(FORMAT_VERSION as u64) {
        return Err(bad(format!(
            "artifact {shown} was written by fulgur {version} (artifact format {}); this is fulgur \
             {FULGUR_VERSION} (format {FORMAT_VERSION}): compile it again with this version",
            fv.map(|f| f.to_string()).unwrap_or_else(|| "unknown".into())
        )));
    }
    let m: Manifest =
        serde_json::from_value(v).map_err(|e| bad(format!("{}: not a valid manifest: {e}", mpath.display())))?;
    if let Some(p) = &m.parallel {
        let product: usize = p.mesh.iter().map(|a| a.1).product();
        if p.ranks == 0 || product.checked_mul(p.pp) != Some(p.ranks) {
            let stages = if p.pp == 1 {
                String::new()
            } else {
                format!(" in {} pipeline stages", p.pp)
            };
            return Err(bad(format!(
                "{}: not a valid manifest: `parallel` has {} ranks on a mesh of {product}{stages}",
                mpath.display(),
                p.ranks
            )));
        }
        if p.micro_batches == 0 {
            return Err(bad(format!(
                "{}: not a valid manifest: `parallel` has 0 micro-batches",
                mpath.display()
            )));
        }
    }
    Ok(m)
}

fn load_program(dir: &Path, targets: &[&str], rank: Option<usize>) -> Result<(Manifest, KernelProgram), CodegenError> {
    let shown = dir.display();
    let bad = |m: String| CodegenError::Options(m);
    let mpath = dir.join("manifest.json");
    let m = read_manifest(dir)?;
    if !targets.contains(&m.target.as_str()) {
        return Err(bad(format!(
            "artifact {shown} was compiled for the {} target, which this build cannot run (it runs {})",
            m.target,
            targets.join(", ")
        )));
    }
    let program_rel = match (&m.parallel, rank) {
        (None, None) => "program.json".to_string(),
        (Some(p), Some(r)) if r < p.ranks => format!("{}/program.json", ParallelManifest::rank_dir(r)),
        (Some(p), Some(r)) => {
            return Err(bad(format!(
                "artifact {shown} has {} ranks ({}); there is no rank {r}",
                p.ranks, p.degrees
            )))
        }
        (Some(p), None) => {
            return Err(bad(format!(
                "artifact {shown} is a parallel artifact of {} ranks ({}): one program per rank, run by `fulgur \
                 run` on simulated ranks or by each process of a launched job",
                p.ranks, p.degrees
            )))
        }
        (None, Some(_)) => {
            return Err(bad(format!(
                "artifact {shown} holds one program, not one per rank (compile it with --parallel)"
            )))
        }
    };
    if !m.files.contains_key(&program_rel) {
        return Err(bad(format!("{}: lists no {program_rel}", mpath.display())));
    }
    let mut program_bytes = Vec::new();
    for (rel, want) in &m.files {
        let rel_path = Path::new(rel);
        if rel_path.is_absolute()
            || rel_path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(format!(
                "{}: file `{rel}` lies outside the artifact",
                mpath.display()
            )));
        }
        let p = dir.join(rel_path);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(format!(
                    "artifact {shown} is incomplete: {rel} is missing (compile it again)"
                )))
            }
            Err(e) => return Err(io_err("cannot read", &p, e)),
        };
        if &sha256_hex(&bytes) != want {
            return Err(bad(format!(
                "artifact {shown} was modified after it was written: {rel} does not match its SHA-256 in \
                 manifest.json (compile it again)"
            )));
        }
        if *rel == program_rel {
            program_bytes = bytes;
        }
    }
    let program: KernelProgram = serde_json::from_slice(&program_bytes).map_err(|e| {
        bad(format!(
            "{}: not a valid kernel program: {e}",
            dir.join(&program_rel).display()
        ))
    })?;
    let fresh = manifest(&program, &m.target, &m.codegen, &[]);
    let fits = if m.parallel.as_ref().is_some_and(|p| p.pp > 1) {
        // a pipeline stage's program: its weights among the manifest's (every stage's), its inputs and outputs
        // the manifest's of the same dtype where they share a name (at a micro-batch's size), or the tensors
        // crossing its cuts
        let dtype_of = |v: &[Decl], name: &str| v.iter().find(|d| d.name == name).map(|d| d.ty.dtype);
        fresh.weights.iter().all(|w| m.weights.contains(w))
            && fresh
                .inputs
                .iter()
                .all(|d| dtype_of(&m.inputs, &d.name).is_none_or(|t| t == d.ty.dtype))
            && fresh
                .outputs
                .iter()
                .all(|d| dtype_of(&m.outputs, &d.name).is_none_or(|t| t == d.ty.dtype))
    } else {
        fresh.inputs == m.inputs
            && fresh.weights == m.weights
            && fresh.outputs == m.outputs
            && fresh.symbols == m.symbols
    };
    if !fits {
        return Err(bad(format!(
            "artifact {shown}: manifest.json's inputs, weights, outputs or symbols differ from {program_rel}'s"
        )));
    }
    Ok((m, program))
}

/// The manifest's interface for people: inputs, weights (counted), outputs. A long list (a training step has
/// three inputs and outputs per parameter) shows its first entries and the count; `manifest.json` has them all.
pub fn describe(m: &Manifest) -> String {
    const SHOWN: usize = 6;
    let list = |v: &[Decl]| {
        let mut s = v
            .iter()
            .take(SHOWN)
            .map(|d| format!("{}: {}", d.name, d.ty))
            .collect::<Vec<_>>()
            .join(", ");
        if v.len() > SHOWN {
            s.push_str(&format!(", … ({} in all)", v.len()));
        }
        s
    };
    let weight_elements: u128 = m
        .weights
        .iter()
        .map(|d| {
            d.ty.shape
                .as_consts()
                .map(|s| s.iter().product::<usize>() as u128)
                .unwrap_or(0)
        })
        .sum();
    format!(
        "{} ({} target, fulgur {}): {} step kernels ({} codes), {} prepare kernels; inputs {}; {} weights \
         ({weight_elements} elements); outputs {}; {}",
        m.name,
        m.target,
        m.fulgur_version,
        m.step_kernels,
        m.codes,
        m.prepare_kernels,
        list(&m.inputs),
        m.weights.len(),
        list(&m.outputs),
        m.codegen
    )
}

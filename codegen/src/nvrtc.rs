//! NVRTC: CUDA C++ source to a cubin for one architecture, with an on-disk cache.
//!
//! `libnvrtc` is opened at run time (cudarc's dynamic loading): nothing CUDA is needed to build, and a machine
//! without a GPU compiles as well as one with (CI installs NVRTC from PyPI and compiles every kernel).
//! [`available`] says whether the library can be opened, so that callers report its absence instead of
//! panicking inside the loader.
//!
//! The cache key is the SHA-256 of the source, the architecture, NVRTC's version and the options; entries are
//! written to a temporary name and renamed, so a crash never leaves a truncated cubin under a valid key.

use crate::CodegenError;
use cudarc::nvrtc::{result, sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The options every kernel is compiled with (besides the architecture): IEEE division and square root,
/// no fast math (the numerics contract).
pub const OPTIONS: [&str; 3] = ["-std=c++17", "--prec-div=true", "--prec-sqrt=true"];

/// NVRTC's version, or why it cannot be used.
pub fn available() -> Result<(i32, i32), String> {
    // SAFETY: only tries to open the library
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "libnvrtc cannot be opened (install CUDA, or `pip install nvidia-cuda-nvrtc` and put its \
                    `nvidia/cu13/lib` on LD_LIBRARY_PATH)"
                .into(),
        );
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the pointers are valid
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// A compiled kernel code.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The cubin for the architecture.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), empty when it had nothing to say.
    pub log: String,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Where compiled kernels are cached: `$FULGUR_CACHE_DIR`, else `$XDG_CACHE_HOME/fulgur/cuda`, else
/// `~/.cache/fulgur/cuda`; `None` when none can be named.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FULGUR_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("fulgur/cuda"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fulgur/cuda"))
}

/// The cache key of `source` compiled for `arch` by NVRTC `version`.
pub fn cache_key(source: &str, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0]);
    h.update(arch.as_bytes());
    h.update([0]);
    h.update(format!("{}.{}", version.0, version.1).as_bytes());
    for o in OPTIONS {
        h.update([0]);
        h.update(o.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles `source` (named `name` in errors) for `arch` (`sm_90`, `sm_90a`, ...), through the cache in
/// `cache` when given. A source that does not compile is an error naming it with NVRTC's log.
pub fn compile(name: &str, source: &str, arch: &str, cache: Option<&Path>) -> Result<Compiled, CodegenError> {
    let version = available().map_err(CodegenError::Options)?;
    let key = cache_key(source, arch, version);
    let entry = cache.map(|d| d.join(format!("{key}.cubin")));
    if let Some(e) = &entry {
        if let Ok(cubin) = std::fs::read(e) {
            if !cubin.is_empty() {
                return Ok(Compiled {
                    cubin,
                    log: String::new(),
                    cached: true,
                });
            }
        }
    }
    let src =
        CString::new(source).map_err(|_| CodegenError::Options(format!("CUDA source of {name} holds a NUL byte")))?;
    let cname = CString::new(name).unwrap_or_else(|_| CString::new("kernel.cu").expect("no NUL"));
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| CodegenError::Options(format!("NVRTC cannot create a program for {name}: {e:?}")))?;
    let mut opts: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    opts.extend(OPTIONS.iter().map(|s| s.to_string()));
    // SAFETY: `prog` was created above and is destroyed once, below
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|v| {
            let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        })
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(CodegenError::Options(format!(
            "NVRTC could not compile {name} for {arch} ({e:?}):\n{log}"
        ))),
        Ok(()) => cubin_of(prog).map_err(|m| CodegenError::Options(format!("{name}: {m}"))),
    };
    // SAFETY: created above, not yet destroyed
    let _ = unsafe { result::destroy_program(prog) };
    let cubin = out?;
    if let Some(e) = &entry {
        // a cache that cannot be written is not an error: the next run compiles again
        if let Some(dir) = e.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = dir.join(format!(".{key}.{}.tmp", std::process::id()));
                if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, e).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
    }
    Ok(Compiled {
        cubin,
        log,
        cached: false,
    })
}

fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` is a compiled program
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize failed: {e:?}"))?;
    if size == 0 {
        return Err("NVRTC produced no cubin (a virtual architecture such as compute_90 gives PTX only)".into());
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN failed: {e:?}"))?;
    Ok(buf)
}

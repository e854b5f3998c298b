//! Finds libmoe.so and tells rustc to link it, in this order:
//! 1. the directory in the MOE_LIB_DIR environment variable;
//! 2. `pkg-config --libs-only-L moe` (then `--variable=libdir`), if pkg-config exists;
//! 3. the repository's build directories: build/, then build-*/ (newest libmoe.so first).
//!
//! Panics listing every place it tried when none holds libmoe.so.
//! Dependents read the chosen directory as DEP_MOE_LIB_DIR (links = "moe").

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const LIB_FILE: &str = "libmoe.so";

fn has_lib(dir: &Path) -> bool {
    dir.join(LIB_FILE).is_file()
}

fn from_env(tried: &mut Vec<String>) -> Option<PathBuf> {
    match env::var_os("MOE_LIB_DIR") {
        None => {
            tried.push("MOE_LIB_DIR: not set".into());
            None
        }
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if has_lib(&dir) {
                return Some(dir);
            }
            println!(
                "cargo:warning=MOE_LIB_DIR={} holds no {LIB_FILE}; searching further",
                dir.display()
            );
            tried.push(format!("MOE_LIB_DIR={} (no {LIB_FILE})", dir.display()));
            None
        }
    }
}

fn pkg_config(args: &[&str]) -> Result<String, String> {
    let out = Command::new("pkg-config")
        .args(args)
        .output()
        .map_err(|e| format!("could not run: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn from_pkg_config(tried: &mut Vec<String>) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    match pkg_config(&["--libs-only-L", "moe"]) {
        Err(e) => {
            tried.push(format!("pkg-config --libs-only-L moe: {e}"));
            return None;
        }
        Ok(flags) => dirs.extend(
            flags
                .split_whitespace()
                .filter_map(|f| f.strip_prefix("-L"))
                .map(PathBuf::from),
        ),
    }
    // pkg-config drops -L for system directories; libdir still names it.
    if let Ok(libdir) = pkg_config(&["--variable=libdir", "moe"]) {
        if !libdir.is_empty() {
            dirs.push(PathBuf::from(libdir));
        }
    }
    for dir in &dirs {
        if has_lib(dir) {
            return Some(dir.clone());
        }
        tried.push(format!("pkg-config moe: {} (no {LIB_FILE})", dir.display()));
    }
    if dirs.is_empty() {
        tried.push("pkg-config moe: no library directory".into());
    }
    None
}

fn from_repo(tried: &mut Vec<String>) -> Option<PathBuf> {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // bindings/rust/moe-sys -> repository root
    let root = manifest.join("../../..");
    let root = root.canonicalize().unwrap_or(root);
    let build = root.join("build");
    if has_lib(&build) {
        return Some(build);
    }
    tried.push(format!("{} (no {LIB_FILE})", build.display()));

    let mut others: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_build = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("build-"));
            if !is_build || !path.is_dir() {
                continue;
            }
            match std::fs::metadata(path.join(LIB_FILE)).and_then(|m| m.modified()) {
                Ok(mtime) => others.push((mtime, path)),
                Err(_) => tried.push(format!("{} (no {LIB_FILE})", path.display())),
            }
        }
    }
    if others.is_empty() {
        tried.push(format!(
            "{}/build-* (no such directory with {LIB_FILE})",
            root.display()
        ));
    }
    // Several helpers' build trees may coexist: the most recently built one wins.
    others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    others.into_iter().next().map(|(_, dir)| dir)
}

/// With the `nccl` feature the library must export the a2a functions; say so
/// here rather than with an undefined-symbol error from the linker.
fn check_nccl_symbols(dir: &Path) {
    let lib = dir.join(LIB_FILE);
    let bytes = std::fs::read(&lib).unwrap_or_else(|e| panic!("moe-sys: cannot read {}: {e}", lib.display()));
    let needle = b"moe_a2a_create";
    if !bytes.windows(needle.len()).any(|w| w == needle) {
        panic!(
            "moe-sys: the `nccl` feature needs a libmoe built with NCCL (CMake MOE_WITH_NCCL), \
             but {} has no moe_a2a_create; build with CUDA and NCCL or drop the feature",
            lib.display()
        );
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MOE_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let mut tried = Vec::new();
    let dir = from_env(&mut tried)
        .or_else(|| from_pkg_config(&mut tried))
        .or_else(|| from_repo(&mut tried))
        .unwrap_or_else(|| {
            panic!(
                "moe-sys: could not find {LIB_FILE}. Build libmoe (cmake -S . -B build -G Ninja && \
                 ninja -C build) or set MOE_LIB_DIR to the directory holding {LIB_FILE}. Tried:\n  {}",
                tried.join("\n  ")
            )
        });
    let dir = dir.canonicalize().unwrap_or(dir);
    if env::var_os("CARGO_FEATURE_NCCL").is_some() {
        check_nccl_symbols(&dir);
    }
    let dir = dir.display();

    println!("cargo:rerun-if-changed={dir}/{LIB_FILE}");
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-lib=dylib=moe");
    // Tests and examples of this package run without LD_LIBRARY_PATH.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    // Read by dependents as DEP_MOE_LIB_DIR (link args do not propagate).
    println!("cargo:lib_dir={dir}");
}

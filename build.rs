//! Embeds kernels/ into the crate: NVRTC compiles from a string and sees no files at run time, so
//! every `#include "..."` of kernels/all.cu is inlined here (each file once; a repeated include is
//! dropped, as `#pragma once` would). The result is `$OUT_DIR/kernels.rs` with `KERNELS_CU`.
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

fn inline(path: &Path, seen: &mut HashSet<PathBuf>, out: &mut String) {
    let canon = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("kernel source {}: {e}", path.display()));
    if !seen.insert(canon.clone()) {
        return;
    }
    let text =
        fs::read_to_string(&canon).unwrap_or_else(|e| panic!("reading {}: {e}", canon.display()));
    let dir = canon.parent().expect("kernel file has a parent directory");
    out.push_str(&format!(
        "// ---- {} ----\n",
        canon.file_name().unwrap().to_string_lossy()
    ));
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("#include") {
            let rest = rest.trim();
            if let Some(name) = rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                inline(&dir.join(name), seen, out);
                continue;
            }
            panic!("{}: only #include \"local\" is allowed in kernels (NVRTC has no system headers here): {line}", canon.display());
        }
        out.push_str(line);
        out.push('\n');
    }
}

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for entry in fs::read_dir(dir).expect("kernels/ exists") {
        let p = entry.expect("readable kernels/ entry").path();
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let mut src = String::new();
    inline(&dir.join("all.cu"), &mut HashSet::new(), &mut src);
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR set by cargo")).join("kernels.rs");
    fs::write(
        &out,
        format!(
            "/// The whole kernel translation unit, includes inlined (built from kernels/all.cu).\npub const KERNELS_CU: &str = {src:?};\n"
        ),
    )
    .expect("write kernels.rs");
}

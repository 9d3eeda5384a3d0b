//! Build a guest crate of this workspace as a `wasm32-wasip2` component, the
//! way wasmtime's test-programs build their guests: a nested `cargo build`
//! into a target directory of its own, so it never waits on the outer build's
//! lock. Shared by the host's and the tests' build scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Build `package` with `cargo_args` into `<target>/guests/<name>` and copy
/// the component to `<out_dir>/<name>.wasm`; returns that path.
pub fn build_component(
    workspace: &Path,
    package: &str,
    cargo_args: &[&str],
    name: &str,
) -> PathBuf {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let target_root = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    let target_dir = target_root.join("guests").join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--package",
            package,
        ])
        .args(cargo_args)
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's flags and wrappers (clippy, coverage) are for the
        // host target: the guest gets a plain release build without debug info.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo for {package}: {e}"));
    assert!(
        status.success(),
        "building the {package} component failed; is the wasm32-wasip2 target installed (rustup target add wasm32-wasip2)?"
    );
    let artifact = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    let dest = out_dir.join(format!("{name}.wasm"));
    std::fs::copy(&artifact, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", artifact.display()));
    dest
}

/// Rebuild when anything the guests are made of changes.
pub fn rerun_if_changed(workspace: &Path, paths: &[&str]) {
    for path in paths {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
}

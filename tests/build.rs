//! Builds the hostile test component (`tests/hostile-guest`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../host/build/guest_build.rs"]
mod guest_build;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest.parent().map(PathBuf::from).unwrap_or(manifest);
    guest_build::rerun_if_changed(
        &workspace,
        &[
            "guest/src",
            "guest/Cargo.toml",
            "tests/hostile-guest",
            "wit",
            "Cargo.lock",
        ],
    );
    let path = guest_build::build_component(&workspace, "mailroot-hostile-guest", &[], "hostile");
    println!(
        "cargo:rustc-env=MAILROOT_HOSTILE_COMPONENT={}",
        path.display()
    );
}

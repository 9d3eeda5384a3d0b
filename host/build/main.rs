//! Builds the guest twice, as the `relay` world component (embedded in the
//! binary) and as the `plugin` world component (WASI only, for other hosts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod guest_build;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest.parent().map(PathBuf::from).unwrap_or(manifest);
    guest_build::rerun_if_changed(
        &workspace,
        &["guest/src", "guest/Cargo.toml", "wit", "Cargo.lock"],
    );
    guest_build::build_component(&workspace, "mailroot-guest", &[], "mailroot_relay");
    guest_build::build_component(
        &workspace,
        "mailroot-guest",
        &["--no-default-features", "--features", "export"],
        "mailroot_plugin",
    );
}

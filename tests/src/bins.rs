//! Where the binaries under test are.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Overrides the directory holding `overlay-coord`, `overlayd` and `overlayctl`.
pub const BIN_DIR_ENV: &str = "OVERLAY_BIN_DIR";

/// The directory the binaries are taken from: `$OVERLAY_BIN_DIR`, else
/// `$CARGO_TARGET_DIR/debug`, else the workspace's `target/debug`.
pub fn bin_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("debug")
}

/// The path of one of overlay's binaries, or an error telling how to build it.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo build --workspace` first (or set {BIN_DIR_ENV})",
            path.display()
        );
    }
    Ok(path)
}

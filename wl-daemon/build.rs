//! Builds the eBPF object from `wl-ebpf` for the BPF target (nightly, `bpf-linker`), as the
//! aya template does. `cargo xtask setup` installs what this needs.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../wl-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to wl-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "wl-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object failed: run `cargo xtask setup` (nightly rust-src, bpf-linker)")
}

//! Empty on purpose: the programs live in `main.rs` and are built for the BPF target by
//! wl-daemon's `build.rs`. This library target only exists so that wl-daemon can list the
//! crate as a build-dependency, which makes cargo rebuild the object when it changes.
#![no_std]

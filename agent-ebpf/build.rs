//! Link flags for the eBPF object.
fn main() {
    // bpf-linker asks LLVM to keep memory copies in order for JITs that pattern-match them,
    // which also turns every zeroing or copy of a struct into a call of a byte-at-a-time
    // `memset`/`memcpy` subprogram. The packet line runs on every packet: with this flag LLVM
    // writes those as plain word stores (x86-64 and arm64 JITs match no such patterns).
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}

//! skiff-shim: keeps one container's logs and exit status across agent restarts (see
//! skiff_runtime::shim). Spawned by skiff_runtime::Runc, not by hand.

fn main() {
    std::process::exit(skiff_runtime::shim::main(std::env::args_os().skip(1)));
}

//! Generates the CRI v1 gRPC client from the vendored k8s.io/cri-api `api.proto`
//! (`proto/cri-api/README.md` says where it comes from). Needs `protoc` (protobuf-compiler,
//! installed by scripts/setup.sh).
//!
//! Debian 12's protoc is 3.21, which does not know the `debug_redact` field option (3.22+) that
//! AuthConfig's secret fields carry: the file is compiled from a copy in OUT_DIR without that
//! option. It only affects how generated code prints those fields, never the wire format.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri-api/api.proto");
    let source = std::fs::read_to_string("proto/cri-api/api.proto")?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("cri-proto");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("api.proto"), source.replace(" [debug_redact = true]", ""))?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&[out.join("api.proto")], &[out])
        .map_err(|e| format!("compiling the CRI api.proto (is protoc installed? scripts/setup.sh): {e}"))?;
    Ok(())
}

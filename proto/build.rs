//! Generates the protobuf messages and the tonic client and server from `octolog/v1/*.proto`
//! with a vendored `protoc`, so that building needs nothing but the Rust toolchain.

use std::error::Error;
use std::path::PathBuf;

/// The `.proto` files to compile, relative to the crate root (which is also the include path).
const PROTOS: &[&str] = &["octolog/v1/octolog.proto", "octolog/v1/groups.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    // Always the vendored protoc, even when one is installed: the generated code then does not
    // depend on which protoc a machine happens to have.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);

    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| manifest_dir.join(p)).collect();
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Every `bytes` field becomes `bytes::Bytes`, so the broker can keep produce payloads and
        // serve fetched batches without copying them.
        .bytes(".")
        .file_descriptor_set_path(out_dir.join("octolog_descriptor.bin"))
        .compile_protos(&protos, &[manifest_dir])?;
    Ok(())
}

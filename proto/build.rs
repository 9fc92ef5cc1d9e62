//! Compiles `raftpg/v1/raftpg.proto` with the system `protoc` (Debian `protobuf-compiler`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=raftpg/v1/raftpg.proto");
    println!("cargo:rerun-if-changed=build.rs");
    // Malformed messages are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
    // The descriptor set serves gRPC server reflection (grpcurl without the .proto).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("raftpg_descriptor.bin");
    tonic_prost_build::configure()
        .codec_path("crate::codec::RaftpgCodec")
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&["raftpg/v1/raftpg.proto"], &["."])?;
    Ok(())
}

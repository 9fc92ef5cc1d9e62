//! Compiles `raftpg/v1/raftpg.proto` with the system `protoc` (Debian `protobuf-compiler`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=raftpg/v1/raftpg.proto");
    println!("cargo:rerun-if-changed=build.rs");
    // Malformed messages are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::RaftpgCodec")
        .compile_protos(&["raftpg/v1/raftpg.proto"], &["."])?;
    Ok(())
}

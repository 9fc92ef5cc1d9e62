//! Compiles `raftpg/v1/raftpg.proto` with the system `protoc` (Debian `protobuf-compiler`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=raftpg/v1/raftpg.proto");
    tonic_prost_build::configure().compile_protos(&["raftpg/v1/raftpg.proto"], &["."])?;
    Ok(())
}

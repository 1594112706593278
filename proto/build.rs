//! Compiles `proto/*.proto` in pure Rust (protox), so no `protoc` needs installing.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/runtimeai.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}

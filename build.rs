//! Compiles `proto/` with a vendored protoc (no system protoc needed) and writes a file
//! descriptor set for gRPC server reflection.

#[cfg(feature = "server")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use std::path::PathBuf;

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ip2p_descriptor.bin"))
        .compile_protos(&["proto/ip2p/v1/image_editor.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Without the `server` feature there is no service to generate.
#[cfg(not(feature = "server"))]
fn main() {}

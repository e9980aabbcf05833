//! Generates the kubenft.v1 types and the descriptor set served by reflection.
//! `protoc` comes from `protoc-bin-vendored` so a fresh machine needs no system package;
//! `$PROTOC` overrides it.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut cfg = tonic_prost_build::Config::new();
    cfg.protoc_executable(match std::env::var_os("PROTOC") {
        Some(p) => p.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    });
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("kubenft_descriptor.bin"))
        .compile_with_config(
            cfg,
            &[
                "proto/kubenft/v1/rules.proto",
                "proto/kubenft/v1/stream.proto",
                "proto/kubenft/v1/inspect.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}

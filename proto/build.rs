//! Generates the kubenft.v1 types and the descriptor set served by reflection.
//! `protoc` comes from `protoc-bin-vendored` so a fresh machine needs no system package;
//! `$PROTOC` overrides it.
//!
//! Also stamps the build with its git commit (`KUBENFT_BUILD_COMMIT`, read by `release.rs`):
//! `$KUBENFT_GIT_COMMIT` if set (image builds, which have no `.git`), else
//! `git rev-parse --short=12 HEAD`, else `unknown`. Finding no commit never fails the build.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rustc-env=KUBENFT_BUILD_COMMIT={}", git_commit());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut cfg = tonic_prost_build::Config::new();
    cfg.protoc_executable(match std::env::var_os("PROTOC") {
        Some(p) => p.into(),
        None => protoc_bin_vendored::protoc_bin_path()?,
    });
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-changed=proto");
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
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

/// The commit this build is made from: at most 12 characters, letters, digits, `.`, `-`, `_`
/// (it ends up in every Hello, which bounds the agent version to 64 bytes).
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=KUBENFT_GIT_COMMIT");
    if let Ok(given) = std::env::var("KUBENFT_GIT_COMMIT") {
        let given = given.trim();
        if let Some(commit) = sanitize(given) {
            return commit;
        }
        println!(
            "cargo:warning=KUBENFT_GIT_COMMIT={given:?} is not a commit (letters, digits, `.`, `-`, `_`); using `unknown`"
        );
        return "unknown".into();
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    watch_head(&manifest);
    git(&manifest, &["rev-parse", "--short=12", "HEAD"])
        .and_then(|c| sanitize(&c))
        .unwrap_or_else(|| "unknown".into())
}

fn sanitize(commit: &str) -> Option<String> {
    let ok = !commit.is_empty()
        && commit
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    ok.then(|| commit.chars().take(12).collect())
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

/// Reruns this script when HEAD moves: `HEAD` itself (a checkout), the branch it names (a
/// commit; or the folder that will hold it while the branch is packed) and `packed-refs`.
/// Works in linked worktrees, whose HEAD is apart from the shared refs. Only paths that exist
/// are named: cargo would rerun the script on every build for a missing one.
fn watch_head(dir: &Path) {
    let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) else {
        return;
    };
    let git_dir = PathBuf::from(git_dir);
    let common = git(
        dir,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
    )
    .map_or_else(|| git_dir.clone(), PathBuf::from);
    let mut watched = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        let loose = common.join(&branch);
        if loose.exists() {
            watched.push(loose);
        } else if let Some(parent) = loose.parent() {
            watched.push(parent.to_path_buf());
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

//! `kubernetes_build_info`: a constant 1 labelled with what the binary was built from, with the
//! label names Kubernetes' component-base gives it.
//!
//! kubenft is not Kubernetes and not Go: `major`, `minor` and `git_version` are kubenft's
//! release, `go_version` is empty and `compiler` is `rustc`. `git_tree_state` and
//! `build_date` come from `$KUBENFT_GIT_TREE_STATE` and `$KUBENFT_BUILD_DATE` at build time;
//! unset, they are what an unstamped Kubernetes build reports (empty, and the Unix epoch).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use kubenft_proto::release::{GIT_COMMIT, RELEASE};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub major: String,
    pub minor: String,
    pub git_version: String,
    pub git_commit: String,
    pub git_tree_state: String,
    pub build_date: String,
    pub go_version: String,
    pub compiler: String,
    pub platform: String,
}

impl BuildLabels {
    /// This build's labels.
    pub fn current() -> BuildLabels {
        let mut parts = RELEASE.split('.');
        let mut next = || parts.next().unwrap_or_default().to_owned();
        let (major, minor) = (next(), next());
        BuildLabels {
            major,
            minor,
            git_version: format!("v{RELEASE}"),
            git_commit: GIT_COMMIT.to_owned(),
            git_tree_state: option_env!("KUBENFT_GIT_TREE_STATE")
                .unwrap_or_default()
                .to_owned(),
            build_date: option_env!("KUBENFT_BUILD_DATE")
                .unwrap_or("1970-01-01T00:00:00Z")
                .to_owned(),
            go_version: String::new(),
            compiler: "rustc".to_owned(),
            platform: platform(),
        }
    }
}

/// `GOOS/GOARCH` as Go names them (`linux/amd64`, `linux/arm64`).
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// Registers `kubernetes_build_info` in `registry` (a root registry: no prefix).
pub fn register(registry: &mut Registry) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels::current()).set(1);
    registry.register(
        "kubernetes_build_info",
        "A metric with a constant '1' value labeled by major, minor, git version, git commit, git tree state, build date, Go version, and compiler from which the binary was built, and platform on which it is running",
        info,
    );
}

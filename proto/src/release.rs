//! What this build is, and which rule-stream protocol it speaks: one place for both
//! binaries' `--version`, the agent's Hello and both inspection services.
//!
//! The version-skew rule (docs/controller.md, "Releases, protocols and version skew"):
//! releases do not have to match, protocols do. A controller accepts agents speaking
//! [`OLDEST_AGENT_PROTOCOL`] to [`PROTOCOL_VERSION`] (its own and, once there is one, the one
//! before), so controllers are upgraded first and agents may lag one protocol behind, never
//! lead. Any other agent is refused before anything is sent.

/// The release, as in Cargo.toml.
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// The commit the build was made from (12 hex digits), or `unknown` (see build.rs).
pub const GIT_COMMIT: &str = env!("KUBENFT_BUILD_COMMIT");

/// The release and commit, e.g. `0.1.0 (git 07b6384abcde)`: what `--version` prints and
/// what inspection shows for either binary.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("KUBENFT_BUILD_COMMIT"),
    ")"
);

/// The rule-stream protocol this build speaks. Raised when a change to `kubenft.v1` means a
/// peer of the previous protocol would misread the stream (a new resource kind an old agent
/// would not apply, a field whose absence changes meaning); fields an old peer may ignore
/// safely do not raise it.
///
/// - 1: the first.
/// - 2: `NodeRules.detect_local_mode` and `local_interface` (an agent of protocol 1 would
///   render the interface modes as "nothing is local"). A controller still serves agents of
///   protocol 1 unless its `--detect-local-mode` is an interface mode
///   ([`INTERFACE_DETECT_LOCAL_PROTOCOL`]).
pub const PROTOCOL_VERSION: u32 = 2;

/// The oldest agent protocol that renders `--detect-local-mode BridgeInterface` and
/// `InterfaceNamePrefix`.
pub const INTERFACE_DETECT_LOCAL_PROTOCOL: u32 = 2;

/// The oldest agent protocol a controller of this build accepts.
pub const OLDEST_AGENT_PROTOCOL: u32 = 1;

/// The protocol an agent speaks, from its Hello: 0 (the field not set) is an agent built
/// before protocol versions existed, which speaks protocol 1.
pub fn agent_protocol(announced: u32) -> u32 {
    announced.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_release_and_commit() {
        assert_eq!(VERSION, format!("{RELEASE} (git {GIT_COMMIT})"));
        assert!(
            !GIT_COMMIT.is_empty() && GIT_COMMIT.len() <= 12,
            "{GIT_COMMIT:?}"
        );
        // Inside this repository the commit is known (image builds pass it in).
        assert_ne!(GIT_COMMIT, "unknown");
    }

    #[test]
    fn an_agent_without_a_protocol_speaks_the_first() {
        assert_eq!(agent_protocol(0), 1);
        assert_eq!(agent_protocol(1), 1);
        assert_eq!(agent_protocol(7), 7);
    }
}

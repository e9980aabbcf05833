//! The version-skew rule between controllers and agents, enforced when a stream opens.
//!
//! Releases do not have to match; the rule-stream protocol does. A controller accepts an agent
//! whose protocol is between [`OLDEST_AGENT_PROTOCOL`] and its own [`PROTOCOL_VERSION`]: agents
//! may lag behind (by one protocol, once there is a second) but never lead, so controllers
//! are upgraded first. Any other agent is refused with FAILED_PRECONDITION naming both
//! versions before anything is sent to it; it keeps enforcing what it has and retries.

use kubenft_proto::release::{
    OLDEST_AGENT_PROTOCOL, PROTOCOL_VERSION, VERSION as CONTROLLER_VERSION, agent_protocol,
};
use tonic::Status;

/// Why an agent is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skew {
    #[error(
        "agent {agent_version:?} speaks rule-stream protocol {agent}, newer than this controller ({CONTROLLER_VERSION}) speaks ({oldest} to {newest}): upgrade the controllers first"
    )]
    AgentNewer {
        agent_version: String,
        agent: u32,
        oldest: u32,
        newest: u32,
    },
    #[error(
        "agent {agent_version:?} speaks rule-stream protocol {agent}, older than this controller ({CONTROLLER_VERSION}) accepts ({oldest} to {newest}): upgrade the agent"
    )]
    AgentOlder {
        agent_version: String,
        agent: u32,
        oldest: u32,
        newest: u32,
    },
    /// The agent speaks a protocol this controller accepts, but not one that carries a
    /// setting the controller was started with: it would misapply it.
    #[error(
        "agent {agent_version:?} speaks rule-stream protocol {agent}, but this controller's ({CONTROLLER_VERSION}) {feature} needs protocol {needed} or later: upgrade the agent"
    )]
    FeatureNeedsNewer {
        agent_version: String,
        agent: u32,
        needed: u32,
        feature: String,
    },
}

impl Skew {
    pub fn status(&self) -> Status {
        Status::failed_precondition(self.to_string())
    }
}

/// Whether this controller speaks the protocol an agent announced (`announced`, from its
/// Hello), by the rule above.
pub fn check(agent_version: &str, announced: u32) -> Result<u32, Skew> {
    check_within(
        agent_version,
        announced,
        OLDEST_AGENT_PROTOCOL,
        PROTOCOL_VERSION,
    )
}

/// [`check`], and then whether the agent's protocol carries `feature`, which needs protocol
/// `needed` (an older agent would ignore the fields that say it, and misapply the rules).
pub fn check_feature(
    agent_version: &str,
    announced: u32,
    (feature, needed): (&str, u32),
) -> Result<u32, Skew> {
    let agent = check(agent_version, announced)?;
    if agent < needed {
        return Err(Skew::FeatureNeedsNewer {
            agent_version: agent_version.to_owned(),
            agent,
            needed,
            feature: feature.to_owned(),
        });
    }
    Ok(agent)
}

fn check_within(
    agent_version: &str,
    announced: u32,
    oldest: u32,
    newest: u32,
) -> Result<u32, Skew> {
    let agent = agent_protocol(announced);
    let agent_version = agent_version.to_owned();
    if agent > newest {
        Err(Skew::AgentNewer {
            agent_version,
            agent,
            oldest,
            newest,
        })
    } else if agent < oldest {
        Err(Skew::AgentOlder {
            agent_version,
            agent,
            oldest,
            newest,
        })
    } else {
        Ok(agent)
    }
}

/// Whether an accepted agent's release differs from this controller's (shown, not refused).
pub fn release_differs(agent_version: &str) -> bool {
    !agent_version.is_empty() && agent_version != CONTROLLER_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_accepts_its_own_protocol_and_a_hello_without_one() {
        assert_eq!(check("x", PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        assert_eq!(check("0.1.0", 0), Ok(1));
    }

    #[test]
    fn an_agent_ahead_of_the_controller_is_refused_naming_both_versions() {
        let err = check("9.9.9 (git abc)", PROTOCOL_VERSION + 1).unwrap_err();
        let status = err.status();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        let text = status.message();
        assert!(
            text.contains(&format!("protocol {}", PROTOCOL_VERSION + 1))
                && text.contains(&format!("({OLDEST_AGENT_PROTOCOL} to {PROTOCOL_VERSION})"))
                && text.contains("9.9.9 (git abc)")
                && text.contains(CONTROLLER_VERSION)
                && text.contains("upgrade the controllers first"),
            "{text}"
        );
    }

    /// With a window of two protocols (a controller of protocol 3 accepting 2): one behind
    /// is served, two behind and one ahead are refused.
    #[test]
    fn agents_may_lag_by_the_window_and_never_lead() {
        assert_eq!(check_within("a", 3, 2, 3), Ok(3));
        assert_eq!(check_within("a", 2, 2, 3), Ok(2));
        assert!(matches!(
            check_within("a", 1, 2, 3),
            Err(Skew::AgentOlder { agent: 1, .. })
        ));
        // Not set: protocol 1, too old for this window.
        assert!(matches!(
            check_within("a", 0, 2, 3),
            Err(Skew::AgentOlder { agent: 1, .. })
        ));
        let older = check_within("0.1.0", 1, 2, 3).unwrap_err().to_string();
        assert!(older.contains("upgrade the agent"), "{older}");
        assert!(matches!(
            check_within("a", 4, 2, 3),
            Err(Skew::AgentNewer { agent: 4, .. })
        ));
    }

    #[test]
    fn a_setting_an_older_agent_would_misapply_refuses_it() {
        let feature = ("--detect-local-mode BridgeInterface", 2);
        assert_eq!(check_feature("a", 2, feature), Ok(2));
        let err = check_feature("0.1.0 (git 0123)", 1, feature).unwrap_err();
        assert!(matches!(
            err,
            Skew::FeatureNeedsNewer {
                agent: 1,
                needed: 2,
                ..
            }
        ));
        let text = err.status().message().to_owned();
        assert!(
            text.contains("--detect-local-mode BridgeInterface")
                && text.contains("protocol 1")
                && text.contains("needs protocol 2")
                && text.contains("upgrade the agent"),
            "{text}"
        );
        // A setting every accepted protocol carries changes nothing.
        assert_eq!(
            check_feature("a", 0, ("--detect-local-mode NodeCIDR", 1)),
            Ok(1)
        );
    }

    #[test]
    fn only_a_different_release_is_skew() {
        assert!(!release_differs(CONTROLLER_VERSION));
        assert!(release_differs("0.0.9 (git 0123456789ab)"));
        assert!(!release_differs(""));
    }
}

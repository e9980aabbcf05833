//! The node's own addresses, reported in Hello so the controller can resolve
//! nodePortAddresses given as CIDRs.

use std::net::IpAddr;

use serde::Deserialize;
use tokio::process::Command;

#[derive(Deserialize)]
struct Interface {
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    local: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AddrsError {
    #[error("could not run `ip -j addr`: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("`ip -j addr` failed: {0}")]
    Failed(String),
    #[error("cannot parse `ip -j addr` output: {0}")]
    Parse(#[from] serde_json::Error),
}

/// Every non-loopback address of the node's interfaces, sorted, without duplicates.
pub async fn node_addresses() -> Result<Vec<String>, AddrsError> {
    let out = Command::new("ip").args(["-j", "addr"]).output().await?;
    if !out.status.success() {
        return Err(AddrsError::Failed(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    parse(&out.stdout)
}

fn parse(json: &[u8]) -> Result<Vec<String>, AddrsError> {
    let interfaces: Vec<Interface> = serde_json::from_slice(json)?;
    let mut addrs: Vec<IpAddr> = interfaces
        .iter()
        .filter(|i| !i.flags.iter().any(|f| f == "LOOPBACK"))
        .flat_map(|i| &i.addr_info)
        .filter_map(|a| a.local.as_deref()?.parse::<IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs.iter().map(ToString::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_non_loopback_addresses() {
        let json = br#"[
          {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8},{"family":"inet6","local":"::1","prefixlen":128}]},
          {"ifindex":2,"ifname":"eth0","flags":["BROADCAST","UP"],"addr_info":[{"family":"inet","local":"192.168.50.3","prefixlen":24},{"family":"inet6","local":"fd00::3","prefixlen":64}]},
          {"ifindex":3,"ifname":"dummy0","flags":["BROADCAST"],"addr_info":[]}
        ]"#;
        assert_eq!(parse(json).unwrap(), ["192.168.50.3", "fd00::3"]);
    }
}

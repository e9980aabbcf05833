//! Ports kube-proxy holds while it runs beside the agent (`/healthz` on 10256, `/metrics` on
//! 10249, each health-check node port): the agent takes each over as soon as kube-proxy lets
//! go of it, so that load balancers' health checks keep an answer throughout a migration.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a held address is tried again.
pub const RETRY: Duration = Duration::from_millis(500);

/// Binds with `bind`; while another program holds the address (`EADDRINUSE`: a socket
/// without `SO_REUSEPORT`, as kube-proxy's), tries again every [`RETRY`], logging once when
/// it starts waiting and once when it has the address. Other errors are returned at once;
/// `None` if cancelled first.
pub async fn bind_when_free<T>(
    what: &str,
    addr: SocketAddr,
    bind: impl Fn() -> io::Result<T>,
    cancel: &CancellationToken,
) -> io::Result<Option<T>> {
    let mut waited = false;
    loop {
        match bind() {
            Ok(bound) => {
                if waited {
                    tracing::info!(%addr, what, "the address is free now: serving");
                }
                return Ok(Some(bound));
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if !waited {
                    tracing::warn!(%addr, what, "another program holds the address (kube-proxy, during a migration?): serving it once it is free");
                    waited = true;
                }
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_reuseport(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(8)
    }

    #[tokio::test]
    async fn waits_for_a_held_address_then_takes_it() {
        // kube-proxy's listener: no SO_REUSEPORT.
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let waiting =
            tokio::spawn(
                async move { bind_when_free("test", addr, || bind_reuseport(addr), &c).await },
            );
        tokio::time::sleep(RETRY * 2).await;
        assert!(
            !waiting.is_finished(),
            "bound while another program held it"
        );
        drop(holder);
        let bound = tokio::time::timeout(RETRY * 10, waiting)
            .await
            .expect("took the address once free")
            .unwrap()
            .unwrap()
            .expect("not cancelled");
        assert_eq!(bound.local_addr().unwrap(), addr);
        // Cancelled while waiting: nothing.
        let got = bind_when_free("test", addr, || bind_reuseport(addr), &{
            let c = CancellationToken::new();
            c.cancel();
            c
        })
        .await;
        // Our own listener shares the address (SO_REUSEPORT), so this binds at once.
        assert!(got.unwrap().is_some());
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        cancel.cancel();
        let got = bind_when_free("test", addr, || bind_reuseport(addr), &cancel).await;
        assert!(got.unwrap().is_none());
        // Any other error is returned.
        let err = bind_when_free(
            "test",
            addr,
            || -> io::Result<()> { Err(io::Error::from(io::ErrorKind::PermissionDenied)) },
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}

//! Bounded resources on every server port: a cap on concurrent connections (a semaphore permit
//! held for a connection's life; beyond the cap a new connection is closed at once), a first
//! bytes timeout for plaintext gRPC (the TLS handshake timeout's counterpart), and the HTTP
//! ports' header read timeout, connection lifetime and refusal of request bodies.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::{HANDSHAKE_TIMEOUT, Refusal};

/// A gRPC port's connection bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once (handshaking or established); beyond it a new connection is
    /// closed as soon as it is accepted (refusal reason `connection_limit`).
    pub max_connections: usize,
    /// How long a connection has to complete its TLS handshake, or, in plaintext, to send its
    /// first bytes.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// A connection holding one of its port's connection permits until it is dropped.
#[derive(Debug)]
pub struct Limited<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
}

impl<S> std::ops::Deref for Limited<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts connections on `listener` under `limits`: each accepted one takes a permit (or is
/// closed at once and refused with `connection_limit`), then `handshake` turns it into the
/// stream tonic serves, in its own task; a failed handshake goes to `refused`.
pub(crate) fn accept<S, F, Fut>(
    listener: TcpListener,
    limits: Limits,
    refused: Arc<dyn Fn(Refusal) + Send + Sync>,
    handshake: F,
) -> ReceiverStream<io::Result<Limited<S>>>
where
    S: Send + 'static,
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, Refusal>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let handshake = Arc::new(handshake);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = tx.closed() => return,
                c = next_connection(&listener) => c,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                drop(tcp);
                refused(Refusal {
                    peer,
                    common_name: None,
                    reason: "connection_limit",
                    error: format!("{} connections open", limits.max_connections),
                });
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tx, refused, handshake) = (tx.clone(), refused.clone(), handshake.clone());
            tokio::spawn(async move {
                match handshake(tcp, peer).await {
                    Ok(inner) => {
                        let _ = tx
                            .send(Ok(Limited {
                                inner,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Err(refusal) => refused(refusal),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Plaintext connections (`--insecure`) on `listener` under `limits`: a connection that sends
/// nothing within the handshake timeout is closed (refusal reason `handshake_timeout`), as
/// one that closes first is (`closed`).
pub fn plaintext(
    listener: TcpListener,
    limits: Limits,
    refused: impl Fn(Refusal) + Send + Sync + 'static,
) -> ReceiverStream<io::Result<Limited<TcpStream>>> {
    accept(
        listener,
        limits,
        Arc::new(refused),
        move |tcp: TcpStream, peer| async move {
            let refusal = |reason, error| Refusal {
                peer,
                common_name: None,
                reason,
                error,
            };
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.handshake_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => Ok(tcp),
                Ok(Ok(_)) => Err(refusal("closed", "closed before sending anything".into())),
                Ok(Err(e)) => Err(refusal("handshake_error", e.to_string())),
                Err(_) => Err(refusal(
                    "handshake_timeout",
                    format!("nothing received within {:?}", limits.handshake_timeout),
                )),
            }
        },
    )
}

/// An HTTP port's bounds.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections open at once; beyond it a new one is closed at once.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (from the connection's start, and
    /// between requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    /// How long a connection lives: then it is asked to close after its current request, and
    /// closed a few seconds later regardless (a client reading a response slowly).
    pub connection_lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// What a connection past its lifetime gets to finish its request.
const HTTP_GRACE: Duration = Duration::from_secs(5);

/// Refuses a request with a body (no endpoint takes one) with 413.
async fn no_body(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let headers = request.headers();
    let has_body = headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return (
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "request bodies are not accepted\n",
        )
            .into_response();
    }
    next.run(request).await
}

/// Serves `router` over HTTP/1.1 on `listener` under `limits` until `shutdown`; `refused` is
/// called for each connection closed at once for the connection cap.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    refused: impl Fn(SocketAddr) + Send + Sync + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let router = router.layer(axum::middleware::from_fn(no_body));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            c = next_connection(&listener) => c,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(tcp);
            refused(peer);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(limits.connection_lifetime) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_GRACE, conn).await;
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(HTTP_GRACE, tracker.wait()).await;
    Ok(())
}

/// The next connection; an accept error (out of descriptors and the like) pauses rather
/// than spins.
async fn next_connection(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Beyond the limit a connection is closed at once; a silent one is closed after the
    /// first-bytes timeout and its permit returned; one that speaks is handed on.
    #[tokio::test]
    async fn connections_are_capped_and_silent_ones_time_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (refusals_tx, mut refusals) = mpsc::unbounded_channel();
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(300),
        };
        let mut accepted = plaintext(listener, limits, move |r| {
            let _ = refusals_tx.send(r.reason);
        });
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut speaks = TcpStream::connect(addr).await.unwrap();
        speaks.write_all(b"x").await.unwrap();
        let conn = accepted.next().await.unwrap().unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(refusals.recv().await.unwrap(), "connection_limit");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0) | Err(_))), "{n:?}");
        assert_eq!(refusals.recv().await.unwrap(), "handshake_timeout");
        // The silent one's permit is back; the one handed on still holds its own.
        let _fourth = TcpStream::connect(addr).await.unwrap();
        let mut fifth = TcpStream::connect(addr).await.unwrap();
        assert_eq!(refusals.recv().await.unwrap(), "connection_limit");
        let n = tokio::time::timeout(Duration::from_secs(1), fifth.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0) | Err(_))), "{n:?}");
        drop(conn);
    }
}

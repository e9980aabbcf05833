//! Bounded resources on every server port: a cap on concurrent connections (a semaphore permit
//! held for a connection's life; beyond the cap a new connection is closed at once), a first
//! bytes timeout for plaintext gRPC (the TLS handshake timeout's counterpart), a cap on the
//! calls of a gRPC service answered at once ([`CallLimit`]), and the HTTP ports' header read
//! timeout, connection lifetime and refusal of request bodies.

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
            let Some(permit) = admit(
                &permits,
                limits.max_connections,
                tcp,
                peer,
                refused.as_ref(),
            ) else {
                continue;
            };
            let (tcp, permit) = permit;
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

/// Caps the calls of one gRPC service answered at once, over every connection. A call holds
/// its permit until its answer has been sent or abandoned, so a client that stops reading a
/// large answer keeps one, and the answers in memory are bounded by the cap (tower's
/// concurrency limits let go when the handler returns, before the answer is sent). Beyond
/// the cap a call is refused at once with RESOURCE_EXHAUSTED (a queued call would wait
/// without bound and hold its stream).
///
/// The permit lives in the answer's body, which hands the answer to hyper in pieces of
/// [`ANSWER_PIECE`] bytes: hyper asks for the next piece only once the peer's window has room,
/// and drops the body after the last one, so a whole answer handed over at once would let go
/// of the permit while the answer still waited, unread, in the connection's send buffer. At
/// most the last piece waits there after the permit is gone.
#[derive(Clone, Debug)]
pub struct CallLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    calls: usize,
}

/// The pieces a [`CallLimit`]ed answer is sent in.
pub const ANSWER_PIECE: usize = 4096;

impl<S> CallLimit<S> {
    /// `inner` (a tonic service) answering at most `calls` calls at once.
    pub fn new(inner: S, calls: usize) -> Self {
        CallLimit {
            inner,
            permits: Arc::new(Semaphore::new(calls)),
            calls,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CallLimit<S> {
    const NAME: &'static str = S::NAME;
}

type GrpcResponse = http::Response<tonic::body::Body>;

impl<S, B> tower::Service<http::Request<B>> for CallLimit<S>
where
    S: tower::Service<http::Request<B>, Response = GrpcResponse, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = GrpcResponse;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<GrpcResponse, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let status = tonic::Status::resource_exhausted(format!(
                "{} calls in progress; try again",
                self.calls
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Permitted {
                    body,
                    piece: bytes::Bytes::new(),
                    _permit: permit,
                })
            }))
        })
    }
}

/// An answer's body in pieces of at most [`ANSWER_PIECE`] bytes, holding its call's permit
/// until it is dropped (sent, or abandoned).
struct Permitted {
    body: tonic::body::Body,
    /// What is left of the data frame being cut into pieces.
    piece: bytes::Bytes,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Permitted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.piece.is_empty() {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.piece = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return other,
            }
        }
        let n = self.piece.len().min(ANSWER_PIECE);
        let piece = self.piece.split_to(n);
        Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.piece.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        let left = self.piece.len() as u64;
        hint.set_lower(hint.lower() + left);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + left);
        }
        hint
    }
}

/// Why an HTTP connection ended as a refusal, if it did: a client that sent no complete
/// request within the header read timeout (`header_timeout`; on a kept-alive connection that
/// was served, the same timeout is an ordinary idle close), headers beyond hyper's buffer
/// (`headers_too_large`, answered 431) or a request that does not parse (`bad_request`,
/// answered 400).
fn http_refusal(e: &hyper::Error, served: bool) -> Option<&'static str> {
    if e.is_timeout() {
        (!served).then_some("header_timeout")
    } else if e.is_parse_too_large() {
        Some("headers_too_large")
    } else if e.is_parse() {
        Some("bad_request")
    } else {
        None
    }
}

/// Serves `router` over HTTP/1.1 on `listener` under `limits` until `shutdown`; `refused` is
/// called for each connection closed at once for the connection cap (`connection_limit`) and
/// each closed for what it sent or did not send (see [`http_refusal`]).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
    refused: impl Fn(Refusal) + Send + Sync + 'static,
) -> io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt as _;
    let router = router.layer(axum::middleware::from_fn(no_body));
    let refused = Arc::new(refused);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            c = next_connection(&listener) => c,
        };
        let Some((tcp, permit)) = admit(
            &permits,
            limits.max_connections,
            tcp,
            peer,
            refused.as_ref(),
        ) else {
            continue;
        };
        let served = Arc::new(AtomicBool::new(false));
        let (router, flag) = (router.clone(), served.clone());
        let service = hyper::service::service_fn(move |request| {
            flag.store(true, Ordering::Relaxed);
            router.clone().oneshot(request)
        });
        let (shutdown, refused) = (shutdown.clone(), refused.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    let refusal = r.as_ref().err().and_then(|e| {
                        let reason = http_refusal(e, served.load(Ordering::Relaxed))?;
                        Some(Refusal { peer, common_name: None, reason, error: e.to_string() })
                    });
                    if let Some(refusal) = refusal {
                        refused(refusal);
                    }
                    return;
                }
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

/// A connection with its permit, or none: with every permit taken it is closed at once and
/// reported as refused (`connection_limit`).
fn admit(
    permits: &Arc<Semaphore>,
    max: usize,
    tcp: TcpStream,
    peer: SocketAddr,
    refused: &(dyn Fn(Refusal) + Send + Sync),
) -> Option<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    match permits.clone().try_acquire_owned() {
        Ok(permit) => Some((tcp, permit)),
        Err(_) => {
            drop(tcp);
            refused(Refusal {
                peer,
                common_name: None,
                reason: "connection_limit",
                error: format!("{max} connections open"),
            });
            None
        }
    }
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

    /// A body that never ends: an answer its client is not reading.
    struct Unread;

    impl http_body::Body for Unread {
        type Data = bytes::Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>> {
            Poll::Pending
        }
    }

    fn grpc_status(r: &http::Response<tonic::body::Body>) -> Option<&str> {
        r.headers().get("grpc-status")?.to_str().ok()
    }

    /// A call holds its permit while its answer is unsent, not only while the handler runs;
    /// beyond the cap a call is refused with RESOURCE_EXHAUSTED (8); an answer dropped
    /// gives its permit back.
    #[tokio::test]
    async fn calls_hold_their_permit_until_the_answer_is_gone() {
        use tower::{Service as _, ServiceExt as _};
        let inner = tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::new(Unread)))
        });
        let mut limited = CallLimit::new(inner, 2);
        let mut call = async || {
            limited
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(()))
                .await
                .unwrap()
        };
        let first = call().await;
        let second = call().await;
        assert_eq!(grpc_status(&first), None);
        assert_eq!(grpc_status(&second), None);
        let third = call().await;
        assert_eq!(grpc_status(&third), Some("8"));
        drop(first);
        let fourth = call().await;
        assert_eq!(grpc_status(&fourth), None);
        drop((second, fourth));
    }

    /// An answer goes out in pieces of at most ANSWER_PIECE bytes, then its trailers; the
    /// permit is back once the body is gone.
    #[tokio::test]
    async fn answers_go_out_in_pieces() {
        use http_body::Body as _;
        use tower::{Service as _, ServiceExt as _};
        let answer = bytes::Bytes::from(vec![7u8; ANSWER_PIECE * 2 + 5]);
        let inner = tower::service_fn(move |_: http::Request<()>| {
            let answer = answer.clone();
            async move {
                let frames = vec![
                    Ok::<_, tonic::Status>(http_body::Frame::data(answer)),
                    Ok(http_body::Frame::trailers(http::HeaderMap::new())),
                ];
                let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::new(body)))
            }
        });
        let mut limited = CallLimit::new(inner, 1);
        let response = limited
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        let mut body = response.into_body();
        let mut sizes = Vec::new();
        let mut trailers = false;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            match frame.unwrap().into_data() {
                Ok(d) => sizes.push(d.len()),
                Err(f) => trailers = f.is_trailers(),
            }
        }
        assert_eq!(sizes, [ANSWER_PIECE, ANSWER_PIECE, 5]);
        assert!(trailers);
        assert_eq!(limited.permits.available_permits(), 0);
        drop(body);
        assert_eq!(limited.permits.available_permits(), 1);
    }

    /// What an HTTP port reports as refused: the connection cap, a client that sends no
    /// request within the header timeout, garbage and oversized headers; not a served
    /// connection left idle, nor one the client closes.
    #[tokio::test]
    async fn http_refusals_are_reported_with_their_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut refusals) = mpsc::unbounded_channel();
        let limits = HttpLimits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            connection_lifetime: Duration::from_secs(60),
        };
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_http(
            listener,
            router,
            limits,
            shutdown.clone(),
            move |r| {
                let _ = tx.send(r.reason);
            },
        ));
        let answer = |request: &'static [u8]| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        // Served, then idle past the header timeout: an ordinary close.
        let ok = answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let garbage = answer(b"\x16\x03\x01garbage\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        assert_eq!(refusals.recv().await.unwrap(), "bad_request");
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(1 << 20, b'a');
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&big).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(
            out.starts_with(b"HTTP/1.1 431"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(refusals.recv().await.unwrap(), "headers_too_large");
        // Two silent connections fill the cap; a third is refused at once; the silent ones
        // time out.
        let _silent = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _third = TcpStream::connect(addr).await.unwrap();
        assert_eq!(refusals.recv().await.unwrap(), "connection_limit");
        assert_eq!(refusals.recv().await.unwrap(), "header_timeout");
        assert_eq!(refusals.recv().await.unwrap(), "header_timeout");
        // A client that connects and leaves is no refusal.
        drop(TcpStream::connect(addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
        server.await.unwrap().unwrap();
        assert!(refusals.try_recv().is_err());
    }
}

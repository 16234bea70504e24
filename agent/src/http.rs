//! The one HTTP stack: axum routers served over hyper's HTTP/1.1, for the control plane's API
//! (over its TLS streams) and the node's metrics endpoint.

use tower::ServiceExt as _;

/// Serves one connection with `router`. `ext` is added to every request's extensions (who
/// the peer is, for the control plane). Without `keep_alive` the connection closes after one
/// answer (a scrape reads to the end). `header_timeout` bounds how long a request head may
/// take to arrive, counted from when the connection waits for it: a kept-alive connection
/// idle that long is closed too.
pub async fn serve_connection<I, E>(
    io: I,
    router: axum::Router,
    ext: E,
    keep_alive: bool,
    header_timeout: Option<std::time::Duration>,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    E: Clone + Send + Sync + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ext.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let parts = hyper::server::conn::http1::Builder::new()
        .keep_alive(keep_alive)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .without_shutdown()
        .await?;
    linger(parts.io.into_inner()).await;
    Ok(())
}

/// Longest a closed connection's leftover input is read and dropped.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// Closes a connection whose answer is written: the write side first (TLS close_notify, then
/// FIN), then what the client still sends is read and dropped, for at most [`LINGER`] and
/// [`LINGER_BYTES`]. An answer sent before the request's body was read (a refusal judged from
/// the head) would otherwise be lost to the reset the kernel sends when a socket closes with
/// unread input, and the client would see a broken connection instead of the refusal.
async fn linger<I>(mut io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if io.shutdown().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 << 10];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

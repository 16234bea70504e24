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
    hyper::server::conn::http1::Builder::new()
        .keep_alive(keep_alive)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await
}

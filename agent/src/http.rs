//! The one HTTP stack: axum routers served over hyper's HTTP/1.1, for the control plane's API
//! (over its TLS streams) and the node's metrics endpoint.

use tower::ServiceExt as _;

/// Serves one connection with `router`. `ext` is added to every request's extensions (who
/// the peer is, for the control plane). Without `keep_alive` the connection closes after one
/// answer (a scrape reads to the end).
pub async fn serve_connection<I, E>(
    io: I,
    router: axum::Router,
    ext: E,
    keep_alive: bool,
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
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
        .await
}

//! A SPIFFE Workload API server for the tests (SPIRE cannot be installed here), built from
//! the public definitions: the `SpiffeWorkloadAPI` service's `FetchX509SVID` stream over gRPC
//! on a unix socket, with the messages of the standard's `workload.proto`, the
//! `workload.spiffe.io: true` security header required (InvalidArgument without it, as the
//! standard says), and PermissionDenied "no identity issued" when the workload has no SVID.
//! Each caller's pid is kept, as a Workload API attests callers by it.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tonic::{Status, body::Body, server::NamedService};

/// `message X509SVIDRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidRequest {}

/// `message X509SVIDResponse`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// `message X509SVID`
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// The certificate chain, ASN.1 DER certificates one after another, leaf first.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// The private key, PKCS#8 DER.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// The trust domain's CA certificates, DER one after another.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

impl X509Svid {
    /// An SVID from PEM texts (as the test CA issues them).
    pub fn from_pem(id: &str, issued: &crate::pki::Issued, ca_pem: &str, hint: &str) -> Self {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        let der = |pem: &str| -> Vec<u8> {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .flat_map(|c| c.expect("certificate PEM").to_vec())
                .collect()
        };
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key PEM");
        Self {
            spiffe_id: id.to_owned(),
            x509_svid: der(&issued.cert_pem),
            x509_svid_key: key.secret_der().to_vec(),
            bundle: der(ca_pem),
            hint: hint.to_owned(),
        }
    }
}

/// What the server says to the workload: its SVIDs, or that it has none.
#[derive(Clone)]
enum Issuing {
    Svids(Vec<X509Svid>),
    /// PermissionDenied, with this message.
    Denied(String),
}

struct Shared {
    issuing: watch::Sender<Issuing>,
    /// Streams opened with the security header.
    opened: Mutex<u32>,
    /// Requests refused for want of it.
    headerless: Mutex<u32>,
    /// The pid of each caller, as the socket's peer credentials give it.
    callers: Mutex<Vec<i32>>,
}

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

#[derive(Clone)]
struct Service(Arc<Shared>);

impl NamedService for Service {
    const NAME: &'static str = "SpiffeWorkloadAPI";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;
type SvidStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<X509SvidResponse, Status>> + Send>>;

impl tower::Service<http::Request<Body>> for Service {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != FETCH_X509_SVID {
            return Box::pin(async { Ok(Status::unimplemented("not served here").into_http()) });
        }
        let fetch = Fetch(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.server_streaming(fetch, req).await)
        })
    }
}

struct Fetch(Arc<Shared>);

impl tonic::server::ServerStreamingService<X509SvidRequest> for Fetch {
    type Response = X509SvidResponse;
    type ResponseStream = SvidStream;
    type Future = std::future::Ready<Result<tonic::Response<SvidStream>, Status>>;

    fn call(&mut self, request: tonic::Request<X509SvidRequest>) -> Self::Future {
        if let Some(pid) = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid())
        {
            self.0.callers.lock().unwrap().push(pid);
        }
        let header = request.metadata().get("workload.spiffe.io");
        if header.is_none_or(|v| v.as_bytes() != b"true") {
            *self.0.headerless.lock().unwrap() += 1;
            return std::future::ready(Err(Status::invalid_argument(
                "security header missing from request",
            )));
        }
        *self.0.opened.lock().unwrap() += 1;
        let updates = tokio_stream::wrappers::WatchStream::new(self.0.issuing.subscribe());
        // After "no identity" the stream ends with that status.
        let stream = updates
            .scan(false, |ended, issuing| {
                let item = (!*ended).then(|| match issuing {
                    Issuing::Svids(svids) => Ok(X509SvidResponse {
                        svids,
                        ..Default::default()
                    }),
                    Issuing::Denied(m) => {
                        *ended = true;
                        Err(Status::permission_denied(m))
                    }
                });
                std::future::ready(item)
            })
            .boxed();
        std::future::ready(Ok(tonic::Response::new(stream)))
    }
}

/// A running Workload API; dropped (or [`WorkloadApi::stop`]ped), every stream is cut.
pub struct WorkloadApi {
    pub socket: PathBuf,
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
}

impl WorkloadApi {
    /// Serves `svids` at `socket` (a stale socket file there is replaced).
    pub fn start(socket: &Path, svids: Vec<X509Svid>) -> Self {
        let (issuing, _) = watch::channel(Issuing::Svids(svids));
        let shared = Arc::new(Shared {
            issuing,
            opened: Mutex::new(0),
            headerless: Mutex::new(0),
            callers: Mutex::new(Vec::new()),
        });
        let mut api = Self {
            socket: socket.to_owned(),
            shared,
            rt: None,
        };
        api.serve();
        api
    }

    fn serve(&mut self) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let _ = std::fs::remove_file(&self.socket);
        let listener = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&self.socket).expect("bind the Workload API socket")
        };
        // Any user may connect, as to a SPIRE agent's socket.
        std::fs::set_permissions(
            &self.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("socket mode");
        let svc = Service(self.shared.clone());
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        self.rt = Some(rt);
    }

    /// Rotates: every stream gets the new SVIDs.
    pub fn issue(&self, svids: Vec<X509Svid>) {
        self.shared.issuing.send_replace(Issuing::Svids(svids));
    }

    /// The workload's registration is removed: streams end with PermissionDenied.
    pub fn take_away(&self) {
        self.take_away_with("no identity issued");
    }

    /// As [`WorkloadApi::take_away`], with a message of the server's choosing.
    pub fn take_away_with(&self, message: &str) {
        self.shared
            .issuing
            .send_replace(Issuing::Denied(message.to_owned()));
    }

    /// Stops serving, cutting every stream (a restart is [`WorkloadApi::restart`]).
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Serves again at the same socket, issuing `svids`.
    pub fn restart(&mut self, svids: Vec<X509Svid>) {
        self.stop();
        self.shared.issuing.send_replace(Issuing::Svids(svids));
        self.serve();
    }

    /// Streams opened with the security header.
    pub fn opened(&self) -> u32 {
        *self.shared.opened.lock().unwrap()
    }

    /// Requests refused for want of the security header.
    pub fn headerless(&self) -> u32 {
        *self.shared.headerless.lock().unwrap()
    }

    /// The pid of every caller so far.
    pub fn callers(&self) -> Vec<i32> {
        self.shared.callers.lock().unwrap().clone()
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks for the workload's SVIDs without the security header, as a careless client would:
/// the gRPC status code the server answers with.
pub fn fetch_without_header(socket: &Path) -> tonic::Code {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let socket = socket.to_owned();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_static("http://workload.api")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let socket = socket.clone();
                async move {
                    tokio::net::UnixStream::connect(socket)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                }
            }))
            .await
            .expect("connect to the Workload API");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let answer = grpc
            .server_streaming::<_, X509SvidResponse, _>(
                tonic::Request::new(X509SvidRequest {}),
                http::uri::PathAndQuery::from_static(FETCH_X509_SVID),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        match answer {
            Ok(mut stream) => match stream.get_mut().message().await {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            },
            Err(s) => s.code(),
        }
    })
}

//! The daemon's REST API: HTTP/1.1 with JSON bodies on a Unix socket (mode 0660), served by
//! hyper on the daemon's tokio runtime, in the style of the VMM's server (crates/api).
//!
//! - Routes: [`ROUTES`] (what the server dispatches from; `openapi.yaml` lists the same ones,
//!   which a test checks both ways). `{name}` is one path segment.
//! - Each request's client credentials (`SO_PEERCRED`: uid, pid) go into the audit log with
//!   the change they cause.
//! - Operations block (spawning a VMM, booting): each runs on a thread of its own while the
//!   server goes on answering.
//! - `GET /api/v1/events?follow=1` answers with a stream of events, one JSON object a line
//!   (`application/x-ndjson`), that stays open and gets each new event as it is committed.
//! - `GET /metrics` (and `/api/v1/metrics`) answers with the VMs' and host's metrics in
//!   OpenMetrics text ([`Service::metrics`]) for Prometheus to scrape.
//! - [`serve_tcp`] serves the same API on TCP (`rustvisor daemon --listen`) to clients that
//!   send `Authorization: Bearer <token>`; others get 401.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::service::{Service, ServiceError, METRICS_CONTENT_TYPE};
use crate::store::Peer;
use crate::types::{
    BackupCreate, BackupList, BackupRestore, CreateRequest, ErrorBody, EventList, FirewallList, FirewallSpec, NetCheck,
    NetworkCreate, NetworkList, PoolCreate, PoolList, SnapshotCreate, SnapshotList, StopRequest, UpdateRequest,
    VmClone, VmList, VolumeClone, VolumeCreate, VolumeList, VolumeResize,
};

/// Every route, as (method, path template).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vms"),
    ("POST", "/api/v1/vms"),
    ("GET", "/api/v1/vms/{name}"),
    ("PATCH", "/api/v1/vms/{name}"),
    ("DELETE", "/api/v1/vms/{name}"),
    ("PUT", "/api/v1/vms/{name}/start"),
    ("PUT", "/api/v1/vms/{name}/stop"),
    ("PUT", "/api/v1/vms/{name}/kill"),
    ("PUT", "/api/v1/vms/{name}/pause"),
    ("PUT", "/api/v1/vms/{name}/resume"),
    ("GET", "/api/v1/vms/{name}/snapshots"),
    ("POST", "/api/v1/vms/{name}/snapshots"),
    ("DELETE", "/api/v1/vms/{name}/snapshots/{snapshot}"),
    ("PUT", "/api/v1/vms/{name}/snapshots/{snapshot}/revert"),
    ("GET", "/api/v1/vms/{name}/console"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/networks"),
    ("POST", "/api/v1/networks"),
    ("GET", "/api/v1/networks/{name}"),
    ("DELETE", "/api/v1/networks/{name}"),
    ("GET", "/api/v1/netcheck"),
    ("GET", "/api/v1/pools"),
    ("POST", "/api/v1/pools"),
    ("GET", "/api/v1/pools/{name}"),
    ("DELETE", "/api/v1/pools/{name}"),
    ("GET", "/api/v1/pools/{name}/volumes"),
    ("POST", "/api/v1/pools/{name}/volumes"),
    ("GET", "/api/v1/pools/{name}/volumes/{volume}"),
    ("DELETE", "/api/v1/pools/{name}/volumes/{volume}"),
    ("PUT", "/api/v1/pools/{name}/volumes/{volume}/resize"),
    ("POST", "/api/v1/pools/{name}/volumes/{volume}/clone"),
    ("PUT", "/api/v1/vms/{name}/template"),
    ("POST", "/api/v1/vms/{name}/clone"),
    ("POST", "/api/v1/vms/{name}/backups"),
    ("GET", "/api/v1/backups"),
    ("POST", "/api/v1/backups/{name}/restore"),
    ("DELETE", "/api/v1/backups/{name}"),
    ("GET", "/api/v1/firewalls"),
    ("POST", "/api/v1/firewalls"),
    ("PUT", "/api/v1/firewalls/{name}"),
    ("DELETE", "/api/v1/firewalls/{name}"),
    ("GET", "/api/v1/metrics"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/host"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/capacity"),
];

/// The console route: an HTTP/1.1 upgrade to [`CONSOLE_PROTOCOL`].
pub const CONSOLE_ROUTE: &str = "/api/v1/vms/{name}/console";
/// The `Upgrade` protocol of [`CONSOLE_ROUTE`]: after `101 Switching Protocols` the
/// connection carries the serial console's raw bytes both ways.
pub const CONSOLE_PROTOCOL: &str = "rustvisor-console";

/// The largest request body accepted (larger → 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a client has to send a request's head, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most events one `GET /events` returns.
pub const MAX_EVENTS: u32 = 10_000;

use api::server::{empty_response as empty, json_response as json, shorten, Resp};

/// An error answer on its way out (boxed: a response is large).
type Reject = Box<Resp>;

/// The path parameters of a matched route ("" where the template has none): `{name}`, and
/// `sub` for `{snapshot}` or `{volume}`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Params<'p> {
    name: &'p str,
    sub: &'p str,
}

/// Matches `path` against a route template; returns its `{name}` and `{snapshot}` segments.
fn match_template<'p>(template: &str, path: &'p str) -> Option<Params<'p>> {
    let mut params = Params::default();
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(params),
            (Some("{name}"), Some(seg)) if !seg.is_empty() => params.name = seg,
            (Some("{snapshot}" | "{volume}"), Some(seg)) if !seg.is_empty() => params.sub = seg,
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// The request-target handling the server does before any operation, for the fuzz targets
/// (`crates/fuzzing`): matches `target` (`path[?query]`) against [`ROUTES`] for `method`,
/// checks the `{name}` segment and parses the query string as the routes do. Returns the
/// route template served, or `None` where the server answers 404, 405 or 400.
#[doc(hidden)]
pub fn fuzz_request_target(method: &str, target: &str) -> Option<&'static str> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (_, template, params) = ROUTES
        .iter()
        .filter_map(|(m, t)| match_template(t, path).map(|p| (*m, *t, p)))
        .find(|(m, _, _)| *m == method)?;
    if template.contains("{name}") {
        Service::check_name(params.name).ok()?;
    }
    let q = Query::parse(query).ok()?;
    events_query(&q).ok()?;
    q.flag("force").ok()?;
    q.number("cpus", 0, 1024).ok()?;
    q.number("disk_bytes", 0, i64::MAX).ok()?;
    Some(template)
}

/// What the server answers with: a whole body, or the event stream of `?follow=1`.
pub type Out = Response<Either<Full<Bytes>, EventStream>>;

/// The body of `GET /api/v1/events?follow=1`: newline-delimited JSON events, open until the
/// client goes.
#[derive(Debug)]
pub struct EventStream {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A listening socket the server accepts clients on, each with who it is for the audit log.
trait Accept {
    /// The connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next client.
    fn accept_peer(&self) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Peer)>> + Send;
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, _) = self.accept().await?;
        let peer = match stream.peer_cred() {
            Ok(c) => Peer { uid: Some(c.uid()), pid: c.pid(), addr: None },
            Err(e) => {
                tracing::warn!("daemon API: no peer credentials: {e}");
                Peer::default()
            }
        };
        Ok((stream, peer))
    }
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_peer(&self) -> std::io::Result<(Self::Io, Peer)> {
        let (stream, addr) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer { uid: None, pid: None, addr: Some(addr) }))
    }
}

/// Serves the API on the Unix socket `listener` until `shutdown` completes. Clients are
/// whoever the socket's file mode lets in; their credentials go into the audit log.
pub async fn serve(listener: UnixListener, svc: Arc<Service>, shutdown: impl std::future::Future<Output = ()>) {
    serve_on(listener, svc, None, shutdown).await
}

/// Serves the API on the TCP `listener` until `shutdown` completes, only to requests with
/// `Authorization: Bearer <token>` (others get 401). The client's address goes into the
/// audit log.
pub async fn serve_tcp(
    listener: TcpListener,
    svc: Arc<Service>,
    token: Arc<str>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_on(listener, svc, Some(token), shutdown).await
}

async fn serve_on<L: Accept>(
    listener: L,
    svc: Arc<Service>,
    token: Option<Arc<str>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept_peer() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(stream, svc.clone(), peer, token.clone()));
            }
            Err(e) => {
                tracing::warn!("daemon API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection<S>(stream: S, svc: Arc<Service>, peer: Peer, token: Option<Arc<str>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (svc, token) = (svc.clone(), token.clone());
        async move { Ok::<_, Infallible>(respond(req, svc, peer, token).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(READ_TIMEOUT).max_buf_size(16 * 1024);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!("daemon API connection: {e}");
    }
}

/// Checks the bearer token (TCP), then answers: the event stream, or [`handle`]'s answer.
async fn respond(req: Request<Incoming>, svc: Arc<Service>, peer: Peer, token: Option<Arc<str>>) -> Out {
    if let Some(t) = token {
        if !authorized(&req, &t) {
            let mut resp =
                *error(StatusCode::UNAUTHORIZED, "a valid 'Authorization: Bearer <token>' is required".into(), None);
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"rustvisor\""));
            return resp.map(Either::Left);
        }
    }
    if req.method() == Method::GET && req.uri().path() == "/api/v1/events" {
        let follow = Query::parse(req.uri().query().unwrap_or("")).and_then(|q| Ok((q.flag("follow")?, q)));
        match follow {
            Ok((true, q)) => return follow_events(svc, &q).await.unwrap_or_else(|e| (*e).map(Either::Left)),
            Ok((false, _)) => {}
            Err(e) => return (*e).map(Either::Left),
        }
    }
    handle(req, svc, peer).await.unwrap_or_else(|e| *e).map(Either::Left)
}

/// Whether `req` carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    let want = token.as_bytes();
    // Constant time in the token's content (its length is not secret).
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Events of the log, after `after` (and of `vm`), then each new one as it is committed.
async fn follow_events(svc: Arc<Service>, q: &Query) -> Result<Out, Reject> {
    let (vm, mut after, _) = events_query(q)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut changed = svc.subscribe_events();
    tokio::spawn(async move {
        loop {
            changed.borrow_and_update();
            let (s, v) = (svc.clone(), vm.clone());
            let Ok(Ok(batch)) = blocking(move || s.events(v.as_deref(), after, MAX_EVENTS)).await else { return };
            let full = batch.len() >= MAX_EVENTS as usize;
            for e in batch {
                after = e.id;
                let Ok(mut line) = serde_json::to_vec(&e) else { return };
                line.push(b'\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    let mut resp = Response::new(Either::Right(EventStream { rx }));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(resp)
}

/// The `vm`, `after` and `limit` parameters of `GET /events`.
fn events_query(q: &Query) -> Result<(Option<String>, i64, u32), Reject> {
    let vm = q.get("vm").map(str::to_string);
    if let Some(v) = &vm {
        Service::check_name(v).map_err(|e| bad_request("vm", e.to_string()))?;
    }
    let after = q.number("after", 0, i64::MAX)?.unwrap_or(0);
    let limit = q.number("limit", 1, i64::from(MAX_EVENTS))?.unwrap_or(i64::from(MAX_EVENTS));
    Ok((vm, after, u32::try_from(limit).unwrap_or(MAX_EVENTS)))
}

/// Runs a blocking operation on a thread of its own.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Reject> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("daemon-op".into()).spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if let Err(e) = spawned {
        return Err(error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot start a thread: {e}"), None));
    }
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        _ => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal error: the operation failed".into(), None)),
    }
}

async fn handle(req: Request<Incoming>, svc: Arc<Service>, peer: Peer) -> Result<Resp, Reject> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let matched: Vec<(&str, &str, Params<'_>)> =
        ROUTES.iter().filter_map(|(m, t)| match_template(t, &path).map(|n| (*m, *t, n))).collect();
    if matched.is_empty() {
        return Err(error(StatusCode::NOT_FOUND, format!("no such route: {}", shorten(&path)), None));
    }
    let Some(&(_, template, params)) = matched.iter().find(|(m, _, _)| *m == req.method().as_str()) else {
        let allowed: Vec<&str> = matched.iter().map(|(m, _, _)| *m).collect();
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes {}, not {}", shorten(&path), allowed.join(" or "), shorten(req.method().as_str())),
            None,
        );
        if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return Err(resp);
    };
    let name = params.name.to_string();
    let snapshot = params.sub.to_string();
    let volume = snapshot.clone();
    if template.contains("{name}") {
        Service::check_name(&name).map_err(service_error)?;
    }
    if template == CONSOLE_ROUTE {
        return console(req, svc, name, peer).await;
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    let method = req.method().clone();
    let body = if method == Method::GET || method == Method::DELETE {
        Bytes::new()
    } else {
        read_body(req.into_body()).await?
    };
    let takes_body = matches!(
        (method.as_str(), template),
        ("POST", "/api/v1/vms")
            | ("PATCH", "/api/v1/vms/{name}")
            | ("PUT", "/api/v1/vms/{name}/stop")
            | ("POST", "/api/v1/vms/{name}/snapshots")
            | ("POST", "/api/v1/networks")
            | ("POST", "/api/v1/firewalls")
            | ("PUT", "/api/v1/firewalls/{name}")
            | ("POST", "/api/v1/pools")
            | ("POST", "/api/v1/pools/{name}/volumes")
            | ("PUT", "/api/v1/pools/{name}/volumes/{volume}/resize")
            | ("POST", "/api/v1/pools/{name}/volumes/{volume}/clone")
            | ("POST", "/api/v1/vms/{name}/clone")
            | ("POST", "/api/v1/vms/{name}/backups")
            | ("POST", "/api/v1/backups/{name}/restore")
    );
    if !body.is_empty() {
        if !takes_body {
            return Err(bad_request("body", "this route takes no request body"));
        }
        if !is_json {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the request body must be Content-Type: application/json".into(),
                None,
            ));
        }
    }
    let q = Query::parse(&query)?;
    let s = svc;
    match (method.as_str(), template) {
        ("GET", "/api/v1/vms") => {
            let vms = blocking(move || s.list()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &VmList { vms }))
        }
        ("POST", "/api/v1/vms") => {
            if body.is_empty() {
                return Err(bad_request("body", "a JSON request body is required"));
            }
            let req: CreateRequest = parse_json(&body)?;
            let vm = blocking(move || s.create(req, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &vm))
        }
        ("GET", "/api/v1/vms/{name}") => {
            Ok(json(StatusCode::OK, &blocking(move || s.info(&name)).await?.map_err(service_error)?))
        }
        ("DELETE", "/api/v1/vms/{name}") => {
            let force = q.flag("force")?;
            blocking(move || s.delete(&name, force, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("PUT", "/api/v1/vms/{name}/start") => {
            Ok(json(StatusCode::OK, &blocking(move || s.start(&name, peer)).await?.map_err(service_error)?))
        }
        ("PUT", "/api/v1/vms/{name}/stop") | ("PUT", "/api/v1/vms/{name}/kill") => {
            let kill = template.ends_with("/kill");
            let req: StopRequest = if body.is_empty() { StopRequest::default() } else { parse_json(&body)? };
            Ok(json(StatusCode::OK, &blocking(move || s.stop(&name, &req, kill, peer)).await?.map_err(service_error)?))
        }
        ("PUT", "/api/v1/vms/{name}/pause") | ("PUT", "/api/v1/vms/{name}/resume") => {
            let pause = template.ends_with("/pause");
            Ok(json(
                StatusCode::OK,
                &blocking(move || s.pause_resume(&name, pause, peer)).await?.map_err(service_error)?,
            ))
        }
        ("PATCH", "/api/v1/vms/{name}") => {
            if body.is_empty() {
                return Err(bad_request("body", "a JSON request body is required"));
            }
            let req: UpdateRequest = parse_json(&body)?;
            Ok(json(StatusCode::OK, &blocking(move || s.update(&name, req, peer)).await?.map_err(service_error)?))
        }
        ("GET", "/api/v1/vms/{name}/snapshots") => {
            let snapshots = blocking(move || s.snapshots(&name)).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &SnapshotList { snapshots }))
        }
        ("POST", "/api/v1/vms/{name}/snapshots") => {
            if body.is_empty() {
                return Err(bad_request("body", "a JSON request body is required"));
            }
            let req: SnapshotCreate = parse_json(&body)?;
            let info = blocking(move || s.snapshot_create(&name, &req.name, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &info))
        }
        ("DELETE", "/api/v1/vms/{name}/snapshots/{snapshot}") => {
            blocking(move || s.snapshot_delete(&name, &snapshot, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("PUT", "/api/v1/vms/{name}/snapshots/{snapshot}/revert") => {
            let info = blocking(move || s.snapshot_revert(&name, &snapshot, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &info))
        }
        ("GET", "/api/v1/networks") => {
            let networks = blocking(move || s.net_list()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &NetworkList { networks }))
        }
        ("POST", "/api/v1/networks") => {
            let req: NetworkCreate = parse_required(&body)?;
            Ok(json(StatusCode::CREATED, &blocking(move || s.net_create(&req, peer)).await?.map_err(service_error)?))
        }
        ("GET", "/api/v1/networks/{name}") => {
            Ok(json(StatusCode::OK, &blocking(move || s.net_info(&name)).await?.map_err(service_error)?))
        }
        ("DELETE", "/api/v1/networks/{name}") => {
            blocking(move || s.net_delete(&name, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("GET", "/api/v1/metrics") | ("GET", "/metrics") => {
            let text = blocking(move || s.metrics()).await?.map_err(service_error)?;
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            Ok(resp)
        }
        ("GET", "/api/v1/stats") => {
            Ok(json(StatusCode::OK, &blocking(move || s.stats()).await?.map_err(service_error)?))
        }
        ("GET", "/api/v1/host") => {
            Ok(json(StatusCode::OK, &blocking(move || s.host_info()).await?.map_err(service_error)?))
        }
        ("GET", "/api/v1/capacity") => {
            let cpus = q.number("cpus", 0, 1024)?.unwrap_or(0) as u64;
            let memory_mib = q.number("memory_mib", 0, 1 << 40)?.unwrap_or(0) as u64;
            let disk_bytes = q.number("disk_bytes", 0, i64::MAX)?.map(|n| n as u64);
            let pool = q.get("pool").map(str::to_string);
            let c = blocking(move || s.capacity(cpus, memory_mib, disk_bytes, pool.as_deref())).await?;
            Ok(json(StatusCode::OK, &c.map_err(service_error)?))
        }
        ("GET", "/api/v1/netcheck") => {
            let problems = blocking(move || s.netcheck()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &NetCheck { problems }))
        }
        ("GET", "/api/v1/pools") => {
            let pools = blocking(move || s.pool_list()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &PoolList { pools }))
        }
        ("POST", "/api/v1/pools") => {
            let req: PoolCreate = parse_required(&body)?;
            Ok(json(StatusCode::CREATED, &blocking(move || s.pool_create(&req, peer)).await?.map_err(service_error)?))
        }
        ("GET", "/api/v1/pools/{name}") => {
            Ok(json(StatusCode::OK, &blocking(move || s.pool_info(&name)).await?.map_err(service_error)?))
        }
        ("DELETE", "/api/v1/pools/{name}") => {
            blocking(move || s.pool_delete(&name, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("GET", "/api/v1/pools/{name}/volumes") => {
            let volumes = blocking(move || s.volume_list(&name)).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &VolumeList { volumes }))
        }
        ("POST", "/api/v1/pools/{name}/volumes") => {
            let req: VolumeCreate = parse_required(&body)?;
            let v = blocking(move || s.volume_create(&name, &req, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &v))
        }
        ("GET", "/api/v1/pools/{name}/volumes/{volume}") => {
            Ok(json(StatusCode::OK, &blocking(move || s.volume_info(&name, &volume)).await?.map_err(service_error)?))
        }
        ("DELETE", "/api/v1/pools/{name}/volumes/{volume}") => {
            blocking(move || s.volume_delete(&name, &volume, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("PUT", "/api/v1/pools/{name}/volumes/{volume}/resize") => {
            let req: VolumeResize = parse_required(&body)?;
            let v = blocking(move || s.volume_resize(&name, &volume, req.size_bytes, peer))
                .await?
                .map_err(service_error)?;
            Ok(json(StatusCode::OK, &v))
        }
        ("POST", "/api/v1/pools/{name}/volumes/{volume}/clone") => {
            let req: VolumeClone = parse_required(&body)?;
            let v = blocking(move || s.volume_clone(&name, &volume, &req, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &v))
        }
        ("PUT", "/api/v1/vms/{name}/template") => {
            let info = blocking(move || s.vm_template(&name, peer).and_then(|()| s.info(&name)))
                .await?
                .map_err(service_error)?;
            Ok(json(StatusCode::OK, &info))
        }
        ("POST", "/api/v1/vms/{name}/clone") => {
            let req: VmClone = parse_required(&body)?;
            Ok(json(
                StatusCode::CREATED,
                &blocking(move || s.vm_clone(&name, &req, peer)).await?.map_err(service_error)?,
            ))
        }
        ("POST", "/api/v1/vms/{name}/backups") => {
            let req: BackupCreate = if body.is_empty() { BackupCreate::default() } else { parse_json(&body)? };
            let b = blocking(move || s.backup_create(&name, &req, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &b))
        }
        ("GET", "/api/v1/backups") => {
            let backups = blocking(move || s.backup_list()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &BackupList { backups }))
        }
        ("POST", "/api/v1/backups/{name}/restore") => {
            let req: BackupRestore = parse_required(&body)?;
            let v = blocking(move || s.backup_restore(&name, &req, peer)).await?.map_err(service_error)?;
            Ok(json(StatusCode::CREATED, &v))
        }
        ("DELETE", "/api/v1/backups/{name}") => {
            blocking(move || s.backup_delete(&name, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("GET", "/api/v1/firewalls") => {
            let firewalls = blocking(move || s.fw_list()).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &FirewallList { firewalls }))
        }
        ("POST", "/api/v1/firewalls") | ("PUT", "/api/v1/firewalls/{name}") => {
            let spec: FirewallSpec = parse_required(&body)?;
            let replace = method == Method::PUT;
            if replace && spec.name != name {
                return Err(bad_request("name", format!("'{}' differs from the path's '{name}'", shorten(&spec.name))));
            }
            let status = if replace { StatusCode::OK } else { StatusCode::CREATED };
            Ok(json(status, &blocking(move || s.fw_put(&spec, replace, peer)).await?.map_err(service_error)?))
        }
        ("DELETE", "/api/v1/firewalls/{name}") => {
            blocking(move || s.fw_delete(&name, peer)).await?.map_err(service_error)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        ("GET", "/api/v1/events") => {
            let (vm, after, limit) = events_query(&q)?;
            let events = blocking(move || s.events(vm.as_deref(), after, limit)).await?.map_err(service_error)?;
            Ok(json(StatusCode::OK, &EventList { events }))
        }
        _ => Err(error(StatusCode::NOT_FOUND, format!("route {template} is not implemented"), None)),
    }
}

/// Whether header `name` lists `token` (comma-separated, case-insensitive).
fn header_lists(headers: &hyper::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `GET /api/v1/vms/{name}/console`: checks the VM and connects to its VMM's console socket,
/// answers `101 Switching Protocols`, then copies bytes both ways until either side ends
/// (the client detaching ends this connection only; the VM stopping closes the client's).
/// Errors before the upgrade are JSON: 426 without the upgrade headers, 404, 409 naming the
/// state, 500 when the socket cannot be reached.
async fn console(mut req: Request<Incoming>, svc: Arc<Service>, name: String, peer: Peer) -> Result<Resp, Reject> {
    let h = req.headers();
    if !header_lists(h, header::CONNECTION, "upgrade") || !header_lists(h, header::UPGRADE, CONSOLE_PROTOCOL) {
        let mut resp = error(
            StatusCode::UPGRADE_REQUIRED,
            format!("this route upgrades the connection: send 'Connection: Upgrade' and 'Upgrade: {CONSOLE_PROTOCOL}'"),
            None,
        );
        resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_PROTOCOL));
        return Err(resp);
    }
    let s = svc.clone();
    let n = name.clone();
    let socket = blocking(move || s.console_target(&n)).await?.map_err(service_error)?;
    let vmm = UnixStream::connect(&socket).await.map_err(|source| {
        service_error(ServiceError::Io {
            what: format!("VM '{name}': connecting to its console {}", socket.display()),
            source,
        })
    })?;
    let event = crate::store::NewEvent::vm(&name, "console-attached", "", peer);
    if let Err(e) = blocking(move || svc.log(&event)).await?.map_err(ServiceError::from) {
        return Err(service_error(e));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => proxy(TokioIo::new(upgraded), vmm).await,
            Err(e) => tracing::debug!("console of VM '{name}': the upgrade failed: {e}"),
        }
    });
    let mut resp = empty(StatusCode::SWITCHING_PROTOCOLS);
    resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(CONSOLE_PROTOCOL));
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Ok(resp)
}

/// Copies a console client's bytes to the VMM's console socket and back until either side
/// ends: the client's end (detach) closes the VMM connection, which detaches it there; the
/// VMM's end (the VM stopped) closes the client's.
async fn proxy<C: tokio::io::AsyncRead + tokio::io::AsyncWrite>(client: C, vmm: UnixStream) {
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut vmm_rd, mut vmm_wr) = vmm.into_split();
    tokio::select! {
        _ = tokio::io::copy(&mut client_rd, &mut vmm_wr) => {}
        _ = async {
            let _ = tokio::io::copy(&mut vmm_rd, &mut client_wr).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut client_wr).await;
        } => {}
    }
}

/// The query string's `key=value` pairs.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Result<Query, Reject> {
        let mut pairs = Vec::new();
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            const KNOWN: [&str; 9] =
                ["force", "vm", "after", "limit", "follow", "cpus", "memory_mib", "disk_bytes", "pool"];
            if !KNOWN.contains(&k) {
                return Err(bad_request(k, format!("unknown query parameter (accepted: {})", KNOWN.join(", "))));
            }
            pairs.push((k.to_string(), v.to_string()));
        }
        Ok(Query(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<bool, Reject> {
        match self.get(key) {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(v) => Err(bad_request(key, format!("'{}' (accepted: true, false)", shorten(v)))),
        }
    }

    fn number(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, Reject> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(bad_request(key, format!("'{}' (accepted: {min} to {max})", shorten(v)))),
            },
        }
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, Reject> {
    match tokio::time::timeout(READ_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {MAX_BODY_BYTES} bytes"), None))
        }
        Ok(Err(e)) => Err(bad_request("body", format!("cannot read the request body: {e}"))),
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time".into(), None)),
    }
}

/// Parses a JSON object body that the route requires.
fn parse_required<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reject> {
    if body.is_empty() {
        return Err(bad_request("body", "a JSON request body is required"));
    }
    parse_json(body)
}

/// Parses a JSON object body; an error is a 400 naming the field, as the VMM's API does.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reject> {
    api::server::parse_json_object(body).map_err(|(field, msg)| bad_request(&field, msg))
}

/// The HTTP answer to a failed operation.
fn service_error(e: ServiceError) -> Reject {
    let msg = e.to_string();
    let (status, body) = match e {
        ServiceError::BadRequest { field, .. } => {
            (StatusCode::BAD_REQUEST, ErrorBody { error: msg, field: Some(field), operation: None, state: None })
        }
        ServiceError::NotFound(_) | ServiceError::NoSnapshot { .. } => {
            (StatusCode::NOT_FOUND, ErrorBody { error: msg, field: None, operation: None, state: None })
        }
        ServiceError::Duplicate(_) | ServiceError::SnapshotExists { .. } => {
            (StatusCode::CONFLICT, ErrorBody { error: msg, field: Some("name".into()), operation: None, state: None })
        }
        ServiceError::Busy { operation, .. } => {
            (StatusCode::CONFLICT, ErrorBody { error: msg, field: None, operation: Some(operation), state: None })
        }
        ServiceError::Conflict { state, .. } => (
            StatusCode::CONFLICT,
            ErrorBody { error: msg, field: None, operation: None, state: Some(state.as_str().into()) },
        ),
        ServiceError::Refused(_) => {
            (StatusCode::CONFLICT, ErrorBody { error: msg, field: None, operation: None, state: None })
        }
        ServiceError::Storage(e) => {
            let status = match e.kind() {
                storage::ErrorKind::BadInput => StatusCode::BAD_REQUEST,
                storage::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                storage::ErrorKind::Conflict => StatusCode::CONFLICT,
                storage::ErrorKind::Corrupt | storage::ErrorKind::Host => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let field = (status == StatusCode::BAD_REQUEST).then(|| "storage".to_string());
            (status, ErrorBody { error: msg, field, operation: None, state: None })
        }
        ServiceError::StartFailed { .. }
        | ServiceError::Vmm { .. }
        | ServiceError::Store(_)
        | ServiceError::Io { .. } => {
            tracing::warn!("{msg}");
            (StatusCode::INTERNAL_SERVER_ERROR, ErrorBody { error: msg, field: None, operation: None, state: None })
        }
    };
    Box::new(json(status, &body))
}

fn bad_request(field: &str, msg: impl std::fmt::Display) -> Reject {
    let error = if field == "body" { format!("request body: {msg}") } else { format!("{field}: {msg}") };
    Box::new(json(
        StatusCode::BAD_REQUEST,
        &ErrorBody { error, field: Some(field.into()), operation: None, state: None },
    ))
}

fn error(status: StatusCode, error: String, field: Option<String>) -> Reject {
    Box::new(json(status, &ErrorBody { error, field, operation: None, state: None }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let named = |name| Some(Params { name, sub: "" });
        assert_eq!(match_template("/api/v1/vms", "/api/v1/vms"), Some(Params::default()));
        assert_eq!(match_template("/api/v1/vms/{name}", "/api/v1/vms/a"), named("a"));
        assert_eq!(match_template("/api/v1/vms/{name}/start", "/api/v1/vms/a/start"), named("a"));
        assert_eq!(
            match_template("/api/v1/vms/{name}/snapshots/{snapshot}/revert", "/api/v1/vms/a/snapshots/s1/revert"),
            Some(Params { name: "a", sub: "s1" })
        );
        assert_eq!(match_template("/api/v1/vms/{name}", "/api/v1/vms/"), None);
        assert_eq!(match_template("/api/v1/vms/{name}", "/api/v1/vms/a/start"), None);
        assert_eq!(match_template("/api/v1/vms", "/api/v1/vmsx"), None);
    }
}

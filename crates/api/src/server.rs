//! The API server: HTTP/1.1 on a Unix socket (mode 0600), served by hyper on a tokio runtime
//! of its own thread, one task per connection.
//!
//! - Routes: [`ROUTES`] (the single list the server dispatches from; `openapi.yaml` must list
//!   the same ones, which a test checks).
//! - Success with a body → 200 JSON, without → 204. [`ApiError`]s → 400/409/404/500 with a
//!   JSON [`ErrorBody`]. Malformed requests → 400 (naming the field when there is one), body
//!   over [`MAX_BODY_BYTES`] → 413, body not `application/json` → 415, unknown route → 404,
//!   wrong method → 405 (with `Allow`), a request not sent within the read timeout → 408 or
//!   the connection closed.
//! - Controller methods run on tokio's blocking pool; one that panics gives a 500 and the
//!   server goes on.
//! - `PUT vmm.shutdown` answers 204 (and closes the connection) before it calls
//!   [`Controller::vmm_shutdown`] on a thread of its own.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::types::{BackupRequest, BalloonTarget, ErrorBody, RestoreRequest, SnapshotRequest, VmConfig};
use crate::{fileurl, ApiError, Controller};

/// Every route's path starts with this.
pub const API_PREFIX: &str = "/api/v1/";

/// Every route the server serves, as (method, path). The server dispatches from this list
/// only: a path not here is a 404, a method not paired with the path here is a 405.
pub const ROUTES: &[(&str, &str)] = &[
    ("PUT", "/api/v1/vm.create"),
    ("PUT", "/api/v1/vm.boot"),
    ("PUT", "/api/v1/vm.pause"),
    ("PUT", "/api/v1/vm.resume"),
    ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.reboot"),
    ("PUT", "/api/v1/vm.delete"),
    ("GET", "/api/v1/vm.info"),
    ("GET", "/api/v1/vm.counters"),
    ("GET", "/api/v1/vm.balloon"),
    ("PUT", "/api/v1/vm.balloon"),
    ("PUT", "/api/v1/vm.snapshot"),
    ("PUT", "/api/v1/vm.restore"),
    ("PUT", "/api/v1/vm.backup"),
    ("GET", "/api/v1/vm.backup"),
    ("DELETE", "/api/v1/vm.backup"),
    ("GET", "/api/v1/vmm.ping"),
    ("PUT", "/api/v1/vmm.shutdown"),
];

/// The largest request body accepted (larger → 413).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The most bytes of request line and headers hyper buffers (more → 431 or 414).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Tunables of [`serve_with`]; [`serve`] uses the defaults.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a client may take to send a request's head (from the connection's start, or
    /// from the previous response on a kept-alive connection), and then separately its body.
    /// A client that stalls longer is disconnected (head) or answered 408 (body). Default 5 s.
    pub read_timeout: Duration,
    /// Connections served at once; one more is closed straight after it is accepted.
    /// Default 256.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions { read_timeout: Duration::from_secs(5), max_connections: 256 }
    }
}

/// A running server. [`ServerHandle::stop`] or dropping it stops the server (open connections
/// are closed) and removes the socket file if it is still the one the server bound.
#[derive(Debug)]
pub struct ServerHandle {
    socket: PathBuf,
    /// (device, inode) of the socket file the server bound.
    socket_id: (u64, u64),
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the server, waits (at most about a second for controller calls in flight) for its
    /// thread to end, and removes the socket file.
    pub fn stop(self) {
        drop(self)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
        if let Ok(md) = std::fs::symlink_metadata(&self.socket) {
            if md.file_type().is_socket() && (md.dev(), md.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
    }
}

/// Serves `ctl` on the Unix socket `socket` with the default [`ServerOptions`]; see
/// [`serve_with`].
pub fn serve(socket: &Path, ctl: Arc<dyn Controller>) -> io::Result<ServerHandle> {
    serve_with(socket, ctl, ServerOptions::default())
}

/// Binds `socket` (replacing a stale socket file that nobody listens on; refusing when another
/// process listens on it or the path is not a socket), sets its mode to 0600, and serves the
/// API on a thread of its own until the returned handle is stopped or dropped.
pub fn serve_with(socket: &Path, ctl: Arc<dyn Controller>, opts: ServerOptions) -> io::Result<ServerHandle> {
    let std_listener = bind(socket)?;
    let md = std::fs::symlink_metadata(socket)?;
    let socket_id = (md.dev(), md.ino());
    let started = (|| {
        std_listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(16)
            .thread_name("api-worker")
            .build()?;
        let listener = {
            let _guard = rt.enter();
            UnixListener::from_std(std_listener)?
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let state = Arc::new(State { ctl, opts });
        let thread = std::thread::Builder::new().name("api-server".into()).spawn(move || {
            // The blocking workers (`api-worker`) that carry out requests are started from
            // this thread and so inherit this filter.
            seccomp::apply(seccomp::Role::Api);
            rt.block_on(accept_loop(listener, state, stop_rx));
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok::<_, io::Error>((stop_tx, thread))
    })();
    match started {
        Ok((stop_tx, thread)) => {
            Ok(ServerHandle { socket: socket.to_owned(), socket_id, stop_tx: Some(stop_tx), thread: Some(thread) })
        }
        Err(e) => {
            let _ = std::fs::remove_file(socket);
            Err(e)
        }
    }
}

/// Binds the socket, first removing a stale one, and makes it 0600.
fn bind(socket: &Path) -> io::Result<StdUnixListener> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", socket.display()));
    match std::fs::symlink_metadata(socket) {
        Ok(md) if !md.file_type().is_socket() => {
            return Err(ctx(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")));
        }
        Ok(_) => match StdUnixStream::connect(socket) {
            Ok(_) => {
                return Err(ctx(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing stale API socket {}", socket.display());
                std::fs::remove_file(socket).map_err(ctx)?;
            }
            Err(e) => return Err(ctx(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ctx(e)),
    }
    let listener = StdUnixListener::bind(socket).map_err(ctx)?;
    if let Err(e) = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(socket);
        return Err(ctx(e));
    }
    Ok(listener)
}

/// What every connection task shares.
struct State {
    ctl: Arc<dyn Controller>,
    opts: ServerOptions,
}

async fn accept_loop(listener: UnixListener, state: Arc<State>, mut stop: oneshot::Receiver<()>) {
    let permits = Arc::new(Semaphore::new(state.opts.max_connections.max(1)));
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(serve_connection(stream, state.clone(), permit));
                }
                Err(_) => tracing::warn!("API: too many connections; closing a new one"),
            },
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!("API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, state: Arc<State>, _permit: OwnedSemaphorePermit) {
    let shutdown_requested = Arc::new(AtomicBool::new(false));
    let service = {
        let state = state.clone();
        let shutdown_requested = shutdown_requested.clone();
        hyper::service::service_fn(move |req| {
            let state = state.clone();
            let shutdown_requested = shutdown_requested.clone();
            async move { Ok::<_, Infallible>(handle(req, &state, &shutdown_requested).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(state.opts.read_timeout)
        .half_close(true)
        .max_buf_size(MAX_HEAD_BYTES);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!("API connection: {e}");
    }
    if shutdown_requested.load(Ordering::SeqCst) {
        // The 204 is out and the connection closed: now stop the VMM, on a thread of its own
        // so that it may stop this server too.
        let ctl = state.ctl.clone();
        let spawned = std::thread::Builder::new().name("api-vmm-shutdown".into()).spawn(move || {
            seccomp::apply(seccomp::Role::Shutdown);
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctl.vmm_shutdown())).is_err() {
                tracing::error!("the VMM's vmm_shutdown panicked");
            }
        });
        if let Err(e) = spawned {
            tracing::error!("API: cannot start the vmm.shutdown thread: {e}");
        }
    }
}

/// An HTTP response with a complete body, as every handler here builds it.
pub type Resp = Response<Full<Bytes>>;

/// An error answer on its way out (boxed: a response is large).
type Reject = Box<Resp>;

async fn handle(req: Request<Incoming>, state: &State, shutdown_requested: &AtomicBool) -> Resp {
    match route(req, state, shutdown_requested).await {
        Ok(resp) => resp,
        Err(resp) => *resp,
    }
}

/// Checks the route and method, reads the body, and calls the controller.
async fn route(req: Request<Incoming>, state: &State, shutdown_requested: &AtomicBool) -> Result<Resp, Reject> {
    let path = req.uri().path().to_owned();
    let allowed: Vec<&str> = ROUTES.iter().filter(|(_, p)| *p == path).map(|(m, _)| *m).collect();
    if allowed.is_empty() {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            ErrorBody { error: format!("no such route: {}", shorten(&path)), field: None, state: None },
        ));
    }
    if !allowed.contains(&req.method().as_str()) {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorBody {
                error: format!(
                    "{} takes {}, not {}",
                    shorten(&path),
                    allowed.join(" or "),
                    shorten(req.method().as_str())
                ),
                field: None,
                state: None,
            },
        );
        if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        return Err(resp);
    }
    let name = path.strip_prefix(API_PREFIX).unwrap_or(&path);
    let is_json = content_type_is_json(req.headers().get(header::CONTENT_TYPE));
    let method = req.method().clone();
    let is_put = method == Method::PUT;
    let body = if is_put { read_body(req.into_body(), &state.opts).await? } else { Bytes::new() };
    let takes_body = matches!(name, "vm.create" | "vm.snapshot" | "vm.restore")
        || (name == "vm.backup" && is_put)
        || (name == "vm.balloon" && is_put);
    if takes_body {
        if body.is_empty() {
            return Err(bad_request("body", format!("{name} needs a JSON request body")));
        }
        if !is_json {
            return Err(error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorBody {
                    error: "the request body must be Content-Type: application/json".into(),
                    field: None,
                    state: None,
                },
            ));
        }
    } else if !body.is_empty() {
        return Err(bad_request("body", format!("{name} takes no request body")));
    }

    Ok(match name {
        "vm.create" => {
            let cfg: VmConfig = parse_json(&body)?;
            no_content(call(state, name, move |c| c.create(cfg)).await?)?
        }
        "vm.boot" => no_content(call(state, name, |c| c.boot()).await?)?,
        "vm.pause" => no_content(call(state, name, |c| c.pause()).await?)?,
        "vm.resume" => no_content(call(state, name, |c| c.resume()).await?)?,
        "vm.shutdown" => no_content(call(state, name, |c| c.shutdown()).await?)?,
        "vm.reboot" => no_content(call(state, name, |c| c.reboot()).await?)?,
        "vm.delete" => no_content(call(state, name, |c| c.delete()).await?)?,
        "vm.info" => json_ok(call(state, name, |c| c.info()).await?)?,
        "vm.counters" => json_ok(call(state, name, |c| c.counters()).await?)?,
        "vm.balloon" if is_put => {
            let req: BalloonTarget = parse_json(&body)?;
            no_content(call(state, name, move |c| c.balloon_set(req.target_mib)).await?)?
        }
        "vm.balloon" => json_ok(call(state, name, |c| c.balloon_info()).await?)?,
        "vm.snapshot" => {
            let req: SnapshotRequest = parse_json(&body)?;
            let dir = fileurl::file_url_to_path(&req.destination_url)
                .map_err(|m| bad_request("destination_url", m.to_string()))?;
            no_content(call(state, name, move |c| c.snapshot(&dir)).await?)?
        }
        "vm.restore" => {
            let req: RestoreRequest = parse_json(&body)?;
            let dir =
                fileurl::file_url_to_path(&req.source_url).map_err(|m| bad_request("source_url", m.to_string()))?;
            no_content(call(state, name, move |c| c.restore(&dir)).await?)?
        }
        "vm.backup" if method == Method::PUT => {
            let req: BackupRequest = parse_json(&body)?;
            let dir = fileurl::file_url_to_path(&req.destination_url)
                .map_err(|m| bad_request("destination_url", m.to_string()))?;
            let rate = req.rate_limit_mib_s;
            json_ok(call(state, name, move |c| c.backup(&dir, rate)).await?)?
        }
        "vm.backup" if method == Method::GET => json_ok(call(state, name, |c| c.backup_status()).await?)?,
        "vm.backup" => no_content(call(state, name, |c| c.backup_cancel()).await?)?,
        "vmm.ping" => json_response(StatusCode::OK, &call(state, name, |c| c.ping()).await?),
        "vmm.shutdown" => {
            shutdown_requested.store(true, Ordering::SeqCst);
            let mut resp = empty_response(StatusCode::NO_CONTENT);
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        _ => {
            // A path in ROUTES with no handler here: a bug, but not a reason to panic.
            return Err(error_response(
                StatusCode::NOT_FOUND,
                ErrorBody { error: format!("route {name} is not implemented"), field: None, state: None },
            ));
        }
    })
}

/// Runs a controller method on the blocking pool; a panic in it becomes a 500.
async fn call<T, F>(state: &State, what: &str, f: F) -> Result<T, Reject>
where
    F: FnOnce(&dyn Controller) -> T + Send + 'static,
    T: Send + 'static,
{
    let ctl = state.ctl.clone();
    tokio::task::spawn_blocking(move || f(&*ctl)).await.map_err(|e| {
        tracing::error!("API: the VMM failed handling {what}: {e}");
        error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody { error: format!("internal error: the VMM failed handling {what}"), field: None, state: None },
        )
    })
}

/// Reads the whole body: at most [`MAX_BODY_BYTES`] (413 past that) within the read timeout
/// (408 past that).
async fn read_body(body: Incoming, opts: &ServerOptions) -> Result<Bytes, Reject> {
    let too_large = || {
        let mut resp = error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorBody { error: format!("the request body is over {MAX_BODY_BYTES} bytes"), field: None, state: None },
        );
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    };
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(opts.read_timeout, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => {
            let mut resp = bad_request("body", format!("cannot read the request body: {e}"));
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(resp)
        }
        Err(_) => {
            let mut resp = error_response(
                StatusCode::REQUEST_TIMEOUT,
                ErrorBody {
                    error: format!("the request body did not arrive within {:?}", opts.read_timeout),
                    field: None,
                    state: None,
                },
            );
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(resp)
        }
    }
}

/// Whether a Content-Type header says JSON (`application/json`, parameters allowed).
fn content_type_is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Parses a JSON body; an error is a 400 naming the field where serde tells it.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reject> {
    parse_json_object(body).map_err(|(field, msg)| bad_request(&field, msg))
}

/// Parses a request body that must be one JSON object (serde would also take a struct as an
/// array of its fields) into `T`. Shared by the VMM's and the daemon's servers.
///
/// Errors: `(field, message)` for a 400: the field serde names (a missing or unknown one
/// included, see [`describe_json_error`]) or `"body"` when the body as a whole is wrong.
pub fn parse_json_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, (String, String)> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(("body".into(), "expected a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        describe_json_error(&path, e.into_inner())
    })?;
    de.end().map_err(|e| {
        ("body".to_string(), format!("unexpected data after the JSON value at line {} column {}", e.line(), e.column()))
    })?;
    Ok(value)
}

/// (field, message) for a serde_json error met at `path` ("." for the top level): the field
/// serde names (a missing or unknown one included) or "body", and a message without serde's
/// type names. Public so that the daemon's API (crates/manager) reports errors the same way.
pub fn describe_json_error(path: &str, e: serde_json::Error) -> (String, String) {
    use serde_json::error::Category;
    let at = format!(" at line {} column {}", e.line(), e.column());
    let full = e.to_string();
    let msg = full.strip_suffix(&at).unwrap_or(&full);
    // serde_path_to_error writes "?" for a position it cannot name (e.g. inside a map key).
    let path = path.trim_end_matches(['?', '.']);
    let field = (!path.is_empty() && !path.contains('?')).then(|| path.to_string());
    match e.classify() {
        Category::Eof => ("body".into(), format!("the JSON ends early{at}")),
        Category::Syntax if msg.starts_with("number out of range") && field.is_some() => {
            (field.unwrap_or_default(), "number out of range".into())
        }
        Category::Syntax | Category::Io => ("body".into(), format!("malformed JSON{at}: {msg}")),
        Category::Data => {
            // serde reports a missing or unknown field at the enclosing object: name the field.
            let named = ["missing field `", "unknown field `"].iter().find_map(|prefix| {
                let rest = msg.strip_prefix(prefix)?;
                let name = &rest[..rest.find('`')?];
                Some(if name.is_empty() { "\"\"".to_string() } else { name.to_string() })
            });
            let field = match (field, named) {
                (Some(p), Some(n)) if !p.ends_with(&n) => format!("{p}.{n}"),
                (Some(p), _) => p,
                (None, Some(n)) => n,
                (None, None) => "body".into(),
            };
            (field, friendly_serde_message(msg))
        }
    }
}

/// serde's type names in words a user of the API knows.
fn friendly_serde_message(msg: &str) -> String {
    msg.replace("expected u8", "expected an integer from 0 to 255")
        .replace("expected u16", "expected an integer from 0 to 65535")
        .replace("expected u32", "expected an integer from 0 to 4294967295")
        .replace("expected u64", "expected an integer from 0 to 18446744073709551615")
        .replace("expected struct ", "expected an object ")
}

fn no_content(r: Result<(), ApiError>) -> Result<Resp, Reject> {
    r.map(|()| empty_response(StatusCode::NO_CONTENT)).map_err(api_error_response)
}

fn json_ok<T: Serialize>(r: Result<T, ApiError>) -> Result<Resp, Reject> {
    r.map(|v| json_response(StatusCode::OK, &v)).map_err(api_error_response)
}

fn api_error_response(e: ApiError) -> Reject {
    let error = e.to_string();
    match e {
        ApiError::BadRequest { field, .. } => {
            error_response(StatusCode::BAD_REQUEST, ErrorBody { error, field: Some(field), state: None })
        }
        ApiError::Conflict { state, .. } | ApiError::NoDevice { state, .. } => {
            error_response(StatusCode::CONFLICT, ErrorBody { error, field: None, state: Some(state) })
        }
        ApiError::NotFound(_) => error_response(StatusCode::NOT_FOUND, ErrorBody { error, field: None, state: None }),
        ApiError::Internal(_) => {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, ErrorBody { error, field: None, state: None })
        }
    }
}

fn bad_request(field: &str, msg: impl std::fmt::Display) -> Reject {
    let error = if field == "body" { format!("request body: {msg}") } else { format!("{field}: {msg}") };
    error_response(StatusCode::BAD_REQUEST, ErrorBody { error, field: Some(field.to_string()), state: None })
}

fn error_response(status: StatusCode, body: ErrorBody) -> Reject {
    Box::new(json_response(status, &body))
}

/// A response with `value` as its JSON body (`Content-Type: application/json`); a value
/// that cannot be encoded becomes a 500 with the reason (shared with the daemon's server).
pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Resp {
    let (status, bytes) = match serde_json::to_vec(value) {
        Ok(bytes) => (status, bytes),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":\"cannot encode the response: {}\"}}", e.to_string().replace(['"', '\\'], "'"))
                .into_bytes(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A response with no body.
pub fn empty_response(status: StatusCode) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// A client-supplied string cut to 100 characters (then "...") for an error message.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of<T: DeserializeOwned + std::fmt::Debug>(json: &str) -> ErrorBody {
        let resp = parse_json::<T>(json.as_bytes()).unwrap_err();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body = body_bytes(*resp);
        serde_json::from_slice(&body).unwrap()
    }

    fn body_bytes(resp: Resp) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(resp.into_body().collect()).unwrap().to_bytes().to_vec()
    }

    #[test]
    fn json_errors_name_the_field() {
        for (json, field) in [
            (r#"{"kernel": 1}"#, "kernel"),
            (r#"{"kernel": "k", "memory_mib": "x"}"#, "memory_mib"),
            (r#"{"kernel": "k", "cpus": 300}"#, "cpus"),
            (r#"{"kernel": "k", "cpus": -1}"#, "cpus"),
            (r#"{"kernel": "k", "memory_mib": 1e999}"#, "memory_mib"),
            (r#"{"kernel": "k", "memory_mib": 99999999999999999999999}"#, "memory_mib"),
            (r#"{"kernel": "k", "bogus": 1}"#, "bogus"),
            (r#"{"memory_mib": 5}"#, "kernel"),
            (r#"{"kernel": "k", "disks": [{"path": "a"}, {"path": "b", "format": 3}]}"#, "disks[1].format"),
            (r#"{"kernel": "k", "disks": [{"path": "a"}, {"pth": "b"}]}"#, "disks[1].pth"),
            (r#"{"kernel": "k", "disks": [{}]}"#, "disks[0].path"),
            (r#"{"kernel": "k", "vsock": {"cid": 3}}"#, "vsock.socket"),
            (r#"{"kernel": "k""#, "body"),
            (r#"{"kernel": "k"} x"#, "body"),
            (r#"{"kernel": "k", "": 1}"#, r#""""#),
            (r#"{"kernel": "k", "disks": [{"path": "p", "": 1}]}"#, r#"disks[0]."""#),
            (r#"[1]"#, "body"),
            (r#"["k"]"#, "body"),
            (r#" 5"#, "body"),
            (r#"<html>"#, "body"),
            (r#"nul"#, "body"),
        ] {
            let e = err_of::<VmConfig>(json);
            assert_eq!(e.field.as_deref(), Some(field), "{json}: {e:?}");
        }
    }
}

//! The web dashboard at `/`: pages for pipelines, workflows, datasets,
//! live aggregates, alerts, nodes and the audit log, drawn in the browser
//! from the REST API with the signed-in session's rights.
//!
//! Promises:
//! - **Everything is in the binary.** The pages, the script and the style
//!   sheet are compiled in (`assets/`, `templates/`); nothing is fetched
//!   from elsewhere, and the Content-Security-Policy allows nothing else.
//! - **A token signs in, a cookie carries it.** `POST /sign-in` with an
//!   API token opens a session: a random id in an `HttpOnly`,
//!   `SameSite=Strict` cookie (`Secure` when the request came over TLS,
//!   as a proxy's `X-Forwarded-Proto: https` says). The server keeps only
//!   the id's hash and the token's hash; the token is looked up on every
//!   request, so revoking it ends its sessions at once. A session ends
//!   after `[server] session_ttl`, or at sign-out.
//! - **Every action is the API's.** Pages act through `/api/v1` like any
//!   client, so roles, the rate limit and the audit log apply once, in
//!   [`crate::api`]. A request carried by the cookie that changes
//!   anything needs the session's CSRF token in `X-CSRF-Token` and, when
//!   the browser sends one, an `Origin` of this server; a viewer's session
//!   gets 403 like a viewer's token.
//! - **Data is text.** The script writes every value through
//!   `textContent`, never as markup, and the policy forbids inline
//!   scripts: a record holding `<script>` shows as those characters.
//!
//! Sessions live in the memory of the process: a restart signs everyone
//! out, and behind a load balancer each node knows its own sessions.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::api::{Api, Role, token_hash};

/// The session cookie's name.
pub const COOKIE: &str = "caudal_session";
/// Sessions one token may have open; signing in again ends the oldest.
const MAX_SESSIONS_PER_TOKEN: usize = 20;
/// Sessions this process keeps at most.
const MAX_SESSIONS: usize = 10_000;

/// The header carrying the CSRF token of a cookie-carried request.
pub const CSRF_HEADER: &str = "x-csrf-token";

const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");

/// The pages the dashboard serves (each the same shell; the script draws
/// the page its path names).
pub const PAGES: [&str; 9] = [
    "/",
    "/pipelines/{name}",
    "/workflows/{name}",
    "/datasets",
    "/datasets/{name}",
    "/live",
    "/alerts",
    "/nodes",
    "/audit",
];

/// A signed-in browser.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// The hash of its id: how the server names it.
    pub(crate) key: String,
    /// The hash of the token it signed in with.
    pub(crate) token_hash: String,
    pub(crate) csrf: String,
    expires: Instant,
}

/// The open sessions of this process, by the hash of their id.
#[derive(Debug)]
pub(crate) struct Sessions {
    ttl: Duration,
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a session for the token of `token_hash`: its id (for the
    /// cookie) and the session.
    fn open(&self, token_hash: String) -> (String, Session) {
        let id = random_hex();
        let session = Session {
            key: crate::api::token_hash(&id),
            token_hash,
            csrf: random_hex(),
            expires: Instant::now() + self.ttl,
        };
        if let Ok(mut open) = self.open.lock() {
            let now = Instant::now();
            open.retain(|_, s| s.expires > now);
            // A token keeps its newest sessions; the process at most
            // MAX_SESSIONS (the oldest go first).
            let mut mine: Vec<(String, Instant)> = open
                .iter()
                .filter(|(_, s)| s.token_hash == session.token_hash)
                .map(|(k, s)| (k.clone(), s.expires))
                .collect();
            if mine.len() >= MAX_SESSIONS_PER_TOKEN {
                mine.sort_by_key(|(_, e)| *e);
                for (k, _) in &mine[..=mine.len() - MAX_SESSIONS_PER_TOKEN] {
                    open.remove(k);
                }
            }
            if open.len() >= MAX_SESSIONS
                && let Some(oldest) = open
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(k, _)| k.clone())
            {
                open.remove(&oldest);
            }
            open.insert(session.key.clone(), session.clone());
        }
        (id, session)
    }

    /// The live session the request's cookie names.
    pub(crate) fn of(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie_value(headers)?;
        let mut open = self.open.lock().ok()?;
        let key = crate::api::token_hash(&id);
        match open.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                open.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, headers: &HeaderMap) {
        if let (Some(id), Ok(mut open)) = (cookie_value(headers), self.open.lock()) {
            open.remove(&crate::api::token_hash(&id));
        }
    }
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session id in the request's `Cookie` headers.
fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == COOKIE)
        .map(|c| c.value().to_string())
}

/// Why a cookie-carried request that changes something is refused: a
/// missing or wrong CSRF token, or another site's `Origin`.
pub(crate) fn forged(session: &Session, headers: &HeaderMap) -> Option<&'static str> {
    let sent = headers
        .get(CSRF_HEADER)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !bool::from(sent.ct_eq(session.csrf.as_bytes())) {
        return Some("this needs the page's CSRF token in X-CSRF-Token: reload the page");
    }
    if !same_origin(headers) {
        return Some("the request came from another site (Origin)");
    }
    None
}

/// Whether the request's `Origin`, when it has one, is this server.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
    // This server as the browser addressed it: the Host header, or the
    // host a proxy in front of it was asked for.
    ["x-forwarded-host", "host"].iter().any(|name| {
        headers
            .get(*name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .is_some_and(|host| !host.is_empty() && origin_host.eq_ignore_ascii_case(host))
    })
}

/// Whether the request came over TLS (directly or through a proxy).
fn over_tls(headers: &HeaderMap) -> bool {
    let proto = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    proto("x-forwarded-proto") == "https" || proto("forwarded").contains("proto=https")
}

#[derive(Template)]
#[template(path = "shell.html")]
struct Shell<'a> {
    version: &'a str,
    token: &'a str,
    role: &'a str,
    csrf: &'a str,
    admin: bool,
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignIn<'a> {
    version: &'a str,
    next: &'a str,
    error: Option<&'a str>,
}

/// The dashboard's routes: pages, sign-in and sign-out, assets.
pub fn routes(api: Api) -> Router {
    let mut router = Router::new();
    for page in PAGES {
        router = router.route(page, get(page_shell));
    }
    router
        .route("/sign-in", get(sign_in_form).post(sign_in))
        .route("/sign-out", axum::routing::post(sign_out))
        .route("/ui/{version}/app.js", get(app_js))
        .route("/ui/{version}/app.css", get(app_css))
        .with_state(api)
}

/// The assets' version: they are cached for good under it.
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(APP_JS);
        h.update(APP_CSS);
        h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// Headers of every page: no caching, and nothing but this server's own
/// script and style.
fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        html,
    )
        .into_response()
}

/// `template` drawn as a page with `status`, or 500 saying why it could not
/// be drawn.
fn render(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => page(status, html),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot draw the page: {e}"),
        )
            .into_response(),
    }
}

/// Where to go after signing in: a path of this server, else `/`.
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n
                    .chars()
                    .any(|c| c == '\\' || c.is_whitespace() || c.is_control()) =>
        {
            n
        }
        _ => "/",
    }
}

fn to_sign_in(uri: &axum::http::Uri) -> Response {
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let next = percent_encoding::utf8_percent_encode(if target == "/" { "" } else { target }, NEXT)
        .to_string();
    if next.is_empty() {
        Redirect::to("/sign-in").into_response()
    } else {
        Redirect::to(&format!("/sign-in?next={next}")).into_response()
    }
}

/// What stays as is in `next`: a path's letters and separators.
const NEXT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

async fn page_shell(State(api): State<Api>, request: Request) -> Response {
    let headers = request.headers();
    let Some(session) = api.sessions().of(headers) else {
        return to_sign_in(request.uri());
    };
    let record = match api.store().token_by_hash(&session.token_hash).await {
        Ok(r) => r.filter(|r| r.revoked_at.is_none()),
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the state store does not answer: {}", e.report()),
            )
                .into_response();
        }
    };
    let Some(record) = record else {
        api.sessions().close(headers);
        return to_sign_in(request.uri());
    };
    let role = Role::parse(&record.role).unwrap_or(Role::Viewer);
    render(
        StatusCode::OK,
        &Shell {
            version: version(),
            token: &record.name,
            role: role.as_str(),
            csrf: &session.csrf,
            admin: role >= Role::Admin,
        },
    )
}

#[derive(Debug, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn sign_in_form(State(api): State<Api>, headers: HeaderMap, q: Query<NextQuery>) -> Response {
    let next = safe_next(q.next.as_deref());
    if api.sessions().of(&headers).is_some() {
        return Redirect::to(next).into_response();
    }
    render(
        StatusCode::OK,
        &SignIn {
            version: version(),
            next,
            error: None,
        },
    )
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
    next: Option<String>,
}

async fn sign_in(State(api): State<Api>, headers: HeaderMap, form: Form<SignInForm>) -> Response {
    let next = safe_next(form.next.as_deref());
    let refuse = |status: StatusCode, error: &str| {
        render(
            status,
            &SignIn {
                version: version(),
                next,
                error: Some(error),
            },
        )
    };
    if !same_origin(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "This sign-in came from another site.",
        );
    }
    let hash = token_hash(form.token.trim());
    let record = match api.store().token_by_hash(&hash).await {
        Ok(r) => r.filter(|r| r.revoked_at.is_none()),
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("The state store does not answer: {}", e.report()),
            );
        }
    };
    let Some(record) = record else {
        tracing::info!("dashboard sign-in refused: unknown or revoked token");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "That token is unknown or revoked. Create one with: caudal token create --name NAME --role viewer",
        );
    };
    let (id, _) = api.sessions().open(hash);
    let ttl = api
        .config()
        .server
        .as_ref()
        .map_or(12 * 3600, |s| s.session_ttl.as_std().as_secs().max(1));
    let mut cookie = cookie::Cookie::build((COOKIE, id))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::seconds(ttl as i64));
    let served_over_tls = api
        .config()
        .server
        .as_ref()
        .is_some_and(|s| s.tls.is_some());
    if served_over_tls || over_tls(&headers) {
        cookie = cookie.secure(true);
    }
    tracing::info!(token = %record.name, "dashboard sign-in");
    let mut response = Redirect::to(next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie.build().to_string()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

#[derive(Deserialize)]
struct SignOutForm {
    csrf: String,
}

async fn sign_out(State(api): State<Api>, headers: HeaderMap, form: Form<SignOutForm>) -> Response {
    if let Some(session) = api.sessions().of(&headers) {
        let same = bool::from(form.csrf.as_bytes().ct_eq(session.csrf.as_bytes()));
        if !same || !same_origin(&headers) {
            return (
                StatusCode::FORBIDDEN,
                "sign-out needs the page's CSRF token",
            )
                .into_response();
        }
        api.sessions().close(&headers);
    }
    let gone = cookie::Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO);
    let mut response = Redirect::to("/sign-in").into_response();
    if let Ok(v) = HeaderValue::from_str(&gone.build().to_string()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// An asset of this build; another version's is 404 (a browser must not
/// keep this one for good under that name).
fn asset(version_asked: &str, content_type: &'static str, body: &'static str) -> Response {
    if version_asked != version() {
        return (StatusCode::NOT_FOUND, "no such version of this asset").into_response();
    }
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn app_js(Path(v): Path<String>) -> Response {
    asset(&v, "text/javascript; charset=utf-8", APP_JS)
}

async fn app_css(Path(v): Path<String>) -> Response {
    asset(&v, "text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_server() {
        assert_eq!(safe_next(Some("/pipelines/a")), "/pipelines/a");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        // Browsers drop tabs and line breaks from a Location: "//evil".
        assert_eq!(safe_next(Some("/\t/evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(Some("/ /evil.example")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn origin_must_be_this_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9464"));
        assert!(same_origin(&h), "no Origin: a same-origin form or a tool");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9464"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        // Behind a proxy that rewrites Host.
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://caudal.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("caudal.example"),
        );
        assert!(same_origin(&h));
    }

    #[test]
    fn a_token_keeps_its_newest_sessions() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let ids: Vec<String> = (0..MAX_SESSIONS_PER_TOKEN + 5)
            .map(|_| sessions.open("t".into()).0)
            .collect();
        sessions.open("other".into());
        let live = |id: &String| {
            let mut h = HeaderMap::new();
            h.insert(
                header::COOKIE,
                HeaderValue::from_str(&format!("{COOKIE}={id}")).unwrap(),
            );
            sessions.of(&h).is_some()
        };
        assert_eq!(
            ids.iter().filter(|id| live(id)).count(),
            MAX_SESSIONS_PER_TOKEN
        );
        assert!(ids[..5].iter().all(|id| !live(id)), "the oldest ended");
        assert!(live(ids.last().unwrap()));
    }

    #[test]
    fn sessions_expire_and_close() {
        let sessions = Sessions::new(Duration::from_millis(300));
        let (id, s) = sessions.open("h".into());
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={id}")).unwrap(),
        );
        assert_eq!(sessions.of(&h).map(|s| s.csrf), Some(s.csrf));
        std::thread::sleep(Duration::from_millis(600));
        assert!(sessions.of(&h).is_none(), "expired");
        let (id, _) = sessions.open("h".into());
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}={id}")).unwrap(),
        );
        sessions.close(&h);
        assert!(sessions.of(&h).is_none(), "closed");
    }
}

//! The web UI: one page, its script and its style sheet, embedded in the
//! binary so that the page works with no network at all.
//!
//! The page needs no token to load; everything it shows comes from the API,
//! which does. Its Content-Security-Policy allows only this origin's own
//! script, style and connections, so even text that escaped escaping could
//! not run.

use tide::{Request, Response};

use crate::State;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub(crate) fn register(app: &mut tide::Server<State>) {
    app.at("/").get(|_req: Request<State>| async { Ok(asset(INDEX_HTML, "text/html; charset=utf-8")) });
    app.at("/app.js").get(|_req: Request<State>| async { Ok(asset(APP_JS, "text/javascript; charset=utf-8")) });
    app.at("/style.css").get(|_req: Request<State>| async { Ok(asset(STYLE_CSS, "text/css; charset=utf-8")) });
}

fn asset(body: &'static str, content_type: &str) -> Response {
    let mut response = Response::new(200);
    response.set_body(body);
    response.insert_header("Content-Type", content_type);
    response.insert_header("Content-Security-Policy", CONTENT_SECURITY_POLICY);
    response.insert_header("X-Content-Type-Options", "nosniff");
    response.insert_header("Referrer-Policy", "no-referrer");
    // The assets change with the binary; a stale script against a newer API
    // is worse than one more request.
    response.insert_header("Cache-Control", "no-cache");
    response
}

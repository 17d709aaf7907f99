//! What every request passes before a route sees it: the error shape, the
//! `Host` check (DNS rebinding), the `Origin` check (cross-site requests)
//! and the bearer token (or the browser's cookie).

use tide::{Next, Request};

use crate::error::ApiError;
use crate::State;

/// Turns every 4xx and 5xx answer without a JSON body (the router's 404 and
/// 405, tide's own errors) into the API's error shape. Upgrades (101) and
/// redirects pass untouched.
pub(crate) fn json_errors<'a>(
    req: Request<State>,
    next: Next<'a, State>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result> + Send + 'a>> {
    Box::pin(async move {
        let mut response = next.run(req).await;
        let status = u16::from(response.status());
        let is_json = response.content_type().is_some_and(|m| m.essence() == "application/json");
        if status >= 400 && !is_json {
            if let Some(e) = response.error() {
                log::debug!("request failed with {status}: {e}");
            }
            let error = ApiError::for_status(status);
            response.set_content_type(tide::http::mime::JSON);
            response.set_body(error.to_json());
        }
        Ok(response)
    })
}

/// Reads the request body (at most [`crate::MAX_BODY`] bytes) before
/// anything answers.
///
/// async-h1 discards an unread body after writing the answer, through a
/// buffered reader that it then drops; a keep-alive client that sent its
/// next request as soon as the answer came can have that request read into
/// the buffer and lost, and then waits forever. Reading first leaves nothing
/// to discard. A body over the cap is answered 413 at once with
/// `Connection: close`, since the rest of it is still on the wire.
pub(crate) fn body_first<'a>(
    mut req: Request<State>,
    next: Next<'a, State>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result> + Send + 'a>> {
    Box::pin(async move {
        use async_std::io::ReadExt;
        let cap = crate::MAX_BODY;
        let too_large = || {
            let mut response =
                ApiError::new(413, "payload_too_large", format!("the request body is over the {cap}-byte limit"))
                    .into_response();
            response.insert_header("Connection", "close");
            response
        };
        if req.len().is_some_and(|len| len > cap) {
            return Ok(too_large());
        }
        let mime = req.content_type();
        let mut bytes = Vec::new();
        let read = req.take_body().take(cap as u64 + 1).read_to_end(&mut bytes).await;
        if let Err(e) = read {
            let mut response =
                ApiError::bad_request("bad_body", format!("the request body could not be read: {e}")).into_response();
            response.insert_header("Connection", "close");
            return Ok(response);
        }
        if bytes.len() > cap {
            return Ok(too_large());
        }
        let mut body = tide::Body::from_bytes(bytes);
        if let Some(mime) = mime {
            body.set_mime(mime);
        }
        req.set_body(body);
        Ok(next.run(req).await)
    })
}

/// Refuses requests for a `Host` that is not a loopback name or a
/// configured one: a page on another site that rebinds its DNS name to
/// 127.0.0.1 sends its own name.
pub(crate) fn host_check<'a>(
    req: Request<State>,
    next: Next<'a, State>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result> + Send + 'a>> {
    Box::pin(async move {
        let host = req.header("Host").map(|h| h.last().as_str().to_owned());
        let allowed = host.as_deref().is_some_and(|h| req.state().host_allowed(h));
        if !allowed {
            let shown = host.unwrap_or_else(|| "(none)".into());
            return Ok(ApiError::new(
                403,
                "host_not_allowed",
                format!("requests for host {shown:?} are refused; use 127.0.0.1 or localhost, or add the name to api_allowed_hosts"),
            )
            .into_response());
        }
        Ok(next.run(req).await)
    })
}

/// Refuses state-changing requests and WebSocket upgrades sent by a page
/// of another origin. Requests without `Origin` (curl, scripts) pass.
pub(crate) fn origin_check<'a>(
    req: Request<State>,
    next: Next<'a, State>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result> + Send + 'a>> {
    Box::pin(async move {
        let safe = matches!(req.method(), tide::http::Method::Get | tide::http::Method::Head);
        let upgrade = req.header("Upgrade").is_some();
        if !safe || upgrade {
            if let Some(origin) = req.header("Origin").map(|o| o.last().as_str().to_owned()) {
                let host = req.header("Host").map(|h| h.last().as_str().to_owned()).unwrap_or_default();
                let same = origin.strip_prefix("http://").is_some_and(|rest| rest.eq_ignore_ascii_case(&host));
                if !same {
                    return Ok(ApiError::new(
                        403,
                        "origin_not_allowed",
                        format!("requests from origin {origin:?} are refused; only this node's own page may send them"),
                    )
                    .into_response());
                }
            }
        }
        Ok(next.run(req).await)
    })
}

/// Requires the API token on `/api/` routes: `Authorization: Bearer ...`,
/// or the cookie that the one-time login link sets in a browser.
pub(crate) fn token_check<'a>(
    req: Request<State>,
    next: Next<'a, State>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = tide::Result> + Send + 'a>> {
    Box::pin(async move {
        if !req.url().path().starts_with("/api/") {
            return Ok(next.run(req).await);
        }
        let state = req.state();
        let bearer = req.header("Authorization").and_then(|v| bearer_token(v.last().as_str()));
        let cookie = req.header("Cookie").and_then(|v| cookie_value(v.last().as_str(), &state.cookie_name()));
        let presented = bearer.or(cookie);
        match presented {
            Some(token) if state.token_matches(&token) => Ok(next.run(req).await),
            Some(_) => Ok(ApiError::new(401, "unauthorized", "the token is wrong; `p2pchat token` prints this node's")
                .into_response()),
            None => Ok(ApiError::new(
                401,
                "unauthorized",
                "a token is needed: send `Authorization: Bearer <token>` (`p2pchat token` prints it)",
            )
            .into_response()),
        }
    })
}

/// The token of an `Authorization: Bearer <token>` header; the scheme's
/// name is case-insensitive (RFC 9110, section 11.1).
pub(crate) fn bearer_token(header: &str) -> Option<String> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

/// The value of cookie `name` in a `Cookie` header.
pub(crate) fn cookie_value(header: &str, name: &str) -> Option<String> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `host` (a `Host` header, with or without a port) names this
/// machine's loopback or one of `extra`.
pub(crate) fn host_allowed(host: &str, extra: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [::1]:port
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, port)| if port.parse::<u16>().is_ok() { name } else { host })
    };
    let name = name.to_ascii_lowercase();
    name == "localhost" || name == "127.0.0.1" || name == "::1" || extra.iter().any(|e| e.eq_ignore_ascii_case(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_loopback_names_or_configured_ones() {
        assert!(host_allowed("127.0.0.1:30069", &[]));
        assert!(host_allowed("localhost", &[]));
        assert!(host_allowed("LOCALHOST:80", &[]));
        assert!(host_allowed("[::1]:30069", &[]));
        assert!(!host_allowed("evil.example:30069", &[]));
        assert!(!host_allowed("127.0.0.1.evil.example", &[]));
        assert!(host_allowed("chat.lan:8080", &["chat.lan".into()]));
    }

    #[test]
    fn bearer_schemes_match_in_any_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc".into()));
        assert_eq!(bearer_token("bearer  abc "), Some("abc".into()));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        assert_eq!(cookie_value("a=1; p2pchat_token_30069=xyz; b=2", "p2pchat_token_30069"), Some("xyz".into()));
        assert_eq!(cookie_value("p2pchat_token_30070=xyz", "p2pchat_token_30069"), None);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

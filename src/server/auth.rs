//! Optional bearer-token check on all three doors (health checks, CORS preflights and the web
//! page's static files exempt),
//! compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::status::ServerError;

/// The configured token, if any.
#[derive(Clone)]
pub struct Token(pub Option<Arc<String>>);

fn exempt(req: &Request) -> bool {
    let p = req.uri().path();
    req.method() == http::Method::OPTIONS
        || p == "/healthz"
        || super::page::is_page(req.method(), p)
        || p.starts_with("/grpc.health.v1.Health/")
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

/// Checks `Authorization: Bearer <token>` (gRPC metadata travels as the same header).
pub fn check(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    }) else {
        return false;
    };
    // Lengths are not secret; contents are compared in constant time.
    given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

pub async fn middleware(State(token): State<Token>, req: Request, next: Next) -> Response {
    let Some(token) = token.0.as_deref() else {
        return next.run(req).await;
    };
    if exempt(&req) {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if check(header, token) {
        return next.run(req).await;
    }
    tracing::info!(path = %req.uri().path(), "unauthenticated request refused");
    if is_grpc(&req) {
        // A trailers-only gRPC response, which gRPC-Web clients read from the headers too.
        let mut r = ServerError::Unauthenticated
            .to_status()
            .into_http::<axum::body::Body>();
        let ct = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(http::HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
        r
    } else {
        ServerError::Unauthenticated.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn bearer_tokens() {
        assert!(check(Some("Bearer s3cret"), "s3cret"));
        assert!(!check(Some("Bearer s3cre"), "s3cret"));
        assert!(!check(Some("Bearer s3cret!"), "s3cret"));
        assert!(!check(Some("s3cret"), "s3cret"));
        assert!(!check(None, "s3cret"));
    }
}

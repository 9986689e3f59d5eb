//! The web page (`GET /`) and its assets, embedded in the binary: `clients/web/` and the pure
//! modules it shares with the Photoshop plugin (`clients/shared/`). Static files only; they
//! need no token (the page asks for one and sends it with every API call).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const JS: &str = "text/javascript; charset=utf-8";

/// `(path under /ui/, content type, body)`.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../../clients/web/app.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../clients/web/style.css"),
    ),
    (
        "shared/base64.js",
        JS,
        include_str!("../../clients/shared/base64.js"),
    ),
    (
        "shared/errors.js",
        JS,
        include_str!("../../clients/shared/errors.js"),
    ),
    (
        "shared/pixels.js",
        JS,
        include_str!("../../clients/shared/pixels.js"),
    ),
    (
        "shared/request.js",
        JS,
        include_str!("../../clients/shared/request.js"),
    ),
    (
        "shared/sse.js",
        JS,
        include_str!("../../clients/shared/sse.js"),
    ),
    (
        "shared/state.js",
        JS,
        include_str!("../../clients/shared/state.js"),
    ),
    (
        "shared/transport.js",
        JS,
        include_str!("../../clients/shared/transport.js"),
    ),
];

const INDEX: &str = include_str!("../../clients/web/index.html");

/// Whether a request is for the page (exempt from the token).
pub fn is_page(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::GET && (path == "/" || path.starts_with("/ui/"))
}

pub fn router() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ui/{*path}", get(asset))
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, mime, body)) => (
            [
                (header::CONTENT_TYPE, *mime),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shared_module_and_page_file_is_served() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
        for (dir, prefix) in [("shared", "shared/"), ("web", "")] {
            for e in std::fs::read_dir(root.join(dir)).expect("clients dir") {
                let name = e.expect("entry").file_name().to_string_lossy().into_owned();
                if name == "index.html" {
                    continue;
                }
                let path = format!("{prefix}{name}");
                assert!(
                    ASSETS.iter().any(|(p, _, _)| *p == path),
                    "{path} is not served"
                );
            }
        }
        assert!(is_page(&axum::http::Method::GET, "/ui/shared/sse.js"));
        assert!(!is_page(&axum::http::Method::POST, "/"));
        assert!(!is_page(&axum::http::Method::GET, "/v1/info"));
    }
}

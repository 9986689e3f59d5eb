//! Every server-side failure, and its one mapping to a gRPC status and to an HTTP response.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tonic_types::{ErrorDetails, StatusExt};

/// What can go wrong with a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServerError {
    /// A field of the request is unusable.
    #[error("invalid {field}: {message}")]
    Invalid { field: String, message: String },
    /// The request body is larger than the configured limit.
    #[error("the request is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// The queue is full; try again later.
    #[error("the edit queue is full ({capacity} waiting); retry in about {retry_after:?}")]
    QueueFull {
        capacity: usize,
        retry_after: Duration,
    },
    /// The request's deadline passed before it finished.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The client cancelled or went away.
    #[error("cancelled by the client")]
    Cancelled,
    /// Missing or wrong bearer token.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    /// The server is shutting down or not ready.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure of the model.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServerError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServerError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ServerError::Invalid { .. } => "invalid",
            ServerError::QueueFull { .. } => "queue_full",
            ServerError::TooLarge { .. } => "too_large",
            ServerError::DeadlineExceeded => "deadline",
            ServerError::Cancelled => "cancelled",
            ServerError::Unauthenticated => "unauthenticated",
            ServerError::Unavailable(_) => "unavailable",
            ServerError::Internal(_) => "internal",
        }
    }

    /// The gRPC status (with `BadRequest` / `RetryInfo` details where they apply).
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            ServerError::Invalid { field, message } => tonic::Status::with_error_details(
                tonic::Code::InvalidArgument,
                msg,
                ErrorDetails::with_bad_request_violation(field.clone(), message.clone()),
            ),
            ServerError::QueueFull { retry_after, .. } => tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                msg,
                ErrorDetails::with_retry_info(Some(*retry_after)),
            ),
            ServerError::TooLarge { .. } => tonic::Status::resource_exhausted(msg),
            ServerError::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            ServerError::Cancelled => tonic::Status::cancelled(msg),
            ServerError::Unauthenticated => tonic::Status::unauthenticated(msg),
            ServerError::Unavailable(_) => tonic::Status::unavailable(msg),
            ServerError::Internal(_) => tonic::Status::internal(msg),
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ServerError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ServerError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ServerError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServerError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            // 499 (client closed request) as nginx uses it.
            ServerError::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ServerError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ServerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body of an HTTP error: `{"error": {"code", "message", "field"?}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut e = serde_json::json!({
            "code": self.to_status().code().description(),
            "message": self.to_string(),
        });
        if let ServerError::Invalid { field, .. } = self {
            e["field"] = serde_json::Value::String(field.clone());
        }
        serde_json::json!({ "error": e })
    }
}

impl From<crate::Error> for ServerError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::InvalidArgument { field, message } => ServerError::invalid(field, message),
            E::Image(m) => ServerError::invalid("image", m),
            E::Scheduler(m) => ServerError::invalid("scheduler", m),
            E::Tokenizer(m) => ServerError::invalid("instruction", m),
            E::Cancelled => ServerError::Cancelled,
            E::Unavailable(m) => ServerError::Unavailable(m),
            other => ServerError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let mut r = (self.http_status(), axum::Json(self.to_json())).into_response();
        if let ServerError::QueueFull { retry_after, .. } = &self {
            if let Ok(v) = http::HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                r.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        if matches!(self, ServerError::Unauthenticated) {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_one_status() {
        let e = ServerError::invalid("steps", "0 is outside 1..=1000");
        let s = e.to_status();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let details = s.get_error_details();
        let br = details.bad_request().expect("BadRequest details");
        assert_eq!(br.field_violations[0].field, "steps");
        assert_eq!(e.http_status(), StatusCode::BAD_REQUEST);
        let q = ServerError::QueueFull {
            capacity: 4,
            retry_after: Duration::from_secs(3),
        };
        assert_eq!(q.to_status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(q.http_status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            ServerError::DeadlineExceeded.to_status().code(),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(
            ServerError::from(crate::Error::Cancelled),
            ServerError::Cancelled
        );
        assert_eq!(
            ServerError::from(crate::Error::Image("corrupt".into())),
            ServerError::invalid("image", "corrupt")
        );
    }
}

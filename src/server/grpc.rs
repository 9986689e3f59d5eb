//! The gRPC `ImageEditor` service: validate, enqueue, relay events. No tensor math here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::jobs::{events, submit, wait_result};
use super::proto::{self, image_editor_server::ImageEditor};
use super::AppState;

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline_of<T>(req: &Request<T>) -> Option<Instant> {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|d| Instant::now() + d)
}

/// The service implementation.
pub struct Service {
    pub state: Arc<AppState>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::EditEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ImageEditor for Service {
    async fn edit(
        &self,
        request: Request<proto::EditRequest>,
    ) -> Result<Response<proto::EditResponse>, Status> {
        let door = door_of(&request);
        let deadline = deadline_of(&request);
        let s = submit(&self.state, request.into_inner(), deadline, door)
            .await
            .map_err(|e| e.to_status())?;
        wait_result(s, &self.state, door)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    type EditStreamStream = EventStream;

    async fn edit_stream(
        &self,
        request: Request<proto::EditRequest>,
    ) -> Result<Response<Self::EditStreamStream>, Status> {
        let door = door_of(&request);
        let deadline = deadline_of(&request);
        let s = submit(&self.state, request.into_inner(), deadline, door)
            .await
            .map_err(|e| e.to_status())?;
        let stream = events(s, self.state.clone(), door).map(|r| r.map_err(|e| e.to_status()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::ServerInfo>, Status> {
        Ok(Response::new(self.state.info()))
    }
}

fn door_of<T>(req: &Request<T>) -> &'static str {
    let ct = req
        .metadata()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/grpc-web") {
        "grpc-web"
    } else {
        "grpc"
    }
}

//! The door-agnostic part of handling an edit: validate off the runtime, enqueue, wait for
//! the result or relay the events. Every door (gRPC, gRPC-Web, HTTP) goes through here, so the
//! same request gives the same bytes whichever door it came in by.

use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::mpsc;

use super::proto;
use super::status::ServerError;
use super::worker::{Job, JobEvent};
use super::AppState;
use crate::pipeline::CancelToken;

/// Cancels its job when dropped (the handler's future is dropped when the client goes away).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What a door needs to submit a request.
pub struct Submitted {
    pub events: mpsc::Receiver<JobEvent>,
    /// When the client stops waiting; the worker stops the job then too.
    pub deadline: Option<Instant>,
    pub position: usize,
    pub cancel: CancelToken,
}

/// Validates (off the async runtime) and enqueues. Shared by every door.
pub async fn submit(
    state: &AppState,
    req: proto::EditRequest,
    deadline: Option<Instant>,
    door: &'static str,
) -> Result<Submitted, ServerError> {
    let cfg = state.config.clone();
    let job = tokio::task::spawn_blocking(move || super::validate::validate(&req, &cfg))
        .await
        .map_err(|e| ServerError::Internal(format!("validation task: {e}")))?;
    let job = match job {
        Ok(j) => j,
        Err(e) => {
            state.metrics.record(door, e.outcome());
            tracing::info!(door, error = %e, "rejected");
            return Err(e);
        }
    };
    let (tx, rx) = mpsc::channel(64);
    let cancel = CancelToken::new();
    let request_id = job.request_id.clone();
    let position = state
        .queue
        .submit(Job {
            job,
            events: tx,
            cancel: cancel.clone(),
            deadline,
            enqueued: Instant::now(),
        })
        .inspect_err(|e| {
            state.metrics.record(door, e.outcome());
            tracing::info!(door, request_id = %request_id, error = %e, "refused");
        })?;
    tracing::info!(door, request_id = %request_id, position, "queued");
    Ok(Submitted {
        events: rx,
        deadline,
        position,
        cancel,
    })
}

/// Waits for the final result of a submitted job.
pub async fn wait_result(
    mut s: Submitted,
    state: &AppState,
    door: &'static str,
) -> Result<proto::EditResponse, ServerError> {
    let _guard = CancelOnDrop(s.cancel.clone());
    let r = loop {
        match recv_until(&mut s.events, s.deadline).await {
            Some(JobEvent::Done(r)) => break *r,
            Some(_) => continue,
            None if s.deadline.is_some_and(|d| Instant::now() >= d) => {
                break Err(ServerError::DeadlineExceeded)
            }
            None => break Err(ServerError::Internal("the worker dropped the job".into())),
        }
    };
    state.metrics.record(
        door,
        r.as_ref().map(|_| "ok").unwrap_or_else(|e| e.outcome()),
    );
    r
}

/// The job's events as `EditEvent`s: `queued`, `started`, `progress`…, then the result (or the
/// error, last). Dropping the stream cancels the job.
pub fn events(
    s: Submitted,
    state: Arc<AppState>,
    door: &'static str,
) -> impl Stream<Item = Result<proto::EditEvent, ServerError>> + Send {
    struct St {
        rx: mpsc::Receiver<JobEvent>,
        _guard: CancelOnDrop,
        queued: Option<proto::EditEvent>,
        deadline: Option<Instant>,
        done: bool,
        state: Arc<AppState>,
        door: &'static str,
    }
    // A stream dropped before its last event (the client went away or pressed cancel) counts
    // as a cancelled request of its door.
    impl Drop for St {
        fn drop(&mut self) {
            if !self.done {
                self.state.metrics.record(self.door, "cancelled");
            }
        }
    }
    let st = St {
        _guard: CancelOnDrop(s.cancel.clone()),
        queued: Some(event(proto::edit_event::Event::Queued(proto::Queued {
            position: s.position as u32,
        }))),
        rx: s.events,
        deadline: s.deadline,
        done: false,
        state,
        door,
    };
    futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(q) = st.queued.take() {
            return Some((Ok(q), st));
        }
        let item = match recv_until(&mut st.rx, st.deadline).await {
            Some(JobEvent::Started) => {
                Ok(event(proto::edit_event::Event::Started(proto::Started {})))
            }
            Some(JobEvent::Progress {
                step,
                total,
                variation,
                preview,
            }) => Ok(event(proto::edit_event::Event::Progress(proto::Progress {
                step,
                total,
                variation,
                preview,
            }))),
            Some(JobEvent::Done(r)) => {
                st.done = true;
                st.state.metrics.record(
                    st.door,
                    r.as_ref()
                        .as_ref()
                        .map(|_| "ok")
                        .unwrap_or_else(|e| e.outcome()),
                );
                (*r).map(|resp| event(proto::edit_event::Event::Result(resp)))
            }
            None if st.deadline.is_some_and(|d| Instant::now() >= d) => {
                st.done = true;
                st.state.metrics.record(st.door, "deadline");
                Err(ServerError::DeadlineExceeded)
            }
            None => {
                st.done = true;
                Err(ServerError::Internal("the worker dropped the job".into()))
            }
        };
        Some((item, st))
    })
}

/// The next event, or `None` when the channel closed or the deadline passed (whichever first):
/// a job waiting in the queue is answered at its deadline, not when the worker reaches it.
async fn recv_until(
    rx: &mut mpsc::Receiver<JobEvent>,
    deadline: Option<Instant>,
) -> Option<JobEvent> {
    match deadline {
        None => rx.recv().await,
        Some(d) => tokio::time::timeout_at(d.into(), rx.recv())
            .await
            .ok()
            .flatten(),
    }
}

fn event(e: proto::edit_event::Event) -> proto::EditEvent {
    proto::EditEvent { event: Some(e) }
}

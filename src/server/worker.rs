//! The threads that own the model (one per device), fed by one bounded queue (the
//! text-embeddings-inference shape).
//!
//! Handlers validate, then [`Queue::submit`]: a full queue is refused at once. The worker runs
//! one edit at a time; after every denoising step it checks whether the job was cancelled, its
//! client went away (the event receiver was dropped) or its deadline passed, so a job stops within
//! one step and its slot is freed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use super::codec;
use super::metrics::Metrics;
use super::proto;
use super::status::ServerError;
use super::validate::ValidJob;
use crate::loader::lora::LoraLibrary;
use crate::pipeline::image::blend_masked;
use crate::pipeline::{CancelToken, Control, EditOutput, EditPipeline, StepInfo};

/// What a job reports back.
#[derive(Debug)]
pub enum JobEvent {
    Started,
    Progress {
        step: u32,
        total: u32,
        variation: u32,
        preview: Option<Vec<u8>>,
    },
    Done(Box<Result<proto::EditResponse, ServerError>>),
}

/// One queued edit.
#[derive(Debug)]
pub struct Job {
    pub job: ValidJob,
    pub events: mpsc::Sender<JobEvent>,
    pub cancel: CancelToken,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
}

/// The sending side of the queue, shared by every handler.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    accepting: Arc<AtomicBool>,
    idle: Arc<Notify>,
    metrics: Metrics,
    step_estimate_ms: Arc<AtomicUsize>,
}

impl Queue {
    /// Jobs waiting (not counting the one running).
    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Jobs running now (at most one per worker).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Enqueues a job, or refuses at once when the queue is full or the server is draining.
    /// Returns the job's position (jobs ahead of it).
    pub fn submit(&self, job: Job) -> Result<usize, ServerError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(ServerError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        let ahead = self.waiting.load(Ordering::SeqCst) + self.running.load(Ordering::SeqCst);
        let steps = job.job.params.steps;
        // Count the job before the worker can see it, so the counter never goes below zero.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let r = self.tx.try_send(job);
        if r.is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        match r {
            Ok(()) => {
                self.metrics.queue_depth.set(self.depth() as i64);
                Ok(ahead)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let per_step = self.step_estimate_ms.load(Ordering::Relaxed).max(1) as u64;
                let secs = (per_step * steps as u64 / 1000).clamp(1, 3600);
                Err(ServerError::QueueFull {
                    capacity: self.capacity,
                    retry_after: Duration::from_secs(secs),
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(ServerError::Unavailable("the worker has stopped".into()))
            }
        }
    }

    /// Stops accepting new jobs (SIGTERM); queued and running ones go on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    pub fn is_idle(&self) -> bool {
        self.depth() == 0 && self.running.load(Ordering::SeqCst) == 0
    }

    /// Waits until no job is queued or running.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

/// One model worker: a pipeline on its device, with the labels its metrics carry.
#[derive(Debug, Clone)]
pub struct Worker {
    pub pipeline: Arc<EditPipeline>,
    /// The LoRA files requests may name.
    loras: Arc<LoraLibrary>,
    /// `[worker index, device]`.
    labels: [String; 2],
}

/// The pipeline with the last LoRA set a request named, kept while the next ones name it too.
#[derive(Default)]
struct Adapted {
    set: Vec<(String, f64)>,
    pipeline: Option<Arc<EditPipeline>>,
}

impl Worker {
    pub fn new(index: usize, pipeline: Arc<EditPipeline>, loras: Arc<LoraLibrary>) -> Self {
        let device = crate::device::label(&pipeline.components().device);
        Self {
            pipeline,
            loras,
            labels: [index.to_string(), device],
        }
    }

    /// The pipeline for a job naming `set`: the model itself when empty, else a copy with
    /// those files folded in (made once per change of set; the model is never modified).
    fn pipeline_for(
        &self,
        set: &[(String, f64)],
        cache: &mut Adapted,
    ) -> Result<Arc<EditPipeline>, ServerError> {
        if set.is_empty() {
            return Ok(self.pipeline.clone());
        }
        if let Some(p) = cache.pipeline.as_ref().filter(|_| cache.set == set) {
            return Ok(p.clone());
        }
        cache.pipeline = None;
        let t = Instant::now();
        let p = Arc::new(self.pipeline.with_loras(&self.loras, set)?);
        tracing::info!(loras = ?set, seconds = t.elapsed().as_secs_f64(), "LoRA applied");
        cache.set = set.to_vec();
        cache.pipeline = Some(p.clone());
        Ok(p)
    }

    fn labels(&self) -> [&str; 2] {
        [&self.labels[0], &self.labels[1]]
    }
}

/// Starts one thread per worker, all fed by one queue: each job goes to the next free worker.
/// `queue_capacity` jobs may wait beyond the ones running.
pub fn spawn(
    workers: Vec<Worker>,
    queue_capacity: usize,
    preview_size: u32,
    metrics: Metrics,
) -> std::io::Result<Queue> {
    let (tx, rx) = mpsc::channel::<Job>(queue_capacity.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let queue = Queue {
        tx,
        capacity: queue_capacity.max(1),
        waiting: Arc::new(AtomicUsize::new(0)),
        running: Arc::new(AtomicUsize::new(0)),
        accepting: Arc::new(AtomicBool::new(true)),
        idle: Arc::new(Notify::new()),
        metrics: metrics.clone(),
        step_estimate_ms: Arc::new(AtomicUsize::new(1000)),
    };
    for w in workers {
        let (q, rx, metrics) = (queue.clone(), rx.clone(), metrics.clone());
        std::thread::Builder::new()
            .name(format!("ip2p-worker-{}", w.labels[0]))
            .spawn(move || worker_loop(&w, &rx, &q, preview_size, &metrics))?;
    }
    Ok(queue)
}

/// Takes jobs until the queue closes. Only a free worker waits on the receiver, so the next
/// job goes to whichever worker is free first.
fn worker_loop(
    w: &Worker,
    rx: &tokio::sync::Mutex<mpsc::Receiver<Job>>,
    q: &Queue,
    preview_size: u32,
    metrics: &Metrics,
) {
    let mut adapted = Adapted::default();
    loop {
        let job = rx.blocking_lock().blocking_recv();
        let Some(job) = job else { break };
        q.running.fetch_add(1, Ordering::SeqCst);
        q.waiting.fetch_sub(1, Ordering::SeqCst);
        metrics.queue_depth.set(q.depth() as i64);
        metrics.in_flight.inc();
        tracing::debug!(worker = w.labels[0], device = w.labels[1], "job taken");
        run_job(
            w,
            &mut adapted,
            job,
            preview_size,
            metrics,
            &q.step_estimate_ms,
        );
        metrics.worker_edits.with_label_values(&w.labels()).inc();
        metrics.in_flight.dec();
        q.running.fetch_sub(1, Ordering::SeqCst);
        q.idle.notify_waiters();
    }
}

/// One job on a worker: what each of its variations needs.
struct Running<'a> {
    worker: &'a Worker,
    pipeline: &'a EditPipeline,
    job: &'a ValidJob,
    events: &'a mpsc::Sender<JobEvent>,
    cancel: &'a CancelToken,
    deadline: Option<Instant>,
    metrics: &'a Metrics,
    step_ms: &'a AtomicUsize,
    preview_size: u32,
}

impl Running<'_> {
    /// Why the job must stop now, if it must: its deadline passed, or its caller left.
    fn stop_reason(&self) -> Option<ServerError> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(ServerError::DeadlineExceeded)
        } else if self.cancel.is_cancelled() || self.events.is_closed() {
            Some(ServerError::Cancelled)
        } else {
            None
        }
    }

    /// Edits variation `v` (seed + v) with progress events and per-step metrics, masks and
    /// encodes it. An error ends the job.
    fn variation(&self, v: u32) -> Result<(proto::EditedImage, EditOutput), ServerError> {
        let job = self.job;
        let mut params = job.params.clone();
        params.seed = job.params.seed.wrapping_add(v as u64);
        let mut last = Instant::now();
        let mut stopped: Option<ServerError> = None;
        let mut progress = |i: &StepInfo<'_>| {
            let dt = last.elapsed();
            last = Instant::now();
            let labels = self.worker.labels();
            self.metrics
                .step_seconds
                .with_label_values(&labels)
                .observe(dt.as_secs_f64());
            self.step_ms
                .store(dt.as_millis() as usize, Ordering::Relaxed);
            if let Some(e) = self.stop_reason() {
                stopped = Some(e);
                return Control::Stop;
            }
            let preview = (job.preview_every > 0
                && (i.step as u32).is_multiple_of(job.preview_every))
            .then(|| codec::preview_png(i.latents, self.preview_size))
            .flatten();
            // Progress is best effort: a slow reader loses progress events, never the result.
            let _ = self.events.try_send(JobEvent::Progress {
                step: i.step as u32,
                total: i.total as u32,
                variation: v,
                preview,
            });
            Control::Continue
        };
        let out = match self.pipeline.edit(&job.input, &params, &mut progress) {
            Ok(o) => o,
            Err(crate::Error::Cancelled) => return Err(stopped.unwrap_or(ServerError::Cancelled)),
            Err(e) => {
                tracing::error!(error = %e, "edit failed");
                return Err(e.into());
            }
        };
        let image = match &job.mask {
            Some(mask) => blend_masked(
                &job.input.restore_alpha(job.input.rgb.clone()),
                &out.image,
                mask,
            ),
            None => out.image.clone(),
        };
        Ok((codec::encode(&image, job.output, out.seed)?, out))
    }
}

/// The parameters an edit ran with, as the response reports them.
fn parameters_used(job: &ValidJob, out: &EditOutput) -> proto::EditParameters {
    let p = &job.params;
    proto::EditParameters {
        steps: p.steps as u32,
        text_guidance: p.text_guidance as f32,
        image_guidance: p.image_guidance as f32,
        scheduler: out.scheduler.name().into(),
        resolution: p.resolution,
        resize: proto::ResizePolicy::from(p.resize) as i32,
        working_width: out.working_size.0,
        working_height: out.working_size.1,
        truncated_tokens: out.truncated_tokens as u32,
        seed: p.seed,
        variations: job.variations,
    }
}

fn run_job(
    worker: &Worker,
    adapted: &mut Adapted,
    job: Job,
    preview_size: u32,
    metrics: &Metrics,
    step_ms: &AtomicUsize,
) {
    let Job {
        job,
        events,
        cancel,
        deadline,
        enqueued,
    } = job;
    let span =
        tracing::info_span!("edit", request_id = %job.request_id, device = %worker.labels[1]);
    let _g = span.enter();
    let pipeline = match worker.pipeline_for(&job.loras, adapted) {
        Ok(p) => p,
        Err(e) => {
            let _ = events.blocking_send(JobEvent::Done(Box::new(Err(e))));
            return;
        }
    };
    let run = Running {
        worker,
        pipeline: &pipeline,
        job: &job,
        events: &events,
        cancel: &cancel,
        deadline,
        metrics,
        step_ms,
        preview_size,
    };
    if let Some(e) = run.stop_reason() {
        tracing::info!(reason = e.outcome(), "dropped before starting");
        let _ = events.try_send(JobEvent::Done(Box::new(Err(e))));
        return;
    }
    let _ = events.try_send(JobEvent::Started);
    tracing::info!(
        steps = job.params.steps,
        variations = job.variations,
        w = job.input.width(),
        h = job.input.height(),
        "started"
    );
    let done = match run.respond(enqueued) {
        Err(e @ (ServerError::Cancelled | ServerError::DeadlineExceeded)) => {
            tracing::info!(reason = e.outcome(), "stopped");
            let _ = events.try_send(JobEvent::Done(Box::new(Err(e))));
            return;
        }
        other => other,
    };
    let _ = events.blocking_send(JobEvent::Done(Box::new(done)));
}

impl Running<'_> {
    /// Every variation in turn, then the response with its parameters and timings.
    fn respond(&self, enqueued: Instant) -> Result<proto::EditResponse, ServerError> {
        let job = self.job;
        let mut timings = proto::Timings {
            queue_seconds: (Instant::now() - enqueued).as_secs_f64(),
            ..Default::default()
        };
        let mut images = Vec::with_capacity(job.variations as usize);
        let mut params_used = None;
        for v in 0..job.variations {
            let (image, out) = self.variation(v)?;
            images.push(image);
            timings.encode_seconds += out.timings.encode.as_secs_f64();
            timings.denoise_seconds += out.timings.denoise.as_secs_f64();
            timings.decode_seconds += out.timings.decode.as_secs_f64();
            params_used.get_or_insert_with(|| parameters_used(job, &out));
        }
        timings.total_seconds = enqueued.elapsed().as_secs_f64();
        self.metrics
            .edit_seconds
            .with_label_values(&self.worker.labels())
            .observe(timings.total_seconds);
        tracing::info!(
            total_s = timings.total_seconds,
            queue_s = timings.queue_seconds,
            "finished"
        );
        Ok(proto::EditResponse {
            request_id: job.request_id.clone(),
            images,
            parameters: params_used,
            timings: Some(timings),
        })
    }
}

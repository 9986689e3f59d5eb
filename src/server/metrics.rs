//! Prometheus metrics: requests by door and outcome, queue depth, step and edit latency.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The server's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub queue_depth: IntGauge,
    pub in_flight: IntGauge,
    /// By worker (its index) and device.
    pub step_seconds: HistogramVec,
    /// By worker and device.
    pub edit_seconds: HistogramVec,
    /// Edits each worker finished (any outcome), by worker and device.
    pub worker_edits: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("ip2p_requests_total", "Edit requests by door and outcome"),
            &["door", "outcome"],
        )
        .expect("valid metric");
        let queue_depth =
            IntGauge::new("ip2p_queue_depth", "Edits waiting in the queue").expect("valid metric");
        let in_flight = IntGauge::new("ip2p_in_flight", "Edits running").expect("valid metric");
        let by_worker = ["worker", "device"];
        let step_seconds = HistogramVec::new(
            HistogramOpts::new("ip2p_step_seconds", "Latency of one denoising step")
                .buckets(prometheus::exponential_buckets(0.005, 2.0, 14).expect("buckets")),
            &by_worker,
        )
        .expect("valid metric");
        let edit_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ip2p_edit_seconds",
                "Latency of a whole edit, queue included",
            )
            .buckets(prometheus::exponential_buckets(0.05, 2.0, 14).expect("buckets")),
            &by_worker,
        )
        .expect("valid metric");
        let worker_edits = IntCounterVec::new(
            Opts::new("ip2p_worker_edits_total", "Edits each model worker ran"),
            &by_worker,
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(in_flight.clone()),
            Box::new(step_seconds.clone()),
            Box::new(edit_seconds.clone()),
            Box::new(worker_edits.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Self {
            registry,
            requests,
            queue_depth,
            in_flight,
            step_seconds,
            edit_seconds,
            worker_edits,
        }
    }

    pub fn record(&self, door: &str, outcome: &str) {
        self.requests.with_label_values(&[door, outcome]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .ok();
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

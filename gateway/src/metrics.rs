//! Prometheus metrics of the data path, registered in the registry the appliance serves.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct GatewayMetrics {
    pub ingest_bytes: IntCounterVec,
    pub ingest_batches: IntCounter,
    pub ingest_rejected: IntCounterVec,
    pub uploaded_bytes: IntCounter,
    pub compressed_in_bytes: IntCounter,
    pub segments_uploaded: IntCounter,
    pub upload_errors: IntCounter,
    pub cache_used_bytes: IntGauge,
    pub cache_limit_bytes: IntGauge,
    pub segments_pending: IntGauge,
    pub commit_seconds: Histogram,
}

impl GatewayMetrics {
    pub fn new(registry: &Registry) -> Self {
        let m = Self {
            ingest_bytes: IntCounterVec::new(
                Opts::new(
                    "lifeboat_ingest_bytes_total",
                    "Block data bytes committed to the journal.",
                ),
                &["machine", "disk"],
            )
            .expect("metric"),
            ingest_batches: IntCounter::new("lifeboat_ingest_batches_total", "Ingest batches committed.")
                .expect("metric"),
            ingest_rejected: IntCounterVec::new(
                Opts::new("lifeboat_ingest_rejected_total", "Ingest requests refused, by reason."),
                &["reason"],
            )
            .expect("metric"),
            uploaded_bytes: IntCounter::new(
                "lifeboat_uploaded_bytes_total",
                "Segment bytes put to blob storage (compressed, sealed).",
            )
            .expect("metric"),
            compressed_in_bytes: IntCounter::new(
                "lifeboat_compressed_input_bytes_total",
                "Raw log bytes packed into uploaded segments.",
            )
            .expect("metric"),
            segments_uploaded: IntCounter::new("lifeboat_segments_uploaded_total", "Segments put to blob storage.")
                .expect("metric"),
            upload_errors: IntCounter::new("lifeboat_upload_errors_total", "Failed segment puts (each is retried).")
                .expect("metric"),
            cache_used_bytes: IntGauge::new("lifeboat_cache_used_bytes", "Bytes held in the write-ahead cache.")
                .expect("metric"),
            cache_limit_bytes: IntGauge::new("lifeboat_cache_limit_bytes", "Configured write-ahead cache limit.")
                .expect("metric"),
            segments_pending: IntGauge::new(
                "lifeboat_segments_pending",
                "Disks with journal data waiting for upload.",
            )
            .expect("metric"),
            commit_seconds: Histogram::with_opts(HistogramOpts::new(
                "lifeboat_ingest_commit_seconds",
                "Time from batch receipt to durable ack.",
            ))
            .expect("metric"),
        };
        registry.register(Box::new(m.ingest_bytes.clone())).expect("register");
        registry.register(Box::new(m.ingest_batches.clone())).expect("register");
        registry
            .register(Box::new(m.ingest_rejected.clone()))
            .expect("register");
        registry.register(Box::new(m.uploaded_bytes.clone())).expect("register");
        registry
            .register(Box::new(m.compressed_in_bytes.clone()))
            .expect("register");
        registry
            .register(Box::new(m.segments_uploaded.clone()))
            .expect("register");
        registry.register(Box::new(m.upload_errors.clone())).expect("register");
        registry
            .register(Box::new(m.cache_used_bytes.clone()))
            .expect("register");
        registry
            .register(Box::new(m.cache_limit_bytes.clone()))
            .expect("register");
        registry
            .register(Box::new(m.segments_pending.clone()))
            .expect("register");
        registry.register(Box::new(m.commit_seconds.clone())).expect("register");
        m
    }
}

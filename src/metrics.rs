//! Counters for `GET /metrics`, written in the Prometheus text format. No tenant data: only
//! routes, statuses, durations and totals.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::auth::AuthStats;
use crate::model::JobStatus;

/// Upper bounds of the request latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
pub struct Metrics {
    /// (route template, method, status) → count.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    /// Cumulative counts per bucket of [`BUCKETS`], then +Inf.
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    /// Bytes written by the replication worker.
    pub bytes_copied: AtomicU64,
    /// Bytes the worker read from source regions.
    pub source_bytes_read: AtomicU64,
    /// Bytes that resumed copies found verified at their destination (not read again).
    pub bytes_resumed: AtomicU64,
    /// Copy attempts that resumed from a verified part instead of byte 0.
    pub resumes: AtomicU64,
    /// Copies between appliances: chunk bytes taken from local images, chunk bytes moved,
    /// and the bytes those took on the wire.
    pub peer_reused: AtomicU64,
    pub peer_fetched: AtomicU64,
    pub peer_wire: AtomicU64,
}

impl Metrics {
    pub fn record_request(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        // Methods are labels: only the standard ones, so made-up methods cannot grow the map.
        const METHODS: [&str; 9] = [
            "GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
        ];
        let method = METHODS
            .into_iter()
            .find(|m| *m == method)
            .unwrap_or("other");
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route, method, status)).or_default() += 1;
        }
        let secs = took.as_secs_f64();
        for (bucket, bound) in self
            .latency
            .iter()
            .zip(BUCKETS.iter().chain([&f64::INFINITY]))
        {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// What the exposition shows besides the counters kept here, read by the service.
pub struct Readings {
    pub store_writable: bool,
    /// `None` when the store cannot be read: the job gauges are left out.
    pub job_counts: Option<BTreeMap<JobStatus, u64>>,
    pub active_copies: usize,
    pub auth: AuthStats,
    /// `None` without Keystone.
    pub keystone_calls: Option<u64>,
}

/// The whole exposition.
pub fn render(m: &Metrics, readings: &Readings) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "# HELP image_replicator_http_requests_total HTTP requests by route template, method and status.");
    let _ = writeln!(w, "# TYPE image_replicator_http_requests_total counter");
    if let Ok(requests) = m.requests.lock() {
        for ((route, method, status), count) in requests.iter() {
            let _ = writeln!(
                w,
                "image_replicator_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {count}"
            );
        }
    }
    let _ = writeln!(
        w,
        "# HELP image_replicator_http_request_duration_seconds Time to answer a request."
    );
    let _ = writeln!(
        w,
        "# TYPE image_replicator_http_request_duration_seconds histogram"
    );
    for (bucket, bound) in m.latency.iter().zip(BUCKETS.iter()) {
        let _ = writeln!(
            w,
            "image_replicator_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Ordering::Relaxed)
        );
    }
    let total = m.latency[BUCKETS.len()].load(Ordering::Relaxed);
    let _ = writeln!(
        w,
        "image_replicator_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let sum = m.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(
        w,
        "image_replicator_http_request_duration_seconds_sum {sum}"
    );
    let _ = writeln!(
        w,
        "image_replicator_http_request_duration_seconds_count {total}"
    );

    let writable = readings.store_writable;
    let _ = writeln!(
        w,
        "# HELP image_replicator_store_writable Whether the store takes writes (0 while its disk is full or a write failed)."
    );
    let _ = writeln!(w, "# TYPE image_replicator_store_writable gauge");
    let _ = writeln!(w, "image_replicator_store_writable {}", u8::from(writable));
    // A store that cannot be read leaves the job gauges out, not the whole exposition.
    if let Some(counts) = &readings.job_counts {
        let _ = writeln!(
            w,
            "# HELP image_replicator_jobs Jobs in the store by status."
        );
        let _ = writeln!(w, "# TYPE image_replicator_jobs gauge");
        for status in JobStatus::ALL {
            let count = counts.get(&status).copied().unwrap_or(0);
            let _ = writeln!(w, "image_replicator_jobs{{status=\"{status}\"}} {count}");
        }
    }
    let auth = &readings.auth;
    let gauges: [(&str, &str, &str, u64); 11] = [
        (
            "image_replicator_copied_bytes_total",
            "counter",
            "Bytes copied by the replication worker.",
            m.bytes_copied.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_source_read_bytes_total",
            "counter",
            "Bytes the replication worker read from source regions.",
            m.source_bytes_read.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_resumed_bytes_total",
            "counter",
            "Bytes resumed copies found verified at their destination and did not read again.",
            m.bytes_resumed.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_resumes_total",
            "counter",
            "Copy attempts that resumed from a verified part of the image.",
            m.resumes.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_peer_reused_bytes_total",
            "counter",
            "Chunk bytes copies between appliances took from images the receiving side held.",
            m.peer_reused.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_peer_fetched_bytes_total",
            "counter",
            "Chunk bytes that copies between appliances moved over the link.",
            m.peer_fetched.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_peer_wire_bytes_total",
            "counter",
            "Bytes those chunks and manifests took on the wire, after compression.",
            m.peer_wire.load(Ordering::Relaxed),
        ),
        (
            "image_replicator_active_copies",
            "gauge",
            "Copies running now.",
            readings.active_copies as u64,
        ),
        (
            "image_replicator_argon2_verifications_total",
            "counter",
            "argon2id token verifications.",
            auth.argon2_verifications,
        ),
        (
            "image_replicator_token_cache_hits_total",
            "counter",
            "Requests whose token was found in the cache.",
            auth.cache_hits,
        ),
        (
            "image_replicator_token_cache_misses_total",
            "counter",
            "Requests whose token was not in the cache.",
            auth.cache_misses,
        ),
    ];
    let keystone = readings.keystone_calls.map(|calls| {
        (
            "image_replicator_keystone_validations_total",
            "counter",
            "Token validations asked of Keystone.",
            calls,
        )
    });
    for (name, kind, help, value) in gauges.into_iter().chain(keystone) {
        let _ = writeln!(w, "# HELP {name} {help}");
        let _ = writeln!(w, "# TYPE {name} {kind}");
        let _ = writeln!(w, "{name} {value}");
    }
    out
}

"""Prometheus metrics, defined once per process. Names carry their units."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

SWITCH_SECONDS = Histogram(
    "shira_switch_seconds",
    "Time to switch the active adapter set, by kind (apply, transition, revert).",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CACHE_BYTES = Gauge("shira_adapter_cache_bytes", "Bytes of decoded adapters and switch plans held in memory.")
CACHE_HITS = Counter("shira_adapter_cache_hits_total", "Adapter cache hits.")
CACHE_MISSES = Counter("shira_adapter_cache_misses_total", "Adapter cache misses (loads from the registry).")
CACHE_EVICTIONS = Counter("shira_adapter_cache_evictions_total", "Adapters evicted from the cache (LRU).")
RESIDENT_BYTES = Gauge("shira_process_resident_memory_bytes", "Resident memory of the server process.")
GPU_ALLOCATED_BYTES = Gauge("shira_gpu_memory_allocated_bytes", "CUDA memory allocated by tensors.")
GPU_RESERVED_BYTES = Gauge("shira_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator.")
SWITCHER_BYTES = Gauge(
    "shira_switcher_bytes", "Switcher memory by part (saved originals, index buffers, ...).", ["part"]
)
# The metric names keep the word "guest" so dashboards keep working; the code says correction plan.
CORRECTION_PLAN_BYTES = Gauge(
    "shira_guest_plan_bytes",
    "Bytes of the running mixed batch's correction plan (PyTorch's products: a copy of each corrected row's delta; "
    "the native kernel copies none)."
)
REQUESTS = Counter(
    "shira_requests_total",
    "Generation requests by HTTP status and adapter: the adapter's name for one adapter, 'base', 'set' for a "
    "weighted set of two or more, 'unresolved' when refused before the set was resolved.",
    ["adapter", "status"],
)
ADAPTER_REQUESTS = Counter(
    "shira_adapter_requests_total",
    "Generation requests whose adapter set was resolved, once per adapter named in the set (sets included).",
    ["adapter"],
)
PENDING_CHUNKS = Gauge(
    "shira_registry_pending_chunks",
    "Chunks of uploads not (yet) committed in the registry, counted at each scrape (up to a bound); chunks of "
    "abandoned uploads stay until their TTL.",
)
PENDING_BYTES = Gauge("shira_registry_pending_bytes", "Bytes of the chunks in shira_registry_pending_chunks.")
QUEUE_SECONDS = Histogram("shira_queue_seconds", "Time a request waited before its batch started.")
GENERATE_SECONDS = Histogram("shira_generate_seconds", "Time spent generating for one batch.")
GENERATED_TOKENS = Counter("shira_generated_tokens_total", "Tokens generated.")
BATCH_SIZE = Histogram("shira_batch_size", "Requests per generation batch.", buckets=(1, 2, 4, 8, 16, 32, 64))
STEP_SECONDS = Histogram(
    "shira_step_seconds",
    "One forward pass of a batch and its sampling, by kind (prefill: new rows' prompts; decode: one token a row).",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CORRECTION_PLAN_BUILD_SECONDS = Histogram(
    "shira_guest_plan_build_seconds",
    "Time to build a mixed batch's correction plans (segments of rows prefilled together; rebuilt when some of "
    "their rows leave or the merged set changes).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
QUEUE_DEPTH = Gauge("shira_queue_depth", "Requests waiting for a batch.")
ACTIVE_ADAPTER = Info("shira_active_adapter", "The adapter set currently applied to the base weights.")
REPLICA = Info(
    "shira_replica", "This replica's host name and port (set by `shira serve`): tells replicas behind a gateway apart."
)
MODEL = Info(
    "shira_model", "The base model, its device and dtype, and how decode steps run (native kernel ISA, or torch)."
)

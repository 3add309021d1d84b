"""Prometheus metrics shared by the agents and the API (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "AGENT_LAG",
    "AHEAD_SHARE",
    "BACKGROUND_SECONDS",
    "CATALOG_ITEMS",
    "EVENTS_ACCEPTED",
    "EVENTS_APPLIED",
    "EVENTS_DUPLICATE",
    "EVENTS_REJECTED",
    "EVENTS_VETOED",
    "EVENT_LOOP_DELAY",
    "EXPOSURES_SENT",
    "GC_PAUSE",
    "ITEMS_EMBEDDED",
    "ITEMS_ENCODED",
    "ITEMS_REJECTED",
    "KPI_SEGMENT",
    "KPI_SOURCE",
    "KPI_VARIANT",
    "LISTS_AHEAD_READ",
    "LISTS_CACHED",
    "LISTS_COMPUTED",
    "LISTS_PENDING",
    "LISTS_REFRESHING",
    "LISTS_SERVED",
    "LISTS_UNASKED",
    "MALLOC_TRIMMED",
    "MODEL_INTERACTIONS",
    "MODEL_TRAINED_AT",
    "MODEL_TRAININGS",
    "PLUGIN_CALLS",
    "PLUGIN_ERRORS",
    "PUSH_STAGE",
    "QUALITY_NDCG",
    "REFRESH_SHARE",
    "REGISTRY",
    "REQUEST_LATENCY",
    "ROCKSDB_MEMORY",
    "ROUTED_COMPACTIONS",
    "ROUTED_END_OFFSET",
    "SEGMENT_CHANGES",
    "SEGMENT_SIZE",
    "SIGNAL_ROWS_CACHED",
    "TRIGGER_ACTIONS",
    "TUNINGS",
    "WEBHOOK_CALLS",
    "WS_DROPPED",
    "WS_MESSAGES",
    "WS_SOCKETS",
    "rejection_reason",
]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_ACCEPTED = Counter(
    "personify_events_accepted",
    "Events accepted for processing, by source (http or topic).",
    ["source"],
    registry=REGISTRY,
)
EVENTS_REJECTED = Counter(
    "personify_events_rejected",
    "Events rejected, by source and reason.",
    ["source", "reason"],
    registry=REGISTRY,
)
EVENTS_APPLIED = Counter(
    "personify_events_applied", "Events folded into profiles.", registry=REGISTRY
)
EVENTS_DUPLICATE = Counter(
    "personify_events_duplicate",
    "Events skipped because their event id was already applied (retries, redelivery, replay).",
    registry=REGISTRY,
)
EXPOSURES_SENT = Counter(
    "personify_exposures_sent",
    "Lists served (HTTP and WebSocket) sent on to be recorded as exposures.",
    registry=REGISTRY,
)
KPI_VARIANT = Counter(
    "personify_kpi_variant",
    "What lists earn, per variant (see GET /v1/kpis): exposures, visitors, impressions, "
    "clicks, add_to_carts, orders, converters, revenue, order_revenue",
    ["variant", "kpi"],
    registry=REGISTRY,
)
KPI_SEGMENT = Counter(
    "personify_kpi_segment",
    "What lists earn, per rule segment the visitor was in: exposures, visitors, impressions, "
    "clicks, add_to_carts, orders, converters, revenue, order_revenue",
    ["segment", "kpi"],
    registry=REGISTRY,
)
SEGMENT_SIZE = Gauge(
    "personify_segment_size",
    "Visitors in each rule segment (this worker's partitions; exact after each sweep)",
    ["segment"],
    registry=REGISTRY,
)
SEGMENT_CHANGES = Counter(
    "personify_segment_changes",
    "Visitors who entered or left each rule segment",
    ["segment", "change"],
    registry=REGISTRY,
)
KPI_SOURCE = Counter(
    "personify_kpi_source",
    "What lists earn, per candidate source: shown, clicks, add_to_carts, orders, revenue",
    ["source", "kpi"],
    registry=REGISTRY,
)
EVENTS_VETOED = Counter(
    "personify_events_vetoed",
    "Events that changed nothing because the visitor withholds personalization consent.",
    registry=REGISTRY,
)
AGENT_LAG = Gauge(
    "personify_agent_lag",
    "Messages between an agent's position and the partition's high-water mark.",
    ["agent", "partition"],
    registry=REGISTRY,
)
ROUTED_COMPACTIONS = Counter(
    "personify_routed_compactions",
    "Times the embedded broker's routed topic was emptied after being applied.",
    registry=REGISTRY,
)
ROUTED_END_OFFSET = Gauge(
    "personify_routed_end_offset",
    "End offset of each partition of the routed topic this worker reads: the messages written "
    "to it (the embedded broker holds them all until it stops).",
    ["partition"],
    registry=REGISTRY,
)
CATALOG_ITEMS = Gauge(
    "personify_catalog_items",
    "Items in this worker's catalog view.",
    registry=REGISTRY,
)
ROCKSDB_MEMORY = Gauge(
    "personify_rocksdb_memory_bytes",
    "Memory RocksDB holds for a table, over its partitions: memtables, block cache in use, "
    "and index and filter blocks of open files.",
    ["table", "kind"],
    registry=REGISTRY,
)
ITEMS_EMBEDDED = Gauge(
    "personify_items_embedded",
    "Items with a text vector in this worker's index (items whose text has no words have none).",
    registry=REGISTRY,
)
ITEMS_ENCODED = Counter(
    "personify_items_encoded",
    "Item texts embedded by the model (cache misses; unchanged items are never re-encoded).",
    registry=REGISTRY,
)
ITEMS_REJECTED = Counter(
    "personify_items_rejected",
    "Catalog items rejected (sent to the dead-letter topic), by source.",
    ["source"],
    registry=REGISTRY,
)
LISTS_COMPUTED = Counter(
    "personify_lists_computed",
    "Recommendation lists ranked and stored, by kind (user, new_visitor, similar).",
    ["kind"],
    registry=REGISTRY,
)
SIGNAL_ROWS_CACHED = Gauge(
    "personify_signal_rows_cached",
    "Signal rows the profile agent keeps decoded (what: rows, or neighbours in all of them), "
    "as of the last flush.",
    ["what"],
    registry=REGISTRY,
)
LISTS_CACHED = Gauge(
    "personify_lists_cached",
    "Lists kept in memory, by kind (user: each visitor's and the one visitors never seen "
    "share; similar: items like an item), and their bytes (at most [recommend] "
    "list_cache_size lists of each kind).",
    ["kind", "what"],
    registry=REGISTRY,
)
LISTS_PENDING = Gauge(
    "personify_lists_pending",
    "Lists waiting to be recomputed in the background because what they rank changed.",
    registry=REGISTRY,
)
LISTS_AHEAD_READ = Gauge(
    "personify_lists_ahead_read_share",
    "Of the lists computed ahead for visitors who asked, the share read before the visitor "
    "changed again (averaged over the last 200 or so); under 0.5, only visitors whose last one "
    "was read have theirs computed ahead.",
    registry=REGISTRY,
)
LISTS_UNASKED = Gauge(
    "personify_lists_unasked",
    "Lists of visitors who changed and never asked, computed only while the event loop is all "
    "but idle (at most [recommend] list_cache_size, the newest).",
    registry=REGISTRY,
)
LISTS_REFRESHING = Gauge(
    "personify_lists_refresh_pending",
    "Stored lists still served but due to be recomputed when nothing else waits (they aged, "
    "or a new model or setting came after them).",
    registry=REGISTRY,
)
AHEAD_SHARE = Gauge(
    "personify_lists_ahead_share",
    "The share of the event loop's time that lists computed ahead (of visitors with no socket "
    "open) may take now while over 1,000 are queued (it shrinks as the loop's other work "
    "grows).",
    registry=REGISTRY,
)
REFRESH_SHARE = Gauge(
    "personify_lists_refresh_share",
    "The share of the event loop's time the refresh of aged lists may take now (it shrinks as "
    "the loop's other work grows).",
    registry=REGISTRY,
)
LISTS_SERVED = Counter(
    "personify_lists_served",
    "Recommendation answers, by how: memory (a stored list) or computed (ranked on request).",
    ["how"],
    registry=REGISTRY,
)
PUSH_STAGE = Histogram(
    "personify_push_stage_seconds",
    "Where an event's way to its visitor's pushed list goes, stage by stage: broker (from "
    "the routed message's publish to the profile agent taking it), fold (the agent's round, "
    "from taking the messages to the profiles written), queue (from then to the visitor's "
    "list being ranked), rank (ranking it), send (writing it to the visitor's sockets).",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
WS_SOCKETS = Gauge(
    "personify_ws_sockets", "Open WebSocket connections (GET /v1/ws).", registry=REGISTRY
)
WS_MESSAGES = Counter(
    "personify_ws_messages",
    "Messages pushed to visitors' WebSocket channels, by type.",
    ["type"],
    registry=REGISTRY,
)
WS_DROPPED = Counter(
    "personify_ws_dropped",
    "Messages dropped because a socket's queue was full (a client too slow to take them).",
    registry=REGISTRY,
)
PLUGIN_CALLS = Histogram(
    "personify_plugin_call_seconds",
    "Plugin hook calls by plugin and hook.",
    ["plugin", "hook"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)
PLUGIN_ERRORS = Counter(
    "personify_plugin_errors",
    "Plugin hook calls that raised or timed out (skipped), and plugins that failed to load.",
    ["plugin", "hook"],
    registry=REGISTRY,
)
TRIGGER_ACTIONS = Counter(
    "personify_trigger_actions",
    "Actions of trigger plugins by plugin, type and outcome (sent, capped, invalid).",
    ["plugin", "type", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_CALLS = Counter(
    "personify_webhook_calls",
    "Webhook deliveries by outcome (ok, failed, dropped: the queue was full).",
    ["outcome"],
    registry=REGISTRY,
)
EVENT_LOOP_DELAY = Histogram(
    "personify_event_loop_delay_seconds",
    "How late the event loop woke a 0.1 s timer: time every request and agent waited.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
GC_PAUSE = Histogram(
    "personify_gc_pause_seconds",
    "How long each collection of cyclic garbage held the process, by generation.",
    ["generation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
MALLOC_TRIMMED = Counter(
    "personify_malloc_trimmed_bytes",
    "Resident memory the allocator held free and gave back to the system once the engine "
    "was quiet ([worker] malloc_trim_quiet_s).",
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "personify_http_request_seconds",
    "HTTP request latency by route and status.",
    ["method", "route", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)

_REASONS = {
    "": "malformed",
    "type": "unknown_type",
    "ts": "bad_timestamp",
    "user_id": "missing_id",
    "anonymous_id": "missing_id",
    "event_id": "bad_event_id",
    "item_id": "missing_item",
}


def rejection_reason(field: str) -> str:
    """A bounded label for a rejected event's field (keeps metric cardinality small)."""
    root = field.split(".", 1)[0].split("[", 1)[0]
    if root in _REASONS:
        return _REASONS[root]
    return "bad_properties" if root == "properties" else "unknown_field"


MODEL_INTERACTIONS = Gauge(
    "personify_model_interactions",
    "Interactions in the history the learned model was last trained on (or found too few).",
    registry=REGISTRY,
)
MODEL_TRAINED_AT = Gauge(
    "personify_model_trained_timestamp_seconds",
    "When the learned model in use was trained (0: none yet).",
    registry=REGISTRY,
)
MODEL_TRAININGS = Counter(
    "personify_model_trainings",
    "Training runs of the learned model, by outcome (trained, too little history).",
    ["outcome"],
    registry=REGISTRY,
)
BACKGROUND_SECONDS = Counter(
    "personify_background_seconds",
    "Seconds spent in finished training and tuning runs (each in a child process), by kind.",
    ["kind"],
    registry=REGISTRY,
)
TUNINGS = Counter(
    "personify_tunings",
    "Tuning runs, by outcome (applied, kept: the current setting stayed; skipped, failed).",
    ["outcome"],
    registry=REGISTRY,
)
QUALITY_NDCG = Gauge(
    "personify_quality_ndcg10",
    "NDCG@10 on the latest hold-out of the shop's own history, by protocol and method.",
    ["protocol", "method"],
    registry=REGISTRY,
)

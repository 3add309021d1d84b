"""Unit tests of `personify.engine.importer` (``personify items import``) against a small server.

The server is a real aiohttp app that implements the ``POST /v1/items`` contract with
`validate_item`; it can answer 503 for a while, fail after some batches, or reject items, so
the client's retries, resume and error reporting are exercised over real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from personify.engine.cli import main
from personify.engine.config import EventsConfig
from personify.engine.errors import ValidationError
from personify.engine.importer import (
    ImportFailed,
    ImportReport,
    detect_format,
    format_summary,
    read_rows,
    rejects_path,
    run_import,
    state_path,
)
from personify.engine.models import validate_item

CFG = EventsConfig()
FAST = (0.01, 0.01)  # retry pauses that keep the tests quick


@dataclass
class FakeEngine:
    """What the test server does and what it received."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: item ids of each request that was answered 202/422, in order.
    batches: list[list[str]] = field(default_factory=list)
    #: answer 503 to this many requests first (a starting engine).
    starting: int = 0
    #: after this many answered batches, answer 503 to everything.
    fail_after: int | None = None
    #: item ids the server rejects although they are valid.
    refuse: set[str] = field(default_factory=set)
    #: bodies larger than this are answered 413.
    max_body: int = 1 << 20
    requests: int = 0


ENGINE = web.AppKey("engine", FakeEngine)


def _error(status: int, error: str, fld: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "field": fld, "detail": detail}, status=status)


async def _post_items(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.requests += 1
    if engine.starting > 0:
        engine.starting -= 1
        return _error(503, "starting", "", "the engine is starting; retry")
    if engine.fail_after is not None and len(engine.batches) >= engine.fail_after:
        return _error(503, "unavailable", "", "test failure")
    if request.content_type != "application/json":
        return _error(415, "unsupported media type", "", "send application/json")
    body = await request.read()
    if len(body) > engine.max_body:
        return _error(413, "body too large", "", f"at most {engine.max_body} bytes")
    data = json.loads(body)
    items = data.get("items")
    if not isinstance(items, list):
        return _error(400, "bad request", "items", "expected a list")
    if len(items) > 1000:
        return _error(413, "too many items", "items", "at most 1000")
    rejected: list[dict[str, Any]] = []
    ids: list[str] = []
    for index, obj in enumerate(items):
        try:
            item = validate_item(obj, CFG)
        except ValidationError as exc:
            rejected.append({"index": index, "error": exc.reason, "field": exc.field})
            continue
        if item["item_id"] in engine.refuse:
            rejected.append({"index": index, "error": "refused by the test", "field": "item_id"})
            continue
        engine.items[item["item_id"]] = item
        ids.append(item["item_id"])
    engine.batches.append([str(obj.get("item_id")) for obj in items])
    reply: dict[str, Any] = {"accepted": len(ids), "rejected": rejected, "item_ids": ids}
    if not ids:
        reply |= {"error": "every item was rejected", "field": "items", "detail": ""}
        return web.json_response(reply, status=422)
    return web.json_response(reply, status=202)


ServerFactory = Callable[..., Awaitable[tuple[str, FakeEngine]]]


@pytest.fixture
def server_factory(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> ServerFactory:
    """Start a fake engine; returns its base URL and its `FakeEngine` record."""

    async def make(**settings: Any) -> tuple[str, FakeEngine]:
        engine = FakeEngine(**settings)
        app = web.Application()
        app[ENGINE] = engine
        app.router.add_post("/v1/items", _post_items)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/"), engine

    return make


def _jsonl(path: Path, n: int, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"item_id": f"sku-{i}", "title": f"Item {i}"}) + "\n"
            for i in range(start, start + n)
        )
    )
    return path


async def _import(path: Path, url: str, **kwargs: Any) -> ImportReport:
    kwargs.setdefault("retry_delays", FAST)
    return await run_import(path, url, progress=False, **kwargs)


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    raise AssertionError("main() returned")  # pragma: no cover


# --- format and parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("items.csv", "csv"),
        ("ITEMS.CSV", "csv"),
        ("items.jsonl", "jsonl"),
        ("items.ndjson", "jsonl"),
        ("items.json-lines", "jsonl"),
    ],
)
def test_format_from_extension(name: str, expected: str) -> None:
    """The format follows the file extension, in any case."""
    assert detect_format(Path(name)) == expected


def test_format_flag_wins_and_unknown_extension_fails() -> None:
    """--format overrides the extension; an unknown extension without it names the fix."""
    assert detect_format(Path("items.txt"), "csv") == "csv"
    assert detect_format(Path("items.csv"), "jsonl") == "jsonl"
    with pytest.raises(ImportFailed, match=r"items\.txt.*--format csv or --format jsonl"):
        detect_format(Path("items.txt"))


def test_jsonl_rows_and_bad_rows_with_line_numbers(tmp_path: Path) -> None:
    """JSONL: blank lines are skipped; bad JSON and invalid items keep their file line."""
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"item_id": "a", "title": "A"}\n'
        "\n"
        "   \n"
        "{not json\n"
        '{"item_id": "b"}\n'
        "[1, 2]\n"
        '{"item_id": "c", "title": "C", "price": -1}\n'
        '{"item_id": "d", "title": "D", "tags": ["x"]}'  # no final newline
    )
    rows = list(read_rows(path))
    assert [(r.line, r.item is not None) for r in rows] == [
        (1, True),
        (4, False),
        (5, False),
        (6, False),
        (7, False),
        (8, True),
    ]
    bad = {r.line: r.bad for r in rows if r.bad is not None}
    assert bad[4].error.startswith("not valid JSON") and bad[4].text == "{not json"
    assert (bad[5].field, bad[5].error) == ("title", "required")
    assert "expected a JSON object" in bad[6].error
    assert bad[7].field == "price"
    assert rows[-1].item == {"item_id": "d", "title": "D", "tags": ["x"]}


def test_csv_columns_map_to_item_fields(tmp_path: Path) -> None:
    """CSV: known columns are typed fields, others string attributes, empty cells absent."""
    path = tmp_path / "c.csv"
    path.write_text(
        "\ufeffitem_id,Title,description,category,price,tags,in_stock,color\n"
        "sku-1,Rain jacket,Waterproof,outdoor/jackets,129.5,waterproof| hiking,yes,red\n"
        "sku-2,Cap,,,,,0,\n"
        "sku-3,Boots,,,10,,TRUE,brown\n",
        encoding="utf-8",
    )
    items = [r.item for r in read_rows(path)]
    assert items == [
        {
            "item_id": "sku-1",
            "title": "Rain jacket",
            "description": "Waterproof",
            "category": "outdoor/jackets",
            "price": 129.5,
            "tags": ["waterproof", "hiking"],
            "in_stock": True,
            "attributes": {"color": "red"},
        },
        {"item_id": "sku-2", "title": "Cap", "in_stock": False},
        {
            "item_id": "sku-3",
            "title": "Boots",
            "price": 10.0,
            "in_stock": True,
            "attributes": {"color": "brown"},
        },
    ]


def test_csv_bad_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    """CSV bad rows name their line (header = 1, quoted line breaks count), field, reason."""
    path = tmp_path / "c.csv"
    path.write_text(
        "item_id,title,price,in_stock\n"
        'a,"Two\nlines",1,true\n'
        "b,B,abc,true\n"
        "\n"
        "c,C,1,maybe\n"
        ",D,1,true\n"
        "e,E,1,true,extra\n"
        'g,"G"x,1,true\n'
        "f,F,2,no\n"
    )
    rows = list(read_rows(path))
    assert [r.line for r in rows] == [2, 4, 6, 7, 8, 9, 10]
    bad = {r.line: r.bad for r in rows if r.bad is not None}
    assert (bad[4].field, bad[4].error) == ("price", "expected a number, got 'abc'")
    assert bad[6].field == "in_stock" and "'maybe'" in bad[6].error
    assert (bad[7].field, bad[7].error) == ("item_id", "required")
    assert "expected 4 cells as in the header, got 5" in bad[8].error
    assert bad[8].text == "e,E,1,true,extra"
    assert bad[9].error.startswith("CSV syntax error") and bad[9].text == 'g,"G"x,1,true'
    assert rows[0].item == {"item_id": "a", "title": "Two\nlines", "price": 1.0, "in_stock": True}
    assert rows[-1].item == {"item_id": "f", "title": "F", "price": 2.0, "in_stock": False}


def test_csv_header_without_required_columns_fails(tmp_path: Path) -> None:
    """A header without item_id or title stops the import with the expected header named."""
    path = tmp_path / "c.csv"
    path.write_text("sku,name\n1,A\n")
    with pytest.raises(ImportFailed, match=r"line 1: the header has no item_id or title column"):
        list(read_rows(path))
    path.write_text("item_id,title,title\n1,A,B\n")
    with pytest.raises(ImportFailed, match=r"column 'title' appears twice"):
        list(read_rows(path))


def test_invalid_utf8_is_a_bad_row(tmp_path: Path) -> None:
    """A line that is not UTF-8 is reported as a bad row; the rows around it still import."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "\xff"}\n')
    rows = list(read_rows(path))
    assert rows[0].item is not None
    assert rows[1].bad is not None and "not valid UTF-8" in rows[1].bad.error


# --- importing ------------------------------------------------------------------------------


async def test_import_sends_batches_and_cleans_up(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Every item arrives in batches of --batch; no state or rejects file is left behind."""
    url, engine = await server_factory()
    path = _jsonl(tmp_path / "c.jsonl", 25)
    report = await _import(path, url, batch=10)
    assert report.exit_code == 0
    assert (report.imported, report.bad, report.total_imported) == (25, 0, 25)
    assert [len(b) for b in engine.batches] == [10, 10, 5]
    assert set(engine.items) == {f"sku-{i}" for i in range(25)}
    assert not state_path(path).exists() and not rejects_path(path).exists()
    assert report.rejects_path is None and report.resumed_after_line is None


async def test_bad_rows_are_reported_and_written(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Local and server-side rejects are both reported with their line; the rest imports."""
    url, engine = await server_factory(refuse={"sku-3"})
    path = tmp_path / "c.csv"
    path.write_text(
        "item_id,title,price\nsku-1,A,1\nsku-2,B,oops\nsku-3,C,3\n\nsku-4,,4\nsku-5,E,5\n"
    )
    report = await _import(path, url, batch=2)
    assert report.exit_code == 1
    assert (report.imported, report.bad) == (2, 3)
    assert set(engine.items) == {"sku-1", "sku-5"}
    assert [(b.line, b.field, b.source) for b in report.bad_rows] == [
        (3, "price", "file"),
        (4, "item_id", "server"),
        (6, "title", "file"),
    ]
    assert report.rejects_path == rejects_path(path)
    written = [json.loads(line) for line in report.rejects_path.read_text().splitlines()]
    assert [w["line"] for w in written] == [3, 4, 6]
    assert written[0]["text"] == "sku-2,B,oops"
    summary = format_summary(report)
    assert "Imported 2 items" in summary and "3 bad rows were not imported" in summary
    assert "line 3: price: expected a number, got 'oops'" in summary


async def test_a_batch_the_server_rejects_entirely(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A 422 (every item rejected) maps each rejected index back to its line."""
    url, _engine = await server_factory(refuse={"sku-0", "sku-1"})
    path = _jsonl(tmp_path / "c.jsonl", 3)
    report = await _import(path, url, batch=2)
    assert (report.imported, report.total_bad) == (1, 2)
    assert [(b.line, b.source) for b in report.bad_rows] == [(1, "server"), (2, "server")]


async def test_resume_after_the_server_fails(server_factory: ServerFactory, tmp_path: Path) -> None:
    """After a server failure the state is saved and the rerun sends only the rest."""
    url, engine = await server_factory(fail_after=2)
    path = _jsonl(tmp_path / "c.jsonl", 50)
    with pytest.raises(ImportFailed, match=r"rerun the same command to continue from there"):
        await _import(path, url, batch=10)
    saved = json.loads(state_path(path).read_text())
    assert (saved["line"], saved["imported"]) == (20, 20)
    assert saved["offset"] == sum(len(x) for x in path.read_bytes().splitlines(True)[:20])

    engine.fail_after = None
    engine.batches.clear()
    report = await _import(path, url, batch=10)
    assert engine.batches[0][0] == "sku-20"
    assert sum(len(b) for b in engine.batches) == 30
    assert (report.imported, report.total_imported) == (30, 50)
    assert report.resumed_after_line == 20
    assert any("Resuming" in n and "line 20" in n for n in report.notices)
    assert len(engine.items) == 50 and not state_path(path).exists()


async def test_resume_keeps_earlier_bad_rows(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Bad rows found before an interruption stay in the rejects file and in the totals."""
    url, engine = await server_factory(fail_after=1)
    path = tmp_path / "c.csv"
    path.write_text("item_id,title\na,A\n,B\nc,C\nd,D\n,E\nf,F\n")
    with pytest.raises(ImportFailed):
        await _import(path, url, batch=2)
    engine.fail_after = None
    report = await _import(path, url, batch=2)
    assert (report.total_imported, report.total_bad) == (4, 2)
    assert [b.line for b in report.bad_rows] == [3, 6]
    assert report.exit_code == 1


async def test_changed_file_starts_over(server_factory: ServerFactory, tmp_path: Path) -> None:
    """When the file changed since the interrupted run, the import starts over with a warning."""
    url, engine = await server_factory(fail_after=1)
    path = _jsonl(tmp_path / "c.jsonl", 20)
    with pytest.raises(ImportFailed):
        await _import(path, url, batch=10)
    assert state_path(path).exists()
    _jsonl(path, 30, start=100)
    engine.fail_after = None
    engine.batches.clear()
    report = await _import(path, url, batch=10)
    assert engine.batches[0][0] == "sku-100"
    assert report.imported == 30 and report.resumed_after_line is None
    assert report.total_imported == 30
    assert any("changed" in n and "starting over" in n for n in report.notices)


async def test_restart_ignores_the_saved_state(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """--restart sends the whole file again even when a resume state exists."""
    url, engine = await server_factory(fail_after=1)
    path = _jsonl(tmp_path / "c.jsonl", 20)
    with pytest.raises(ImportFailed):
        await _import(path, url, batch=10)
    engine.fail_after = None
    engine.batches.clear()
    report = await _import(path, url, batch=10, restart=True)
    assert engine.batches[0][0] == "sku-0" and report.imported == 20
    assert not state_path(path).exists()


async def test_503_while_starting_is_retried(server_factory: ServerFactory, tmp_path: Path) -> None:
    """503 answers (an engine still starting) are retried with backoff."""
    url, engine = await server_factory(starting=2)
    path = _jsonl(tmp_path / "c.jsonl", 5)
    report = await _import(path, url, retry_delays=(0.01, 0.01, 0.01))
    assert report.imported == 5 and engine.requests == 3
    assert any("HTTP 503: starting" in n and "retrying in" in n for n in report.notices)


async def test_too_large_batches_are_split(server_factory: ServerFactory, tmp_path: Path) -> None:
    """A 413 splits the batch in halves until the server takes them; nothing is lost."""
    url, engine = await server_factory(max_body=300)
    path = _jsonl(tmp_path / "c.jsonl", 16)
    report = await _import(path, url, batch=16)
    assert report.imported == 16 and len(engine.items) == 16
    assert max(len(b) for b in engine.batches) < 16


async def test_item_larger_than_a_request_is_a_bad_row(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """An item bigger than a request may be is reported locally, not sent."""
    url, engine = await server_factory()
    path = tmp_path / "c.jsonl"
    big = {"item_id": "big", "title": "B", "attributes": {"a": "x" * 4000, "b": "y" * 4000}}
    path.write_text(json.dumps({"item_id": "a", "title": "A"}) + "\n" + json.dumps(big) + "\n")
    report = await _import(path, url, events=EventsConfig(max_body_bytes=2000))
    assert report.imported == 1 and set(engine.items) == {"a"}
    assert report.bad_rows[0].line == 2 and "max_body_bytes" in report.bad_rows[0].error


async def test_unreachable_server_fails_with_the_url(tmp_path: Path) -> None:
    """No server at the URL: a clear error naming it, after a few attempts."""
    path = _jsonl(tmp_path / "c.jsonl", 3)
    with pytest.raises(ImportFailed, match=r"http://127\.0\.0\.1:1/v1/items: no answer"):
        await _import(path, "http://127.0.0.1:1")


def test_empty_file_imports_nothing(tmp_path: Path) -> None:
    """An empty file reads as no rows, in either format."""
    for name in ("e.csv", "e.jsonl"):
        (tmp_path / name).write_text("")
        assert list(read_rows(tmp_path / name)) == []


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """An empty config file, so the tests do not read ./config.toml."""
    path = tmp_path / "config.toml"
    path.write_text("")
    return path


async def test_cli_exit_codes(
    server_factory: ServerFactory,
    tmp_path: Path,
    config_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command exits 0 when everything imported and 1 when some rows were bad."""
    url, _engine = await server_factory()
    good = _jsonl(tmp_path / "good.jsonl", 3)
    argv = ["items", "import", "--config", str(config_path), "--url", url, "--batch", "2"]
    assert await asyncio.to_thread(_cli, [*argv, str(good)]) == 0
    assert "Imported 3 items" in capsys.readouterr().out

    bad = tmp_path / "bad.txt"
    bad.write_text("item_id,title\na,A\n,B\n")
    assert await asyncio.to_thread(_cli, [*argv, "--format", "csv", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "1 bad row was not imported" in out and "line 3: item_id: required" in out


async def test_cli_usage_file_and_connection_errors_exit_2(
    tmp_path: Path, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Usage, file and connection errors exit 2 with a message naming the file or URL."""
    base = ["items", "import", "--config", str(config_path)]
    missing = tmp_path / "missing.jsonl"
    assert await asyncio.to_thread(_cli, [*base, str(missing)]) == 2
    assert f"{missing}: file not found" in capsys.readouterr().err

    assert await asyncio.to_thread(_cli, [*base, "--batch", "0", str(missing)]) == 2
    assert "expected 1-1000 items per request" in capsys.readouterr().err

    unknown = tmp_path / "c.txt"
    unknown.write_text("")
    assert await asyncio.to_thread(_cli, [*base, str(unknown)]) == 2
    assert "--format csv or --format jsonl" in capsys.readouterr().err

    good = _jsonl(tmp_path / "c.jsonl", 1)
    assert await asyncio.to_thread(_cli, [*base, "--url", "ftp://x", str(good)]) == 2
    assert "--url: expected http://host:port" in capsys.readouterr().err


def test_cli_default_url_comes_from_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --url the command talks to the configured [server] host and port."""
    config = tmp_path / "config.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 1\n')
    good = _jsonl(tmp_path / "c.jsonl", 1)
    monkeypatch.setattr("personify.engine.importer._RETRY_DELAYS", ())
    assert _cli(["items", "import", "--config", str(config), str(good)]) == 2
    assert "http://127.0.0.1:1/v1/items: no answer" in capsys.readouterr().err
    assert not os.path.exists(state_path(good))

"""Client of ``personify items import``: streams a catalog file into a running engine over HTTP.

The file is CSV (a header row; see `read_rows`) or JSON Lines (one item object per line). Rows
are read one at a time, validated locally with `validate_item` and sent in batches to
``POST {url}/v1/items``. Bad rows, found here or by the server, are reported with their 1-based
file line and written to ``FILE.rejects.jsonl``; they never stop the import.

After every batch the server acknowledges, ``FILE.personify-import`` records the file's identity
and the byte offset and line up to which everything is acknowledged, so a rerun after a crash,
a Ctrl-C or a lost connection continues from there (the server upserts, so a batch sent twice
is harmless). The state file is removed when the import completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal, TypedDict, cast
from urllib.parse import urlsplit

import aiohttp
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from personify.engine.config import Config, EventsConfig
from personify.engine.errors import PersonifyError, ValidationError
from personify.engine.models import validate_item

__all__ = [
    "DEFAULT_BATCH",
    "MAX_BATCH",
    "BadRow",
    "Format",
    "ImportFailed",
    "ImportReport",
    "ParsedRow",
    "detect_format",
    "format_summary",
    "import_command",
    "read_rows",
    "rejects_path",
    "run_import",
    "state_path",
]

Format = Literal["csv", "jsonl"]

#: Items per request unless --batch says otherwise.
DEFAULT_BATCH: Final = 500
#: The server accepts at most this many items per request.
MAX_BATCH: Final = 1000

_EXTENSIONS: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json-lines": "jsonl",
}
_CSV_FIELDS: Final = (
    "item_id",
    "title",
    "description",
    "category",
    "price",
    "tags",
    "in_stock",
)
_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_HEAD_BYTES: Final = 64 * 1024
_STATE_VERSION: Final = 1
#: Pauses between attempts of one request (network errors, 5xx such as 503 while starting).
_RETRY_DELAYS: Final = (0.5, 1.0, 2.0, 4.0)
_RETRY_STATUSES: Final = frozenset({500, 502, 503, 504})
_MAX_RETRY_AFTER_S: Final = 30.0
_SAMPLE: Final = 20


class ImportFailed(PersonifyError):
    """The import cannot go on: bad usage, an unreadable file or an unreachable server.

    The message names the file or URL and what to do; the CLI exits with status 2.
    """


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that was not imported.

    Attributes:
        line: the 1-based line of the file where the row starts (a CSV header is line 1).
        field: the offending field (``""`` for the whole row).
        error: what was expected and what was got.
        source: ``"file"`` when found while reading, ``"server"`` when the server rejected it.
        text: the row as written in the file (without its line ending; shortened for an
            item too large to send).
    """

    line: int
    field: str
    error: str
    source: Literal["file", "server"] = "file"
    text: str = ""

    def describe(self) -> str:
        """One line for people: ``line 17: price: expected a number, got 'abc'``."""
        where = f"{self.field}: " if self.field else ""
        by = " (rejected by the server)" if self.source == "server" else ""
        return f"line {self.line}: {where}{self.error}{by}"


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """One row read from the file: an item to send, or the reason it cannot be sent.

    Attributes:
        line: the 1-based line where the row starts.
        item: the item as it will be sent (``None`` when the row is bad).
        bad: why the row is bad (``None`` when it is good).
    """

    line: int
    item: dict[str, Any] | None
    bad: BadRow | None


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import did.

    Attributes:
        path: the catalog file.
        url: the engine's base URL.
        format: how the file was read.
        imported: items the server accepted in this run.
        bad: bad rows found in this run.
        total_imported: items accepted, including earlier interrupted runs of this import.
        total_bad: bad rows, including earlier interrupted runs of this import.
        bad_rows: the first bad rows (up to 20), all runs, in file order.
        rejects_path: the file listing every bad row, or ``None`` when there were none.
        elapsed_s: seconds this run took.
        resumed_after_line: the line an earlier run had completed, when this run resumed.
        notices: messages printed while importing (resuming, starting over).
    """

    path: Path
    url: str
    format: Format
    imported: int
    bad: int
    total_imported: int
    total_bad: int
    bad_rows: tuple[BadRow, ...]
    rejects_path: Path | None
    elapsed_s: float
    resumed_after_line: int | None
    notices: tuple[str, ...]

    @property
    def exit_code(self) -> int:
        """0 when every row was imported, 1 when some rows were bad."""
        return 1 if self.total_bad else 0

    @property
    def items_per_s(self) -> float:
        """Items accepted per second in this run."""
        return self.imported / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _FileIdentity(TypedDict):
    size: int
    mtime_ns: int
    head_sha256: str


class _State(TypedDict):
    """The resume state file: everything before ``offset`` (``line``) is acknowledged."""

    version: int
    file: _FileIdentity
    format: str
    url: str
    offset: int
    line: int
    imported: int
    bad: int


def state_path(path: Path) -> Path:
    """The resume state file of the catalog file ``path``: ``FILE.personify-import``."""
    return path.with_name(path.name + ".personify-import")


def rejects_path(path: Path) -> Path:
    """The file that lists the bad rows of ``path``: ``FILE.rejects.jsonl``."""
    return path.with_name(path.name + ".rejects.jsonl")


def detect_format(path: Path, fmt: Format | None = None) -> Format:
    """The format of ``path``: ``fmt`` when given, else from the file extension.

    Raises:
        ImportFailed: the extension is not one of .csv, .jsonl, .ndjson or .json-lines.
    """
    if fmt is not None:
        return fmt
    found = _EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise ImportFailed(
            f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
            f"expected one of {', '.join(_EXTENSIONS)}, or pass --format csv or --format jsonl"
        )
    return found


# --- reading -------------------------------------------------------------------------------


class _Lines:
    """Decoded lines of a binary file from ``offset``, counting lines and bytes consumed.

    After each line is handed out, ``offset`` is the byte offset just past it and ``line``
    its 1-based number, so a consumer knows exactly how far the file has been read.
    """

    def __init__(self, fh: IO[bytes], offset: int, line: int) -> None:
        fh.seek(offset)
        self._fh = fh
        self.offset = offset
        self.line = line
        #: Lines that were not valid UTF-8 (decoded with replacement characters).
        self.undecodable: set[int] = set()
        self._record: list[str] = []

    def take(self) -> str:
        """The text of the lines handed out since the last call, without the final line end."""
        text = "".join(self._record).rstrip("\r\n")
        self._record.clear()
        return text

    def __iter__(self) -> Iterator[str]:
        for raw in self._fh:
            self.line += 1
            self.offset += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", "replace")
                self.undecodable.add(self.line)
            if self.line == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte order mark, as Excel writes
            self._record.append(text)
            yield text


def _bad(line: int, field: str, error: str, text: str) -> ParsedRow:
    return ParsedRow(line, None, BadRow(line, field, error, "file", text.rstrip("\r\n")))


def _utf8_error(first: int, last: int, lines: _Lines, text: str) -> ParsedRow | None:
    for n in range(first, last + 1):
        if n in lines.undecodable:
            return _bad(first, "", f"line {n} is not valid UTF-8; save the file as UTF-8", text)
    return None


def _checked(line: int, obj: Any, text: str, cfg: EventsConfig) -> ParsedRow:
    try:
        validate_item(obj, cfg)
    except ValidationError as exc:
        return _bad(line, exc.field, exc.reason, text)
    return ParsedRow(line, obj, None)


def _jsonl_rows(lines: _Lines, cfg: EventsConfig) -> Iterator[ParsedRow]:
    for text in lines:
        lines.take()
        if not text.strip():
            continue
        line = lines.line
        broken = _utf8_error(line, line, lines, text)
        if broken is not None:
            yield broken
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            yield _bad(line, "", f"not valid JSON: {exc}", text)
            continue
        yield _checked(line, obj, text, cfg)


def _csv_columns(header: Sequence[str], path: Path) -> list[str | None]:
    """Map the header to item fields (known names, any case) or attribute names.

    ``None`` marks a column without a name; its cells must be empty.
    """
    columns: list[str | None] = []
    for cell in header:
        text = cell.strip()
        columns.append((text.lower() if text.lower() in _CSV_FIELDS else text) or None)
    seen: set[str] = set()
    for column in columns:
        if column is not None and column in seen:
            raise ImportFailed(
                f"{path} line 1: column {column!r} appears twice in the header; "
                "rename or remove one of them"
            )
        if column is not None:
            seen.add(column)
    missing = [name for name in ("item_id", "title") if name not in seen]
    if missing:
        raise ImportFailed(
            f"{path} line 1: the header has no {' or '.join(missing)} column; expected a header "
            f"row with item_id,title and optionally {','.join(_CSV_FIELDS[2:])} "
            "(any other column becomes an attribute)"
        )
    return columns


def _csv_item(cells: Sequence[str], columns: Sequence[str | None]) -> dict[str, Any]:
    """Turn one CSV record into an item; raises `ValidationError` for a cell it cannot read."""
    if len(cells) != len(columns):
        raise ValidationError(
            "",
            f"expected {len(columns)} cells as in the header, got {len(cells)}; "
            'quote cells that contain commas: "a, b"',
        )
    item: dict[str, Any] = {}
    attributes: dict[str, str] = {}
    for index, (name, cell) in enumerate(zip(columns, cells, strict=True)):
        if cell == "":
            continue
        if name is None:
            raise ValidationError(
                f"column {index + 1}", "this column has no name in the header; name it"
            )
        if name == "price":
            try:
                price = float(cell.strip())
            except ValueError:
                raise ValidationError("price", f"expected a number, got {cell!r}") from None
            item["price"] = price if math.isfinite(price) else cell
        elif name == "tags":
            item["tags"] = [tag.strip() for tag in cell.split("|") if tag.strip()]
        elif name == "in_stock":
            word = cell.strip().lower()
            if word not in _TRUE and word not in _FALSE:
                raise ValidationError(
                    "in_stock", f"expected true/false, 1/0 or yes/no, got {cell!r}"
                )
            item["in_stock"] = word in _TRUE
        elif name in _CSV_FIELDS:
            item[name] = cell
        else:
            attributes[name] = cell
    if attributes:
        item["attributes"] = attributes
    return item


def _csv_rows(
    lines: _Lines, columns: Sequence[str | None], cfg: EventsConfig
) -> Iterator[ParsedRow]:
    # csv.reader pulls exactly the lines of one record (no read-ahead), so `lines` tells
    # where each record starts and ends, quoted line breaks included. After a syntax error
    # the reader goes on with the next line.
    reader = csv.reader(lines, strict=True)
    first = lines.line + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line, first = first, lines.line + 1
            yield _bad(line, "", f"CSV syntax error: {exc}; check the quotes", lines.take())
            continue
        line, last, first = first, lines.line, lines.line + 1
        text = lines.take()
        if not any(cells):
            continue  # a blank line (or only separators)
        broken = _utf8_error(line, last, lines, text)
        if broken is not None:
            yield broken
            continue
        try:
            item = _csv_item(cells, columns)
        except ValidationError as exc:
            yield _bad(line, exc.field, exc.reason, text)
            continue
        yield _checked(line, item, text, cfg)


def _csv_header(fh: IO[bytes], path: Path) -> tuple[list[str | None], int, int] | None:
    """Read the header; returns the columns and the offset and line just past it."""
    lines = _Lines(fh, 0, 0)
    try:
        header = next(csv.reader(lines, strict=True), None)
    except csv.Error as exc:
        raise ImportFailed(f"{path} line 1: cannot read the CSV header: {exc}") from None
    if header is None:
        return None
    return _csv_columns(header, path), lines.offset, lines.line


def read_rows(
    path: str | os.PathLike[str],
    fmt: Format | None = None,
    cfg: EventsConfig | None = None,
) -> Iterator[ParsedRow]:
    """Stream the rows of a catalog file, each validated; bad rows are yielded, not raised.

    JSONL: one item object per line; blank lines are skipped. CSV: a header row, then one item
    per record; the columns item_id, title, description, category, price, tags (split on
    ``|``), in_stock (true/false, 1/0, yes/no) map to those fields, any other column goes into
    ``attributes`` as a string, and an empty cell means the field is absent.

    Args:
        path: the catalog file.
        fmt: ``"csv"`` or ``"jsonl"``; ``None`` goes by the extension.
        cfg: the [events] limits used by `validate_item`.

    Raises:
        ImportFailed: the file cannot be opened, its format is unknown or the CSV header is
            unusable.
    """
    file = Path(path)
    kind = detect_format(file, fmt)
    with _open(file) as fh:
        rows, _lines = _rows(fh, file, kind, cfg or EventsConfig(), 0, 0)
        yield from rows


def _rows(
    fh: IO[bytes], path: Path, fmt: Format, cfg: EventsConfig, offset: int, line: int
) -> tuple[Iterator[ParsedRow], _Lines]:
    """The rows from ``offset`` (just past ``line``) and the reader that tracks the position."""
    if fmt == "jsonl":
        lines = _Lines(fh, offset, line)
        return _jsonl_rows(lines, cfg), lines
    header = _csv_header(fh, path)
    if header is None:  # an empty file
        lines = _Lines(fh, 0, 0)
        return iter(()), lines
    columns, header_end, header_lines = header
    lines = _Lines(fh, max(offset, header_end), max(line, header_lines))
    return _csv_rows(lines, columns, cfg), lines


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImportFailed(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise ImportFailed(f"{path}: is a folder; pass a .csv or .jsonl file") from None
    except OSError as exc:
        raise ImportFailed(f"{path}: cannot read it: {exc.strerror}") from None


# --- resume state ---------------------------------------------------------------------------


def _identity(fh: IO[bytes]) -> _FileIdentity:
    st = os.fstat(fh.fileno())
    fh.seek(0)
    head = hashlib.sha256(fh.read(_HEAD_BYTES)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def _load_state(path: Path) -> _State | str | None:
    """The saved state, ``None`` when there is none, or why it cannot be used."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "it is damaged"
    keys = _State.__annotations__.keys()
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION or data.keys() != keys:
        return "it was written by another version"
    return cast(_State, data)


def _save_state(path: Path, state: _State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(orjson.dumps(state))
        os.replace(tmp, path)
    except OSError as exc:
        raise ImportFailed(
            f"{path}: cannot save the resume state ({exc.strerror}); make the folder writable "
            "or copy the catalog file to a writable folder"
        ) from None


# --- sending --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    """Rows read together: items to send and bad rows, up to ``offset``/``line`` of the file."""

    lines: list[int]
    encoded: list[bytes]
    bad: list[BadRow]
    offset: int
    line: int


class _Client:
    """Posts batches to ``/v1/items`` with retries; splits a batch the server finds too large."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        state_file: Path,
        retry_delays: Sequence[float],
        notice: Callable[[str], None],
    ) -> None:
        self._session = session
        self._notice = notice
        self._url = url
        self._endpoint = f"{url}/v1/items"
        self._state_file = state_file
        self._delays = tuple(retry_delays)
        self.resume_line = 0

    async def send(self, lines: list[int], encoded: list[bytes]) -> tuple[int, list[BadRow]]:
        """Send items; returns how many the server accepted and the rows it rejected."""
        body = b'{"items":[' + b",".join(encoded) + b"]}"
        status, reply = await self._post(body)
        if status == 413:
            if len(encoded) > 1:
                mid = len(encoded) // 2
                a_ok, a_bad = await self.send(lines[:mid], encoded[:mid])
                b_ok, b_bad = await self.send(lines[mid:], encoded[mid:])
                return a_ok + b_ok, a_bad + b_bad
            return 0, [BadRow(lines[0], "", _detail(reply, "the item is too large"), "server")]
        if status in (200, 201, 202, 422):
            return self._accepted(status, reply, lines)
        if status in (404, 405):
            raise ImportFailed(
                f"{self._endpoint}: the server answered {status}: it has no item import "
                "endpoint; check --url points at a Personify engine of this version"
            )
        raise ImportFailed(
            f"{self._endpoint}: the server refused the batch of lines {lines[0]}-{lines[-1]} "
            f"with HTTP {status}: {_detail(reply, 'no details')}. {self._resume_hint()}"
        )

    def _accepted(
        self, status: int, reply: dict[str, Any], lines: list[int]
    ) -> tuple[int, list[BadRow]]:
        rejected = reply.get("rejected")
        if not isinstance(rejected, list):
            if status == 422:  # every item rejected, without a per-item list
                reason = _detail(reply, "rejected")
                field = str(reply.get("field") or "")
                return 0, [BadRow(n, field, reason, "server") for n in lines]
            rejected = []
        bad: list[BadRow] = []
        for entry in rejected:
            index = entry.get("index") if isinstance(entry, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(lines):
                continue  # not ours to map; still counted by "accepted"
            field = str(entry.get("field") or "")
            bad.append(BadRow(lines[index], field, str(entry.get("error") or "rejected"), "server"))
        accepted = reply.get("accepted")
        if not isinstance(accepted, int) or isinstance(accepted, bool):
            accepted = len(lines) - len(bad)
        return accepted, sorted(bad, key=lambda b: b.line)

    def _resume_hint(self) -> str:
        if self.resume_line:
            return (
                f"Everything up to line {self.resume_line} is imported and saved in "
                f"{self._state_file}: rerun the same command to continue from there."
            )
        return "Nothing was imported yet; rerun the same command once this is fixed."

    async def _post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """POST with retries on network errors and 5xx; returns the status and JSON body."""
        problem = ""
        for attempt in range(len(self._delays) + 1):
            delay = self._delays[attempt] if attempt < len(self._delays) else 0.0
            try:
                async with self._session.post(
                    self._endpoint, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                reply = _json_object(raw)
                if status not in _RETRY_STATUSES:
                    return status, reply
                problem = f"HTTP {status}: {_detail(reply, 'no details')}"
                with contextlib.suppress(ValueError):
                    delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER_S))
            if attempt < len(self._delays):
                self._notice(f"{self._endpoint}: {problem}; retrying in {delay:g} s")
                await asyncio.sleep(delay)
        raise ImportFailed(
            f"{self._endpoint}: no answer after {len(self._delays) + 1} attempts ({problem}); "
            "is the engine running? Start it with `personify run` or pass --url. "
            f"{self._resume_hint()}"
        )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {"detail": raw[:200].decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {}


def _detail(reply: dict[str, Any], default: str) -> str:
    parts = [str(reply[k]) for k in ("error", "detail") if reply.get(k)]
    return ": ".join(parts) or default


def _batches(
    rows: Iterable[ParsedRow], lines: _Lines, size: int, max_body: int
) -> Iterator[_Batch]:
    """Group rows into batches of at most ``size`` items and ``max_body`` bytes of JSON."""
    batch = _Batch([], [], [], lines.offset, lines.line)
    used = 0
    for row in rows:
        if row.item is None:
            assert row.bad is not None
            batch.bad.append(row.bad)
        else:
            try:
                encoded = orjson.dumps(row.item)
            except orjson.JSONEncodeError as exc:
                batch.bad.append(BadRow(row.line, "", f"cannot be sent as JSON: {exc}"))
                encoded = b""
            if not encoded:
                pass
            elif len(encoded) + 16 > max_body:
                text = encoded[:200].decode("utf-8", "replace") + "..."
                batch.bad.append(
                    BadRow(
                        row.line,
                        "",
                        f"the item is {len(encoded)} bytes; a request holds at most {max_body} "
                        "([events] max_body_bytes)",
                        "file",
                        text,
                    )
                )
            else:
                if batch.encoded and used + len(encoded) + 16 > max_body:
                    yield batch
                    batch = _Batch([], [], [], batch.offset, batch.line)
                    used = 0
                batch.lines.append(row.line)
                batch.encoded.append(encoded)
                used += len(encoded) + 1
        batch.offset, batch.line = lines.offset, lines.line
        if len(batch.encoded) >= size:
            yield batch
            batch = _Batch([], [], [], lines.offset, lines.line)
            used = 0
    batch.offset, batch.line = lines.offset, lines.line
    if batch.encoded or batch.bad:
        yield batch


class _Rejects:
    """Appends bad rows to ``FILE.rejects.jsonl`` as their batches are acknowledged."""

    def __init__(self, path: Path, *, keep: bool) -> None:
        self.path = path
        if not keep:
            path.unlink(missing_ok=True)

    def write(self, rows: Sequence[BadRow]) -> None:
        if not rows:
            return
        try:
            with open(self.path, "ab") as fh:
                for row in rows:
                    fh.write(
                        orjson.dumps(
                            {
                                "line": row.line,
                                "field": row.field,
                                "error": row.error,
                                "source": row.source,
                                "text": row.text,
                            }
                        )
                        + b"\n"
                    )
        except OSError as exc:
            raise ImportFailed(
                f"{self.path}: cannot write the bad rows ({exc.strerror}); make the folder "
                "writable or copy the catalog file to a writable folder"
            ) from None

    def sample(self, limit: int) -> tuple[BadRow, ...]:
        out: list[BadRow] = []
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as fh:
            for raw in fh:
                if len(out) >= limit:
                    break
                with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                    d = orjson.loads(raw)
                    out.append(BadRow(d["line"], d["field"], d["error"], d["source"], d["text"]))
        return tuple(out)


def _progress(console: Console, show: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[items]:,} items"),
        TextColumn("{task.fields[rate]:,.0f} items/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not show or not console.is_terminal,
    )


def _check_url(url: str) -> str:
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ImportFailed(f"--url: expected http://host:port of a running engine, got {url!r}")
    return url


def _forget(state_file: Path) -> None:
    # A state file that cannot be removed is reported when the first batch saves it.
    with contextlib.suppress(OSError):
        state_file.unlink(missing_ok=True)


def _resume(
    state_file: Path, fresh: _State, restart: bool, notice: Callable[[str], None]
) -> tuple[_State, bool]:
    """The state to start from and whether it resumes an earlier run."""
    saved = None if restart else _load_state(state_file)
    if saved is None:
        _forget(state_file)
        return fresh, False
    if isinstance(saved, str):
        notice(f"Warning: ignoring {state_file}: {saved}; starting from the first row.")
        _forget(state_file)
        return fresh, False
    changed = [
        what
        for what, same in (
            ("the file changed since", saved["file"] == fresh["file"]),
            (f"it was read as {saved['format']}", saved["format"] == fresh["format"]),
            (f"it went to {saved['url']}", saved["url"] == fresh["url"]),
        )
        if not same
    ]
    if changed or saved["offset"] > fresh["file"]["size"]:
        notice(
            f"Warning: an earlier import of this file stopped after line {saved['line']:,}, "
            f"but {' and '.join(changed) or 'the file changed since'}; "
            "starting over from the first row."
        )
        _forget(state_file)
        return fresh, False
    notice(
        f"Resuming an earlier import after line {saved['line']:,} "
        f"({saved['imported']:,} items imported then); pass --restart to start over."
    )
    return saved, True


async def _nothing() -> tuple[int, list[BadRow]]:
    return 0, []


async def run_import(
    path: str | os.PathLike[str],
    url: str,
    *,
    events: EventsConfig | None = None,
    batch: int = DEFAULT_BATCH,
    restart: bool = False,
    fmt: Format | None = None,
    console: Console | None = None,
    progress: bool = True,
    retry_delays: Sequence[float] | None = None,
    request_timeout_s: float = 120.0,
) -> ImportReport:
    """Import a catalog file into the engine at ``url``, resuming an interrupted import.

    Args:
        path: the catalog file (CSV or JSONL).
        url: the engine's base URL, e.g. ``http://127.0.0.1:8080``.
        events: the [events] limits used to validate items before sending.
        batch: items per request (1-1000).
        restart: ignore a saved resume state and start from the first row.
        fmt: ``"csv"`` or ``"jsonl"``; ``None`` goes by the file extension.
        console: where progress and notices go (default: a console on stderr).
        progress: show a progress bar (only ever on a terminal).
        retry_delays: pauses between the attempts of one request (default 0.5 s to 4 s).
        request_timeout_s: the longest one request may take.

    Returns:
        What was imported and what was not.

    Raises:
        ImportFailed: bad arguments, an unreadable file, or a server that cannot be reached
            or refuses the requests; the resume state keeps what was acknowledged.
    """
    started = time.monotonic()
    cfg = events or EventsConfig()
    out = console or Console(stderr=True)
    if not 1 <= batch <= MAX_BATCH:
        raise ImportFailed(f"--batch: expected 1-{MAX_BATCH} items per request, got {batch}")
    url = _check_url(url)
    file = Path(path)
    kind = detect_format(file, fmt)
    state_file = state_path(file)
    notices: list[str] = []

    def notice(text: str) -> None:
        notices.append(text)
        out.print(text, markup=False, highlight=False, soft_wrap=True)

    with _open(file) as fh:
        identity = _identity(fh)
        fresh: _State = {
            "version": _STATE_VERSION,
            "file": identity,
            "format": kind,
            "url": url,
            "offset": 0,
            "line": 0,
            "imported": 0,
            "bad": 0,
        }
        state, resumed = _resume(state_file, fresh, restart, notice)
        resumed_after = state["line"] if resumed else None
        rejects = _Rejects(rejects_path(file), keep=resumed)
        rows, lines = _rows(fh, file, kind, cfg, state["offset"], state["line"])
        groups = _batches(rows, lines, batch, cfg.max_body_bytes)
        imported = bad = 0
        timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=request_timeout_s / 4)
        bar = _progress(out, progress)
        task = bar.add_task(
            f"Importing {file.name}",
            total=identity["size"],
            completed=state["offset"],
            items=0,
            rate=0.0,
        )
        pending: asyncio.Task[tuple[int, list[BadRow]]] | None = None
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = _Client(
                session,
                url,
                state_file,
                _RETRY_DELAYS if retry_delays is None else retry_delays,
                notice,
            )
            client.resume_line = state["line"]
            try:
                with bar:
                    sent: _Batch | None = None
                    while True:
                        # Read the next batch in a thread while the previous one is in flight.
                        nxt = await asyncio.to_thread(next, groups, None)
                        if pending is not None and sent is not None:
                            accepted, refused = await pending
                            pending = None
                            rows_bad = sorted(sent.bad + refused, key=lambda b: b.line)
                            rejects.write(rows_bad)
                            imported += accepted
                            bad += len(rows_bad)
                            state["offset"], state["line"] = sent.offset, sent.line
                            state["imported"] += accepted
                            state["bad"] += len(rows_bad)
                            _save_state(state_file, state)
                            client.resume_line = state["line"]
                            elapsed = time.monotonic() - started
                            bar.update(
                                task, completed=sent.offset, items=imported, rate=imported / elapsed
                            )
                        if nxt is None:
                            break
                        sent = nxt
                        pending = asyncio.create_task(
                            client.send(nxt.lines, nxt.encoded) if nxt.encoded else _nothing()
                        )
            except BaseException as exc:
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
                if not isinstance(exc, ImportFailed) and state_file.exists():
                    notice(
                        f"Stopped: everything up to line {state['line']:,} is imported and "
                        f"saved in {state_file}; rerun the same command to continue."
                    )
                raise
    state_file.unlink(missing_ok=True)
    sample = rejects.sample(_SAMPLE)
    if not state["bad"]:
        rejects.path.unlink(missing_ok=True)
    return ImportReport(
        path=file,
        url=url,
        format=kind,
        imported=imported,
        bad=bad,
        total_imported=state["imported"],
        total_bad=state["bad"],
        bad_rows=sample,
        rejects_path=rejects.path if state["bad"] else None,
        elapsed_s=time.monotonic() - started,
        resumed_after_line=resumed_after,
        notices=tuple(notices),
    )


def format_summary(report: ImportReport) -> str:
    """The summary printed at the end: counts, speed and the first bad rows."""
    noun = "item" if report.imported == 1 else "items"
    text = [
        f"Imported {report.imported:,} {noun} from {report.path} into {report.url} "
        f"in {report.elapsed_s:.1f} s ({report.items_per_s:,.0f} items/s)."
    ]
    if report.resumed_after_line is not None:
        text.append(
            f"This run resumed after line {report.resumed_after_line:,}; with the earlier run: "
            f"{report.total_imported:,} imported, {report.total_bad:,} bad."
        )
    if report.total_bad:
        rows = "row was" if report.total_bad == 1 else "rows were"
        text.append(
            f"{report.total_bad:,} bad {rows} not imported (all listed in {report.rejects_path}):"
        )
        text.extend(f"  {row.describe()}" for row in report.bad_rows)
        if report.total_bad > len(report.bad_rows):
            text.append(f"  ... and {report.total_bad - len(report.bad_rows):,} more")
        text.append(
            "Fix them and import the file again (items already imported are simply updated)."
        )
    return "\n".join(text)


def import_command(
    config: Config,
    path: str,
    *,
    url: str | None = None,
    batch: int = DEFAULT_BATCH,
    restart: bool = False,
    fmt: Format | None = None,
) -> int:
    """Run ``personify items import``: import, print the summary, return the exit status.

    Returns:
        0 when every row was imported, 1 when some rows were bad.

    Raises:
        ImportFailed: usage, file or connection errors (the CLI exits with 2).
    """
    report = asyncio.run(
        run_import(
            path,
            url or config.server.url,
            events=config.events,
            batch=batch,
            restart=restart,
            fmt=fmt,
        )
    )
    print(format_summary(report), flush=True)
    return report.exit_code

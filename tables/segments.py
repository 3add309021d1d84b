"""Rule segments: a small language over a visitor's profile, and the rows of their members.

A segment is a named rule, an expression in a small subset of Python's syntax over the
visitor's profile (`FIELDS`, `FUNCTIONS`)::

    orders >= 2 and spend > 100 and days_since_order > 30
    affinity("outdoor") > 0.5 and orders == 0
    cart_value > 50 and consent("marketing")
    events_in(7) >= 20 or sessions_in(30) >= 4
    monetary == 5 and recency <= 2

Only what is listed parses: numbers, strings, ``True``/``False``, the fields, the functions
(with literal arguments), ``and``/``or``/``not``, comparisons (chained too), ``+ - * /`` and
parentheses. Anything else (attributes, indexing, other names, lambdas) is refused with the
position and the reason, so a rule can never run code.

All the rules are compiled together into one Python function of a visitor's `Facts`, which
computes each field the rules name once (the costlier ones, RFM scores, propensities and the
cluster, only when a rule reaches them): evaluating fifty rules for a visitor costs a few
microseconds. Each rule knows the event types that can change what it says, so after a
visitor's events only the rules those may change are evaluated again (a view cannot change
``orders >= 2``); what time alone changes (``days_since_order > 30``) the sweep finds.

Membership is kept in the profile (``segments``: the ids, sorted; ``segments_of``: which rules
it was evaluated with), and a count per segment and partition (`size_key`) is written in the
same batch. Members are listed from the profiles (`members`). The segments defined, the RFM
cut points and the clusters are kept by the `Registry` (a JSON file).
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import compress
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from personify.engine.config import TUNABLE, ProfilesConfig
from personify.engine.errors import ValidationError
from personify.engine.files import write_json
from personify.engine.models import PURPOSES, format_ts
from personify.tables.clusters import Clusters
from personify.tables.propensity import Propensity
from personify.tables.signals import PREFIX

__all__ = [
    "FIELDS",
    "FUNCTIONS",
    "RESEGMENT",
    "SEGMENTS_RAW",
    "Cuts",
    "Facts",
    "Registry",
    "Rules",
    "Segment",
    "check_rule",
    "members",
    "profile_rows",
    "rfm_cuts",
    "rfm_values",
    "size_key",
    "sizes",
]

#: An internal event: evaluate the visitor's segments again (a sweep found them out of date).
RESEGMENT: Final = "$segments"

#: A segment's member count in the partition: ``SIZE_PREFIX`` + segment.
SIZE_PREFIX: Final = PREFIX + b"n"

_DAY_MS: Final = 86_400_000
_HOUR_MS: Final = 3_600_000
#: Days since something that never happened (a comparison like ``> 30`` holds).
NEVER: Final = math.inf

#: The fields a rule can name, with what each means (the README's table is made from this).
FIELDS: Final[dict[str, str]] = {
    "views": "product views, ever",
    "clicks": "clicks, ever",
    "cart_adds": "items added to the cart, ever",
    "searches": "searches, ever",
    "events": "events of any kind, ever",
    "orders": "purchases (orders), ever",
    "spend": "lifetime spend (all currencies as sent)",
    "aov": "average order value (0 without orders)",
    "cart_value": "value of the cart now",
    "cart_items": "items in the cart now (quantities added up)",
    "sessions": "sessions, ever",
    "engagement": "engagement score (weighted events)",
    "days_since_seen": "days since the last event (infinite if none)",
    "days_since_order": "days since the last order (infinite if none)",
    "days_since_first_seen": "days since the first event (the visitor's age)",
    "recency": "RFM recency score, 1-5 (5: ordered most recently; 0 without orders or before "
    "the first scoring)",
    "frequency": "RFM frequency score, 1-5 (5: most orders)",
    "monetary": "RFM monetary score, 1-5 (5: highest spend)",
    "purchase_propensity": "probability of a purchase in the next 7 days, 0-1 (learned; "
    "unknown before the first training: no comparison holds)",
    "churn_propensity": "probability of no visit in the next 30 days, 0-1 (learned; unknown "
    "before the first training)",
    "cluster": "the visitor's behavioural cluster, 0 to k-1 (-1 before the first fit)",
}
_PROPENSITY: Final = {"purchase_propensity": "purchase_7d", "churn_propensity": "churn_30d"}
#: The functions a rule can call (with literal arguments).
FUNCTIONS: Final[dict[str, str]] = {
    "affinity": 'affinity("cat") or affinity("cat/sub"): the category affinity now (decayed; '
    "0 if none)",
    "consent": 'consent("marketing"): whether the visitor consents to the purpose',
    "count": 'count("product_view"): events of that type, ever',
    "events_in": "events_in(7): events in the last 7 days (up to the profile's frequency window)",
    "sessions_in": "sessions_in(30): sessions started in the last 30 days (of those kept)",
}
_COUNTED: Final = {
    "views": "product_view",
    "clicks": "click",
    "cart_adds": "add_to_cart",
    "searches": "search",
}
_MAX_RULE: Final = 2000
#: The largest value a segment's ranking setting may take.
_MAX_RANKING: Final = 1000.0
_COMPARE: Final = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_ARITHMETIC: Final = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _refuse(node: ast.AST, reason: str) -> ValidationError:
    column = getattr(node, "col_offset", None)
    where = "" if column is None else f" at character {column + 1}"
    return ValidationError("rule", f"{reason}{where}")


def _check(node: ast.AST) -> None:
    """Refuse anything outside the language (see the module)."""
    if isinstance(node, ast.Expression):
        _check(node.body)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.Not | ast.USub):
            raise _refuse(node, "only 'not' and '-' go before a value")
        _check(node.operand)
    elif isinstance(node, ast.Compare):
        if not all(isinstance(op, _COMPARE) for op in node.ops):
            raise _refuse(node, "compare with ==, !=, <, <=, > or >=")
        _check(node.left)
        for value in node.comparators:
            _check(value)
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, _ARITHMETIC):
            raise _refuse(node, "only + - * / are allowed")
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, bool | int | float | str):
            raise _refuse(node, "expected a number, a string, True or False")
    elif isinstance(node, ast.Name):
        if node.id not in FIELDS:
            raise _refuse(node, f"unknown field {node.id!r}; known: {', '.join(FIELDS)}")
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            raise _refuse(node, f"unknown function; known: {', '.join(FUNCTIONS)}")
        if node.keywords or len(node.args) != 1:
            raise _refuse(node, f"{name}() takes one argument")
        [arg] = node.args
        expected = int if name in ("events_in", "sessions_in") else str
        if not isinstance(arg, ast.Constant) or not isinstance(arg.value, expected):
            kind = "a whole number of days" if expected is int else "a string"
            raise _refuse(arg, f"{name}() takes {kind}")
        if name == "consent" and arg.value not in PURPOSES:
            raise _refuse(arg, f"consent() takes one of {', '.join(PURPOSES)}")
    else:
        raise _refuse(node, f"{type(node).__name__.lower()} is not part of the rule language")


def check_rule(rule: Any) -> str:
    """``rule`` if it parses and stays within the language; else a `ValidationError`."""
    if not isinstance(rule, str) or not rule.strip():
        raise ValidationError("rule", 'expected an expression, e.g. "orders >= 2 and spend > 100"')
    if len(rule) > _MAX_RULE:
        raise ValidationError("rule", f"at most {_MAX_RULE} characters")
    try:
        tree = ast.parse(rule.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValidationError(
            "rule", f"not an expression: {exc.msg} at character {exc.offset or 0}"
        ) from None
    _check(tree)
    return rule.strip()


@dataclass(frozen=True, slots=True)
class Cuts:
    """RFM quintile cut points over the visitors who ordered (`rfm_cuts`).

    Attributes:
        recency: days since the last order at the four cut points, ascending.
        frequency: orders at the four cut points, ascending.
        monetary: spend at the four cut points, ascending.
        at_ms: when recency was measured (a visitor's days since their order are compared
            as of then, shifted by the time since).
    """

    recency: tuple[float, ...] = ()
    frequency: tuple[float, ...] = ()
    monetary: tuple[float, ...] = ()
    at_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "recency": list(self.recency),
            "frequency": list(self.frequency),
            "monetary": list(self.monetary),
            "at_ms": self.at_ms,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Cuts:
        """From `as_json`'s form."""
        return cls(
            tuple(doc.get("recency", ())),
            tuple(doc.get("frequency", ())),
            tuple(doc.get("monetary", ())),
            int(doc.get("at_ms", 0)),
        )


def _quintile(value: float, cuts: tuple[float, ...]) -> int:
    """1-5: how many of the four ``cuts`` ``value`` exceeds, plus one."""
    return 1 + sum(1 for c in cuts if value > c)


def rfm_cuts(values: Sequence[float], at_ms: int) -> Cuts:
    """The quintile cut points of the visitors who ordered.

    ``values``: (days since their last order, orders, spend) of each, one after the other.
    """
    rows = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    if not len(rows):
        return Cuts(at_ms=at_ms)
    quantiles = (0.2, 0.4, 0.6, 0.8)

    def cut(column: int) -> tuple[float, ...]:
        return tuple(float(x) for x in np.quantile(rows[:, column], quantiles))

    return Cuts(cut(0), cut(1), cut(2), at_ms)


class Facts(dict[str, Any]):
    """A visitor's fields for the rules, each computed when first asked for."""

    __slots__ = ("_cfg", "_clusters", "_cuts", "_now", "_p", "_score_ms", "_scores")

    def __init__(
        self,
        p: Mapping[str, Any],
        cfg: ProfilesConfig,
        now_ms: int,
        cuts: Cuts | None = None,
        scores: Propensity | None = None,
        score_ms: int | None = None,
        clusters: Clusters | None = None,
    ) -> None:
        super().__init__()
        self._clusters = clusters
        self._p, self._cfg, self._now, self._cuts = p, cfg, now_ms, cuts or Cuts()
        #: The learned propensity scores, and the time they are computed at (the shop's clock:
        #: a backfill's visitors are scored as of its end).
        self._scores, self._score_ms = scores, now_ms if score_ms is None else score_ms

    def __missing__(self, name: str) -> Any:
        field = _FIELD_OF.get(name)
        if field is None:
            raise KeyError(name)
        value = self[name] = field(self)
        return value

    def _days_since(self, ts: int | None) -> float:
        return NEVER if ts is None else max(self._now - ts, 0) / _DAY_MS

    def _rfm(self, name: str) -> int:
        cuts = self._cuts
        if not self._p.get("orders") or not cuts.recency:
            return 0
        if name == "recency":  # fewer days since the order scores higher
            shift = max(self._now - cuts.at_ms, 0) / _DAY_MS
            return 6 - _quintile(self["days_since_order"] - shift, cuts.recency)
        if name == "frequency":
            return _quintile(float(self._p.get("orders", 0)), cuts.frequency)
        return _quintile(float(self._p.get("spend", 0.0)), cuts.monetary)

    def _propensity(self, name: str) -> float:
        found = None
        if self._scores is not None:
            found = self._scores.score(_PROPENSITY[name], self._p, self._score_ms)
        return math.nan if found is None else found

    def _cluster(self) -> int:
        return -1 if self._clusters is None else self._clusters.of(self._p, self._score_ms)

    def _cart_value(self) -> float:
        total: float = sum(
            (line["price"] or 0.0) * line["quantity"] for line in self._p["cart"].values()
        )
        return total

    def _affinity(self, category: str) -> float:
        entry = self._p["affinity"].get(category.strip("/"))
        if entry is None:
            return 0.0
        score, ref = entry
        half_life_ms = self._cfg.affinity_half_life_s * 1000
        return float(score * math.pow(0.5, max(self._now - ref, 0) / half_life_ms))

    def _consent(self, purpose: str) -> bool:
        record = self._p.get("consent", {}).get(purpose)
        return self._cfg.consent == "opt-out" if record is None else bool(record[0])

    def _count(self, event_type: str) -> int:
        return int(self._p["counts"].get(event_type, 0))

    def _events_in(self, days: int) -> int:
        since = (self._now - days * _DAY_MS) // _HOUR_MS
        return sum(n for hour, n in self._p["hours"].items() if int(hour) >= since)

    def _sessions_in(self, days: int) -> int:
        since = self._now - days * _DAY_MS
        return sum(1 for start, _end, _n in self._p["session_list"] if start >= since)


#: The `Facts` method that computes each function of the rule language.
_METHOD: Final = {name: f"_{name}" for name in FUNCTIONS}


#: How each field is computed: Python over the visitor's profile ``_p`` and `Facts` ``_f``.
_FIELD_CODE: Final[dict[str, str]] = {
    **{name: f'_p["counts"].get({event_type!r}, 0)' for name, event_type in _COUNTED.items()},
    "events": '_sum(_p["counts"].values())',
    "orders": '_p["orders"]',
    "spend": '_p["spend"]',
    "aov": '_p["spend"] / _p["orders"] if _p["orders"] else 0.0',
    "cart_value": "_f._cart_value()",
    "cart_items": '_sum(line["quantity"] for line in _p["cart"].values())',
    "sessions": '_p["sessions_closed"] + _len(_p["session_list"])',
    "engagement": '_p["engagement"]',
    "days_since_seen": '_f._days_since(_p["last_seen"])',
    "days_since_order": '_f._days_since(_p.get("last_order"))',
    "days_since_first_seen": '_f._days_since(_p["first_seen"])',
    "recency": '_f._rfm("recency")',
    "frequency": '_f._rfm("frequency")',
    "monetary": '_f._rfm("monetary")',
    "purchase_propensity": '_f._propensity("purchase_propensity")',
    "churn_propensity": '_f._propensity("churn_propensity")',
    "cluster": "_f._cluster()",
}
#: What generated code sees besides the visitor's facts: nothing of Python's built-ins but
#: these (the rules cannot name them: `check_rule` knows only `FIELDS` and `FUNCTIONS`).
_SCOPE: Final[dict[str, Any]] = {"__builtins__": {}, "_sum": sum, "_len": len}


def _define(name: str, lines: Iterable[str]) -> Any:
    """The function ``name`` defined by the code ``lines`` (which see `_SCOPE` only)."""
    scope = dict(_SCOPE)
    exec(compile("\n".join(lines), f"<{name}>", "exec"), scope)
    return scope[name]


#: Each field as a function of a visitor's `Facts`.
_FIELD_OF: Final[dict[str, Callable[[Facts], Any]]] = {
    name: _define("_field", ["def _field(_f):", "    _p = _f._p", f"    return {code}"])
    for name, code in _FIELD_CODE.items()
}


#: Fields computed only when a rule reaches them (through `Facts`, which keeps them): they cost
#: more than the rest, which are all computed before the rules are.
_LAZY: Final = frozenset(
    {"recency", "frequency", "monetary", "purchase_propensity", "churn_propensity", "cluster"}
)


class _Locals(ast.NodeTransformer):
    """Rewrites a rule over local variables, read before the rules are.

    One local per field and per call (a call's is ``_callN``), except the `_LAZY` fields: those
    are read from the facts where the rule reaches them.
    """

    def __init__(self) -> None:
        self.calls: dict[tuple[str, Any], str] = {}
        #: The locals the rule last visited uses.
        self.used: set[str] = set()

    def visit_Call(self, node: ast.Call) -> ast.AST:
        assert isinstance(node.func, ast.Name) and isinstance(node.args[0], ast.Constant)
        call = (node.func.id, node.args[0].value)
        name = self.calls.setdefault(call, f"_call{len(self.calls)}")
        self.used.add(name)
        return ast.copy_location(ast.Name(id=name, ctx=ast.Load()), node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _LAZY:
            facts = ast.Name(id="_f", ctx=ast.Load())
            read = ast.Subscript(value=facts, slice=ast.Constant(node.id), ctx=ast.Load())
            return ast.copy_location(read, node)
        self.used.add(node.id)
        return node


def _depends(tree: ast.AST) -> frozenset[str] | None:
    """The event types that can change what ``tree`` says (None: any event)."""
    types: set[str] = set()
    functions = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if id(node) in functions:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            argument = node.args[0]
            if node.func.id == "count" and isinstance(argument, ast.Constant):
                types.add(str(argument.value))
            elif node.func.id == "consent":
                types.add("consent")
            else:
                return None
        elif isinstance(node, ast.Name):
            changed_by = _CHANGED_BY.get(node.id)
            if changed_by is None:
                return None
            types.update(changed_by)
    return frozenset(types)


#: The event types that change a field; a field not here changes with any event. Time alone
#: changes some fields too (the days since an order, the RFM recency): that the sweep finds
#: (`personify.agents.segments`), as it does for a visitor who does nothing.
_CHANGED_BY: Final[dict[str, frozenset[str]]] = {
    "views": frozenset({"product_view"}),
    "clicks": frozenset({"click"}),
    "cart_adds": frozenset({"add_to_cart"}),
    "searches": frozenset({"search"}),
    "orders": frozenset({"purchase"}),
    "days_since_order": frozenset({"purchase"}),
    "recency": frozenset({"purchase"}),
    "spend": frozenset({"purchase"}),
    "aov": frozenset({"purchase"}),
    "cart_value": frozenset({"add_to_cart", "remove_from_cart", "purchase"}),
    "cart_items": frozenset({"add_to_cart", "remove_from_cart", "purchase"}),
    "frequency": frozenset({"purchase"}),
    "monetary": frozenset({"purchase"}),
}


class Rules:
    """Rules compiled together: `members` evaluates them for one visitor.

    The rules are compiled into one Python function of the visitor's `Facts`: it computes each
    field and each call the rules name once, into a local variable, then returns what each rule
    says. Each rule knows the event types that can change what it says (`_CHANGED_BY`): after
    events of other types only, its answer stands, and `members` with ``types`` evaluates only
    the rules those events may change, with a function of their own.
    """

    def __init__(self, rules: Mapping[str, str]) -> None:
        self.ids = tuple(sorted(rules))
        local = _Locals()
        trees = {i: ast.parse(check_rule(rules[i]), mode="eval") for i in self.ids}
        self._depends = {i: _depends(tree) for i, tree in trees.items()}
        self._bodies: dict[str, str] = {}
        self._uses: dict[str, frozenset[str]] = {}
        for i in self.ids:
            local.used = set()
            self._bodies[i] = ast.unparse(local.visit(trees[i]).body)
            self._uses[i] = frozenset(local.used)
        #: A call's local name -> how it is computed.
        self._calls = {name: call for call, name in local.calls.items()}
        #: Rule ids -> the function of those rules (all of them, and subsets as asked for).
        self._functions: dict[tuple[str, ...], Callable[[Facts], tuple[Any, ...]]] = {}
        self._all = _Subset(self.ids, self._function(self.ids) if self.ids else _none, frozenset())
        #: Event types -> the rules they may change.
        self._affected: dict[frozenset[str], _Subset] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _subset(self, types: frozenset[str]) -> _Subset:
        """The rules events of ``types`` may change."""
        found = self._affected.get(types)
        if found is None:
            ids = tuple(
                i for i in self.ids if (d := self._depends[i]) is None or not d.isdisjoint(types)
            )
            function = self._function(ids) if ids else _none
            stand = frozenset(self.ids).difference(ids)
            found = self._affected[types] = _Subset(ids, function, stand)
        return found

    def _function(self, ids: tuple[str, ...]) -> Callable[[Facts], tuple[Any, ...]]:
        """The function of the rules ``ids``: facts -> what each rule says, in order."""
        found = self._functions.get(ids)
        if found is None:
            lines = ["def _rules(_f):", "    _p = _f._p"]
            for name in sorted(set().union(*(self._uses[i] for i in ids))):
                call = self._calls.get(name)
                if call is None:
                    lines.append(f"    {name} = {_FIELD_CODE[name]}")
                else:
                    function, argument = call
                    lines.append(f"    {name} = _f.{_METHOD[function]}({argument!r})")
            lines.append(f"    return ({''.join(f'{self._bodies[i]}, ' for i in ids)})")
            # Only checked rules (`check_rule`) are compiled.
            found = self._functions[ids] = _define("_rules", lines)
        return found

    def members(
        self, facts: Facts, types: frozenset[str] | None = None, stored: Iterable[str] = ()
    ) -> list[str]:
        """The ids of the segments whose rule holds for ``facts``' visitor (sorted).

        ``types``: the event types applied since the visitor's membership was ``stored`` (with
        these rules): only the rules they may change are evaluated, the others' answers stand.
        Default: every rule is evaluated. A rule that fails for this visitor (a division by
        zero) holds for no one.
        """
        subset = self._all if types is None else self._subset(types)
        try:
            held = list(compress(subset.ids, subset.function(facts)))
        except (ArithmeticError, TypeError, ValueError):
            held = [i for i in subset.ids if self._holds(i, facts)]
        if subset.stand:
            held.extend(subset.stand.intersection(stored))
            held.sort()
        return held

    def _holds(self, segment: str, facts: Facts) -> bool:
        try:
            return bool(self._function((segment,))(facts)[0])
        except (ArithmeticError, TypeError, ValueError):
            return False


def _none(_facts: Facts) -> tuple[Any, ...]:
    return ()


@dataclass(frozen=True, slots=True)
class _Subset:
    """Some of the rules: their ids (in order) and function, and the rules whose answers stand."""

    ids: tuple[str, ...]
    function: Callable[[Facts], tuple[Any, ...]]
    stand: frozenset[str]


def size_key(segment: str) -> bytes:
    """The partition's count of ``segment``'s members."""
    return SIZE_PREFIX + segment.encode()


def sizes(partition_dbs: Iterable[Any], segments: Iterable[str]) -> dict[str, int]:
    """Each of ``segments``' members, over the partitions' databases."""
    ids = list(segments)
    keys = [size_key(s) for s in ids]
    out = dict.fromkeys(ids, 0)
    for partition_db in partition_dbs:
        for segment, raw in zip(ids, partition_db.get(keys), strict=True):
            if raw is not None:
                out[segment] += int(raw)
    return out


def members(
    partition_dbs: Iterable[Any],
    segment: str,
    after: str = "",
    limit: int = 100,
    budget: int = 50_000,
) -> tuple[list[str], str | None]:
    """Up to ``limit`` of ``segment``'s members after ``after``, in id order (all partitions).

    Read from the profiles themselves (their ``segments``, found in the stored bytes without
    decoding them). Each partition reads at most ``budget`` profiles, so a segment that holds
    a small share of the visitors may take several pages, some of them short or empty.
    Returns the members and where the next page starts (None: no member after them).
    """
    held = b'"' + segment.encode() + b'"'
    found: list[str] = []
    #: The least id a partition stopped at before its end: members up to it are all found.
    bound: str | None = None
    for partition_db in partition_dbs:
        ids, stopped = _visitors(partition_db, held, after, limit + 1, budget)
        found.extend(ids)
        if stopped is not None and (bound is None or stopped < bound):
            bound = stopped
    complete = sorted(v for v in found if bound is None or v <= bound)
    page = complete[:limit]
    if len(complete) > limit:
        return page, page[-1]
    return page, bound


#: Where visitors' rows start: past the engine's own (`PREFIX`).
_FIRST_VISITOR: Final = bytes([PREFIX[0] + 1])
#: The segments in a stored profile (ids never hold quotes or brackets).
SEGMENTS_RAW: Final = re.compile(rb'"segments":(\[[^\]]*\])')


def _visitors(
    partition_db: Any, held: bytes, after: str, limit: int, budget: int
) -> tuple[list[str], str | None]:
    """A partition's members after ``after``, and the last id read (None: it read to its end).

    It stops at ``limit`` members, or after reading ``budget`` profiles (at least one).
    """
    it = partition_db.iter()
    start = after.encode()
    it.seek(max(start, _FIRST_VISITOR))  # the engine's own rows sort first: skipped
    found: list[str] = []
    read, last = 0, after
    while it.valid():
        key: bytes = it.key()
        if not key.startswith(_NOT_PROFILES) and key != start:
            if len(found) == limit or read >= max(budget, 1):
                return found, last
            read, last = read + 1, key.decode()
            raw = SEGMENTS_RAW.search(it.value() or b"")
            if raw is not None and held in raw.group(1):
                found.append(last)
        it.next()
    return found, None


# -- the segments defined ------------------------------------------------------------------

_ID: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Rows of a profiles database that are not profiles: the engine's own, and Faust's.
_NOT_PROFILES: Final = (PREFIX, b"__faust")


@dataclass(frozen=True, slots=True)
class Segment:
    """A rule segment.

    Attributes:
        id: its id.
        rule: its rule (`personify.tables.segments`).
        description: what it is for, in words.
        created: when it was first defined (ISO-8601).
        updated: when its rule last changed (ISO-8601).
        ranking: ranking settings its members' lists use (blend weights, ``seed_half_life``,
            as the self-tuning names them; empty: the shop's).
    """

    id: str
    rule: str
    description: str
    created: str
    updated: str
    ranking: dict[str, float] = field(default_factory=dict)

    def as_json(self, size: int | None = None) -> dict[str, Any]:
        """The wire form (with its size where known)."""
        out: dict[str, Any] = {
            "id": self.id,
            "rule": self.rule,
            "description": self.description,
            "created": self.created,
            "updated": self.updated,
            "ranking": self.ranking,
        }
        if size is not None:
            out["size"] = size
        return out


class Registry:
    """The segments defined here, their compiled rules and the RFM cut points (saved)."""

    def __init__(self, path: Path, max_segments: int = 100) -> None:
        self.path = path
        self.max_segments = max_segments
        self._all: dict[str, Segment] = {}
        self.cuts = Cuts()
        #: The behavioural clusters (None: not fitted yet).
        self.clusters: Clusters | None = None
        #: Bumped on every change of the rules (a sweep is due).
        self.version = 0
        if path.exists():
            doc = orjson.loads(path.read_bytes())
            for raw in doc.get("segments", []):
                segment = Segment(**raw)
                self._all[segment.id] = segment
            self.cuts = Cuts.from_json(doc.get("cuts", {}))
            if doc.get("clusters"):
                self.clusters = Clusters.from_json(doc["clusters"])
        self._compile()

    def _compile(self) -> None:
        rules = {s.id: s.rule for s in self._all.values()}
        self._rules = Rules(rules)
        self._ranks = any(s.ranking for s in self._all.values())
        #: Names these rules: a profile evaluated with them keeps it (``segments_of``).
        named = orjson.dumps(rules, option=orjson.OPT_SORT_KEYS)
        self.digest = blake2b(named, digest_size=6).hexdigest()
        self.version += 1

    def _save(self) -> None:
        write_json(
            self.path,
            {
                "segments": [s.as_json() for s in self._all.values()],
                "cuts": self.cuts.as_json(),
                "clusters": None if self.clusters is None else self.clusters.as_json(),
            },
        )

    @property
    def compiled(self) -> Rules:
        """Every segment's rule, compiled together."""
        return self._rules

    def uses(self, fields: frozenset[str]) -> bool:
        """Whether a rule names one of ``fields``."""
        return any(fields & set(re.findall(r"[a-z_]+", s.rule)) for s in self._all.values())

    def all(self) -> list[Segment]:
        """Every segment, by id."""
        return sorted(self._all.values(), key=lambda s: s.id)

    def get(self, segment_id: str) -> Segment | None:
        """The segment ``segment_id``, if there is one."""
        return self._all.get(segment_id)

    def put(self, segment_id: str, doc: Any, now_ms: int) -> tuple[Segment, bool]:
        """Create or replace a segment from its wire form; (the segment, whether it is new)."""
        if not _ID.match(segment_id):
            raise ValidationError("id", "expected 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(doc, dict):
            raise ValidationError("body", f"expected an object, got {type(doc).__name__}")
        unknown = set(doc) - {"rule", "description", "ranking"}
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        rule = check_rule(doc.get("rule"))
        description = doc.get("description", "")
        if not isinstance(description, str) or len(description) > 500:
            raise ValidationError("description", "expected a string of at most 500 characters")
        ranking = _ranking(doc.get("ranking", {}))
        old = self._all.get(segment_id)
        if old is None and len(self._all) >= self.max_segments:
            raise ValidationError(
                "id",
                f"at most {self.max_segments} segments ([segments] max_segments); delete one",
            )
        now = format_ts(now_ms)
        segment = Segment(
            id=segment_id,
            rule=rule,
            description=description,
            created=now if old is None else old.created,
            updated=now if old is None or old.rule != rule else old.updated,
            ranking=ranking,
        )
        self._all[segment_id] = segment
        self._compile()
        self._save()
        return segment, old is None

    def delete(self, segment_id: str) -> bool:
        """Forget the segment (its members leave it on the next sweep); whether there was one."""
        if self._all.pop(segment_id, None) is None:
            return False
        self._compile()
        self._save()
        return True

    def set_cuts(self, cuts: Cuts, clusters: Clusters | None = None) -> None:
        """New RFM cut points, and clusters where given (saved)."""
        self.cuts = cuts
        if clusters is not None:
            self.clusters = clusters
        self._save()

    def ranking_of(self, segments: Iterable[str]) -> Segment | None:
        """The first of ``segments`` (by id) with ranking settings of its own, if any."""
        for segment_id in sorted(segments):
            found = self._all.get(segment_id)
            if found is not None and found.ranking:
                return found
        return None

    def ranks(self) -> bool:
        """Whether a segment has ranking settings of its own."""
        return self._ranks

    def members(
        self,
        profile: dict[str, Any],
        cfg: ProfilesConfig,
        now_ms: int,
        scores: Propensity | None = None,
        score_ms: int | None = None,
        types: frozenset[str] | None = None,
    ) -> list[str]:
        """The segments the visitor of ``profile`` is in at ``now_ms``.

        None for a visitor linked to a user (their profile moved to the user's). ``scores``:
        the learned propensity scores, computed at ``score_ms`` (default ``now_ms``).
        ``types``: the event types just applied to the profile, where its membership was
        evaluated before with these rules (``profile["segments_of"]`` is `digest`): only the
        rules those events may change are evaluated again.
        """
        if profile.get("alias_of") or not len(self._rules):
            return []
        facts = Facts(profile, cfg, now_ms, self.cuts, scores, score_ms, self.clusters)
        if types is None or profile.get("segments_of") != self.digest:
            return self._rules.members(facts)
        return self._rules.members(facts, types, profile.get("segments", ()))


def _ranking(doc: Any) -> dict[str, float]:
    """A segment's ranking settings, checked."""
    if not isinstance(doc, dict):
        raise ValidationError("ranking", f"expected an object, got {doc!r}")
    out: dict[str, float] = {}
    for key, value in doc.items():
        if key not in TUNABLE:
            raise ValidationError(f"ranking.{key}", f"unknown setting; known: {', '.join(TUNABLE)}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValidationError(f"ranking.{key}", f"expected a number, got {value!r}")
        if not 0.0 <= value <= _MAX_RANKING or not math.isfinite(value):
            raise ValidationError(f"ranking.{key}", f"expected 0 to {_MAX_RANKING:g}")
        out[key] = float(value)
    return out


def rfm_values(profile: dict[str, Any], now_ms: int) -> tuple[float, float, float] | None:
    """(days since the last order, orders, spend) of a visitor who ordered, else None."""
    last = profile.get("last_order")
    if not profile.get("orders") or last is None or profile.get("alias_of"):
        return None
    return (max(now_ms - last, 0) / 86_400_000, float(profile["orders"]), float(profile["spend"]))


def profile_rows(partition_db: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(visitor, profile) of every profile in a partition's database."""
    it = partition_db.iter()
    it.seek_to_first()
    while it.valid():
        key: bytes = it.key()
        if not key.startswith(_NOT_PROFILES):
            value = it.value()
            if value:
                yield key.decode(), orjson.loads(value)
        it.next()

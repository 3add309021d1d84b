"""Ranking benchmark: the CPU cost of one visitor's list, in-process (no HTTP, no broker).

``.venv/bin/python bench/rank.py [--items 2000] [--visitors 1000] [--warm-events 10000]
[--lists 3000] [--repeat 3] [--encode] [--model] [--ranker-trees N] [--ranker-models K]
[--similar] [--dump FILE] [--json FILE]``

What the ranking thread does for each visitor whose profile changed, on the push
benchmark's scale by default, measured alone:

1. the serving benchmark's synthetic catalog (``--items``) in a `Catalog` view and a real
   `FaissIndex` (exact below 10,000 items, HNSW from there, as in the engine). The item
   vectors are **random** unit vectors clustered by category (a centre per category plus
   noise), because encoding 100,000 texts takes most of an hour on 2 cores; ``--encode``
   uses the real model (all-MiniLM-L6-v2 on the item texts, as the catalog agent embeds
   them), and ``--vectors FILE.npy`` keeps those vectors for the next run;
2. ``--visitors`` visitors with one product view each, then ``--warm-events`` views of
   uniformly random items by random visitors (the push benchmark's traffic), folded by the
   engine's own code (`profiles.apply_events`, `signals.SignalBatch`, `signals.LiveRows`)
   into profiles and signal rows stored in real RocksDB databases, one per partition
   (``--partitions``), read through the engine's `TableData`;
3. the measured phase: more events, each followed by its visitor's list, computed as
   ``agents/lists.py`` ``_compute_user`` does (stored profile, `Recommender.recommend`, the
   JSON the list is pushed as); the first ``--warm-lists`` fill the ranking caches as a
   running engine has them, the next ``--lists`` are timed. The signal rows are flushed every
   ``--flush-every`` events (5 s at 1,000 events/s), when the rows they change go stale.

With ``--similar`` the timed lists are "similar items" lists instead (`Recommender.similar` of
an item drawn as the serving benchmark draws them, by popularity), as ``agents/lists.py``
ranks one on its first request.

Time is simulated (1 ms per event) so that a run is deterministic: ``--dump FILE`` writes
every measured list (items, scores, reasons) to compare two versions of the code. The phase
runs ``--repeat`` times on fresh copies of the state; reported per repeat: lists/s and the
ms per list (mean, p50, p99, on the wall clock of this single thread, and CPU time per list);
the summary gives the median over repeats.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from rocksdict import Options, Rdict
from serve import make_catalog, percentile

from personify.agents.evaluation import History, train_model
from personify.agents.ranker import DEPTH, FEATURES, Ranker, fit_ranker
from personify.agents.recommend import Recommender, Request
from personify.embeddings import FaissIndex
from personify.embeddings.collab import AlsSettings
from personify.engine.app import one_blas_thread
from personify.engine.config import Config
from personify.tables import profiles, signals
from personify.tables.catalog import Catalog, item_text
from personify.tables.reader import TableData

Json = dict[str, Any]
T0_MS = 1_800_000_000_000
DIM = 384


def item_vectors(items: list[Json], args: argparse.Namespace) -> np.ndarray[Any, Any]:
    """One unit vector per item: random around its category's centre, or the model's."""
    if args.vectors and Path(args.vectors).exists():
        vecs = np.load(args.vectors)
        if vecs.shape[0] == len(items):
            return vecs
    if args.encode:
        from personify.embeddings import SentenceEncoder

        t = time.perf_counter()
        enc = SentenceEncoder.load()
        vecs = np.asarray(enc.encode([item_text(it) for it in items]), dtype=np.float32)
        print(f"[setup] encoded {len(items):,} items in {time.perf_counter() - t:.0f} s")
    else:
        rng = np.random.default_rng(args.seed)
        centres = {c: rng.normal(size=DIM) for c in sorted({it["category"] for it in items})}
        vecs = np.stack([centres[it["category"]] + 1.2 * rng.normal(size=DIM) for it in items])
        vecs = vecs.astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    if args.vectors:
        np.save(args.vectors, vecs)
    return vecs


class State:
    """Profiles and signal rows of every partition, folded by the engine's code."""

    def __init__(self, cfg: Config, catalog: Catalog, partitions: int, workdir: Path) -> None:
        self.cfg = cfg
        self.catalog = catalog
        self.partitions = partitions
        self.workdir = workdir
        self.dbs: dict[int, Any] = {}
        self.live = {p: signals.LiveRows(cfg.recommend) for p in range(partitions)}
        self.profiles: dict[str, profiles.Profile] = {}
        self.seq = 0
        #: Every view folded: (visitor, item, "product_view", time), for the learned model.
        self.rows: list[tuple[str, str, str, int]] = []
        self.open()

    def open(self) -> None:
        """Open the partitions' databases (in ``workdir``)."""
        for p in range(self.partitions):
            self.dbs[p] = Rdict(str(self.workdir / f"p{p}"), Options(raw_mode=True))

    def close(self) -> None:
        """Close the databases."""
        for db in self.dbs.values():
            db.close()
        self.dbs.clear()

    def partition(self, user: str) -> int:
        """The partition of a visitor (any stable hash does for this benchmark)."""
        return zlib.crc32(user.encode()) % self.partitions

    def view(self, user: str, item: str, ts: int) -> None:
        """Fold one product view, as the profile agent does (signals kept live until flush)."""
        self.seq += 1
        self.rows.append((user, item, "product_view", ts))
        event = {
            "event_id": f"e{self.seq}",
            "type": "product_view",
            "user_id": user,
            "item_id": item,
            "ts_ms": ts,
            "properties": {"category": self.catalog.category_of(item)},
        }
        p = self.partition(user)
        profile = self.profiles.get(user)
        if profile is None:
            profile = self.profiles[user] = profiles.new_profile(user)
        batch = signals.SignalBatch(self.cfg.recommend, self.cfg.profiles, self.catalog.category_of)
        profiles.apply_events(profile, [event], self.cfg.profiles, observe=batch.observe)
        live, db = self.live[p], self.dbs[p]
        missing = live.missing(batch.updates)
        for key in missing:
            live.load(key, db.get(key))
        live.apply(batch)
        db[user.encode()] = profiles.encode(profile)

    def flush(self) -> list[bytes]:
        """Write the changed signal rows (the profile agent does every 5 s); their keys."""
        keys = []
        for p, live in self.live.items():
            db = self.dbs[p]
            for key, value in live.take_dirty():
                db[key] = value
                keys.append(key)
        return keys

    def table(self) -> Any:
        """What `TableData` reads: a Faust table's store with one database per partition."""
        store = SimpleNamespace(_dbs=dict(self.dbs))
        return SimpleNamespace(_data=store, data=store)


def compute_user(rec: Recommender, data: TableData, user: str, size: int, now_ms: int) -> Json:
    """A visitor's list, as ``agents/lists.py`` ``_compute_user`` ranks and encodes it."""
    profile = data.profile_of(user)
    assert profile is not None
    alias = profile.get("alias_of")
    if alias is not None:
        profile = data.profile_of(alias) or profile
    _rec_id, items = rec.recommend(user, Request(k=size), now_ms, profile=profile)
    body = orjson.dumps([r.as_json() for r in items])
    # The scores unrounded too: two versions of the code must agree to the last bit.
    return {"user": user, "items": orjson.loads(body), "scores": [r.score for r in items]}


def compute_similar(rec: Recommender, item: str, size: int, now_ms: int) -> Json:
    """An item's "similar items" list, as ``agents/lists.py`` ``_rank_similar`` ranks it."""
    items = rec.similar(item, Request(k=size), now_ms)
    body = orjson.dumps([r.as_json() for r in items])
    return {"item": item, "items": orjson.loads(body), "scores": [r.score for r in items]}


def build(args: argparse.Namespace, cfg: Config, workdir: Path) -> tuple[State, FaissIndex]:
    t = time.perf_counter()
    synthetic = make_catalog(args.items)
    catalog = Catalog()
    for item in synthetic.items:
        catalog.put(item)
    vecs = item_vectors(synthetic.items, args)
    index = FaissIndex(DIM)
    ids = [it["item_id"] for it in synthetic.items]
    index.upsert(ids, vecs)
    print(f"[setup] {len(ids):,} items, {index.kind} index, in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    state = State(cfg, catalog, args.partitions, workdir)
    rng = random.Random(args.seed)
    users = [f"visitor-{n:05d}" for n in range(args.visitors)]
    now = T0_MS
    for user in users:
        state.view(user, rng.choice(ids), now)
    state.flush()
    for _n in range(args.warm_events):
        now += 1
        state.view(rng.choice(users), rng.choice(ids), now)
        if state.seq % args.flush_every == 0:
            state.flush()
    print(
        f"[setup] {args.visitors:,} visitors, {args.visitors + args.warm_events:,} events "
        f"folded in {time.perf_counter() - t:.1f} s"
    )
    return state, index


def synthetic_ranker(trees: int, seed: int, models: int = 1) -> Ranker:
    """A ranker of ``models`` models (the tuner learns 5) of ``trees`` full trees each.

    What it costs does not depend on what it learned. Trained on random candidates whose
    relevance follows a mix of their features, so that every tree splits as deep as the
    tuner's rankers may.
    """
    if models > 1:
        boosters = tuple(
            b for m in range(models) for b in synthetic_ranker(trees, seed + m).boosters
        )
        return Ranker(boosters)
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(400):
        x = rng.random((DEPTH, len(FEATURES))).astype(np.float32)
        y = np.floor(4 * (x[:, 0] * x[:, 6] + 0.5 * x[:, 8] + 0.2 * rng.random(DEPTH)) / 1.7)
        groups.append((x, y.astype(np.float32)))
    ranker = fit_ranker(groups, rounds=trees, seed=seed)
    assert ranker is not None and ranker.trees == trees
    return ranker


def measure(
    args: argparse.Namespace, cfg: Config, state: State, index: FaissIndex, dump: list[Json]
) -> Json:
    """Events and lists, one list after each event; only the lists are timed."""
    rng = random.Random(args.seed + 1)
    users = sorted(state.profiles)
    ids = state.catalog.ids()
    data = TableData(state.table(), cfg.recommend, track_writes=True)
    model = None
    if args.model:  # as the trainer trains it, on the views folded so far
        m = cfg.model
        model = train_model(
            History.of(state.rows, ids),
            AlsSettings(m.factors, m.regularization, m.alpha, m.iterations),
            cfg.profiles.engagement_weights,
        )
    rec = Recommender(
        cfg.recommend,
        data,
        state.catalog,
        index,
        cfg.profiles.affinity_half_life_s,
        lambda p: profiles.consents(p, "personalization", cfg.profiles),
        model,
        cfg.profiles.engagement_weights,
        ranker=synthetic_ranker(args.ranker_trees, args.seed, args.ranker_models)
        if args.ranker_trees
        else None,
    )
    # Items by popularity (Zipf 0.9), as the serving benchmark asks for their similar items.
    popular = list(range(len(ids)))
    rng.shuffle(popular)
    popular_cum = list(np.cumsum(1.0 / np.arange(1, len(ids) + 1) ** 0.9))
    now = T0_MS + args.warm_events + 1_000
    wall: list[float] = []
    cpu: list[float] = []
    for n in range(args.warm_lists + args.lists):
        now += 1
        user = rng.choice(users)
        state.view(user, rng.choice(ids), now)
        if state.seq % args.flush_every == 0:
            data.written(state.flush())
        t, c = time.perf_counter(), time.thread_time()
        if args.similar:
            item = ids[popular[rng.choices(range(len(popular)), cum_weights=popular_cum)[0]]]
            out = compute_similar(rec, item, cfg.recommend.list_size, now)
        else:
            out = compute_user(rec, data, user, cfg.recommend.list_size, now)
        if n >= args.warm_lists:
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
        dump.append(out)
    ms = sorted(w * 1000 for w in wall)
    return {
        "lists": len(wall),
        "lists_per_s": len(wall) / sum(wall),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": percentile(ms, 0.50),
        "p99_ms": percentile(ms, 0.99),
        "cpu_ms": 1000 * sum(cpu) / len(cpu),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000, help="catalog size (default 2,000)")
    ap.add_argument("--visitors", type=int, default=1000, help="visitors (default 1,000)")
    ap.add_argument("--warm-events", type=int, default=10_000, help="events before measuring")
    ap.add_argument("--warm-lists", type=int, default=2000, help="lists before timing")
    ap.add_argument("--lists", type=int, default=5000, help="lists timed per repeat")
    ap.add_argument("--repeat", type=int, default=3, help="measured phases (default 3)")
    ap.add_argument("--flush-every", type=int, default=5000, help="events between flushes")
    ap.add_argument("--partitions", type=int, default=4, help="partitions held (default 4)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--encode", action="store_true", help="real MiniLM vectors, not random")
    ap.add_argument(
        "--model",
        action="store_true",
        help="rank with the learned model (ALS, trained on the warm-up views as the engine's "
        "trainer trains it): the collab and popular sources on",
    )
    ap.add_argument(
        "--ranker-trees",
        type=int,
        default=0,
        help="re-order each list with a learned ranker of this many trees, as the tuning "
        "learns one (0: none, the default; the tuner's rankers stop at 400)",
    )
    ap.add_argument(
        "--ranker-models",
        type=int,
        default=1,
        help="the ranker's models, each of --ranker-trees trees (the tuner learns 5)",
    )
    ap.add_argument(
        "--similar", action="store_true", help='time "similar items" lists, not visitors\' lists'
    )
    ap.add_argument("--vectors", help=".npy file to keep the item vectors in between runs")
    ap.add_argument("--dump", help="write the lists of the first repeat here (JSON lines)")
    ap.add_argument("--json", help="write the figures here")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    one_blas_thread()  # as the engine ranks
    cfg = Config()
    root = Path(tempfile.mkdtemp(prefix="personify-rank-"))
    try:
        state, index = build(args, cfg, root / "base")
        state.close()
        runs = []
        for r in range(args.repeat):
            # Each repeat starts from the same state: a copy of the databases and profiles.
            shutil.copytree(root / "base", root / f"run{r}")
            run_state = copy.copy(state)
            run_state.workdir = root / f"run{r}"
            run_state.dbs = {}
            run_state.live = copy.deepcopy(state.live)
            run_state.profiles = copy.deepcopy(state.profiles)
            run_state.open()
            dump: list[Json] = []
            res = measure(args, cfg, run_state, index, dump)
            run_state.close()
            shutil.rmtree(root / f"run{r}")
            runs.append(res)
            print(
                f"[rank] repeat {r + 1}: {res['lists_per_s']:,.0f} lists/s | ms/list mean "
                f"{res['mean_ms']:.3f} p50 {res['p50_ms']:.3f} p99 {res['p99_ms']:.3f} | "
                f"CPU {res['cpu_ms']:.3f} ms/list",
                flush=True,
            )
            if r == 0 and args.dump:
                with open(args.dump, "wb") as fh:
                    for line in dump:
                        fh.write(orjson.dumps(line) + b"\n")
        summary = {
            key: statistics.median(run[key] for run in runs)
            for key in ("lists_per_s", "mean_ms", "p50_ms", "p99_ms", "cpu_ms")
        }
        print(
            f"\nmedian of {len(runs)}: {summary['lists_per_s']:,.0f} lists/s, "
            f"{summary['mean_ms']:.3f} ms/list (p50 {summary['p50_ms']:.3f}, "
            f"p99 {summary['p99_ms']:.3f}), CPU {summary['cpu_ms']:.3f} ms/list "
            f"[{args.items:,} items, {index.kind}; {args.visitors:,} visitors; "
            f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}]"
        )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"args": vars(args), "runs": runs, "median": summary}, indent=1)
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

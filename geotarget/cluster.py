"""ShardedIndex: the same exact answers as :class:`SpatialIndex`, from index shards on Ray.

Why and how
-----------
One machine is meant to serve 400 M devices (docs/design.md, Targets), but a national
platform also wants its index on several hosts: to survive the loss of one,
and to add memory and cores for many simultaneous alerts.  This module splits one store
generation into K spatial partitions, serves each from a Ray actor, and fans
every query out to the shards whose region can touch the circle.

* **Same keys.**  A device's key is its row in the *full* store, and audiences,
  recipient logs and closures are sets of those keys.  Each shard is built from
  a sub-store of its rows, taken in ascending row order, and keeps
  ``global_keys.npy`` (shard-local key -> global key, uint32, ascending).  The
  sub-store holds the very same float64 coordinates, so each shard decides
  every device exactly as the single index does, and the union of the shards'
  answers *is* the single index's answer, key for key.

* **Partitions.**  The top levels of a KD split: recursive median splits of
  the float64 unit vectors along the widest axis, so every shard holds
  ``n / K`` devices (within one) and a compact region.  K need not be a power
  of two (a split of k shards cuts at the ``floor(k/2) / k`` quantile).

* **Pruning.**  Each shard records the bounding box of its unit vectors in
  float64, padded by :data:`BOX_PAD`.  A circle of radius r is the ball of
  chord ``T = 2 sin(r / 2R)`` around the centre's unit vector (as in the
  index, see ``index.CHORD_GUARD``), so a shard is asked only if the box's nearest
  point lies within ``T + CHORD_GUARD``.  The guard (13 m) dwarfs every
  rounding error in this float64 test, so no shard holding a device of the
  answer is ever skipped.

* **Serving.**  One actor per shard memory-maps its directory
  (:meth:`SpatialIndex.open`): a restarted actor re-opens the files and
  rebuilds nothing, so a restart costs a Ray worker start, not a build.  An actor answers with a uint32
  NumPy array of *global* keys, copied run by run (``memcpy``) from
  ``leaf_global_keys.npy``, the global key of each row in the shard's leaf
  order: the shard's query costs what the single index's ``fill`` costs, with
  no gather through ``global_keys``.  Ray puts arrays over 100 KB in the node's
  shared-memory object store and the driver maps them without a copy.  The
  driver concatenates the parts (one copy, so that a kept audience does not
  pin object-store memory) into one audience over the full store (kept
  memory-mapped from ``directory/full``), so ``keys()``, ``device_ids()`` and
  ``by_app()`` work as for any audience.

* **Faults.**  Actors restart without limit (``max_restarts=-1``) and a call
  in flight when its actor dies is retried on the restarted actor
  (``max_task_retries``).  Every wait has a deadline: a shard that does not
  answer in ``timeout`` seconds, or whose actor is gone for good, raises
  :class:`ShardUnavailableError`.  A query never hangs and never returns a
  partial audience.

* **Validation** happens in the driver, before any remote call; a bad
  argument never reaches an actor.

On disk (``directory``)::

    shards.json          manifest: format, generation, n, leaf size, per-shard n and box
    full/store.arrow     the full store generation (audiences resolve keys here)
    shard-000/               a SpatialIndex directory of the shard's sub-store, plus
        global_keys.npy      uint32 (n_shard,) shard key -> global key
        leaf_global_keys.npy uint32 (n_shard,) global key of each leaf-ordered row

Ray is an optional extra (``pip install geotarget[ray]``); nothing else in
geotarget imports this module.  For a multi-host cluster ``directory`` must be
on a filesystem every host sees at the same path.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as _exc:  # pragma: no cover - exercised only without Ray
    raise ImportError("geotarget.cluster needs Ray: pip install 'geotarget[ray]'") from _exc

from .audience import Audience, gather_runs
from .errors import CorruptFileError, InvalidInputError, ShardUnavailableError
from .geo import check_aware, check_int, check_point, check_radius, unit_vectors, EARTH_RADIUS_KM
from .index import CHORD_GUARD, DEFAULT_LEAF_SIZE, SpatialIndex, changed_within, check_polygon
from .progress import bar
from ._fs import fsync_dir as _fsync_dir
from ._fs import load_json
from ._fs import save_npy as _save_npy
from .store import DeviceStore

MANIFEST = "shards.json"
FULL_DIR = "full"
GLOBAL_KEYS = "global_keys.npy"
LEAF_KEYS = "leaf_global_keys.npy"
FORMAT = "geotarget.sharded"
FORMAT_VERSION = 1
#: Padding of a shard's float64 box, unit-sphere units (~6 mm): covers the
#: rounding of the box itself; the query side adds the index's 13 m guard.
BOX_PAD = 1e-9
#: Seconds a query waits for its shards before giving up.
DEFAULT_TIMEOUT = 30.0
#: Seconds to wait for fresh actors (a new Ray worker imports NumPy, pyarrow
#: and geotarget: a few seconds on a loaded 2-core host).
DEFAULT_START_TIMEOUT = 120.0
#: Retries of a call whose actor died while it was in flight.
DEFAULT_TASK_RETRIES = 3
#: Object store of a Ray that this module starts itself: query results are
#: short-lived (a 90 M-device audience is 360 MB), so keep it modest.
DEFAULT_OBJECT_STORE = 512 * 2**20
MAX_SHARDS = 1024


# ---------------------------------------------------------------------------
# partitioning and pruning (NumPy, driver side)
# ---------------------------------------------------------------------------

def kd_partition(xyz: np.ndarray, shards: int) -> list[np.ndarray]:
    """Rows of ``xyz`` (float64 unit vectors) in ``shards`` balanced spatial parts.

    Recursive median splits along the widest axis; each part is returned
    sorted ascending (int64).  Part sizes differ by at most one per level.
    """
    parts: list[np.ndarray] = []

    def split(rows: np.ndarray, k: int) -> None:
        if k == 1 or rows.shape[0] == 0:
            parts.extend([rows] + [rows[:0]] * (k - 1))
            return
        pts = xyz[rows]
        axis = int(np.argmax(pts.max(axis=0) - pts.min(axis=0)))
        cut = rows.shape[0] * (k // 2) // k
        if 0 < cut < rows.shape[0]:
            rows = rows[np.argpartition(pts[:, axis], cut)]
        del pts
        split(rows[:cut], k // 2)
        split(rows[cut:], k - k // 2)

    split(np.arange(xyz.shape[0], dtype=np.int64), int(shards))
    return [np.sort(p) for p in parts]


def chord_threshold(radius_km: float) -> float:
    """Chord (unit sphere) beyond which no device can be within ``radius_km``; inf for all."""
    half = radius_km / (2.0 * EARTH_RADIUS_KM)
    if half >= math.pi / 2:
        return math.inf
    return 2.0 * math.sin(half) + CHORD_GUARD


def boxes_touching(lo: np.ndarray, hi: np.ndarray, lat: float, lon: float, radius_km: float) -> np.ndarray:
    """Indices of boxes ``[lo, hi]`` (``(k, 3)`` float64) the circle can reach.

    In numpy, with ``c`` the centre's unit vector: boxes whose nearest point
    to ``c`` is within ``2 sin(r / 2R) + CHORD_GUARD``.  Empty boxes (NaN)
    are never returned.
    """
    t = chord_threshold(radius_km)
    ok = ~np.isnan(lo[:, 0])
    if math.isinf(t):
        return np.flatnonzero(ok)
    c = unit_vectors(lat, lon)
    gap = np.maximum(lo - c, 0.0) + np.maximum(c - hi, 0.0)
    with np.errstate(invalid="ignore"):
        near = (gap * gap).sum(axis=1) <= t * t
    return np.flatnonzero(ok & near)


# ---------------------------------------------------------------------------
# the actor (one per shard)
# ---------------------------------------------------------------------------

class _KeyArray:
    """An array of keys posing as an index to :class:`Audience` (``keys``, ``store``).

    An audience made of one run ``[0, n)`` over it copies the array with
    ``memcpy`` in ``fill`` and sorts it in ``keys()``, exactly as for an
    audience straight from a :class:`SpatialIndex`.
    """

    __slots__ = ("keys", "store")
    keys_are_rows = False   # the keys are the array's contents, not its positions

    def __init__(self, keys: np.ndarray, store):
        self.keys = keys
        self.store = store


def _key_audience(keys: np.ndarray, store) -> Audience:
    runs = np.array([[0, keys.shape[0]]] if keys.shape[0] else np.empty((0, 2)), dtype=np.int64)
    return Audience(index=_KeyArray(keys, store), runs=runs, count=keys.shape[0])


class ShardServer:
    """Serves one shard directory.  Plain Python: Ray wraps it as an actor.

    It checks on (re)start that the files on disk are the shard it was made
    for (generation, size), so a restarted actor never serves another
    generation that was written over the directory.
    """

    def __init__(self, path: str, shard: int, generation: int, n: int, n_total: int):
        self.path = path
        self.shard = int(shard)
        self.index = SpatialIndex.open(path)
        if self.index.generation != generation or len(self.index) != n:
            raise CorruptFileError(
                f"{path}: shard {shard} should be generation {generation} with {n} devices, "
                f"found generation {self.index.generation} with {len(self.index)}")
        self.global_keys = self._keys(Path(path) / GLOBAL_KEYS, n, n_total)
        self.leaf_keys = self._keys(Path(path) / LEAF_KEYS, n, n_total)
        self.served = 0

    @staticmethod
    def _keys(f: Path, n: int, n_total: int) -> np.ndarray:
        try:
            k = np.load(f, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise CorruptFileError(f"{f}: {exc}") from None
        # A full range check (one read of n_shard * 4 bytes, which also warms
        # the pages): a key out of range would send the driver's gathers astray.
        if k.dtype != np.uint32 or k.shape != (n,) or not k.flags.c_contiguous or (
                n and int(k.max()) >= n_total):
            raise CorruptFileError(f"{f}: expected {n} uint32 keys below {n_total}, found {k.dtype} {k.shape}")
        return k.view(np.ndarray)

    def info(self) -> dict:
        return {"shard": self.shard, "pid": os.getpid(), "n": len(self.index),
                "generation": self.index.generation, "served": self.served, "path": self.path}

    def within(self, lat, lon, radius_km, seen_since, apps) -> np.ndarray:
        """Global keys (uint32, in the shard's index order) of the shard's devices in the circle."""
        self.served += 1
        aud = self.index.within(lat, lon, radius_km, seen_since=seen_since, apps=apps)
        return gather_runs(self.leaf_keys, aud.runs)

    def count(self, lat, lon, radius_km, seen_since, apps) -> int:
        self.served += 1
        return self.index.count(lat, lon, radius_km, seen_since=seen_since, apps=apps)

    def within_polygon(self, polygon, seen_since, apps) -> np.ndarray:
        """Global keys (uint32, in the shard's index order) of the shard's devices inside ``polygon``."""
        self.served += 1
        aud = self.index.within_polygon(polygon, seen_since=seen_since, apps=apps)
        return gather_runs(self.leaf_keys, aud.runs)


# ---------------------------------------------------------------------------
# Ray plumbing
# ---------------------------------------------------------------------------

def _connect(address, ray_init: dict | None) -> bool:
    """Make sure this process is connected to Ray; True if we started it here."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address == "local":
        kwargs.update(num_cpus=os.cpu_count() or 1, object_store_memory=DEFAULT_OBJECT_STORE)
    kwargs.update(ray_init or {})
    ray.init(address=address, **kwargs)
    return True


def _start_actors(paths, meta, n_total, cpus, retries):
    cls = ray.remote(ShardServer)
    actors = []
    for i, (p, m) in enumerate(zip(paths, meta)):
        if p is None:
            actors.append(None)
            continue
        actors.append(cls.options(num_cpus=cpus, max_restarts=-1, max_task_retries=retries,
                                  scheduling_strategy="SPREAD")
                      .remote(str(p), i, m["generation"], m["n"], n_total))
    return actors


def _check_positive(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise InvalidInputError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------
# the sharded index
# ---------------------------------------------------------------------------

class ShardedIndex:
    """An index over K Ray actors that answers exactly like :class:`SpatialIndex`.

    It offers what :class:`~geotarget.engine.AlertEngine` needs of an index
    (``store``, ``within``, ``count``, ``generation``), so the engine runs on
    it unchanged; the engine's ``refresh`` queries from a thread pool and each
    query fans out to its shards at once.  Use it as a context manager, or
    call :meth:`close`, to stop the actors (and Ray, if it started Ray).
    """

    def __init__(self, store: DeviceStore, directory: Path, manifest: dict, *, address=None, **options):
        opts = self._options(**options)
        self.timeout = opts["timeout"]
        start_timeout, actor_cpus, task_retries = opts["start_timeout"], opts["actor_cpus"], opts["task_retries"]
        ray_init = opts["ray_init"]
        self.store = store
        self.directory = directory
        self.manifest = manifest
        shards = manifest["shards"]
        self.shard_sizes = np.array([s["n"] for s in shards], dtype=np.int64)
        nan3 = [math.nan] * 3
        self.lo = np.array([s["lo"] if s["lo"] is not None else nan3 for s in shards], dtype=np.float64)
        self.hi = np.array([s["hi"] if s["hi"] is not None else nan3 for s in shards], dtype=np.float64)
        self._closed = False
        self._actors: list = []
        self._started_ray = _connect(address, ray_init)
        try:
            live = int((self.shard_sizes > 0).sum())
            if actor_cpus is None:
                # Leave room for the next generation's actors, which start
                # while this one still serves (engine.refresh).
                total = float(ray.cluster_resources().get("CPU", 1.0))
                actor_cpus = min(0.5, total / max(1, 2 * live))
            self.actor_cpus = actor_cpus
            paths = [directory / s["path"] if s["n"] else None for s in shards]
            meta = [{"generation": manifest["generation"], "n": s["n"]} for s in shards]
            self._actors = _start_actors(paths, meta, manifest["n"], actor_cpus, task_retries)
            try:
                self._infos = self._gather([(i, a.info.remote()) for i, a in enumerate(self._actors)
                                            if a is not None], start_timeout, "start")
            except ShardUnavailableError as exc:
                raise ShardUnavailableError(
                    f"{exc} (each actor asks for {actor_cpus:g} CPU; the cluster has "
                    f"{ray.available_resources().get('CPU', 0):g} of "
                    f"{ray.cluster_resources().get('CPU', 0):g} free; see actor_cpus=)") from exc
        except BaseException:
            self.close()
            raise

    @property
    def timeout(self) -> float:
        """Seconds a query waits for its shards before :class:`ShardUnavailableError`."""
        return self._timeout

    @timeout.setter
    def timeout(self, value) -> None:
        self._timeout = _check_positive(value, "timeout")

    # -- construction -------------------------------------------------------

    @staticmethod
    def _options(timeout=DEFAULT_TIMEOUT, start_timeout=DEFAULT_START_TIMEOUT, actor_cpus=None,
                 task_retries=DEFAULT_TASK_RETRIES, ray_init=None) -> dict:
        """Checked serving options (before any file is written or any actor started)."""
        task_retries = check_int(task_retries, "task_retries", 0)
        if ray_init is not None and not isinstance(ray_init, dict):
            raise InvalidInputError(f"ray_init must be a dict of ray.init arguments, got {ray_init!r}")
        return {"timeout": _check_positive(timeout, "timeout"),
                "start_timeout": _check_positive(start_timeout, "start_timeout"),
                "actor_cpus": None if actor_cpus is None else _check_positive(actor_cpus, "actor_cpus"),
                "task_retries": int(task_retries), "ray_init": ray_init}

    @classmethod
    def build(cls, store: DeviceStore, *, shards: int = 4, directory, address=None,
              leaf_size: int = DEFAULT_LEAF_SIZE, progress=None, **options) -> "ShardedIndex":
        """Partition ``store`` into ``shards``, save them under ``directory``, start the actors.

        ``address`` is passed to ``ray.init`` unless this process is already
        connected (``"local"`` starts a private local Ray).  ``options``:
        ``timeout`` (per query, s), ``start_timeout``, ``actor_cpus``,
        ``task_retries``, ``ray_init`` (extra ``ray.init`` arguments).
        """
        if not isinstance(store, DeviceStore):
            raise InvalidInputError(f"store must be a DeviceStore, got {type(store).__name__}")
        check_int(shards, "shards", 1, MAX_SHARDS)
        check_int(leaf_size, "leaf_size", 1, 4096)
        cls._options(**options)
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        n = len(store)
        with bar(int(shards) + 2, "shard index", unit="step", enabled=progress) as pb:
            parts = kd_partition(unit_vectors(store.lat, store.lon), int(shards))
            pb.update(1)
            entries = []
            for i, rows in enumerate(parts):
                entries.append(cls._build_shard(store, rows, d / f"shard-{i:03d}", int(leaf_size)))
                pb.update(1)
            full = d / FULL_DIR
            if store.path is None or Path(store.path).resolve() != full.resolve():
                store.save(full)
            pb.update(1)
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "generation": store.generation, "n": n,
                    "leaf_size": int(leaf_size), "full": FULL_DIR, "shards": entries}
        _write_json(d / MANIFEST, manifest)
        return cls(store, d, manifest, address=address, **options)

    @staticmethod
    def _build_shard(store: DeviceStore, rows: np.ndarray, path: Path, leaf_size: int) -> dict:
        # Ascending rows: shard key order = global key order, and the sub-store
        # carries the very float64 coordinates the full index tests.
        sub = DeviceStore(store.device_id[rows], store.lat[rows], store.lon[rows], store.app_codes[rows],
                          store.app_names, store.last_seen_s[rows], generation=store.generation)
        entry = {"path": path.name, "n": int(rows.shape[0]), "lo": None, "hi": None}
        if rows.shape[0] == 0:
            return entry
        index = SpatialIndex.build(sub, leaf_size=leaf_size)
        index.save(path)
        global_keys = rows.astype(np.uint32)
        for name, arr in ((GLOBAL_KEYS, global_keys), (LEAF_KEYS, global_keys[index.keys])):
            _save_npy(path / name, arr)
        del index
        _fsync_dir(path)
        xyz = unit_vectors(sub.lat, sub.lon)
        entry["lo"] = (xyz.min(axis=0) - BOX_PAD).tolist()
        entry["hi"] = (xyz.max(axis=0) + BOX_PAD).tolist()
        return entry

    @classmethod
    def open(cls, directory, *, address=None, **options) -> "ShardedIndex":
        """Start actors over shards saved by :meth:`build` (memory-mapped; nothing is rebuilt)."""
        cls._options(**options)
        d = Path(directory)
        manifest = load_json(d / MANIFEST, "a sharded geotarget index")
        cls._check_manifest(d, manifest)
        store = DeviceStore.open(d / manifest["full"])
        if len(store) != manifest["n"] or store.generation != manifest["generation"]:
            raise CorruptFileError(
                f"{d}: manifest is for {manifest['n']} devices of generation {manifest['generation']}, "
                f"the full store has {len(store)} of generation {store.generation}")
        return cls(store, d, manifest, address=address, **options)

    @staticmethod
    def _check_manifest(d: Path, m) -> None:
        where = d / MANIFEST
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
            raise CorruptFileError(f"{where}: not a geotarget shard manifest (format/version)")
        for key in ("generation", "n"):
            if not isinstance(m.get(key), int) or m[key] < 0:
                raise CorruptFileError(f"{where}: bad {key} {m.get(key)!r}")
        if not isinstance(m.get("full"), str) or not isinstance(m.get("shards"), list) or not m["shards"]:
            raise CorruptFileError(f"{where}: missing 'full' or 'shards'")
        total = 0
        for i, s in enumerate(m["shards"]):
            ok = (isinstance(s, dict) and isinstance(s.get("path"), str) and "/" not in s["path"]
                  and isinstance(s.get("n"), int) and s["n"] >= 0)
            if ok and s["n"]:
                ok = all(isinstance(s.get(b), list) and len(s[b]) == 3
                         and all(isinstance(v, (int, float)) and math.isfinite(v) for v in s[b])
                         for b in ("lo", "hi"))
            if not ok:
                raise CorruptFileError(f"{where}: shard {i} entry is malformed: {s!r}")
            total += s["n"]
        if total != m["n"]:
            raise CorruptFileError(f"{where}: shards hold {total} devices, manifest says {m['n']}")

    # -- queries ------------------------------------------------------------

    def _args(self, lat, lon, radius_km, seen_since, apps):
        """The checks of :meth:`SpatialIndex.within`, done here once, before any remote call."""
        if self._closed:
            raise ShardUnavailableError("this ShardedIndex is closed")
        clat, clon = check_point(lat, lon)
        r = check_radius(radius_km)
        if seen_since is not None:
            seen_since = check_aware(seen_since, "seen_since")
        if apps is not None:
            names = [apps] if isinstance(apps, str) else list(apps)
            for a in names:
                self.store.app_code(a)
            apps = names
        return clat, clon, r, seen_since, apps

    def shards_for(self, lat, lon, radius_km) -> np.ndarray:
        """Shards whose region can reach the circle (the ones a query asks)."""
        clat, clon = check_point(lat, lon)
        return boxes_touching(self.lo, self.hi, clat, clon, check_radius(radius_km))

    def _fanout(self, method: str, args) -> list:
        targets = boxes_touching(self.lo, self.hi, args[0], args[1], args[2])
        calls = [(int(i), getattr(self._actors[i], method).remote(*args)) for i in targets]
        return self._gather(calls, self.timeout, method)

    def _gather(self, calls, timeout: float, what: str) -> list:
        """Results of ``[(shard, ref)]`` in order, or ShardUnavailableError; never blocks past ``timeout``."""
        if not calls:
            return []
        refs = [ref for _, ref in calls]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=True)
        if pending:
            late = [s for s, ref in calls if ref in set(pending)]
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort; the error below is what matters
                    pass
            raise ShardUnavailableError(
                f"{what}: shard(s) {late} of {self.directory} did not answer within {timeout:g} s")
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError:
            raise ShardUnavailableError(
                f"{what}: shards of {self.directory} did not deliver within {timeout:g} s") from None
        except RayActorError as exc:
            raise ShardUnavailableError(f"{what}: a shard actor of {self.directory} is gone: {exc}") from exc

    def changed_within(self, circles, notified) -> list:
        """Per circle, the devices this generation changed inside it, minus ``notified``.

        The changed devices are few and held by the driver's store, so this
        runs here, like ``SpatialIndex.changed_within``, without the shards.
        """
        return changed_within(self, circles, notified)

    def within(self, lat, lon, radius_km, seen_since=None, apps=None) -> Audience:
        """Devices within ``radius_km`` of (lat, lon): the :meth:`SpatialIndex.within` answer.

        Keys are rows of the full store; the audience resolves ids and apps there.
        """
        args = self._args(lat, lon, radius_km, seen_since, apps)
        parts = self._fanout("within", args)
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
        del parts  # releases the object-store buffers
        return _key_audience(keys, self.store)

    def count(self, lat, lon, radius_km, seen_since=None, apps=None) -> int:
        """``len(self.within(...))``: a sum of shard counts, no keys travel."""
        args = self._args(lat, lon, radius_km, seen_since, apps)
        return int(sum(self._fanout("count", args)))

    def within_polygon(self, polygon_or_division, seen_since=None, apps=None) -> Audience:
        """Devices inside a polygon or a Division: the :meth:`SpatialIndex.within_polygon` answer.

        Every shard with devices answers for its own (a shard's subtree boxes prune inside it).
        """
        geom = check_polygon(polygon_or_division)
        _, _, _, seen_since, apps = self._args(0.0, 0.0, 0.0, seen_since, apps)
        targets = np.flatnonzero(~np.isnan(self.lo[:, 0]))
        calls = [(int(i), self._actors[i].within_polygon.remote(geom, seen_since, apps)) for i in targets]
        parts = self._gather(calls, self.timeout, "within_polygon")
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
        del parts
        return _key_audience(keys, self.store)

    # -- facts --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.store)

    @property
    def generation(self) -> int:
        return self.store.generation

    @property
    def shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def actors(self) -> list:
        """The actor handle of each shard (None for an empty shard)."""
        return list(self._actors)

    def info(self) -> list[dict]:
        """Each live actor's ``{shard, pid, n, generation, served, path}``."""
        return self._gather([(i, a.info.remote()) for i, a in enumerate(self._actors) if a is not None],
                            self.timeout, "info")

    def __repr__(self):
        state = "closed" if self._closed else f"{self.shards} shards"
        return f"ShardedIndex(n={len(self):,}, generation={self.generation}, {state}, {str(self.directory)!r})"

    # -- life ---------------------------------------------------------------

    def close(self) -> None:
        """Kill this index's actors, and shut Ray down if this index started it."""
        if self._closed:
            return
        self._closed = True
        for a in self._actors:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead or Ray already down
                    pass
        self._actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "ShardedIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

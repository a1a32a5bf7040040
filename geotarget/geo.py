"""Distance reference and input validation at the public boundary.

:func:`haversine_km` is the contract (docs/design.md, Distance): every compiled kernel must
agree with it.  The validators here are the *only* place public inputs are
checked; kernels below them assume clean, contiguous arrays.
"""
from __future__ import annotations

import datetime as _dt
import math
import numbers

import numpy as np

from .errors import InvalidInputError

#: Mean Earth radius (IUGG), km.
EARTH_RADIUS_KM = 6371.0088
#: Half the Earth's circumference: no two points are farther apart.
HALF_CIRCUMFERENCE_KM = math.pi * EARTH_RADIUS_KM
_DEG2RAD = 0.017453292519943295


def _real_array(value, name: str) -> np.ndarray:
    """float64 from real numbers or arrays of them; NumPy would also parse strings."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be real numbers: {exc}") from None
    if arr.dtype.kind not in "iuf":
        raise InvalidInputError(f"{name} must be real numbers, got {type(value).__name__} of dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km by the haversine formula, vectorised, float64.

    This is the reference every kernel is tested against.  Inputs broadcast
    like NumPy arrays; the result is a float64 array (or scalar).
    """
    lat1 = _real_array(lat1, "lat1")
    lon1 = _real_array(lon1, "lon1")
    lat2 = _real_array(lat2, "lat2")
    lon2 = _real_array(lon2, "lon2")
    p1 = lat1 * _DEG2RAD
    p2 = lat2 * _DEG2RAD
    dphi = (lat2 - lat1) * _DEG2RAD
    dlmb = (lon2 - lon1) * _DEG2RAD
    s1 = np.sin(dphi * 0.5)
    s2 = np.sin(dlmb * 0.5)
    a = s1 * s1 + np.cos(p1) * np.cos(p2) * s2 * s2
    a = np.minimum(a, 1.0)
    return 2.0 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(a))


def unit_vectors(lat, lon):
    """float64 unit vectors (n, 3) for latitude/longitude in degrees (NumPy reference)."""
    phi = np.asarray(lat, dtype=np.float64) * _DEG2RAD
    lam = np.asarray(lon, dtype=np.float64) * _DEG2RAD
    cp = np.cos(phi)
    return np.stack([cp * np.cos(lam), cp * np.sin(lam), np.sin(phi)], axis=-1)


# ---------------------------------------------------------------------------
# validation helpers (public boundary only)
# ---------------------------------------------------------------------------

def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_coordinates(lat, lon, *, lat_name="lat", lon_name="lon"):
    """Return (lat, lon) as contiguous float64 arrays, or raise naming the first bad row."""
    try:
        lat = np.ascontiguousarray(lat, dtype=np.float64)
        lon = np.ascontiguousarray(lon, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{lat_name}/{lon_name} must be numeric arrays: {exc}") from None
    if lat.ndim != 1 or lon.ndim != 1:
        raise InvalidInputError(
            f"{lat_name} and {lon_name} must be 1-D, got shapes {lat.shape} and {lon.shape}")
    if lat.shape != lon.shape:
        raise InvalidInputError(
            f"{lat_name} has {lat.shape[0]} rows but {lon_name} has {lon.shape[0]}")
    for name, arr, bound in ((lat_name, lat, 90.0), (lon_name, lon, 180.0)):
        bad = ~np.isfinite(arr)
        if bad.any():
            i = _first_bad(bad)
            raise InvalidInputError(
                f"{name}[{i}] = {arr[i]!r}: coordinates must be finite (check for NaN or inf)")
        bad = np.abs(arr) > bound
        if bad.any():
            i = _first_bad(bad)
            raise InvalidInputError(f"{name}[{i}] = {arr[i]!r} is outside [-{bound:g}, {bound:g}]")
    return lat, lon


def _is_real(value) -> bool:
    """A real number: not a string, bool or complex, which float() would quietly accept or coerce."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_point(lat, lon):
    """Validate one centre; return it as two Python floats."""
    if not (_is_real(lat) and _is_real(lon)):
        raise InvalidInputError(f"centre must be numeric (real numbers), got lat={lat!r} ({type(lat).__name__}), "
                                f"lon={lon!r} ({type(lon).__name__})")
    try:
        flat, flon = float(lat), float(lon)
    except (TypeError, ValueError):
        raise InvalidInputError(f"centre must be numeric, got lat={lat!r}, lon={lon!r}") from None
    if not (math.isfinite(flat) and math.isfinite(flon)):
        raise InvalidInputError(f"centre must be finite, got lat={flat!r}, lon={flon!r}")
    if abs(flat) > 90.0:
        raise InvalidInputError(f"lat={flat!r} is outside [-90, 90]")
    if abs(flon) > 180.0:
        raise InvalidInputError(f"lon={flon!r} is outside [-180, 180]")
    return flat, flon


def check_radius(radius_km, name="radius_km"):
    if not _is_real(radius_km):
        raise InvalidInputError(f"{name} must be a number (a real one), got {radius_km!r} "
                                f"({type(radius_km).__name__})")
    try:
        r = float(radius_km)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name} must be a number, got {radius_km!r}") from None
    if not math.isfinite(r):
        raise InvalidInputError(f"{name} must be finite, got {r!r}")
    if r < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {r!r}")
    return r


def check_aware(when, name="time"):
    """A timezone-aware datetime, converted to UTC; naive datetimes are refused."""
    if not isinstance(when, _dt.datetime):
        raise InvalidInputError(f"{name} must be a datetime, got {type(when).__name__}")
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        raise InvalidInputError(f"{name}={when.isoformat()} is naive; pass a timezone-aware datetime")
    return when.astimezone(_dt.timezone.utc)


def now_or_clock(now=None, name="now"):
    """``now`` checked (aware, in UTC), or the system clock's UTC time when ``now`` is None."""
    return check_aware(now, name) if now is not None else _dt.datetime.now(_dt.timezone.utc)


def check_int(value, name, minimum=0, maximum=None):
    """``value`` as a Python int if it is an integer (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InvalidInputError(f"{name} must be a whole number, got {value!r}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidInputError(f"{name} must be a whole number {bounds}, got {value!r}")
    return v


def iso_utc(when, timespec="auto"):
    """ISO 8601 text of an aware datetime in UTC (``+00:00``); None stays None."""
    return None if when is None else when.astimezone(_dt.timezone.utc).isoformat(timespec=timespec)


def epoch_seconds(when: _dt.datetime) -> int:
    """Whole seconds since 1970-01-01 UTC of an aware datetime (floor)."""
    return math.floor(when.timestamp())

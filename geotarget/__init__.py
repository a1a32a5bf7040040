"""geotarget: exact, fast geospatial targeting for missing-child emergency alerts.

This module only re-exports; each name lives in the module that owns it.
"""
from .audience import Audience
from .errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError,
                     UnauthorizedError, UnknownAlertError, UnknownOfficerError, UnknownPushError)
from .geo import EARTH_RADIUS_KM, HALF_CIRCUMFERENCE_KM, haversine_km
from .index import SpatialIndex
from .store import DeviceStore

__version__ = "0.1.0"

__all__ = [
    "Audience", "DeviceStore", "SpatialIndex", "haversine_km",
    "EARTH_RADIUS_KM", "HALF_CIRCUMFERENCE_KM",
    "GeotargetError", "InvalidInputError", "CorruptFileError", "UnknownAlertError",
    "UnknownOfficerError", "UnknownPushError", "UnauthorizedError", "AlertStateError",
]

"""geotarget: exact, fast geospatial targeting for missing-child emergency alerts.

This module only re-exports; each name lives in the module that owns it.
"""
from .audience import Audience
from .authority import ApprovalPolicy, Authority, Officer
from .engine import Alert, AlertEngine, AlertFailure, Push, TickResult
from .errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError,
                     UnauthorizedError, UnknownAlertError, UnknownOfficerError, UnknownPushError)
from .geo import EARTH_RADIUS_KM, HALF_CIRCUMFERENCE_KM, haversine_km
from .index import SpatialIndex
from .log import RecipientLog
from .schedule import RadiusSchedule
from .stats import OUTCOMES
from .store import DeviceStore

__version__ = "0.1.0"

__all__ = [
    "Audience", "DeviceStore", "SpatialIndex", "haversine_km", "EARTH_RADIUS_KM", "HALF_CIRCUMFERENCE_KM",
    "Officer", "Authority", "ApprovalPolicy", "RadiusSchedule", "RecipientLog",
    "AlertEngine", "Alert", "Push", "TickResult", "AlertFailure", "OUTCOMES",
    "GeotargetError", "InvalidInputError", "CorruptFileError", "UnknownAlertError",
    "UnknownOfficerError", "UnknownPushError", "UnauthorizedError", "AlertStateError",
]

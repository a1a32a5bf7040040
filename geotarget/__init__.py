"""geotarget: exact, fast geospatial targeting for missing-child emergency alerts.

This module only re-exports; each name lives in the module that owns it.
"""
from ._build_check import require_kernels as _require_kernels

_require_kernels(__path__[0])  # first: an unbuilt checkout gets a plain message, not a failure deep inside

from .spatial.audience import Audience
from .alerts.authority import ApprovalPolicy, Authority, Officer
from .spatial.divisions import Division, Divisions
from .alerts.engine import Alert, AlertEngine, AlertFailure, Push, TickResult
from .errors import (AlertStateError, CorruptFileError, GeotargetError, InvalidInputError, LeaseLostError,
                     LineageError,
                     RateLimitError, ShardUnavailableError, SignatureError,
                     UnauthorizedError, UnknownAlertError, UnknownDivisionError, UnknownOfficerError,
                     UnknownPushError)
from .geo import EARTH_RADIUS_KM, HALF_CIRCUMFERENCE_KM, haversine_km
from .spatial.index import SpatialIndex
from .alerts.log import RecipientLog
from .alerts.schedule import RadiusSchedule
from .alerts.settings import Settings
from .alerts.signing import CapSigner, verify_cap
from .alerts.stats import OUTCOMES
from .spatial.store import DeviceStore

from . import _moved

_moved.install()            # geotarget.engine, geotarget.store, ...: the same modules as before the layers

__version__ = "0.1.0"


def __getattr__(name: str):
    return _moved.attribute(name)

__all__ = [
    "Audience", "DeviceStore", "SpatialIndex", "haversine_km", "EARTH_RADIUS_KM", "HALF_CIRCUMFERENCE_KM",
    "Officer", "Authority", "ApprovalPolicy", "RadiusSchedule", "RecipientLog",
    "AlertEngine", "Alert", "Push", "TickResult", "AlertFailure", "OUTCOMES", "CapSigner", "verify_cap",
    "GeotargetError", "InvalidInputError", "CorruptFileError", "UnknownAlertError",
    "UnknownOfficerError", "UnknownPushError", "UnauthorizedError", "AlertStateError",
    "ShardUnavailableError",
    "SignatureError", "RateLimitError", "Settings", "Division", "Divisions", "UnknownDivisionError", "LineageError", "LeaseLostError",
]

"""``geotarget demo``: the whole job, end to end, on a realistic national population.

What it does, in simulated time (China Standard Time, +08:00)::

    population   ~20 M devices over China's real cities, 25 partner apps
    index        KD-tree over the devices
    officers     a county officer of a real district, a city-level superior, the ministry
    08:25        the county officer reports a missing child (missing since 08:10)
    08:26        ... and a drill (an exercise: CAP status Exercise, test devices only)
    08:27        ... and a missing elderly man (missing since 07:10; case type elderly)
    08:31        the superior approves all three: they are published
    08:32        tick -> alert   100 km  (t <= 1 h)        elderly: alert 50 km; drill: alert 100 km
    09:15        tick -> expand  200 km  (1 h < t <= 2 h)  elderly: expand 100 km; drill: expand 200 km
    09:20        the drill ends -> closure to the test devices it reached
    10:20        tick -> expand  300 km  (2 h < t <= 3 h)
    10:50        locations refresh (2 % of devices move, new devices appear) -> topup 300 km
                 (and the elderly man's 100 km circle)
    11:15        tick -> expand  500 km  (t > 3 h)
    13:05        the child is found -> closure to exactly everyone notified
    13:10        the elderly man is found -> closure to exactly everyone notified

The child and the elderly man each follow their case type's radius schedule
and CAP event (:mod:`geotarget.alerts.settings`).  Every push is acknowledged after
its CAP message is written, as a dispatcher would.  The report then checks,
from the pushes it received and not from the engine's bookkeeping, that each
closure audience is exactly the union of that alert's ring pushes, that no
device got two ring pushes, and (against a brute-force NumPy haversine scan)
that every device now within each last radius was notified.  For the drill it
checks that only test devices were reached (exactly those inside its rings),
that its first ring was counted as if real (the child's first ring: same
circle, same time), and that it appears nowhere in the statistics.

Timings per push: ``query`` is :meth:`SpatialIndex.within` for the push's
circle, timed by the demo right after the engine call (same circle, same
location-age cutoff); ``log`` is the durable write (the log's outermost
transactions, fsync included), timed by a :class:`RecipientLog` subclass;
``engine`` is the whole ``tick``/``refresh``/``close`` call.  The rest of
``engine`` is the ring difference (bitmaps) and the CAP rendering.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pyroaring import BitMap

from ..alerts.authority import ApprovalPolicy, Authority, Officer, division_covers, division_level
from ..alerts.engine import AlertEngine, Push
from ..errors import InvalidInputError
from ..geo import check_int, epoch_seconds, haversine_km
from ..spatial.index import SpatialIndex
from ..alerts.log import RecipientLog
from ..spatial.population import DEFAULT_NOW, PARTNER_APPS, cities, city as find_city, generate_arrays, population
from ..alerts.settings import Settings
from ..alerts.signing import self_signed, verify_cap
from ..alerts.model import RING_KINDS

__all__ = ["run_demo", "format_report", "demo_officers", "DEFAULT_DEVICES", "DEFAULT_CITY"]

DEFAULT_DEVICES = 20_000_000
DEFAULT_CITY = "Hangzhou"
DEFAULT_WORKDIR = "geotarget_demo"
CST = _dt.timezone(_dt.timedelta(hours=8), "CST")
#: The child went missing ten minutes after the population's snapshot time.
MISSING_SINCE = DEFAULT_NOW.astimezone(CST) + _dt.timedelta(minutes=10)
#: Devices silent for longer than this are not targeted (their location is stale).
MAX_LOCATION_AGE = _dt.timedelta(hours=24)
#: The elderly man went missing an hour before the child.
ELDERLY_MISSING_SINCE = MISSING_SINCE - _dt.timedelta(hours=1)
#: Drill test devices: this many near the city (inside the drill's first ring) and far away.
TEST_DEVICES_NEAR, TEST_DEVICES_FAR = 4, 2
#: Share of devices that report a new location at the refresh, and of new devices.
MOVED_SHARE = 0.02
NEW_SHARE = 0.002

# A real county-level district under the big cities (GB/T 2260); other cities
# fall back to their "urban districts" code XXYY01 (市辖区).
_DISTRICTS = {
    "110000": ("110101", "Dongcheng District"), "120000": ("120103", "Hexi District"),
    "310000": ("310101", "Huangpu District"), "500000": ("500103", "Yuzhong District"),
    "330100": ("330102", "Shangcheng District"), "320100": ("320102", "Xuanwu District"),
    "440100": ("440104", "Yuexiu District"), "440300": ("440304", "Futian District"),
    "510100": ("510104", "Jinjiang District"), "420100": ("420102", "Jiang'an District"),
    "610100": ("610102", "Xincheng District"), "620100": ("620102", "Chengguan District"),
}

FILES = {"log": "recipients.sqlite", "cap": "cap", "map": "alert_map.png", "index": "index",
         "keys": "keys"}


def _minutes(m: int) -> _dt.timedelta:
    return _dt.timedelta(minutes=m)


def demo_officers(c: dict) -> tuple[list[Officer], dict]:
    """The officers for city ``c``: a county officer, a superior, the ministry.

    Returns the officers and ``{"county": (officer, district name), "superior": officer}``.
    """
    code = c["adcode"]
    # the real district holding the seat of government; a city without
    # counties (Dongguan) or a county-level city reports as itself
    from ..spatial.divisions import Divisions
    found = Divisions.china().locate(c["lat"], c["lon"])
    if found is not None and found.code != code and division_covers(code, found.code):
        district = found.code
        known = _DISTRICTS.get(code)
        dname = known[1] if known and known[0] == district else f"the district of {c['name_en']}'s seat"
    else:
        district, dname = code, c["name_en"]
    if code[2:] == "0000" or code[4:] != "00" or district == code:
        superior = Officer(f"P-{code[:2]}0000", level="province", division=code[:2] + "0000",
                           name=f"{c['province_en']} Public Security Department")
    else:
        superior = Officer(f"S-{code}", level="city", division=code,
                           name=f"{c['name_en']} Public Security Bureau")
    county = Officer(f"C-{district}", level=division_level(district), division=district,
                     name=f"{dname} police")
    ministry = Officer("MPS-000000", level="ministry", division="000000", name="Ministry of Public Security")
    return [county, superior, ministry], {"county": (county, dname), "superior": superior}


@dataclasses.dataclass
class Row:
    """One push, as the report shows it."""

    seq: int
    push_id: str
    kind: str
    at: _dt.datetime
    elapsed_min: float
    radius_km: float
    recipients: int
    reached: int
    by_app: dict
    query_ms: float | None
    log_ms: float
    engine_ms: float
    cap: str

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["at"] = self.at.isoformat()
        return d


def _moves(store, seed: int, at: _dt.datetime):
    """A location refresh: 2 % of devices report again (most nearby, some in another city),
    and 0.2 % new devices appear, drawn like the population."""
    rng = np.random.default_rng([seed, 7])
    n = len(store)
    k = rng.choice(n, max(1, int(n * MOVED_SHARE)), replace=False) if n else np.empty(0, np.int64)
    m = k.size
    lat = np.array(store.lat[k], dtype=np.float64)
    lon = np.array(store.lon[k], dtype=np.float64)
    # 70 %: a local move of a few km; 30 %: a trip to another city, chosen by population
    travel = rng.random(m) < 0.3
    t = cities()
    w = t.column("population").to_numpy().astype(np.float64)
    dest = rng.choice(len(w), int(travel.sum()), p=w / w.sum())
    lat[travel] = t.column("lat").to_numpy()[dest] + rng.normal(0, 0.08, dest.size)
    lon[travel] = t.column("lon").to_numpy()[dest] + rng.normal(0, 0.08, dest.size)
    local = ~travel
    step_km = rng.gamma(2.0, 2.5, int(local.sum()))
    bearing = rng.uniform(0, 2 * np.pi, step_km.size)
    lat[local] += step_km * np.cos(bearing) / 111.2
    lon[local] += step_km * np.sin(bearing) / (111.2 * np.cos(np.radians(lat[local])))
    np.clip(lat, -90.0, 90.0, out=lat)
    lon = (lon + 180.0) % 360.0 - 180.0
    ids = np.array(store.device_id[k], dtype=np.uint64)
    apps = np.asarray(store.app_names, dtype=object)[store.app_codes[k]]
    # new installs: a second population, minus any id that happens to exist already
    fresh = generate_arrays(max(1, int(n * NEW_SHARE)), seed=seed + 1_000_003, progress=False)
    keep = store.lookup(fresh["device_id"]) < 0
    keep &= ~np.isin(fresh["device_id"], ids)
    ids = np.concatenate([ids, fresh["device_id"][keep]])
    lat = np.concatenate([lat, fresh["lat"][keep]])
    lon = np.concatenate([lon, fresh["lon"][keep]])
    apps = np.concatenate([apps, np.asarray(PARTNER_APPS, dtype=object)[fresh["app"][keep]]])
    seen = _dt.datetime.fromtimestamp(int(at.timestamp()), _dt.timezone.utc)
    return store.with_updates(ids, lat, lon, last_seen=seen, app=apps), m, int(keep.sum())


def _reference(store, lat, lon, radius_km, seen_since, chunk: int = 1 << 22) -> BitMap:
    """Keys within ``radius_km`` by a float64 NumPy haversine scan (the contract's oracle),
    in chunks so that the check does not double the demo's peak memory."""
    cutoff = epoch_seconds(seen_since)
    out = BitMap()
    for i in range(0, len(store), chunk):
        j = min(len(store), i + chunk)
        inside = haversine_km(lat, lon, store.lat[i:j], store.lon[i:j]) <= radius_km
        inside &= store.last_seen_s[i:j] >= cutoff
        out.update((np.flatnonzero(inside) + i).astype(np.uint32))
    return out


def _test_devices(store, index, lat: float, lon: float, seen_since: _dt.datetime, seed: int) -> np.ndarray:
    """Device ids for the drill: a few fresh ones near the city (its rings reach them) and a few
    more than 1000 km away (its rings must not)."""
    near = index.within(lat, lon, 50.0, seen_since=seen_since).keys()
    if near.size:
        near = near[np.linspace(0, near.size - 1, min(TEST_DEVICES_NEAR, near.size)).astype(np.int64)]
    rng = np.random.default_rng([seed, 11])
    sample = rng.choice(len(store), min(len(store), 4096), replace=False)
    far = sample[haversine_km(lat, lon, store.lat[sample], store.lon[sample]) > 1000.0][:TEST_DEVICES_FAR]
    keys = np.unique(np.concatenate([near.astype(np.int64), far.astype(np.int64)]))
    return np.asarray(store.device_id[keys], dtype=np.uint64)


def _rings_union(pushes) -> tuple[BitMap, bool]:
    """The union of the ring pushes' audiences, and whether no device is in two of them."""
    sets = [BitMap(p.audience.keys()) for p in pushes if p.kind in RING_KINDS]
    union = BitMap.union(BitMap(), *sets)
    return union, sum(len(b) for b in sets) == len(union)


def _same_keys(audience, bm: BitMap) -> bool:
    keys = audience.keys()
    return len(keys) == len(bm) and bool(np.array_equal(keys, np.asarray(bm.to_array(), dtype=np.uint32)))


def _event_of(cap_xml: str) -> tuple[str, str]:
    """The CAP ``<event>`` and ``<status>`` of a message (the first ``<info>``)."""
    from lxml import etree
    doc = etree.fromstring(cap_xml.encode("utf-8"))
    ns = {"cap": "urn:oasis:names:tc:emergency:cap:1.2"}
    return doc.findtext("cap:info/cap:event", namespaces=ns), doc.findtext("cap:status", namespaces=ns)




def _check_case(engine, alert_id: str, pushes, closure, store, last_at: _dt.datetime) -> dict:
    """One alert, from the pushes received: its rings follow its case type's schedule and carry
    its CAP event, its closure is exactly the union of its rings, and every device now inside
    its last circle (NumPy haversine scan of ``store``, fresh at ``last_at``) was notified."""
    a = engine.alert(alert_id)
    case = engine.settings.case(a.case_type)
    rings = [p for p in pushes if p.kind in RING_KINDS]
    union, disjoint = _rings_union(rings)
    equal = _same_keys(closure.audience, union)
    last_r = max((p.radius_km for p in rings), default=0.0)
    inside = _reference(store, a.lat, a.lon, last_r, last_at - MAX_LOCATION_AGE)
    covered = inside.issubset(union)
    on_schedule = all(p.radius_km == case.schedule.radius_at(a.missing_since, p.created_at) for p in rings)
    events = {_event_of(p.cap_xml)[0] for p in pushes}
    out = {"alert_id": alert_id, "case_type": a.case_type, "event": case.event, "event_code": case.event_code,
           "events_ok": events == {case.event}, "on_schedule": on_schedule,
           "radii_km": sorted({p.radius_km for p in rings}), "ring_pushes": len(rings),
           "rings_disjoint": disjoint, "union": len(union), "closure": len(closure),
           "closure_equals_union": equal, "last_radius_km": last_r, "within_last_radius_now": len(inside),
           "within_last_radius_all_notified": bool(covered)}
    out["ok"] = bool(equal and disjoint and covered and on_schedule and out["events_ok"] and rings)
    return out


def _check_drill(pushes, child_pushes, store, test_keys: np.ndarray, lat: float, lon: float) -> dict:
    """The drill reached only test devices, exactly those inside its rings when they were pushed;
    every message is an Exercise; its first ring was counted as if real (the child's first ring
    is the same circle at the same time); its closure is the union of its rings."""
    rings = [p for p in pushes if p.kind in RING_KINDS]
    closure = [p for p in pushes if p.kind == "closure"][-1]
    union, disjoint = _rings_union(rings)
    tk = np.sort(test_keys[test_keys >= 0]).astype(np.int64)
    expected = BitMap()
    for p in rings:
        inside = haversine_km(lat, lon, store.lat[tk], store.lon[tk]) <= p.radius_km
        inside &= store.last_seen_s[tk] >= epoch_seconds(p.created_at - MAX_LOCATION_AGE)
        expected.update(tk[inside].astype(np.uint32))
    exercise = all(p.drill and _event_of(p.cap_xml)[1] == "Exercise" for p in pushes)
    first = next(p for p in rings if p.kind == "alert")
    child_first = next(p for p in child_pushes if p.kind == "alert")
    out = {"test_devices": int(tk.size), "test_reached": len(union),
           "only_test_devices": union.issubset(BitMap(tk.astype(np.uint32))),
           "exactly_inside_rings": union == expected, "all_exercise": exercise,
           "as_if_real": first.as_if_real, "as_if_real_equals_child": first.as_if_real == len(child_first),
           "closure": len(closure), "closure_equals_union": _same_keys(closure.audience, union),
           "rings_disjoint": disjoint, "pushes": len(pushes)}
    out["ok"] = bool(out["only_test_devices"] and out["exactly_inside_rings"] and exercise
                     and out["as_if_real_equals_child"] and out["closure_equals_union"] and disjoint)
    return out


def _clean(work: Path) -> None:
    """Remove what an earlier demo run left under the demo's own file names."""
    for name in (FILES["log"], FILES["log"] + "-wal", FILES["log"] + "-journal", FILES["map"]):
        with contextlib.suppress(FileNotFoundError):
            (work / name).unlink()
    cap = work / FILES["cap"]
    if cap.is_dir():
        for f in cap.glob("GT-*.xml"):
            f.unlink()


def run_demo(*, devices: int = DEFAULT_DEVICES, seed: int = 0, city: str = DEFAULT_CITY,
             workdir: str | os.PathLike = DEFAULT_WORKDIR, draw_map: bool = True,
             progress: bool | None = None, echo: Callable[[str], Any] | None = print) -> dict:
    """Run the demo; return a JSON-able result (see :func:`format_report`).

    ``echo`` receives one line per step as it happens (``None``: silent).
    Bad arguments raise :class:`InvalidInputError` before any work is done.
    """
    say = echo or (lambda _s: None)
    devices = check_int(devices, "devices", 1)
    check_int(seed, "seed", 0)
    c = find_city(city)
    work = Path(os.fspath(workdir))
    if work.exists() and not work.is_dir():
        raise InvalidInputError(f"workdir={str(work)!r} exists and is not a directory")
    work.mkdir(parents=True, exist_ok=True)
    _clean(work)
    (work / FILES["cap"]).mkdir(exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name):
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0

    say(f"geotarget demo: {devices:,} devices (seed {seed}), a missing child in {c['name_en']} "
        f"({c['province_en']}), files in {work}/")

    # 1-2. population and index ------------------------------------------------
    with timed("population"):
        store = population(devices, seed=seed, progress=progress)
    say(f"[1/6] population  {len(store):,} devices around {cities().num_rows} real cities, "
        f"{len(store.app_names)} partner apps  ({timings['population']:.1f} s)")
    with timed("index"):
        index = SpatialIndex.build(store, progress=progress)
    say(f"[2/6] index       KD-tree over {len(index):,} unit vectors, rows in leaf order  "
        f"({timings['index']:.1f} s)")

    # 3. officers, report, approval -------------------------------------------
    officers, roles = demo_officers(c)
    county, dname = roles["county"]
    superior = roles["superior"]
    log = RecipientLog(work / FILES["log"])
    # the reporter's report waits for its superior, whatever its level
    policy = ApprovalPolicy(needs_approval=frozenset({county.level}))
    # A key made for this run: a deployment signs with the key its certificate authority issued.
    signer = self_signed("geotarget demo sender (not a real authority)", work / FILES["keys"])
    t0 = MISSING_SINCE
    # The drill's test devices are named in the settings, as a deployment names its own.
    test_ids = _test_devices(store, index, c["lat"], c["lon"], t0 + _minutes(65) - MAX_LOCATION_AGE, seed)
    settings = dataclasses.replace(Settings.default(), drill_devices=tuple(sorted(int(x) for x in test_ids)))
    # Their keys, for the drill's check.  The first id lookup sorts the store's ids (about 1.5 s at
    # 20 M, once per generation); done here, it stays out of the timed ticks.
    test_keys = store.lookup(test_ids)
    # no engine-wide schedule: each case type follows its own (settings, [case.*])
    engine = AlertEngine(index, log=log, authority=Authority(officers, policy),
                         max_location_age=MAX_LOCATION_AGE, signer=signer, settings=settings)
    details = {
        "headline": f"{c['name_zh']}儿童失踪:女童,6岁,身穿红色外套",
        "description": f"{t0:%H:%M} 前后在{c['name_zh']}走失。如有线索请立即拨打110。",
        "instruction": "请留意身边儿童,发现线索立即报警(110),切勿自行处置。",
        "city": c["name_en"],
    }
    alert = engine.report(county.officer_id, lat=c["lat"], lon=c["lon"], missing_since=t0,
                          division=county.division, details=details, now=t0 + _minutes(15))
    drill = engine.report(county.officer_id, lat=c["lat"], lon=c["lon"], missing_since=t0,
                          division=county.division, now=t0 + _minutes(16), drill=True,
                          details={"headline": f"【演习】{c['name_zh']}儿童失踪预警演练,非真实警报",
                                   "description": "这是一次演练。无需采取任何行动。", "city": c["name_en"]})
    te = ELDERLY_MISSING_SINCE
    elderly = engine.report(
        county.officer_id, lat=c["lat"], lon=c["lon"], missing_since=te, division=county.division,
        now=t0 + _minutes(17), case_type="elderly",
        details={"headline": f"{c['name_zh']}老人走失:男,81岁,灰色上衣,患阿尔茨海默病",
                 "description": f"{te:%H:%M} 前后在{c['name_zh']}走失。如有线索请立即拨打110。",
                 "city": c["name_en"]})
    for a in (alert, drill, elderly):
        engine.approve(a.id, superior.officer_id, now=t0 + _minutes(21))
    say(f"[3/6] officers    {t0 + _minutes(15):%H:%M} {county.officer_id} ({county.level}, {dname}) "
        f"reports {alert.id}")
    say(f"                  {t0 + _minutes(16):%H:%M} ... a drill {drill.id} "
        f"({len(test_ids)} test devices)")
    say(f"                  {t0 + _minutes(17):%H:%M} ... a missing elderly man {elderly.id} "
        f"(missing since {te:%H:%M})")
    say(f"                  {t0 + _minutes(21):%H:%M} {superior.officer_id} ({superior.level}) approves all "
        f"three: published; {len(officers)} officers registered")

    # 4. rings, with a refresh between 300 and 500 km --------------------------
    ids = (alert.id, elderly.id, drill.id)
    rows: dict[str, list[Row]] = {a: [] for a in ids}
    received: dict[str, list[Push]] = {a: [] for a in ids}
    reached = dict.fromkeys(ids, 0)

    def handle(pushes: list[Push], now, engine_s: float) -> None:
        for p in pushes:
            if p.kind in RING_KINDS:
                reached[p.alert_id] += len(p)
            cap_path = work / FILES["cap"] / f"{p.push_id}.xml"
            cap_path.write_text(p.cap_xml, encoding="utf-8")
            engine.ack(p.push_id)  # handed on: a restarted engine will not offer it again
            received[p.alert_id].append(p)
            missing = engine.alert(p.alert_id).missing_since
            # the engine's own split: query (ring + difference with the notified) and durable log
            rows[p.alert_id].append(Row(
                p.seq, p.push_id, p.kind, now, (now - missing).total_seconds() / 60, p.radius_km, len(p),
                reached[p.alert_id], p.audience.counts_by_app(), p.timings.get("query_ms"),
                p.timings.get("log_ms", 0.0), engine_s * 1e3 / max(1, len(pushes)), str(cap_path)))

    def call(fn, *args):
        e0 = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - e0

    refresh = None
    with timed("rings"):
        for minutes in (22, 65, 130):
            now = t0 + _minutes(minutes)
            pushes, es = call(engine.tick, now)
            handle(pushes, now, es)
            if minutes == 65:
                # the exercise ends; checked now, against the generation its rings used
                now = t0 + _minutes(70)
                drill_closure, es = call(engine.close, drill.id, county.officer_id, "other", now)
                handle([drill_closure], now, es)
                drill_check = _check_drill(received[drill.id], received[alert.id], store, test_keys,
                                           c["lat"], c["lon"])
        now = t0 + _minutes(160)
        elderly_last_at = now      # the refresh targets the elderly man's circle last
        r0 = time.perf_counter()
        new_store, moved, fresh = _moves(store, seed, now)
        new_index = SpatialIndex.build(new_store, progress=progress)
        refresh = (moved, fresh, time.perf_counter() - r0)
        pushes, es = call(engine.refresh, new_index, now)
        handle(pushes, now, es)
        # the engine serves the new generation; let the first one go (~1 GB at 20 M)
        n_first = len(store)
        del store, index, new_store, new_index
        now = t0 + _minutes(185)
        pushes, es = call(engine.tick, now)
        handle(pushes, now, es)
        last_ring_at = now
    say("[4/6] rings       " + " -> ".join(
        f"{r.radius_km:g} km" if r.kind != "topup" else "topup" for r in rows[alert.id])
        + f" ({len(rows[alert.id])} pushes)")
    say("                  elderly: " + " -> ".join(
        f"{r.radius_km:g} km" if r.kind != "topup" else "topup" for r in rows[elderly.id])
        + f"; drill: {drill_check['test_reached']} of {len(test_ids)} test devices reached, "
        f"{drill_check['as_if_real']:,} as if real")
    say(f"                  {t0 + _minutes(160):%H:%M} refresh: {refresh[0]:,} devices moved, "
        f"{refresh[1]:,} new, index rebuilt in {refresh[2]:.1f} s")

    # 5. the child is found ------------------------------------------------------
    now = t0 + _minutes(295)
    closure, es = call(engine.close, alert.id, county.officer_id, "lost", now)
    handle([closure], now, es)
    say(f"[5/6] closure     child found at {now:%H:%M} (outcome: lost); closure to "
        f"{len(closure):,} devices")
    now = t0 + _minutes(300)
    elderly_closure, es = call(engine.close, elderly.id, county.officer_id, "lost", now)
    handle([elderly_closure], now, es)
    say(f"                  elderly man found at {now:%H:%M}; closure to {len(elderly_closure):,} devices")

    # the check, from the pushes received --------------------------------------
    with timed("check"):
        rings = [p for p in received[alert.id] if p.kind in RING_KINDS]
        union, disjoint = _rings_union(rings)
        closure_keys = closure.audience.keys()
        equal = _same_keys(closure.audience, union)
        final = engine.index.store
        last_r = max((p.radius_km for p in rings), default=0.0)
        inside_bm = _reference(final, alert.lat, alert.lon, last_r, last_ring_at - MAX_LOCATION_AGE)
        covered = inside_bm.issubset(union)
        moved_away = len(union - inside_bm)
        elderly_check = _check_case(engine, elderly.id, received[elderly.id], elderly_closure, final,
                                    elderly_last_at)
        child_event, _ = _event_of(closure.cap_xml)
        # the drill never counts: the statistics are the child's and the elderly man's alone
        stats = engine.stats()
        real = [engine.alert(a) for a in (alert.id, elderly.id)]
        drill_check["not_in_stats"] = bool(
            stats["published"] == len(real) and stats["pushes"] == sum(a.pushes for a in real)
            and stats["devices_reached"] == sum(a.reached for a in real))
        drill_check["stats"] = {k: stats[k] for k in ("published", "pushes", "devices_reached")}
        drill_check["ok"] = bool(drill_check["ok"] and drill_check["not_in_stats"])
        log.verify()
        audit = len(log.audit_entries())
        # what a partner app does: every message verifies against the sender's pinned certificate
        messages = [p for a in ids for p in received[a]]
        for p in messages:
            verify_cap(p.cap_xml, signer.certificate_pem)
    check = {"closure_equals_union": equal, "rings_disjoint": disjoint, "union": len(union),
             "closure": int(len(closure_keys)), "ring_pushes": len(rings),
             "last_radius_km": last_r, "within_last_radius_now": len(inside_bm),
             "within_last_radius_all_notified": bool(covered), "notified_outside_now": moved_away,
             "log_verified": True, "audit_entries": audit, "cap_signatures_verified": len(messages),
             "child_event": child_event, "elderly": elderly_check, "drill": drill_check}
    check["ok"] = bool(equal and disjoint and covered and elderly_check["ok"] and drill_check["ok"])

    # 6. files: index and map ----------------------------------------------------
    index_dir = work / FILES["index"]
    with timed("save_index"):
        engine.index.save(index_dir)
    map_path = None
    if draw_map:
        from .maps import draw_alert_map
        with timed("map"):
            map_path = draw_alert_map(engine.index, engine.alert(alert.id), received[alert.id],
                                      work / FILES["map"], seed=seed)
        say(f"[6/6] map         {map_path}  ({timings['map']:.1f} s)")
    else:
        say("[6/6] map         skipped (--no-map)")
    log.close()
    timings["total"] = time.perf_counter() - t_start
    return {
        "devices": n_first, "devices_final": len(final), "seed": seed,
        "city": c, "district": {"division": county.division, "name": dname},
        "officers": [o.to_dict() for o in officers],
        "alert_id": alert.id, "missing_since": t0.isoformat(),
        "max_location_age_h": MAX_LOCATION_AGE.total_seconds() / 3600,
        "refresh": {"moved": refresh[0], "new": refresh[1], "at": (t0 + _minutes(160)).isoformat()},
        "pushes": [r.to_dict() for r in rows[alert.id]],
        "elderly": {"alert_id": elderly.id, "missing_since": te.isoformat(), "event": check["elderly"]["event"],
                    "pushes": [r.to_dict() for r in rows[elderly.id]]},
        "drill": {"alert_id": drill.id, "test_devices": len(test_ids),
                  "pushes": [{**r.to_dict(), "as_if_real": p.as_if_real}
                             for r, p in zip(rows[drill.id], received[drill.id])]},
        "check": check,
        "files": {"workdir": str(work), "cap": [r.cap for a in ids for r in rows[a]],
                  "map": str(map_path) if map_path else None,
                  "log": str(work / FILES["log"]), "index": str(index_dir)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _elapsed(minutes: float) -> str:
    m = int(round(minutes))
    return f"{m // 60}:{m % 60:02d}"


def _short(n: int) -> str:
    from .maps import compact_count
    return compact_count(n)


def format_report(result: dict, top_apps: int = 3) -> str:
    """The push table, the CHECK line and where the files are (at most 100 columns)."""
    rows = result["pushes"]
    totals: dict[str, int] = {}
    for r in rows:
        if r["kind"] in RING_KINDS:
            for a, v in r["by_app"].items():
                totals[a] = totals.get(a, 0) + v
    apps = [a for a, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top_apps]]
    head = (f"{'#':>2} {'t':>5} {'kind':<8}{'km':>5} {'recipients':>11} {'reached':>11}"
            + "".join(f" {a[:7]:>7}" for a in apps) + f" {'other':>7} {'query':>6} {'log':>6} {'engine':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        other = r["recipients"] - sum(r["by_app"].get(a, 0) for a in apps)
        lines.append(
            f"{r['seq']:>2} {_elapsed(r['elapsed_min']):>5} {r['kind']:<8}{r['radius_km']:>5g} "
            f"{r['recipients']:>11,} {r['reached']:>11,}"
            + "".join(f" {_short(r['by_app'].get(a, 0)):>7}" for a in apps)
            + f" {_short(other):>7} {_ms(r['query_ms']):>6} {_ms(r['log_ms']):>6} {_ms(r['engine_ms']):>7}")
    ck = result["check"]
    out = [
        f"alert {result['alert_id']}: a child missing in {result['city']['name_en']} since "
        f"{result['missing_since'][11:16]} CST",
        f"t = time since then (h:mm); devices silent for more than {result['max_location_age_h']:g} h "
        "are not targeted",
        "",
        *lines,
        "times in ms: query = index.within for the ring's circle; log = durable (fsynced) write;",
        "engine = the whole tick/refresh/close call (query + ring difference + CAP + log), shared",
        "among the pushes it made (a tick also serves the elderly man's alert and the drill below)",
        "",
        ("CHECK " + ("OK" if ck["ok"] else "FAILED") + f": closure audience ({ck['closure']:,}) "
         + ("==" if ck["closure_equals_union"] else "!=")
         + f" union of the {ck['ring_pushes']} ring pushes ({ck['union']:,}); "
         + ("no device got two ring pushes" if ck["rings_disjoint"] else "SOME DEVICE GOT TWO RING PUSHES")),
        ("CHECK " + ("OK" if ck["within_last_radius_all_notified"] else "FAILED")
         + f": all {ck['within_last_radius_now']:,} devices now within {ck['last_radius_km']:g} km "
         f"(NumPy haversine scan) were notified;"),
        f"      {ck['notified_outside_now']:,} notified devices have moved out or gone silent since, "
        "and got the closure too",
        *_case_lines(result),
        f"CHECK OK: recipient log and hash-chained audit trail ({ck['audit_entries']} entries) verified",
        f"CHECK OK: all {ck['cap_signatures_verified']} CAP messages carry an XML signature that verifies "
        "against the sender's certificate",
        "",
        "files:",
        f"  CAP 1.2 messages  {Path(result['files']['cap'][0]).parent}/<push_id>.xml "
        f"({len(result['files']['cap'])} files)" if result["files"]["cap"] else "  CAP: none",
        f"  map               {result['files']['map']}" if result["files"]["map"] else "  map               (skipped)",
        f"  recipient log     {result['files']['log']}",
        f"  store + index     {result['files']['index']}/  "
        f"(generation 2, {result['devices_final']:,} devices)",
        "",
        f"try:  geotarget alert show {result['alert_id']} --log {result['files']['log']}",
        f"      geotarget map --log {result['files']['log']} --index {result['files']['index']} "
        f"--alert {result['alert_id']}",
        f"total {result['timings_s']['total']:.1f} s",
    ]
    return "\n".join(out)


def _push_line(pushes, drill: bool = False) -> str:
    parts = []
    for r in pushes:
        km = f" {r['radius_km']:g} km" if r["kind"] != "closure" else ""
        extra = (f" (as if real {r['as_if_real']:,})" if drill and r.get("as_if_real") is not None else "")
        parts.append(f"{r['kind']}{km} {r['recipients']:,}{extra}")
    return "  " + " | ".join(parts)


def _case_lines(result: dict) -> list[str]:
    """The elderly case's and the drill's pushes and CHECK lines (at most 100 columns)."""
    ck = result["check"]
    el, dr = ck["elderly"], ck["drill"]

    def ok(v):
        return "CHECK " + ("OK" if v else "FAILED")

    return [
        f"elderly case {el['alert_id']} ({el['event_code']}), missing since "
        f"{result['elderly']['missing_since'][11:16]}:",
        _push_line(result["elderly"]["pushes"]),
        f"{ok(el['ok'])}: elderly closure ({el['closure']:,}) " + ("==" if el["closure_equals_union"] else "!=")
        + f" union of its {el['ring_pushes']} ring pushes ({el['union']:,}); all",
        f"      {el['within_last_radius_now']:,} devices now within {el['last_radius_km']:g} km "
        + ("were notified" if el["within_last_radius_all_notified"] else "were NOT all notified")
        + "; its own schedule (" + " -> ".join(f"{r:g}" for r in el["radii_km"]) + " km)",
        f"      and CAP event ({el['event']})" + ("" if el["on_schedule"] and el["events_ok"]
                                                 else ": NOT FOLLOWED"),
        f"drill {result['drill']['alert_id']} (EXERCISE: CAP status Exercise, test devices only):",
        _push_line(result["drill"]["pushes"], drill=True),
        f"{ok(dr['ok'])}: the drill reached {dr['test_reached']} of {dr['test_devices']} test devices, "
        + ("exactly those inside its rings;" if dr["exactly_inside_rings"] and dr["only_test_devices"]
           else "NOT exactly those inside its rings;"),
        f"      first ring as if real {dr['as_if_real']:,} "
        + ("(== the child's)" if dr["as_if_real_equals_child"] else "(!= the child's)")
        + "; closure " + ("==" if dr["closure_equals_union"] else "!=") + " its union; "
        + ("not in the statistics" if dr.get("not_in_stats") else "COUNTED IN THE STATISTICS"),
    ]


def report_json(result: dict) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False, default=str)

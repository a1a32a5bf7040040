"""Photos of the missing person: checked at report, stored content-addressed, carried as CAP <resource>."""
import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from lxml import etree

import geotarget as gt
from geotarget.alerts.engine import purge_expired
from geotarget.alerts.photos import MIME_TYPES, Photo, PhotoStore
from geotarget.alerts.signing import self_signed, verify_cap

capvalidator = pytest.importorskip("capvalidator")

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
NS = {"c": "urn:oasis:names:tc:emergency:cap:1.2"}
rng = np.random.default_rng(11)
PNG = b"\x89PNG\r\n\x1a\n" + rng.bytes(3000)
JPEG = b"\xff\xd8\xff\xe0" + rng.bytes(5000)
WEBP = b"RIFF" + (2000).to_bytes(4, "little") + b"WEBP" + rng.bytes(1988)


def _m(minutes):
    return T0 + dt.timedelta(minutes=minutes)


def _schema():
    xsd = Path(capvalidator.__file__).with_name("static") / "CAP-v1.2-schema.xsd"
    return etree.XMLSchema(etree.parse(str(xsd)))


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return self_signed("test sender", tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def index():
    r = np.random.default_rng(3)
    n = 3000
    store = gt.DeviceStore.from_arrays(np.arange(1, n + 1, dtype=np.uint64),
                                       30.27 + r.normal(0, 1.0, n), 120.15 + r.normal(0, 1.0, n))
    return gt.SpatialIndex.build(store)


OFFICERS = [gt.Officer("C-1", level="county", division="330102"),
            gt.Officer("S-1", level="city", division="330100")]


def _engine(index, path, signer=None, settings=None):
    log = gt.RecipientLog(path)
    return gt.AlertEngine(index, log=log, authority=gt.Authority(OFFICERS), signer=signer,
                          settings=settings)


def _report(eng, photos, minute=5, drill=False, **kw):
    a = eng.report("C-1", lat=30.27, lon=120.15, missing_since=T0, division="330102",
                   details={"headline": "Missing girl, 6"}, now=_m(minute), photos=photos, drill=drill, **kw)
    eng.approve(a.id, "S-1", now=_m(minute + 1))
    return a


def _resources(xml):
    root = etree.fromstring(xml.encode())
    out = []
    for info in root.findall("c:info", NS):
        out.append([{k: r.findtext(f"c:{k}", None, NS)
                     for k in ("resourceDesc", "mimeType", "size", "uri", "digest")}
                    for r in info.findall("c:resource", NS)])
    return out


def _check_message(xml, cert, photos):
    """Schema-valid, capvalidator-valid, signed, and each photo's resource matches its bytes."""
    doc = etree.fromstring(xml.encode())
    schema = _schema()
    assert schema.validate(doc), schema.error_log
    # strict mode also demands a signature: only signed messages are checked strictly
    res = capvalidator.validate_cap_message(xml.encode("utf-8"), strict=cert is not None)
    assert res.passed, res.message
    if cert is not None:
        verify_cap(xml, cert)
    for block in _resources(xml):
        assert len(block) == len(photos)
        for r, data in zip(block, photos):
            digest = hashlib.sha1(data).hexdigest()
            assert r["digest"] == digest and int(r["size"]) == len(data)
            assert r["uri"].startswith("https://tuanyuan.mps.gov.cn/photos/" + digest + ".")
            assert r["mimeType"] in MIME_TYPES and r["resourceDesc"]


def test_every_push_carries_the_photos_signed_and_valid(index, signer, tmp_path):
    jpg = tmp_path / "face.jpg"
    jpg.write_bytes(JPEG)
    eng = _engine(index, tmp_path / "log.sqlite", signer)
    a = _report(eng, [(PNG, "image/png", "front, school uniform"), str(jpg)])
    b = _report(eng, [(WEBP, "image/webp")], minute=7)
    pushes = list(eng.tick(_m(10))) + list(eng.tick(_m(70)))
    pushes.append(eng.update(a.id, "C-1", {"headline": "Missing girl, 6, now in blue"}, now=_m(80)))
    pushes.append(eng.close(a.id, "C-1", outcome="lost", now=_m(90)))
    pushes.append(eng.retract(b.id, "S-1", reason="a false report", now=_m(91)))
    kinds = {p.kind for p in pushes}
    assert {"alert", "expand", "update", "closure", "retraction"} <= kinds
    for p in pushes:
        _check_message(p.cap_xml, signer.certificate_pem, [PNG, JPEG] if p.alert_id == a.id else [WEBP])
    first = next(p for p in pushes if p.alert_id == a.id)
    r = _resources(first.cap_xml)[0]
    assert r[0]["resourceDesc"] == "front, school uniform" and r[0]["mimeType"] == "image/png"
    assert r[1]["mimeType"] == "image/jpeg" and r[1]["uri"].endswith(".jpg")
    # stored content-addressed, private, next to the log
    d = Path(str(eng.log.path) + ".photos")
    for data, ext in ((PNG, "png"), (JPEG, "jpg"), (WEBP, "webp")):
        f = d / f"{hashlib.sha1(data).hexdigest()}.{ext}"
        assert f.read_bytes() == data
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # a message changed after signing (a photo's digest swapped) no longer verifies
    forged = first.cap_xml.replace(hashlib.sha1(PNG).hexdigest(), hashlib.sha1(b"other").hexdigest())
    assert forged != first.cap_xml
    with pytest.raises(gt.SignatureError):
        verify_cap(forged, signer.certificate_pem)
    eng.shutdown()
    eng.log.close()


def test_drill_carries_photos(index, tmp_path):
    eng = _engine(index, tmp_path / "log.sqlite")
    a = _report(eng, [(PNG, "image/png")], drill=True)
    (p,) = eng.tick(_m(10))
    assert p.drill and a.id.startswith("DRILL-")
    assert etree.fromstring(p.cap_xml.encode()).findtext("c:status", None, NS) == "Exercise"
    _check_message(p.cap_xml, None, [PNG])
    eng.shutdown()
    eng.log.close()


def test_photos_survive_a_restart_and_are_in_the_authenticated_record(index, tmp_path):
    eng = _engine(index, tmp_path / "log.sqlite")
    a = _report(eng, [(JPEG, "image/jpeg"), (PNG, "image/png")])
    eng.tick(_m(10))
    eng.shutdown()
    eng.log.close()
    eng2 = _engine(index, tmp_path / "log.sqlite")
    again = eng2.alert(a.id)
    assert [p["digest"] for p in again.photos] == [hashlib.sha1(JPEG).hexdigest(), hashlib.sha1(PNG).hexdigest()]
    closure = eng2.close(a.id, "C-1", outcome="runaway", now=_m(30))
    _check_message(closure.cap_xml, None, [JPEG, PNG])
    eng2.shutdown()
    eng2.log.close()
    # the photo list is in the alert record, covered by its checksum: editing it is noticed
    import sqlite3
    con = sqlite3.connect(tmp_path / "log.sqlite")
    (text,) = con.execute("SELECT record FROM alerts WHERE alert_id=?", (a.id,)).fetchone()
    rec = json.loads(text)
    rec["photos"][0]["digest"] = hashlib.sha1(b"x").hexdigest()
    con.execute("UPDATE alerts SET record=? WHERE alert_id=?", (json.dumps(rec), a.id))
    con.commit()
    con.close()
    with pytest.raises(gt.CorruptFileError):
        _engine(index, tmp_path / "log.sqlite")


@pytest.mark.parametrize("damage", ["rewrite", "truncate", "delete"])
def test_tampered_photo_file_is_a_typed_error_and_nothing_is_pushed(index, tmp_path, damage):
    eng = _engine(index, tmp_path / "log.sqlite")
    a = _report(eng, [(PNG, "image/png")])
    f = Path(str(eng.log.path) + ".photos") / f"{hashlib.sha1(PNG).hexdigest()}.png"
    if damage == "rewrite":
        f.write_bytes(PNG[:-1] + b"\x00")
    elif damage == "truncate":
        f.write_bytes(PNG[:100])
    else:
        f.unlink()
    out = eng.tick(_m(10))
    assert list(out) == [] and len(out.errors) == 1
    assert isinstance(out.errors[0].exception, gt.CorruptFileError)
    assert eng.log.pushes(a.id) == []
    with pytest.raises(gt.CorruptFileError, match="photo"):
        eng.close(a.id, "C-1", outcome="lost", now=_m(20))
    assert eng.log.pushes(a.id) == []
    eng.shutdown()
    eng.log.close()


def _tiny_limit(tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text('[photos]\nmax_bytes = 4000\nbase_uri = "https://example.org/p/"\n')
    return gt.Settings.load(cfg)


@pytest.mark.parametrize("photos, match", [
    ("face.jpg", "photos must be a list"),
    ([(PNG, "image/gif")], "mime_type"),
    ([(PNG, "image/jpeg")], "magic"),
    ([(JPEG[:3000], "image/png")], "magic"),
    ([(b"RIFF1234WAVE" + b"0" * 10, "image/webp")], "magic"),
    ([(b"", "image/png")], "empty"),
    ([(JPEG, "image/jpeg")], "limit"),             # 5004 bytes > 4000
    ([("not bytes", "image/png")], "bytes"),
    ([(PNG, "image/png", "a\x07b")], "description"),
    ([42], "neither"),
    (["missing.png"], "cannot read"),
    (["face.gif"], "must end in"),
    (["fake.png"], "magic"),
    ([(PNG, "image/png")] * 11, "at most 10"),
])
def test_bad_photos_are_refused_and_nothing_is_logged_or_stored(index, tmp_path, photos, match):
    (tmp_path / "face.gif").write_bytes(b"GIF89a" + b"0" * 10)
    (tmp_path / "fake.png").write_bytes(JPEG[:1000])
    photos = photos if isinstance(photos, str) else [
        str(tmp_path / p) if isinstance(p, str) else p for p in photos]
    eng = _engine(index, tmp_path / "log.sqlite", settings=_tiny_limit(tmp_path))
    before = (eng.log.stats(), [e["hash"] for e in eng.log.audit_entries()])
    with pytest.raises(gt.InvalidInputError, match=match):
        eng.report("C-1", lat=30.27, lon=120.15, missing_since=T0, division="330102", now=_m(5),
                   photos=photos)
    assert (eng.log.stats(), [e["hash"] for e in eng.log.audit_entries()]) == before
    assert eng.alerts() == []
    assert not Path(str(eng.log.path) + ".photos").exists()
    eng.shutdown()
    eng.log.close()


def test_settings_photo_uri_dir_and_limit(index, tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text('[photos]\nbase_uri = "https://cdn.example.org/missing/"\ndir = "pics"\n')
    s = gt.Settings.load(cfg)
    assert s.photo_dir == tmp_path / "pics" and s.photo_max_bytes == 5 * 1024 * 1024
    assert s.to_dict()["photos"]["dir"] == str(tmp_path / "pics")
    eng = _engine(index, tmp_path / "log.sqlite", settings=s)
    _report(eng, [(PNG, "image/png")])
    (p,) = eng.tick(_m(10))
    digest = hashlib.sha1(PNG).hexdigest()
    assert _resources(p.cap_xml)[0][0]["uri"] == f"https://cdn.example.org/missing/{digest}.png"
    assert (tmp_path / "pics" / f"{digest}.png").read_bytes() == PNG
    eng.shutdown()
    eng.log.close()
    for bad, match in (('base_uri = "ftp://x/y"', "base_uri"), ('base_uri = "https://x/a b"', "base_uri"),
                       ("max_bytes = 0", "max_bytes"), ('max_bytes = "5MB"', "max_bytes"),
                       ("colour = 1", "colour")):
        cfg.write_text(f"[photos]\n{bad}\n")
        with pytest.raises(gt.InvalidInputError, match=match):
            gt.Settings.load(cfg)


def test_retention_purges_photos_but_keeps_one_still_in_use(index, tmp_path):
    eng = _engine(index, tmp_path / "log.sqlite")
    a = _report(eng, [(PNG, "image/png"), (JPEG, "image/jpeg")])
    b = _report(eng, [(JPEG, "image/jpeg")], minute=7)      # the same photo, another open alert
    for p in eng.tick(_m(10)):
        eng.ack(p.push_id)
    closure = eng.close(a.id, "C-1", outcome="lost", now=_m(20))
    eng.ack(closure.push_id)
    d = Path(str(eng.log.path) + ".photos")
    png = d / f"{hashlib.sha1(PNG).hexdigest()}.png"
    jpg = d / f"{hashlib.sha1(JPEG).hexdigest()}.jpg"
    result = purge_expired(eng.log, 1, _m(20) + dt.timedelta(days=2))
    assert str(png) in result["files"] and not png.exists()
    assert jpg.exists()                                      # b still needs it
    assert any(e["action"] == "purge_photos" for e in eng.log.audit_entries(a.id))
    assert eng.alert(b.id).status == "open"
    eng.shutdown()
    eng.log.close()


def test_photo_store_roundtrip_and_corruption(tmp_path):
    store = PhotoStore(tmp_path / "p")
    ph = store.put(PNG, "image/png", "x")
    assert ph == Photo(hashlib.sha1(PNG).hexdigest(), "image/png", len(PNG), "x")
    assert store.read(ph) == PNG and store.put(PNG, "image/png", "x") == ph
    assert stat.S_IMODE(os.stat(tmp_path / "p").st_mode) == 0o700
    assert [f.name for f in (tmp_path / "p").iterdir()] == [ph.file_name]   # no temp file left
    store.path(ph).write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(gt.CorruptFileError):
        store.read(ph)
    assert store.put(PNG, "image/png", "x") == ph and store.read(ph) == PNG  # a damaged copy is rewritten
    for bad in ({"digest": "zz", "mime_type": "image/png", "size": 1, "desc": ""},
                {"digest": "0" * 40, "mime_type": "image/gif", "size": 1, "desc": ""},
                {"digest": "0" * 40, "mime_type": "image/png", "size": True, "desc": ""}, "x"):
        with pytest.raises(gt.CorruptFileError):
            Photo.from_dict(bad)


def _cli_report(index, tmp_path, capsys, *photos):
    """A CLI report with these photo files (a.png, b.webp), approved at once (by S-1): (its JSON, common args)."""
    from geotarget.cli import main
    index.save(tmp_path / "st")
    (tmp_path / "officers.json").write_text(json.dumps([o.to_dict() for o in OFFICERS]))
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.webp").write_bytes(WEBP)
    common = ["--log", str(tmp_path / "log.sqlite"), "--index", str(tmp_path / "st"),
              "--officers", str(tmp_path / "officers.json"), "--max-location-age", "0"]
    assert main(["alert", "report", *common, "--officer", "S-1", "--lat", "30.27", "--lon", "120.15",
                 "--division", "330102", "--missing-since", "2026-11-23T08:00:00Z",
                 "--now", "2026-11-23T08:05:00Z", *[a for f in photos for a in ("--photo", str(tmp_path / f))],
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out), common


def test_cli_report_photo(index, tmp_path, capsys):
    from geotarget.cli import main
    doc, common = _cli_report(index, tmp_path, capsys, "a.png", "b.webp")
    assert doc["photos"] == [hashlib.sha1(PNG).hexdigest(), hashlib.sha1(WEBP).hexdigest()]
    assert main(["alert", "tick", *common, "--now", "2026-11-23T08:10:00Z", "--json"]) == 0
    capsys.readouterr()
    with gt.RecipientLog(tmp_path / "log.sqlite") as log:
        (push,) = log.pushes(doc["alert_id"], audiences=False)
        _check_message(push.meta["cap_xml"], None, [PNG, WEBP])


def test_update_replaces_photos_and_keeps_the_replaced_until_purge(index, signer, tmp_path):
    """An update's new photos are in its CAP and every later one; the replaced photo stays stored
    (messages already sent point at it) and in the authenticated record, and goes with the alert."""
    eng = _engine(index, tmp_path / "log.sqlite", signer)
    a = _report(eng, [(PNG, "image/png", "old photo")])
    for p in eng.tick(_m(10)):
        eng.ack(p.push_id)
    d = Path(str(eng.log.path) + ".photos")
    png = d / f"{hashlib.sha1(PNG).hexdigest()}.png"
    webp = d / f"{hashlib.sha1(WEBP).hexdigest()}.webp"
    up = eng.update(a.id, "C-1", photos=[(WEBP, "image/webp", "a newer photo")], now=_m(20))
    eng.ack(up.push_id)
    _check_message(up.cap_xml, signer.certificate_pem, [WEBP])
    alert = eng.alert(a.id)
    assert [p["digest"] for p in alert.photos] == [hashlib.sha1(WEBP).hexdigest()]
    assert [p["digest"] for p in alert.photos_before] == [hashlib.sha1(PNG).hexdigest()]
    assert alert.details["headline"] == "Missing girl, 6"          # details untouched
    assert png.exists() and webp.exists()
    # the same after a restart: the record carries both lists
    eng.shutdown()
    eng = _engine(index, tmp_path / "log.sqlite", signer)
    assert [p["digest"] for p in eng.alert(a.id).photos_before] == [hashlib.sha1(PNG).hexdigest()]
    # putting the old photo back takes it out of photos_before; [] removes every photo
    back = eng.update(a.id, "C-1", photos=[(PNG, "image/png")], now=_m(25))
    eng.ack(back.push_id)
    _check_message(back.cap_xml, signer.certificate_pem, [PNG])
    assert [p["digest"] for p in eng.alert(a.id).photos_before] == [hashlib.sha1(WEBP).hexdigest()]
    none = eng.update(a.id, "C-1", {"headline": "Missing girl, 6, in red"}, now=_m(27), photos=[])
    eng.ack(none.push_id)
    assert _resources(none.cap_xml) == [[]] and eng.alert(a.id).photos == []
    closure = eng.close(a.id, "C-1", outcome="lost", now=_m(30))
    _check_message(closure.cap_xml, signer.certificate_pem, [])
    eng.ack(closure.push_id)
    result = purge_expired(eng.log, 1, _m(30) + dt.timedelta(days=2))
    assert str(png) in result["files"] and str(webp) in result["files"]
    assert not png.exists() and not webp.exists()
    with pytest.raises(gt.InvalidInputError):
        eng.update(a.id, "C-1", now=_m(31))                      # neither details nor photos
    eng.shutdown()


def test_bad_update_photos_change_nothing(index, tmp_path):
    eng = _engine(index, tmp_path / "log.sqlite")
    a = _report(eng, [(PNG, "image/png")])
    eng.tick(_m(10))
    before = eng.alert(a.id)
    n = len(eng.log.pushes(a.id, audiences=False))
    for photos, match in (([(b"GIF89a", "image/gif")], "mime_type"), ("face.png", "list"),
                          ([(PNG, "image/png")] * 11, "at most")):
        with pytest.raises(gt.InvalidInputError, match=match):
            eng.update(a.id, "C-1", photos=photos, now=_m(20))
    with pytest.raises(gt.UnknownOfficerError):
        eng.update(a.id, "nobody", photos=[(WEBP, "image/webp")], now=_m(20))
    d = Path(str(eng.log.path) + ".photos")
    assert not (d / f"{hashlib.sha1(WEBP).hexdigest()}.webp").exists()     # nothing stored either
    assert eng.alert(a.id) == before and len(eng.log.pushes(a.id, audiences=False)) == n
    eng.shutdown()


def test_cli_update_photo(index, tmp_path, capsys):
    from geotarget.cli import main
    doc, common = _cli_report(index, tmp_path, capsys, "a.png")
    aid = doc["alert_id"]
    assert main(["alert", "tick", *common, "--now", "2026-11-23T08:10:00Z", "--ack", "--json"]) == 0
    capsys.readouterr()
    assert main(["alert", "update", *common, "--officer", "S-1", aid, "--now", "2026-11-23T08:20:00Z",
                 "--photo", str(tmp_path / "b.webp"), "--json"]) == 0
    capsys.readouterr()
    assert main(["alert", "update", *common, "--officer", "S-1", aid, "--now", "2026-11-23T08:21:00Z",
                 "--photo", str(tmp_path / "b.webp"), "--clear-photos"]) != 0
    capsys.readouterr()
    with gt.RecipientLog(tmp_path / "log.sqlite") as log:
        pushes = log.pushes(aid, audiences=False)
        assert [p.kind for p in pushes] == ["alert", "update"]
        _check_message(pushes[0].meta["cap_xml"], None, [PNG])
        _check_message(pushes[1].meta["cap_xml"], None, [WEBP])

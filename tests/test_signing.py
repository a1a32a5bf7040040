"""Signed CAP: every message verifies against the sender's certificate, and nothing else does.

Verified two ways: with geotarget's own ``verify_cap`` (which pins the
expected certificate) and with ``capvalidator``, the independent OASIS CAP
validator (schema and signature), as a partner app would run it.
"""
import datetime as dt
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

import geotarget as gt
from geotarget.alerts.cap import KINDS, parse_identifiers, render_push
from geotarget.alerts.signing import CapSigner, self_signed, verify_cap

capvalidator = pytest.importorskip("capvalidator")
UTC = dt.timezone.utc
SENT = dt.datetime(2026, 11, 23, 8, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    return self_signed("test sender", tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa sender")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(SENT - dt.timedelta(days=1))
            .not_valid_after(SENT + dt.timedelta(days=365)).sign(key, hashes.SHA256()))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "key.pem", d / "cert.pem"


def _render(kind, signer, **kw):
    refs = [] if kind == "alert" else [("s@x", "GT-1.0", SENT)]
    args = dict(identifier=f"GT-1.{KINDS.index(kind) + 1}", sender="s@x", sent=SENT, kind=kind,
                lat=30.27, lon=120.15, radius_km=100.0, references=refs,
                outcome="lost" if kind == "closure" else None, signer=signer)
    args.update(kw)
    return render_push(**args)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_signed_validates_with_capvalidator(signer, kind):
    xml = _render(kind, signer)
    res = capvalidator.validate_cap_message(xml.encode("utf-8"), strict=True)
    assert res.passed, res.message
    assert verify_cap(xml, signer.certificate_pem)
    # the signed message still reads back as the same CAP message
    assert parse_identifiers(xml)["identifier"] == f"GT-1.{KINDS.index(kind) + 1}"


def test_rsa_key_with_password(rsa_files):
    key, cert = rsa_files
    s = CapSigner(key, cert, password="secret")
    xml = _render("closure", s)
    assert "rsa-sha256" in xml
    assert capvalidator.validate_cap_message(xml.encode(), strict=True).passed
    verify_cap(xml, cert)


@pytest.mark.parametrize("edit", [
    ("<headline>", "<headline>X"),                 # text changed
    ("Rescue", "Other"),                           # a code changed
    ("30.270000,120.150000 100", "30.270000,120.150000 500"),   # the area widened
    ("<msgType>Update</msgType>", "<msgType>Cancel</msgType>"),
])
def test_message_changed_after_signing_fails(signer, edit):
    xml = _render("closure", signer)
    assert edit[0] in xml
    forged = xml.replace(edit[0], edit[1], 1)
    with pytest.raises(gt.SignatureError, match="does not verify"):
        verify_cap(forged, signer.certificate_pem)
    assert not capvalidator.validate_cap_message(forged.encode(), strict=True).passed


def test_signed_by_another_key_fails_against_pinned_cert(signer, tmp_path):
    """A forger's own valid signature passes capvalidator (it trusts the embedded cert) but not us."""
    forger = self_signed("test sender", tmp_path)
    xml = _render("alert", forger)
    assert capvalidator.validate_cap_message(xml.encode(), strict=True).passed
    with pytest.raises(gt.SignatureError):
        verify_cap(xml, signer.certificate_pem)


def test_unsigned_message_refused(signer):
    xml = _render("alert", None)
    with pytest.raises(gt.SignatureError, match="no enveloped signature"):
        verify_cap(xml, signer.certificate_pem)


def test_signature_moved_out_of_place_refused(signer):
    xml = _render("alert", signer)
    head, sig = xml.split("<ds:Signature", 1)
    sig, tail = sig.split("</ds:Signature>", 1)
    moved = head.replace("<info>", "<info><ds:Signature" + sig + "</ds:Signature>", 1) + tail
    with pytest.raises(gt.SignatureError):
        verify_cap(moved, signer.certificate_pem)


@settings(max_examples=25, deadline=None)
@given(headline=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
       description=st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Lo", "Zs", "Nd", "Po"),
                                                  whitelist_characters="\r\n\t<>&\"'"), max_size=80))
def test_any_text_signs_and_verifies(signer, headline, description):
    xml = _render("update", signer, headline=headline, description=description)
    assert capvalidator.validate_cap_message(xml.encode("utf-8"), strict=True).passed
    verify_cap(xml, signer.certificate_pem)


def test_key_file_is_private(tmp_path):
    self_signed("x", tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "signing-key.pem").st_mode) == 0o600


@pytest.mark.parametrize("which,value,match", [
    ("key", b"not a key", "cannot load the private key"),
    ("cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM X.509"),
    ("cert", "/nonexistent/cert.pem", "cannot read"),
    ("key", 42, "must be PEM bytes"),
])
def test_bad_key_material(tmp_path, which, value, match):
    self_signed("y", tmp_path)
    files = {"key": tmp_path / "signing-key.pem", "cert": tmp_path / "signing-cert.pem"}
    files[which] = value
    with pytest.raises(gt.GeotargetError, match=match):
        CapSigner(files["key"], files["cert"])


def test_key_and_cert_must_match(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    self_signed("a", a)
    self_signed("b", b)
    with pytest.raises(gt.SignatureError, match="do not belong together"):
        CapSigner(a / "signing-key.pem", b / "signing-cert.pem")


def test_corrupt_signed_xml_is_signature_error(signer):
    with pytest.raises(gt.SignatureError, match="well-formed"):
        verify_cap("<alert", signer.certificate_pem)


def test_engine_signs_every_push(signer, make_store, make_engine_on, officers):
    """Every push the engine returns, the closure included, verifies against the pinned certificate."""
    index = gt.SpatialIndex.build(make_store(4000, seed=1, spread=1.5))
    eng = make_engine_on(index, officers, signer=signer)
    log = eng.log
    t0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    a = eng.report("C-1", lat=30.27, lon=120.15, missing_since=t0, division="330102",
                   details={"headline": "Missing girl, 6"}, now=t0 + dt.timedelta(minutes=10))
    eng.approve(a.id, "S-1", now=t0 + dt.timedelta(minutes=12))
    pushes = list(eng.tick(t0 + dt.timedelta(minutes=20))) + list(eng.tick(t0 + dt.timedelta(minutes=70)))
    pushes.append(eng.close(a.id, "C-1", outcome="lost", now=t0 + dt.timedelta(minutes=90)))
    assert [p.kind for p in pushes] == ["alert", "expand", "closure"]
    for p in pushes:
        verify_cap(p.cap_xml, signer.certificate_pem)
    # what was logged is what was signed: a replayed push carries the same signed bytes
    assert log.push(pushes[-1].push_id).meta["cap_xml"] == pushes[-1].cap_xml
    with pytest.raises(gt.InvalidInputError, match="signer"):
        gt.AlertEngine(index, log=log, authority=gt.Authority(officers), signer="key.pem")
    log.close()

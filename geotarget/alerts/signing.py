"""Enveloped XML signatures on CAP messages, so partner apps can reject forged alerts.

IPAWS requires its senders to sign every CAP message with an enveloped XML
digital signature (XML-DSig, W3C).  A platform that exists partly to stop
rumours needs the same: a partner app that receives "child found" must be able
to tell the police's message from a copy someone edited.  The signing and
verification are `signxml`'s (on lxml and `cryptography`); this module only
chooses the algorithms, loads key material as untrusted input and maps every
failure onto :class:`~geotarget.errors.SignatureError`.

Choices
-------
* **RSA-SHA256 or ECDSA-SHA256 with SHA-256 digests,** by the key's type.
  Both are in every XML-DSig verifier, the OASIS CAP validators included.
* **Exclusive canonicalisation** (``xml-exc-c14n#``): the signature covers the
  ``<alert>`` element's content as parsed, independent of namespace
  declarations a relay adds around it.
* **The certificate travels in ``<ds:KeyInfo>``,** as IPAWS does, so a receiver
  can read who signed; it proves nothing by itself.  Authenticity comes from
  checking against a certificate the receiver already trusts:
  :func:`verify_cap` therefore requires the expected certificate and refuses
  a message signed by any other key.
* **The signed document has no indentation.**  Whitespace between elements is
  content for XML-DSig, and common validators (``capvalidator`` among them)
  strip blank text before they verify; a compact document verifies the same
  either way.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidInputError, SignatureError
from ..geo import check_int

__all__ = ["CapSigner", "verify_cap", "self_signed", "DSIG_NS"]

DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
_EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"


def _read_pem(value, name: str) -> bytes:
    """PEM bytes from bytes, a PEM string, or a path to a file."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and "-----BEGIN " in value:
        return value.encode("ascii", "replace")
    if isinstance(value, (str, os.PathLike)):
        try:
            return Path(value).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"{name}={os.fspath(value)!r}: cannot read: {exc.strerror}") from None
    raise InvalidInputError(f"{name} must be PEM bytes, a PEM string or a file path, "
                            f"got {type(value).__name__}")


def _load_cert(value, name: str = "cert"):
    from cryptography import x509
    pem = _read_pem(value, name)
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SignatureError(f"{name}: not a PEM X.509 certificate ({exc})") from None


class CapSigner:
    """Signs CAP messages with one private key and its certificate.

    ``key`` and ``cert`` are PEM bytes, PEM strings or file paths;
    ``password`` decrypts an encrypted key.  The key must belong to the
    certificate (checked here, so a mismatched pair fails at start-up, not on
    the first alert).
    """

    def __init__(self, key, cert, password: bytes | str | None = None):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        if isinstance(password, str):
            password = password.encode()
        if password is not None and not isinstance(password, bytes):
            raise InvalidInputError(f"password must be str or bytes, got {type(password).__name__}")
        try:
            self._key = serialization.load_pem_private_key(_read_pem(key, "key"), password=password)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"key: cannot load the private key ({exc})") from None
        if isinstance(self._key, rsa.RSAPrivateKey):
            self._algorithm = "rsa-sha256"
        elif isinstance(self._key, ec.EllipticCurvePrivateKey):
            self._algorithm = "ecdsa-sha256"
        else:
            raise SignatureError(f"key: {type(self._key).__name__} keys are not supported; "
                                 f"use RSA or ECDSA")
        self._cert = _load_cert(cert)
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if (self._cert.public_key().public_bytes(enc, pub)
                != self._key.public_key().public_bytes(enc, pub)):
            raise SignatureError("key and cert do not belong together (the certificate names "
                                 "another public key)")
        self._cert_pem = self._cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def certificate_pem(self) -> str:
        """The signer's certificate, for receivers to pin."""
        return self._cert_pem

    @property
    def subject(self) -> str:
        return self._cert.subject.rfc4514_string()

    def sign(self, xml: str | bytes) -> str:
        """``xml`` (a CAP document) with an enveloped ``<ds:Signature>`` as the root's last child.

        Give it a document without indentation (``render_push(signer=...)``
        writes one): whitespace between elements is signed content, and
        validators that strip it before verifying would then fail.
        """
        from lxml import etree
        from signxml import XMLSigner

        if isinstance(xml, str):
            xml = xml.encode("utf-8")
        try:
            root = etree.fromstring(xml, etree.XMLParser(resolve_entities=False))
        except etree.XMLSyntaxError as exc:
            raise InvalidInputError(f"xml is not well-formed: {exc}") from None
        signer = XMLSigner(signature_algorithm=self._algorithm, digest_algorithm="sha256",
                           c14n_algorithm=_EXC_C14N)
        signed = signer.sign(root, key=self._key, cert=self._cert_pem)
        body = etree.tostring(signed, encoding="unicode")
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def verify_cap(xml: str | bytes, cert) -> bytes:
    """Check a signed CAP message against the certificate the receiver trusts.

    Returns the signed ``<alert>`` as canonical bytes: what a receiver should
    act on, since only the signed content is vouched for.  Raises
    :class:`SignatureError` when the message is unsigned, altered after
    signing, or signed by any key but ``cert``'s.
    """
    from lxml import etree
    from signxml import InvalidInput, InvalidSignature, XMLVerifier

    certificate = _load_cert(cert)
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not isinstance(xml, (bytes, bytearray)):
        raise InvalidInputError(f"xml must be str or bytes, got {type(xml).__name__}")
    try:
        root = etree.fromstring(bytes(xml), etree.XMLParser(resolve_entities=False))
    except etree.XMLSyntaxError as exc:
        raise SignatureError(f"xml is not well-formed: {exc}") from None
    if root.find(f"{{{DSIG_NS}}}Signature") is None:
        raise SignatureError("the CAP message carries no enveloped signature")
    try:
        result = XMLVerifier().verify(root, x509_cert=certificate)
    except (InvalidSignature, InvalidInput, etree.DocumentInvalid) as exc:
        raise SignatureError(f"the CAP message's signature does not verify: {exc}") from None
    return etree.tostring(result.signed_xml, method="c14n")


def self_signed(common_name: str, directory, *, days: int = 30, curve: str = "secp256r1"):
    """Write a new ECDSA key and a self-signed certificate into ``directory``; return the signer.

    For drills, the demo and tests: a real deployment signs with a key and a
    certificate issued by the platform's certificate authority.  The key file
    is created 0600 (``signing-key.pem``, ``signing-cert.pem``).
    """
    import datetime as _dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not isinstance(common_name, str) or not common_name:
        raise InvalidInputError(f"common_name must be a non-empty string, got {common_name!r}")
    days = check_int(days, "days", 1)
    try:
        key = ec.generate_private_key(getattr(ec, curve.upper())())
    except AttributeError:
        raise InvalidInputError(f"curve={curve!r} is not an elliptic curve cryptography knows") from None
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_path, cert_path = d / "signing-key.pem", d / "signing-cert.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CapSigner(key_path, cert_path)

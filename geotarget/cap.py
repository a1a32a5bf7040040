"""Render pushes as OASIS CAP 1.2 messages.

Every push the engine returns carries one CAP 1.2 ``<alert>`` (namespace
:data:`CAP_NS`) so dispatch services and public-warning gateways can relay it
unchanged.  The mapping from push kind to CAP is fixed (docs/design.md, CAP 1.2):

============  =========  ============================================
kind          msgType    extra
============  =========  ============================================
alert         Alert      (the first message, references nothing)
expand        Update     references every earlier message
topup         Update     references every earlier message
update        Update     references every earlier message
closure       Update     references, responseType AllClear, outcome in text
retraction    Cancel     references every earlier message
============  =========  ============================================

Fixed values: status Actual (overridable for drills), scope Public, event
"Child Abduction Emergency" with SAME code CAE, category Rescue, urgency
Immediate, severity Severe.  Certainty is ``Observed``: CAP defines it as
"determined to have occurred", and an alert is only published after the
police have confirmed the child is missing (seed 001: "确属失踪的").  The
AMBER example in the CAP spec says Likely because there the abduction itself
is suspected; our alerts cover every confirmed disappearance.  The area is a
single WGS 84 ``<circle>lat,lon radius_km</circle>``.

A ``kind`` parameter (and ``outcome`` on closures) lets receivers tell an
expansion from a text update, which CAP's msgType alone cannot.

Text goes through :mod:`xml.etree.ElementTree`, which escapes ``<`` ``&``
``>``; characters XML 1.0 cannot carry at all (most C0 controls, lone
surrogates, U+FFFE/U+FFFF) are refused rather than silently dropped.  A
carriage return is written as ``&#13;`` because XML parsers otherwise
normalise it to a line feed, and a message must read back as it was written.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Mapping, Sequence

from ._text import LANGUAGE_TAG, check_translations
from .errors import InvalidInputError
from .geo import HALF_CIRCUMFERENCE_KM, check_aware, check_point, check_radius
from .model import KINDS
from .stats import check_outcome

__all__ = ["CAP_NS", "KINDS", "MSG_TYPES", "EVENT", "render_push", "parse_identifiers",
           "format_sent", "outcome_text"]

CAP_NS = "urn:oasis:names:tc:emergency:cap:1.2"
EVENT = "Child Abduction Emergency"
MSG_TYPES = {"alert": "Alert", "expand": "Update", "topup": "Update", "update": "Update",
             "closure": "Update", "retraction": "Cancel"}
STATUSES = ("Actual", "Exercise", "System", "Test", "Draft")
#: Parameter names this module sets itself.
_RESERVED_PARAMS = ("kind", "outcome")

# XML 1.0 Char production, complemented.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# CAP 1.2 §3.2.1: identifiers and senders "MUST NOT include spaces, commas or
# restricted characters (< and &)"; any whitespace would break the
# space-separated <references> list too.
_BAD_TOKEN_CHAR = re.compile(r"[\s,<&]")
# xs:language
_LANGUAGE = LANGUAGE_TAG

# Wording of the messages the engine writes itself, by primary language subtag;
# anything not Chinese gets English.
_OUTCOME_LABELS = {
    "rescued_trafficking": ("被解救(拐卖)", "rescued from trafficking"),
    "runaway": ("离家出走", "ran away from home"),
    "lost": ("迷路走失", "got lost"),
    "drowned": ("不幸溺亡", "drowned"),
    "killed": ("不幸遇害", "killed"),
    "accident": ("意外死亡", "died in an accident"),
    "visiting_friends": ("在同学或朋友家", "visiting friends"),
    "other": ("其他原因", "other circumstances"),
    "not_found": ("未找回", "not found"),
}
_TEXT = {
    "zh": {
        "headline": "儿童失踪紧急信息",
        "found": "孩子已找到",
        "not_found": "结案:孩子尚未找回",
        "found_desc": "结案说明:该失踪儿童已找到。情况:{label}。感谢社会各界的关注和帮助。",
        "not_found_desc": "结案说明:本次儿童失踪信息已结案,孩子尚未找回。",
        "retracted": "撤销",
        "retracted_desc": "此前发布的儿童失踪信息有误,现予撤销。",
        "found_instruction": "孩子已找到,无需再留意或报告线索。",
        "not_found_instruction": "本次信息推送已结束。如仍有线索,可向当地公安机关报告。",
        "retracted_instruction": "请忽略此前发布的信息,无需采取任何行动。",
        "area": "以 {lat},{lon} 为中心半径 {r} 公里范围",
        "sep": ":",
        "exercise": "【演练,非真实警报】",
    },
    "en": {
        "headline": "Missing child emergency",
        "found": "Child found",
        "not_found": "Case closed: child not found",
        "found_desc": ("Case closed: the missing child has been found. Circumstances: {label}. "
                       "Thank you to everyone who helped."),
        "not_found_desc": "Case closed: the alert has ended and the child has not been found.",
        "retracted": "Retracted",
        "retracted_desc": "The earlier missing-child alert was issued in error and is withdrawn.",
        "found_instruction": "The child has been found: no need to look out or report sightings.",
        "not_found_instruction": ("This alert has ended. Information can still be reported to the "
                                  "local police."),
        "retracted_instruction": "Disregard the earlier message; no action is needed.",
        "area": "Within {r} km of {lat},{lon}",
        "sep": ": ",
        "exercise": "[EXERCISE, NOT A REAL ALERT] ",
    },
}


def _lang(language: str) -> str:
    return "zh" if language.split("-", 1)[0].lower() == "zh" else "en"


def outcome_text(outcome: str, language: str = "zh-CN") -> str:
    """The closure statement the CAP description opens with, in ``language``."""
    check_outcome(outcome)
    lang = _lang(language)
    t = _TEXT[lang]
    if outcome == "not_found":
        return t["not_found_desc"]
    label = _OUTCOME_LABELS[outcome][0 if lang == "zh" else 1]
    return t["found_desc"].format(label=label)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

def _check_text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    bad = _NOT_XML_CHAR.search(value)
    if bad:
        raise InvalidInputError(
            f"{name} contains U+{ord(bad.group()):04X} at position {bad.start()}, "
            "which XML 1.0 cannot carry")
    return value


def _check_token(value: object, name: str) -> str:
    _check_text(value, name)
    if not value:
        raise InvalidInputError(f"{name} must not be empty")
    bad = _BAD_TOKEN_CHAR.search(value)  # type: ignore[arg-type]
    if bad:
        raise InvalidInputError(
            f"{name}={value!r} contains {bad.group()!r}; CAP forbids spaces, commas, '<' and '&' here")
    return value  # type: ignore[return-value]


def format_sent(when: _dt.datetime, name: str = "sent") -> str:
    """CAP dateTime: ``YYYY-MM-DDThh:mm:ss+hh:mm``, whole seconds, explicit offset.

    The caller's offset is kept (``+08:00`` stays ``+08:00``; UTC is written
    ``+00:00``, never ``Z`` or ``-00:00``).  Fractions of a second are
    truncated because CAP has no place for them.  An offset with seconds
    (historic local mean time) cannot be written, so such times go out in UTC.
    """
    check_aware(when, name)
    off = when.utcoffset()
    if off.seconds % 60 or off.microseconds:  # type: ignore[union-attr]
        try:
            when = when.astimezone(_dt.timezone.utc)
        except OverflowError:
            raise InvalidInputError(f"{name}={when!r} is out of range") from None
    return when.replace(microsecond=0).isoformat(timespec="seconds")


def _fmt_num(x: float, places: int) -> str:
    # round first so -0.0000001 prints as 0.000000, not -0.000000
    s = f"{round(x, places) + 0.0:.{places}f}"
    return s


def _fmt_radius(r: float) -> str:
    s = _fmt_num(r, 3).rstrip("0").rstrip(".")
    return s or "0"


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------

def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, f"{{{CAP_NS}}}{tag}")
    if text is not None:
        el.text = text
    return el


#: valueName of the division code in ``<geocode>`` (China's adcodes are GB/T 2260 codes).
GEOCODE_NAME = "GB/T 2260"


def _pair(parent: ET.Element, tag: str, name: str, value: str) -> None:
    el = _sub(parent, tag)
    _sub(el, "valueName", name)
    _sub(el, "value", value)


def render_push(*, identifier: str, sender: str, sent: _dt.datetime, kind: str,
                lat: float, lon: float, radius_km: float,
                references: Sequence[tuple[str, str, _dt.datetime]] = (),
                headline: str = "", description: str = "", instruction: str = "",
                area_desc: str = "", outcome: str | None = None, language: str = "zh-CN",
                contact: str = "", web: str = "", expires: _dt.datetime | None = None,
                parameters: Mapping[str, str] = {}, sender_name: str = "",
                note: str = "", status: str = "Actual", signer=None, event: str = EVENT,
                event_code: str = "CAE",
                translations: Mapping[str, Mapping[str, str]] = {}, geocode: str = "",
                circle: bool = True, resources: Sequence[Mapping[str, object]] = ()) -> str:
    """One push as a CAP 1.2 XML document (a ``str`` with a UTF-8 declaration).

    ``references`` are ``(sender, identifier, sent)`` of *every* earlier
    message of the alert, oldest first.  They are refused for ``alert``; a
    follow-up may have none only when nothing went out before it (an alert
    closed or updated before its first push), and then carries no
    ``<references>`` element.  ``outcome`` is required for ``closure`` and
    refused otherwise.  Empty ``headline`` and ``area_desc`` get a default in
    ``language`` (Chinese for ``zh*``, else English); closures and retractions
    prefix the headline, open the description with what happened, and carry
    an instruction that says what to do now (nothing, for a found child)
    unless ``instruction`` is given.
    ``geocode`` is the alert's administrative division code (GB/T 2260
    adcode), carried as ``<geocode>`` with valueName ``GEOCODE_NAME``; with
    ``circle=False`` (an alert over a whole division) the area is that code
    and ``area_desc`` alone, without a ``<circle>``, and then both are required.
    Encode the result as UTF-8 before handing it to byte-oriented parsers.

    ``translations`` maps further language tags to their own texts
    (``headline``, ``description``, ``instruction``, ``area_desc``; any may be
    missing): each becomes an ``<info>`` of its own after the first, with
    the same event, area and parameters, and the engine's own wording
    (closures, retractions, defaults) in that language.

    ``resources`` are photos: mappings with ``desc``, ``mime_type``, ``size``
    (bytes), ``uri`` and ``digest`` (SHA-1, 40 hex digits, as CAP 1.2 names
    it); each becomes a ``<resource>`` in every ``<info>``.

    ``signer`` (a :class:`~geotarget.signing.CapSigner`) adds an enveloped
    XML signature as the alert's last child; the signed document is written
    without indentation (see :mod:`geotarget.signing`).
    """
    if geocode:
        _check_token(geocode, "geocode")
    if not circle and not (geocode and area_desc):
        raise InvalidInputError("circle=False (a division-wide area) needs geocode and area_desc")
    if kind not in MSG_TYPES:
        raise InvalidInputError(f"kind={kind!r} must be one of {', '.join(KINDS)}")
    if status not in STATUSES:
        raise InvalidInputError(f"status={status!r} must be one of {', '.join(STATUSES)}")
    identifier = _check_token(identifier, "identifier")
    sender = _check_token(sender, "sender")
    sent_s = format_sent(sent, "sent")
    try:
        lat, lon = check_point(lat, lon)
    except InvalidInputError as exc:
        raise InvalidInputError(f"lat/lon: {exc}") from None
    r = check_radius(radius_km)
    if r > HALF_CIRCUMFERENCE_KM:
        raise InvalidInputError(
            f"radius_km={r!r} exceeds half the Earth's circumference ({HALF_CIRCUMFERENCE_KM:.3f} km)")
    for name, value in (("headline", headline), ("description", description),
                        ("instruction", instruction), ("area_desc", area_desc),
                        ("contact", contact), ("sender_name", sender_name), ("note", note)):
        _check_text(value, name)
    _check_text(event, "event")
    if not event.strip():
        raise InvalidInputError("event must not be blank")
    if not isinstance(event_code, str) or not re.fullmatch(r"[A-Z]{3}", event_code):
        raise InvalidInputError(f"event_code={event_code!r} must be a three-letter SAME code")
    _check_text(language, "language")
    if not _LANGUAGE.fullmatch(language):
        raise InvalidInputError(f"language={language!r} is not a language tag such as 'zh-CN'")
    _check_text(web, "web")
    if web:
        parts = urllib.parse.urlsplit(web)
        if parts.scheme not in ("http", "https") or not parts.netloc or re.search(r"\s", web):
            raise InvalidInputError(f"web={web!r} must be an absolute http(s) URL without spaces")
    expires_s = None
    if expires is not None:
        expires_s = format_sent(expires, "expires")
        if check_aware(expires) <= check_aware(sent):
            raise InvalidInputError(
                f"expires={expires.isoformat()} must be after sent={sent.isoformat()}")

    if kind == "closure":
        if outcome is None:
            raise InvalidInputError("outcome is required for a closure (one of the stats OUTCOMES)")
        check_outcome(outcome)
    elif outcome is not None:
        raise InvalidInputError(f"outcome={outcome!r} given for kind={kind!r}; only closures have one")

    if not isinstance(parameters, Mapping):
        raise InvalidInputError(f"parameters must be a mapping, got {type(parameters).__name__}")
    params: list[tuple[str, str]] = []
    for pname, pvalue in parameters.items():
        _check_text(pname, "parameters name")
        _check_text(pvalue, f"parameters[{pname!r}]")
        if not pname.strip():
            raise InvalidInputError(f"parameters name {pname!r} must not be blank")
        if pname in _RESERVED_PARAMS:
            raise InvalidInputError(f"parameters[{pname!r}] is set by geotarget itself; use another name")
        params.append((pname, pvalue))

    refs = _check_references(references, kind, sender, identifier)
    res = _check_resources(resources)

    lat_s, lon_s, r_s = _fmt_num(lat, 6), _fmt_num(lon, 6), _fmt_radius(r)
    blocks = [(language, {"headline": headline, "description": description,
                          "instruction": instruction, "area_desc": area_desc})]
    blocks += list(check_translations(translations, "translations", _TRANSLATED,
                                      lambda v, n, k: _check_text(v, n), _check_text,
                                      taken=(language,)).items())
    if status == "Exercise":
        note = note or _TEXT[_lang(language)]["exercise"].strip()

    root = ET.Element(f"{{{CAP_NS}}}alert")
    _sub(root, "identifier", identifier)
    _sub(root, "sender", sender)
    _sub(root, "sent", sent_s)
    _sub(root, "status", status)
    _sub(root, "msgType", MSG_TYPES[kind])
    _sub(root, "scope", "Public")
    if note:
        _sub(root, "note", note)
    if refs:
        _sub(root, "references", refs)
    for tag, texts in blocks:
        headline, description, instruction, area_desc = (
            texts.get(k, "") for k in ("headline", "description", "instruction", "area_desc"))
        t = _TEXT[_lang(tag)]
        if kind == "closure":
            lead = t["not_found"] if outcome == "not_found" else t["found"]
            headline = f"{lead}{t['sep']}{headline}" if headline else lead
            description = outcome_text(outcome, tag) + ("\n\n" + description if description else "")
            # An all-clear must not repeat the alert's "look out, call 110": it says what to do now.
            instruction = instruction or t["not_found_instruction" if outcome == "not_found"
                                           else "found_instruction"]
        elif kind == "retraction":
            headline = f"{t['retracted']}{t['sep']}{headline or t['headline']}"
            description = t["retracted_desc"] + ("\n\n" + description if description else "")
            instruction = instruction or t["retracted_instruction"]
        else:
            headline = headline or t["headline"]
        if status == "Exercise":
            # A drill must be impossible to take for a real alert, whatever reads only the text.
            headline = t["exercise"] + headline
        # a division-wide area has no circle to describe: it keeps the division's own names
        area_desc = area_desc or (t["area"].format(lat=lat_s, lon=lon_s, r=r_s) if circle
                                  else blocks[0][1]["area_desc"])

        info = _sub(root, "info")
        _sub(info, "language", tag)
        _sub(info, "category", "Rescue")
        _sub(info, "event", event)
        if kind == "closure":
            _sub(info, "responseType", "AllClear")
        _sub(info, "urgency", "Immediate")
        _sub(info, "severity", "Severe")
        _sub(info, "certainty", "Observed")
        _pair(info, "eventCode", "SAME", event_code)
        if expires_s is not None:
            _sub(info, "expires", expires_s)
        if sender_name:
            _sub(info, "senderName", sender_name)
        _sub(info, "headline", headline)
        if description:
            _sub(info, "description", description)
        if instruction:
            _sub(info, "instruction", instruction)
        if web:
            _sub(info, "web", web)
        if contact:
            _sub(info, "contact", contact)
        _pair(info, "parameter", "kind", kind)
        if outcome is not None:
            _pair(info, "parameter", "outcome", outcome)
        for pname, pvalue in params:
            _pair(info, "parameter", pname, pvalue)
        for r in res:
            el = _sub(info, "resource")
            _sub(el, "resourceDesc", r["desc"])
            _sub(el, "mimeType", r["mime_type"])
            _sub(el, "size", str(r["size"]))
            _sub(el, "uri", r["uri"])
            _sub(el, "digest", r["digest"])
        area = _sub(info, "area")
        _sub(area, "areaDesc", area_desc)
        if circle:
            _sub(area, "circle", f"{lat_s},{lon_s} {r_s}")
        if geocode:
            _pair(area, "geocode", GEOCODE_NAME, geocode)

    if signer is None:
        ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode", default_namespace=CAP_NS)
    # only text content can hold a raw CR (we write no attributes but xmlns)
    body = body.replace("\r", "&#13;")
    doc = '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"
    return doc if signer is None else signer.sign(doc)


def _check_resources(resources) -> list[dict]:
    if isinstance(resources, (str, bytes, Mapping)) or not isinstance(resources, Sequence):
        raise InvalidInputError(f"resources must be a sequence of mappings, got {type(resources).__name__}")
    out = []
    for i, r in enumerate(resources):
        if not isinstance(r, Mapping) or set(r) != {"desc", "mime_type", "size", "uri", "digest"}:
            raise InvalidInputError(f"resources[{i}] must be a mapping with exactly desc, mime_type, "
                                    f"size, uri and digest")
        desc = _check_text(r["desc"], f"resources[{i}].desc")
        if not desc.strip():
            raise InvalidInputError(f"resources[{i}].desc must not be blank")
        mime = r["mime_type"]
        if not isinstance(mime, str) or not re.fullmatch(r"[a-z]+/[a-z0-9.+-]+", mime):
            raise InvalidInputError(f"resources[{i}].mime_type={mime!r} is not a MIME type")
        size = r["size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInputError(f"resources[{i}].size={size!r} must be a whole number of bytes")
        uri = r["uri"]
        if not isinstance(uri, str) or not re.fullmatch(r"https?://\S+", uri):
            raise InvalidInputError(f"resources[{i}].uri={uri!r} must be an absolute http(s) URL")
        digest = r["digest"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{40}", digest):
            raise InvalidInputError(f"resources[{i}].digest={digest!r} must be a SHA-1 in hex")
        out.append({"desc": desc, "mime_type": mime, "size": size, "uri": uri, "digest": digest})
    return out


_TRANSLATED = ("headline", "description", "instruction", "area_desc")


def _check_references(references, kind: str, sender: str, identifier: str) -> str:
    if isinstance(references, (str, bytes)):
        raise InvalidInputError(
            "references must be a sequence of (sender, identifier, sent) triples, not a string")
    try:
        refs = list(references)
    except TypeError:
        raise InvalidInputError(
            f"references must be a sequence of (sender, identifier, sent) triples, got {references!r}"
        ) from None
    if kind == "alert":
        if refs:
            raise InvalidInputError(
                f"kind='alert' is the first message of an alert and cannot carry references ({len(refs)} given)")
        return ""
    out = []
    seen = set()
    for i, ref in enumerate(refs):
        try:
            rsender, rid, rsent = ref
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"references[{i}] = {ref!r} must be a (sender, identifier, sent) triple") from None
        _check_token(rsender, f"references[{i}] sender")
        _check_token(rid, f"references[{i}] identifier")
        rsent_s = format_sent(rsent, f"references[{i}] sent")
        if (rsender, rid) == (sender, identifier):
            raise InvalidInputError(f"references[{i}] is this message ({identifier}) itself")
        if (rsender, rid) in seen:
            raise InvalidInputError(f"references[{i}] repeats {rsender},{rid}")
        seen.add((rsender, rid))
        out.append(f"{rsender},{rid},{rsent_s}")
    return " ".join(out)


# ---------------------------------------------------------------------------
# reading back
# ---------------------------------------------------------------------------

def parse_identifiers(xml: str | bytes) -> dict:
    """The routing fields of a CAP 1.2 message.

    Returns ``identifier``, ``sender``, ``sent`` (the string as written),
    ``status``, ``msgType``, ``references`` (a list of ``(sender, identifier,
    sent)`` string triples, oldest first), ``response_types``, ``parameters``
    (dict) and ``circles`` (list of ``(lat, lon, radius_km)`` floats).
    Malformed XML or a non-CAP-1.2 root raises :class:`InvalidInputError`.
    """
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not isinstance(xml, (bytes, bytearray)):
        raise InvalidInputError(f"xml must be str or bytes, got {type(xml).__name__}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidInputError(f"xml is not well-formed: {exc}") from None
    if root.tag != f"{{{CAP_NS}}}alert":
        raise InvalidInputError(f"xml root is {root.tag!r}, not a CAP 1.2 alert")
    ns = {"c": CAP_NS}

    def text(path: str) -> str | None:
        el = root.find(path, ns)
        return None if el is None else (el.text or "")

    out: dict = {k: text(f"c:{k}") for k in ("identifier", "sender", "sent", "status", "msgType")}
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise InvalidInputError(f"CAP message lacks required element(s) {missing}")
    refs = []
    for i, triple in enumerate((text("c:references") or "").split()):
        parts = triple.split(",")
        if len(parts) != 3:
            raise InvalidInputError(f"references entry {i} = {triple!r} is not sender,identifier,sent")
        refs.append(tuple(parts))
    out["references"] = refs
    out["response_types"] = [el.text or "" for el in root.iterfind("c:info/c:responseType", ns)]
    out["parameters"] = {p.findtext("c:valueName", "", ns): p.findtext("c:value", "", ns)
                         for p in root.iterfind("c:info/c:parameter", ns)}
    circles = []
    for el in root.iterfind("c:info/c:area/c:circle", ns):
        try:
            point, radius = (el.text or "").split()
            clat, clon = point.split(",")
            c = (float(clat), float(clon), float(radius))
        except ValueError:
            raise InvalidInputError(f"circle {el.text!r} is not 'lat,lon radius'") from None
        if not all(math.isfinite(v) for v in c):
            raise InvalidInputError(f"circle {el.text!r} is not finite")
        circles.append(c)
    out["circles"] = circles
    return out

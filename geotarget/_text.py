"""The alert texts officers type: checked once, when they enter the engine.

Every push copies the details into a CAP message, so a text that cannot be
rendered, or that a dispatcher refuses, would fail every push of the alert, and
a huge one would be copied into every push.  The limits follow what the
dispatch chain accepts:

* ``headline``: 160 characters, one line.  The CAP 1.2 specification names
  160 characters as "a useful target limit for headline length"; cell
  broadcast (WEA) carries at most 360 characters for a whole message.
* ``description`` 4,000 and ``instruction`` 2,000 characters, line breaks
  allowed: room for a full description of the child for apps and web pages,
  which show the whole text, without letting one alert copy megabytes into
  every push.  Broadcast channels shorten the text themselves.
* ``area``: 500 characters, one line (``areaDesc``).
* ``translations``: the same four texts in further languages, as
  ``{"en-US": {"headline": ..., ...}}``, each under the same limits.
* any other detail: a string of up to 1,000 characters or a finite number,
  bool or null; at most 32 keys of up to 64 characters; 32 KiB of JSON in all
  (the longest texts above, in Chinese, are about 18 KiB of UTF-8).

"Printable" is Python's ``str.isprintable`` (no control, format, surrogate,
private-use or unassigned characters, no line or paragraph separator), plus
``\\n`` and ``\\t`` in the multi-line fields: XML 1.0 cannot carry most C0
controls at all, and the others hide text from the person reading the alert.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from .errors import InvalidInputError

#: name -> (maximum characters, line breaks allowed)
LIMITS = {
    "headline": (160, False),
    "description": (4000, True),
    "instruction": (2000, True),
    "area": (500, False),
}
OTHER_MAX_CHARS = 1000
MAX_KEYS = 32
MAX_KEY_CHARS = 64
MAX_JSON_BYTES = 32 * 1024


def check_text(value, name: str, max_chars: int, multiline: bool) -> str:
    """``value`` if it is a printable string of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidInputError(f"{name} has {len(value):,} characters; at most {max_chars:,} are "
                                f"accepted by CAP dispatchers")
    allowed = "\n\t" if multiline else ""
    for i, ch in enumerate(value):
        if not ch.isprintable() and ch not in allowed:
            raise InvalidInputError(f"{name} has a non-printable character U+{ord(ch):04X} at "
                                    f"position {i}" + ("" if multiline else "; it must be one line"))
    return value


def check_details(details, name: str = "details") -> dict:
    """A copy of an alert's ``details`` dict, every text checked (see the module docstring)."""
    if not isinstance(details, dict):
        raise InvalidInputError(f"{name} must be a dict, got {type(details).__name__}")
    if len(details) > MAX_KEYS:
        raise InvalidInputError(f"{name} has {len(details)} keys; at most {MAX_KEYS}")
    out = {}
    for key, value in details.items():
        if not isinstance(key, str) or not key:
            raise InvalidInputError(f"{name} keys must be non-empty strings, got {key!r}")
        check_text(key, f"{name} key {key[:40]!r}", MAX_KEY_CHARS, False)
        where = f"{name}[{key!r}]"
        if key in LIMITS:
            out[key] = check_text(value, where, *LIMITS[key])
        elif key == "translations":
            out[key] = check_translations(value, where, LIMITS,
                                          lambda v, n, k: check_text(v, n, *LIMITS[k]),
                                          lambda v, n: check_text(v, n, 35, False))
        elif isinstance(value, str):
            out[key] = check_text(value, where, OTHER_MAX_CHARS, True)
        elif value is None or isinstance(value, (bool, int)):
            out[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = value
        else:
            raise InvalidInputError(f"{where} must be a string, a finite number, a bool or None, "
                                    f"got {type(value).__name__}")
    size = len(json.dumps(out, ensure_ascii=False).encode())
    if size > MAX_JSON_BYTES:
        raise InvalidInputError(f"{name} is {size:,} bytes as JSON; at most {MAX_JSON_BYTES:,}")
    return out


#: An RFC 5646 language tag as CAP writes it (``zh-CN``, ``en-US``, ``ug``).
LANGUAGE_TAG = re.compile(r"[a-zA-Z]{1,8}(-[a-zA-Z0-9]{1,8})*")


def check_translations(value, where: str, fields, check_value, check_tag, taken=()) -> dict:
    """``{language: {field: text}}`` checked: the one walk, for the details and for CAP.

    Each language must be a tag (``LANGUAGE_TAG``, passed to ``check_tag``
    first), named once (case-insensitively, and not one of ``taken``); its
    texts a mapping whose keys are all in ``fields``, each value passed through
    ``check_value(value, name, field)``.  Returns a plain-dict copy.
    """
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{where} must map a language tag to a dict of texts, got "
                                f"{type(value).__name__}")
    out = {}
    seen = {t.lower() for t in taken}
    for lang, texts in value.items():
        check_tag(lang, f"{where} language")
        if not LANGUAGE_TAG.fullmatch(lang):
            raise InvalidInputError(f"{where}: {lang!r} is not a language tag such as 'en-US'")
        if lang.lower() in seen:
            raise InvalidInputError(f"{where}: language {lang!r} appears twice")
        seen.add(lang.lower())
        if not isinstance(texts, Mapping):
            raise InvalidInputError(f"{where}[{lang!r}] must be a dict of texts, got {type(texts).__name__}")
        unknown = set(texts) - set(fields)
        if unknown:
            raise InvalidInputError(f"{where}[{lang!r}] has unknown field(s) {sorted(map(str, unknown))}; "
                                    f"known: {', '.join(fields)}")
        out[lang] = {k: check_value(v, f"{where}[{lang!r}][{k!r}]", k) for k, v in texts.items()}
    return out

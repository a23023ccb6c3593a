"""PHI in free text: labelled values, and values whose shape gives them away.

What can be found without knowing the data:
- a value labelled by a name that names PHI: `ssn=123456789`, `SSN: 123 45 6789`,
  `'first_name': 'Ada'` (a dict's repr), `first_name='Ada'` (a model's), `"email": "..."`;
- SSN-shaped numbers, e-mail addresses, phone numbers written as phone numbers, dates of
  birth (ISO, US, European, month names, `datetime.date(...)` reprs);
- the values PostgreSQL echoes in its messages (`Key (mrn)=(...)`, `Failing row contains`,
  `invalid input syntax for type uuid: "..."`).

An unlabelled name in prose ("Ada came in") cannot be found by shape; that is what the
structured masking of models and dicts is for. The shapes are tight enough to leave UUIDs,
timestamps with a time of day, LSNs, durations, counts, IP addresses and ports alone.
"""

from __future__ import annotations

import re
from functools import lru_cache

from hcrepo.phi.names import normalise, phi_keys

MASK = "***"

# A value after its label: quoted, a call-like repr (`datetime.date(1980, 1, 1)`), or a bare
# token after `=`; after `:` a bare value runs to the end of its clause ("Name: Ada Lovelace").
_VALUE = (
    r"""(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[\w.]+\([^()\n]*\)"""
    r"""|(?<==)\s*[^\s,;)}\]]+|(?<=:)\s*[^,;)}\]\n]*[^\s,;)}\]\n])"""
)
# The word right before a separator: only when it ends a PHI name is the labelled pass run
# (one scan with a plain pattern instead of the alternation of every name at every position).
_BEFORE_SEPARATOR = re.compile(r"(?<![A-Za-z0-9])([A-Za-z][A-Za-z0-9]*+)[\"']?\s*[:=]")
_DIGITS = re.compile(r"\d{4}")  # every shape below has four digits in a row, or a phone's +
_DIGIT_BOUNDARY_BEFORE = r"(?<![\w.+-])"
_DIGIT_BOUNDARY_AFTER = r"(?![\w+]|[.-]\d)"
_SSN = re.compile(
    _DIGIT_BOUNDARY_BEFORE + r"\d{3}([- ]?)\d{2}\1\d{4}" + _DIGIT_BOUNDARY_AFTER
)
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]++@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(
    _DIGIT_BOUNDARY_BEFORE
    + r"(?:\+\d{1,3}(?:[\s.-]?(?:\(\d{1,5}\)|\d{1,5})){2,5}"  # international: +44 20 7946 0958
    + r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}"  # (555) 010-0199
    + r"|\d{3}([\s.-])\d{3}\1\d{4})"  # 555-010-0199, 555.010.0199
    + _DIGIT_BOUNDARY_AFTER
)
_MONTH = r"(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE = re.compile(
    _DIGIT_BOUNDARY_BEFORE
    + r"(?:\d{4}([-/])\d{1,2}\1\d{1,2}(?![T ]?\d{1,2}:\d{2})"  # 1980-01-31, not a timestamp
    + r"|\d{1,2}([/.])\d{1,2}\2\d{4}"  # 01/31/1980, 31.01.1980
    + r"|\d{1,2}\s+" + _MONTH + r",?\s+\d{4}"  # 31 January 1980
    + r"|" + _MONTH + r"\s+\d{1,2},?\s+\d{4})"  # Jan 31, 1980
    + _DIGIT_BOUNDARY_AFTER
    + r"|datetime\.date\(\d{4}, \d{1,2}, \d{1,2}\)",
)
# What PostgreSQL quotes back from the statement or the row, in a driver error's message:
# the text around the value is kept, so the message still says what went wrong.
_SERVER_ECHOES = tuple(re.compile(pattern) for pattern in (
    r"(?P<open>Key \([^)\n]*\)=\()[^\n]*?"
    r"(?P<close>\)\s+(?:already exists|is not present|conflicts))",
    r"(?P<open>Failing row contains \()[^\n]*(?P<close>\))",
    r"(?P<open>(?:invalid input (?:syntax|value) for [\w ]+|out of range[\w ]*): \")[^\"\n]*"
    r"(?P<close>\")",
))


def mask_text(text: str) -> str:
    """`text` with every PHI value found in it replaced by `***`."""
    # Each pass only where its anchor character occurs: most log lines need few of them.
    if "(" in text or '"' in text:
        for echo in _SERVER_ECHOES:
            text = echo.sub(_keep_frame, text)
    keys = phi_keys()
    if any(normalise(word).rpartition("_")[2] in _last_words(keys)
           for word in _BEFORE_SEPARATOR.findall(text)):
        text = _labelled(keys).sub(_masked_value, text)
    if "@" in text:
        text = _EMAIL.sub(MASK, text)
    if _DIGITS.search(text) is not None:
        text = _DATE.sub(MASK, _SSN.sub(MASK, text))
    elif "+" not in text:
        return text
    return _PHONE.sub(_masked_phone, text)


def _keep_frame(match: re.Match[str]) -> str:
    return match.group("open") + MASK + match.group("close")


def _masked_phone(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group())
    return MASK if 7 <= digits <= 15 else match.group()


def _masked_value(match: re.Match[str]) -> str:
    label = match.group("label")
    value = match.group()[len(label):]
    if value.strip().strip("'\"") == MASK:
        return match.group()  # masked already (a masked dict's repr): keep its quotes
    return label + value[:len(value) - len(value.lstrip())] + MASK


@lru_cache(maxsize=8)
def _last_words(keys: frozenset[str]) -> frozenset[str]:
    """The last word of each name: a label ends in one of them right before its `:` or `=`."""
    return frozenset(key.rpartition("_")[2] for key in keys)


@lru_cache(maxsize=8)
def _labelled(keys: frozenset[str]) -> re.Pattern[str]:
    """One pattern for every name in `keys`, each spelt with any separator or none."""
    spellings = sorted((_spelling(key) for key in keys), key=len, reverse=True)
    return re.compile(
        r"(?P<label>(?<![\w])([\"']?)(?:" + "|".join(spellings) + r")\2\s*[:=]\s*)"
        + _VALUE,
        re.IGNORECASE,
    )


def _spelling(key: str) -> str:
    return r"[_\s-]?".join(re.escape(part) for part in normalise(key).split("_") if part)


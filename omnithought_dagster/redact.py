"""What a stored excerpt of untrusted input must not carry by accident: credentials.

A quarantine row keeps a bounded excerpt of the record it set aside (`raw_excerpt`) so a person can see what was wrong
with it. A seed file is not trusted: it may be, or hold lines of, a credentials file. Before an excerpt or a detail is
stored, `redact` replaces

- the value of a key = value / key: value / "key": "value" pair whose key holds a secret word as a whole component
  (strong words - secret, password, pwd, api / access / account / secret / private key, credential(s), connection
  string, client secret, session / auth / access token - redact to the end of the line; weak words - token, pass,
  auth, authorization - to the next space); netrc and pgpass passwords;
- a PEM private key block, a `Bearer` token, the user:password of a URL;
- well-known credential shapes (AWS access key ids, GitHub / Hugging Face / OpenAI / Slack tokens);
- any run of 32 or more base64 / URL-safe characters between slashes that looks random (Shannon entropy of at least
  4.2 bits per character and both letters and digits: a 40-character AWS secret key scores ~4.6-5.0; a SHA-256 hex
  digest, at most 4.0, and words and identifiers stay below it). Slashes split the runs because file paths are made
  of such characters: a path's parts are judged one by one, so a path stays readable, and an unnamed secret holding
  a '/' may pass in pieces

with `[redacted]`. It is a net, not a guarantee: a short password in free text passes. What it errs on: a field named
like `max_tokens` loses its value, and base64 data (an inlined image) is redacted too. No Dagster here.
"""

from __future__ import annotations

import math
import re
from collections import Counter

REDACTED = "[redacted]"
# A secret word is a whole component of a key: `db_password`, `AWS_SECRET_ACCESS_KEY`, `apiKey`, `clientSecret`, `pass`
# - not `tokenizer`, `max_tokens`, `Secretary` or `passport`.
# Strong words name nothing but secrets: their unquoted value runs to the end of the line (a password may hold spaces).
# Weak words also name ordinary things (a music question's "Pass:", an NLP question's "token:"): their unquoted value
# ends at the first space.
STRONG_WORDS = (
    r"secret|passw(?:or)?d|pwd|api[_-]?key|access[_-]?key|account[_-]?key|secret[_-]?key|private[_-]?key"
    r"|credentials?|connection[_-]?string|client[_-]?secret|session[_-]?token|auth[_-]?token|access[_-]?token"
)
WEAK_WORDS = r"token|pass|auth|authorization"
_START = r"(?:(?<![A-Za-z0-9])|(?<=(?-i:[a-z]))(?=(?-i:[A-Z])))"  # after a separator, or at a camelCase hump
_END = r"(?:(?![A-Za-z0-9])|(?=(?-i:[A-Z])))"
_KEY = r"(?P<key>[\"']?(?:[\w.-]*?)" + _START + r"(?:{words})" + _END + r"[\w.-]*[\"']?)(?P<sep>\s*[:=]\s*)"
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'[^']*'"
_STRONG = re.compile(r"(?i)" + _KEY.format(words=STRONG_WORDS) + r"(?P<value>" + _QUOTED + r"|[^\n\r,;}&\"']+)")
_WEAK = re.compile(r"(?i)" + _KEY.format(words=WEAK_WORDS) + r"(?P<value>" + _QUOTED + r"|[^\s,;}&\"']+)")
_NETRC = re.compile(r"(?im)(^[ \t]*|\blogin[ \t]+\S+[ \t]+)(password|passwd)[ \t]+[^\s:=]+")  # .netrc: at a line start or after login
_PGPASS = re.compile(r"(?m)^([^:\s]+:(?:\d+|\*):[^:\s]+:[^:\s]+:)\S+$")  # host:port:database:user:password
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)", re.S)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]*:[^/\s@]+@")
_KNOWN = re.compile(
    r"\b(?:(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,})\b"
)
_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")  # judged whole, then a '/'-separated part at a time (file paths are such runs)
MIN_ENTROPY = 4.2
MIN_ENTROPY_WHOLE = 4.5  # a run holding '/' is a key as a whole only if it mixes cases and digits and scores this


def redact(text: str | None) -> str | None:
    """`text` with what looks like a credential replaced by [redacted] (None stays None)."""
    if not text:
        return text
    text = _PEM.sub(REDACTED, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    for pairs in (_STRONG, _WEAK):
        text = pairs.sub(lambda m: m.group("key") + m.group("sep") + _quoted(m.group("value")), text)
    text = _NETRC.sub(lambda m: f"{m.group(1)}{m.group(2)} {REDACTED}", text)
    text = _PGPASS.sub(lambda m: m.group(1) + REDACTED, text)
    text = _KNOWN.sub(REDACTED, text)
    return _RUN.sub(_judge_run, text)


def _judge_run(match: re.Match) -> str:
    run = match.group()
    if "/" in run and _mixed(run) and entropy(run) >= MIN_ENTROPY_WHOLE:
        return REDACTED
    return "/".join(REDACTED if looks_random(part) else part for part in run.split("/"))


def _mixed(run: str) -> bool:
    return any(c.isupper() for c in run) and any(c.islower() for c in run) and any(c.isdigit() for c in run)


def looks_random(run: str) -> bool:
    """A long run of token characters that is probably a key: high entropy, letters and digits both."""
    if not (any(c.isdigit() for c in run) and any(c.isalpha() for c in run)):
        return False
    return entropy(run) >= MIN_ENTROPY


def entropy(text: str) -> float:
    """Shannon entropy of the characters of `text`, bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _quoted(value: str) -> str:
    if value.strip() == REDACTED or value in ('""', "''") or not value.strip():
        return value
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return f"{value[0]}{REDACTED}{value[0]}"
    return REDACTED

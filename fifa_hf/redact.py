"""Credentials and local paths out of everything fifa-hf writes: configs, cache keys, error texts,
logs and cards.

A URL such as ``http://user:secret@host/v1?api-key=...`` keeps its scheme, host, path and harmless
query parameters; the user info and every secret-looking query parameter become ``***``. A published
file never holds an absolute local path either (``published_reference``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

from fifa_hf.storage import hub_snapshot

REDACTED = "***"
SECRET_PARAMETER = re.compile(r"key|token|secret|password|passwd|pwd|auth|signature|sig|credential", re.IGNORECASE)
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without user info and with the values of secret-looking query parameters replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{name}={REDACTED if SECRET_PARAMETER.search(name) else value}"
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret substrings of ``url`` (user, password, secret query values), longest first."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [form for value in (parts.username, parts.password) if value for form in (value, unquote(value))]
    for pair in parts.query.split("&"):  # raw (percent-encoded) and decoded forms both appear in texts
        name, _, raw = pair.partition("=")
        if SECRET_PARAMETER.search(unquote(name)) and raw:
            found += [raw, unquote_plus(raw)]
    return sorted({value for value in found if value}, key=len, reverse=True)


def redact_text(text: str, *urls: str) -> str:
    """``text`` with every URL in it redacted, and the secrets of ``urls`` removed wherever they appear."""
    text = _URL.sub(lambda match: redact_url(match.group(0)), text)
    for url in urls:
        for secret in url_secrets(url):
            text = text.replace(secret, REDACTED)
    return text


def published_reference(value: str | None) -> str | None:
    """A reference fit for a public file: a Hub snapshot path becomes its Hub id, an absolute local path
    its path relative to the working directory (or ``.../<name>`` outside it), a URL loses its credentials."""
    if not isinstance(value, str):
        return value
    if "://" in value:
        return redact_url(value)
    prefix = "local-dir:" if value.startswith("local-dir:") else ""
    path = Path(value.removeprefix(prefix))
    if not path.is_absolute():
        return value
    snapshot = hub_snapshot(path)
    if snapshot:
        return snapshot[0]
    try:
        return prefix + path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return f"{prefix}.../{path.name}"

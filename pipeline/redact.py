"""Secrets out of what people see: URLs with passwords, tokens or presigned signatures are
shown with `***` in logs, MLflow params and tags, local JSON files and error lines.

Standard library only: the data stages, the server and the CLI all use it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Query parameters that carry secrets: passwords, tokens, presigned-URL signatures and keys.
SECRET_IN_QUERY = re.compile(
    r"(?i)(?<=[?&;])((?:password|passwd|pwd|token|access_token|secret|signature|sig|"
    r"credential|key|api_key|apikey|x-amz-signature|x-amz-credential|x-amz-security-token)=)"
    r"[^&;#]*"
)
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def mask_uri(uri: str) -> str:
    """`uri` with the password of its user part, and secret query values (`password=`,
    `token=`, presigned-URL signatures and credentials), as `***`."""
    masked = SECRET_IN_QUERY.sub(r"\1***", uri)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", masked)
    if "@" not in parts.netloc:
        return masked
    userinfo, hostinfo = parts.netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return masked
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def mask_urls_in(text: str) -> str:
    """Free text (an error message) with every URL in it masked."""
    return _URL_IN_TEXT.sub(lambda found: mask_uri(found[0]), text) if "://" in text else text


def masked(value: Any) -> Any:
    """`value` with every URL string in it (nested dicts and lists too) masked."""
    if isinstance(value, str):
        return mask_uri(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(masked(v) for v in value)
    return value

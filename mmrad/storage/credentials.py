"""Telling credentials in the environment apart without keeping them."""

from __future__ import annotations

import hashlib
import os


def credential_fingerprint(names: tuple[str, ...]) -> str:
    """Changes when the environment variables ``names`` change, so a cached client is
    not reused with stale credentials. A one-way hash: the secret itself is never kept
    or shown."""
    joined = "\0".join(os.environ.get(name, "") for name in names)
    return hashlib.sha256(joined.encode()).hexdigest()

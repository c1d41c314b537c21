"""What trackers receive: a config as flat parameters, a metrics row as metric values."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from mmrad.config import RESTART_ROW

ROW_FIELDS = ("step", "time", RESTART_ROW)
"""Columns of a metrics row that are not metrics."""

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
MAX_KEY_CHARS = 250  # MLflow's limit on a metric's key
_NOT_IN_KEYS = re.compile(r"[^0-9A-Za-z_\-. /:]")
_PASSWORD_IN_URL = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):[^\s/]*@")


def shown(text: str) -> str:
    """``text`` safe for logs, errors and trackers: the password of any URL in it is
    masked (up to the last ``@`` before the host, as browsers read it)."""
    return _PASSWORD_IN_URL.sub(r"\g<head>:***@", text)


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optimizer": {"lr": 1e-4}}`` → ``{"optimizer.lr": "0.0001"}``: nested sections
    become dotted keys (the names overrides use); lists and other values become JSON."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        out[name] = shown(text)[:MAX_PARAM_CHARS]
    return out


def metric_key(name: str) -> str:
    """``name`` as a key MLflow takes: refused characters become ``_``, and the path is
    normal (MLflow refuses a key that normalising would change: empty parts from ``//``
    or an edge ``/``, ``.`` and ``..`` parts), at most 250 characters. An evaluation's
    ``per_category/<source>/<category>`` with an empty category would otherwise cost
    the whole batch of metrics."""
    parts = [part for part in _NOT_IN_KEYS.sub("_", name).split("/") if part]
    parts = ["_" if part in (".", "..") else part for part in parts]
    return "/".join(parts)[:MAX_KEY_CHARS].rstrip("/") or "_"


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics row (booleans as 0/1), keyed for trackers;
    strings, lists and non-finite numbers are not metrics."""
    out = {}
    for name, value in row.items():
        if name in ROW_FIELDS or not isinstance(value, int | float):
            continue
        number = float(value)
        if math.isfinite(number):
            out[metric_key(name)] = number
    return out


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics dict (a report's ``metrics.json``) under
    ``/``-joined keys: ``{"per_source": {"mvtec": {"det_f1": 0.8}}}`` →
    ``{"per_source/mvtec/det_f1": 0.8}``."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, f"{key}/"))
        else:
            out.update(metric_values({key: value}))
    return out

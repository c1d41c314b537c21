"""What a sweep was started with, kept beside Tune's state (``sweep.json``), so that
rerunning it resumes the same sweep or refuses: ``Tuner.restore`` would otherwise combine
a new base config with the old search space silently."""

from __future__ import annotations

import json
from typing import Any

from mmrad.config import ConfigError
from mmrad.storage import Storage, join

SWEEP_FILE = "sweep.json"
PARTS = {"search_space": "search space", "base": "base GRPO config (file and overrides)"}


def sweep_identity(search_space: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a sweep's runs (JSON-ready)."""
    return {"search_space": search_space, "base": base}


def changed_keys(
    old: Any, new: Any, prefix: str = "", one_sided: bool = True
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs between two
    nested dicts (a key missing on one side has the value ``None`` there; with
    ``one_sided=False`` such keys are left out)."""
    if isinstance(old, dict) and isinstance(new, dict):
        names = old.keys() | new.keys() if one_sided else old.keys() & new.keys()
        return [
            change
            for name in sorted(names)
            for change in changed_keys(
                old.get(name), new.get(name), f"{prefix}.{name}" if prefix else name, one_sided
            )
        ]
    return [] if old == new else [(prefix, old, new)]


def check_or_record_sweep(
    storage: Storage, sweep_uri: str, identity: dict[str, Any], resuming: bool
) -> None:
    """Record ``identity`` for a new sweep; for a resumed one, raise a
    :class:`ConfigError` naming every key that differs from what it was started with."""
    path = join(sweep_uri, SWEEP_FILE)
    if not (resuming and storage.exists(path)):
        storage.write_text(path, json.dumps(identity, indent=2, sort_keys=True))
        return
    started = json.loads(storage.read_text(path))
    for part, label in PARTS.items():
        # the base is a whole config dump: a key on one side only is a field another
        # mmrad version added or dropped, not the user's change
        changes = changed_keys(started[part], identity[part], one_sided=part != "base")
        if changes:
            named = "; ".join(f"{key}: {old!r} then, {new!r} now" for key, old, new in changes[:10])
            more = f" (and {len(changes) - 10} more)" if len(changes) > 10 else ""
            raise ConfigError(
                f"{sweep_uri} was started with another {label}: {named}{more}. Rerun "
                "with the config it was started with (kept in "
                f"{path}) to resume it, or choose a new run.name for a new sweep"
            )

"""Parameter names as state dicts spell them; no torch here, so that the processes that
only route weights (the coordinator, the rollout pool) import it cheaply."""

from __future__ import annotations

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts FSDP1, activation checkpointing and torch.compile add to parameter names."""


def clean_name(name: str) -> str:
    """A parameter's name as state dicts spell it, without FSDP1/compile wrapper parts."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name

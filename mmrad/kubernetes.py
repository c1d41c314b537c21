"""The generated part of the KubeRay manifests (``deploy/kubernetes/``): the RayService's
``serveConfigV2``, which is ``configs/cluster/serve.yaml`` (Ray Serve's schema) as text.

    python -m mmrad.kubernetes --write   # regenerate it after editing serve.yaml
    python -m mmrad.kubernetes --check   # exit 1, naming the file, while it is stale

The block is the Serve file verbatim, less its header comment (which describes
``serve deploy`` on the cluster launcher, not the RayService); its inline comments stay.
The manifest is edited as text, so its own comments and layout stay as written. Run from
the repository root (paths are relative to it).

Rejected: a YAML round trip of the manifest (PyYAML drops comments; ruamel is a new
dependency) and a KubeRay ``serveConfigV2`` that drifts from the file that ``serve deploy``,
``mmrad serve`` and the tests read.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

SERVE_CONFIG = Path("configs/cluster/serve.yaml")
RAYSERVICE = Path("deploy/kubernetes/rayservice.yaml")
BLOCK_KEY = "serveConfigV2"
BLOCK_INDENT = 2
"""How much deeper than ``serveConfigV2:`` the block's lines are indented."""

_BLOCK_START = re.compile(rf"^(?P<indent> *){BLOCK_KEY}: *\|[^\n]*$", re.M)


class ManifestError(ValueError):
    """The manifest has no ``serveConfigV2: |`` block to regenerate."""


def serve_config_text(serve_yaml: str) -> str:
    """``serve_yaml`` without its leading comment lines (blank lines there included)."""
    lines = serve_yaml.splitlines()
    body = 0
    while body < len(lines) and (not lines[body].strip() or lines[body].lstrip().startswith("#")):
        body += 1
    return "\n".join(lines[body:]).rstrip("\n") + "\n"


def literal_block(text: str, indent: int) -> list[str]:
    """``text`` as the lines of a YAML literal block indented by ``indent`` spaces (blank
    lines stay empty, so no trailing whitespace)."""
    pad = " " * indent
    return [pad + line if line.strip() else "" for line in text.splitlines()]


def render_rayservice(manifest: str, serve_yaml: str) -> str:
    """``manifest`` with its ``serveConfigV2: |`` block replaced by :func:`serve_config_text`
    of ``serve_yaml``; everything else unchanged."""
    start = _BLOCK_START.search(manifest)
    if start is None:
        raise ManifestError(f"no '{BLOCK_KEY}: |' block to regenerate")
    key_indent = len(start.group("indent"))
    head = manifest[: start.end()].split("\n")
    tail = manifest[start.end() + 1 :].split("\n")
    end = _block_end(tail, key_indent)
    block = literal_block(serve_config_text(serve_yaml), key_indent + BLOCK_INDENT)
    head[-1] = f"{start.group('indent')}{BLOCK_KEY}: |"
    return "\n".join([*head, *block, *tail[end:]])


def _block_end(lines: list[str], key_indent: int) -> int:
    """Index of the first line after a block whose key is indented ``key_indent``: the
    first non-blank line indented no deeper than the key. Blank lines just before it
    belong to what follows, not to the block."""
    end = 0
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        if len(line) - len(line.lstrip(" ")) <= key_indent:
            return end
        end = index + 1
    return end


def stale(manifest_path: Path = RAYSERVICE, serve_path: Path = SERVE_CONFIG) -> bool:
    """Whether ``manifest_path``'s ``serveConfigV2`` differs from ``serve_path``'s."""
    manifest = manifest_path.read_text()
    return render_rayservice(manifest, serve_path.read_text()) != manifest


def write(manifest_path: Path = RAYSERVICE, serve_path: Path = SERVE_CONFIG) -> bool:
    """Regenerate the block in place; whether the file changed."""
    manifest = manifest_path.read_text()
    rendered = render_rayservice(manifest, serve_path.read_text())
    if rendered == manifest:
        return False
    manifest_path.write_text(rendered)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (see the module); exit status 1 for a stale manifest, 2 for a bad one."""
    parser = argparse.ArgumentParser(
        prog="python -m mmrad.kubernetes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate serveConfigV2")
    action.add_argument("--check", action="store_true", help="exit 1 if it is out of date")
    parser.add_argument("--manifest", type=Path, default=RAYSERVICE, help="the RayService")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG, help="Serve file")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if stale(args.manifest, args.serve_config):
                print(f"{args.manifest}: {BLOCK_KEY} is out of date with {args.serve_config}; "
                      "run `python -m mmrad.kubernetes --write`", file=sys.stderr)  # fmt: skip
                return 1
            return 0
        changed = write(args.manifest, args.serve_config)
    except ManifestError as err:
        print(f"{args.manifest}: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"{args.manifest}: {'regenerated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Imports point one way (docs/architecture.md, "Import rules").

Every module under ``mmrad/`` and ``ray_jobs/`` is parsed with :mod:`ast` (nothing is
imported, so the check takes a second and needs neither Ray nor torch). Every import
counts, wherever it is: module level, inside a function, under ``if TYPE_CHECKING:``,
relative (``from . import x``). Each module belongs to one layer of :data:`LAYERS`, and
may import its own layer and the layers (or single modules) listed beside it; it may not
take a private name (``_x``) from another layer. A failure lists every offending
(module, imported module) pair.

Rejected: import-linter (one more tool and config format for two dozen lines), and
importing the modules to read ``sys.modules`` (slow, and blind to function-level imports).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("mmrad", "ray_jobs")

# Groups of layers, from the bottom up.
BASE = ("base",)  # config, storage: every layer may use them
INPUTS = ("data", "task")
CORE = ("train", "engine", "model")
JOBS = ("rl", "eval", "annotate", "detect", "serve", "sft")
DRIVERS = ("cli", "pipeline", "tune")

# The layer table. layer: (its modules: dotted prefixes, the longest match wins,
#                          what it may import besides itself: layers or single modules)
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # thin `ray job submit` entry points: parse, ray.init(), call the library
    "ray_jobs": (("ray_jobs",), (*DRIVERS, *JOBS, "runtime", *CORE, *INPUTS, *BASE)),
    # the command line and what every entry point shares (job args, the README reference)
    "cli": (
        ("mmrad.cli", "mmrad.jobs", "mmrad.config_docs", "mmrad.kubernetes"),
        ("pipeline", "tune", *JOBS, "runtime", *CORE, *INPUTS, *BASE),
    ),
    "pipeline": (("mmrad.pipeline",), ("tune", *JOBS, "runtime", *CORE, *INPUTS, *BASE)),
    "tune": (("mmrad.tune",), (*JOBS, "runtime", *CORE, *INPUTS, *BASE)),
    # the jobs: rl and sft never import each other (nor tune); serve needs no training code
    "rl": (("mmrad.rl",), ("runtime", *CORE, *INPUTS, *BASE)),
    "sft": (("mmrad.sft",), ("runtime", *CORE, *INPUTS, *BASE)),
    "eval": (("mmrad.eval",), ("runtime", *CORE, *INPUTS, *BASE)),
    "annotate": (("mmrad.annotate",), ("eval", "runtime", *CORE, *INPUTS, *BASE)),
    # detect: evaluation's inference on a folder, with Serve's pure decision and overlay
    "detect": (
        ("mmrad.detect",),
        ("eval", "mmrad.serve.detect", "mmrad.serve.overlay", "runtime", *CORE, *INPUTS, *BASE),
    ),
    "serve": (("mmrad.serve",), ("runtime", "engine", "model", *INPUTS, *BASE)),
    # the building blocks: the trainer core builds and exports models with model/
    "train": (("mmrad.train",), ("model", *INPUTS, *BASE)),
    "engine": (("mmrad.engine",), (*INPUTS, *BASE)),
    "model": (("mmrad.model",), (*INPUTS, *BASE)),
    # data knows no model, and of the task only its geometry; the task is pure
    "data": (("mmrad.data",), ("mmrad.task.geometry", *BASE)),
    "task": (("mmrad.task",), ()),
    # what a job's driver does once per run: start or join Ray, write the run's info,
    # log to the run's experiment trackers
    "runtime": (("mmrad.ray_env", "mmrad.runinfo", "mmrad.tracking"), BASE),
    # config sections, storage (and the local S3 server), placement rules, the version,
    # the named actors a rerun takes over
    "base": (
        (
            "mmrad",
            "mmrad.config",
            "mmrad.storage",
            "mmrad.s3local",
            "mmrad.placement",
            "mmrad.actor_names",
        ),
        (),
    ),  # fmt: skip
}

Import = tuple[str, str, int]  # (imported module, name taken from it or "", line)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def imports_of(module: str, source: str, is_package: bool, known: Iterable[str]) -> list[Import]:
    """Every import of ``PACKAGES`` in ``source``, at any depth; ``from pkg import name``
    counts as importing ``pkg.name`` when that is a module."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return [item for item in found if item[0].split(".")[0] in PACKAGES]


def layer_of(module: str) -> str | None:
    """The layer whose longest prefix matches; ``mmrad`` alone matches only the package
    itself, so a new top-level module must be given a layer."""
    best, best_len = None, -1
    for layer, (prefixes, _) in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or (prefix != "mmrad" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def allowed(importer: str, imported: str) -> bool:
    mine, theirs = layer_of(importer), layer_of(imported)
    if mine is None or theirs is None:
        return False
    if mine == theirs:
        return True
    may = LAYERS[mine][1]
    return theirs in may or any(imported == m or imported.startswith(m + ".") for m in may)


def violations(sources: Mapping[str, tuple[str, bool]]) -> list[str]:
    """``sources``: module → (source text, is a package ``__init__``). One line per
    offending (module, imported module) pair."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        if layer_of(module) is None:
            found.append(f"{module}: belongs to no layer (add it to LAYERS)")
            continue
        for imported, name, line in imports_of(module, source, is_package, sources):
            where = f"{module}:{line} ({layer_of(module)})"
            if not allowed(module, imported):
                message = f"{where} imports {imported} ({layer_of(imported) or 'no layer'})"
            elif name.startswith("_") and layer_of(imported) != layer_of(module):
                message = f"{where} imports the private {imported}.{name}"
            else:
                continue
            if message not in found:  # `from m import a, b` is one pair
                found.append(message)
    return found


def test_every_import_points_one_way():
    sources = {
        module: (path.read_text(), path.name == "__init__.py")
        for module, path in source_modules().items()
    }
    assert len(sources) > 50, "the modules were not found"
    found = violations(sources)
    assert not found, "imports against docs/architecture.md:\n" + "\n".join(found)


def test_every_layer_named_as_importable_exists():
    for layer, (_, may) in LAYERS.items():
        for target in may:
            assert target in LAYERS or layer_of(target) is not None, (layer, target)


def fake(**modules: str) -> dict[str, tuple[str, bool]]:
    known = {
        "mmrad": "",
        "mmrad.task": "",
        "mmrad.task.geometry": "",
        "mmrad.task.answer": "",
        "mmrad.model": "",
        "mmrad.model.loading": "def _hidden(): ...\ndef visible(): ...\n",
        "mmrad.rl": "",
        "mmrad.rl.job": "",
        "mmrad.sft": "",
        "mmrad.sft.job": "",
        "mmrad.data": "",
        "mmrad.eval": "",
        "mmrad.eval.inference": "",
    }
    known.update({name.replace("__", "."): text for name, text in modules.items()})
    return {name: (text, name.count(".") < 2) for name, text in known.items()}


def test_a_violation_at_any_depth_is_reported():
    found = violations(
        fake(
            mmrad__task__x="def f():\n    from mmrad.model import loading\n",
            mmrad__data__y="import mmrad.model.loading as m\nfrom mmrad.task import answer\n",
            mmrad__rl__z="if True:\n    from ..sft.job import x\n",
            mmrad__model__w="from mmrad.eval import inference\n",
        )
    )
    assert found == [
        "mmrad.data.y:1 (data) imports mmrad.model.loading (model)",
        "mmrad.data.y:2 (data) imports mmrad.task.answer (task)",
        "mmrad.model.w:1 (model) imports mmrad.eval.inference (eval)",
        "mmrad.rl.z:2 (rl) imports mmrad.sft.job (sft)",
        "mmrad.task.x:2 (task) imports mmrad.model.loading (model)",
    ]


def test_allowed_imports_pass_and_private_names_do_not_cross_layers():
    sources = fake(
        mmrad__rl__ok="from mmrad.model.loading import visible\nfrom mmrad.task import geometry\n",
        mmrad__data__ok="from mmrad.task.geometry import Box\nfrom . import ok\n",
        mmrad__eval__leak="from mmrad.model.loading import _hidden\n",
        mmrad__model__ok="from .loading import _hidden\n",
        mmrad__newtool="import mmrad\n",
    )
    assert violations(sources) == [
        "mmrad.eval.leak:1 (eval) imports the private mmrad.model.loading._hidden",
        "mmrad.newtool: belongs to no layer (add it to LAYERS)",
    ]


def test_nothing_in_the_library_imports_ray_jobs():
    found = violations(fake(mmrad__serve="import ray_jobs.serve\n", ray_jobs__serve=""))
    assert found == ["mmrad.serve:1 (serve) imports ray_jobs.serve (ray_jobs)"]

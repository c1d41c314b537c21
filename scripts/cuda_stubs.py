"""Make CUDA builds of torchvision/torchaudio/torchcodec importable next to a CPU-only torch.

Why this exists: this is a workaround for package indexes that carry only CUDA builds of
torchvision, torchaudio and torchcodec. Installed next to ``torch==*+cpu`` their compiled
extensions fail to load, because they link against CUDA libraries that a CPU torch does not
ship (``libc10_cuda.so``, ``libtorch_cuda.so``, ``libnvrtc.so.13``, ...). vLLM imports all
three packages, so nothing multimodal works.

What it does: it reads the undefined dynamic symbols of every extension library of those
packages (``readelf --dyn-syms``), drops what the libraries they can resolve already define
(torch/lib, system libraries, the interpreter), and compiles, with gcc, one small stub library
per missing CUDA library under its original SONAME. Every stub function prints its own name to
stderr and aborts, so a CUDA code path that is reached fails loudly instead of silently; CPU
kernels (e.g. ``torchvision.ops.nms`` on CPU tensors) never touch them. A ``.pth`` file in
site-packages preloads the stubs into every interpreter of the venv (Ray workers and vLLM
child processes included); the dynamic loader then matches the extensions' NEEDED entries to
the already loaded stubs by SONAME. Set ``MMRAD_CUDA_STUBS_DISABLE=1`` to skip the hook.

It applies itself only when an import check in a fresh interpreter (hook disabled) fails; with
CPU builds of the three packages it does nothing, and it removes a hook it no longer needs.

Usage (with the venv's python):
    .venv/bin/python scripts/cuda_stubs.py           # check; build and install only if needed
    .venv/bin/python scripts/cuda_stubs.py --check   # exit 0 if the imports work, 1 if not
    .venv/bin/python scripts/cuda_stubs.py --remove  # delete the stubs and the hook
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("torchvision", "torchaudio", "torchcodec")
IMPORT_CHECK = "import " + ", ".join(PACKAGES)
STUB_DIR = Path(sys.prefix) / "lib" / "mmrad-cuda-stubs"
PTH_FILE = Path(sysconfig.get_paths()["purelib"]) / "mmrad_cuda_stubs.pth"
DISABLE_ENV = "MMRAD_CUDA_STUBS_DISABLE"
# Missing libraries we are willing to replace by stubs. Anything else (e.g. FFmpeg, which
# torchcodec treats as optional) is left missing on purpose.
CUDA_LIBRARY = re.compile(
    r"^lib(c10_cuda|torch_cuda|cuda|cudart|nvrtc|nvjpeg|cublas\w*|cufft|curand|cusparse\w*"
    r"|cusolver|cudnn\w*|nccl|nvToolsExt|nvJitLink)\b"
)
# For extensions that stay unloadable for other reasons (torchcodec's FFmpeg-backed core), only
# symbols that look like CUDA are stubbed, so they load once that other dependency shows up.
CUDA_SYMBOL = re.compile(r"cuda|nvrtc|nvjpeg")
DATA_STUB_BYTES = 64
LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(not found|\S+)(?: \(0x[0-9a-f]+\))?$")


@dataclass(frozen=True)
class Symbol:
    name: str
    version: str  # "" when unversioned
    is_data: bool


@dataclass
class Dependencies:
    found: list[Path]
    missing: list[str]


def import_check(with_hook: bool) -> tuple[bool, str]:
    """Import the three packages in a fresh interpreter; return (ok, last error line)."""
    env = dict(os.environ)
    if with_hook:
        env.pop(DISABLE_ENV, None)
    else:
        env[DISABLE_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], env=env, capture_output=True, text=True
    )
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else f"exit code {proc.returncode}")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"cuda_stubs: package {name} is not installed in {sys.prefix}")
    return Path(next(iter(spec.submodule_search_locations)))


def extension_libraries() -> list[Path]:
    """All compiled libraries shipped inside the three packages."""
    return sorted(lib for name in PACKAGES for lib in package_dir(name).rglob("*.so"))


def torch_lib_dir() -> Path:
    return package_dir("torch") / "lib"


@functools.cache
def read_dynamic_symbols(lib: Path) -> tuple[frozenset[str], tuple[tuple[str, str, str], ...]]:
    """Return (defined names, undefined (name, version, type)) of a library's dynamic table."""
    out = subprocess.run(
        ["readelf", "-W", "--dyn-syms", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    defined, undefined = set(), []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 8 or not fields[0].rstrip(":").isdigit():
            continue
        sym_type, binding, section, full_name = fields[3], fields[4], fields[6], fields[7]
        name, _, version = full_name.partition("@")
        if section != "UND":
            defined.add(name)
        elif binding != "WEAK":
            undefined.append((name, version.lstrip("@"), sym_type))
    return frozenset(defined), tuple(undefined)


def resolve_dependencies(lib: Path) -> Dependencies:
    """Run ldd the way the loader sees the library once torch is imported."""
    search_path = [str(torch_lib_dir()), str(lib.parent), os.environ.get("LD_LIBRARY_PATH", "")]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, search_path)))
    out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env).stdout
    deps = Dependencies(found=[], missing=[])
    for line in out.splitlines():
        match = LDD_LINE.match(line)
        if not match:
            continue
        soname, target = match.groups()
        if target == "not found":
            deps.missing.append(soname)
        elif target.startswith("/"):
            deps.found.append(Path(target))
    return deps


def interpreter_libraries() -> list[Path]:
    """The interpreter and what it links (libpython, libc, ld.so): Python C-API symbols."""
    executable = Path(sys.executable).resolve()
    return [executable, *resolve_dependencies(executable).found]


def defined_elsewhere(libs: list[Path]) -> frozenset[str]:
    names: set[str] = set()
    for lib in libs:
        names |= read_dynamic_symbols(lib)[0]
    return frozenset(names)


def owning_library(symbol: Symbol, stubbed: list[str]) -> str:
    """Pick the stub library a symbol goes to (only matters for versioned symbols)."""
    if symbol.version in stubbed:
        return symbol.version
    prefixes = [
        ("_ZN3c104cuda", "libc10_cuda"),
        ("_ZNK3c104cuda", "libc10_cuda"),
        ("nvrtc", "libnvrtc"),
        ("cuda", "libcudart"),
        ("__cuda", "libcudart"),
        ("cu", "libcuda."),
    ]
    for prefix, library in prefixes:
        owner = next((s for s in stubbed if s.startswith(library)), None)
        if symbol.name.startswith(prefix) and owner:
            return owner
    return next((s for s in stubbed if s.startswith("libtorch_cuda")), stubbed[0])


def plan_stubs() -> dict[str, set[Symbol]]:
    """Map each missing CUDA SONAME to the symbols its stub must define."""
    extensions = extension_libraries()
    with ThreadPoolExecutor() as pool:
        deps = dict(zip(extensions, pool.map(resolve_dependencies, extensions), strict=True))
    stubbed = sorted({s for d in deps.values() for s in d.missing if CUDA_LIBRARY.match(s)})
    plan: dict[str, set[Symbol]] = {soname: set() for soname in stubbed}
    if not stubbed:
        return plan
    shared = defined_elsewhere([*interpreter_libraries(), *extensions])
    for lib in extensions:
        fully_fixable = all(CUDA_LIBRARY.match(s) for s in deps[lib].missing)
        known = shared | defined_elsewhere(deps[lib].found)
        for name, version, sym_type in read_dynamic_symbols(lib)[1]:
            if name in known or not (fully_fixable or CUDA_SYMBOL.search(name)):
                continue
            symbol = Symbol(name, version, is_data=sym_type == "OBJECT")
            plan[owning_library(symbol, stubbed)].add(symbol)
    return plan


def render_c_source(soname: str, symbols: set[Symbol]) -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stdlib.h>",
        f"/* Generated by scripts/cuda_stubs.py: stand-in for {soname} on a CPU-only torch. */",
        "static void mmrad_stub_called(const char *name) {",
        f'  fprintf(stderr, "mmrad CUDA stub ({soname}): %s called; this needs a real '
        f'CUDA build. Aborting.\\n", name);',
        "  abort();",
        "}",
    ]
    for i, symbol in enumerate(sorted(symbols, key=lambda s: s.name)):
        label = f'__asm__("{symbol.name}")'
        if symbol.is_data:
            lines.append(
                f"char stub_data_{i}[{DATA_STUB_BYTES}] {label} __attribute__((aligned(16)));"
            )
        else:
            lines.append(f"void stub_fn_{i}(void) {label};")
            lines.append(f'void stub_fn_{i}(void) {{ mmrad_stub_called("{symbol.name}"); }}')
    return "\n".join(lines) + "\n"


def render_version_script(symbols: set[Symbol]) -> str | None:
    """Versioned references (e.g. cudaFree@libcudart.so.13) need a matching version node."""
    versions = sorted({s.version for s in symbols if s.version})
    if not versions:
        return None
    nodes = []
    for version in versions:
        # Unversioned symbols ride along in the first node; unversioned references accept it.
        members = {s for s in symbols if s.version == version or (not s.version and not nodes)}
        names = " ".join(f"{s.name};" for s in sorted(members, key=lambda s: s.name))
        nodes.append(f"{version} {{ global: {names} }};")
    return "\n".join(nodes) + "\n"


def compile_stub(soname: str, symbols: set[Symbol], out_dir: Path) -> None:
    source = out_dir / f"{soname}.c"
    source.write_text(render_c_source(soname, symbols))
    command = ["gcc", "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}"]
    version_script = render_version_script(symbols)
    if version_script:
        script_path = out_dir / f"{soname}.map"
        script_path.write_text(version_script)
        command.append(f"-Wl,--version-script,{script_path}")
    subprocess.run([*command, "-o", str(out_dir / soname), str(source)], check=True)


def build_stubs(plan: dict[str, set[Symbol]]) -> None:
    """Build into a fresh directory, then swap it in (running processes keep their copies)."""
    STUB_DIR.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mmrad-cuda-stubs-", dir=STUB_DIR.parent))
    staging.chmod(0o755)
    for soname, symbols in plan.items():
        compile_stub(soname, symbols, staging)
    shutil.rmtree(STUB_DIR, ignore_errors=True)
    staging.rename(STUB_DIR)


def install_hook(sonames: list[str]) -> None:
    """One .pth line: preload the stubs unless MMRAD_CUDA_STUBS_DISABLE is set.

    site.py exec()s the line inside a function, so it must not use a comprehension (its names
    would not be visible there): the loads are spelled out as a plain list.
    """
    loads = ", ".join(
        f"ctypes.CDLL(os.path.join(d, {soname!r}), mode=ctypes.RTLD_GLOBAL)" for soname in sonames
    )
    PTH_FILE.write_text(
        "# Written by scripts/cuda_stubs.py: CUDA stub libraries for a CPU-only torch.\n"
        f"import os, sys, ctypes; d = os.path.join(sys.prefix, 'lib', {STUB_DIR.name!r}); "
        f"os.environ.get({DISABLE_ENV!r}) or [{loads}]\n"
    )


def remove_stubs() -> bool:
    existed = PTH_FILE.exists() or STUB_DIR.exists()
    PTH_FILE.unlink(missing_ok=True)
    shutil.rmtree(STUB_DIR, ignore_errors=True)
    return existed


def hook_installed() -> bool:
    return PTH_FILE.exists()


def run_check() -> int:
    """Report only: do the imports work as the venv stands, and are stubs needed for that?"""
    ok, error = import_check(with_hook=True)
    needed = hook_installed() and not import_check(with_hook=False)[0]
    if needed:
        state = "thanks to the CUDA stubs"
    else:
        state = "stubs installed but not needed" if hook_installed() else "no stubs installed"
    print(f"cuda_stubs: {IMPORT_CHECK}: {'OK' if ok else 'FAILS (' + error + ')'} ({state}).")
    if not ok:
        print("cuda_stubs: run this script without options to build and install the stubs.")
    return 0 if ok else 1


def run_apply() -> int:
    start = time.monotonic()
    ok, error = import_check(with_hook=False)
    if ok:
        removed = remove_stubs()
        print(f"cuda_stubs: {IMPORT_CHECK} works without stubs; nothing to do.")
        if removed:
            print(f"cuda_stubs: removed the no longer needed hook {PTH_FILE} and {STUB_DIR}.")
        return 0
    print(f"cuda_stubs: {IMPORT_CHECK} fails without CUDA libraries ({error}).")
    if hook_installed() and import_check(with_hook=True)[0]:
        print(f"cuda_stubs: stubs already installed and working ({PTH_FILE}); nothing to do.")
        return 0
    plan = plan_stubs()
    if not plan:
        print("cuda_stubs: no missing CUDA library found; stubs cannot help here.")
        return 1
    build_stubs(plan)
    install_hook(sorted(plan))
    summary = ", ".join(f"{soname} ({len(symbols)} symbols)" for soname, symbols in plan.items())
    print(f"cuda_stubs: built {summary} into {STUB_DIR}; preloaded by {PTH_FILE.name}.")
    ok, error = import_check(with_hook=True)
    took = time.monotonic() - start
    print(f"cuda_stubs: imports with stubs {'OK' if ok else 'STILL FAIL: ' + error} ({took:.1f}s).")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="only report; exit 1 if imports fail")
    action.add_argument("--remove", action="store_true", help="delete the stubs and the hook")
    args = parser.parse_args()
    if args.remove:
        removed = remove_stubs()
        print(
            f"cuda_stubs: {'removed' if removed else 'nothing to remove:'} {PTH_FILE}, {STUB_DIR}"
        )
        return 0
    if args.check:
        return run_check()
    return run_apply()


if __name__ == "__main__":
    sys.exit(main())

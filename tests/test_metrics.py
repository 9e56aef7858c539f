"""Metrics: TensorBoard tags from a real 2-process run, FLOPs by hand, MFU bounds, NVML telemetry."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

from launch.report import read_scalars
from tests.helpers import make_corpus, read_metrics, run_recipe, shardforge, tiny_recipe, train_losses
from train.device_peaks import peak_tflops
from train.metrics.flops import flops_per_token, mfu
from train.metrics.telemetry import Telemetry
from train.metrics.writer import TB_TAGS, MetricsWriter, aggregate_ranks


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    r = tiny_recipe(make_corpus(tmp / "corpus"), tmp / "cache", tmp / "run",
                    train={"max_steps": 8, "log_every": 2, "eval_every": 4})
    run_recipe(tmp, r)
    return Path(r["run"]["dir"])


def test_tensorboard_tags_steps_and_values(logged_run):
    scalars = read_scalars(logged_run)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "samples_per_s",
                "step_time_s", "data_wait_s", "fwd_bwd_s", "optim_s", "model_tflops", "skipped_steps", "epoch"):
        assert [s for s, _ in scalars[TB_TAGS[key]]] == [2, 4, 6, 8], key
    epochs = [v for _, v in scalars["train/epoch"]]
    assert epochs[0] > 0 and epochs == pytest.approx([epochs[0] * k for k in (1, 2, 3, 4)])  # linear in steps
    assert [s for s, _ in scalars["eval/loss"]] == [4, 8]
    assert "perf/mfu" not in scalars, "MFU must be omitted on a device with no known peak"
    losses = [v for _, v in scalars["train/loss"]]
    assert all(0 < v < 10 for v in losses) and losses[-1] < losses[0]
    assert all(v > 0 for _, v in scalars["perf/tokens_per_s"])
    tps, per_dev = scalars["perf/tokens_per_s"][-1][1], scalars["perf/tokens_per_s_per_device"][-1][1]
    assert per_dev == pytest.approx(tps / 2, rel=1e-5)
    ppl = dict(scalars["eval/perplexity"])[8]
    assert ppl == pytest.approx(math.exp(dict(scalars["eval/loss"])[8]), rel=1e-4)
    # without NVML every rank reports host telemetry, per rank and aggregated
    for tag in ("host_rss_gb/rank0", "host_rss_gb/rank1", "host_rss_gb/min", "host_rss_gb/mean",
                "host_rss_gb/max", "host_cpu_util/mean"):
        assert tag in scalars, tag
    records = read_metrics(logged_run)
    assert [m["step"] for m in records if "loss" in m] == [2, 4, 6, 8]


def test_report_png(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch.report import panels

    proc = shardforge("report", str(logged_run))
    assert proc.returncode == 0, proc.stderr
    png = logged_run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    page = (logged_run / "report.html").read_text()
    assert "train/loss" in page and f"{logged_run.name} (completed at step 8; " in page
    assert f"final train loss {train_losses(logged_run)[-1]:.4f}; eval loss " in page
    from launch.report import draw, headline, read_events

    events = read_events(logged_run)
    axes = {ax.get_title(): ax for ax in draw(logged_run, events, *headline(logged_run, events)).axes}
    memory, tokens = axes["Memory GB"], axes["Tokens/s (global)"]
    assert memory.get_ylim()[0] == 0 and memory.get_xlabel() == tokens.get_xlabel() == "elapsed (s, wall clock)"
    seconds = max(t for values in events.values() for t, _, _ in values) - min(t for t, _, _ in events["train/loss"])
    assert 0 <= min(tokens.lines[0].get_xdata()) and max(tokens.lines[0].get_xdata()) <= seconds + 60
    assert axes["Loss"].get_xlabel() == "step" and list(axes["Loss"].lines[0].get_xdata()) == [2, 4, 6, 8]
    titles = [title for title, _ in panels(read_scalars(logged_run))]
    assert titles[:4] == ["Loss", "Gradient norm (before clipping)", "Tokens/s (global)",
                          "Step time breakdown (s per step)"]
    assert "Host CPU utilisation % (no GPU; mean over ranks)" in titles
    assert not {"MFU", "GPU utilisation % (mean over ranks)", "Validation metrics"} & set(titles)  # nothing to draw
    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    parallel:" in text and "engine: ddp" in text, text[:300]


def test_a_completed_run_prints_its_summary_and_status_reads_it(logged_run, capsys):
    from launch.cli import main as cli

    log = (logged_run / "logs" / "launch.log").read_text().splitlines()
    end = log.index("shardforge: completed at step 8")
    records = read_metrics(logged_run)
    evals = [(m["eval_loss"], m["step"]) for m in records if "eval_loss" in m]
    tokens = [m["tokens"] for m in records if "tokens" in m][-1]
    summary = log[end + 1:]
    assert summary[0].startswith("  duration    ") and " for this launch (" in summary[0], summary
    assert summary[1:] == [f"  trained     8 steps, {tokens:,} tokens",
                           "  best eval   loss {:.4f} at step {}".format(*min(evals)),
                           "  checkpoint  none committed (checkpoint.at_end is off and no periodic save ran): "
                           "nothing to export"], summary  # tiny_recipe saves nothing
    assert cli(["status", str(logged_run)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:6] == [str(logged_run), "completed", "8/8", f"{train_losses(logged_run)[-1]:.4f}", "loss",
                       f"{evals[-1][0]:.4f}"], row


def test_report_panels_for_fine_tuning_on_gpus():
    from launch.report import panels

    scalars = {tag: [(4, 1.0)] for tag in ("train/loss", "eval/loss", "eval/accuracy", "eval/macro_f1",
                                           "eval/f1/hamlet", "gpu_util/mean", "host_cpu_util/mean", "perf/mfu")}
    drawn = dict(panels(scalars))
    assert drawn["Validation metrics"] == ["eval/accuracy", "eval/macro_f1"]  # per-class curves stay in TensorBoard
    assert drawn["GPU utilisation % (mean over ranks)"] == ["gpu_util/mean"] and drawn["MFU"] == ["perf/mfu"]
    assert not any(title.startswith("Host CPU") for title in drawn), "host CPU use is drawn only without GPUs"


def _meta_model(model_type: str, **cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def test_flops_gpt2_124m_by_hand():
    model = _meta_model("gpt2")  # 12 layers, 768 wide, 12 heads, vocab 50257, tied head
    d, layers, vocab, T = 768, 12, 50257, 1024
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    non_embedding = layers * per_layer + 2 * d + vocab * d  # + final norm + tied LM head
    assert non_embedding == 123_653_376
    assert flops_per_token(model, T) == 6 * non_embedding + 12 * layers * 12 * 64 * T


def test_flops_llama_by_hand():
    model = _meta_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                        tie_word_embeddings=False)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    non_embedding = 2 * per_layer + 64 + 100 * 64
    assert flops_per_token(model, 256) == 6 * non_embedding + 12 * 2 * 4 * 16 * 256


def test_peak_table_and_mfu_bounds():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert peak_tflops("NVIDIA A10G", "bf16") == 70.0
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5 and peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA L40", "bf16") == 181.05, "an L40 is not an L4 (whole-word match)"
    assert peak_tflops("NVIDIA L40S", "bf16") == 362.05 and peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no bf16 on V100
    assert peak_tflops("cpu", "bf16") is None
    # parallel.tf32 (the default): fp32 matmuls run on TF32 tensor cores, so fp32 MFU uses that peak
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7 and peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak_tflops("NVIDIA A10G", "tf32") is None  # unknown: MFU is left out, never guessed
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(1000.0, 6e9, 989.4) == pytest.approx(6e12 / 989.4e12)
    assert mfu(1e9, 6e9, 989.4) is None, "an impossible MFU (> 100%) is never reported"


class FakeNVML(types.ModuleType):
    """The narrowest fake: the `pynvml` module, since this machine has no NVIDIA GPU or driver."""

    NVML_TEMPERATURE_GPU, NVML_CLOCK_SM = 0, 1

    def __init__(self, devices: int = 2):
        super().__init__("pynvml")
        self.devices, self.lost = devices, False

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):  # the rank's GPU, by the UUID torch reports (tests/test_cuda_path.py)
        i = int(uuid.removeprefix("GPU-"))
        if i >= self.devices:
            raise RuntimeError("NVMLError_NotFound")
        return i

    def _check(self):
        if self.lost:  # a GPU off the bus fails every call
            raise RuntimeError("GPU is lost")

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check()
        return types.SimpleNamespace(gpu=50 + 10 * h)

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check()
        return types.SimpleNamespace(used=(h + 1) * 2**30)

    def nvmlDeviceGetPowerUsage(self, h):
        self._check()
        return 300_000

    def nvmlDeviceGetTemperatureV(self, h, kind):
        self._check()
        return 60

    def nvmlDeviceGetClockInfo(self, h, kind):
        self._check()
        return 1980

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        self._check()
        return 0


def test_nvml_per_rank_and_aggregated_tags(monkeypatch, tmp_path, logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import torch

    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(uuid=str(d.index)))
    ranks = [Telemetry(torch.device("cuda", i), 0.01) for i in range(2)]
    try:
        import time

        time.sleep(0.1)
        per_rank = [t.drain() for t in ranks]
        assert per_rank[0]["gpu_util"] == 50 and per_rank[1]["gpu_util"] == 60
        values = aggregate_ranks(per_rank)
        assert values["gpu_util/rank1"] == 60 and values["gpu_util/mean"] == 55
        assert values["gpu_mem_used_gb/max"] == 2
        writer = MetricsWriter(tmp_path, tensorboard=True, console=False, max_steps=10, resume_step=0)
        writer.write(1, {"loss": 1.0, **values})
        writer.close()
        acc = EventAccumulator(str(tmp_path / "tensorboard"))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for tag in ("gpu_util/rank0", "gpu_util/rank1", "gpu_util/min", "gpu_util/mean", "gpu_util/max",
                    "gpu_power_w/mean", "gpu_temp_c/max", "gpu_sm_clock_mhz/mean"):
            assert tag in tags, tag
        fake.lost = True  # device lost mid-run: said once, training goes on with host metrics
        time.sleep(0.1)
        after = ranks[0].drain()
        assert "host_rss_gb" in after
        lost = [w for w in logged if "NVML read failed" in w]
        assert len(lost) == 2 and ranks[0].source == "host"  # one line per rank, not per sample
    finally:
        for t in ranks:
            t.close()


def test_tf32_is_on_by_default_and_switches_torchs_matmul_flags():
    import torch

    from train.engines.base import set_fp32_matmul_precision
    from train.config.recipe import recipe_from_dict

    assert recipe_from_dict({}).parallel.tf32 is True
    assert recipe_from_dict({"parallel": {"tf32": False}}).parallel.tf32 is False
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_fp32_matmul_precision(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_fp32_matmul_precision(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_resuming_drops_torn_lines_and_never_writes_through_a_linked_metrics_file(tmp_path, logged):
    """A metrics.jsonl that is a link to someone's file (or holds a line torn by a crash) made the
    resume die with a JSONDecodeError; a link was also appended through."""
    from train.metrics.writer import MetricsWriter

    seen = logged
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    writer = MetricsWriter(tmp_path, tensorboard=False, console=False, max_steps=5, resume_step=2)
    writer.write(3, {"loss": 1.0})
    writer.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3] and "dropped 1 line(s)" in seen[0], seen
    theirs = tmp_path / "theirs.txt"
    theirs.write_text("not json\n")
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").symlink_to(theirs)
    writer = MetricsWriter(tmp_path, tensorboard=False, console=False, max_steps=5, resume_step=2)
    writer.write(3, {"loss": 1.0})
    writer.close()
    assert theirs.read_text() == "not json\n" and not (tmp_path / "metrics.jsonl").is_symlink()
    assert "was a symbolic link to" in seen[-1]

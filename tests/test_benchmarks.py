"""The device check runs end to end (on this CPU, the path it takes on a GPU) and writes nothing it does not remove."""

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_runs_its_five_parts_and_leaves_nothing(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--steps=2", f"--out={out}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert "[1] attention:" in report and re.search(r"influence 0\b", report)  # the packing check, measured
    for part in ("[2] qwen2.5-0.5b.yaml", "[3] qwen2.5-7b.yaml on one device"):
        section = report.split(part, 1)[1]
        assert re.search(r"throughput/tokens_per_s\s+[\d.]+", section) and "total per GPU" in section
    assert re.search(r"sft-lightning / plain: [\d.]+", report)
    diff = re.search(r"\[4\] linear attention.*\n.*max \|diff\| against the layer per sample ([\d.e-]+)", report)
    assert diff and float(diff.group(1)) < 1e-4  # float32 on the CPU
    assert "[5] activation offloading:" in report and "nothing to offload" in report  # the CPU's answer
    assert not out.exists()  # no checkpoint, no export, and the run folders removed


@pytest.mark.slow
def test_gpu_check_sequence_parallel_part_runs_the_long_context_preset_on_its_ranks(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--sequence_parallel=2", "--steps=2",
                             f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[6] long context: llama3.1-8b-128k.yaml" in result.stdout and "[1] attention" not in result.stdout
    line = re.search(r"1024 tokens: ([\d.]+) tokens/s per device, .* planned ([\d.]+) GB per GPU; loss ([\d.]+)", result.stdout)
    assert line and float(line.group(1)) > 0 and float(line.group(3)) > 0, result.stdout[-2000:]
    assert not out.exists()

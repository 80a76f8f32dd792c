"""The peak FLOP/s that MFU divides by does not fall when the machine is busy."""

from __future__ import annotations

import torch

from truthgpt.training import hardware


def test_cpu_peak_is_the_best_ever_measured_here(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUTHGPT_PEAK_CACHE", str(tmp_path / "peaks.json"))
    cpu = torch.device("cpu")
    for measured, expected in ((100.0, 100.0), (40.0, 100.0), (250.0, 250.0), (90.0, 250.0)):
        monkeypatch.setattr(hardware, "_cpu_best", lambda dtype, size, m=measured: m)
        hardware.measure_peak_flops.cache_clear()
        assert hardware.measure_peak_flops(cpu, "fp32") == expected
    hardware.measure_peak_flops.cache_clear()
    (tmp_path / "peaks.json").write_text("not json")  # a damaged cache costs only the memory
    assert hardware.measure_peak_flops(cpu, "fp32") == 90.0
    hardware.measure_peak_flops.cache_clear()


def test_cpu_peak_measures_a_real_product(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUTHGPT_PEAK_CACHE", str(tmp_path / "peaks.json"))
    hardware.measure_peak_flops.cache_clear()
    peak = hardware.measure_peak_flops(torch.device("cpu"), "fp32", size=128)
    hardware.measure_peak_flops.cache_clear()
    assert 1e6 < peak < 1e15
    assert (tmp_path / "peaks.json").is_file()

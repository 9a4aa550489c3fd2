"""Variant choice on recorded probes of machines we do not have (and a live probe of this one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.bundle import manifest as mf
from appliance.serve import hardware

PROBES = Path(__file__).parent / "fixtures" / "probes"


def probe(name: str) -> hardware.Probe:
    return hardware.Probe.from_json(json.loads((PROBES / f"{name}.json").read_text()))


def model(task: mf.Task, *variants: tuple[str, str, str, int]) -> mf.Model:
    return mf.Model("m", task, "LICENSE", "", mf.Defaults(), tuple(
        mf.Variant(mf.Backend(b), mf.WeightFormat(f), q, "w", mem, ("w",))
        for b, f, q, mem in variants))


CHAT = model(mf.Task.CHAT, ("cpu", "gguf", "Q4_1", 200), ("cuda", "gguf", "Q4_1", 200),
             ("metal", "gguf", "Q4_1", 200))
BIG_CHAT = model(mf.Task.CHAT, ("cpu", "gguf", "Q4_K_M", 12000), ("cuda", "gguf", "Q4_K_M", 12000))
EMBED = model(mf.Task.EMBEDDINGS, ("cpu", "onnx", "fp32", 200), ("cpu", "onnx", "int8", 100))
WHISPER = model(mf.Task.TRANSCRIPTION, ("cpu", "ct2", "int8", 150),
                ("cuda", "ct2", "float16", 200))


def test_this_cpu_machine() -> None:
    p = probe("x86-64-cpu-2core")
    chat = hardware.choose(p, CHAT)
    assert (chat.backend, chat.offload, chat.threads) == (mf.Backend.CPU, 0.0, 2)
    assert "no cuda device" in chat.reason and "avx2" in chat.reason
    assert hardware.choose(p, EMBED).variant.quantization == "int8"
    assert hardware.choose(p, WHISPER).variant.quantization == "int8"


def test_jetson_orin_uses_its_gpu() -> None:
    p = probe("jetson-agx-orin-64gb")
    chat = hardware.choose(p, CHAT)
    assert (chat.backend, chat.offload) == (mf.Backend.CUDA, 1.0)
    assert "Jetson" in chat.reason
    assert hardware.choose(p, WHISPER).variant.quantization == "float16"
    assert hardware.choose(p, EMBED).backend is mf.Backend.CPU


def test_x86_cuda_partial_offload_when_the_model_is_too_big() -> None:
    p = probe("x86-64-rtx4060-8gb")
    full = hardware.choose(p, CHAT)
    assert (full.backend, full.offload) == (mf.Backend.CUDA, 1.0)
    partial = hardware.choose(p, BIG_CHAT)
    assert partial.backend is mf.Backend.CUDA
    assert partial.offload == pytest.approx(int(8188 * 0.9) / 12000)
    assert "of layers offloaded" in partial.reason and "10 threads" in partial.reason


def test_unified_memory_gets_no_partial_offload() -> None:
    p = probe("jetson-agx-orin-64gb")
    huge = model(mf.Task.CHAT, ("cpu", "gguf", "Q4_K_M", 50_000),
                 ("cuda", "gguf", "Q4_K_M", 60_000))
    choice = hardware.choose(p, huge)
    assert choice.backend is mf.Backend.CPU and "60000 MiB" in choice.reason


def test_apple_m2_metal() -> None:
    p = probe("apple-m2-16gb")
    chat = hardware.choose(p, CHAT)
    assert chat.backend is mf.Backend.METAL and chat.offload == 1.0
    whisper = hardware.choose(p, WHISPER)  # CTranslate2 has no Metal backend
    assert whisper.backend is mf.Backend.CPU and "no cuda device" in whisper.reason


def test_prefer_cpu_forbids_gpus() -> None:
    choice = hardware.choose(probe("jetson-agx-orin-64gb"), CHAT, prefer="cpu")
    assert choice.backend is mf.Backend.CPU


def test_llama_build_without_gpu_offload_falls_back() -> None:
    data = json.loads((PROBES / "x86-64-rtx4060-8gb.json").read_text())
    data["llama_gpu_offload"] = False
    choice = hardware.choose(hardware.Probe.from_json(data), CHAT)
    assert choice.backend is mf.Backend.CPU and "no GPU offload" in choice.reason


def test_nothing_fits() -> None:
    with pytest.raises(hardware.NoVariant, match="no variant of m fits"):
        hardware.choose(probe("apple-m2-16gb"), BIG_CHAT)


def test_live_probe_of_this_machine() -> None:
    p = hardware.probe()
    assert p.logical_cores >= p.physical_cores >= 1
    assert p.memory_mb >= p.available_mb > 0
    assert hardware.Probe.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_pinned_quantization() -> None:
    p = probe("x86-64-cpu-2core")
    assert hardware.choose(p, EMBED, quantization="fp32").variant.quantization == "fp32"
    with pytest.raises(hardware.NoVariant, match="no Q8_0 variant"):
        hardware.choose(p, EMBED, quantization="Q8_0")


def test_recorded_h200_machine() -> None:
    """Recorded with `python -m appliance.serve.hardware` on a lent H200 machine whose Python had no
    llama-cpp-python or CTranslate2: the GPU is seen, but no installed engine can use it."""
    data = json.loads((PROBES / "x86-64-h200-recorded.json").read_text())
    p = hardware.Probe.from_json(data)
    assert p.gpus[0].name == "NVIDIA H200" and p.gpus[0].memory_mb > 100_000
    chat = hardware.choose(p, CHAT)
    assert chat.backend is mf.Backend.CPU and "no GPU offload" in chat.reason
    data.update(llama_gpu_offload=True, ct2_cuda_devices=1)
    with_engines = hardware.Probe.from_json(data)
    assert hardware.choose(with_engines, BIG_CHAT).offload == 1.0
    assert hardware.choose(with_engines, WHISPER).variant.quantization == "float16"

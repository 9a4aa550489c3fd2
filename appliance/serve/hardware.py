"""Hardware probe and variant choice.

`probe()` reads what this machine has: CPU cores, SIMD flags and memory; NVIDIA GPUs (driver
library, /dev/nvidia*, nvidia-smi for names and memory); a Jetson (its release file, unified
memory); Apple silicon (Metal); and whether the installed llama.cpp build can offload at all.
`choose()` is a pure function of (probe, model, settings) so it is tested with recorded probes of
machines we do not have.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.bundle import manifest as mf
from appliance.engines.lanes import physical_cores
from appliance.errors import ApplianceError

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
              "amx_tile", "neon", "asimd", "sve")


class NoVariant(ApplianceError):
    """No variant of a model can run on this machine (or the pinned one does not exist)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int
    backend: mf.Backend  # cuda or metal
    unified: bool = False  # shares system memory (Jetson, Apple)


@dataclass(frozen=True)
class Probe:
    machine: str  # x86_64, aarch64, arm64
    system: str  # Linux, Darwin
    cpu_model: str
    logical_cores: int
    physical_cores: int
    simd: tuple[str, ...]
    memory_mb: int
    available_mb: int
    gpus: tuple[Gpu, ...] = ()
    jetson: str | None = None  # L4T release line
    llama_gpu_offload: bool = False  # the installed llama.cpp build was compiled with a GPU
    ct2_cuda_devices: int = 0
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Probe:
        gpus = tuple(Gpu(g["name"], g["memory_mb"], mf.Backend(g["backend"]),
                         g.get("unified", False)) for g in data.get("gpus", ()))
        fields = {k: v for k, v in data.items() if k != "gpus"}
        fields["simd"] = tuple(fields.get("simd", ()))
        fields["notes"] = tuple(fields.get("notes", ()))
        return cls(gpus=gpus, **fields)


def meminfo() -> tuple[int, int]:
    """(total, available) MiB."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) // 1024
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, ValueError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size >> 20, pages * size >> 20


def _cpu() -> tuple[str, tuple[str, ...]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model == platform.machine():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return model, tuple(f for f in SIMD_FLAGS if f in flags)


def _nvidia_gpus(notes: list[str]) -> list[Gpu]:
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        return []
    if ctypes.util.find_library("cuda") is None and ctypes.util.find_library("nvidia-ml") is None:
        notes.append("/dev/nvidia* present but no CUDA driver library found")
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        notes.append("NVIDIA device nodes and driver found, nvidia-smi missing: memory unknown")
        return [Gpu("NVIDIA GPU", 0, mf.Backend.CUDA)]
    try:
        query = [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"nvidia-smi failed: {exc}")
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mem = line.rpartition(",")
        gpus.append(Gpu(name.strip(), int(float(mem)), mf.Backend.CUDA))
    return gpus


def _llama_offload() -> bool:
    try:
        import llama_cpp
        return bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, OSError, AttributeError):
        return False


def _ct2_cuda() -> int:
    try:
        import ctranslate2
        return int(ctranslate2.get_cuda_device_count())
    except (ImportError, OSError, AttributeError, RuntimeError):
        return 0


def probe() -> Probe:
    notes: list[str] = []
    total, available = meminfo()
    cpu_model, simd = _cpu()
    gpus = _nvidia_gpus(notes)
    jetson = None
    release = Path("/etc/nv_tegra_release")
    if release.exists():
        jetson = release.read_text(errors="replace").splitlines()[0].strip()
        # Jetson GPUs share the system memory: budget from what the OS has available
        gpus = [Gpu("Jetson integrated GPU", available, mf.Backend.CUDA, unified=True)]
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        gpus = [Gpu("Apple silicon GPU", total, mf.Backend.METAL, unified=True)]
    return Probe(
        machine=platform.machine(), system=platform.system(), cpu_model=cpu_model,
        logical_cores=os.cpu_count() or 1, physical_cores=physical_cores(), simd=simd,
        memory_mb=total, available_mb=available, gpus=tuple(gpus), jetson=jetson,
        llama_gpu_offload=_llama_offload(), ct2_cuda_devices=_ct2_cuda(), notes=tuple(notes),
    )


@dataclass(frozen=True)
class Choice:
    variant: mf.Variant
    backend: mf.Backend
    offload: float  # share of layers on the GPU: 0 (CPU), 1 (all), or in between
    threads: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend.value, "format": self.variant.format.value,
                "quantization": self.variant.quantization, "memory_mb": self.variant.memory_mb,
                "offload": round(self.offload, 3), "threads": self.threads, "reason": self.reason}


# On the CPU, smaller quantisations are faster with little loss for these model sizes.
_CPU_PREFERENCE = ("int8", "Q4_K_M", "Q4_1", "Q4_0", "Q5_K_M", "Q8_0", "fp16", "float16", "fp32")


def _gpu_usable(p: Probe, fmt: mf.WeightFormat, backend: mf.Backend) -> str | None:
    """None if this format can run on this GPU backend here, else why not."""
    if not any(g.backend is backend for g in p.gpus):
        return f"no {backend.value} device"
    if fmt is mf.WeightFormat.GGUF and not p.llama_gpu_offload:
        return "the installed llama.cpp build has no GPU offload"
    if fmt is mf.WeightFormat.CT2 and (backend is not mf.Backend.CUDA or not p.ct2_cuda_devices):
        return "CTranslate2 sees no CUDA device"
    if fmt is mf.WeightFormat.ONNX:
        return "onnxruntime here runs on the CPU"
    return None


def choose(p: Probe, model: mf.Model, prefer: str = "auto", memory_fraction: float = 0.9,
           threads: int = 0, quantization: str | None = None) -> Choice:
    """Pick the variant of `model` to load: a GPU variant that fits (fully, else partly
    offloaded for GGUF), otherwise the CPU variant that fits, preferring faster quantisations.
    `prefer` = "cpu" forbids GPUs; `quantization` pins one. Raises NoVariant when nothing
    fits."""
    if quantization is not None:
        pinned = tuple(v for v in model.variants if v.quantization == quantization)
        if not pinned:
            raise NoVariant(f"{model.id} has no {quantization} variant "
                             f"(it has {', '.join(v.quantization for v in model.variants)})")
        model = replace(model, variants=pinned)
    cpu_threads = threads or p.physical_cores
    skipped: list[str] = []
    if prefer != "cpu":
        for backend in (mf.Backend.CUDA, mf.Backend.METAL):
            for v in (v for v in model.variants if v.backend is backend):
                why = _gpu_usable(p, v.format, backend)
                if why:
                    skipped.append(f"{backend.value}/{v.quantization}: {why}")
                    continue
                gpu = max((g for g in p.gpus if g.backend is backend), key=lambda g: g.memory_mb)
                budget = int(gpu.memory_mb * memory_fraction)
                if v.memory_mb <= budget:
                    return Choice(v, backend, 1.0, cpu_threads,
                                  f"{gpu.name}: {v.memory_mb} MiB fits in {budget} MiB, all layers")
                if v.format is mf.WeightFormat.GGUF and not gpu.unified and budget > 0:
                    share = budget / v.memory_mb
                    return Choice(v, backend, share, cpu_threads,
                                  f"{gpu.name}: {v.memory_mb} MiB > {budget} MiB, "
                                  f"{share:.0%} of layers offloaded, rest on {cpu_threads} threads")
                skipped.append(
                    f"{backend.value}/{v.quantization}: {v.memory_mb} MiB > {budget} MiB")
    cpu = [v for v in model.variants if v.backend is mf.Backend.CPU]
    budget = int(p.available_mb * memory_fraction)
    fitting = [v for v in cpu if v.memory_mb <= budget]
    if not fitting:
        detail = "; ".join(skipped + [f"cpu/{v.quantization}: {v.memory_mb} MiB" for v in cpu])
        raise NoVariant(f"no variant of {model.id} fits this machine ({detail or 'no variants'}; "
                         f"{budget} MiB of memory to use)")

    def rank(v: mf.Variant) -> int:
        q = v.quantization
        return _CPU_PREFERENCE.index(q) if q in _CPU_PREFERENCE else len(_CPU_PREFERENCE)

    best = min(fitting, key=rank)
    why = f"CPU ({', '.join(p.simd) or 'no SIMD flags'})"
    if skipped:
        why += "; " + "; ".join(skipped)
    return Choice(best, mf.Backend.CPU, 0.0, cpu_threads, why)


def main() -> None:  # pragma: no cover - `python -m appliance.serve.hardware` records fixtures
    print(json.dumps(probe().to_json(), indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()

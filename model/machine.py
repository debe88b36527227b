"""The machine a model is trained and evaluated on, recorded beside timings and in model files.

Training time depends less on the core count than on the processor's arithmetic: a CPU with
native bfloat16 units (Intel AMX or AVX512-BF16) trains the CNN under bfloat16, an AVX2-only
one in float32; a training step took 4.7x as long on a 2-core AVX2-only CPU as on our 2-core
AMX one (docs/model-measurements.md, "Training time by processor"). A wall time means little
without the machine that produced it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def native_bfloat16_cpu() -> bool:
    """True where the CPU has native bfloat16 matrix units (AMX or AVX512-BF16)."""
    return any(
        bool(getattr(torch.cpu, probe, lambda: False)())
        for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def describe_machine(device: torch.device) -> dict[str, Any]:
    """What a report or model file records about the hardware its figures came from."""
    return {
        "cpu": cpu_name(),
        "cores": available_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bfloat16": native_bfloat16_cpu(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def machine_text(machine: dict[str, Any] | None) -> str:
    """One line for a report: ``AMD EPYC, 2 cores, AVX2 (no native bfloat16)``."""
    if not machine:
        return "an unrecorded machine"
    if machine.get("gpu"):
        return f"{machine['gpu']} (GPU), {machine['cores']} CPU cores"
    bf16 = "native bfloat16" if machine.get("native_bfloat16") else "no native bfloat16"
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['cpu_capability']} ({bf16})"


def training_text(machine: dict[str, Any], dtype: torch.dtype) -> str:
    """What ``train`` and ``evaluate`` say before training: the arithmetic and the machine, and
    on a CPU without native bfloat16 that float32 training there takes several times longer."""
    precision = str(dtype).removeprefix("torch.")
    text = f"CNN training in {precision} on {machine_text(machine)}"
    if not machine.get("gpu") and dtype == torch.float32 and not machine.get("native_bfloat16"):
        text += (
            "; float32 training on this CPU takes about 4-5x as long as bfloat16 on one with "
            "AMX (the PBC 5-fold evaluation about an hour on 2 cores, about half that with "
            "--image-size 48 --epochs 32; docs/model-measurements.md, "
            '"Training time by processor")'
        )
    return text

"""The machine a report's timings came from: recorded, and written in words."""

from __future__ import annotations

import json

import torch

from leuk_fhir.model.cnn import resolve_precision
from leuk_fhir.model.machine import describe_machine, machine_text, training_text


def test_the_machine_is_described_as_the_training_arithmetic_sees_it() -> None:
    cpu = torch.device("cpu")
    machine = describe_machine(cpu)
    assert machine["cores"] >= 1 and machine["cpu"] and machine["gpu"] is None
    assert machine["cpu_capability"] and isinstance(machine["native_bfloat16"], bool)
    # It goes into report.json and the model manifest as it is.
    assert json.loads(json.dumps(machine)) == machine
    # Auto precision follows the recorded bfloat16 capability.
    expected = torch.bfloat16 if machine["native_bfloat16"] else torch.float32
    assert resolve_precision("auto", cpu) == expected


def test_machine_text_names_cpu_cores_and_arithmetic() -> None:
    avx2 = {"cpu": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "native_bfloat16": False}
    assert machine_text(avx2) == "AMD EPYC, 2 cores, AVX2 (no native bfloat16)"
    amx = {**avx2, "cpu": "Intel Xeon", "cpu_capability": "AVX512", "native_bfloat16": True}
    assert machine_text(amx) == "Intel Xeon, 2 cores, AVX512 (native bfloat16)"
    gpu = {**avx2, "cores": 16, "gpu": "NVIDIA H100 80GB HBM3"}
    assert machine_text(gpu) == "NVIDIA H100 80GB HBM3 (GPU), 16 CPU cores"
    assert machine_text(None) == "an unrecorded machine"


def test_training_text_warns_where_float32_is_slow() -> None:
    avx2 = {"cpu": "AMD EPYC", "cores": 2, "cpu_capability": "AVX2", "native_bfloat16": False}
    slow = training_text(avx2, torch.float32)
    assert slow.startswith("CNN training in float32 on AMD EPYC, 2 cores, AVX2")
    assert "4-5x as long" in slow and "--image-size 48 --epochs 32" in slow
    amx = {**avx2, "cpu_capability": "AVX512", "native_bfloat16": True}
    assert training_text(amx, torch.bfloat16).endswith("AVX512 (native bfloat16)")
    # float32 asked for on a bfloat16 CPU, or on a GPU, is the user's choice: no warning.
    assert "as long" not in training_text(amx, torch.float32)
    gpu = {**avx2, "gpu": "NVIDIA H100"}
    assert "as long" not in training_text(gpu, torch.float32)

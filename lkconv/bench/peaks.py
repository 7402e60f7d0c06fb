"""Peak throughput of known GPUs (dense, vendor datasheet numbers), for "% of the device's floor".

The floor of one timed call is ``max(FLOPs / peak_compute, bytes / peak_bandwidth)`` where
``peak_compute`` is the fastest unit that can compute that dtype exactly as the provider is allowed
to: FFMA for IEEE fp32, the TF32 tensor cores when TF32 is allowed, the fp16/bf16 tensor cores for
half types.  ``% of floor = floor / measured`` (100% = at the physical limit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["GPUPeak", "PEAKS", "lookup_peak", "floor_seconds"]


@dataclass(frozen=True)
class GPUPeak:
    name: str
    ffma_tflops: float      # fp32 CUDA cores
    hfma2_tflops: float     # fp16 CUDA cores (packed half2)
    tf32_tc_tflops: float   # dense
    fp16_tc_tflops: float   # dense fp16/bf16 tensor cores, fp32 accumulate
    hbm_tbps: float

    def compute_tflops(self, dtype_mode: str) -> float:
        if dtype_mode == "fp32":
            return self.ffma_tflops
        if dtype_mode == "tf32":
            return self.tf32_tc_tflops
        if dtype_mode in ("fp16", "bf16"):
            return self.fp16_tc_tflops
        return self.ffma_tflops / 2  # fp64 etc.: not used by the GPU sets


# order matters: the first entry whose every keyword appears in the device name wins
PEAKS = [
    (("h100", "pcie"), GPUPeak("H100 PCIe", 51.2, 102.4, 378.0, 756.0, 2.0)),
    (("h100", "nvl"), GPUPeak("H100 NVL", 60.0, 120.0, 417.5, 835.0, 3.9)),
    (("h100",), GPUPeak("H100 SXM", 66.9, 133.8, 494.7, 989.4, 3.35)),
    (("h200",), GPUPeak("H200 SXM", 66.9, 133.8, 494.7, 989.4, 4.8)),
    (("gh200",), GPUPeak("GH200", 66.9, 133.8, 494.7, 989.4, 4.0)),
    (("a100", "pcie", "40"), GPUPeak("A100 PCIe 40GB", 19.5, 78.0, 156.0, 312.0, 1.555)),
    (("a100", "pcie"), GPUPeak("A100 PCIe 80GB", 19.5, 78.0, 156.0, 312.0, 1.935)),
    (("a100", "40gb"), GPUPeak("A100 SXM 40GB", 19.5, 78.0, 156.0, 312.0, 1.555)),
    (("a100",), GPUPeak("A100 SXM 80GB", 19.5, 78.0, 156.0, 312.0, 2.039)),
]


def lookup_peak(device_name: Optional[str]) -> Optional[GPUPeak]:
    """The peak table entry for a ``torch.cuda.get_device_name()`` string, or None (unknown GPU)."""
    if not device_name:
        return None
    name = device_name.lower()
    # "GH200" contains "h200": check it first
    if "gh200" in name:
        return dict((k, v) for k, v in PEAKS)[("gh200",)]
    for keys, peak in PEAKS:
        if all(k in name for k in keys):
            return peak
    return None


def floor_seconds(peak: GPUPeak, dtype_mode: str, flops: float, nbytes: float):
    """(floor time in seconds, "compute" or "memory") for one call."""
    tc = flops / (peak.compute_tflops(dtype_mode) * 1e12)
    tm = nbytes / (peak.hbm_tbps * 1e12)
    return (tc, "compute") if tc >= tm else (tm, "memory")

"""GPU targets for ahead-of-time compilation: what Triton, ptxas and XLA need to know about each.

``GpuTarget.target_config`` is a text-format ``stream_executor.GpuTargetConfigProto``: it makes
``jax.experimental.topologies.get_topology_desc("", "cuda", target_config=..., topology="1x1x1")``
return a compile-only device of that GPU, so whole jitted programs compile without one.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str  # "sm_80", "sm_90"
    arch: str  # compute capability as Triton takes it: "8.0", "9.0"
    device_kind: str  # what such a device reports as device_kind (also an AbstractDevice's kind)
    smem_per_block_optin: int  # bytes a kernel may request with the opt-in attribute
    target_config: str

    @property
    def compute_capability(self) -> int:
        major, minor = self.arch.split(".")
        return 10 * int(major) + int(minor)


def _gpu_target_config(*, cc_major, cc_minor, sms, fpus_per_sm, smem_per_sm, smem_optin, l2, clock_ghz,
                       bandwidth, memory, description):
    minor = f" minor: {cc_minor}" if cc_minor else ""
    return (
        "gpu_device_info {"
        " threads_per_block_limit: 1024 threads_per_warp: 32"
        f" shared_memory_per_block: 49152 shared_memory_per_core: {smem_per_sm}"
        f" threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus_per_sm}"
        " block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535"
        f" memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock_ghz}"
        f" device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}"
        f" cuda_compute_capability {{ major: {cc_major}{minor} }}"
        " registers_per_core_limit: 65536 registers_per_block_limit: 65536"
        "}"
        f' platform_name: "CUDA" device_description_str: "{description}"'
    )


# H100 SXM 80 GB: the fields XLA's own gpu_specs/h100_sxm.txtpb carries.
H100 = GpuTarget(
    name="sm_90",
    arch="9.0",
    device_kind="NVIDIA H100 80GB HBM3",
    smem_per_block_optin=232448,  # 227 KB
    target_config=_gpu_target_config(
        cc_major=9, cc_minor=0, sms=132, fpus_per_sm=128, smem_per_sm=233472, smem_optin=232448,
        l2=52428800, clock_ghz=1.98, bandwidth=3352320000000, memory=84978434048,
        description="NVIDIA H100 80GB HBM3",
    ),
)

# A100 SXM4 80 GB, from its public specifications: 108 SMs of 64 FP32 lanes, 164 KB shared memory
# per SM of which 163 KB per block with the opt-in, 40 MB L2, 1.41 GHz boost, 2.039 TB/s HBM2e.
A100 = GpuTarget(
    name="sm_80",
    arch="8.0",
    device_kind="NVIDIA A100-SXM4-80GB",
    smem_per_block_optin=166912,  # 163 KB
    target_config=_gpu_target_config(
        cc_major=8, cc_minor=0, sms=108, fpus_per_sm=64, smem_per_sm=167936, smem_optin=166912,
        l2=41943040, clock_ghz=1.41, bandwidth=2039000000000, memory=85899345920,
        description="NVIDIA A100-SXM4-80GB",
    ),
)

TARGETS = {t.name: t for t in (A100, H100)}


def get_target(target: str | GpuTarget) -> GpuTarget:
    if isinstance(target, GpuTarget):
        return target
    key = {"80": "sm_80", "8.0": "sm_80", "90": "sm_90", "9.0": "sm_90", "sm_90a": "sm_90"}.get(target, target)
    if key not in TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; known: {sorted(TARGETS)}")
    return TARGETS[key]

"""Lowering the kernels for CUDA and compiling each one: the part that needs the CUDA plugin.

It runs in a driver process started with ``JAX_PLATFORMS=cpu`` (see ``adasplash_jax.aot``) and in
the pool of processes the driver spawns (they inherit that environment), where XLA's CUDA plugin
registers its Triton compiler without looking for a GPU, cuDNN or a driver.

The kernels are driven only through the public API: ``entmax_attention(..., implementation="pallas",
interpret=False)`` and ``jax.grad`` of it, exported for ``cuda`` with ``jax.export``; every Pallas
Triton kernel is a custom call in the exported StableHLO, named after its ``pallas_call``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib

TRITON_CALL = "__gpu$xla.gpu.triton"  # jaxlib ≤ 0.10.2 and (as of 0.11.0) later: Triton IR bytecode in backend_config
FFI_CALL = "triton_kernel_call_ffi"  # Pallas's compile-while-lowering path: PTX inside a zlib'd proto


def jaxlib_version() -> tuple:
    import jaxlib

    return tuple(int(x) for x in jaxlib.__version__.split(".")[:3] if x.isdigit())


def lowering_needs_target() -> bool:
    """After 0.10.2 Pallas Triton reads the target GPU at lowering time (``gpu_info``): without a GPU
    it must come from an abstract device, and each target gets its own lowering."""
    return jaxlib_version() > (0, 10, 2)


@contextlib.contextmanager
def _target_device(target):
    """An abstract CUDA device of the target's kind (0.11+: Pallas Triton lowers for it; 0.10.2 ignores it)."""
    import jax
    from jax._src import mesh as mesh_lib

    device = mesh_lib.AbstractDevice(device_kind=target.device_kind, num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        yield


# ------------------------------------------------------------------------------------------ lowering


def block_sizes_for(variant, target):
    """The variant's block sizes, or the library's defaults for the target GPU (they depend on it; a
    target of None: the defaults for an unknown GPU)."""
    if variant.block_sizes is not None:
        return variant.block_sizes
    from adasplash_jax.kernels.config import BlockSizes

    alpha = None if isinstance(variant.alpha, str) else float(variant.alpha)
    return BlockSizes.for_head_dim(variant.head_dim, alpha, None if target is None else target.compute_capability,
                                   dense_inputs=bool({"mask", "bias"} & set(variant.features)))


def _program(variant, program: str, block_sizes):
    """(function, argument structs) of one program of a variant."""
    import jax
    import jax.numpy as jnp

    import adasplash_jax

    v = variant
    dt = jnp.dtype(v.dtype)
    q = jax.ShapeDtypeStruct((v.batch, v.seq_len, v.num_heads, v.head_dim), dt)
    kv = jax.ShapeDtypeStruct((v.batch, v.seq_len, v.kv_heads, v.head_dim), dt)
    structs = [q, kv, kv]
    traced_alpha = isinstance(v.alpha, str)
    if traced_alpha:
        structs.append(jax.ShapeDtypeStruct((v.num_heads,), jnp.float32))
    kwargs = dict(is_causal=v.causal, implementation="pallas", interpret=False, block_sizes=block_sizes)
    if "window" in v.features:
        kwargs["local_window_size"] = (256, 0 if v.causal else 256)
    # Array inputs after α, in this order (each present only with its feature).
    extra = [name for name in ("alibi", "mask", "bias") if name in v.features]
    extra_structs = dict(alibi=jax.ShapeDtypeStruct((v.num_heads,), jnp.float32),
                         mask=jax.ShapeDtypeStruct((1, v.num_heads, v.seq_len, v.seq_len), jnp.bool_),
                         bias=jax.ShapeDtypeStruct((v.batch, 1, v.seq_len, v.seq_len), dt))
    structs += [extra_structs[name] for name in extra]

    def attend(q, k, val, *rest):
        a = rest[0] if traced_alpha else float(v.alpha)
        arrays = dict(zip(extra, rest[1:] if traced_alpha else rest))
        return adasplash_jax.entmax_attention(q, k, val, arrays.get("bias"), arrays.get("mask"), alpha=a,
                                              alibi_slopes=arrays.get("alibi"), **kwargs)

    if program == "inference":
        return attend, structs

    def loss(*args):
        return attend(*args).astype(jnp.float32).sum()

    argnums = (0, 1, 2, 3) if v.alpha == "learned" else (0, 1, 2)
    if "bias" in v.features:
        argnums += (len(structs) - 1,)
    return jax.grad(loss, argnums=argnums), structs


def export_for_cuda(fn, structs):
    import jax

    return jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*structs)


def _walk(op):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def triton_calls(mlir_text: str) -> list[dict]:
    """Every Pallas Triton kernel in an exported module, in program order:
    dicts with name, num_warps, num_stages, grid, results and either ``ir`` (Triton bytecode) or
    ``ptx`` + ``smem_bytes`` (already compiled while lowering)."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir

    out = []
    with jmlir.make_ir_context():
        module = ir.Module.parse(mlir_text)
        for op in _walk(module.operation):
            if op.name != "stablehlo.custom_call":
                continue
            target = ir.StringAttr(op.attributes["call_target_name"]).value
            if target not in (TRITON_CALL, FFI_CALL):
                continue
            cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
            if target == TRITON_CALL:
                out.append(dict(
                    name=ir.StringAttr(cfg["name"]).value,
                    ir=bytes(ir.StringAttr(cfg["ir"]).value_bytes),
                    num_warps=ir.IntegerAttr(cfg["num_warps"]).value,
                    num_stages=ir.IntegerAttr(cfg["num_stages"]).value,
                    grid=tuple(ir.IntegerAttr(cfg[g]).value for g in ("grid_x", "grid_y", "grid_z")),
                    results=len(op.results),
                ))
            else:  # untested here (no jaxlib that takes this path was installable on this machine)
                call = decode_kernel_call(zlib.decompress(bytes(ir.StringAttr(cfg["opaque"]).value_bytes)))
                out.append(dict(name=ir.StringAttr(cfg["name"]).value, results=len(op.results), **call))
    return out


# A minimal protobuf reader for what the FFI call's opaque holds (jaxlib/gpu/triton.proto):
#   TritonAnyKernelCall { TritonKernelCall kernel_call = 1; ...; bytes metadata = 3; string name = 4 }
#   TritonKernelCall { TritonKernel kernel = 1; uint32 grid_0 = 2; grid_1 = 3; grid_2 = 4; ... }
#   TritonKernel { string kernel_name = 1; uint32 num_warps = 2; uint32 shared_mem_bytes = 3;
#                  string ptx = 4; string ttir = 5; uint32 compute_capability = 6; ... }


def _fields(buf: bytes) -> dict:
    fields, i = {}, 0

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            n = varint()
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, value)
    return fields


def decode_kernel_call(proto: bytes) -> dict:
    """A serialised TritonAnyKernelCall (as ``TritonKernelCall.to_proto`` writes it) → launch and PTX."""
    call = _fields(_fields(proto)[1])
    kernel = _fields(call[1])
    return dict(
        num_warps=kernel.get(2, 4),
        num_stages=None,
        smem_bytes=kernel.get(3, 0),
        ptx=kernel.get(4, b"").decode(),
        compute_capability=kernel.get(6, 0),
        grid=tuple(call.get(n, 1) for n in (2, 3, 4)),
    )


def _triton_ir_context():
    """An MLIR context that reads Triton IR (as Pallas builds its own: upstream dialects and ``tt``)."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib import triton as xla_triton

    ctx = jmlir.JaxIrContext()
    ctx.append_dialect_registry(jmlir.upstream_dialects)
    xla_triton.dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    return ctx


def ir_without_locations(bytecode: bytes) -> str:
    """Triton IR bytecode as MLIR text without its locations.

    The bytecode's locations name the Python source of every op by absolute path (the checkout, or
    site-packages) and line, so the same kernel lowered from two clones differs byte for byte. The
    text keeps every op, attribute and type: only the debug locations are left out. XLA's Triton
    emits the same PTX, byte for byte, from the text parsed back as from the bytecode as lowered
    (checked for the τ, forward, dK/dV and dQ kernels of three variants, sm_80 and sm_90).
    """
    from jax._src.lib.mlir import ir

    with _triton_ir_context():
        module = ir.Module.parse(bytecode)
        return module.operation.get_asm(enable_debug_info=False, large_elements_limit=None)


def kernel_key(call: dict) -> str:
    """What names a kernel in the compile cache and in KernelRecord.key: a hash of its code without
    source locations, and of num_warps and num_stages. It does not depend on where the package was
    checked out or installed (nor on line numbers); kernels that differ in any op, attribute or type,
    or in the launch parameters, get different keys. PTX (the compile-while-lowering path) is
    hashed as it is: XLA's Triton emits it without debug information (no ``.file``/``.loc``)."""
    code = ir_without_locations(call["ir"]) if "ir" in call else call["ptx"]
    h = hashlib.sha256(code.encode() + repr((call["num_warps"], call["num_stages"])).encode())
    return h.hexdigest()[:16]


def lower_variant(variant, targets) -> list[dict]:
    """The kernel calls of every program of a variant. Each gets ``program``, ``target`` (None when
    one lowering serves every target: on jaxlib 0.10.2, when the block sizes are the same for all)
    and ``key`` (identical kernels share it)."""
    per_target = lowering_needs_target() or len({block_sizes_for(variant, t) for t in targets}) > 1
    out = []
    for program in variant.programs:
        for target in (targets if per_target else [None]):
            fn, structs = _program(variant, program, block_sizes_for(variant, target or targets[0]))
            ctx = _target_device(target) if lowering_needs_target() else contextlib.nullcontext()
            with ctx, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 0.11+ warns that Pallas Triton is deprecated
                exported = export_for_cuda(fn, structs)
            seen = {}
            for call in triton_calls(exported.mlir_module()):
                call.update(program=program, target=None if target is None else target.name, key=kernel_key(call))
                # A program may call one pallas_call twice; number the repeats.
                n = seen.get(call["name"], 0)
                seen[call["name"]] = n + 1
                if n:
                    call["name"] = f"{call['name']}#{n + 1}"
                out.append(call)
    return out


# ------------------------------------------------------------------------------------------ compiling


def compile_kernel(call: dict, target, tools, sass: bool, workdir: str) -> dict:
    """Triton (XLA's bundled one) → PTX → ptxas -v → cubin [→ nvdisasm]; a dict of what was found."""
    from adasplash_jax.aot import sass as sass_lib

    res = dict(error=None, seconds={})
    t0 = time.perf_counter()
    try:
        if "ir" in call:
            from jax._src.lib import triton as xla_triton

            compiled = xla_triton.compile(
                "cuda", call["ir"], target.arch, num_warps=call["num_warps"], num_ctas=1,
                num_stages=call["num_stages"],
            )
            ptx, smem = compiled.asm, compiled.smem_bytes
        else:
            ptx, smem = call["ptx"], call["smem_bytes"]
    except Exception as e:  # noqa: BLE001 - a kernel Triton cannot compile is a result, not a crash
        res["error"] = f"triton: {type(e).__name__}: {e}"
        return res
    res["seconds"]["triton"] = time.perf_counter() - t0
    res["smem_bytes"] = int(smem)
    target_line = next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), None)
    gpu_name = target_line or f"sm_{target.compute_capability}"
    res["gpu_name"] = gpu_name
    stem = os.path.join(workdir, f"{call['key']}_{target.name}")
    with open(stem + ".ptx", "w") as f:
        f.write(ptx)
    t0 = time.perf_counter()
    p = subprocess.run([tools.ptxas, "-v", f"--gpu-name={gpu_name}", stem + ".ptx", "-o", stem + ".cubin"],
                       capture_output=True, text=True, check=False)
    res["seconds"]["ptxas"] = time.perf_counter() - t0
    if p.returncode != 0:
        res["error"] = f"ptxas exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"
        return res
    res["ptxas"] = sass_lib.parse_ptxas(p.stdout + p.stderr)
    if sass:
        t0 = time.perf_counter()
        d = subprocess.run([tools.nvdisasm, "-c", stem + ".cubin"], capture_output=True, text=True, check=False)
        res["seconds"]["nvdisasm"] = time.perf_counter() - t0
        if d.returncode != 0:
            res["error"] = f"nvdisasm exited {d.returncode}: {d.stderr[-2000:]}"
            return res
        instrs = sass_lib.parse_sass(d.stdout)
        res["sass_instructions"] = len(instrs)
        res["sass_mma"] = sum(1 for i in instrs if i.base.endswith("MMA"))
        res["loops"] = sass_lib.innermost_loops(d.stdout)
    return res


def _cache_path(call, target, tools, sass):
    """Where a compile result is kept: keyed by the kernel (IR and launch parameters), the target and
    the tool versions. ADASPLASH_AOT_CACHE: a folder, or 0 for no cache (default ~/.cache/adasplash_jax/aot)."""
    root = os.environ.get("ADASPLASH_AOT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "adasplash_jax", "aot"))
    if root in ("", "0"):
        return None
    ident = repr((call["key"], target.name, target.arch, tools.jaxlib_version, tools.plugin_version,
                  tools.ptxas_version, bool(sass), 5 if sass else 2))
    # 2: location-free keys; with SASS, 3: loops count guarded instructions, 4: unrolling, 5: no EXIT inside
    return os.path.join(root, hashlib.sha256(ident.encode()).hexdigest()[:32] + ".pkl")


def _load_cached(path):
    """A cached compile result, or None (no entry, no cache, or a damaged entry: recompiled)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            res = pickle.load(f)
    except Exception:  # noqa: BLE001
        return None
    return dict(res, seconds={}, cached=True)


def _store(path, res):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(res, f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the pool
#
# XLA's Triton compile holds the GIL (two threads compile two kernels no faster than one), so the
# work is spread over processes: a pool of `jobs` spawned processes lowers every variant, then
# compiles each distinct (kernel, target) that is not cached; the driver (run) only hands out work
# and reads and checks the cache. Each task is small (a lowering or one kernel for one target), so
# the processes stay busy to the end, whatever the kernels cost.

_triton_ready = False


def _ensure_triton():
    global _triton_ready
    if _triton_ready:
        return
    import jax
    from jax._src.lib import triton as xla_triton

    jax.devices()  # backends (and so plugins) initialise lazily; the CUDA plugin registers Triton then
    if not xla_triton.has_compilation_handler("CUDA"):
        raise RuntimeError(
            "XLA's Triton compiler for CUDA is not registered: the jax-cuda13-plugin did not initialise "
            "(it must match jaxlib exactly, and this process needs JAX_PLATFORMS=cpu on a machine without a GPU)"
        )
    _triton_ready = True


def _lower_task(variant, targets):
    """(calls, None), or (None, the traceback) when the variant does not lower."""
    _ensure_triton()
    t0 = time.perf_counter()
    try:
        calls = lower_variant(variant, targets)
    except Exception:  # noqa: BLE001 - a variant that does not lower is a result, not a crash
        return None, traceback.format_exc(limit=8)
    seconds = time.perf_counter() - t0
    for call in calls:
        call["lower_seconds"] = seconds
    return calls, None


def _compile_task(call, target, tools, sass, workdir, cache_path):
    _ensure_triton()
    res = compile_kernel(call, target, tools, sass, workdir)
    if cache_path and res["error"] is None:
        _store(cache_path, res)
    return res


_KERNEL_FIELDS = ("key", "ir", "ptx", "smem_bytes", "num_warps", "num_stages")


def run(request: dict) -> dict:
    """Lower every variant, then compile each distinct kernel once per target (the cached ones not),
    in a pool of ``request["jobs"]`` processes."""
    targets, tools, sass = request["targets"], request["tools"], request["sass"]

    def wants_sass(v):
        return sass if isinstance(sass, bool) else v.name in sass

    # Disassembled variants first: a kernel they share with others is compiled with nvdisasm.
    variants = sorted(request["variants"], key=lambda v: not wants_sass(v))
    calls, errors, compiled, todo = {}, {}, {}, {}
    pool = concurrent.futures.ProcessPoolExecutor(max(1, request.get("jobs") or 1),
                                                  mp_context=multiprocessing.get_context("spawn"))
    try:
        with tempfile.TemporaryDirectory(prefix="adasplash_aot_") as workdir:
            lowering = [(v, pool.submit(_lower_task, v, targets)) for v in variants]
            for v, future in lowering:
                cs, error = future.result()
                if error is not None:
                    errors[v.name] = error
                    continue
                calls[v.name] = cs
                for call in cs:
                    for target in targets:
                        k = (call["key"], target.name)
                        if call["target"] not in (None, target.name) or k in compiled or k in todo:
                            continue
                        path = _cache_path(call, target, tools, wants_sass(v))
                        hit = _load_cached(path)
                        if hit is not None:
                            compiled[k] = hit
                            continue
                        kernel = {f: call[f] for f in _KERNEL_FIELDS if f in call}
                        todo[k] = pool.submit(_compile_task, kernel, target, tools, wants_sass(v), workdir, path)
            for k, future in todo.items():
                compiled[k] = future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for cs in calls.values():  # the bytecode is not needed past this point
        for call in cs:
            call.pop("ir", None)
            call.pop("ptx", None)
    return dict(calls=calls, errors=errors, compiled=compiled)


def main(argv):
    request_path, response_path = argv
    with open(request_path, "rb") as f:
        request = pickle.load(f)
    out = run(request)
    with open(response_path, "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    # Run the module under its own name: the pool's processes unpickle its tasks by that name.
    from adasplash_jax.aot import capture

    capture.main(sys.argv[1:])

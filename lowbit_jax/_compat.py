"""The one place that knows which JAX version is running.

lowbit-jax supports JAX 0.10.2 (CPU CI) and 0.11.x (the GPU image); every API difference
between them is gated here so the rest of the code reads the same on both.
"""

from __future__ import annotations

import jax

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def default_backend() -> str:
    """'cpu', 'gpu' or 'tpu' (jax.default_backend() with 'cuda'/'rocm' folded into 'gpu')."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def on_gpu() -> bool:
    return default_backend() == "gpu"


def shard_map(f, *, mesh, in_specs, out_specs, check: bool = True):
    """``jax.shard_map`` (JAX >= 0.7), falling back to the experimental module's spelling.

    ``check=False`` turns off replication/varying-axis checking, for bodies that do their own
    collectives around a custom_vjp (whose backward the checker cannot type).
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map as _shard_map  # pragma: no cover

    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check)


def host_memory_space():
    """``jax.memory.Space.Host`` (pinned host memory) where the backend has it, else None.

    Offloaded optimizer states live there between steps. Both JAX 0.10 and 0.11 expose
    ``jax.memory.Space``; backends without a pinned-host memory (some plugins) get None and the
    caller keeps the state on the device.
    """
    space = getattr(getattr(jax, "memory", None), "Space", None)
    if space is None:
        return None
    try:
        kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    except Exception:  # noqa: BLE001 - a backend without memory introspection offloads nothing
        return None
    return space.Host if "pinned_host" in kinds else None


def device_memory_space():
    space = getattr(getattr(jax, "memory", None), "Space", None)
    return None if space is None else space.Device


def eager():
    """A context in which JAX calls run now, even while a caller's function is being traced.

    ``jax.ensure_compile_time_eval`` is not it for a call that itself traces a Pallas kernel:
    it folds every constant eagerly in the inner traces too (``program_id`` then fails). The
    eval-trace context of ``jax._src.core`` (JAX 0.10 and 0.11) only swaps the current trace.
    """
    try:
        from jax._src.core import eval_context
    except ImportError:  # pragma: no cover - a JAX without it
        return jax.ensure_compile_time_eval()
    return eval_context()


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, None off the GPU or where the backend does not say.

    The Mosaic GPU (wgmma) kernels need Hopper (9.x) and the Mosaic GPU Pallas API of the GPU
    image's JAX (0.11); on other GPUs the Triton kernels serve every shape.
    """
    if not on_gpu():
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


def has_wgmma_kernels() -> bool:
    """Whether the Hopper-only Mosaic GPU kernels can run here (sm_90 and JAX >= 0.11)."""
    cc = gpu_compute_capability()
    return cc is not None and cc[0] == 9 and JAX_VERSION >= (0, 11)

"""Diagnostics for tests and benchmarks: which collectives a piece of code issues, how much tensor
memory is alive, the process RSS."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "barrier",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Record ``(name, bytes of the first tensor argument)`` for every torch.distributed collective
    issued inside the block (patched at module level, so DeepSpeed's calls are seen too)."""
    calls: list[tuple[str, int]] = []
    saved = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, __name=name, __fn=fn, **kwargs):
            t = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if (
                t is None
                and args
                and isinstance(args[0], list)
                and args[0]
                and isinstance(args[0][0], torch.Tensor)
            ):
                t = args[0][0]
            calls.append((__name, int(t.numel() * t.element_size()) if t is not None else 0))
            return __fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            st = obj.untyped_storage()
            ptr = st.data_ptr()
        except (RuntimeError, ReferenceError, NotImplementedError):  # freed or non-storage tensors
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += st.nbytes()
    return total


def release_memory() -> None:
    """Collect garbage and ask glibc to return freed heap pages to the OS (so RSS reflects the
    memory a prune released; without it freed CPU tensors stay in malloc's arenas)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass

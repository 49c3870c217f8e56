"""Run a function on N real ranks (the distributed tests and the speed benchmarks share this runner): gloo by default (forked processes that share the parent's imports),
or NCCL on CUDA (spawned processes, one GPU each) for the benchmarks' GPU runs."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q: Any, barrier: bool, backend: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import faulthandler
    import signal
    import sys

    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    faulthandler.enable(file=sys.stderr, all_threads=True)  # a crashing rank shows where
    if os.environ.get("GRADPRUNER_TEST_DUMP_AFTER"):
        faulthandler.dump_traceback_later(float(os.environ["GRADPRUNER_TEST_DUMP_AFTER"]), file=sys.stderr)
    try:
        import deepspeed

        from gradpruner_ds.backends.deepspeed import skip_cpu_shm_comm_build

        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        else:
            skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        result = fn(rank, world, *args)
        q.put((rank, "ok", result))
        if barrier:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        # the queue's feeder thread must flush before os._exit, or the report is lost
        q.close()
        q.join_thread()
        os._exit(0)  # gloo threads can abort interpreter shutdown (platform.md)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 240.0,
    barrier: bool = True,
    backend: str = "gloo",
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` ranks; returns the per-rank results (rank order).

    Raises AssertionError with the failing rank's traceback, or on timeout (the ranks are killed).
    ``barrier=False`` skips the closing barrier (for tests that leave a collective unmatched).
    ``backend="nccl"``: spawned ranks (CUDA cannot be used in a forked child), rank r on GPU r; ``fn`` and
    ``args`` must then be picklable (module-level function, main module guarded by ``__main__``).
    """
    ctx = mp.get_context("spawn" if backend == "nccl" else "fork")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, args, q, barrier, backend)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import queue
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                import signal

                for p in procs:  # show where the stuck ranks are before they are killed
                    if p.is_alive() and p.pid is not None:
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2.0)
                raise AssertionError(f"ranks timed out after {timeout}s; finished: {sorted(results)}")
            try:
                rank, status, payload = q.get(timeout=min(left, 5.0))
            except queue.Empty:
                reported = set(results) | {int(e.split(":", 1)[0].split()[1]) for e in errors}
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if dead:
                    time.sleep(1.0)  # a rank that just exited may still be flushing its report
                    if q.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise AssertionError(f"rank(s) died without reporting (exit codes {codes})") from None
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                if len(errors) == 1:
                    deadline = min(deadline, time.monotonic() + 30.0)  # let the others report, then stop
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]

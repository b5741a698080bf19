"""A block's linears solved on several devices at once.

With one device nothing changes: the solves run one after another where they are. With several
(`--device cuda:0,cuda:1,...`, or every visible GPU by default), the walk still runs the block on the
first device, but each linear's statistics (a 70B down_proj's Hessian is 3.3 GB in fp32) are
accumulated on the device that will solve it, the linears taking the devices in turn (`slots`), and
each device solves its own linears in its own thread (CUDA kernels release the GIL, so SparseGPT's
factorizations and sweeps of different linears overlap). A device's solves keep their order, so
linears sharing one accumulator (the parts of a fused linear) are solved one after another by the
same thread, as the last-reader rule of stats.last_readers expects.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch


def slots(keys: Sequence, devices: Sequence[str]) -> dict:
    """{key: slot index}: the distinct keys (accumulators) take the devices in turn."""
    out: dict = {}
    for k in keys:
        if k not in out:
            out[k] = len(out) % len(devices)
    return out


def _on(device: str, jobs: list[Callable[[], object]]) -> list:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # anything a solver allocates without a device lands here
    return [job() for job in jobs]


def run(jobs: Sequence[tuple[int, Callable[[], object]]], devices: Sequence[str]) -> list:
    """Run (slot, job) pairs, each slot's jobs in order in its own thread (one thread in all when there is
    one slot); returns the jobs' results in the order given. The first exception raised is re-raised."""
    by_slot: dict[int, list[int]] = {}
    for i, (slot, _) in enumerate(jobs):
        by_slot.setdefault(slot, []).append(i)
    results: list = [None] * len(jobs)
    if len(by_slot) <= 1:
        for i, (_, job) in enumerate(jobs):
            results[i] = job()
        return results
    with ThreadPoolExecutor(max_workers=len(by_slot), thread_name_prefix="llmprune-solve") as pool:
        futures = {s: pool.submit(_on, devices[s], [jobs[i][1] for i in idx]) for s, idx in by_slot.items()}
        for s, fut in futures.items():
            for i, r in zip(by_slot[s], fut.result()):
                results[i] = r
    return results

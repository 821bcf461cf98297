"""tools/bench_workers.py reads what a run sent its workers from the run's log (-v), as
distributed.RayShards.close logs it, and puts it in its table; and it reads the driver's
resident memory by kind."""
from __future__ import annotations

import json
import os
import logging

import bench_workers
import pytest

from onnxsnp.compensate.distributed import TRAFFIC_LOG, Channel, Traffic


def _logged(traffic: Traffic, caplog) -> str:
    with caplog.at_level(logging.INFO, logger="onnxsnp"):
        logging.getLogger("onnxsnp.compensate.distributed").info("%s%s", TRAFFIC_LOG, json.dumps(traffic.summary()))
    return "onnxsnp: loaded and matched (1.0 s)\n" + "".join(f"onnxsnp: {r.getMessage()}\n" for r in caplog.records)


def test_the_traffic_is_read_back_from_the_log_and_tabled(caplog):
    traffic = Traffic(workers=2)
    traffic.add(Channel.SETUP, 4_900_000, 0.0)
    traffic.add(Channel.BATCHES, 40_000, 0.004)
    traffic.add(Channel.BATCHES, 30_000, 0.005)
    for size in (113_000_000, 7_000_000, 9_000_000):
        traffic.add(Channel.HALF_WEIGHTS, size, 0.25)
    traffic.add(Channel.CURRENT_WEIGHTS, 2_500_000, 0.5)
    traffic.hold_seconds = 1.5
    read = bench_workers.traffic_of(_logged(traffic, caplog))
    assert read == traffic.summary()
    assert read["half_weights"] == {"bytes": 129_000_000, "puts": 3, "seconds": 0.75}
    cells = [c.strip() for c in bench_workers.traffic_cells(read).split("|")[:-1]]
    # setup + batches MB, originals MB (puts), current MB (puts), all puts' seconds, holds' seconds
    assert cells == ["4.9 + 0.07", "129.0 (3)", "2.5 (1)", f"{0.009 + 0.75 + 0.5:.2f}", "1.50"]


def test_a_run_without_workers_logs_no_traffic():
    assert bench_workers.traffic_of("onnxsnp: loaded and matched (1.0 s)\n") is None
    assert bench_workers.traffic_cells(None).count("–") == 5


@pytest.mark.parametrize("size, shown", [(43_008, "0.04"), (4_876_840, "4.88")])
def test_small_batches_are_not_shown_as_nothing(size, shown):
    traffic = Traffic(workers=2)
    traffic.add(Channel.BATCHES, size, 0.0)
    assert bench_workers.traffic_cells(traffic.summary()).startswith(f"0.0 + {shown} |")


def test_driver_kinds_see_shared_memory():
    """Ray's object store is a shared mapping; what a process touches of one counts as RssShmem."""
    from multiprocessing import shared_memory

    size = 64 * 2**20
    before = bench_workers._resident_kinds(os.getpid())
    block = shared_memory.SharedMemory(create=True, size=size)
    try:
        block.buf[::4096] = b"\1" * (size // 4096)  # touch every page
        after = bench_workers._resident_kinds(os.getpid())
    finally:
        block.close()
        block.unlink()
    assert set(after) == set(bench_workers.RESIDENT_KINDS)
    assert after["RssShmem"] - before["RssShmem"] >= 0.9 * size
    assert bench_workers._resident_kinds(2**22 + 1) == {}  # above the largest pid Linux allows (2**22)

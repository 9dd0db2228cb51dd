"""VoxelPearson under a real 2-process CPU (gloo) DDP run.

Each rank updates with a different slice of the data; rank 1 also gets a padded duplicate row,
as ``DistributedSampler`` adds when the data do not split evenly, passed with ``mask=False``.
After ``compute()`` (where torchmetrics syncs the states) both ranks must equal the
single-process result on all the data.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brainenc.metrics import VoxelPearson

N_IMAGES, N_VOXELS, SPLIT = 61, 12, 31  # rank 0: rows [0, 31), rank 1: rows [31, 61) + pad


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Deterministic data with the cases whose reduction across ranks is easy to get wrong."""
    rng = np.random.default_rng(123)
    x = rng.normal(size=(N_IMAGES, N_VOXELS))
    y = 0.8 * x + rng.normal(size=(N_IMAGES, N_VOXELS))
    x[:, 0] = 0.1  # constant everywhere -> NaN
    y[:SPLIT, 1] = 1.0  # constant within each rank but not overall: the min/max states
    y[SPLIT:, 1] = 2.0  # must be reduced across ranks, or this would wrongly be NaN
    x[:SPLIT, 2] = np.nan  # all valid pairs on rank 1; rank 0 contributes nothing
    y[[3, 40, 41], 3] = np.nan  # holes on both ranks
    return x, y


def rank_batches(rank: int, x: np.ndarray, y: np.ndarray):
    """(pred, target, mask) batches of one rank; rank 1 ends with a masked duplicate row."""
    if rank == 0:
        bounds = [(0, 5), (5, 22), (22, SPLIT)]
        return [(x[a:b], y[a:b], None) for a, b in bounds]
    px = np.concatenate([x[SPLIT:], x[SPLIT:SPLIT + 1]])
    py = np.concatenate([y[SPLIT:], y[SPLIT:SPLIT + 1]])
    mask = np.ones(len(px), dtype=bool)
    mask[-1] = False
    return [(px[:11], py[:11], mask[:11]), (px[11:], py[11:], mask[11:])]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        x, y = make_data()
        metric = VoxelPearson(N_VOXELS)
        for px, py, mask in rank_batches(rank, x, y):
            metric.update(
                torch.as_tensor(px, dtype=torch.float32),
                torch.as_tensor(py, dtype=torch.float32),
                mask=None if mask is None else torch.as_tensor(mask),
            )
        local_n = metric.n.clone()
        result = metric.compute()
        torch.save({"r": result, "local_n": local_n}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_voxel_pearson_ddp_equals_single_process(tmp_path):
    # fork (as DataLoader workers use) skips re-importing torchmetrics in each child, which
    # alone takes ~10 s on this 2-core machine; spawn is the fallback where fork is missing.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)

    x, y = make_data()
    single = VoxelPearson(N_VOXELS)
    single.update(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))
    expected = single.compute().numpy()
    assert np.isnan(expected[0]) and np.isfinite(expected[1:]).all()

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # Each rank really saw only its part (so agreement below comes from the sync) ...
    assert results[0]["local_n"][5].item() == SPLIT
    assert results[1]["local_n"][5].item() == N_IMAGES - SPLIT  # the padded row is not counted
    assert results[0]["local_n"][2].item() == 0
    for res in results:
        np.testing.assert_allclose(res["r"].numpy(), expected, rtol=0, atol=1e-12, equal_nan=True)

    # ... and the masked duplicate would have changed the answer had it been counted.
    padded = VoxelPearson(N_VOXELS)
    for r in (0, 1):
        for px, py, _ in rank_batches(r, x, y):
            padded.update(torch.as_tensor(px, dtype=torch.float32), torch.as_tensor(py, dtype=torch.float32))
    assert np.nanmax(np.abs(padded.compute().numpy() - expected)) > 1e-4

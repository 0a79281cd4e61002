"""Two gloo processes on the CPU, calibration batches split between them, prune like one process:
the same masks (hash) and the same weights within float tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit.checkpoint import ShardWriter
from prunekit.models import load_model, open_streamed
from prunekit.pruning.run import prune
from tests.conftest import make_tiny

CASES = {"wanda": ("wanda", 0.5, "2:4", {}), "fasp": ("fasp", 0.3, "structured", {"channel_multiple": 8})}


def _one_rank(rank: int, world: int, init_file: str, source: str, calib: str, out: str, case: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method, sparsity, pattern, options = CASES[case]
        loaded = open_streamed(source)
        writer = ShardWriter(out) if rank == 0 else None
        result = prune(loaded, method, sparsity, pattern, calib_ids=torch.load(calib), progress=False,
                       writer=writer, **options)
        if writer:
            writer.finish(result.model, loaded.tokenizer, result.manifest(source))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_two_processes_prune_like_one(case, tokenizer, tmp_path):
    import torch.multiprocessing as mp

    source = tmp_path / "dense"
    make_tiny("llama", layers=3).save_pretrained(source)
    tokenizer.save_pretrained(source)
    calib = torch.randint(3, 300, (32, 24), generator=torch.Generator().manual_seed(1))
    torch.save(calib, tmp_path / "calib.pt")
    method, sparsity, pattern, options = CASES[case]
    single = prune(load_model(source), method, sparsity, pattern, calib_ids=calib, progress=False, **options)

    mp.spawn(_one_rank, args=(2, str(tmp_path / "init"), str(source), str(tmp_path / "calib.pt"),
                              str(tmp_path / "two"), case), nprocs=2, join=True)
    manifest = json.loads((tmp_path / "two" / "prunekit.json").read_text())
    assert manifest["mask_hash"] == single.mask_hash
    two = load_model(tmp_path / "two").model.state_dict()
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

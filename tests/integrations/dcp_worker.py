"""A torchrun worker for tests/integrations/test_dcp_torchrun.py: FSDP2 + DTensor state, CPU, gloo.

``save DIR KEYFILE``: every rank shards the same seeded model and optimizer (FSDP2
``fully_shard``) and a DTensor over the world, takes one step, saves the
sharded state with ``plinius.dcp`` and writes the full (unsharded) values to
``DIR/reference-<rank>.pt`` for comparison. ``load DIR KEYFILE``: a fresh,
differently initialised model sharded over this world loads the checkpoint;
every rank compares the full values with the reference and exits 3 on a
difference, printing ``LOADED-OK world=N`` when equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import plinius.dcp
import plinius.dist
from plinius.crypto import MasterKey


def build(seed: int, mesh):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt


def full(x):  # type: ignore[no-untyped-def]
    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: full(v) for k, v in x.items()}
    if isinstance(x, list):
        return [full(v) for v in x]
    return x


def main() -> int:
    mode, directory, keyfile = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    key = MasterKey.load(keyfile)
    model, opt = build(0 if mode == "save" else 1, mesh)
    if mode == "save":
        torch.manual_seed(123)
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
        table = torch.arange(35, dtype=torch.float64).reshape(7, 5)
    else:
        table = torch.zeros(7, 5, dtype=torch.float64)
    msd, osd = get_state_dict(model, opt)
    state = {
        "model": msd,
        "optim": osd,
        "table": distribute_tensor(table, mesh, [Shard(0)]),
        "step": 5 if mode == "save" else 0,
    }
    if mode == "save":
        plinius.dcp.save(state, directory / "ckpt", key)
        torch.save(full(state), directory / f"reference-{rank}.pt")
    else:
        plinius.dcp.load(state, directory / "ckpt", key)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        msd, osd = get_state_dict(model, opt)
        got = full({"model": msd, "optim": osd, "table": state["table"], "step": state["step"]})
        want = torch.load(directory / "reference-0.pt", weights_only=True)
        if repr(got.keys()) != repr(want.keys()) or not _equal(got, want):
            print(f"MISMATCH rank={rank}", flush=True)
            return 3
        print(f"LOADED-OK world={world} rank={rank}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


if __name__ == "__main__":
    # Ends the process at once: gloo's teardown at interpreter exit can abort it.
    plinius.dist.finish(main())

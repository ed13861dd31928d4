"""Save a sharded (FSDP2) model and optimizer with torch.distributed.checkpoint, encrypted.

Run with any number of processes; load with any other number (DCP reshards):

    plinius keygen owner.key
    torchrun --standalone --nproc-per-node=2 examples/dcp_torchrun.py --key owner.key --dir c save
    torchrun --standalone --nproc-per-node=3 examples/dcp_torchrun.py --key owner.key --dir c load

CPU and gloo work; on GPUs use backend "nccl" and device "cuda".
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import plinius.dcp
import plinius.dist
from plinius.crypto import MasterKey
from plinius.errors import PliniusError


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True)
    p.add_argument("--dir", required=True, help="the checkpoint directory")
    p.add_argument("action", choices=["save", "load"])
    args = p.parse_args()
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)
        )
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        key = MasterKey.load(args.key)
        if args.action == "save":
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            msd, osd = get_state_dict(model, opt)
            plinius.dcp.save({"model": msd, "optim": osd}, args.dir, key)
        else:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            plinius.dcp.load(state, args.dir, key)
            set_state_dict(
                model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        if dist.get_rank() == 0:
            print(f"{args.action.rstrip('e')}ed {args.dir} with {dist.get_world_size()} processes")
    except PliniusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Ends the process at once: gloo's teardown at interpreter exit can abort it.
    plinius.dist.finish(main())

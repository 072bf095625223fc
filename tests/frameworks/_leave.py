"""The end of a 2-process framework worker, as the examples' ``harness.leave()``."""

from __future__ import annotations

import gc
import re
import time

import torch
import torch.distributed as dist


def leave_process_group() -> None:
    """Leave the process group after the worker's ``main`` has returned. The models that
    hold it (DDP's reducers, in reference cycles) go first, so that the group dies here and
    not in the interpreter's shutdown, where gloo's threads freeing the last collectives'
    tensors cannot take the GIL ("terminate called without an active exception")."""
    gc.collect()
    if not dist.is_initialized():
        return
    dist.barrier()  # no rank tears down while another still talks to it
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if found is not None and (int(found[1]), int(found[2])) < (2, 8):
        time.sleep(0.2)  # gloo's destructor held the GIL before torch 2.8 (pytorch PR 154976)
    dist.destroy_process_group()

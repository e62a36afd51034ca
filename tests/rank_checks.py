"""The main of every multi-rank worker that runs named checks: ``rank r/P name: OK`` after each.

Started on its ranks by ``launch.run_ranks``; a check that fails raises, the rank exits
non-zero, and the launcher's failure shows every rank's output.
"""

import sys

import horovod.torch as hvd
import torch


def main(checks: dict, *, label_controller: bool = False, device=None) -> None:
    """Run the checks named on the command line (default: all of ``checks``) on this rank.

    Arguments:
        checks: name -> function of no arguments (raises on failure).
        label_controller: print ``rank r/P [gloo] name: OK`` (or ``[mpi]``), for workers that
            the tests run under both controllers.
        device: the device the checks run on; a CUDA one makes this rank use its local GPU.
    """
    hvd.init()
    torch.set_num_threads(1)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(hvd.local_rank() % torch.cuda.device_count())
    names = sys.argv[1:] or list(checks)
    label = f" [{'gloo' if hvd.gloo_enabled() else 'mpi'}]" if label_controller else ""
    for name in names:
        checks[name]()
        print(f"rank {hvd.rank()}/{hvd.size()}{label} {name}: OK", flush=True)

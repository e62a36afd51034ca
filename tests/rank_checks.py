"""The main of a multi-rank worker: run the named checks, print ``rank r/P name: OK`` each."""

import sys

import horovod.torch as hvd
import torch


def main(checks: dict) -> None:
    hvd.init()
    torch.set_num_threads(1)
    for name in sys.argv[1:]:
        checks[name]()
        print(f"rank {hvd.rank()}/{hvd.size()} {name}: OK", flush=True)

"""hvd_topk.ddp: Top-K gradient sparsification with error feedback as a PyTorch
``DistributedDataParallel`` communication hook, for ``torchrun`` + DDP (no Horovod needed).

The same selection pipeline, residual memory, warm-up and settings as the Horovod engine
(``hvd_topk.DistributedOptimizer``); only the exchange differs: ``torch.distributed``'s
``all_gather_single`` and ``all_reduce``. ``TopKState`` documents the algorithm;
``docs/ddp.md`` the usage and limits.

Example::

    import hvd_topk.ddp

    state = hvd_topk.ddp.TopKState(model, ratio=0.01)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank])
    ddp_model.register_comm_hook(state, hvd_topk.ddp.topk_hook)
"""

from .hook import topk_hook
from .plan import BucketPlan
from .state import HOOK_SETTINGS, TopKState

__all__ = ["TopKState", "topk_hook", "BucketPlan", "HOOK_SETTINGS"]

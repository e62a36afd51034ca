"""Parameters the optimizer trains that it did not train when it was built.

Horovod hooks, and so exchanges, only the parameters that required grad in the optimizer's
param groups when ``DistributedOptimizer`` was built. Two habits of fine-tuning train others
later: a backbone frozen (``requires_grad_(False)``) when the optimizer is built and unfrozen
after some steps, and ``optimizer.add_param_group`` for layers added or unfrozen later. Stock
Horovod leaves those parameters out of every exchange, so each rank steps them with its own
gradient and the ranks drift apart without an error. ``ParamGroupMethods`` hooks them at the
start of the step that first trains them (that step exchanges them in ``synchronize()`` if
their gradients were computed before the hook existed; later steps overlap as for any other).
"""

from __future__ import annotations

import os

import torch
from horovod.torch import mpi_ops

__all__ = ["ParamGroupMethods"]


class ParamGroupMethods:
    """The param-group methods of the optimizers ``hvd_topk.DistributedOptimizer`` returns
    (merged into their class as Horovod's ``_DistributedOptimizer`` methods are).

    They are methods of the same object as ``optimizer.py``'s and use Horovod's parts
    (``_requires_update``, ``_parameter_names``, ``_allreduce_delay``, ``_make_hook``,
    ``_grad_accs``, ``_groups``) and ours: ``_sparse``, ``_compression``, ``_corrections``,
    ``_agreement`` and ``_planner`` (present once the optimizer is built). A changed trained
    set makes the next step plan its groups again (``Planner.plan_step``).
    """

    def add_param_group(self, param_group):
        """``torch.optim.Optimizer.add_param_group``. Once the optimizer is built, the new
        params are exchanged like the others: a param that ``named_parameters`` did not name
        is named ``allreduce.noname.<group>.<index>`` (Horovod's names for unnamed params;
        the same on every rank that adds the same groups), and the corrections (momentum,
        Adam) cover the new group."""
        super(self.__class__, self).add_param_group(param_group)
        if "_planner" not in vars(self):
            return  # torch's __init__ adding the first groups: Horovod hooks those
        if self._sparse:
            self._corrections.rebuild(self, self._compression)
        self._agreement.recheck()  # the ranks compare their models, new params included
        self._hook_trained()

    def _hook_trained(self):
        """Name the params of the param groups that have no name, and hook those that require
        grad and that Horovod has not hooked (see the module docstring); two set lookups per
        param when there are none. Called at the start of each step and by ``add_param_group``."""
        hooked, names = self._requires_update, self._parameter_names
        new, unnamed = [], []
        for i, g in enumerate(self.param_groups):
            for j, p in enumerate(g["params"]):
                if p not in names:
                    unnamed.append((i, j, p))
                if p.requires_grad and p not in hooked:
                    new.append(p)
        taken = set(names.values()) if unnamed else ()
        for i, j, p in unnamed:  # Horovod's name for an unnamed param: the same on every rank
            names[p] = f"allreduce.noname.{i}.{j}"
            if names[p] in taken:
                raise ValueError(f"the name {names[p]!r} for an unnamed parameter of param group {i} is "
                                 "taken: pass every parameter in named_parameters")
        if not new:
            return
        # Horovod's own condition for hooking at all (one rank: synchronize() sends them).
        hooks = self.process_set.included() and (mpi_ops.size() > 1
                                                 or os.environ.get("HOROVOD_ELASTIC") == "1")
        for p in new:
            hooked.add(p)
            self._allreduce_delay.setdefault(p, self.backward_passes_per_step)
            if self._groups is not None:  # Horovod's grouped allreduce: a group of its own
                self._p_to_group[p] = (p,)
                self._group_counts[(p,)] = 0
            if hooks:
                with torch.enable_grad():  # as Horovod's _register_hooks: the grad accumulator
                    grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]
                grad_acc.register_hook(self._make_hook(p))
                self._grad_accs.append(grad_acc)

"""SGD with momentum and weight decay on torch's fused kernel, without torch.optim.

``torch.optim.SGD`` imports ``torch._dynamo`` the first time an optimizer is built
and on every ``step`` (``Optimizer.__init__`` and ``step`` are wrapped to keep
``torch.compile`` out of them): 1.4-1.8 s of imports on this machine's CPUs, the
largest single cost of a train message on a real SuperNode, where Flower starts a
fresh ClientApp process for every message and so pays it every round (measured
with ``simulations/bench/deploy_rounds.py``). The training loop needs none of
it: :class:`FusedSGD` calls the same kernel ``SGD(fused=True)`` calls
(``torch._fused_sgd_``) with the same arguments and momentum-buffer rule, so one
seed still gives one model, bit for bit (``tests/fedobj/test_train_sgd.py``
holds it to ``torch.optim.SGD``).

DP-SGD keeps ``torch.optim.SGD``: Opacus wraps a torch optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class FusedSGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay=..., fused=True)``.

    No dampening, no Nesterov, no ``maximize``: what ``fedobj.train.loop`` uses.
    Like torch's, it updates only parameters that have a gradient, and it starts
    the momentum buffers on the first step at which any parameter has one.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        bad = {p.dtype for p in self.params} - {torch.float32, torch.float64}
        if bad:
            raise ValueError(f"FusedSGD needs float32/float64 parameters, got {bad}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[int, torch.Tensor] = {}  # id(param) -> momentum buffer

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none=True``, torch's default), or zero them."""
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return
        grads = [p.grad for p in live if p.grad is not None]
        first = self.momentum != 0 and not any(id(p) in self.buffers for p in live)
        if first:
            for p, g in zip(live, grads, strict=True):
                self.buffers[id(p)] = torch.empty_like(g)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(live):
            groups.setdefault((p.device, p.dtype), []).append(i)
        for idx in groups.values():
            torch._fused_sgd_(
                [live[i] for i in idx],
                [grads[i] for i in idx],
                [] if self.momentum == 0 else [self.buffers[id(live[i])] for i in idx],
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                lr=self.lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
                is_first_step=first,
                grad_scale=None,
                found_inf=None,
            )

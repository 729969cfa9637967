"""The non-finite guard: an optimizer step whose loss or gradient is NaN or infinite is skipped, not applied.

One place, called by the module before each optimizer step with everything it needs as arguments; the module
logs the count and raises with the name of the last good checkpoint when the guard says stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from sft_lightning.errors import NonFiniteError
from sft_lightning.zero import skips_nonfinite_steps


class NonFiniteGuard:
    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.skipped = 0  # skipped optimizer steps, in all (kept in checkpoints)
        self.in_a_row = 0

    def before_step(
        self, step_loss: torch.Tensor, optimizer, check_gradients: bool, reduce, deepspeed: Optional[dict]
    ) -> Optional[str]:
        """Skip this step if it is not finite; returns why the run must stop, else None.

        ``check_gradients``: False where a GradScaler already skips overflowing steps. ``reduce``: sums a tensor
        over ranks (identity on one), so that every rank decides the same.
        """
        if step_is_finite(step_loss, optimizer, check_gradients, reduce):
            self.in_a_row = 0
            return None
        self.skipped += 1
        self.in_a_row += 1
        if deepspeed is None:
            # No gradient, no update: AdamW leaves a parameter without .grad (and its moments) untouched.
            optimizer.zero_grad(set_to_none=True)
        elif not skips_nonfinite_steps(deepspeed):
            # ZeRO keeps its own float32 gradient partitions and would apply this one: stop before it does.
            return "DeepSpeed cannot skip this step with its config (ZeRO-3, or fp32)"
        if self.in_a_row >= self.patience:
            return f"{self.in_a_row} optimizer steps in a row"
        return None


def step_is_finite(step_loss: torch.Tensor, optimizer, check_gradients: bool, reduce) -> bool:
    """The same answer on every rank: the step loss and (``check_gradients``) the gradient norm are finite."""
    finite = torch.isfinite(step_loss)
    if check_gradients:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # sharded gradients (FSDP2): the norm of the whole gradient
                norm = norm.full_tensor()
            finite = finite & torch.isfinite(norm)
    return reduce((~finite).float()).item() == 0


def nonfinite_error(what: str, step: int, last_checkpoint: Optional[Path]) -> NonFiniteError:
    """The one-line error that stops a run at optimizer step ``step``, naming the last checkpoint (only finite weights)."""
    return NonFiniteError(
        f"{what} (to step {step}) had a NaN or infinite loss or gradient; the last good checkpoint is "
        f"{last_checkpoint or 'none (none was saved)'}; lower model.learning_rate or look for a broken batch"
    )

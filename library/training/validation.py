"""Validation loss on the held-out split (--validation_split), at fixed timesteps.

Each validation batch is evaluated at the 4 timesteps linspace(min_t, max_t, 6)[1:-1]
with noise drawn from --validation_seed (else --seed). The training RNG is forked, so
validating never changes what training does next (exact resume stays exact).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def validation_loss(trainer, ctx, tag: str) -> float | None:
    import torch

    from library.training.noise import validation_timesteps

    a, acc = ctx.args, ctx.accelerator
    group = ctx.val_group
    if group is None or len(group) == 0:
        return None
    seed = a.validation_seed if a.validation_seed is not None else a.seed
    timesteps = validation_timesteps(a.min_timestep, a.max_timestep)
    net = acc.unwrap_model(ctx.network)
    was_training = net.training
    net.eval()
    losses = []
    from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode

    optimizer_eval_mode(ctx.optimizer)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        n_batches = len(group) if not a.max_validation_steps else min(len(group), a.max_validation_steps)
        for i in range(n_batches):
            batch = group[i]
            for t in timesteps:
                ctx.arch.fixed_timestep = t
                try:
                    losses.append(float(trainer.training_loss(ctx, batch)))
                finally:
                    ctx.arch.fixed_timestep = None
    optimizer_train_mode(ctx.optimizer)
    net.train(was_training)
    if not losses:
        return None
    mean = sum(losses) / len(losses)
    divergence = mean - (ctx.state.loss_history[-1][1] if ctx.state.loss_history else mean)
    logger.info("validation loss (%s %d): %.5f", tag, ctx.state.global_step, mean)
    if ctx.trackers:
        acc.log({f"loss/validation/{tag}_average": mean, f"loss/validation/{tag}_divergence": divergence},
                step=ctx.state.global_step)
    return mean

"""One model and its optimizer on megatron-core's own machinery, for any TP/PP/CP/DP layout.

Training goes through megatron's ``DistributedDataParallel``, ``get_megatron_optimizer``,
``OptimizerParamScheduler`` and ``get_forward_backward_func`` (the pipeline schedules); evaluation
through the same schedules with ``forward_only``. On CPU the compatibility layer in
``megarope.mcore.compat`` makes these run over gloo (see there).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarope.eval.passkey import wrong_tokens
from megarope.mcore import parallel
from megarope.mcore.compat import compute_device
from megarope.mcore.context_parallel import pack_thd, slice_bshd
from megarope.mcore.output import decoder_output, token_nll_and_argmax
from megarope.mcore.spec import set_rope
from megarope.rope.config import RopeConfig
from megarope.run.config import Config
from megarope.run.model import build_model, use_bf16

log = logging.getLogger(__name__)


def _share(values: torch.Tensor, owner: bool, groups: tuple = (None,)) -> torch.Tensor:
    """Every rank of ``groups`` (applied in turn; None: the world) gets ``values`` from the ranks
    where ``owner`` (others contribute zeros)."""
    out = values.double() if owner else torch.zeros_like(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = out.to(compute_device())
        for group in groups:
            dist.all_reduce(out, group=group)
    return out.cpu()


def _replica_groups() -> tuple:
    """Groups that together span one model replica (TP x CP, then PP)."""
    return (parallel_state.get_tensor_and_context_parallel_group(), parallel_state.get_pipeline_model_parallel_group())


def _is_reporting_rank() -> bool:
    """Last pipeline stage, first TP and CP rank: one rank per data-parallel replica reports."""
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


class Engine:
    def __init__(self, cfg: Config, rope: RopeConfig, vocab_size: int, train_steps: int | None = None):
        self.cfg = cfg
        p = cfg.parallel
        parallel.initialize(tp=p.tp, pp=p.pp, cp=p.cp, seed=cfg.train.seed)
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.model = build_model(cfg, rope, vocab_size)
        self.rope = rope
        self.ddp = None
        self.optimizer = None
        self.scheduler = None
        if train_steps is not None:
            self._setup_training(train_steps)

    def _setup_training(self, steps: int) -> None:
        t, bf16 = self.cfg.train, use_bf16(self.cfg)
        config = self.model.config
        self.ddp = DistributedDataParallel(
            config, DistributedDataParallelConfig(overlap_grad_reduce=False, grad_reduce_in_fp32=bf16), self.model)
        # DP/CP grad all-reduce, SP norm-grad all-reduce and PP embedding sync happen in finalize_model_grads
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.ddp.no_sync
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad, bf16=bf16),
            [self.ddp])
        decay_steps = max(steps, t.warmup_steps + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=t.schedule,
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")

    def set_rope(self, rope: RopeConfig) -> None:
        self.rope = rope
        set_rope(self.model, rope)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------------- forward steps
    def _local(self, batch: dict) -> tuple[dict, object]:
        """This CP rank's part of a micro-batch and its PackedSeqParams (packed batches, which carry
        ``cu_seqlens``, go in as THD: attention, positions, n-hat and query scales per document)."""
        if "cu_seqlens" in batch:
            return pack_thd(batch, self.cp_size, self.cp_rank, parallel_state.get_context_parallel_group())
        return (slice_bshd(batch, self.cp_size, self.cp_rank) if self.cp_size > 1 else batch), None

    def _masked_sums(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[sum(loss*mask), sum(mask)] over this micro-batch, summed over the CP group."""
        stats = torch.stack([(per_token.float() * mask).sum(), mask.sum()])
        if self.cp_size > 1:
            dist.all_reduce(stats, group=parallel_state.get_context_parallel_group())
        return stats

    def _train_forward(self, data_iterator, model):
        batch, packed = self._local(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)
        mask = batch["loss_mask"].float()

        def loss_func(per_token):
            stats = self._masked_sums(per_token, mask)
            # The CP all-reduce above carries no gradient: each rank's loss covers only its own tokens.
            # megatron's schedule multiplies a (loss, dict) return by the CP size itself
            # (forward_step_calc_loss, 0.16 and 0.19), and the DP x CP gradient average divides it
            # out again; scaling here as well made every gradient cp times too large.
            loss = stats[0] / stats[1].clamp(min=1)
            return loss, {"loss": (stats[0] / stats[1].clamp(min=1)).detach().clone()}

        return output, loss_func

    def _eval_forward(self, data_iterator, model):
        batch, packed = self._local(next(data_iterator))
        mask = batch["loss_mask"].float()
        # the decoder output, not [s, vocab] logits: the output layer runs chunk by chunk in loss_func
        with decoder_output(self.model):
            hidden = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed)

        # a sample's optional part_mask picks a part of its scored tokens (the eval's tokens past the
        # window) whose sums come from the same forward: a long forward is the costly thing to repeat
        part = batch.get("part_mask")
        part = mask * part.float() if part is not None else torch.zeros_like(mask)

        def loss_func(output):
            nll, predictions = token_nll_and_argmax(self.model, output, batch["labels"], predict=mask > 0)
            wrong = wrong_tokens(predictions, batch["labels"], mask).sum()
            stats = torch.cat([self._masked_sums(nll, mask), wrong.view(1), self._masked_sums(nll, part)])
            if self.cp_size > 1:
                dist.all_reduce(stats[2:3], group=parallel_state.get_context_parallel_group())
            return stats[0], {"stats": stats.detach().clone()}

        return hidden, loss_func

    def _run(self, forward, micro_batches: list[dict], forward_only: bool):
        seq_len = micro_batches[0]["tokens"].shape[1]
        return get_forward_backward_func()(
            forward_step_func=forward, data_iterator=iter(micro_batches),
            model=[self.ddp if self.ddp is not None else self.model], num_microbatches=len(micro_batches),
            seq_length=seq_len, micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only)

    # ------------------------------------------------------------------------- public steps
    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this DP rank's micro-batches; the mean loss, on every rank."""
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = self._run(self._train_forward, micro_batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        owner = _is_reporting_rank()
        local = torch.stack([o["loss"] for o in out]).mean() / self.dp_size if owner else torch.zeros(())
        loss = _share(local.reshape(1), owner).item()
        return {"loss": loss, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped": not ok}

    @torch.no_grad()
    def score(self, samples: list[dict], split_over_dp: bool = True) -> torch.Tensor:
        """[n, 5] float64 per sample: summed NLL over its loss mask, masked token count, the
        number of masked positions whose argmax is not the label, and summed NLL and token count
        over the masked positions its ``part_mask`` (optional, like ``loss_mask``) also marks. With ``split_over_dp`` samples are
        spread round-robin over the data-parallel replicas and every rank gets every row; without,
        this replica scores them all and only its ranks take part."""
        self.model.eval()
        mine = list(range(self.dp_rank, len(samples), self.dp_size)) if split_over_dp else list(range(len(samples)))
        rows = torch.zeros(len(samples), 5, dtype=torch.float64)
        if mine:
            out = self._run(self._eval_forward, [samples[i] for i in mine], forward_only=True)
            if _is_reporting_rank():
                for i, o in zip(mine, out):
                    rows[i] = o["stats"].double().cpu()
        return _share(rows, _is_reporting_rank(), (None,) if split_over_dp else _replica_groups())

    def perplexity(self, samples: Iterable[dict], split_over_dp: bool = True) -> float:
        rows = self.score(list(samples), split_over_dp)
        return math.exp(rows[:, 0].sum().item() / max(rows[:, 1].sum().item(), 1.0))


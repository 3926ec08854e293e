"""The training objective: cross-entropy of a causal LM at the target positions only.

The loss applies the output projection only where a target is predicted: the decoder gives hidden states
``(B, T, C)``, the target positions are gathered to ``(N, C)`` and only those meet the 49k-entry lm_head; a
model's final logit soft-capping (Gemma 2: ``cap * tanh(logits / cap)``) is applied as its own forward does.
``mean_nll`` is the same loss as one number over a list of examples (the forgetting probe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.models.masks import sliding_window, softcap_logits
from tunelab.train.attention import FLEX, FlexMasks, Segments, packed_mask
from tunelab.train.collate import Batch, collate
from tunelab.train.data import Example
from tunelab.train.precision import autocast_ctx


class SupervisedLoss(torch.nn.Module):
    """Cross-entropy of a causal LM at the target positions only: one NLL per target, shape (N,), fp32.

    Wrapping the model in a module keeps DDP/FSDP in charge of the forward (gradient hooks) while the
    forward itself skips the full-vocabulary logits.
    """

    def __init__(self, model: torch.nn.Module, head_chunk: int = 2048):
        super().__init__()
        self.model = model
        self.head_chunk = head_chunk
        self.config = model.config

    @property
    def _no_split_modules(self):
        """The model's decoder-layer classes: FSDP's TRANSFORMER_BASED_WRAP makes each such layer a unit."""
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Tie the model's embeddings again (accelerate calls it after loading weights into a sharded model)."""
        if hasattr(self.model, "tie_weights"):
            return self.model.tie_weights(*args, **kwargs)

    def forward(self, input_ids, position_ids, attention_mask, pred_rows, pred_cols, targets,
                segments: list[int] | None = None) -> torch.Tensor:
        body = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        extra = {}
        if segments is not None:  # one packed row: its sequences, as the model's attention function takes them
            if getattr(self.config, "_attn_implementation", None) == FLEX:
                extra["tunelab_flex"] = FlexMasks.from_segments(segments, input_ids.shape[1],
                                                                [sliding_window(self.config)], input_ids.device)
            else:
                extra["tunelab_segments"] = Segments(segments)
        if attention_mask is not None:
            attention_mask = packed_mask(self.model, attention_mask)
        h = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 use_cache=False, **extra).last_hidden_state            # (B, T, C), final norm applied
        hs = h[pred_rows, pred_cols]                                     # (N, C)
        if hs.shape[0] <= self.head_chunk:
            return _head_nll(head, hs, targets, self.config)
        # Many targets (pre-training, prompt loss): logits chunk by chunk, recomputed in backward, never (N, V).
        from torch.utils.checkpoint import checkpoint

        return torch.cat([checkpoint(_head_nll, head, hs[s:s + self.head_chunk], targets[s:s + self.head_chunk],
                                     self.config, use_reentrant=False)
                          for s in range(0, hs.shape[0], self.head_chunk)])


def _head_nll(head: torch.nn.Module, hs: torch.Tensor, targets: torch.Tensor, config=None) -> torch.Tensor:
    logits = head(hs).float()                                            # (N, V)
    if config is not None:
        logits = softcap_logits(config, logits)
    return F.cross_entropy(logits, targets, reduction="none")


def batch_nll(loss_module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(N,) NLL of every target of ``batch``: the answer targets first, then any prompt targets."""
    return loss_module(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pred_rows,
                       batch.pred_cols, batch.targets, batch.segments)


def batch_loss(loss_module: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed NLL of the answer targets of ``batch``."""
    return batch_nll(loss_module, batch)[:batch.n_targets].sum()


@torch.no_grad()
def mean_nll(model: torch.nn.Module, examples: list[Example], *, device: torch.device,
             autocast: torch.dtype | None, pad_id: int = 0, batch_size: int = 8, pack_len: int = 1024,
             varlen: bool = False, loss_module: torch.nn.Module | None = None) -> float:
    """Mean negative log-likelihood per target token (exp() of it is the perplexity). ``loss_module``: the
    prepared SupervisedLoss of ``model`` to run through (under FSDP every process must, with the same batches)."""
    if loss_module is None:
        loss_module = SupervisedLoss(model)
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s:s + batch_size], packing=True, pack_len=pack_len, pad_id=pad_id,
                        varlen=varlen).to(device)
        with autocast_ctx(device, autocast):
            total += float(batch_loss(loss_module, batch))
        count += batch.n_targets
    loss_module.train(was_training)
    return total / max(1, count)

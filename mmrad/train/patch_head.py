"""The auxiliary vision objective of ``mmrad sft`` (``objective.patch_loss``): a linear
head on each merged vision token says whether its cell of the model grid holds a defect.

A model from random weights learns "where" far sooner when its vision tower is told
directly which cells are defective than through the answer's box tokens alone
(``docs/learning_study.md``). The head lives inside the trained model (an attribute of
the Hugging Face model, :data:`HEAD_NAME`), so FSDP shards it, the optimizer steps it and
checkpoints and exact resumes carry it; an export rebuilds the model without it, so no
export, engine or server ever sees it. A forward hook on the vision tower runs the head
inside the model's own forward (where FSDP has the weights gathered) and keeps its
logits for :func:`patch_loss`.

Imports torch only (no Ray), as :mod:`mmrad.train.building` does.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_NAME = "mmrad_patch_head"
"""The head's attribute on the Hugging Face model (and so its parameters' key prefix)."""


class PatchHead(nn.Module):
    """``hidden -> 1`` logit per merged vision token; :attr:`logits` holds the last
    forward's, concatenated over the batch's images in ``pixel_values`` order."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        self.logits: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # a bf16 model without mixed precision feeds bf16 tokens to the float32 head
        tokens = tokens.to(self.linear.weight.dtype)
        # one logit per token as a tensor of its own: FSDP2 warns of (and an in-place op
        # would break) a module whose output is a view, as linear(...).squeeze(-1) is
        return torch.addmv(self.linear.bias, tokens, self.linear.weight[0])


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (or ``model`` itself)."""
    base = getattr(model, "get_base_model", None)
    return base() if base is not None else model


def attach_patch_head(model: nn.Module) -> PatchHead:
    """Give ``model`` (loaded, or built on ``meta``) a seeded-by-the-caller, trainable
    :class:`PatchHead` fed by its vision tower; call after LoRA and before sharding."""
    inner = hf_model(model)
    hidden = inner.config.text_config.hidden_size  # the merger projects into the LM's width
    device = next(inner.parameters()).device
    with torch.device(device):
        head = PatchHead(hidden)
    setattr(inner, HEAD_NAME, head)

    def run_head(module: nn.Module, inputs: tuple, output) -> None:
        tokens = getattr(output, "pooler_output", output)  # merged tokens (transformers 5)
        # Called as the model holds it now: FSDP1 replaces the attribute by its wrapper,
        # which gathers the head's weights (FSDP2 hooks the module itself).
        head.logits = getattr(inner, HEAD_NAME)(tokens)

    inner.model.visual.register_forward_hook(run_head)
    return head


def patch_head_of(model: nn.Module) -> PatchHead | None:
    """The model's head (under FSDP and peft wrappers too), if it has one."""
    for module in model.modules():
        if isinstance(module, PatchHead):
            return module
    return None


def patch_loss(head: PatchHead, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the last forward's cell logits against ``targets``
    (1 where a defect box overlaps the cell, one per merged token)."""
    if head.logits is None or head.logits.shape != targets.shape:
        got = None if head.logits is None else tuple(head.logits.shape)
        raise ValueError(
            f"the patch head saw {got} vision tokens but the batch has {tuple(targets.shape)} "
            "cell targets"
        )
    return nn.functional.binary_cross_entropy_with_logits(
        head.logits.float(), targets.to(head.logits.device, torch.float32)
    )

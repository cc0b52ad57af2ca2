"""Losses."""
from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

# The course report's knowledge-distillation settings: every default in nccompile comes from here.
KD_TEMPERATURE = 20.0
KD_ALPHA = 0.5
# temperatures float32 can carry: far below, logits / T overflow; far above, the soft loss (of order
# 1 / T^2 before the T^2 factor) drowns in rounding, and T^2 overflows a Python float past 1e154
Temperature = Annotated[float, Field(ge=0.01, le=1000.0)]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = KD_TEMPERATURE, alpha: float = KD_ALPHA) -> torch.Tensor:
    """Hinton's distillation loss, as in the course report:

        (1 - a) * CE(s, y) + a * T^2 * KL(softmax(t / T) || softmax(s / T))

    with the KL divergence averaged over the batch.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()  # T = 20 needs fp32
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * temperature ** 2 * soft

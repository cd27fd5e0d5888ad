"""Scores: the lab grader's formula, and the same shape rescaled to any model."""

from __future__ import annotations

import math


def lab4(size_mb: float, acc: float) -> float:
    """The lab's score: 10 for <= 30 MB, 2 per whole MB under 27, 10 + 2 per whole point over 86 %."""
    score = 0.0
    if size_mb <= 30:
        score += 10
    if size_mb <= 27:
        score += 2 * math.floor(27 - size_mb)
    if acc >= 86:
        score += 10 + 2 * math.floor(acc - 86)
    return score


def relative(size_mb: float, acc: float, fp_size_mb: float, fp_acc: float,
             ref_size_mb: float, ref_acc: float) -> float:
    """:func:`lab4` with size and accuracy mapped onto the lab's reference model.

    A model at x % of its FP32 size scores like DeiT-S at x % of ``ref_size_mb``, and at y % of
    its FP accuracy like DeiT-S at y % of ``ref_acc``; so the embedded digits model's scores
    mean what they would on the lab's task. A float model that gets nothing right (random weights)
    gives no accuracy scale: no accuracy points.
    """
    return lab4(size_mb * ref_size_mb / fp_size_mb, acc * ref_acc / fp_acc if fp_acc > 0 else 0.0)


SCORES = {
    "lab4": lambda size_mb, acc, fp_size_mb, fp_acc, ref_size_mb, ref_acc: lab4(size_mb, acc),
    "relative": relative,
}


def compute_score(name: str, size_mb: float, acc: float, fp_size_mb: float, fp_acc: float,
                  ref_size_mb: float, ref_acc: float) -> float:
    """The score ``name`` (``score.name``: a key of :data:`SCORES`)."""
    return SCORES[name](size_mb, acc, fp_size_mb, fp_acc, ref_size_mb, ref_acc)

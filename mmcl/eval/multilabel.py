"""Multi-label zero-shot classification (AudioSet): every class's text embedding scores every clip, and each
class's average precision over the clips is averaged (mAP)."""

from __future__ import annotations

import torch

from mmcl.eval.metrics import multilabel_metrics
from mmcl.eval.zeroshot import score, text_classifier


@torch.no_grad()
def multilabel_classification(model, query: dict[str, torch.Tensor], targets: torch.Tensor, classnames: list[str],
                              templates: list[str], text_modality: str = "text") -> tuple[dict, torch.Tensor]:
    """``query {modality: [N, D]}``, ``targets`` bool ``[N, C]`` -> (``mAP`` metrics, scores ``[N, C]``)."""
    classifier = text_classifier(model, classnames, templates, text_modality)
    scores = score(model, query, {text_modality: classifier})
    return multilabel_metrics(scores, targets), scores

"""Zero-shot classification: class names x prompt templates -> a text classifier; queries (one modality or
several jointly) scored against it by the model's own objective (cosine, MIP or volume)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.eval.metrics import classification_metrics


@torch.no_grad()
def text_classifier(model, classnames: list[str], templates: list[str], text_modality: str = "text") -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of the normalised embeddings of its prompts."""
    mod = model.modalities[text_modality]
    weights = []
    for name in classnames:
        ids = torch.stack([mod.transform(mod.tokenize(t.format(name)), train=False) for t in templates])
        emb = model.encode({text_modality: ids})[text_modality]
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zeroshot_classification(model, query: dict[str, torch.Tensor], labels: torch.Tensor, classnames: list[str],
                            templates: list[str], text_modality: str = "text") -> tuple[dict, torch.Tensor]:
    """``query {modality: [N, D]}``, ``labels [N]`` class indices -> (metrics, scores ``[N, C]``)."""
    classifier = text_classifier(model, classnames, templates, text_modality)
    scores = model.objective.score(query, {text_modality: classifier})
    return classification_metrics(scores, labels, len(classnames)), scores

"""Zero-shot classification: class names x prompt templates -> a text classifier; queries (one modality or
several jointly) scored against it by the model's own objective (cosine, MIP or volume)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.eval.metrics import classification_metrics


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights (and so its objective's temperature) live."""
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model, texts: list[str], text_modality: str = "text", batch_size: int = 256) -> torch.Tensor:
    """``[len(texts), D]`` normalised embeddings of ``texts`` (float32, on the CPU)."""
    processor = model.processors[text_modality]
    device = model_device(model)
    out = []
    for start in range(0, len(texts), batch_size):
        ids = processor.collate([processor.transform(processor.tokenize(t), train=False)
                                 for t in texts[start:start + batch_size]])
        out.append(model.encode({text_modality: ids.to(device)})[text_modality].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def text_classifier(model, classnames: list[str], templates: list[str], text_modality: str = "text") -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of the normalised embeddings of its prompts."""
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = encode_texts(model, prompts, text_modality).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def score(model, query: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor]) -> torch.Tensor:
    """``model.objective.score`` on the model's device; returns ``[Nq, Nc]`` float32 on the CPU."""
    device = model_device(model)
    return model.objective.score({m: x.to(device) for m, x in query.items()},
                                 {m: x.to(device) for m, x in candidates.items()}).float().cpu()


@torch.no_grad()
def zeroshot_classification(model, query: dict[str, torch.Tensor], labels: torch.Tensor, classnames: list[str],
                            templates: list[str], text_modality: str = "text") -> tuple[dict, torch.Tensor]:
    """``query {modality: [N, D]}``, ``labels [N]`` class indices -> (metrics, scores ``[N, C]``)."""
    classifier = text_classifier(model, classnames, templates, text_modality)
    scores = score(model, query, {text_modality: classifier})
    return classification_metrics(scores, labels, len(classnames)), scores

"""What differs between tasks once the data is tokenized: the model class, the loss, and the
validation metrics.

A batch is a dict of tensors: ``input_ids`` always; ``attention_mask`` and ``labels`` for the
fine-tuning tasks (``labels`` is -100 where nothing is learned); ``sample_weight`` (0 or 1) in
evaluation batches, where 0 marks padding that evens out the ranks' batch counts.

Evaluation adds up a fixed-length vector of sums per batch on the device (loss sums, a confusion
matrix, entity counts); ranks all-reduce it once, and :meth:`Task.metrics` turns it into scores.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from train.config.recipe import TASK_METRICS
from train.metrics.scores import classification_scores, entity_counts, entity_counts_by_type, entity_scores

IGNORE = -100


def _forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    return model(input_ids=batch["input_ids"], **kwargs).logits


def _mean_loss(sums: torch.Tensor) -> float:
    """Every task's sums start with (loss sum, count)."""
    return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")


def _token_mean(losses: torch.Tensor, mask: torch.Tensor, batch: dict) -> torch.Tensor:
    """The micro-batch's loss sum over ``batch["loss_denominator"]`` (a float) when the loop set it
    (so the step's gradient is the mean over every loss token of every micro-batch and rank,
    whatever their spread), else over this micro-batch's own tokens."""
    denominator = batch.get("loss_denominator")
    return (losses * mask).sum() / (denominator if denominator is not None else mask.sum().clamp(min=1))


def _count_per_sample(dataset, count: Callable[[np.ndarray], np.ndarray], chunk: int = 4096) -> np.ndarray:
    """``count(labels)`` over the padded ``labels`` column, a chunk of samples at a time."""
    n = len(dataset)
    return np.concatenate([count(dataset.rows(np.arange(i, min(i + chunk, n)))["labels"]) for i in range(0, n, chunk)]
                          or [np.zeros(0, dtype=np.int64)])


def _weights(batch: dict) -> torch.Tensor:
    w = batch.get("sample_weight")
    return w.float() if w is not None else torch.ones(len(batch["input_ids"]), device=batch["input_ids"].device)


class Task:
    name = "task"
    auto_class = "AutoModelForCausalLM"
    """The transformers auto class; its ``model_type`` → class table is ``MODEL_FOR_..._MAPPING_NAMES``."""
    mapping = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    peft_task_type = "CAUSAL_LM"
    metric_names: tuple[str, ...] = TASK_METRICS["causal_lm"]

    def __init__(self, labels: Optional[list[str]] = None):
        self.labels = labels or []

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def sample_loss_tokens(self, dataset) -> Optional[np.ndarray]:
        """How many positions of each sample carry loss, for tasks where that varies (``None``:
        every micro-batch weighs the same, and its loss is its own mean). Counted once, so the loop
        knows a step's loss tokens from its sample indices, without a collective."""
        return None

    def eval_sums(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError


class CausalLM(Task):
    """Packed pre-training: next-token loss on every position."""

    name = "causal_lm"

    def loss(self, model, batch):
        ids = batch["input_ids"]
        logits = _forward(model, batch)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    def eval_sums(self, model, batch):
        """Token loss summed over the real samples (padding repeats weigh 0), and their token count:
        the mean over the evaluated samples, whatever the world size and micro-batch."""
        ids = batch["input_ids"]
        logits = _forward(model, batch)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="none").view(len(ids), -1)
        w = _weights(batch)
        return torch.stack([(losses.sum(-1) * w).sum(), (w * losses.shape[1]).sum()])

    def metrics(self, sums):
        loss = _mean_loss(sums)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


class SFT(Task):
    """Supervised fine-tuning of a causal LM: next-token loss on response tokens only."""

    name = "sft"

    def _token_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _forward(model, batch)
        targets = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                 ignore_index=IGNORE, reduction="none").view_as(targets)
        return losses, (targets != IGNORE).float()

    def loss(self, model, batch):
        losses, mask = self._token_losses(model, batch)
        return _token_mean(losses, mask, batch)

    def sample_loss_tokens(self, dataset):
        return _count_per_sample(dataset, lambda labels: (labels[:, 1:] != IGNORE).sum(-1))

    def eval_sums(self, model, batch):
        losses, mask = self._token_losses(model, batch)
        w = _weights(batch)[:, None]
        return torch.stack([(losses * w).sum(), (mask * w).sum()])

    def metrics(self, sums):
        loss = _mean_loss(sums)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


class SequenceClassification(Task):
    name = "sequence_classification"
    auto_class = "AutoModelForSequenceClassification"
    mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    peft_task_type = "SEQ_CLS"
    metric_names = TASK_METRICS["sequence_classification"][:4]

    def loss(self, model, batch):
        return F.cross_entropy(_forward(model, batch).float(), batch["labels"])

    def eval_sums(self, model, batch):
        logits = _forward(model, batch).float()
        w = _weights(batch)
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        n = len(self.labels)
        confusion = torch.bincount(batch["labels"] * n + logits.argmax(-1), weights=w, minlength=n * n)
        return torch.cat([torch.stack([(losses * w).sum(), w.sum()]), confusion.float()])

    def metrics(self, sums):
        n = len(self.labels)
        out = {"loss": _mean_loss(sums)}
        out.update(classification_scores(sums[2:].view(n, n).cpu().numpy(), self.labels))
        return out


class TokenClassification(Task):
    """Per-word tags; ``labels`` hold a tag id on each word's first sub-token, -100 elsewhere."""

    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    mapping = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    peft_task_type = "TOKEN_CLS"
    metric_names = TASK_METRICS["token_classification"][:5]

    def loss(self, model, batch):
        logits, labels = _forward(model, batch).float(), batch["labels"]
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                 reduction="none").view_as(labels)
        return _token_mean(losses, (labels != IGNORE).float(), batch)

    def sample_loss_tokens(self, dataset):
        return _count_per_sample(dataset, lambda labels: (labels != IGNORE).sum(-1))

    def eval_sums(self, model, batch):
        logits = _forward(model, batch).float()
        labels, w = batch["labels"], _weights(batch)
        mask = (labels != IGNORE).float() * w[:, None]
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                 reduction="none").view_as(labels)
        pred = logits.argmax(-1)
        n = len(self.labels)
        gold_ids = torch.where(labels == IGNORE, 0, labels)
        confusion = torch.bincount((gold_ids * n + pred).flatten(), weights=mask.flatten(), minlength=n * n)
        types = self.entity_types
        entities = torch.zeros(3 + 3 * len(types))
        for row_gold, row_pred, keep, weight in zip(labels.tolist(), pred.tolist(),
                                                    (labels != IGNORE).tolist(), w.tolist()):
            if weight:  # entity spans are sequential: counted on the host, in evaluation only
                gold = [self.labels[g] for g, k in zip(row_gold, keep) if k]
                guess = [self.labels[p] for p, k in zip(row_pred, keep) if k]
                entities += torch.tensor([*entity_counts(gold, guess), *entity_counts_by_type(gold, guess, types)],
                                         dtype=torch.float32)
        return torch.cat([torch.stack([(losses * mask).sum(), mask.sum()]), confusion.float(),
                          entities.to(logits.device)])

    def metrics(self, sums):
        n = len(self.labels)
        out = {"loss": _mean_loss(sums)}
        scores = classification_scores(sums[2:2 + n * n].view(n, n).cpu().numpy(), self.labels)
        out.update(scores, token_accuracy=scores.pop("accuracy"))
        entities = sums[2 + n * n:].tolist()
        out.update(entity_scores(*entities[:3]))
        for i, kind in enumerate(self.entity_types):
            by_type = entity_scores(*entities[3 + 3 * i: 6 + 3 * i])
            out.update({f"{name}/{kind}": value for name, value in by_type.items()})
        return out

    @property
    def entity_types(self) -> list[str]:
        """The entity types of the BIO tag set (``PER`` of ``B-PER``/``I-PER``), sorted."""
        return sorted({tag[2:] for tag in self.labels if tag[:2] in ("B-", "I-")})


TASKS: dict[str, type[Task]] = {t.name: t for t in (CausalLM, SFT, SequenceClassification, TokenClassification)}


def build_task(name: str, labels: Optional[list[str]] = None) -> Task:
    return TASKS[name](labels)

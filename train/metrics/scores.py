"""Task metrics from summed counts (early stopping on one of them: :mod:`train.metrics.early_stopping`).

Everything here is plain arithmetic on counts that ranks can add up with one all-reduce:
a confusion matrix for classification, (true positive, predicted, gold) entity counts for
token classification. Kept free of the training loop so it can be checked by hand.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def classification_scores(confusion: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Accuracy, per-class and macro/micro precision, recall and F1 from ``confusion[gold, pred]``.

    Macro averages every class that occurs in the gold labels or the predictions; micro pools
    the counts (for single-label classification micro F1 equals accuracy).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(cm)
    predicted, gold = cm.sum(axis=0), cm.sum(axis=1)
    out = {"accuracy": _ratio(tp.sum(), cm.sum())}
    present = [i for i in range(len(names)) if predicted[i] or gold[i]]
    per_class = {}
    for i, name in enumerate(names):
        p, r = _ratio(tp[i], predicted[i]), _ratio(tp[i], gold[i])
        per_class[name] = (p, r, _f1(p, r))
        out[f"precision/{name}"], out[f"recall/{name}"], out[f"f1/{name}"] = per_class[name]
    for k, key in enumerate(("precision", "recall", "f1")):
        out[f"macro_{key}"] = float(np.mean([per_class[names[i]][k] for i in present])) if present else 0.0
    micro_p, micro_r = _ratio(tp.sum(), predicted.sum()), _ratio(tp.sum(), gold.sum())
    out.update(micro_precision=micro_p, micro_recall=micro_r, micro_f1=_f1(micro_p, micro_r))
    return out


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` in a BIO (or IOB2) tag sequence, end exclusive.

    ``B-X`` starts an entity; ``I-X`` continues one of the same type, or starts one after ``O``
    or another type (the lenient reading conlleval uses); other tags end it.
    """
    entities, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            entities.add((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = label, i
    return entities


def entity_counts(gold: Sequence[str], pred: Sequence[str]) -> tuple[int, int, int]:
    """(exact matches, predicted entities, gold entities) for one sequence."""
    g, p = bio_entities(gold), bio_entities(pred)
    return len(g & p), len(p), len(g)


def entity_counts_by_type(gold: Sequence[str], pred: Sequence[str], types: Sequence[str]) -> list[int]:
    """(exact matches, predicted, gold) of each entity type in ``types``, flattened in that order."""
    g, p = bio_entities(gold), bio_entities(pred)
    counts = []
    for kind in types:
        gk, pk = {e for e in g if e[0] == kind}, {e for e in p if e[0] == kind}
        counts += [len(gk & pk), len(pk), len(gk)]
    return counts


def entity_scores(true_pos: float, predicted: float, gold: float) -> dict[str, float]:
    p, r = _ratio(true_pos, predicted), _ratio(true_pos, gold)
    return {"entity_precision": p, "entity_recall": r, "entity_f1": _f1(p, r)}

"""Fine-tuning metrics and early stopping, checked against hand computation (no launch)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from train.metrics.early_stopping import EarlyStopping
from train.metrics.scores import (bio_entities, classification_scores, entity_counts, entity_counts_by_type, entity_scores)


def test_classification_scores_match_hand_computation():
    confusion = np.array([[5, 1, 0],   # gold a: 5 right, 1 taken for b
                          [2, 3, 1],   # gold b
                          [0, 0, 4]])  # gold c
    s = classification_scores(confusion, ["a", "b", "c"])
    assert s["accuracy"] == pytest.approx(12 / 16)
    # a: precision 5/7, recall 5/6, F1 10/13; b: 3/4, 3/6, 0.6; c: 4/5, 4/4, 8/9
    assert (s["precision/a"], s["recall/a"], s["f1/a"]) == pytest.approx((5 / 7, 5 / 6, 10 / 13))
    assert (s["precision/b"], s["recall/b"], s["f1/b"]) == pytest.approx((0.75, 0.5, 0.6))
    assert (s["precision/c"], s["recall/c"], s["f1/c"]) == pytest.approx((0.8, 1.0, 8 / 9))
    assert s["macro_f1"] == pytest.approx((10 / 13 + 0.6 + 8 / 9) / 3)
    assert s["macro_precision"] == pytest.approx((5 / 7 + 0.75 + 0.8) / 3)
    assert s["micro_precision"] == s["micro_recall"] == s["micro_f1"] == pytest.approx(0.75)
    # a class absent from gold and predictions does not dilute the macro average
    wider = classification_scores(np.pad(confusion, ((0, 1), (0, 1))), ["a", "b", "c", "unused"])
    assert wider["macro_f1"] == pytest.approx(s["macro_f1"])


def test_entity_scores_match_hand_computation():
    gold = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-PER"]
    pred = ["B-PER", "I-PER", "O", "B-PER", "O", "I-PER"]  # wrong type at 3; I- after O starts an entity
    assert bio_entities(gold) == {("PER", 0, 2), ("LOC", 3, 4), ("PER", 5, 6)}
    assert bio_entities(pred) == {("PER", 0, 2), ("PER", 3, 4), ("PER", 5, 6)}
    assert entity_counts(gold, pred) == (2, 3, 3)
    assert bio_entities(["B-A", "I-B", "I-B", "B-A", "B-A"]) == {("A", 0, 1), ("B", 1, 3), ("A", 3, 4), ("A", 4, 5)}
    s = entity_scores(2, 3, 4)
    assert (s["entity_precision"], s["entity_recall"], s["entity_f1"]) == pytest.approx((2 / 3, 0.5, 4 / 7))
    # per type: LOC has 1 gold and no prediction; PER has 2 of 3 predictions right, both gold found
    assert entity_counts_by_type(gold, pred, ["LOC", "PER"]) == [0, 0, 1, 2, 3, 2]


def test_token_classification_reports_each_entity_type():
    import torch

    from train.metrics.evaluation import test_table
    from train.tasks import TokenClassification

    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    task = TokenClassification(labels)
    assert task.entity_types == ["LOC", "PER"]
    confusion = torch.eye(4).flatten() * 5
    sums = torch.cat([torch.tensor([1.0, 2.0]), confusion, torch.tensor([2.0, 3.0, 3.0, 0, 0, 1, 2, 3, 2])])
    m = task.metrics(sums)
    assert m["entity_f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert (m["entity_precision/PER"], m["entity_recall/PER"]) == pytest.approx((2 / 3, 1.0))
    assert m["entity_f1/LOC"] == 0.0 and m["token_accuracy"] == 1.0
    table = test_table(m, labels, 10, "step-000004")
    assert "| PER | 0.6667 | 1.0000 | 0.8000 |" in table and "| LOC | 0.0000 | 0.0000 | 0.0000 |" in table


def test_early_stopping_stops_at_the_right_evaluation():
    accuracy = [0.50, 0.62, 0.61, 0.65, 0.64, 0.649, 0.70]  # patience 2, min_delta 0.01
    es = EarlyStopping("accuracy", "auto", patience=2, min_delta=0.01)
    improved = []
    for epoch, value in enumerate(accuracy):
        improved.append(es.update(value, step=10 * (epoch + 1)))
        if es.stopped:
            break
    assert improved == [True, True, False, True, False, False]  # 0.649 is not 0.01 better than 0.65
    assert (epoch, es.best, es.best_step) == (5, 0.65, 40)

    loss = EarlyStopping("loss", "auto", patience=1)  # lower is better; a NaN never improves
    assert [loss.update(v, s) for s, v in enumerate([2.0, 1.5, float("nan")])] == [True, True, False]
    assert loss.stopped and loss.best == 1.5

    resumed = EarlyStopping("accuracy", "auto", patience=2, min_delta=0.01)  # state survives a restart
    first = EarlyStopping("accuracy", "auto", patience=2, min_delta=0.01)
    for epoch, value in enumerate(accuracy[:4]):
        first.update(value, 10 * (epoch + 1))
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(v, 0) for v in accuracy[4:6]] == [False, False] and resumed.stopped


def test_entity_and_class_scores_agree_with_seqeval_and_scikit_learn(monkeypatch):
    """Cross-checks against the reference implementations (test-only dependencies): entity
    precision/recall/F1, overall and per type, against seqeval's conlleval-style scoring (an I-
    after O or after another type starts an entity, as in ``bio_entities``); accuracy and macro and
    micro F1 against scikit-learn on the same labels. Random tag sequences, including ill-formed ones."""
    reference_dir = Path(sys.prefix) / "reference"  # `make install` puts them there, off the trainers' path
    assert reference_dir.is_dir(), f"{reference_dir} is missing: run `make install` (it installs seqeval there)"
    monkeypatch.syspath_prepend(str(reference_dir))
    from seqeval.metrics import classification_report
    from sklearn.metrics import accuracy_score, f1_score, precision_score

    rng = np.random.default_rng(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    for _ in range(30):
        n = int(rng.integers(1, 40))
        gold = [tags[i] for i in rng.choice(len(tags), n, p=[0.4, 0.15, 0.1, 0.1, 0.1, 0.1, 0.05])]
        pred = [t if rng.random() < 0.7 else tags[rng.integers(len(tags))] for t in gold]
        reference = classification_report([gold], [pred], output_dict=True, zero_division=0)
        tp, predicted, actual = entity_counts(gold, pred)
        ours = entity_scores(tp, predicted, actual)
        if actual:  # seqeval reports nothing for a sequence without gold entities
            micro = reference["micro avg"]
            assert (ours["entity_precision"], ours["entity_recall"], ours["entity_f1"]) == pytest.approx(
                (micro["precision"], micro["recall"], micro["f1-score"]))
        by_type = entity_counts_by_type(gold, pred, ["LOC", "MISC", "PER"])
        for i, kind in enumerate(["LOC", "MISC", "PER"]):
            if kind in reference:
                s = entity_scores(*by_type[3 * i: 3 * i + 3])
                assert (s["entity_precision"], s["entity_recall"], s["entity_f1"]) == pytest.approx(
                    (reference[kind]["precision"], reference[kind]["recall"], reference[kind]["f1-score"]))
                assert by_type[3 * i + 2] == reference[kind]["support"]

        names = ["a", "b", "c", "d"]
        y_true = rng.integers(0, 4, 50)
        y_pred = np.where(rng.random(50) < 0.6, y_true, rng.integers(0, 4, 50))
        confusion = np.zeros((4, 4), dtype=np.int64)
        np.add.at(confusion, (y_true, y_pred), 1)
        s = classification_scores(confusion, names)
        present = sorted(set(y_true) | set(y_pred))  # classes in neither are left out of the macro average
        assert s["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
        assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0))
        assert s["macro_precision"] == pytest.approx(
            precision_score(y_true, y_pred, average="macro", labels=present, zero_division=0))
        assert s["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))

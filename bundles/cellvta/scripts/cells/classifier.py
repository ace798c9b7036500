"""A small classifier on frozen cell embeddings: train (minutes on a CPU), validate, save, load, predict.

``hidden = 0`` is a logistic regression; otherwise one hidden layer (ReLU, dropout). Inputs are standardised
with the training set's mean and standard deviation, kept in the model. Training: AdamW on mini-batches, a
class-balanced cross-entropy (each class weighs the inverse of its frequency), a seeded stratified validation
split, early stopping on the validation macro-F1 (the best epoch's weights are kept).

``classifier.pt`` (read with ``torch.load(weights_only=True)``): ``state_dict``, ``classes`` and ``colours`` (the
class table), ``source``, ``branch`` (the decoder branch of the ``decoder`` source) and ``fingerprint`` (the
embeddings it was trained for), ``in_dim``, ``hidden``, ``dropout`` and ``images`` (``{name: pixel digest}`` of
the images whose nuclei trained or validated it, ``scripts.data.datasets.image_digest``; "" for an image embedded
before digests were recorded; empty in files written before it was recorded).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from ..files import atomic_path
from .labels import ClassTable

__all__ = ["CellClassifier", "TrainedClassifier", "train_classifier", "classification_metrics", "save_classifier",
           "load_classifier", "predict"]


class CellClassifier(nn.Module):
    """``(N, in_dim)`` embeddings -> ``(N, num_classes)`` logits.

    Args:
        in_dim: embedding width.
        num_classes: number of classes (no background).
        hidden: hidden width (0: linear, a logistic regression).
        dropout: dropout before the output layer (hidden > 0 only).
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = (nn.Linear(in_dim, num_classes) if hidden == 0 else
                    nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class TrainedClassifier:
    """The model (best validation epoch), its validation metrics, the epochs run and the per-epoch history
    (``loss``, ``val_macro_f1``)."""

    model: CellClassifier
    metrics: dict
    epochs: int
    history: list[dict]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    """Accuracy, balanced accuracy (mean recall of the classes present), macro-F1 (of the classes present),
    per-class precision/recall/F1/support and the confusion matrix (rows true, columns predicted) of (N,) class
    ids in ``[0, len(names))``."""
    k = len(names)
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, n in enumerate(names)},
        "confusion": cm.tolist(),
    }


def predict(model: CellClassifier, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """(N, D) embeddings -> (N, K) float32 softmax probabilities."""
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out.append(torch.softmax(model(torch.as_tensor(x[start:start + batch_size], dtype=torch.float32)), 1))
    return (torch.cat(out).numpy() if out else np.zeros((0, model.num_classes), np.float32)).astype(np.float32)


def train_classifier(x: np.ndarray, y: np.ndarray, names: list[str], hidden: int = 0, dropout: float = 0.0,
                     epochs: int = 200, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 256,
                     val_fraction: float = 0.2, patience: int = 20, seed: int = 0,
                     x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> TrainedClassifier:
    """Train on (N, D) embeddings ``x`` with (N,) class ids ``y`` in ``[0, len(names))``.

    The validation set is ``x_val``/``y_val`` when given, else a stratified ``val_fraction`` of ``x`` (seeded).
    """
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"embeddings {x.shape} and labels {y.shape} must be (N, D) and (N,), N > 0")
    if y.min() < 0 or y.max() >= len(names):
        raise ValueError(f"class ids outside 0..{len(names) - 1}")
    if x_val is None:
        counts = np.bincount(y, minlength=len(names))
        stratify = y if counts[counts > 0].min() >= 2 else None
        x, x_val, y, y_val = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=stratify)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CellClassifier(x.shape[1], len(names), hidden, dropout)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.mean.copy_(xt.mean(0))
    model.std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
    counts = torch.bincount(yt, minlength=len(names)).float()
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), 0.0)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, since, history = -1.0, None, 0, []
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        f1 = classification_metrics(y_val, predict(model, x_val).argmax(1), names)["macro_f1"]
        history.append({"epoch": epoch + 1, "loss": total / len(xt), "val_macro_f1": f1})
        if f1 > best:
            best, since = f1, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best_state)
    metrics = classification_metrics(y_val, predict(model, x_val).argmax(1), names)
    return TrainedClassifier(model.eval(), metrics, len(history), history)


def save_classifier(path: str | Path, model: CellClassifier, classes: ClassTable, source: str,
                    fingerprint: str, branch: str = "nuclei_type_map", images: Mapping[str, str] | None = None,
                    ) -> Path:
    """Write ``classifier.pt`` atomically (module docstring); ``images``: ``{name: pixel digest}`` of the images
    whose nuclei trained or validated it (evaluation refuses to score it on them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = model.net if isinstance(model.net, nn.Linear) else model.net[0]
    payload = {"state_dict": model.state_dict(), "classes": list(classes.names),
               "colours": [list(c) for c in classes.colours], "source": source,
               "branch": branch, "fingerprint": fingerprint,
               "in_dim": int(first.in_features), "hidden": 0 if isinstance(model.net, nn.Linear) else
               int(first.out_features), "dropout": 0.0 if isinstance(model.net, nn.Linear) else
               float(model.net[2].p), "images": dict(images or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_classifier(path: str | Path, source: str | None = None, fingerprint: str | None = None,
                    branch: str | None = None) -> tuple[CellClassifier, ClassTable, dict]:
    """Read ``classifier.pt``; with ``source``/``fingerprint``/``branch`` given, refuse a classifier trained for
    other embeddings (ValueError naming the file). Returns the model (eval mode), its class table and its metadata
    (``branch``: ``nuclei_type_map`` for files written before it was recorded; ``images``: ``{name: pixel digest}``
    of the images it has seen, "" where the digest was not recorded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = {k: payload[k] for k in ("classes", "colours", "source", "fingerprint", "in_dim", "hidden",
                                        "dropout")}
        meta["branch"] = payload.get("branch", "nuclei_type_map")
        meta["images"] = dict(payload.get("images", {}))
    except (KeyError, TypeError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a cell classifier file ({e})") from e
    if source is not None and meta["source"] != source:
        raise ValueError(f"{path}: trained on '{meta['source']}' embeddings, these are '{source}' embeddings")
    if branch is not None and meta["source"] == "decoder" and meta["branch"] != branch:
        raise ValueError(f"{path}: trained on the '{meta['branch']}' decoder branch's embeddings, these are the "
                         f"'{branch}' branch's")
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise ValueError(f"{path}: trained on the embeddings of another model (fingerprint {meta['fingerprint']}, "
                         f"this model {fingerprint})")
    table = ClassTable(meta["classes"], [tuple(c) for c in meta["colours"]])
    model = CellClassifier(meta["in_dim"], len(table.names), meta["hidden"], meta["dropout"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), table, meta

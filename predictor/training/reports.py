"""PNG reports for the README: training curve, reliability diagram, confusion matrix."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: servers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from predictor.cifar import CLASSES  # noqa: E402
from predictor.training.calibration import reliability_bins  # noqa: E402


def training_curve(history: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train (smoothed labels)")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.plot(epochs, [r["train_accuracy"] for r in history], label="train (augmented)")
    acc_ax.plot(epochs, [r["val_accuracy"] for r in history], label="validation")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reliability_diagram(logits: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, t, title in ((axes[0], 1.0, "raw (T = 1)"), (axes[1], temperature, f"temperature-scaled (T = {temperature:.2f})")):
        bins = reliability_bins((logits / t).softmax(1), labels)
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] or 0 for b in bins], width=1 / len(bins), edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
        ax.set(xlabel="confidence", title=title, xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy in bin")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, path: Path) -> np.ndarray:
    matrix = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (validation split)")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return matrix

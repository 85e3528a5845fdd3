"""PNG plots of a recovery report (matplotlib, no display needed).

* ``loss_curves.png``: the loss of Eq. 3 of every layer against the step.
* ``w_error_hist.png`` (with ground truth): per-layer W-Error of the
  recovery against Mean-LoRA (paper Fig. 4).
* ``w_error_cumulative.png`` (with ground truth): the share of layers whose
  W-Error is at most x (paper Fig. 6).
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path):
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  os.replace(tmp, path)


def plot_loss_curves(report: dict, path: str) -> str:
  """Loss against step for every solved layer (log scale)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for layer in report["layers"]:
    y = np.array([np.nan if v is None else v for v in layer["loss_curve"]],
                 float)
    y = np.where(y > 0, y, np.nan)
    if np.isfinite(y).any():
      # A single point (the closed-form solvers take one step) is no line:
      # draw it as a marker or it does not show.
      single = np.isfinite(y).sum() == 1
      ax.plot(np.arange(1, len(y) + 1), y, lw=0.8, alpha=0.6,
              marker="o" if single else None, ms=4)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (Eq. 3)")
  ax.set_title(f"{len(report['layers'])} layers, n={report['n_models']}")
  _save(fig, path)
  plt.close(fig)
  return path


def _errors(report):
  ours = np.array([l["w_error"] for l in report["layers"]
                   if l.get("w_error") is not None], float)
  mean = np.array([l["mean_lora_w_error"] for l in report["layers"]
                   if l.get("mean_lora_w_error") is not None], float)
  return ours, mean


def plot_w_error_histogram(report: dict, path: str) -> str:
  """Per-layer W-Error histogram: recovery vs Mean-LoRA (paper Fig. 4)."""
  plt = _plt()
  ours, mean = _errors(report)
  fig, ax = plt.subplots(figsize=(6, 4))
  lo = min(ours.min(), mean.min()) - 0.5
  hi = max(ours.max(), mean.max()) + 0.5
  bins = np.linspace(lo, hi, 40)
  ax.hist(ours, bins=bins, alpha=0.7,
          label=f"{report['solver']}  W-Error {ours.mean():.2f}")
  ax.hist(mean, bins=bins, alpha=0.7,
          label=f"Mean-LoRA  W-Error {mean.mean():.2f}")
  ax.set_xlabel("W-Error (log10 MSE)")
  ax.set_ylabel("# of layers")
  ax.legend()
  _save(fig, path)
  plt.close(fig)
  return path


def plot_cumulative_w_error(report: dict, path: str) -> str:
  """Share of layers with W-Error <= x (paper Fig. 6)."""
  ours, mean = _errors(report)
  return plot_cumulative({report["solver"]: ours, "Mean-LoRA": mean}, path)


def plot_cumulative(series: Dict[str, Sequence[float]], path: str,
                    title: str = "") -> str:
  """Share of layers with W-Error <= x, one line per ``{label: errors}``
  (paper Fig. 6)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, errs in series.items():
    x = np.sort(np.asarray(errs, float))
    ax.step(x, 100 * np.arange(1, len(x) + 1) / len(x), where="post",
            label=label)
  ax.set_xlabel("W-Error (log10 MSE)")
  ax.set_ylabel("% of layers with W-Error <= x")
  ax.set_ylim(0, 101)
  ax.set_title(title)
  ax.legend()
  _save(fig, path)
  plt.close(fig)
  return path


def plot_per_layer(series: Dict[str, Sequence[float]], names: Sequence[str],
                   path: str, title: str = "") -> str:
  """Per-layer W-Error, one bar group per layer, one bar per ``{label:
  errors}`` (paper Fig. 5)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4))
  width = 0.8 / len(series)
  x = np.arange(len(names))
  for i, (label, errs) in enumerate(series.items()):
    ax.bar(x + i * width, errs, width, label=label)
  ax.set_xticks(x + 0.4 - width / 2)
  ax.set_xticklabels(names, rotation=90, fontsize=7)
  ax.set_ylabel("W-Error (log10 MSE)")
  ax.set_title(title)
  ax.legend()
  _save(fig, path)
  plt.close(fig)
  return path


def plot_against_n(ns: Sequence[int], panels: Dict[str, Dict[str, Sequence]],
                   path: str, title: str = "") -> str:
  """Scores against the number of fine-tunes: one panel per ``{ylabel:
  {label: values}}`` (paper Fig. 7 and 10)."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4),
                           squeeze=False)
  for ax, (ylabel, series) in zip(axes[0], panels.items()):
    for label, values in series.items():
      ax.plot(ns, values, marker="o", ms=3, label=label)
    ax.set_xlabel("number of LoRA fine-tunes n")
    ax.set_ylabel(ylabel)
    ax.legend()
  fig.suptitle(title)
  _save(fig, path)
  plt.close(fig)
  return path


def make_plots(report: dict, out_dir: str) -> List[str]:
  """Writes the plots a report allows into ``out_dir``; returns the paths."""
  paths = []
  if report.get("layers"):
    paths.append(plot_loss_curves(report, os.path.join(out_dir,
                                                       "loss_curves.png")))
    ours, mean = _errors(report)
    if len(ours) and len(mean):
      paths.append(plot_w_error_histogram(
          report, os.path.join(out_dir, "w_error_hist.png")))
      paths.append(plot_cumulative_w_error(
          report, os.path.join(out_dir, "w_error_cumulative.png")))
  return paths

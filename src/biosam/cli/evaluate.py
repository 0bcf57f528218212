"""``biosam evaluate``: score predicted instance label images against ground truth."""

from __future__ import annotations

import json

import click

from biosam.errors import InputError


def _thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--thresholds '{text}': give comma-separated IoU values in (0, 1], e.g. 0.5,0.75.") from None


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


@click.command("evaluate")
@click.argument("pred", type=str)
@click.argument("gt", type=str)
@click.option("--thresholds", default=None, metavar="T1,T2,...",
              help="IoU thresholds of the per-threshold scores [default: 0.5,0.55,...,0.95]; "
                   "mSA always uses 0.5:0.05:0.95.")
@click.option("--json", "as_json", is_flag=True, help="Print all scores as JSON.")
def evaluate(pred: str, gt: str, thresholds: str | None, as_json: bool) -> None:
    """Score the instance labels PRED against the ground truth GT.

    PRED and GT are label images (any format biosam reads) or two folders whose
    files are paired by name without extension. Binary ground-truth masks are
    split into objects by connected components. Prints per-image scores (F1 at
    the lowest threshold, mSA = mean of TP/(TP+FP+FN) over IoU 0.5:0.05:0.95,
    mean IoU of pairs matched at 0.5, foreground Dice) and the pooled scores
    per threshold.
    """
    from biosam.evaluate import MSA_THRESHOLDS, evaluate_folders

    result = evaluate_folders(pred, gt, _thresholds(thresholds) or MSA_THRESHOLDS, progress=True)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    first = result["thresholds"][0]
    rows = [("image", "gt", "pred", f"F1@{first:g}", "mSA", "mIoU", "Dice")]
    for name, r in [*result["images"].items(), ("(all)", result["aggregate"])]:
        rows.append((name, r["n_gt"], r["n_pred"], f"{r['per_threshold'][0]['f1']:.3f}", f"{r['msa']:.3f}",
                     f"{r['mean_matched_iou']:.3f}", f"{r['dice']:.3f}"))
    agg = result["aggregate"]
    lines = _table(rows) + ["", f"pooled over {agg['images']} image(s); "
                                f"mean of per-image mSA {agg['mean_image_msa']:.3f}", ""]
    rows = [("IoU", "TP", "FP", "FN", "precision", "recall", "F1", "SA")]
    for t in agg["per_threshold"]:
        rows.append((f"{t['threshold']:g}", t["tp"], t["fp"], t["fn"],
                     *(f"{t[k]:.3f}" for k in ("precision", "recall", "f1", "sa"))))
    click.echo("\n".join(lines + _table(rows)))

"""Where a label-distribution model puts its probability: why its per-face intervals are wide.

    python benchmarks/label_distribution_tails.py --ckpt RUN/checkpoints/epoch_008.ckpt \
        --predictions RUN/predictions.csv [--weights current] [--label NAME] \
        [--out benchmarks/results/label_distribution_tails.csv]

The per-face interval's base is the central quantile range of the predicted age distribution
(agecls.intervals). This script reads the faces of a predictions.csv (the test split a run or
agecls.eval wrote; `path` and true `age`), predicts each one's distribution with the checkpoint
(preprocessed as an exported model is, agecls.deploy.preprocess; no TTA), and reports by decade of
true age: the mean peak probability, the mean standard deviation of the distribution, the mass
lying more than 15 years from the expected age, split into below and above, and the width of the
central 90 % range. A flat floor of probability over far ages, below and above alike, leaves the
expected age (what the L1 term of DLDL-v2 trains) where it is but widens the quantile range. The
table is printed and written to --out (a rerun replaces the rows of the same --label).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from results_csv import write_replacing  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

FAR = 15.0  # years from the expected age that count as a tail
COVERAGE = 0.9


def distributions(ckpt: Path, paths: list[str], weights: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) predicted distributions of the images `paths` and the (K,) class ages."""
    from agecls.data.images import load_rgb
    from agecls.deploy import preprocess, preprocessing_spec, to_input
    from agecls.eval import load_checkpoint

    model, checkpoint = load_checkpoint(ckpt, weights=weights)
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    if data.get("align") or data.get("face_margin"):
        raise SystemExit(f"--ckpt {ckpt}: it was trained on aligned or face-box crops (data.align={data.get('align')}, "
                         f"data.face_margin={data.get('face_margin')}); this script reads whole images, as UTKFace's "
                         "crops are, and would measure other pictures than the model saw")
    model.eval()
    loss = model.net.loss
    if not hasattr(loss, "distribution") or getattr(loss, "interval_base", None) != "distribution":
        raise SystemExit(f"--ckpt {ckpt}: its loss ({loss.name}) predicts a point, not a distribution over ages")
    hp = model.hparams
    spec = preprocessing_spec(int(hp.image_size), float(hp.crop_pct), (0.0, 100.0), str(hp.backbone.get("name")))
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = np.stack([preprocess(load_rgb(p), spec) for p in paths[start:start + batch_size]])
            output = model.net(torch.from_numpy(to_input(batch)), head_output=True)
            out.append(loss.distribution(output).double().numpy())
            print(f"\r{min(start + batch_size, len(paths))}/{len(paths)} faces", end="", file=sys.stderr)
    print(file=sys.stderr)
    return np.concatenate(out), loss.ages.double().numpy()


def summarise(p: np.ndarray, ages: np.ndarray, true_age: np.ndarray) -> pd.DataFrame:
    """One row per face: peak, sd, far mass below and above the expected age, central range width."""
    mean = p @ ages
    sd = np.sqrt(np.maximum((p * (ages[None, :] - mean[:, None]) ** 2).sum(1), 0.0))
    below = (p * (ages[None, :] < mean[:, None] - FAR)).sum(1)
    above = (p * (ages[None, :] > mean[:, None] + FAR)).sum(1)
    cdf = np.cumsum(p, axis=1)
    lo = ages[np.argmax(cdf >= (1 - COVERAGE) / 2, axis=1)]
    hi = ages[np.argmax(cdf >= (1 + COVERAGE) / 2, axis=1)]
    return pd.DataFrame({"age": true_age, "expected": mean, "peak": p.max(1), "sd": sd, "far_below": below,
                         "far_above": above, "central90_width": hi - lo})


def table(faces: pd.DataFrame, label: str) -> pd.DataFrame:
    decade = (faces["age"] // 10 * 10).astype(int)
    groups = [("all", faces)] + [(f"{d}-{d + 9}", g) for d, g in faces.groupby(decade)]
    rows = [{"label": label, "decade": name, "faces": len(g), "peak": g["peak"].mean(), "sd": g["sd"].mean(),
             "far_below": g["far_below"].mean(), "far_above": g["far_above"].mean(),
             "central90_width": g["central90_width"].mean(), "mae": (g["expected"] - g["age"]).abs().mean()}
            for name, g in groups]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True, help="a predictions.csv with path and age")
    parser.add_argument("--weights", default="checkpoint", choices=["checkpoint", "current"])
    parser.add_argument("--label", default=None)
    parser.add_argument("--root", type=Path, default=None, help="the folder relative paths of --predictions are in")
    parser.add_argument("--limit", type=int, default=None, help="only the first N faces")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for given in (args.ckpt, args.predictions):
        if not given.is_file():
            parser.error(f"{given}: no such file")
    preds = pd.read_csv(args.predictions)
    if not {"path", "age"} <= set(preds.columns):
        parser.error(f"--predictions {args.predictions}: needs the columns path and age; it has {list(preds.columns)}")
    if args.limit:
        preds = preds.head(args.limit)
    relative = [p for p in preds["path"].astype(str) if not Path(p).is_absolute()]
    if relative and args.root is None:
        parser.error(f"--predictions {args.predictions}: paths such as {relative[0]!r} are relative; give --root")
    paths = [p if Path(p).is_absolute() else str(args.root / p) for p in preds["path"].astype(str)]
    p, ages = distributions(args.ckpt, paths, args.weights)
    result = table(summarise(p, ages, preds["age"].to_numpy(float)), args.label or args.ckpt.parent.parent.name)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        write_replacing(args.out, result, key=["label", "decade"])
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

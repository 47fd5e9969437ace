"""The random-number generators' states (torch, CUDA, numpy, Python), saved per rank in each
exact-resume state and restored by an exact resume."""
from __future__ import annotations

import torch


def rng_state() -> dict:
    import random

    import numpy as np

    st = {"torch": torch.get_rng_state(),
          "numpy": torch.from_numpy(np.append(np.random.get_state()[1], np.random.get_state()[2])
                                    .astype(np.int64)),
          "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    keys = st["numpy"].numpy()
    np.random.set_state(("MT19937", keys[:624].astype(np.uint32), int(keys[624])))
    py = tuple(int(x) for x in st["python"].tolist())
    random.setstate((3, py, None))

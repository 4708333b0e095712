"""Independent slow formulas that several plugins' tests compare against."""

import math

import pytest
import torch.nn.functional as F


def _info_nce_with_memory_loop(views, index, memory, owners, valid, t):
    """SimCLR's loss, anchor by anchor (float64), with the memory entries in every denominator
    except unfilled slots (``valid``) and entries owned by the anchor's own sample
    (``owners[m] == index[anchor]``)."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    mem = F.normalize(memory.double(), dim=1)
    rows = [(zi, i) for v in z for i, zi in enumerate(v)]
    total = 0.0
    for a, (za, ia) in enumerate(rows):
        den = sum(math.exp(float(za @ zk) / t) for k, (zk, _) in enumerate(rows) if k != a)
        den += sum(math.exp(float(za @ m) / t) for m, o, ok in zip(mem, owners, valid)
                   if ok and o != int(index[ia]))
        pos = [k for k, (_, ik) in enumerate(rows) if k != a and ik == ia]
        total += -sum(math.log(math.exp(float(za @ rows[p][0]) / t) / den) for p in pos) / len(pos)
    return total / len(rows)


@pytest.fixture
def slow_info_nce_with_memory():
    return _info_nce_with_memory_loop

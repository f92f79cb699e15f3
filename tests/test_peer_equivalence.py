"""The losses equal the peers' own implementations where the semantics coincide (peers installed).

TRL's GKD loss (``GKDTrainer.generalized_jsd_loss``) is the reference formulation of the generalized
JSD with β and τ; on one process with the whole vocabulary, ``generalized_jsd`` must give its
per-position loss and its gradient. Run by CI's peers step, which installs trl.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dense_reference import rel_err
from megatron_mopd.losses import generalized_jsd

pytest.importorskip("trl", reason="TRL is not installed: pip install trl (CI's peers step installs it)")


def _trl_generalized_jsd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trl.experimental announces itself as experimental
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generalized_jsd_equals_trl_gkd_loss(beta: float, temperature: float) -> None:
    trl_loss = _trl_generalized_jsd()
    gen = torch.Generator().manual_seed(7)
    student = (torch.randn(2, 5, 300, generator=gen, dtype=torch.float64) * 3).float()
    teacher = (torch.randn(2, 5, 300, generator=gen, dtype=torch.float64) * 3).float()

    ours_leaf = student.clone().requires_grad_(True)
    ours = generalized_jsd(ours_leaf, teacher, beta=beta, temperature=temperature)
    ours.sum().backward()
    trl_leaf = student.double().requires_grad_(True)
    theirs = trl_loss(trl_leaf, teacher.double(), beta=beta, temperature=temperature, reduction="none").sum(-1)
    theirs.sum().backward()

    assert rel_err(ours, theirs) <= 1e-5  # float32 against TRL run in float64
    assert rel_err(ours_leaf.grad, trl_leaf.grad) <= 1e-5

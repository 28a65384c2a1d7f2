"""With DDP on 2 CPU processes (gloo), every rank ends with the same masks and weights."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import run_script

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    from tests.helpers import Tiny, mlp
    import torch
    from plugins.sparsity.hardshrink import HardshrinkSparsifier
    from plugins.core.masks import get_mask

    class Dump(L.Callback):
        def __init__(self, sparsifier):
            self.sparsifier = sparsifier

        def on_train_end(self, trainer, pl_module):
            targets = self.sparsifier.targets
            masks = {t.name: get_mask(t.module, t.tensor_name).mask.clone() for t in targets}
            weights = {t.name: t.tensor.detach().clone() for t in targets}
            state = {"masks": masks, "weights": weights, "history": self.sparsifier.history}
            torch.save(state, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")

    L.seed_everything(0)
    schedule = {"kind": "cubic", "start": 0.0, "end": 0.8, "begin_epoch": 0, "end_epoch": 2,
                "every_n_steps": 2}
    sparsifier = HardshrinkSparsifier(schedule, mode="sparsity", scope="global")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[sparsifier, Dump(sparsifier)])
    trainer.fit(Tiny(mlp(8, 32, 32, 3)))
    """
)


@pytest.mark.ddp
@pytest.mark.slow
def test_masks_are_identical_on_both_ddp_ranks(tmp_path: Path):
    result = run_script(SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) >= 4
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    assert (
        0.79
        < float((torch.cat([m.flatten() for m in ranks[0]["masks"].values()]) == 0).float().mean())
        < 0.81
    )

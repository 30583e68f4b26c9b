"""The CLI end to end on a small toy: toy -> inspect -> perplexity -> generate."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from squeeze import api
from squeeze.cli import app
from squeeze.model.toy import make_toy
from tests.conftest import SMALL

runner = CliRunner()


def test_toy_inspect_perplexity_generate(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    res = runner.invoke(app, ["toy", str(out), "--layers", "3", "--hidden", "64", "--vocab", "512", "--fp8",
                              "--train-steps", "3"])
    assert res.exit_code == 0, res.output
    assert "held-out perplexity" in res.output
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    for fragment in ("3 (1 dense, 2 MoE)", "fp8-block", "8 routed (top-2", "active per token"):
        assert fragment in res.output, fragment
    res = runner.invoke(app, ["perplexity", str(out), "--max-windows", "4"])
    assert res.exit_code == 0 and "perplexity" in res.output, res.output
    res = runner.invoke(app, ["generate", str(out), "And God said", "--max-new-tokens", "5"])
    assert res.exit_code == 0 and res.output.startswith("And God said"), res.output


def test_inspect_counts_parameters(tmp_path: Path) -> None:
    make_toy(tmp_path / "t", SMALL)
    s = api.inspect(tmp_path / "t")
    expert = 3 * SMALL.hidden * SMALL.moe_inter
    moe_layers = SMALL.layers - SMALL.dense_layers
    assert s.routed_expert_params == moe_layers * SMALL.experts * expert
    assert s.total_params - s.active_params == moe_layers * (SMALL.experts - SMALL.top_k) * expert
    assert s.formats["bf16"].bytes + s.formats["fp32"].bytes <= s.disk_bytes


def test_generation_with_cache_equals_full_recompute(tmp_path: Path) -> None:
    """The MLA latent cache must not change greedy decoding."""
    import torch

    from squeeze.model.runtime import LayerwiseModel

    make_toy(tmp_path / "t", SMALL)
    m = LayerwiseModel(tmp_path / "t", keep_layers=True)
    prompt = torch.randint(0, SMALL.vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    cached = list(m.generate(prompt, 8))
    ids = prompt
    for _ in range(8):
        nxt = int(m.logits(ids)[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert cached == ids[0, 6:].tolist()

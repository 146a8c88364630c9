"""`uwm bench routing`: per layer, the token pairs a model's routing keeps and the tiles a tiled
kernel would visit for its queries, random ones and block-coherent ones; bad input named."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_model_config
from unified_wm import cli


@pytest.fixture(scope="module")
def moc_hf(tmp_path_factory, processor):
    import torch

    from unified_wm.model.modeling_uwm import UnifiedWMForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("moc_hf") / "hf"
    cfg = tiny_model_config(processor, attention={"backend": "moc", "top_k": 2})
    UnifiedWMForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(out)
    return out


def test_bench_routing_reports_every_layer(moc_hf, tokens_dir, tmp_path, capsys):
    out = tmp_path / "routing.json"
    assert cli.main(["bench", "routing", "--model", str(moc_hf), "--tokens", str(tokens_dir), "--documents", "3",
                     "--query-blocks", "16", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["documents"] == 3 and res["template"] == "interleaved" and res["top_k"] == 2
    assert [r["layer"] for r in res["layers"]] == [0, 1]  # the tiny model's two layers, each captured once a forward
    for r in res["layers"]:
        assert 0 < r["pairs_kept"] < 1
        for key in ("tiles_model", "tiles_random_q", "tiles_coherent_q", "tiles_model_16x64"):
            assert 0 < r[key] <= 1, (key, r)
        # queries shared within a tile select alike, so they never need more tiles than random ones
        assert r["tiles_coherent_q"] <= r["tiles_random_q"]
    assert "tiles (model)" in capsys.readouterr().out


def test_bench_routing_names_bad_input(moc_hf, tiny_hf, tokens_dir, tmp_path, capsys):
    bad = tmp_path / "x.json"
    assert cli.main(["bench", "routing", "--model", str(moc_hf), "--tokens", str(tmp_path), "--out", str(bad)]) != 0
    assert "is not a token dataset folder" in capsys.readouterr().err
    assert cli.main(["bench", "routing", "--model", str(moc_hf), "--tokens", str(tokens_dir), "--template", "policy",
                     "--out", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "no 'policy' documents" in err and "interleaved" in err
    assert cli.main(["bench", "routing", "--model", str(tiny_hf), "--tokens", str(tokens_dir), "--out", str(bad)]) != 0
    assert "uses dense attention" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "routing", "--model", str(moc_hf), "--tokens", str(tokens_dir), "--query-blocks", "16,x"])
    assert "--query-blocks must be comma-separated integers" in capsys.readouterr().err
    assert not bad.exists()

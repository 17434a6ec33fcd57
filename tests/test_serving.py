"""sparrow.serving without vLLM: the draft's export for vLLM, and the one-line errors of --engine vllm."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import sparrow
from sparrow import defaults, serving
from sparrow.cli import main

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_export_writes_vllm_names_and_config(tmp_path):
    out = serving.export_draft(defaults.draft_path("sparrow"), str(tmp_path / "v"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == [serving.VLLM_ARCH] and cfg["num_hidden_layers"] == 1
    assert cfg["sparrow"]["mode"] == "sparrow" and "mrope_section" not in cfg["rope_parameters"]  # compact: 1-D RoPE
    ours = load_file(os.path.join(defaults.draft_path("sparrow"), "model.safetensors"))
    theirs = load_file(os.path.join(out, "model.safetensors"))
    assert len(theirs) == len([k for k in ours if not k.startswith("visual_proj.")])  # IVSB's projection left out
    assert torch.equal(theirs["model.layers.0.self_attn.q_proj.weight"], ours["layer.q_proj.weight"])
    assert torch.equal(theirs["model.layers.0.mlp.down_proj.weight"], ours["layer.down_proj.weight"])
    assert torch.equal(theirs["model.fc.bias"], ours["fc.bias"]) and "model.norm.weight" in theirs
    eagle = json.load(open(os.path.join(serving.export_draft(defaults.draft_path("eagle"), str(tmp_path / "e")),
                                        "config.json")))
    assert eagle["rope_parameters"]["mrope_section"]  # the eagle draft keeps the target's mRoPE positions


def test_export_refuses_what_vllm_cannot_run(tmp_path):
    target = sparrow.load_target(None, device="cpu")
    sparrow.init_draft(target, window=16).save(str(tmp_path / "w"))
    with pytest.raises(sparrow.SparrowError, match="no text window"):
        serving.export_draft(str(tmp_path / "w"), str(tmp_path / "out"))
    with pytest.raises(sparrow.SparrowError, match="not a Sparrow draft"):
        serving.export_draft(str(tmp_path), str(tmp_path / "out"))


def test_engine_vllm_errors_are_one_line(capsys):
    assert main(["generate", "--engine", "vllm", "--tree-tokens", "8"]) == 2
    assert "--num-speculative-tokens" in capsys.readouterr().err
    assert main(["generate", "--engine", "vllm", "--compile-draft"]) == 2
    assert "vLLM compiles its own" in capsys.readouterr().err
    if not HAS_VLLM:
        assert main(["generate", "--engine", "vllm"]) == 2
        assert "scripts/install-vllm.sh" in capsys.readouterr().err
        assert main(["serve"]) == 2
        assert "scripts/install-vllm.sh" in capsys.readouterr().err


"""The command line: generate / init-draft end to end, --json output, and one-line errors (exit code 2)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparrow.cli import main
from sparrow.tiny import make_tiny_target
from sparrow.video import write_video


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    paths = {
        "target": make_tiny_target(str(d / "t"), "qwen2_5_vl", seed=0, init_std=0.1),
        "other": make_tiny_target(str(d / "o"), "qwen2_5_vl", seed=0, hidden=96, heads=4, kv_heads=2),
        "other_family": make_tiny_target(str(d / "f"), "qwen2_vl", seed=0),
        "short": make_tiny_target(str(d / "s"), "qwen2_5_vl", seed=0, max_positions=64),
        "video": str(d / "clip.mp4"), "draft": str(d / "draft"), "other_draft": str(d / "od"),
        "family_draft": str(d / "fd"), "text": str(d / "notes.txt"), "broken": str(d / "broken.mp4"),
    }
    frames = (np.random.RandomState(0).rand(12, 56, 56, 3) * 255).astype(np.uint8)
    write_video(paths["video"], frames, fps=4)
    data = open(paths["video"], "rb").read()
    open(paths["broken"], "wb").write(data[: len(data) // 3])
    open(paths["text"], "w").write("not a video\n")
    assert main(["init-draft", "--target", paths["target"], "--out", paths["draft"]]) == 0
    assert main(["init-draft", "--target", paths["other"], "--out", paths["other_draft"]]) == 0
    assert main(["init-draft", "--target", paths["other_family"], "--out", paths["family_draft"]]) == 0
    return paths


def gen_args(env, **over):
    a = {"--target": env["target"], "--draft": env["draft"], "--video": env["video"], "--num-frames": "8",
         "--max-pixels": str(56 * 56), "--max-new-tokens": "12"}
    a.update(over)
    return ["generate"] + [x for k, v in a.items() if v is not None for x in (k, v)]


def test_generate_json_and_methods_agree(env, capsys):
    outs = {}
    for method in ("sparrow", "eagle", "ar"):
        assert main(gen_args(env, **{"--method": method}) + ["--json"]) == 0
        outs[method] = json.loads(capsys.readouterr().out)
    for key in ("text", "token_ids", "new_tokens", "visual_tokens", "tau", "accept_lengths", "prefill_s", "decode_s",
                "method"):
        assert key in outs["sparrow"]
    assert outs["sparrow"]["token_ids"] == outs["ar"]["token_ids"] == outs["eagle"]["token_ids"]
    assert outs["sparrow"]["new_tokens"] == 12 and outs["sparrow"]["visual_tokens"] == 16


def test_generate_streams_then_summarises(env, capsys):
    assert main(gen_args(env)) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and "tau" in cap.err and "visual tokens 16" in cap.err and "tok/s" in cap.err


def test_sampling_flags(env, capsys):
    assert main(gen_args(env, **{"--temperature": "1.0", "--top-p": "0.9", "--top-k": "20", "--seed": "3"})
                + ["--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) >= 1


BAD = {
    "missing file": ({"--video": "/nonexistent/clip.mp4"}, "no such file"),
    "not a video": ({"--video": "text"}, "not a video"),
    "truncated": ({"--video": "broken"}, "corrupt"),
    "zero frames": ({"--num-frames": "0"}, "positive"),
    "too many frames": ({"--num-frames": "500"}, "only 12"),
    "draft for another target": ({"--draft": "other_draft"}, "hidden size"),
    "draft for another family": ({"--draft": "family_draft"}, "family"),
    "prompt longer than context": ({"--target": "short"}, "context"),
    "draft path not a draft": ({"--draft": "/tmp"}, "not a Sparrow draft"),
    "target path not a checkpoint": ({"--target": "/tmp"}, "config.json"),
    "empty tree": ({"--tree-depth": "0"}, "each must be 1 or more"),
    "negative temperature": ({"--temperature": "-1"}, "temperature must be 0 (greedy) or more"),
    "top-p zero": ({"--top-p": "0"}, "top-p must be in (0, 1]"),
    "negative top-k": ({"--top-k": "-2"}, "top-k must be 0 (off) or more"),
    "empty prompt": ({"--prompt": " "}, "--prompt is empty"),
    "unknown dtype": ({"--dtype": "bf17"}, "dtype 'bf17' is not known"),
    "unknown device": ({"--device": "tpu"}, "device 'tpu' is not known"),  # was a torch traceback
    "fps not a number": ({"--num-frames": None, "--fps": "nan"}, "--fps must be a positive number"),  # a traceback
    "zero frame area": ({"--max-pixels": "0"}, "--max-pixels 0: give a frame area"),  # was the default, silently
    "minimum above maximum": ({"--min-pixels": str(112 * 112)}, "--min-pixels 12544 is above the largest frame "
                                                                 "area 3136"),  # was clamped silently
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(env, capsys):
    assert main(gen_args(env, **{"--device": "cuda"})) == 2
    assert "this torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(env, capsys, case):
    over, needle = BAD[case]
    over = {k: env.get(v, v) for k, v in over.items()}
    if case == "prompt longer than context":
        over["--draft"] = None
        over["--method"] = "ar"
        over["--max-pixels"] = str(112 * 112)
    assert main(gen_args(env, **over)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparrow: error: ") and "\n" not in err and needle in err, err


def test_slow_bf16_on_this_cpu_is_said(env, capsys, monkeypatch):
    from sparrow.targets import base

    for fast in (False, True):
        monkeypatch.setattr(base, "fast_bf16", lambda device, fast=fast: fast)
        assert main(gen_args(env, **{"--dtype": "bfloat16", "--device": "cpu"})) == 0
        assert ("no fast bfloat16 kernels" in capsys.readouterr().err) != fast


def test_console_script_no_traceback(env):
    r = subprocess.run([sys.executable, "-m", "sparrow.cli"] + gen_args(env, **{"--video": env["text"]}),
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a video" in r.stderr


def test_count_flag_helpers():
    """The shared checks behind bench, analyze, evaluate-target and train-target's count flags."""
    from sparrow.errors import SparrowError, at_least, positive_list

    assert positive_list("--visual-tokens", "500, 1500,8000", "500") == [500, 1500, 8000]
    assert positive_list("--long-buckets", "", "25088", empty_ok=True) == []
    for text in ("", "0", "5,-1", "a,5", "1.5"):
        with pytest.raises(SparrowError, match=f"--x {text!r}: give positive whole numbers separated by commas"):
            positive_list("--x", text, "9")
    at_least(0, ("--reading", 0), ("--unset", None))
    with pytest.raises(SparrowError, match="^--batch 0: give 1 or more$"):
        at_least(1, ("--steps", 3), ("--batch", 0))


@pytest.mark.parametrize("argv, message", [
    (["init-draft", "--mid-layer", "99"], "mid_layer 99: the target has 12 layers; give 1 to 11"),  # was written
    (["init-draft", "--mid-layer", "0"], "mid_layer 0: the target has 12 layers"),
    (["make-tiny", "--hidden", "30"], "hidden 30: give a multiple of 8 from 32 up"),  # was a transformers error
    (["make-tiny", "--layers", "0"], "layers 0: give 1 or more"),  # was written
])
def test_init_draft_and_make_tiny_bad_shapes_are_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists(), err


def test_generate_compare_reports_the_speedup_against_plain_decoding(env, capsys):
    assert main(gen_args(env, **{"--method": "sparrow"}) + ["--compare", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cmp = res["compare"]
    assert cmp["identical"] and cmp["ar"]["token_ids"] == res["token_ids"] and cmp["ar"]["method"] == "ar"
    assert cmp["tau"] == res["tau"] and cmp["dsr"] > 0 and cmp["esr"] > 0
    assert main(gen_args(env, **{"--method": "sparrow"}) + ["--compare"]) == 0
    err = capsys.readouterr().err
    assert "[ar]" in err and "sparrow against plain decoding: tau" in err and "identical to plain decoding" in err
    assert main(gen_args(env, **{"--method": "ar"}) + ["--compare"]) == 2
    assert "--compare sets a speculative method" in capsys.readouterr().err


def test_check_hf_with_the_checkpoints_generation_config(env, tmp_path, capsys, monkeypatch):
    """A checkpoint whose generation_config sets a repetition penalty (as Qwen2.5-VL-7B-Instruct's does, 1.05) and a
    setting Sparrow does not apply (no_repeat_ngram_size): Sparrow applies the penalty by default, as `generate` does,
    and loading says that the other one is left out; --check-hf decodes with transformers' generate with the penalty
    and without the other setting and finds Sparrow's output identical; so does bench's hf-assisted baseline.
    --repetition-penalty 1.0 switches the penalty off on both sides."""
    import shutil

    import sparrow
    from sparrow.targets.base import Target

    path = str(tmp_path / "penalised")
    shutil.copytree(env["target"], path)
    cfg = json.load(open(os.path.join(path, "generation_config.json")))
    json.dump({**cfg, "repetition_penalty": 1.5, "no_repeat_ngram_size": 1},
              open(os.path.join(path, "generation_config.json"), "w"))
    args = gen_args(env, **{"--target": path, "--method": "sparrow"}) + ["--check-hf"]
    assert main(args + ["--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["hf_identical"] is True and res["repetition_penalty"] == 1.5
    assert "generation_config sets no_repeat_ngram_size 1, which Sparrow's decoding does not apply" in cap.err
    target = sparrow.load_target(path)
    inputs = target.prepare(env["video"], "Describe the video.", num_frames=8, max_pixels=56 * 56)
    L = inputs["input_ids"].shape[1]

    def hf(**kw):
        return target.model.generate(**inputs, max_new_tokens=12, do_sample=False, **kw)[0, L:].tolist()

    assert res["token_ids"] == hf(no_repeat_ngram_size=0) == target.hf_greedy(inputs, 12)
    assert res["token_ids"] != hf(no_repeat_ngram_size=0, repetition_penalty=1.0)  # the penalty was applied
    assert target.model.generation_config.no_repeat_ngram_size == 1  # put back after the reference run
    from sparrow.bench import hf_assisted  # bench's transformers baseline decodes with the penalty alone too

    assistant = sparrow.load_target(env["other"]).model
    assert hf_assisted(target, assistant, inputs, 12, 0.0, 0).token_ids == res["token_ids"]
    built = []  # sampled, it warps as Sparrow's sampling does: temperature alone, no top-k 50 of generate's own
    real = type(target.model)._get_logits_processor
    monkeypatch.setattr(type(target.model), "_get_logits_processor",
                        lambda self, *x, **k: built.append(real(self, *x, **k)) or built[-1])
    hf_assisted(target, assistant, inputs, 4, 0.7, 0)
    kinds = {type(p).__name__ for p in built[-1]}
    assert {"TemperatureLogitsWarper", "RepetitionPenaltyLogitsProcessor"} <= kinds and "TopKLogitsWarper" not in kinds
    monkeypatch.undo()
    assert main(args + ["--json", "--repetition-penalty", "1"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["hf_identical"] is True and off["repetition_penalty"] == 1.0
    assert off["token_ids"] == hf(no_repeat_ngram_size=0, repetition_penalty=1.0)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "transformers' generate: identical (12 tokens)" in err and "| repetition penalty 1.5" in err
    monkeypatch.setattr(Target, "hf_greedy", lambda self, inputs, n, stop=None, rp=None: res["token_ids"][:5] + [0] * 7)
    assert main(args) == 1 and "transformers' generate: DIFFERS from token 5 on" in capsys.readouterr().err
    assert main(args + ["--temperature", "1"]) == 2 and "--check-hf compares greedy outputs" in capsys.readouterr().err
    assert main(args + ["--repetition-penalty", "-1"]) == 2
    err = capsys.readouterr().err
    assert "repetition penalty must be > 0" in err and "(--repetition-penalty)" in err


def test_speedup_is_per_token():
    from sparrow.timing import Stats, speedup

    base = Stats(method="ar", new_tokens=11, prefill_s=1.0, decode_s=2.0, tokens_per_s=5.0)
    spec = Stats(method="sparrow", new_tokens=21, prefill_s=1.0, decode_s=1.0, tokens_per_s=20.0, tau=3.0)
    x = speedup(spec, base)  # sampled runs of different lengths: 0.5 and 0.05 s a decoded token
    assert x["dsr"] == pytest.approx(4.0) and x["esr"] == pytest.approx((3 / 11) / (2 / 21))
    assert x["saved_s"] == pytest.approx(3 / 11 * 21 - 2) and x["tau"] == 3.0
    one = speedup(Stats(method="sparrow", new_tokens=1, tokens_per_s=0.0), base)  # nothing decoded after the first
    assert math.isnan(one["dsr"]) and math.isnan(one["esr"])


def test_default_sampling_follows_the_checkpoint_and_fits_the_context(env, tmp_path, capsys):
    """Without --num-frames / --fps a video is sampled as the checkpoint's video_preprocessor_config.json says (fps,
    min_frames, max_frames), fewer frames where it would not fit the context; the line on stderr says what was
    taken and how."""
    import shutil

    import sparrow
    from sparrow.video import sample_indices, write_video

    assert len(sample_indices(300, 25.0, None, 2.0)) == 24  # 12 s at 2 fps
    assert len(sample_indices(300, 25.0, None, 2.0, max_frames=16)) == 16
    assert len(sample_indices(30, 25.0, None, 2.0, min_frames=4)) == 4  # 1.2 s: at least 4
    assert len(sample_indices(3, 25.0, None, 2.0, min_frames=4)) == 3  # never more than the video has
    ckpt = str(tmp_path / "t")
    shutil.copytree(env["target"], ckpt)
    with open(os.path.join(ckpt, "video_preprocessor_config.json"), "w") as f:
        json.dump({"fps": 4.0, "min_frames": 2, "max_frames": 6, "max_pixels": 56 * 56}, f)
    long = str(tmp_path / "long.mp4")
    write_video(long, (np.random.RandomState(1).rand(40, 56, 56, 3) * 255).astype(np.uint8), fps=8)  # 5 s
    target = sparrow.load_target(ckpt, device="cpu")
    assert target.sampling_defaults() == {"fps": 4.0, "min_frames": 2, "max_frames": 6}
    assert target.sample_video(long).frames.shape[0] == 6  # 20 at 4 fps, capped at 6
    assert target.sample_video(long, fps=2.0).frames.shape[0] == 10  # an explicit rate is not capped
    assert target.sample_video(long, reserve=target.max_positions - 8).frames.shape[0] <= 4  # 4 tokens a frame pair
    assert main(["generate", "--target", ckpt, "--draft", env["draft"], "--video", long, "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "video: 6 of 40 frames (1.20 fps over 5.0 s; the checkpoint's defaults: 4 fps, 2-6 frames), 56x56 -> " \
           "56x56, 12 visual tokens" in err, err


def test_prompt_file_progress_and_compare_with_sampling(env, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What colour is the square?\n")
    args = gen_args(env, **{"--prompt-file": str(prompt)})
    assert main(args + ["--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)  # stdout holds the one object; the progress went to stderr
    assert out["new_tokens"] == 12 and "tok" in cap.err and "video: 8 of 12 frames" in cap.err
    assert main(gen_args(env, **{"--prompt-file": str(tmp_path / "none.txt")})) == 2
    assert "--prompt-file" in capsys.readouterr().err
    # sampled outputs differ by design: --compare says so instead of reporting a failed identity, and exits 0
    assert main(gen_args(env, **{"--temperature": "1.0", "--seed": "2"}) + ["--compare", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["compare"]
    assert res["identical"] is None and "same distribution" in res["note"]


def test_too_long_prompt_names_the_prompts_and_the_videos_shares(env, capsys):
    long = "Describe the video in every detail. " * 40
    assert main(gen_args(env, **{"--target": env["short"], "--prompt": long, "--num-frames": "2"})) == 2
    err = capsys.readouterr().err
    assert "of text" in err and "from the video" in err and "shorten the prompt" in err and "(+0 new)" not in err


def test_help_is_quick_and_describes_every_option():
    """`sparrow --help` imports neither torch nor transformers (it answers in well under a second), and every
    option of every command has a description."""
    import argparse
    import importlib

    code = "import sys; from sparrow.cli import build_parser; build_parser(); " \
           "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from sparrow.cli import SCRIPTS, build_parser

    class Parsed(Exception):
        pass

    parsers = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        raise Parsed(self)

    for name, (module, fn) in SCRIPTS.items():
        argparse.ArgumentParser.parse_args = grab
        try:
            getattr(importlib.import_module(module), fn)([])
        except Parsed as p:
            parsers[name] = p.args[0]
        finally:
            argparse.ArgumentParser.parse_args = real
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update({k: p for k, p in sub.choices.items() if k not in parsers})
    assert set(parsers) >= {"generate", "demo", "bench", "analyze", "train-draft", "regenerate", "capture"}
    bare = [(name, a.option_strings) for name, p in parsers.items() for a in p._actions
            if a.dest != "help" and not a.help]
    assert bare == []
    assert "(default: 256)" in parsers["generate"].format_help()

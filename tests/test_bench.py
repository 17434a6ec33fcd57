"""The benchmark harness on a tiny random target and two tiny buckets: every output is written and well-formed,
the tree auto-configuration is reported, resume skips finished samples, and the lossless check fails loudly
when a method's output differs from ar's."""

import json
import os

import numpy as np
import pytest

import sparrow
from sparrow.bench import Method, parse_methods, run_bench, synthetic_samples
from sparrow.cli import main
from sparrow.errors import SparrowError
from sparrow.tiny import make_tiny_target


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {"target": make_tiny_target(str(d / "t"), "qwen2_5_vl", seed=0, init_std=0.1),
             "assistant": make_tiny_target(str(d / "a"), "qwen2_5_vl", seed=1, layers=1, init_std=0.1),
             "draft": str(d / "draft"), "eagle": str(d / "eagle"), "out": str(d / "out")}
    assert main(["init-draft", "--target", paths["target"], "--out", paths["draft"]]) == 0
    assert main(["init-draft", "--target", paths["target"], "--out", paths["eagle"], "--mode", "eagle"]) == 0
    return paths


def bench_args(env, out, *extra):
    return ["bench", "--target", env["target"], "--drafts", f"sp={env['draft']},eg={env['eagle']}",
            "--synthetic", "1", "--visual-tokens", "64,128", "--max-new-tokens", "8", "--out", out, *extra]


def test_bench_writes_every_output(env):
    out = env["out"]
    methods = "ar,sp,eg,sp:absolute,sp:w4,hf-assisted"
    assert main(bench_args(env, out, "--methods", methods, "--assistant", env["assistant"])) == 0
    for f in ("samples.jsonl", "summary.json", "table.md", "tau.png", "dsr.png", "cycle.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
        if f.endswith(".png"):
            assert open(os.path.join(out, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    names = methods.split(",")
    assert sorted((r["bucket"], r["method"]) for r in rows) == sorted((b, m) for b in (64, 128) for m in names)
    for r in rows:
        assert r["visual_tokens"] == r["bucket"] and r["new_tokens"] >= 1 and r["decode_s"] > 0
        assert r["lossless"] is (None if r["method"] == "ar" else True), r
    res = json.load(open(os.path.join(out, "summary.json")))
    assert res["meta"]["dtype"] == "float32" and res["meta"]["frames"] == {"64": 2, "128": 4}
    assert res["meta"]["repetition_penalty"] == 1.0  # the checkpoint's, which every method applies
    for b in ("64", "128"):
        assert list(res["summary"][b]) == names
        for name, s in res["summary"][b].items():
            assert s["tau"] >= 1.0 and s["dsr"] > 0 and s["esr"] > 0 and s["samples"] == 1
            assert s["lossless"] is (None if name == "ar" else True)
        assert res["summary"][b]["ar"]["dsr"] == 1.0 and res["summary"][b]["ar"]["tau"] == 1.0
    for r in rows:  # auto tree: each speculative run reports the policy's verify costs and choices
        if r["method"] in ("sp", "eg", "sp:absolute", "sp:w4"):
            assert set(r["policy"]["verify_ms"]) == {"0", "4", "8", "16", "30"}
            choices = {int(k): v for k, v in r["policy"]["choices"].items()}
            assert r["tree_tokens"] == max(choices, key=choices.get) and sum(choices.values()) >= 1
    table = open(os.path.join(out, "table.md")).read().splitlines()
    assert len(table) == 2 + 2 * len(names) and table[0].startswith(
        "| visual tokens | method | samples | tau | tau/cycle | DSR | bound | ESR")


def test_bench_resume_skips_finished_samples(env, tmp_path):
    out = str(tmp_path / "r")
    assert main(bench_args(env, out, "--methods", "ar,sp", "--tree", "4,2,4")) == 0
    before = open(os.path.join(out, "samples.jsonl")).read()
    with open(os.path.join(out, "samples.jsonl"), "a") as f:
        f.write('{"torn')  # an interrupted write
    assert main(bench_args(env, out, "--methods", "ar,sp", "--tree", "4,2,4", "--resume")) == 0
    assert open(os.path.join(out, "samples.jsonl")).read().startswith(before)
    res = json.load(open(os.path.join(out, "summary.json")))
    assert res["summary"]["64"]["sp"]["samples"] == 1 and res["summary"]["64"]["sp"]["tree_tokens"] == 4


class WrongMethod(Method):
    """A speculative method with a bug: its last token differs from the target's."""

    def run(self, *args, **kwargs):
        out = super().run(*args, **kwargs)
        out.token_ids = out.token_ids[:-1] + [(out.token_ids[-1] + 1) % 50]
        return out


def test_lossless_check_fails_loudly(env, tmp_path):
    target = sparrow.load_target(env["target"], device="cpu")
    good = parse_methods("ar,sp", {"sp": env["draft"]}, target, None)
    bad = WrongMethod("buggy", "spec", draft=good[1].draft, mode="sparrow")
    out = str(tmp_path / "bad")
    with pytest.raises(SparrowError, match="lossless check failed: buggy differ from ar on 2 sample"):
        run_bench(target, good + [bad], [64, 128], lambda n: synthetic_samples(1, n, 0), out, max_new_tokens=6,
                  tree=sparrow.TreeConfig(4, 2, 4), progress=False)
    rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
    assert [r["lossless"] for r in rows if r["method"] == "buggy"] == [False, False]
    assert all(r["lossless"] for r in rows if r["method"] == "sp")
    res = json.load(open(os.path.join(out, "summary.json")))  # results are still written
    assert res["summary"]["64"]["buggy"]["lossless"] is False
    assert "| buggy |" in open(os.path.join(out, "table.md")).read() and "NO |" in open(os.path.join(out, "table.md")).read()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "ar,nope"], "no draft named 'nope'"),
    (["--methods", "ar,sp:wide"], "unknown variant 'wide'"),
    (["--methods", "ar,hf-assisted"], "hf-assisted needs --assistant"),
    (["--visual-tokens", "lots"], "--visual-tokens 'lots'"),
    (["--tree", "8,5"], "--tree '8,5'"),
    (["--temperature", "-1"], "temperature must be 0 (greedy) or more"),
    (["--synthetic", "0"], "--synthetic '0': give positive whole numbers"),
    (["--synthetic", "2,2,2"], "give one count, or one per bucket (2)"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give 1 or more"),
    (["--warmup", "-1"], "--warmup -1: give 0 or more"),
])
def test_bench_bad_input_is_one_line(env, tmp_path, capsys, extra, message):
    assert main(bench_args(env, str(tmp_path / "x"), *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


class CountedMethod(Method):
    """A method that counts its runs."""

    runs = 0

    def run(self, *args, **kwargs):
        CountedMethod.runs += 1
        return super().run(*args, **kwargs)


def test_warmup_runs_each_method_untimed_first(env, tmp_path):
    target = sparrow.load_target(env["target"], device="cpu")
    methods = parse_methods("ar,sp", {"sp": env["draft"]}, target, None)
    counted = CountedMethod("counted", "spec", draft=methods[1].draft, mode="sparrow")
    for warmup, runs in ((0, 2), (2, 6)):  # 2 buckets x 1 clip: one timed run each, plus `warmup` untimed
        CountedMethod.runs = 0
        out = str(tmp_path / f"w{warmup}")
        res = run_bench(target, methods + [counted], [64, 128], lambda n: synthetic_samples(1, n, 0), out,
                        max_new_tokens=6, tree=sparrow.TreeConfig(4, 2, 4), progress=False, warmup=warmup)
        assert CountedMethod.runs == runs and res["meta"]["warmup"] == warmup
        rows = [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))]
        assert len(rows) == 6 and all(r["lossless"] for r in rows if r["method"] != "ar")


def test_paired_differences_and_bound():
    from sparrow.bench import paired, summarise

    rows = []
    for i, (t_sp, t_x, d_sp, d_x) in enumerate([(4.0, 3.0, 1.0, 2.0), (5.0, 3.5, 1.0, 1.0), (3.0, 2.5, 2.0, 2.0)]):
        base = {"bucket": 512, "sample": f"s{i}", "visual_tokens": 512, "new_tokens": 11, "prefill_s": 0.1,
                "draft_ms_per_cycle": 1.0, "verify_ms_per_cycle": 3.0, "tree_tokens": 8, "peak_memory_mb": 0,
                "lossless": True, "cycles": 3}
        rows += [{**base, "method": "ar", "tau": 1.0, "decode_s": 0.2, "cycles": 10, "draft_ms_per_cycle": 0.0,
                  "verify_ms_per_cycle": 20.0, "tree_tokens": 0, "lossless": None},
                 {**base, "method": "sparrow", "tau": t_sp, "decode_s": 0.2 / d_sp},
                 {**base, "method": "x", "tau": t_x, "decode_s": 0.2 / d_x}]
    p = paired(rows, 512, "x", "sparrow")
    assert p["n"] == 3 and p["tau_diff"] == -1.0 and p["dsr_diff"] == round(1 / 3, 3)
    assert p["tau_se"] == round(float(np.std([-1.0, -1.5, -0.5], ddof=1) / np.sqrt(3)), 3)
    s = summarise(rows, "sparrow")["512"]
    assert s["x"]["vs_baseline"] == p and "vs_baseline" not in s["sparrow"] and "vs_baseline" not in s["ar"]
    rows[2] = {**rows[2], "spec_cycles": 2, "spec_tokens": 9}  # 2 cycles of 4.5 tokens and 1 plain step
    rows[5] = {**rows[5], "spec_cycles": 1, "spec_tokens": 4}
    assert summarise(rows, "sparrow")["512"]["x"]["tau_spec"] == round(13 / 3, 3)
    # ar takes 0.2 s for 10 tokens after the first: 20 ms a step; a 4 ms cycle at tau 10 / 3 allows 16.7x
    assert s["x"]["tau"] == round(10 / 3, 3) and s["x"]["bound"] == round(10 / 3 * 20.0 / 4.0, 3)
    assert paired(rows[:3], 512, "x", "sparrow") is None  # one sample: no standard error


def test_one_prefill_serves_every_method(env):
    """generate(prompt=) decodes exactly as a fresh prefill does, for every method in any order, and bench
    prefills each sample once (per-bucket clip counts)."""
    import sparrow
    from sparrow.bench import build_inputs, frames_for

    target = sparrow.load_target(env["target"])
    draft = sparrow.load_draft(env["draft"], target)
    eagle = sparrow.load_draft(env["eagle"], target)
    inputs = build_inputs(target, synthetic_samples(1, frames_for(target, 128), 0)[0], frames_for(target, 128))
    prompt = sparrow.prefill_prompt(target, inputs, 12)
    for d, method in ((draft, "sparrow"), (None, "ar"), (eagle, "eagle"), (draft, "sparrow")):
        fresh = sparrow.generate(target, d, inputs, max_new_tokens=12, method=method, tree=sparrow.TreeConfig(4, 3, 8))
        shared = sparrow.generate(target, d, inputs, max_new_tokens=12, method=method, prompt=prompt,
                                  tree=sparrow.TreeConfig(4, 3, 8))
        assert shared.token_ids == fresh.token_ids and shared.stats.tau == fresh.stats.tau, method
    with pytest.raises(sparrow.SparrowError, match="room for .* call prefill_prompt"):
        sparrow.generate(target, None, inputs, max_new_tokens=60, method="ar", prompt=prompt)
    other = build_inputs(target, synthetic_samples(2, frames_for(target, 128), 0)[1], frames_for(target, 128))
    assert other["input_ids"].shape == inputs["input_ids"].shape  # the same length, another video
    with pytest.raises(sparrow.SparrowError, match="prefilled for other inputs"):
        sparrow.generate(target, None, other, max_new_tokens=6, method="ar", prompt=prompt)
    calls = []
    real = target.prefill
    target.prefill = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        methods = parse_methods("ar,sp,eg", {"sp": env["draft"], "eg": env["eagle"]}, target, None)
        res = run_bench(target, methods, [64, 128], lambda n: synthetic_samples({2: 2, 4: 1}[n], n, 0),
                        str(env["out"]) + "-shared", max_new_tokens=6, progress=False, baseline="sp")
    finally:
        target.prefill = real
    assert len(calls) == 3  # 2 + 1 samples, one prefill each, whatever the number of methods
    assert res["summary"]["64"]["eg"]["vs_baseline"]["n"] == 2 and res["summary"]["128"]["eg"]["vs_baseline"] is None

"""vLLM serving (sparrow.serving, sparrow.vllm_plugin), in an environment from scripts/install-vllm.sh; skipped where
vLLM is not installed (.ci/run builds one and runs these there).

One engine per method on the embedded target (plain, sparrow draft, eagle draft), each serving one batch of requests
with different videos at two lengths: greedy speculative output equals vLLM's plain decoding token for token, the
sparrow draft's first passes hold no visual entry, and vLLM agrees with this package's HF engine on the same frames.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

vllm = pytest.importorskip("vllm")

import sparrow  # noqa: E402
from sparrow import bench, defaults, serving  # noqa: E402

NEW = 48
LENGTHS = (512, 2048)  # visual tokens
CLIPS = 2  # a length


@pytest.fixture(scope="module")
def target():
    return sparrow.load_target(None, device="cpu")


@pytest.fixture(scope="module")
def requests(target):
    out = []
    for vt in LENGTHS:
        frames = bench.frames_for(target, vt)
        for s in bench.synthetic_samples(CLIPS, frames, seed=3):
            video = bench.sample_video(s, frames)
            side = bench.SIDE * bench.SIDE
            out.append((serving.request(target, video, s.prompt, max_pixels=side, min_pixels=side),
                        target.prepare(video, s.prompt, max_pixels=side, min_pixels=side)))
    return out


@pytest.fixture(scope="module")
def outputs(target, requests):
    """{method: (results, proposer passes)} for ar, sparrow, eagle: one engine each, one batch of all requests."""
    from sparrow.vllm_plugin import SparrowProposer

    res = {}
    for method in ("ar", "sparrow", "eagle"):
        llm = serving.make_engine(defaults.TARGET, defaults.draft_path(method) if method != "ar" else None,
                                  method=method, max_model_len=4096, num_speculative_tokens=4)
        SparrowProposer.passes.clear()
        res[method] = (serving.generate_vllm(llm, target, [r for r, _ in requests], max_new_tokens=NEW,
                                             method=method), list(SparrowProposer.passes))
        serving.shutdown_engine(llm)
    return res


def test_speculative_output_equals_vllm_plain_decoding(outputs):
    plain = [r["token_ids"] for r in outputs["ar"][0]]
    assert all(len(p) > 10 for p in plain)
    for method in ("sparrow", "eagle"):
        assert [r["token_ids"] for r in outputs[method][0]] == plain, f"{method}: differs from vLLM's plain decoding"
        assert outputs[method][0][0]["tau"] >= 2.0, f"{method}: the draft was hardly accepted"


def test_sparrow_first_pass_holds_no_visual_entry(outputs, requests):
    passes = outputs["sparrow"][1]
    assert passes and all(p["mode"] == "sparrow" and p["visual_kept"] == 0 for p in passes)
    visual = sum(r.visual_tokens for r, _ in requests)
    # exactly the visual entries were dropped (a prefill chunk that ends inside a video keeps its last entry)
    assert sum(p["entries"] - p["kept"] + p["chunk_ends"] for p in passes) == visual
    eagle = outputs["eagle"][1]  # the baseline keeps them
    assert sum(p["visual_kept"] for p in eagle) == visual and all(p["mode"] == "eagle" for p in eagle)


def test_vllm_agrees_with_the_hf_engine(target, requests, outputs):
    """The same prompt tokens in both engines; the same greedy answer where both give the target the same positions:
    after a video, transformers 5.x numbers text from the largest row or column position, vLLM (as Qwen's reference
    code) from the largest position on any axis, so the two differ once a video has more temporal groups than rows or
    columns of merged patches (here from 18 frames of 224 x 224)."""
    side = bench.SIDE // (14 * 2)  # merged patches a row
    compared = 0
    for (req, inputs), r in zip(requests, outputs["ar"][0]):
        assert r["prompt_token_ids"] == inputs["input_ids"][0].tolist()
        assert r["visual_tokens"] == req.visual_tokens == int(target.visual_mask(inputs["input_ids"][0]).sum())
        grid = inputs["video_grid_thw"][0].tolist()
        if grid[0] <= side:
            hf = sparrow.generate(target, None, inputs, max_new_tokens=NEW, method="ar")
            assert hf.token_ids == r["token_ids"], "the same frames, sizes and positions: the same greedy answer"
            compared += 1
    assert compared >= 2


def test_make_engine_refuses_bad_drafts_in_one_line(tmp_path):
    with pytest.raises(sparrow.SparrowError, match="not a Sparrow draft"):
        serving.make_engine(defaults.TARGET, str(tmp_path), method="sparrow")
    with pytest.raises(sparrow.SparrowError, match="eagle draft"):
        serving.make_engine(defaults.TARGET, defaults.draft_path("eagle"), method="sparrow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_a_chat_request_with_a_video(tmp_path):
    """`sparrow serve` on localhost: a chat completion about a shipped clip (file:// URL), speculation counted in
    the server's metrics."""
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sparrow.cli", "serve", "--port", str(port), "--max-model-len",
                             "4096", "--media-dir", defaults.CLIPS], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
                time.sleep(1)
        body = {"model": "sparrow", "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": "file://" + defaults.example_clip(1)}},
                    {"type": "text", "text": "Describe the video."}]}]}
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["message"]["content"]
        assert len(answer.split()) > 5
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        drafts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and sum(drafts) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)

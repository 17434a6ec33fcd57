"""embedded/build.sh, dry: bash runs the whole script with `sparrow` and `python` replaced by a recorder, then
every recorded command line goes through its own argument parser, and each stage must start from what an earlier
stage wrote. A misspelt flag or path fails here instead of hours into a rebuild."""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedded.__main__ import COMMANDS
from sparrow.cli import SCRIPTS

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `sparrow` and `python`: appends its argv to CALLS and writes the files the script reads afterwards
# (a stage's export, a draft's weights, a capture's answers), so that bash runs on through `cp`.
RECORDER = r"""
import json, os, sys
argv = sys.argv[1:]
if argv[:2] == ["-m", "embedded"]:  # python -m embedded train ... is recorded as ["embedded-train", ...]
    argv = ["embedded-" + argv[2]] + argv[3:]
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\n")
def flag(name):
    return argv[argv.index(name) + 1] if name in argv else None
for d in (flag("--export"), flag("--out") if argv[0] in ("train-draft", "embedded-train") else None):
    if d:
        os.makedirs(d, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            open(os.path.join(d, name), "a").close()
if argv[0] == "capture":
    os.makedirs(flag("--out"), exist_ok=True)
    open(flag("--answers"), "a").close()
if argv[:2] == ["-m", "sparrow.synthetic.dataset"]:
    os.makedirs(flag("--out"), exist_ok=True)
    open(os.path.join(flag("--out"), "train.jsonl"), "a").close()
if argv[0] == os.environ.get("FAIL"):  # a crash after writing part of its output
    sys.exit(3)
if os.environ.get("EDIT") and not os.path.exists(os.environ["EDIT"] + ".done"):  # someone edits the script meanwhile
    text = open(os.environ["EDIT"]).read()
    open(os.environ["EDIT"], "w").write(text.replace("set -euo pipefail", "set -euo pipefail\n" + "#" * 300, 1))
    open(os.environ["EDIT"] + ".done", "w").close()
"""


class Parsed(Exception):
    """Raised by the patched parse_args once a command line has parsed: the command itself never runs."""


def run_script(tmp_path, name: str = "build.sh", args: list[str] | None = None,
               **env) -> subprocess.CompletedProcess:
    """bash runs a copy of embedded/NAME in tmp_path with the recorder as `sparrow` and `python`; `args` are its
    arguments (default: tmp_path/run), `env` adds or overrides variables (FAIL, EDIT, FROM, ...). The calls are
    recorded in tmp_path/calls.jsonl."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / name
    script.write_text((ROOT / "embedded" / name).read_text())
    rec = tmp_path / "recorder.py"
    rec.write_text(RECORDER)
    full = {**os.environ, "CALLS": str(tmp_path / "calls.jsonl"), "SPARROW": f"{sys.executable} {rec}",
            "PY": f"{sys.executable} {rec}", "ASSETS": str(tmp_path / "assets"), "RESULTS": str(tmp_path / "results"),
            "FAIL": "", "EDIT": "", **env}
    args = [str(tmp_path / "run")] if args is None else args
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def dry_run(tmp_path, fail: str = "", edit: bool = False) -> list[list[str]]:
    done = run_script(tmp_path, FAIL=fail, EDIT=str(tmp_path / "build.sh") if edit else "")
    assert (done.returncode != 0) == bool(fail), done.stderr
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def parses(argv: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace that `sparrow ARGV` (`python -m MODULE ARGS`, `python -m embedded X ARGS` recorded as
    ["embedded-X", ARGS]) parses to; SystemExit if it does not parse."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if argv[0].endswith(".py"):  # a script of the repository (benchmarks/...)
        spec = importlib.util.spec_from_file_location("script", ROOT / argv[0])
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        run, args = script.main, argv[1:]
    else:
        if argv[0] == "-m":
            module, fn, args = argv[1], "main", argv[2:]
        elif argv[0].startswith("embedded-"):
            module, fn, args = COMMANDS[argv[0][len("embedded-"):]], "main", argv[1:]
        else:
            (module, fn), args = SCRIPTS[argv[0]], argv[1:]
        run = getattr(importlib.import_module(module), fn)
    with pytest.raises(Parsed) as parsed:
        run(args)
    monkeypatch.undo()
    return parsed.value.args[0]


def test_build_script_runs_dry_and_every_command_parses(tmp_path, monkeypatch):
    calls = dry_run(tmp_path)
    run = str(tmp_path / "run")
    kinds = [c[0] if c[0] != "-m" else c[1] for c in calls]
    # the four parts: the target chain, the example clips, the drafts' data and drafts, the measurements
    assert kinds.count("embedded-train") == 23  # 1a-1x, 2dc, 2ec (stops included) and the assistant
    for kind in ("embedded-examples", "sparrow.synthetic.dataset", "capture", "train-draft",
                 "embedded-evaluate", "bench", "analyze", "benchmarks/own_video.py"):
        assert kind in kinds, kind
    assert kinds.count("train-draft") == 4
    exported, outs, captured = [], [], []
    for argv in calls:
        a = parses(argv, monkeypatch)
        if argv[0] == "capture":  # the two parts of one capture, with every draft's config and their own answers
            assert len(a.config) == 4 and a.answers and a.part in ("0/2", "1/2"), argv
            captured.append(a.out)
        if argv[0] == "train-draft":  # each draft trains from that capture, resumable
            assert a.data in captured and a.resume, argv
        if argv[0] != "embedded-train":
            continue
        # a stage starts from an export (and probes) written before it, never from a path nothing writes
        if a.init:
            assert a.init in exported, f"--init {a.init} is not exported by an earlier stage"
        if a.init_probes:
            assert os.path.dirname(os.path.dirname(a.init_probes)) in outs, a.init_probes
        if a.export:
            exported.append(a.export)
        outs.append(a.out)
        assert a.resume, f"{a.out}: every stage must resume, or a rerun of the script starts it over"
    # the chain ends in the export that becomes the shipped target
    assert f"{run}/target_export" in exported
    assert sum(1 for a in exported if a.startswith(f"{run}/target")) == 15  # 1a-1x, 2dc, 2ec, the last as target_export


def test_build_script_dry_run_catches_a_bad_flag(tmp_path, monkeypatch):
    """The check above can fail: a misspelt flag in a stage's command line does not parse."""
    calls = dry_run(tmp_path)
    argv = next(c for c in calls if c[0] == "embedded-train")
    with pytest.raises(SystemExit):
        parses(argv + ["--grounded-wieght", "4"], monkeypatch)


def test_build_script_stops_when_a_background_job_fails(tmp_path):
    """The capturing processes run in the background: one failing must stop the script before the drafts train
    on half the data."""
    calls = dry_run(tmp_path, fail="capture")
    kinds = [c[0] for c in calls]
    assert kinds.count("capture") == 2 and "train-draft" not in kinds


def test_build_script_runs_as_it_was_when_it_started(tmp_path):
    """Editing the script during a rebuild (a `git pull`, say) must not change what the running bash executes."""
    def calls(name, edit):  # sorted: the background jobs record in either order
        return sorted(json.dumps(c).replace(str(tmp_path / name), "") for c in dry_run(tmp_path / name, edit=edit))

    assert calls("edited", True) == calls("plain", False)


def test_build_script_to_stops_after_that_stage(tmp_path):
    """TO=1 (the from-scratch check of the recipe) runs the target chain and its example clips, then stops before the
    drafts' data and the measurements; TO=2 stops after the drafts' data."""
    done = run_script(tmp_path, TO="1")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    kinds = [c[0] if c[0] != "-m" else c[1] for c in calls]
    assert kinds.count("embedded-train") == 22 and kinds[-1] == "embedded-examples"
    assert (tmp_path / "assets" / "target" / "config.json").exists()
    done = run_script(tmp_path / "to2", TO="2", FROM="2")  # the drafts' data, then stop before the drafts
    assert done.returncode == 0, done.stderr
    kinds = [json.loads(line)[0] for line in (tmp_path / "to2" / "calls.jsonl").read_text().splitlines()]
    assert kinds.count("capture") == 2 and "train-draft" not in kinds and "embedded-evaluate" not in kinds


def test_build_script_stage_args_reach_every_stage_of_the_target(tmp_path, monkeypatch):
    """STAGE_ARGS (e.g. a GPU's --device cuda --workers N) go to all 22 training runs of the target, 1a to 2ec,
    and to nothing else; each command line still parses."""
    done = run_script(tmp_path, STAGE_ARGS="--device cuda --workers 2")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    staged = [c for c in calls if c[-4:] == ["--device", "cuda", "--workers", "2"]]
    assert len(staged) == 22 and all(c[0] == "embedded-train" and "--layers" not in c for c in staged)
    assert all(parses(c, monkeypatch).workers == 2 for c in staged)
    assert sum("--workers" in c for c in calls) == 22  # not the assistant, not the drafts


@pytest.mark.parametrize("env, message", [({"FROM": "9"}, "FROM=9: give 1"),
                                          ({"FROM": "4", "TO": "1"}, "TO=1: give a stage from FROM=4 to 4"),
                                          ({"SPARROW": "/nonexistent/sparrow"}, "/nonexistent/sparrow not found")])
def test_build_script_bad_setting_is_one_line_before_any_work(tmp_path, env, message):
    done = run_script(tmp_path, **env)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "run").exists()

"""Where does a target fail on the events of a scene of several objects: seeing them, or writing them?

    .venv/bin/python scripts/event_probes.py [--target DIR] [--clips 120] [--probe-clips 450]
        [--out benchmarks/results/event_probes.json]          (needs scikit-learn)

Two measurements on held-out clips of two or three objects at 512 visual tokens (16 frames of 224 px, 4 fps; seeds
apart from the evaluation's), both without generating:

1. Asked. Each object's own question, "What happens to the red circle?" ("It appears." / "Nothing happens to
   it."), is asked right after the video (the first turn), and again after the clip's true description (a second
   turn); so is "Does anything appear, disappear or change colour?" ("Yes: ..." / "No, ..."). For each, P(yes) =
   P("It") / (P("It") + P("Nothing")) (or "Yes" against "No") at the answer's first token, and how well it
   separates the objects (or clips) with an event from those without: AUC, and the top-1 answer's accuracy on
   each side. Right after the video the answer can only come from the frames; after the description it can also be
   copied from the text, which states every event.
2. Read. A linear probe (logistic regression, fit on two thirds of the clips, scored on the rest) on every layer's
   hidden state at three places of the teacher-forced description: <|vision_end|>, the last token of the prompt
   (where the description's first word is predicted) and the "." that ends the description's first sentence,
   before any object is named. It predicts whether some object appears, disappears or changes colour (AUC), and,
   for the clips with an event, the first event's object's colour and the event's kind (accuracy; guessing one of
   the clip's own colours scores `colour_chance`).
3. Named. The same kind of probe, per object, at the first colour word of the teacher-forced description that
   names that object alone (the objects of the clips of measurement 2, split by clip): whether that object
   appears, disappears or changes colour (AUC per layer). Whether the target has gathered one object's own event
   where it names it, whatever its training made it write there.

Writes JSON (per measurement, per layer) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def asked(target, clips: int, bucket: int = 512, first_seed: int = 700_000_000) -> dict:
    """Measurement 1: {"object_first", "object_after", "clip_first", "clip_after"} -> {items, positives, auc,
    yes_when_yes, no_when_no}."""
    import torch

    from sparrow.synthetic.evaluate import held_out_prepare, held_out_video, truth_of
    from sparrow.synthetic.text import describe, mention, target_wording
    from sparrow.training.losses import extend_inputs

    tok = target.tokenizer
    first = {w: tok(w, add_special_tokens=False)["input_ids"][0] for w in ("It", "Nothing", "Yes", "No")}
    wording = target_wording(target.path)
    found: dict = {k: [] for k in ("object_first", "object_after", "clip_first", "clip_after")}

    def p_yes(inputs, extra, yes, no):
        with torch.no_grad():
            logits = target.model(**extend_inputs(inputs, extra)).logits[0, -1].float()
        p = logits.softmax(-1)
        return float(p[yes] / (p[yes] + p[no])), int(logits.argmax()) == yes

    seed, done = first_seed, 0
    while done < clips:
        seed += 1
        truth = truth_of(seed, bucket)
        if len(truth["objects"]) < 2:
            continue
        done += 1
        description = describe(truth, seed, **wording)
        asks = [(f"What happens to the {mention(o, full=False)}?", any(e["object"] == o["id"] for e in truth["events"]),
                 "object", "It", "Nothing") for o in truth["objects"]]
        asks.append(("Does anything appear, disappear or change colour?", bool(truth["events"]), "clip", "Yes", "No"))
        _, video = held_out_video(bucket, seed)
        described = held_out_prepare(target, video, "Describe the video.")
        for question, has_event, kind, yes, no in asks:
            inputs = held_out_prepare(target, video, question)
            found[kind + "_first"].append((has_event, *p_yes(inputs, [], first[yes], first[no])))
            inputs = described
            turn = tok(f"{description}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
            found[kind + "_after"].append((has_event, *p_yes(inputs, turn, first[yes], first[no])))
    out = {}
    for k, rows in found.items():
        label = np.array([r[0] for r in rows])
        p = np.array([r[1] for r in rows])
        top = np.array([r[2] for r in rows])
        out[k] = {"items": len(rows), "positives": int(label.sum()),
                  "auc": float((p[label][:, None] > p[~label][None]).mean()
                               + 0.5 * (p[label][:, None] == p[~label][None]).mean()),
                  "yes_when_yes": float(top[label].mean()), "no_when_no": float((~top[~label]).mean())}
    return out


def read(target, clips: int, bucket: int = 512, first_seed: int = 500_000_000) -> dict:
    """Measurements 2 and 3: {place: {"any_event": [AUC per layer], "appears", "disappears", "changes colour",
    "colour": [accuracy per layer], "kind": [...]}, "clips", "event_clips", "colour_chance", "named": {"any_event":
    [AUC per layer], "objects", "with_event", "scored"}}."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from sparrow.synthetic.evaluate import held_out_inputs
    from sparrow.synthetic.text import describe, target_wording
    from sparrow.synthetic.train_target import ColourWords, named_objects
    from sparrow.synthetic.world import COLOURS, EVENT_TYPES
    from sparrow.training.losses import extend_inputs

    tok = target.tokenizer
    wording = target_wording(target.path)
    vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
    stop = tok(".", add_special_tokens=False)["input_ids"][0]
    places = ("vision_end", "prompt_end", "first_sentence_end")
    feats: dict = {k: [] for k in places}
    labels = []
    objects = []  # (clip index, whether the object has an event, (layers + 1, hidden) at its colour word)
    colour_words = ColourWords(tok)
    seed = first_seed
    while len(labels) < clips:
        seed += 1
        clip, inputs = held_out_inputs(target, bucket, seed, "Describe the video.")
        truth = clip.truth
        if len(truth["objects"]) < 2:
            continue
        kinds = [e["type"] for e in truth["events"]]
        by_id = {o["id"]: o for o in truth["objects"]}
        colour = list(COLOURS).index(by_id[truth["events"][0]["object"]]["colour"]) if kinds else -1
        labels.append([bool(kinds)] + [k in kinds for k in EVENT_TYPES]
                      + [colour, EVENT_TYPES.index(kinds[0]) if kinds else -1, len(truth["objects"])])
        answer = torch.tensor(tok(describe(truth, seed, **wording), add_special_tokens=False)["input_ids"])
        n = inputs["input_ids"].shape[1]
        forced = extend_inputs(inputs, answer.tolist())
        ids = forced["input_ids"]
        with torch.no_grad():
            out = target.model(**forced, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)[:, 0].float()  # (layers + 1, L, hidden)
        at = {"vision_end": int((ids[0] == vision_end).nonzero()[0]), "prompt_end": n - 1,
              "first_sentence_end": n + int((answer == stop).nonzero()[0])}
        for k in places:
            feats[k].append(hidden[:, at[k]].numpy())
        # 3: each object at the first colour word that names it alone in the description
        named = named_objects(colour_words(answer), truth)
        for oid in sorted({int(v) - 1 for v in named[named > 0].tolist()}):
            r = int((named == oid + 1).nonzero()[0])
            objects.append((len(labels) - 1, any(e["object"] == oid for e in truth["events"]),
                            hidden[:, n + r].numpy()))
    y = np.array(labels)
    fit = int(len(y) * 2 / 3)
    events = y[:, 0] == 1
    result: dict = {"clips": len(y), "event_clips": int(events.sum()),
                    "colour_chance": float(np.mean(1 / y[fit:][events[fit:], 6]))}

    def per_layer(x, target_y, rows, score, fit_rows=None):  # fit_rows: a mask over `rows` (default: first 2/3)
        out = []
        for layer in range(x.shape[1]):
            z = x[rows, layer]
            train = np.arange(len(z)) < int(len(z) * 2 / 3) if fit_rows is None else fit_rows
            z = (z - z[train].mean(0)) / (z[train].std(0) + 1e-6)
            model = LogisticRegression(C=0.05, max_iter=3000).fit(z[train], target_y[rows][train])
            out.append(round(float(score(model, z[~train], target_y[rows][~train])), 3))
        return out

    auc = lambda m, z, t: roc_auc_score(t, m.decision_function(z))  # noqa: E731
    accuracy = lambda m, z, t: (m.predict(z) == t).mean()  # noqa: E731
    everything = np.arange(len(y))
    for k in places:
        x = np.stack(feats[k])
        result[k] = {name: per_layer(x, y[:, j].astype(int), everything, auc)
                     for j, name in enumerate(("any_event",) + EVENT_TYPES)}
        result[k]["colour"] = per_layer(x, y[:, 4], np.flatnonzero(events), accuracy)
        result[k]["kind"] = per_layer(x, y[:, 5], np.flatnonzero(events), accuracy)
    # per object, split by clip: the objects of the first two thirds of the clips fit, the rest score
    fit_objects = np.array([c < fit for c, _, _ in objects])
    t = np.array([int(e) for _, e, _ in objects])
    result["named"] = {"any_event": per_layer(np.stack([h for _, _, h in objects]), t, np.arange(len(t)), auc,
                                              fit_objects),
                       "objects": len(t), "with_event": int(t.sum()), "scored": int((~fit_objects).sum())}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=None, help="a target directory (default: the embedded one)")
    ap.add_argument("--clips", type=int, default=120,
                    help="clips of two or three objects for measurement 1 (0 skips it: a target not yet trained on "
                         "the per-object question)")
    ap.add_argument("--probe-clips", type=int, default=450, help="clips of two or three objects for measurement 2")
    ap.add_argument("--out", default="benchmarks/results/event_probes.json")
    a = ap.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise SystemExit("event_probes: needs scikit-learn (pip install scikit-learn)") from None
    import torch

    import sparrow
    from sparrow.synthetic.evaluate import weights_digest

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    target = sparrow.load_target(a.target, device="cpu")
    result = {"target": target.path, "weights": weights_digest(target.path), "bucket": 512,
              "asked": asked(target, a.clips) if a.clips else {}, "read": read(target, a.probe_clips)}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in result["asked"].items():
        print(f"asked {k}: {v}")
    for place in ("vision_end", "prompt_end", "first_sentence_end"):
        for k, v in result["read"][place].items():
            print(f"read at {place}, {k}: best {max(v):.3f} (layer {int(np.argmax(v))})")
    named = result["read"]["named"]
    print(f"read at each object's colour word ({named['objects']} objects, {named['with_event']} with an event), "
          f"its own event: best {max(named['any_event']):.3f} (layer {int(np.argmax(named['any_event']))})")
    print(f"colour chance {result['read']['colour_chance']:.3f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

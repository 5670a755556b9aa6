"""Rebuild the shipped assets: the colour-invariant digit classifier and the biased base models.

    python scripts/make_assets.py                 # everything (about 35 min on 2 CPU cores)
    python scripts/make_assets.py --only base_p0.9
    python scripts/make_assets.py --check         # rebuild into a temp folder and compare hashes

Determinism: fixed seeds, deterministic algorithms and one CPU thread (a multi-threaded
reduction may sum in another order). On the same torch build the files come out byte-identical;
`assets/MANIFEST.json` records their sha256 so `--check` can prove it. One thread also lets
the rebuild share a 2-core machine without slowing the other core's work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from invdiff.data import colored_digits  # noqa: E402
from invdiff.io import atomic_write_json, staged_directory  # noqa: E402
from invdiff.metrics import train_digit_classifier  # noqa: E402
from invdiff.training import BaseTrainConfig, train_base  # noqa: E402

ASSETS = os.path.join(ROOT, "invdiff", "assets")
BASE_PS = (0.6, 0.7, 0.8, 0.9, 0.95)  # 0.7 and 0.95: the p sweep of issue 21
# Bases for the settings the defaults were not chosen on (docs/results.md, "The full matrix and the
# held-out settings"): name -> data.
EXTRA_BASES = {
    "base_p0.9_c3": {"p": 0.9, "num_colors": 3},
    "base_thick_p0.9": {"p": 0.9, "attribute": "thickness"},
    # The same budget on balanced data: the quality a perfectly debiased model could have.
    "base_balanced": {"p": 0.5, "num_colors": 2},
    "base_balanced_c3": {"p": 1 / 3, "num_colors": 3},
    "base_thick_balanced": {"p": 0.5, "attribute": "thickness"},
    # Issue 21's two held-out settings of our own: where and how big the digit is.
    "base_position_p0.9": {"p": 0.9, "attribute": "position"},
    "base_position_balanced": {"p": 0.5, "attribute": "position"},
    "base_size_p0.9": {"p": 0.9, "attribute": "size"},
    "base_size_balanced": {"p": 0.5, "attribute": "size"},
}


def training_data(name: str):
    """The biased training split a base is trained on. The white-digit bases (thickness,
    position, size) go through the generic imagefolder path (written to a temporary folder), as
    a user's own data would."""
    data = dict(EXTRA_BASES.get(name) or {"p": float(name.split("_p")[1])})
    attribute = data.pop("attribute", None)
    if attribute is None:
        return colored_digits("train", **data)
    from invdiff.data import load_dataset
    from invdiff.data.layout_digits import layout_digits
    from invdiff.data.stroke_digits import stroke_digits, write_imagefolder

    split = stroke_digits("train", **data) if attribute == "thickness" else layout_digits("train", attribute, **data)
    folder = tempfile.mkdtemp()
    try:
        dataset = load_dataset(write_imagefolder(split, folder))
        dataset.images  # an imagefolder reads its files on first use: before the folder goes
        return dataset
    finally:
        shutil.rmtree(folder)
BASE_CONFIG = BaseTrainConfig()  # the shipped bases are trained at the defaults `invdiff train-base` uses
CLASSIFIER_STEPS = 1500


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def build(name: str, out_root: str) -> dict:
    torch.manual_seed(0)
    target = os.path.join(out_root, name)
    t0 = time.time()
    if name == "digit_classifier":
        # Colours are irrelevant to this classifier (it sees intensity only); p=0.5 is arbitrary.
        result = train_digit_classifier(colored_digits("train", p=0.5), colored_digits("eval"), steps=CLASSIFIER_STEPS)
        with staged_directory(target) as stage:
            result["model"].save_pretrained(stage)
        info = {"eval_accuracy": result["eval_accuracy"]}
    else:
        model = train_base(training_data(name), BASE_CONFIG)
        with staged_directory(target) as stage:
            model.save_pretrained(stage)
        info = {"final_loss": model.meta["final_loss"]}
    info["seconds"] = round(time.time() - t0, 1)
    files = {}
    for dirpath, _, names in os.walk(target):
        for n in sorted(names):
            if n.endswith(".safetensors"):
                full = os.path.join(dirpath, n)
                files[os.path.relpath(full, out_root)] = _sha256(full)
    info["sha256"] = files
    print(f"{name}: {info}", flush=True)
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    names = [f"base_p{p:g}" for p in BASE_PS[::-1]] + list(EXTRA_BASES) + ["digit_classifier"]
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare with MANIFEST.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    manifest_path = os.path.join(ASSETS, "MANIFEST.json")
    manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    if args.check:
        tmp = tempfile.mkdtemp()
        try:
            ok = True
            for name in args.only:
                info = build(name, tmp)
                same = info["sha256"] == manifest.get(name, {}).get("sha256")
                ok &= same
                print(f"{name}: {'identical' if same else 'DIFFERENT'}")
            sys.exit(0 if ok else 1)
        finally:
            shutil.rmtree(tmp)
    for name in args.only:
        info = build(name, ASSETS)
        info["torch"] = torch.__version__
        # Read again just before writing: another make_assets process may have added its entries.
        manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
        manifest[name] = info
        atomic_write_json(manifest_path, manifest)


if __name__ == "__main__":
    main()

"""The model-folders room (issue 22): one `classify` tells the kinds of model folder apart from
which files exist, and loading a model does not depend on the debias orchestration.

The folders here are empty files in the right places: classify reads none of them.
"""
import os

import pytest

from invdiff.model_folders import BASE_META, RUN_META, FolderKind, NotAModelFolder, classify
from invdiff.errors import CheckpointError

from tests.test_sampling_imports import import_graph


def _folder(root, *names):
    """A folder holding `names`: a trailing '/' makes a folder, anything else an empty file."""
    os.makedirs(root, exist_ok=True)
    for name in names:
        path = os.path.join(root, name)
        if name.endswith("/"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
    return str(root)


@pytest.mark.parametrize("names, kind", [
    (["model_index.json", "unet/", "vae/"], FolderKind.SD),
    (["model_index.json", "unet/", "guidance/"], FolderKind.PIPELINE),
    ([RUN_META, "model_index.json", "unet/", "guidance/"], FolderKind.PIPELINE),  # a --copy-base SD run
    ([BASE_META, "unet/", "conditioner/"], FolderKind.BASE),
    (["unet/"], FolderKind.BASE),
    ([RUN_META, "base/", "guidance/"], FolderKind.RUN),
    ([RUN_META, "guidance/"], FolderKind.REFERRING_RUN),
])
def test_classify_tells_every_kind_apart(tmp_path, names, kind):
    assert classify(_folder(tmp_path / "m", *names)) is kind
    assert kind.latent == (kind in (FolderKind.SD, FolderKind.PIPELINE, FolderKind.REFERRING_RUN))


@pytest.mark.parametrize("make", [lambda p: _folder(p, "notes.txt"), lambda p: str(p / "missing")])
def test_anything_else_is_not_a_model_folder_in_one_line(tmp_path, make):
    path = make(tmp_path / "x")
    with pytest.raises(NotAModelFolder) as exc:
        classify(path)
    assert isinstance(exc.value, CheckpointError)
    assert str(exc.value) == f"{path!r} is neither an invdiff base model, a run folder nor a Stable Diffusion folder"


def test_loading_a_model_imports_nothing_of_the_debias_run():
    """Serving loads its models through model_folders.load: it must not pull in training."""
    graph = import_graph()
    seen, todo = set(), ["invdiff.model_folders.load"]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    training_side = {"invdiff.training", "invdiff.environments", "invdiff.calibration", "invdiff.debiasing"}
    assert not seen & training_side, sorted(seen & training_side)


def test_sd_and_base_reference_do_not_import_each_other():
    graph = import_graph()
    assert "invdiff.models.sd" not in graph["invdiff.models.base_reference"]

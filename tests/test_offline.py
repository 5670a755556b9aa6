"""Nothing goes online unless the user asked for it on the command line (invdiff/hub.py).

A run folder that names a hub base loads it from the local hub cache only; a missing path that
reads as a hub id is "does not exist" unless downloads are allowed. Every test here blocks the
network, so that a regression fails at once instead of retrying for a minute."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

# Imported here, not inside the timed calls: the first import of diffusers and transformers takes
# seconds on a busy machine, and the time limits below are about the network, not imports.
import diffusers  # noqa: F401
import huggingface_hub.constants
import transformers  # noqa: F401

import invdiff.hub as hub
from invdiff.errors import CheckpointError, OfflineError
from invdiff.models.base_reference import REFERENCE_KEY, resolve_base
from invdiff.models.sd import LatentDiffusionBase, looks_like_hub_id
from invdiff.pipeline import InvDiffPipeline
from invdiff.model_folders.load import load_base, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAST_S = 2.0  # a refusal that needs no network answers well within this


@pytest.fixture()
def network_attempts(monkeypatch):
    """Every attempt to reach the network in this test, refused and recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("the network is blocked in this test")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (socket, "getaddrinfo")):
        monkeypatch.setattr(owner, name, refuse)
    return attempts


@pytest.fixture()
def hub_state(monkeypatch):
    """hub.py's process-wide state and the hub switches, put back after the test. Starts as a
    library user finds it: set_downloads_allowed never called, no switch set."""
    for name in hub.OFFLINE_SWITCHES:
        monkeypatch.setenv(name, "")  # recorded, so that what the test sets is undone too
        monkeypatch.delenv(name)
    monkeypatch.setattr(hub, "_allowed_by_flag", False)
    monkeypatch.setattr(hub, "_replaced_env", {})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    return monkeypatch


@pytest.fixture()
def hub_cache(tmp_path, hub_state):
    """An empty local hub cache of this test's own."""
    cache = tmp_path / "hub_cache"
    cache.mkdir()
    hub_state.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _hub_run(folder, hub_id="nobody/sd-model"):
    """A run folder that refers to its base by hub id, as debias writes it for a hub base."""
    os.makedirs(os.path.join(folder, "guidance"), exist_ok=True)
    with open(os.path.join(folder, "invdiff_run.json"), "w") as f:
        json.dump({REFERENCE_KEY: {"hub_id": hub_id, "revision": COMMIT}, "vae_factor": 2, "resolution": 16}, f)
    return str(folder)


def _cache_snapshot(cache, hub_id, folder):
    """Put `folder` into the hub cache as `hub_id` at COMMIT, in the hub's own layout."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return str(shutil.copytree(folder, repo / "snapshots" / COMMIT))


def _refused_quickly(call, error, match):
    """`call()` raises `error` in one line matching `match`, within FAST_S seconds."""
    start = time.perf_counter()
    with pytest.raises(error, match=match) as caught:
        call()
    assert time.perf_counter() - start < FAST_S
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def test_a_run_folder_naming_a_hub_base_not_in_the_cache_is_refused_without_the_network(
        tmp_path, hub_state, hub_cache, network_attempts, capsys):
    from invdiff.cli import main

    run = _hub_run(tmp_path / "run")
    for load in (resolve_base, load_model, LatentDiffusionBase.from_pretrained, InvDiffPipeline.from_pretrained):
        message = _refused_quickly(lambda: load(run), CheckpointError, "not in the local hub cache")
        assert repr(run) in message and "'nobody/sd-model'" in message and COMMIT in message
        assert "hf download nobody/sd-model --revision " + COMMIT in message
    # The command line, even with downloads allowed: the run folder chose the id, not the user.
    hub_state.setenv("HF_HUB_OFFLINE", "0")
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["sample", "--model", run, "--prompt", "a red square", "--num", "1", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 2
    assert time.perf_counter() - start < FAST_S
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert len(lines) == 1 and "not in the local hub cache" in lines[0], lines
    assert network_attempts == []


def test_a_run_folder_naming_a_hub_base_loads_it_from_the_cache_offline(tiny_sd, tmp_path, hub_cache, network_attempts):
    run = _hub_run(tmp_path / "run")
    snapshot = _cache_snapshot(hub_cache, "nobody/sd-model", tiny_sd)
    assert resolve_base(run) == (snapshot, None)
    base = LatentDiffusionBase.from_pretrained(run)
    assert base.meta["source"] == snapshot
    # A snapshot with only some of the parts is as good as none.
    shutil.rmtree(os.path.join(snapshot, "unet"))
    _refused_quickly(lambda: resolve_base(run), CheckpointError, "not all in the local hub cache")
    assert network_attempts == []


def test_a_missing_path_that_reads_as_a_hub_id_does_not_exist_unless_downloads_are_allowed(
        tmp_path, hub_state, network_attempts):
    assert hub.looks_like_hub_id("nobody/x") and not looks_like_hub_id("nobody/x")
    message = _refused_quickly(lambda: hub.check_model_source("nobody/x", "--base"), FileNotFoundError,
                               "does not exist")
    assert message == ("--base 'nobody/x' does not exist; invdiff is offline by default: to download the hub "
                       "model 'nobody/x', pass it to `invdiff debias --base` with --allow-download, or fetch it "
                       "yourself (hf download) and pass its folder")
    with pytest.raises(OfflineError):
        hub.check_model_source("models/sd15", "--model")
    # Not a hub id: no hint.
    message = _refused_quickly(lambda: hub.check_model_source("./models/sd15", "--base"), FileNotFoundError,
                               "does not exist")
    assert message == "--base './models/sd15' does not exist"
    hub.check_model_source(str(tmp_path), "--base")  # an existing path passes
    for load in (LatentDiffusionBase.from_pretrained, InvDiffPipeline.from_pretrained, load_base):
        message = _refused_quickly(lambda: load("nobody/x"), CheckpointError, "'nobody/x' does not exist")
    assert network_attempts == []
    hub.set_downloads_allowed(True)
    hub.check_model_source("nobody/x", "--base")
    assert looks_like_hub_id("nobody/x")
    with pytest.raises(FileNotFoundError, match="does not exist$"):
        hub.check_model_source("a/b/c", "--base")  # two slashes: a path, never a hub id


def test_set_downloads_allowed_sets_the_hub_switches_and_an_explicit_hub_offline_0_allows(hub_state):
    assert not hub.downloads_allowed()  # the library default
    hub.set_downloads_allowed(False)
    assert not hub.downloads_allowed()
    assert all(os.environ[name] == "1" for name in hub.OFFLINE_SWITCHES)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # imported already: its constant is set too
    hub.set_downloads_allowed(True)  # puts back what it replaced
    assert hub.downloads_allowed()
    assert not any(name in os.environ for name in hub.OFFLINE_SWITCHES)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    for value in ("0", "false", "No", "off"):
        hub_state.setenv("HF_HUB_OFFLINE", value)
        hub.set_downloads_allowed(False)
        assert hub.downloads_allowed() and os.environ["HF_HUB_OFFLINE"] == value
        hub.check_model_source("nobody/x", "--base")
    hub_state.setenv("HF_HUB_OFFLINE", "1")
    hub.set_downloads_allowed(False)
    assert not hub.downloads_allowed()


def _python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k not in hub.OFFLINE_SWITCHES}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_importing_invdiff_hub_stays_light_and_comes_before_the_hub_reads_its_switch():
    heavy = _python("import sys, invdiff.hub; print([m for m in ('torch', 'diffusers', 'transformers', "
                    "'huggingface_hub') if m in sys.modules])")
    assert heavy == ["[]"]
    assert _python("import invdiff.hub as h; print(h.downloads_allowed())") == ["False"]
    assert _python("import invdiff.hub as h; print(h.downloads_allowed())", HF_HUB_OFFLINE="0") == ["True"]
    assert _python("import invdiff.hub as h; h.set_downloads_allowed(False); import huggingface_hub.constants as c; "
                   "print(c.HF_HUB_OFFLINE, c.is_offline_mode())") == ["True", "True"]

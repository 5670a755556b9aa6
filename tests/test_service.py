"""`invdiff serve` (invdiff/serve/): endpoints, bad input, overload, cancellation,
worker failures, SIGTERM draining, determinism against `invdiff sample`, and Ray Serve.

Servers are real: uvicorn on 127.0.0.1 (in a thread, or the CLI in a subprocess), driven by httpx.
"""
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from invdiff.cli import main
from invdiff.sampling.job import prompt_dirname
from invdiff.serve.app import create_app, make_worker
from invdiff.serve.metrics import Metrics
from invdiff.serve.settings import ServeSettings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A debias run folder (frozen base + G_psi) on 8-pixel digits, and its base folder."""
    root = tmp_path_factory.mktemp("serve")
    base, run = str(root / "base"), str(root / "run")
    data = ["--resolution", "8"]
    assert main(["train-base", *data, "--steps", "3", "--out", base]) == 0
    assert main(["debias", "--base", base, *data, "--out", run, "--groups", "2", "--steps", "2", "--batch-size", "16",
                 "--loss-timesteps", "2", "--loss-draws", "1", "--max-step-steps", "5"]) == 0
    return run, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(settings: ServeSettings):
    """uvicorn serving create_app(settings) in a thread; yields (base url, the engine worker:
    an EngineProcess by default, an EngineWorker thread with engine_process=False)."""
    import uvicorn

    worker = make_worker(settings, Metrics(settings.max_batch))
    worker.load()
    app = create_app(settings, worker)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    wait_ready(url)
    try:
        yield url, worker
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} was not ready within {timeout} s")


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# ------------------------------------------------------------------ endpoints and determinism
def test_endpoints_and_the_same_pixels_as_invdiff_sample(tiny_run, tmp_path):
    run, _ = tiny_run
    request = {"prompt": "digit 3", "num": 3, "seed": 11, "steps": 4, "guidance_scale": 2.0, "strength": 1.0}
    out = str(tmp_path / "cli")
    assert main(["sample", "--model", run, "--prompt", "digit 3", "--num", "3", "--seed", "11", "--steps", "4",
                 "--guidance-scale", "2", "--out", out]) == 0
    expected = [decode(open(os.path.join(out, prompt_dirname("digit 3"), f"{k:04d}.png"), "rb").read()) for k in range(3)]

    with running_server(ServeSettings(model=run, max_batch=2)) as (url, _):
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["status"] == "ready" and ready["device"] == "cpu"
        reply = httpx.post(f"{url}/v1/images", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert [im["seed"] for im in body["images"]] == [11, 12, 13]
        got = [decode(base64.b64decode(im["b64_json"])) for im in body["images"]]
        for a, b in zip(got, expected):  # 2 slots for 3 images: batching does not change an image
            np.testing.assert_array_equal(a, b)
        png = httpx.post(f"{url}/v1/images", json={**request, "num": 1, "response_format": "png"}, timeout=60)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.headers["x-seed"] == "11"
        np.testing.assert_array_equal(decode(png.content), expected[0])
        drawn = httpx.post(f"{url}/v1/images", json={"prompt": "digit 1", "steps": 2}, timeout=60).json()
        assert isinstance(drawn["seed"], int)  # no seed given: one is drawn and reported
        text = httpx.get(f"{url}/metrics").text
        for name in ("invdiff_queue_depth", "invdiff_slots_occupied", "invdiff_slots_total", "invdiff_images_per_second",
                     "invdiff_images_total", "invdiff_request_latency_seconds_bucket", "invdiff_queue_wait_seconds_bucket",
                     "invdiff_step_seconds_bucket", 'invdiff_requests_total{status="200"}'):
            assert name in text, name
        assert metric(url, "invdiff_images_total") == 5
        assert metric(url, "invdiff_slots_total") == 2
        assert metric(url, "invdiff_request_latency_seconds_count") == 3


def test_a_stable_diffusion_folder_serves_any_prompt_and_bounds_its_prompt_table(tiny_sd, monkeypatch):
    from invdiff.serve import worker as worker_module

    monkeypatch.setattr(worker_module, "PROMPT_TABLE_LIMIT", 2)
    with running_server(ServeSettings(model=tiny_sd, max_batch=2, engine_process=False)) as (url, worker):
        def image(prompt):
            reply = httpx.post(f"{url}/v1/images", json={"prompt": prompt, "num": 1, "seed": 3, "steps": 2}, timeout=120)
            assert reply.status_code == 200, reply.text
            return decode(base64.b64decode(reply.json()["images"][0]["b64_json"]))

        first = image("a red bicycle")
        assert first.dtype == np.uint8 and first.shape[2] == 3
        for prompt in ("a blue car", "a green boat", "a yellow kite"):
            image(prompt)
        conditioner = worker.base.conditioner
        wait_for(lambda: len(conditioner.prompts) <= 2, what="the idle worker resetting its prompt table")
        np.testing.assert_array_equal(image("a red bicycle"), first)  # a fresh id, the same image


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def strict_server(tiny_run):
    """One server for every bad-input case: at most 8 images per request."""
    with running_server(ServeSettings(model=tiny_run[0], max_images_per_request=8, max_queue=8)) as served:
        yield served


@pytest.mark.parametrize("change, words", [
    ({"prompt": "a cat"}, "unknown prompt 'a cat'"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"steps": 5000}, "steps: Input should be less than or equal to 1000"),
    ({"num": 0}, "num: Input should be greater than or equal to 1"),
    ({"num": 9}, "num: Input should be less than or equal to 8"),  # oversized: over --max-images-per-request
    ({"guidance_scale": -1}, "guidance_scale: Input should be greater than or equal to 0"),
    ({"guidance_scale": 1e9}, "guidance_scale: Input should be less than or equal to 50"),
    ({"strength": "strong"}, "strength: Input should be a valid number"),
    ({"scheduler": "lms"}, "scheduler: Input should be 'ddim', 'ddpm', 'dpm' or 'euler'"),
    ({"response_format": "png", "num": 2}, "response_format 'png' returns one image"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    # Strict types: no string or boolean passes for a number (pydantic's lax mode took "2" and true).
    ({"num": "2"}, "num: Input should be a valid integer"),
    ({"num": True}, "num: Input should be a valid integer"),
    ({"steps": "4"}, "steps: Input should be a valid integer"),
    ({"seed": 1.5}, "seed: Input should be a valid integer"),
    ({"guidance_scale": "2"}, "guidance_scale: Input should be a valid number"),
    ({"strength": True}, "strength: Input should be a valid number"),
    ({"prompt": 3}, "prompt: Input should be a valid string"),
])
def test_bad_input_is_422_with_a_message_to_act_on(strict_server, change, words):
    url, worker = strict_server
    refused = metric(url, 'invdiff_requests_total{status="422"}') if "422" in httpx.get(f"{url}/metrics").text else 0
    reply = httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 2, **change}, timeout=30)
    assert reply.status_code == 422
    assert words in reply.json()["detail"], reply.json()
    assert "\n" not in reply.json()["detail"]
    assert worker.queue_depth() == 0 and metric(url, 'invdiff_requests_total{status="422"}') == refused + 1


def test_nan_is_422():
    # JSON has no NaN, but Python's encoder writes one; the model refuses it rather than sampling NaNs.
    from invdiff.serve.app import _request_model

    model = _request_model(ServeSettings(model="unused"))
    with pytest.raises(ValueError, match="finite number"):
        model.model_validate_json('{"prompt": "digit 3", "guidance_scale": NaN}')


def test_bad_settings_fail_before_the_model_loads(tiny_run, capsys):
    run, _ = tiny_run
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "--model '/no/such/model' does not exist" in capsys.readouterr().err
    assert main(["serve", "--model", run, "--replicas", "2"]) == 2
    assert "--replicas and --gpus-per-replica apply to --ray" in capsys.readouterr().err
    assert main(["serve", "--model", run, "--max-queue", "4", "--max-images-per-request", "8"]) == 2
    assert "cannot exceed max_queue" in capsys.readouterr().err
    assert main(["serve", "--model", run, "--device", "gpu"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err


# ------------------------------------------------------------------ bodies, types and JSON refused cheaply
def raw_request(url: str, head: bytes, body_parts=(), timeout: float = 10.0):
    """One request written by hand on a socket (a Content-Length that lies about what follows, a
    chunked body left unfinished): returns (status, lower-cased headers, body) of the reply."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer: {data!r}"
            data += chunk
        head_blob, _, body = data.partition(b"\r\n\r\n")
        lines = head_blob.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _count(url: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return metric(url, f'invdiff_requests_total{{status="{status}"}}') if f'status="{status}"' in text else 0.0


def test_a_body_over_the_limit_is_413_from_its_content_length_before_it_is_read(strict_server):
    from invdiff.serve.settings import MAX_BODY_BYTES

    url, _ = strict_server
    before = _count(url, 413)
    head = (b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 400000000\r\n\r\n")
    started = time.monotonic()
    # 1 KiB of the announced 400 MB: the answer comes from the header, without waiting for the rest.
    status, headers, body = raw_request(url, head, [b"{" + b" " * 1023])
    assert time.monotonic() - started < 5
    assert status == 413 and headers["content-type"] == "application/json" and headers["x-served-by"]
    assert json.loads(body)["detail"] == (f"the request body is 400000000 bytes; the service reads at most "
                                          f"{MAX_BODY_BYTES} bytes (a sampling request is a few hundred)")
    assert _count(url, 413) == before + 1
    # An ordinary client that sends a whole 1 MB body first reads the same 413 (the rest is discarded).
    reply = httpx.post(f"{url}/v1/images", content=b" " * 1_000_000, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 413 and "1000000 bytes" in reply.json()["detail"]


def test_a_chunked_body_is_413_as_soon_as_it_passes_the_limit(strict_server):
    from invdiff.serve.settings import MAX_BODY_BYTES

    url, _ = strict_server
    before = _count(url, 413)
    head = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (8192, b" " * 8192)
    # 8 KiB past the limit and no last chunk: the server answers without waiting for the body's end.
    status, headers, body = raw_request(url, head, [chunk] * (MAX_BODY_BYTES // 8192 + 1))
    assert status == 413 and headers["x-served-by"]
    assert "passed the limit while it was sent; the service reads at most" in json.loads(body)["detail"]
    assert _count(url, 413) == before + 1


def test_a_body_at_the_limit_is_read_chunked_or_not(strict_server):
    from invdiff.serve.settings import MAX_BODY_BYTES

    url, _ = strict_server
    request = b'{"prompt": "digit 3", "steps": 1, "seed": 0}'
    padded = request + b" " * (MAX_BODY_BYTES - len(request))  # JSON allows the trailing spaces
    json_type = {"content-type": "application/json"}
    assert httpx.post(f"{url}/v1/images", content=padded, headers=json_type, timeout=60).status_code == 200
    chunked = httpx.post(f"{url}/v1/images", content=iter([padded[:1000], padded[1000:]]), headers=json_type, timeout=60)
    assert chunked.status_code == 200, chunked.text
    assert httpx.post(f"{url}/v1/images", content=padded + b" ", headers=json_type, timeout=60).status_code == 413


@pytest.mark.parametrize("headers, words", [
    ({"content-type": "text/plain"}, "must be JSON, with Content-Type: application/json; got 'text/plain'"),
    ({"content-type": "application/x-www-form-urlencoded"}, "got 'application/x-www-form-urlencoded'"),
    ({}, "must be JSON, with Content-Type: application/json; none was given"),
])
def test_a_body_that_is_not_json_by_its_content_type_is_415(strict_server, headers, words):
    url, _ = strict_server
    before = _count(url, 415)
    reply = httpx.post(f"{url}/v1/images", content=b'{"prompt": "digit 3", "steps": 1}', headers=headers, timeout=30)
    assert reply.status_code == 415 and words in reply.json()["detail"], reply.text
    assert reply.headers["x-served-by"] and _count(url, 415) == before + 1
    charset = httpx.post(f"{url}/v1/images", content=b'{"prompt": "digit 3", "steps": 1, "seed": 0}',
                         headers={"content-type": "Application/JSON; charset=utf-8"}, timeout=60)
    assert charset.status_code == 200, charset.text


@pytest.mark.parametrize("body, detail", [
    (b'{"prompt": "digit 3", "num": 2x}', "num: not valid JSON: Expecting ',' delimiter at line 1, column 31"),
    (b'{"prompt": "digit 3", "num": }', "num: not valid JSON: Expecting value at line 1, column 30"),
    (b'{"prompt": "digit 3', "prompt: not valid JSON: Unterminated string starting at line 1, column 12"),
    (b'{"prompt": "digit 3",\n "seed": 1,\n "steps": 0x10\n}', "steps: not valid JSON: Expecting ',' delimiter at line 3, column 12"),
    (b'{"prompt": "digit 3",\n "num": 2,\n}', "the body is not valid JSON: Expecting property name enclosed in double quotes "
                                              "at line 3, column 1"),
    (b'{not json', "the body is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
    (b'{"prompt": "digit 3"} 7', "the body is not valid JSON: Extra data at line 1, column 23"),
    (b'', 'the body is empty: send a JSON object such as {"prompt": "..."}'),
])
def test_a_json_decode_error_names_the_field_or_the_line_and_column(strict_server, body, detail):
    url, _ = strict_server
    reply = httpx.post(f"{url}/v1/images", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert reply.status_code == 422
    assert reply.json()["detail"] == detail


def test_floats_take_json_integers(strict_server):
    url, _ = strict_server
    reply = httpx.post(f"{url}/v1/images", timeout=60,
                       json={"prompt": "digit 3", "steps": 1, "seed": 0, "guidance_scale": 1, "strength": 1})
    assert reply.status_code == 200, reply.text


def test_every_error_is_counted_by_status_and_carries_x_served_by(strict_server):
    url, _ = strict_server
    ok = httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 1, "seed": 0}, timeout=60)
    assert ok.status_code == 200
    served_by = ok.headers["x-served-by"]
    cases = [("GET", "/no/such/path", None, 404), ("POST", "/healthz", None, 405), ("GET", "/v1/images", None, 405),
             ("POST", "/v1/images", b'{"prompt": "\xff"}', 400),  # not UTF-8: FastAPI's own 400
             ("POST", "/v1/images", b'{"prompt": "a cat"}', 422)]
    for method, path, content, status in cases:
        before = _count(url, status)
        reply = httpx.request(method, f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30)
        assert reply.status_code == status, (path, reply.text)
        assert reply.headers["content-type"] == "application/json" and reply.json()["detail"], (path, reply.text)
        assert reply.headers["x-served-by"] == served_by, path
        assert _count(url, status) == before + 1, (method, path)
    # Probes and scrapes are not requests for images: they are stamped but not counted.
    before = _count(url, 200)
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{url}{probe}").headers["x-served-by"] == served_by
    assert _count(url, 200) == before


def test_responses_show_no_path_or_pid_unless_asked(strict_server, tiny_run):
    url, _ = strict_server
    run = tiny_run[0]
    name = os.path.basename(run)
    ready = httpx.get(f"{url}/readyz")
    assert ready.json()["model"] == name
    reply = httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 1, "seed": 0}, timeout=60)
    assert reply.json()["model"] == name
    shown = json.dumps({k: v for k, v in reply.json().items() if k != "images"})  # (base64 can hold any word)
    for text in (ready.text, shown, ready.headers["x-served-by"], reply.headers["x-served-by"]):
        assert os.path.dirname(run) not in text and socket.gethostname() not in text and str(os.getpid()) not in text
    assert re.fullmatch(r"invdiff-[0-9a-f]{12}", reply.headers["x-served-by"])
    # --expose-details: the path and host:pid (a thread engine: no second process to start).
    with running_server(ServeSettings(model=run, max_batch=2, engine_process=False, expose_details=True)) as (exposed, _):
        ready = httpx.get(f"{exposed}/readyz")
        assert ready.json()["model"] == os.path.abspath(run)
        assert ready.headers["x-served-by"] == f"{socket.gethostname()}:{os.getpid()}"


def test_error_details_show_the_model_path_only_when_asked(tmp_path):
    from invdiff.serve.app import Redactor

    model = tmp_path / "run"
    (model / "guidance").mkdir(parents=True)
    message = f"could not load G_psi from '{model}/guidance': bad file; see {model}"
    redact = Redactor(ServeSettings(model=str(model)))
    assert redact(message) == "could not load G_psi from '<model>/guidance': bad file; see <model>"
    assert redact.model_name == "run"
    assert Redactor(ServeSettings(model=str(model), expose_details=True))(message) == message


def test_start_up_checks_fail_fast_without_loading_a_model(tiny_run, tmp_path):
    """A port in use, a path that does not exist and a folder that is no model folder: one line
    and exit 2 before torch is imported. The goal is < 1 s on an idle machine (about 0.1 s
    measured); the bound here is generous for a slow shared CPU, and a model load would pass it
    (~7 s for the tiny run on 2 busy cores)."""
    run, _ = tiny_run
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = ("import sys; from invdiff.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    cases = [(["--model", run, "--port", str(port)], f"cannot listen on 127.0.0.1:{port}: Address already in use"),
             (["--model", str(tmp_path / "nonexistent")], "does not exist"),
             (["--model", str(not_a_model)], "is neither an invdiff base model, a run folder nor a Stable Diffusion folder")]
    try:
        for args, words in cases:
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-c", code, "serve", *args], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            elapsed = time.monotonic() - started
            print(f"\n{words!r}: exit {proc.returncode} in {elapsed:.2f} s")
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("invdiff serve: error: ") and words in proc.stderr, proc.stderr
            assert elapsed < 5
    finally:
        listener.close()


def test_a_model_that_fails_to_load_in_the_engine_process_is_one_error_too(tiny_run, tmp_path, capsys):
    """A folder that passes the start-up checks but does not load (its weights are damaged): the
    engine process's error is still one line and exit 2 (what the test above did before the checks
    came first)."""
    import shutil

    model = tmp_path / "run"
    shutil.copytree(tiny_run[0], model)
    _corrupt_weights(model)
    assert main(["serve", "--model", str(model), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invdiff serve: error: could not load the base model in ") and err.count("\n") == 1, err


# ------------------------------------------------------------------ overload, cancellation, failures
def _post_in_background(url, body, timeout):
    """POST in a thread; returns (thread, results list that receives the status or the exception)."""
    results = []

    def go():
        try:
            results.append(httpx.post(f"{url}/v1/images", json=body, timeout=timeout).status_code)
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, results


def test_a_full_queue_is_429_with_retry_after_and_accepted_requests_finish(tiny_run):
    run, _ = tiny_run
    settings = ServeSettings(model=run, max_batch=1, max_queue=2, max_images_per_request=2)
    with running_server(settings) as (url, worker):
        long = {"prompt": "digit 3", "num": 2, "steps": 60, "seed": 0}
        first, first_result = _post_in_background(url, long, timeout=120)  # one image in the slot, one waiting
        wait_for(lambda: metric(url, "invdiff_slots_occupied") == 1, what="the first image in its slot")
        second, second_result = _post_in_background(url, {"prompt": "digit 4", "num": 1, "steps": 2, "seed": 0}, timeout=120)
        wait_for(lambda: worker.queue_depth() == 2, what="two images waiting")
        refused = httpx.post(f"{url}/v1/images", json={"prompt": "digit 5", "num": 1, "steps": 2}, timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert "queue is full" in refused.json()["detail"]
        # Shed before the body is read: even a malformed request gets the 429, not a 422.
        shed = httpx.post(f"{url}/v1/images", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
        assert shed.status_code == 429 and int(shed.headers["retry-after"]) >= 1
        first.join(), second.join()
        assert first_result == [200] and second_result == [200]  # accepted work is never dropped
        assert worker.queue_depth() == 0


@pytest.mark.parametrize("engine_process", [True, False])
def test_a_client_that_goes_away_frees_its_slots(tiny_run, engine_process):
    run, _ = tiny_run
    with running_server(ServeSettings(model=run, max_batch=4, engine_process=engine_process)) as (url, worker):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "num": 4, "steps": 1000, "seed": 0}, timeout=1.0)
        wait_for(lambda: metric(url, "invdiff_slots_occupied") == 0 and worker.queue_depth() == 0,
                 timeout=10, what="the slots freed")
        if not engine_process:  # the engine's own counters are in this process
            engine = worker._engines["ddim"]
            done = engine.slot_steps
            assert done < 4 * 1000  # stopped well before the images finished
            time.sleep(0.3)
            assert engine.slot_steps == done  # and nothing samples them any more
        assert metric(url, "invdiff_images_total") == 0  # the cancelled images were never delivered
        assert httpx.post(f"{url}/v1/images", json={"prompt": "digit 3", "steps": 2}, timeout=30).status_code == 200


def test_a_worker_exception_is_500_for_its_requests_and_the_service_keeps_serving(tiny_run):
    run, _ = tiny_run
    with running_server(ServeSettings(model=run, engine_process=False)) as (url, worker):
        base = worker.base
        poisoned = int(base.conditioner.prompt_ids(["digit 9"])[0])
        original = base.prompt_embeds

        def failing_embeds(ids):  # a device error while digit 9 is in the batch
            if bool((ids == poisoned).any()):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return original(ids)

        base.prompt_embeds = failing_embeds
        reply = httpx.post(f"{url}/v1/images", json={"prompt": "digit 9", "num": 2, "steps": 3}, timeout=30)
        assert reply.status_code == 500
        assert "sampling failed in the worker: RuntimeError: CUDA error: an illegal memory access" in reply.json()["detail"]
        assert httpx.post(f"{url}/v1/images", json={"prompt": "digit 2", "num": 2, "steps": 3}, timeout=30).status_code == 200
        assert metric(url, "invdiff_slots_occupied") == 0 and worker.queue_depth() == 0
        assert metric(url, 'invdiff_requests_total{status="500"}') == 1


# ------------------------------------------------------------------ an engine death is healed
def _post_keeping_reply(url, body, timeout):
    """POST in a thread; returns (thread, list that receives the httpx response or the exception)."""
    replies = []

    def go():
        try:
            replies.append(httpx.post(f"{url}/v1/images", json=body, timeout=timeout))
        except httpx.HTTPError as exc:
            replies.append(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, replies


def engine_pid(worker) -> int:
    """The pid of the engine process (a new one after each restart)."""
    return worker._child.process.pid


def _b64_images(reply) -> list:
    return [decode(base64.b64decode(im["b64_json"])) for im in reply.json()["images"]]


def _corrupt_weights(model) -> None:
    """The disk under a run folder's frozen UNet went bad: no engine can load the folder any more."""
    weights = model / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"\x00not a safetensors file")


def test_a_killed_engine_is_restarted_and_its_request_gets_a_503_to_retry():
    """kill -9 of the engine process on the shipped base: the request it held gets a 503 with
    Retry-After, the engine is restarted and ready within 30 s, and then samples the same pixels."""
    from prometheus_client.parser import text_string_to_metric_families

    from invdiff.demo import shipped_base
    from invdiff.serve.engine_process import EngineProcess

    request = {"prompt": "digit 3", "num": 2, "seed": 5, "steps": 4}
    with running_server(ServeSettings(model=shipped_base(), max_batch=2)) as (url, worker):
        assert isinstance(worker, EngineProcess)
        first_pid = engine_pid(worker)
        assert first_pid != os.getpid()  # the engine runs in a process of its own
        before = httpx.post(f"{url}/v1/images", json=request, timeout=60)
        assert before.status_code == 200, before.text
        thread, replies = _post_keeping_reply(url, {"prompt": "digit 3", "num": 2, "steps": 1000, "seed": 0}, timeout=60)
        wait_for(lambda: metric(url, "invdiff_slots_occupied") == 2, what="the request sampling in the engine process")
        killed = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)  # out of memory, a crash in native code, ...
        thread.join()
        caught = replies[0]
        assert caught.status_code == 503, caught.text
        assert caught.headers["content-type"] == "application/json" and int(caught.headers["retry-after"]) >= 1
        assert "engine process exited unexpectedly (exit code -9)" in caught.json()["detail"]
        # While it restarts: new requests get a 503 to retry, readiness is off, liveness on, slots free.
        during = httpx.post(f"{url}/v1/images", json=request, timeout=30)
        assert during.status_code == 503 and int(during.headers["retry-after"]) >= 1
        assert "the engine is restarting" in during.json()["detail"]
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "restarting"
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        assert metric(url, "invdiff_slots_occupied") == 0 and metric(url, "invdiff_queue_depth") == 0
        assert worker.queue_depth() == 0 and worker.admission._outstanding == 0 and worker.admission._occupied == 0
        wait_ready(url, timeout=30)
        print(f"\nready again {time.monotonic() - killed:.1f} s after kill -9 of the engine process")
        assert engine_pid(worker) != first_pid
        after = httpx.post(f"{url}/v1/images", json=request, timeout=60)
        assert after.status_code == 200, after.text
        for a, b in zip(_b64_images(after), _b64_images(before)):
            np.testing.assert_array_equal(a, b)
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        restarts = [s for s in families["invdiff_engine_restarts"].samples if s.name == "invdiff_engine_restarts_total"]
        assert [s.value for s in restarts] == [1.0]
        assert metric(url, 'invdiff_requests_total{status="503"}') == 2
        assert metric(url, 'invdiff_requests_total{status="200"}') == 2


def test_an_engine_that_keeps_failing_to_restart_fails_healthz(tiny_run, tmp_path, monkeypatch):
    """The engine dies and its model can no longer load: after MAX_FAILED_RESTARTS failed
    restarts the parent gives up, and /healthz turns 503 so that a supervisor acts."""
    import shutil

    from invdiff.serve import engine_process

    monkeypatch.setattr(engine_process, "RESTART_BACKOFF_S", 0.05)  # the documented count; shorter waits
    model = tmp_path / "run"
    shutil.copytree(tiny_run[0], model)
    with running_server(ServeSettings(model=str(model), max_batch=2)) as (url, worker):
        request = {"prompt": "digit 3", "num": 1, "seed": 0, "steps": 2}
        assert httpx.post(f"{url}/v1/images", json=request, timeout=60).status_code == 200
        _corrupt_weights(model)
        os.kill(engine_pid(worker), signal.SIGKILL)
        assert httpx.get(f"{url}/healthz").status_code == 200  # restarting: alive
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 503, timeout=180, what="/healthz 503")
        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "failed"
        assert f"the engine failed {engine_process.MAX_FAILED_RESTARTS} times in a row" in health["detail"]
        assert "the restarted engine failed to load" in health["detail"]
        assert metric(url, "invdiff_engine_restarts_total") == engine_process.MAX_FAILED_RESTARTS
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        refused = httpx.post(f"{url}/v1/images", json=request, timeout=30)
        assert refused.status_code == 503 and "is not restarted again" in refused.json()["detail"]
        time.sleep(1.0)
        assert metric(url, "invdiff_engine_restarts_total") == engine_process.MAX_FAILED_RESTARTS  # it gave up


def test_ray_check_health_raises_once_the_engine_gave_up(tiny_run, tmp_path, monkeypatch):
    """Ray Serve's health check on the deployment's class: passes while the engine serves or
    restarts, raises once it gave up, so that Ray replaces the replica; the deployment sets it."""
    import dataclasses
    import shutil

    from invdiff.serve import engine_process
    from invdiff.serve.ray_serve import HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S, InvDiffReplica, deployment

    monkeypatch.setattr(engine_process, "RESTART_BACKOFF_S", 0.05)
    monkeypatch.setattr(engine_process, "MAX_FAILED_RESTARTS", 1)  # give up at the first failed restart
    model = tmp_path / "run"
    shutil.copytree(tiny_run[0], model)
    settings = ServeSettings(model=str(model), max_batch=2, device="cpu")
    app = deployment(settings)
    config = app._bound_deployment._deployment_config
    assert (config.health_check_period_s, config.health_check_timeout_s) == (HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S)
    assert issubclass(app._bound_deployment.func_or_class, InvDiffReplica)

    replica = InvDiffReplica(dataclasses.asdict(settings))  # what Ray constructs on the replica
    replica.worker.start()
    try:
        assert replica.worker.ready.wait(60) and replica.worker.unavailable() is None
        replica.check_health()
        _corrupt_weights(model)
        os.kill(engine_pid(replica.worker), signal.SIGKILL)
        replica.check_health()  # dead but restarting: healthy
        wait_for(lambda: replica.worker.health() is not None, timeout=120, what="the engine giving up")
        with pytest.raises(RuntimeError, match="the engine failed 1 time in a row and is not restarted again"):
            replica.check_health()
    finally:
        replica.worker.stop(0.0)


def test_a_model_that_fails_to_load_in_the_engine_process_is_one_error(tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    assert main(["serve", "--model", str(bad)]) == 2
    assert "is neither an invdiff base model, a run folder nor a Stable Diffusion folder" in capsys.readouterr().err


# ------------------------------------------------------------------ SIGTERM
def test_sigterm_drains_in_flight_requests(tiny_run):
    run, _ = tiny_run
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "invdiff.cli", "serve", "--model", run, "--port", str(port), "--max-batch", "2",
                             "--drain-seconds", "60"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        thread, result = _post_in_background(url, {"prompt": "digit 3", "num": 2, "steps": 300, "seed": 0}, timeout=120)
        wait_for(lambda: metric(url, "invdiff_slots_occupied") == 2, what="the request sampling")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections while it drains
            httpx.get(f"{url}/healthz", timeout=2)
        thread.join(timeout=120)
        assert result == [200]  # the in-flight request finished
        # uvicorn re-raises the signal once it has drained, so the exit status says SIGTERM ended it.
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read()
    assert "Waiting for connections to close" in log and "Application shutdown complete" in log, log


def _sigterm_during_a_request(proc, url, body, ready_timeout=60.0, sampling_timeout=10.0, wait=60.0):
    """Start `body` on the server of `proc`, SIGTERM it once the request samples, and return
    (reply or exception, seconds to the reply, the exit code, seconds to the exit, the log)."""
    try:
        wait_ready(url, timeout=ready_timeout)
        thread, replies = _post_keeping_reply(url, body, timeout=120)
        wait_for(lambda: metric(url, "invdiff_slots_occupied") == 2, timeout=sampling_timeout, what="the request sampling")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=wait)
        answered = time.monotonic() - signalled
        rc = proc.wait(timeout=wait)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.stdout.read()
    return replies[0], answered, rc, exited, log


def test_a_request_still_running_at_the_drain_deadline_gets_a_503_and_the_server_exits_on_time(tiny_run):
    """SIGTERM with --drain-seconds 2 and a request that needs far longer: at the deadline it gets
    the service's JSON 503 with Retry-After (not uvicorn's plain-text 500 of a cancelled task and
    its traceback), and the process exits within the deadline plus a few seconds (before: 34.7 s
    with a 30 s drain)."""
    run, _ = tiny_run
    drain = 2.0
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "invdiff.cli", "serve", "--model", run, "--port", str(port), "--max-batch", "2",
                             "--drain-seconds", str(drain)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    # 16 images of 1000 steps, 2 at a time: minutes of sampling, far past the deadline.
    reply, answered, rc, exited, log = _sigterm_during_a_request(
        proc, url, {"prompt": "digit 3", "num": 16, "steps": 1000, "seed": 0})
    print(f"SIGTERM with a {drain:g} s drain: the request answered after {answered:.2f} s, the process exited after {exited:.2f} s")
    assert isinstance(reply, httpx.Response), reply
    assert reply.status_code == 503, (reply.status_code, reply.text, log)
    assert reply.headers["content-type"] == "application/json" and reply.headers["retry-after"] == "1"
    assert "drain deadline passed" in reply.json()["detail"]
    assert drain - 0.5 <= answered <= drain + 1.5  # in-flight work went on until the deadline, not longer
    assert exited <= drain + 3.0, log
    assert rc == -signal.SIGTERM  # uvicorn re-raises the signal once it has drained
    assert "Traceback" not in log and "Exception in ASGI application" not in log and "timeout graceful shutdown exceeded" not in log, log
    assert "still running at the drain deadline" in log, log


# ------------------------------------------------------------------ Ray Serve
def test_the_ray_deployment_drains_for_drain_seconds(tiny_run):
    """Ray Serve's replica drain follows --drain-seconds: Ray kills a stopped replica after
    graceful_shutdown_timeout_s, and checks for its in-flight requests every wait loop."""
    from invdiff.serve.ray_serve import deployment

    for drain, loop in ((2.0, 0.2), (30.0, 2.0), (0.0, 0.1)):
        config = deployment(ServeSettings(model=tiny_run[0], device="cpu", drain_seconds=drain))._bound_deployment._deployment_config
        assert (config.graceful_shutdown_timeout_s, config.graceful_shutdown_wait_loop_s) == (drain, loop)


def test_ray_serve_two_replicas_on_local_ray(tiny_run):
    run, _ = tiny_run
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from invdiff.serve.ray_serve import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServeSettings(model=run, device="cpu", max_batch=4), replicas=2, cpus_per_replica=0.5),
                  name="invdiff", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=120)
        status = serve.status().applications["invdiff"].deployments["invdiff"]
        assert status.replica_states.get("RUNNING") == 2
        body = {"prompt": "digit 3", "num": 1, "seed": 4, "steps": 2}
        results = []

        def call():
            results.append(httpx.post(f"{url}/v1/images", json=body, timeout=120))

        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 16
        images = {r.json()["images"][0]["b64_json"] for r in results}
        assert len(images) == 1  # the same request gives the same image on every replica
        assert len({r.headers["x-served-by"] for r in results}) == 2  # Ray spread them over both replicas
        assert httpx.post(f"{url}/v1/images", json={**body, "prompt": "a cat"}, timeout=60).status_code == 422
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_serve_run_builder_reads_its_arguments(tiny_run):
    from ray.serve import Application

    from invdiff.serve.ray_serve import app_builder

    app = app_builder({"model": tiny_run[0], "replicas": "2", "max_batch": "4", "engine_process": "false", "device": "cpu"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['batch'\]"):
        app_builder({"model": tiny_run[0], "batch": "4"})

"""Model card and Hub upload, against a local stand-in for the Hub HTTP API on loopback (never the real Hub).

The stand-in implements what ``create_repo`` and ``upload_folder`` call: ``POST /api/repos/create``, the
``validate-yaml`` endpoint (the card's metadata), the ``preupload`` endpoint (every file is answered "regular", so its bytes travel base64-encoded in the commit) and the
``commit`` endpoint (an NDJSON stream: a header line, then one line per file).
"""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hvae_diffusion.training.hub import HubUploadError, render_model_card

CARD_FIELDS = dict(
    pipeline_class="ClassifierFreeGuidancePipeline",
    dataset="scikit-learn digits (built in)",
    prediction_type="v_prediction",
    loss_weighting="min_snr",
    variance_type="fixed_small",
    conditioning="class",
    num_train_steps=1234,
    final_loss="0.0421",
    bits_per_dim="1.234",
    sample_grid="samples/step-001234.png",
    fid=None,
    guided_accuracy="0.950",
    extra=None,
)


class FakeHub:
    """A loopback HTTP server recording created repos and committed files; ``fail=True`` answers 500 to everything."""

    def __init__(self, fail=False):
        self.fail = fail
        self.repos, self.files, self.requests, self.validated = [], {}, [], []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply(500 if hub.fail else 404, {"error": "not implemented by the stand-in"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                hub.requests.append(("POST", self.path))
                if hub.fail:
                    return self._reply(500, {"error": "internal error (stand-in told to fail)"})
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}"
                    hub.repos.append((repo_id, payload.get("visibility")))
                    return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":  # the README's metadata header is checked before the commit
                    hub.validated.append(json.loads(body)["content"])
                    return self._reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ]
                        },
                    )
                if "/commit/" in self.path:
                    for line in body.decode().splitlines():
                        entry = json.loads(line)
                        if entry["key"] == "file":
                            value = entry["value"]
                            hub.files[value["path"]] = base64.b64decode(value["content"])
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(
                        200,
                        {
                            "success": True,
                            "commitOid": "a" * 40,
                            "commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}",
                        },
                    )
                return self._reply(404, {"error": f"unknown endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def make_output_folder(root):
    """A pipeline-like output folder with checkpoints and logs that must not be uploaded."""
    for relative, content in {
        "model_index.json": "{}",
        "unet/config.json": "{}",
        "unet/diffusion_pytorch_model.safetensors": "weights",
        "scheduler/scheduler_config.json": "{}",
        "samples/step-001234.png": "png",
        "checkpoint-5/model.safetensors": "ckpt",
        "logs/train/events": "log",
    }.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(content)
    return root


UPLOAD_SNIPPET = """
import sys
from hvae_diffusion.training.hub import HubUploadError, push_to_hub
try:
    print(push_to_hub(sys.argv[1], "someone/hvae-digits", token="hf_fake", private=True))
except HubUploadError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
"""


def run_upload(folder, endpoint):
    """Upload in a subprocess with HF_ENDPOINT pointing at the stand-in (the endpoint is read at import time)."""
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        "HF_HUB_DISABLE_XET": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", UPLOAD_SNIPPET, folder], capture_output=True, text=True, env=env, timeout=120
    )


def test_model_card_renders_every_field(tmp_path):
    card = render_model_card(str(tmp_path), repo_id="someone/hvae-digits", **CARD_FIELDS)
    text = (tmp_path / "README.md").read_text()
    assert text == str(card)
    for expected in [
        "ClassifierFreeGuidancePipeline",
        "scikit-learn digits",
        "`v_prediction`",
        "`min_snr`",
        "1234",
        "0.0421",
        "1.234",
        "0.950",
        "samples/step-001234.png",
        'from_pretrained("someone/hvae-digits")',
        "guidance_scale=3.0",
        "library_name: diffusers",
    ]:
        assert expected in text, expected
    assert "Fréchet" not in text  # a missing metric leaves no empty row


def test_upload_sends_files_and_model_card(tmp_path):
    folder = make_output_folder(str(tmp_path / "out"))
    render_model_card(folder, repo_id="someone/hvae-digits", **CARD_FIELDS)
    with FakeHub() as hub:
        result = run_upload(folder, hub.endpoint)
    assert result.returncode == 0, result.stderr
    assert hub.repos == [("someone/hvae-digits", "private")]
    assert set(hub.files) == {
        "README.md",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "samples/step-001234.png",
    }
    assert hub.files["unet/diffusion_pytorch_model.safetensors"] == b"weights"
    assert b"ClassifierFreeGuidancePipeline" in hub.files["README.md"]
    assert hub.validated and "library_name: diffusers" in hub.validated[0]
    assert "/commit/" in result.stdout


def test_failed_upload_keeps_local_output_and_says_how_to_retry(tmp_path):
    folder = make_output_folder(str(tmp_path / "out"))
    render_model_card(folder, repo_id="someone/hvae-digits", **CARD_FIELDS)
    before = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    with FakeHub(fail=True) as hub:
        result = run_upload(folder, hub.endpoint)
    assert result.returncode == 3
    assert "is complete" in result.stderr and "hf upload someone/hvae-digits" in result.stderr
    after = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    assert before == after and "README.md" in after


def test_push_without_repo_id_is_an_error(tmp_path):
    from hvae_diffusion.training.hub import push_to_hub

    with pytest.raises(ValueError, match="--hub_model_id"):
        push_to_hub(str(tmp_path), None)
    assert issubclass(HubUploadError, RuntimeError)

"""`moe-lm push` against a local stand-in for the Hub API on 127.0.0.1 (never the network)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from moe_lm.cli import main
from moe_lm.config import config_from_dict
from tests.integration.conftest import run_config_dict
from tests.integration.test_hf_export import make_checkpoint

TOKEN = "hf_standin_token"


class StandInHub:
    """The endpoints huggingface_hub's create_repo / create_branch / upload_folder call, recorded."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[str, str]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        # what GET /api/whoami-v2 answers for the token
        self.whoami: dict[str, Any] = {
            "name": "alice",
            "orgs": [{"name": "team", "roleInOrg": "write"}, {"name": "readers", "roleInOrg": "read"}],
            "auth": {"accessToken": {"role": "write"}},
        }
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                if self.path.split("?")[0] == "/api/whoami-v2":
                    return self._reply(200, hub.whoami)
                self._reply(404, {"error": "Repository not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.requests.append(("POST", self.path))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                status, answer = hub.handle(self.path.split("?")[0], body, f"http://{self.headers['Host']}")
                self._reply(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, path: str, body: bytes, base: str) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            if req["organization"] == "missing":
                return 404, {"error": "Namespace not found"}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{base}/{repo}"}
            self.repos[repo] = req
            return 200, {"url": f"{base}/{repo}", "name": repo}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if len(parts) == 6 and parts[:2] == ["api", "models"]:
            repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if action == "branch":
                self.branches.append((repo, rev))
                return 200, {}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                }
            if action == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files = {
                    x["value"]["path"]: base64.b64decode(x["value"]["content"])
                    for x in lines
                    if x["key"] == "file"
                }
                self.commits.append(
                    {"repo": repo, "revision": rev, "summary": header["summary"], "files": files}
                )
                oid = hashlib.sha1(body).hexdigest()
                return 200, {"success": True, "commitOid": oid, "commitUrl": f"{base}/{repo}/commit/{oid}"}
        return 404, {"error": f"no route {path}"}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    import huggingface_hub.constants

    # tests/conftest.py sets HF_HUB_OFFLINE=1, which huggingface_hub reads once at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server = StandInHub()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(scope="module")
def export_dir(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("hub") / "run"
    make_checkpoint(run, config_from_dict(run_config_dict(corpus, tokenizer_dir, run)), ep_size=1)
    out = run.parent / "export"
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_push_uploads_every_file(hub: StandInHub, export_dir: Path) -> None:
    before = _snapshot(export_dir)
    assert (
        main(
            [
                "push",
                str(export_dir),
                "--repo-id",
                "alice/tiny-moe",
                "--private",
                "--revision",
                "dev",
                "--commit-message",
                "first upload",
                "--endpoint",
                hub.url,
            ]
        )
        == 0
    )
    assert hub.repos["alice/tiny-moe"]["visibility"] == "private"
    assert hub.branches == [("alice/tiny-moe", "dev")]
    (commit,) = hub.commits
    assert (commit["repo"], commit["revision"], commit["summary"]) == (
        "alice/tiny-moe",
        "dev",
        "first upload",
    )
    # every file byte for byte, but the card, whose usage and title now name the repo
    sent = dict(commit["files"])
    card = sent.pop("README.md").decode()
    assert sent == {k: v for k, v in before.items() if k != "README.md"}
    assert 'from_pretrained("alice/tiny-moe")' in card and "\n# alice/tiny-moe\n" in card
    assert "PATH_TO_THIS_FOLDER" not in card and "PATH_TO_THIS_FOLDER" in before["README.md"].decode()
    assert card.replace("alice/tiny-moe", "X") == before["README.md"].decode().replace(
        "PATH_TO_THIS_FOLDER", "X"
    ).replace("# test-run\n", "# X\n")
    assert {"config.json", "model.safetensors", "README.md", "expert_load.png", "tokenizer.json"} <= set(
        before
    )
    assert _snapshot(export_dir) == before
    # Again, public, to main: the existing repo (409) is fine and no branch is created.
    assert main(["push", str(export_dir), "--repo-id", "alice/tiny-moe", "--endpoint", hub.url]) == 0
    assert hub.commits[1]["revision"] == "main" and hub.commits[1]["files"] == commit["files"]
    assert len(hub.branches) == 1


def test_dry_run_lists_what_would_be_sent_offline_and_without_a_token(
    export_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = _snapshot(export_dir)
    argv = [
        "push",
        str(export_dir),
        "--repo-id",
        "alice/tiny-moe",
        "--dry-run",
        "--endpoint",
        "http://127.0.0.1:9",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"dry run: would push {export_dir} to alice/tiny-moe (branch main")
    assert "at http://127.0.0.1:9; token: none (set HF_TOKEN" in out[0]
    listed = {line.split()[0] for line in out[1:-1]}
    assert listed == set(before)  # every file that a push sends
    assert any(line.split()[0] == "README.md" and "filled in for this repo" in line for line in out)
    assert out[-1].startswith(f"{len(before)} files, ") and out[-1].endswith("nothing was sent")
    assert _snapshot(export_dir) == before
    assert main(["push", str(export_dir), "--repo-id", "no-slash", "--dry-run"]) == 2  # still checked


def test_push_at_end_is_checked_before_training(
    hub: StandInHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Everything that would make the final push fail, asked before step 1 (one whoami request)."""
    import huggingface_hub.constants

    from moe_lm.errors import UserError
    from moe_lm.hf.hub import check_can_push

    def refused(repo_id: str, *needles: str) -> None:
        with pytest.raises(UserError) as info:
            check_can_push(repo_id, endpoint=hub.url, key="hub.repo_id")
        for needle in needles:
            assert needle in str(info.value), str(info.value)

    assert check_can_push("alice/m", endpoint=hub.url) == "alice"
    assert check_can_push("team/m", endpoint=hub.url) == "alice"
    refused(
        "bob/m", "belongs to 'alice', who cannot create repos under 'bob'", "namespaces: alice, team, readers"
    )
    refused("readers/m", "read role in the organization 'readers'")
    refused("alice/m/x", "hub.repo_id 'alice/m/x' is not OWNER/NAME")
    hub.whoami["auth"] = {"accessToken": {"role": "read"}}
    refused("alice/m", "token of 'alice' is read-only")
    hub.whoami["auth"] = {
        "accessToken": {
            "role": "fineGrained",
            "fineGrained": {
                "scoped": [{"entity": {"type": "org", "name": "team"}, "permissions": ["repo.write"]}]
            },
        }
    }
    assert check_can_push("team/m", endpoint=hub.url) == "alice"
    refused(
        "alice/m", "fine-grained Hugging Face token of 'alice' has no repo write permission for 'alice/m'"
    )
    hub.token = "another-token"
    refused("team/m", "401")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused("team/m", "offline mode is on", "HF_HUB_OFFLINE=0")
    assert not hub.commits and all(path.startswith("/api/whoami-v2") for _, path in hub.requests)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_push_errors_are_one_line_and_leave_the_folder(
    hub: StandInHub,
    export_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import huggingface_hub.constants

    before = _snapshot(export_dir)
    push = ["push", str(export_dir), "--endpoint", hub.url]
    for bad in ("no-slash", "a/b/c", "bad id/x", "a--b/c", "-a/b", "a/b."):
        _fails([*push, f"--repo-id={bad}"], capsys, "--repo-id")
    assert hub.requests == []  # validated before any request
    _fails([*push, "--repo-id=missing/x"], capsys, "404")
    hub.token = "another-token"
    _fails([*push, "--repo-id=alice/x"], capsys, "401")
    assert not hub.commits
    _fails(
        ["push", str(tmp_path / "none"), "--repo-id", "alice/x", "--endpoint", hub.url],
        capsys,
        "not a directory",
    )
    _fails(["push", str(tmp_path), "--repo-id", "alice/x", "--endpoint", hub.url], capsys, "config.json")
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    _fails(["push", str(export_dir), "--repo-id", "alice/x", "--endpoint", closed], capsys, "cannot reach")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fails([*push, "--repo-id=alice/x"], capsys, "offline")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    n = len(hub.requests)
    _fails([*push, "--repo-id=alice/x"], capsys, "HF_TOKEN")
    assert len(hub.requests) == n
    assert _snapshot(export_dir) == before


def test_push_at_end_exports_and_pushes(
    hub: StandInHub, corpus: Path, tokenizer_dir: Path, tmp_path: Path
) -> None:
    from moe_lm.hf.hub import push_at_end

    run = tmp_path / "run"
    cfg = config_from_dict(
        run_config_dict(
            corpus, tokenizer_dir, run, hub={"push_at_end": True, "repo_id": "alice/final", "dtype": "fp32"}
        )
    )
    ckpt, _ = make_checkpoint(run, cfg, ep_size=1)
    url = push_at_end(cfg, ckpt, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/alice/final/commit/")
    assert hub.repos["alice/final"]["visibility"] == "private"  # hub.private defaults to true
    assert hub.commits[0]["files"] == _snapshot(run / "export")  # exported for that repo: nothing to fill in
    assert "# alice/final" in (run / "export" / "README.md").read_text()


def test_the_train_command_pushes_its_final_checkpoint_once_finished(
    hub: StandInHub, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    import moe_lm.hf.hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets
    pushed: list[tuple[str, Path]] = []
    monkeypatch.setattr(moe_lm.hf.hub, "push_at_end", lambda cfg, ckpt: pushed.append((cfg.name, Path(ckpt))))
    cfg = make_config(train={"max_steps": 4}, hub={"push_at_end": True, "repo_id": "alice/final"})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["train", str(path), "train.stop_at_step=2"]) == 0
    assert pushed == []  # stopped early: not the end of training
    assert main(["train", str(path), "train.resume=latest"]) == 0
    assert pushed == [(cfg.name, cfg.output_dir / "checkpoints" / "step-4")]


def test_train_refuses_a_push_that_would_fail_before_the_first_step(
    hub: StandInHub, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """It used to find out after training (and the Makefile's HF_HUB_OFFLINE=1 made it certain)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    hub.whoami["auth"] = {"accessToken": {"role": "read"}}
    cfg = make_config(train={"max_steps": 2}, hub={"push_at_end": True, "repo_id": "alice/final"})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the Hugging Face token of 'alice' is read-only") and "\n" not in err
    assert not cfg.output_dir.exists()  # no step, no run directory
    hub.whoami["auth"] = {"accessToken": {"role": "write"}}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["train", str(path)]) == 2
    assert "offline mode is on" in capsys.readouterr().err
    assert not cfg.output_dir.exists()

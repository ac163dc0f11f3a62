"""Every way a file from elsewhere comes in runs no code from it, and a push sends nothing from
outside its folder nor the token anywhere it should not go (docs/security.md).

- `moe-lm import` / `upcycle` folders: no custom modeling code (trust_remote_code=False), `.bin`
  weights only through torch's restricted unpickler; a planted payload is one line, exit 2.
- YAML configs: the safe loader; a Python tag is one line, and nothing runs.
- `moe-lm push` (and hub.push_at_end): a symbolic link out of the export folder is refused before
  any request; the token reaches no file of the run (config, metrics, wandb) and no output line.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moe_lm.cli import main
from moe_lm.config import config_from_dict
from tests.integration.conftest import run_config_dict
from tests.integration.test_hf_export import make_checkpoint
from tests.integration.test_hub import TOKEN, StandInHub


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """The stand-in Hub of test_hub.py on 127.0.0.1, online, with HF_TOKEN set to its token."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server = StandInHub()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def export_dir(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ways-in") / "run"
    make_checkpoint(run, config_from_dict(run_config_dict(corpus, tokenizer_dir, run)), ep_size=1)
    out = run.parent / "export"
    assert main(["export", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def as_bin_folder(export_dir: Path, dst: Path, payload: Payload | None) -> Path:
    """The export with its weights as pytorch_model.bin (a torch.save pickle), maybe with a payload."""
    shutil.copytree(export_dir, dst)
    state: dict[str, Any] = dict(load_file(str(dst / "model.safetensors")))
    (dst / "model.safetensors").unlink()
    if payload is not None:
        state["extra"] = payload
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_import_reads_bin_weights_without_running_a_planted_payload(export_dir, tmp_path, capsys) -> None:
    clean = as_bin_folder(export_dir, tmp_path / "clean", None)
    assert main(["import", str(clean), "--out", str(tmp_path / "ok")]) == 0  # plain tensors load
    marker = tmp_path / "PWNED"
    planted = as_bin_folder(export_dir, tmp_path / "planted", Payload(marker))
    capsys.readouterr()
    assert main(["import", str(planted), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: the weights in '{planted}' hold pickled objects that are not tensors")
    assert not (tmp_path / "out").exists()


def test_import_never_runs_the_folders_own_modeling_code(export_dir, tmp_path) -> None:
    folder = tmp_path / "remote-code"
    shutil.copytree(export_dir, folder)
    marker = tmp_path / "IMPORTED"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["import", str(folder), "--out", str(tmp_path / "out")]) == 0  # the built-in Mixtral
    assert not marker.exists()


def test_a_yaml_python_tag_is_one_line_and_never_runs(tmp_path, capsys) -> None:
    marker = tmp_path / "YAML"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["info", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: config file '{cfg}' is not valid YAML")
    assert not marker.exists()


def test_push_refuses_a_link_out_of_the_export_folder(hub: StandInHub, export_dir, tmp_path, capsys) -> None:
    secret = tmp_path / "secret-token"
    secret.write_text(TOKEN)
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    shutil.copytree(export_dir, inside)
    (inside / "config-link.json").symlink_to(inside / "config.json")  # inside the folder: sent as a file
    assert main(["push", str(inside), "--repo-id", "alice/inside", "--endpoint", hub.url]) == 0
    sent = dict(hub.commits[-1]["files"])
    assert sent["config-link.json"] == (inside / "config.json").read_bytes()
    for name, target in (("notes.txt", secret), ("more", tmp_path)):
        shutil.rmtree(outside, ignore_errors=True)
        shutil.copytree(export_dir, outside)
        (outside / name).symlink_to(target)
        requests = len(hub.requests)
        capsys.readouterr()
        assert main(["push", str(outside), "--repo-id", "alice/outside", "--endpoint", hub.url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(
            f"error: '{name}' in {outside.resolve()} is a symbolic link to {target}, outside"
        )
        assert len(hub.requests) == requests  # refused before any request
    assert main(["push", str(outside), "--repo-id", "a/b", "--dry-run"]) == 2


def test_the_token_reaches_no_file_of_the_run_and_no_output(
    hub: StandInHub, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets
    cfg = make_config(
        train={"max_steps": 2},
        hub={"push_at_end": True, "repo_id": "alice/final", "dtype": "fp32"},
        logging={"wandb": True},
    )
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["train", str(path)]) == 0
    assert hub.commits and hub.commits[-1]["repo"] == "alice/final"
    hub.token = "another"  # the Hub now refuses the token: its error line must not quote it
    assert (
        main(["push", str(cfg.output_dir / "export"), "--repo-id", "alice/final", "--endpoint", hub.url]) == 2
    )
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    files = [p for p in cfg.output_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "metrics.jsonl" for p in files)
    leaks = [p for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaks == []

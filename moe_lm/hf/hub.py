"""Upload an exported folder to the Hugging Face Hub (or any endpoint speaking its API).

Everything that can be checked locally (folder, repo id, token, offline mode) is checked before
the first request; every failure becomes one `UserError` line and the local folder is never
modified.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lm.errors import UserError

if TYPE_CHECKING:
    from moe_lm.config import Config

# OWNER/NAME, the rules of huggingface_hub's validate_repo_id, with the owner required.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
DEFAULT_ENDPOINT = "https://huggingface.co"


def check_repo_id(repo_id: str) -> None:
    if (
        not _REPO_ID.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or len(repo_id) > 96
        or repo_id.endswith(".git")
    ):
        raise UserError(
            f"--repo-id {repo_id!r} is not OWNER/NAME (letters, digits, '-', '_', '.'; no '--' or '..'; "
            "e.g. my-user/tiny-moe)"
        )


def check_export_dir(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"'{folder}' is not a directory; run `moe-lm export CHECKPOINT --out DIR` first")
    if not (path / "config.json").is_file():
        raise UserError(
            f"'{folder}' has no config.json, so it is not an exported model; run `moe-lm export` first"
        )
    return path


def resolve_token(token: str | None = None) -> str:
    """--token, else HF_TOKEN, else the token saved by `hf auth login`."""
    from huggingface_hub import get_token

    found = token or os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise UserError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
        )
    return found


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, ConnectionError | TimeoutError) or bool(names & {"TransportError", "RequestError"})


def _http_message(e: Any, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(e, "response", None), "status_code", None)
    server = str(getattr(e, "server_message", "") or "").strip().splitlines()
    detail = f" ({server[0]})" if server else ""
    if status == 401:
        return f"the Hub at {endpoint} refused the token (401 unauthorized){detail}; check HF_TOKEN or `hf auth login`"
    if status == 403:
        return (
            f"the token may not write to '{repo_id}' (403 forbidden){detail}; use a token with write access"
        )
    if status == 404:
        return f"'{repo_id}' or its revision was not found at {endpoint} (404){detail}; check --repo-id and --revision"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"the Hub at {endpoint} answered {status}: {first}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> str:
    """Create the repo if needed (and the branch) and upload the folder in one commit; returns its URL."""
    path = check_export_dir(folder)
    check_repo_id(repo_id)
    resolved = resolve_token(token)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():  # read at import time from HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
        raise UserError(
            "Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE); unset it to push"
        )
    url = endpoint or constants.ENDPOINT or DEFAULT_ENDPOINT
    api = HfApi(endpoint=url, token=resolved)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(path),
            revision=revision,
            commit_message=commit_message or f"Upload {path.name} with moe_lm",
            repo_type="model",
        )
    except HfHubHTTPError as e:
        raise UserError(_http_message(e, repo_id, url)) from None
    except Exception as e:
        if _is_network_error(e):
            raise UserError(
                f"cannot reach the Hub at {url} ({type(e).__name__}: {e}); check the network or --endpoint"
            ) from None
        if isinstance(e, ValueError):  # e.g. invalid README metadata, reported by the server
            raise UserError(f"the Hub at {url} rejected the upload: {str(e).splitlines()[0]}") from None
        raise
    return str(getattr(info, "commit_url", info))


def push_at_end(cfg: Config, checkpoint_dir: str | Path | None, endpoint: str | None = None) -> str:
    """For `moe-lm train` with hub.push_at_end: export the final checkpoint to RUN/export/ and push
    it with `cfg.hub`."""
    from moe_lm.hf.export import export_checkpoint

    if checkpoint_dir is None:
        raise UserError(
            f"hub.push_at_end: {cfg.output_dir / 'checkpoints'} holds no complete checkpoint to push"
        )
    if not cfg.hub.repo_id:
        raise UserError("hub.push_at_end needs hub.repo_id (OWNER/NAME)")
    check_repo_id(cfg.hub.repo_id)
    resolve_token()  # fail before spending time on the export
    out = export_checkpoint(
        checkpoint_dir, cfg.output_dir / "export", dtype=cfg.hub.dtype, repo_id=cfg.hub.repo_id
    )
    return push_folder(
        out,
        cfg.hub.repo_id,
        private=cfg.hub.private,
        endpoint=endpoint,
        commit_message=f"{cfg.name}: final checkpoint {Path(checkpoint_dir).name}",
    )

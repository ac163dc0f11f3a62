"""Upload an exported folder to the Hugging Face Hub (or any endpoint speaking its API).

Everything that can be checked locally (folder, repo id, token, offline mode) is checked before
the first request; every failure becomes one `UserError` line and the local folder is never
modified. The model card is uploaded filled in for the repo it goes to (its usage snippet and
title name the repo), whatever `--repo-id` the export was given. `check_can_push` is what
`hub.push_at_end` runs before step 1 (token, repo id, offline mode, and write access to the
repo's namespace, asked of the Hub), so a push cannot fail for those after hours of training;
`describe_push` is the offline dry run.
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


def check_repo_id(repo_id: str, key: str = "--repo-id") -> None:
    if (
        not _REPO_ID.match(repo_id)
        or "--" in repo_id
        or ".." in repo_id
        or len(repo_id) > 96
        or repo_id.endswith(".git")
    ):
        raise UserError(
            f"{key} {repo_id!r} is not OWNER/NAME (letters, digits, '-', '_', '.'; no '--' or '..'; "
            "e.g. my-user/tiny-moe)"
        )


def check_export_dir(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(
            f"'{folder}' is not a directory; run `moe-lm export RUN_OR_CHECKPOINT --out DIR` first"
        )
    if not (path / "config.json").is_file():
        raise UserError(
            f"'{folder}' has no config.json, so it is not an exported model; run `moe-lm export` first"
        )
    return path


def resolve_token(token: str | None = None) -> str:
    """The token passed in, else HF_TOKEN, else the token saved by `hf auth login`."""
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


def check_online() -> None:
    from huggingface_hub import constants

    if constants.is_offline_mode():  # read at import time from HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
        raise UserError(
            "Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, which make sets); "
            "pushing needs the Hub: set HF_HUB_OFFLINE=0 (e.g. `make train HF_HUB_OFFLINE=0 ARGS=...`)"
        )


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return endpoint or constants.ENDPOINT or DEFAULT_ENDPOINT


def _hub_call(call: Any, repo_id: str, url: str) -> Any:
    """Run one Hub request; its failures become one line."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call()
    except HfHubHTTPError as e:
        raise UserError(_http_message(e, repo_id, url)) from None
    except Exception as e:
        if _is_network_error(e):
            raise UserError(
                f"cannot reach the Hub at {url} ({type(e).__name__}: {e}); check the network or --endpoint"
            ) from None
        if isinstance(e, ValueError):  # e.g. invalid README metadata, reported by the server
            raise UserError(f"the Hub at {url} rejected the request: {str(e).splitlines()[0]}") from None
        raise


def check_can_push(
    repo_id: str, endpoint: str | None = None, token: str | None = None, key: str = "--repo-id"
) -> str:
    """Whether a push to `repo_id` will be accepted: the id, a token, online mode, and (one request)
    that the token may write and its user may create repos under the repo's owner. -> the user."""
    check_repo_id(repo_id, key)
    resolved = resolve_token(token)
    check_online()
    from huggingface_hub import HfApi

    url = _endpoint(endpoint)
    me = _hub_call(lambda: HfApi(endpoint=url, token=resolved).whoami(), repo_id, url)
    user = str(me.get("name", "?"))
    owner = repo_id.split("/")[0]
    orgs = {str(o.get("name")): str(o.get("roleInOrg", "")) for o in me.get("orgs", []) or []}
    if owner != user and owner not in orgs:
        known = ", ".join([user, *orgs])
        raise UserError(
            f"the Hugging Face token belongs to '{user}', who cannot create repos under '{owner}' (namespaces: "
            f"{known}); change the owner in the repo id or use a token of a member of '{owner}'"
        )
    access = (me.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise UserError(
            f"the Hugging Face token of '{user}' is read-only; create one with write access "
            "(huggingface.co/settings/tokens) and set HF_TOKEN or run `hf auth login`"
        )
    if role == "fineGrained" and not _fine_grained_can_write(access.get("fineGrained") or {}, owner, repo_id):
        raise UserError(
            f"the fine-grained Hugging Face token of '{user}' has no repo write permission for '{repo_id}'; "
            'give it "write to repositories" for that namespace or use a write token'
        )
    if owner in orgs and orgs[owner] == "read":
        raise UserError(f"'{user}' has the read role in the organization '{owner}'; it cannot push there")
    return user


def _fine_grained_can_write(grants: dict[str, Any], owner: str, repo_id: str) -> bool:
    for grant in grants.get("scoped", []) or []:
        entity = grant.get("entity") or {}
        if "repo.write" not in (grant.get("permissions") or []):
            continue
        if entity.get("name") == owner or (entity.get("type") == "model" and entity.get("name") == repo_id):
            return True
    return False


def _check_inside(f: Path, rel: str, root: Path) -> None:
    """A push sends what is in the export folder, nothing else: a symbolic link that leads out of
    it (to a token file, a home directory) is refused, whatever it points at."""
    if not f.is_symlink():
        return
    target = f.resolve()
    if not target.is_relative_to(root):
        raise UserError(
            f"'{rel}' in {root} is a symbolic link to {target}, outside the folder; a push uploads only what is "
            "inside it: copy the file in or remove the link"
        )


def _upload_files(path: Path, repo_id: str) -> list[tuple[str, Path | bytes]]:
    """(path in the repo, file or bytes) of every file under `path`; the card filled in for `repo_id`."""
    from moe_lm.hf.model_card import retarget_card

    files: list[tuple[str, Path | bytes]] = []
    root = path.resolve()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # hidden files (.cache/ of huggingface_hub, editor leftovers) stay local
        _check_inside(f, rel, root)
        if not f.is_file():
            continue
        if rel == "README.md":
            files.append((rel, retarget_card(f.read_text(), repo_id).encode()))
        else:
            files.append((rel, f))
    return files


def describe_push(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """`moe-lm push --dry-run`: what a push would send and where; no request, no token needed."""
    path = check_export_dir(folder)
    check_repo_id(repo_id)
    files = _upload_files(path, repo_id)
    sizes = [(rel, len(data) if isinstance(data, bytes) else data.stat().st_size) for rel, data in files]
    width = max(len(rel) for rel, _ in sizes)
    from huggingface_hub import get_token

    token = (
        "found"
        if (os.environ.get("HF_TOKEN") or get_token())
        else "none (set HF_TOKEN or run `hf auth login`)"
    )
    lines = [
        f"dry run: would push {path} to {repo_id} (branch {revision or 'main'}, created "
        f"{'private' if private else 'public'} if new) at {_endpoint(endpoint)}; token: {token}",
        *(
            f"  {rel:<{width}}  {_human(size):>9}"
            + ("  (model card, filled in for this repo)" if rel == "README.md" else "")
            for rel, size in sizes
        ),
        f"{len(sizes)} files, {_human(sum(s for _, s in sizes))}; nothing was sent",
    ]
    return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000  # type: ignore[assignment]
    return str(size)


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
    check_online()
    from huggingface_hub import CommitOperationAdd, HfApi

    url = _endpoint(endpoint)
    api = HfApi(endpoint=url, token=resolved)
    operations = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data)
        for rel, data in _upload_files(path, repo_id)
    ]

    def push() -> Any:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            revision=revision,
            commit_message=commit_message or f"Upload {path.name} with moe_lm",
            repo_type="model",
        )

    info = _hub_call(push, repo_id, url)
    return str(getattr(info, "commit_url", info))


def push_at_end(cfg: Config, checkpoint_dir: str | Path | None, endpoint: str | None = None) -> str:
    """For `moe-lm train` with hub.push_at_end: export the final checkpoint to RUN/export/ and push
    it with `cfg.hub` (checked with `check_can_push` before the first step)."""
    from moe_lm.hf.export import export_checkpoint

    if checkpoint_dir is None:
        raise UserError(
            f"hub.push_at_end: {cfg.output_dir / 'checkpoints'} holds no complete checkpoint to push"
        )
    if not cfg.hub.repo_id:
        raise UserError("hub.push_at_end needs hub.repo_id (OWNER/NAME)")
    check_repo_id(cfg.hub.repo_id, "hub.repo_id")
    resolve_token()  # fail before spending time on the export
    out = export_checkpoint(
        checkpoint_dir,
        cfg.output_dir / "export",
        dtype=cfg.hub.dtype,
        repo_id=cfg.hub.repo_id,
        overwrite=True,
    )
    try:
        return push_folder(
            out,
            cfg.hub.repo_id,
            private=cfg.hub.private,
            endpoint=endpoint,
            commit_message=f"{cfg.name}: final checkpoint {Path(checkpoint_dir).name}",
        )
    except UserError as e:
        raise UserError(
            f"{e} (training finished and {out} holds the export: push it later with "
            f"`moe-lm push {out} --repo-id {cfg.hub.repo_id}`)"
        ) from None

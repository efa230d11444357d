"""`weightsmith push`: upload a verified weightsmith output to the Hugging Face Hub.

Only what `verify` accepts goes up: the files the manifest lists (hashes re-checked first) plus
manifest.json itself. Stale shards are removed in the same commit when the shard count changed.
The token comes from huggingface_hub (HF_TOKEN or the user's `hf auth login`); weightsmith never
reads it into its own files or logs. The Hub client is made by `make_api`, which tests replace
with a local stand-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from weightsmith.errors import UsageError, WeightsmithError

# Remote files that belong to a previous upload's sharding and must not survive a new one.
STALE_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: list[str]
    total_bytes: int
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str = ""
    delete_patterns: list[str] = field(default_factory=lambda: list(STALE_PATTERNS))

    def as_json(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "folder": str(self.folder),
            "files": self.files,
            "total_bytes": self.total_bytes,
            "private": self.private,
            "revision": self.revision,
            "create_pr": self.create_pr,
            "delete_patterns": self.delete_patterns,
            "commit_message": self.commit_message,
        }


def make_api(endpoint: str | None = None, token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def plan_push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    include=(),
    exclude=(),
) -> PushPlan:
    """Verify the folder and list exactly what would be uploaded. Raises if verification fails.

    `include`/`exclude` are globs over the output's files (as `hf upload` takes them); manifest.json
    always goes up. Stale shards are deleted remotely only when every weight file is uploaded."""
    from weightsmith.checkpoint import manifest as mf

    folder = Path(folder)
    if not _REPO_ID.match(repo_id):
        raise UsageError(f"{repo_id!r}: not a Hub repo id; expected OWNER/NAME (letters, digits, '-', '_', '.')")
    if not (folder / "manifest.json").is_file():
        raise UsageError(
            f"{folder}: no manifest.json; only weightsmith outputs can be pushed (run a pass, e.g. `weightsmith import "
            f"SRC {folder}`)"
        )
    problems = mf.verify_output(folder)
    if problems:
        raise WeightsmithError(
            f"{folder}: refusing to push, `weightsmith verify` fails: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    manifest = mf.read(folder)
    every = sorted({*manifest.get("outputs", {}).get("files", {}), "manifest.json"})
    files = [
        f
        for f in every
        if f == "manifest.json"
        or ((not include or any(fnmatch(f, p) for p in include)) and not any(fnmatch(f, p) for p in exclude))
    ]
    whole = all(f in files for f in every if f.endswith(".safetensors") or f == "model.safetensors.index.json")
    total = sum((folder / f).stat().st_size for f in files)
    step = manifest.get("pass", {}).get("name", "weightsmith")
    message = commit_message or f"weightsmith {step}: {len(files)} files"
    return PushPlan(
        folder, repo_id, files, total, private, revision, create_pr, message, list(STALE_PATTERNS) if whole else []
    )


def push(plan: PushPlan, *, api=None, endpoint: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Create the repo if needed and upload the plan's files in one commit (stale shards deleted)."""
    api = api if api is not None else make_api(endpoint, token)
    if getattr(api, "token", None) is None:
        from huggingface_hub import get_token

        if get_token() is None:
            raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (weightsmith never stores it)")
    try:
        api.create_repo(plan.repo_id, private=plan.private, repo_type="model", exist_ok=True)
        if plan.revision and not plan.create_pr:
            api.create_branch(plan.repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=str(plan.folder),
            repo_type="model",
            revision=plan.revision,
            create_pr=plan.create_pr,
            commit_message=plan.commit_message,
            allow_patterns=plan.files,
            delete_patterns=plan.delete_patterns or None,
        )
    except WeightsmithError:
        raise
    except Exception as e:  # network / auth / permission: one line, the library's own words
        raise WeightsmithError(
            f"push to {plan.repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    return {**plan.as_json(), "url": url}

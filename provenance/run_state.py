"""Crash-safe run state: what a restarted run needs to continue after its last finished round.

After every round the server commits, in ``<run_dir>/state/``:

- the global model of that round (``global_<round>.pt``, or ``.ckks`` when encrypted);
- ``run_state.json``: run id, round, current version and its hash, the
  model file, the strategy stack's state (reputation, quarantine, sizes) and
  Python's ``random`` state (Flower samples nodes with it).

``run_state.json`` is replaced atomically (write, fsync, rename), and the
model file is written before it, so a crash at any point leaves either the
previous committed state or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "run_state.json"


@dataclass
class RunState:
    """One committed round.

    Parameters
    ----------
    run_id : str
        The run's id (stays the same across restarts).
    server_round : int
        Last finished round (0 before the first).
    version : int
        Current global model version (0 = the initial model).
    model_hash : str
        Hash of the current global model (state hash or batch digest).
    model_file : str
        File name of the current global model inside the state folder.
    strategy_state : dict
        JSON-serializable state of the strategy stack, keyed by layer name.
    random_state : list
        ``random.getstate()`` as JSON-friendly lists.
    """

    run_id: str
    server_round: int
    version: int
    model_hash: str
    model_file: str
    strategy_state: dict[str, Any] = field(default_factory=dict)
    random_state: list[Any] = field(default_factory=list)


def state_dir(run_dir: Path) -> Path:
    """Return (and create) the state folder of a run."""
    path = Path(run_dir) / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def capture_random_state() -> list[Any]:
    """Return Python's ``random`` state in a JSON-serializable form."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_random_state(saved: list[Any]) -> None:
    """Restore a state captured by ``capture_random_state``."""
    if saved:
        version, internal, gauss = saved
        random.setstate((version, tuple(internal), gauss))


def commit(run_dir: Path, state: RunState) -> None:
    """Write ``run_state.json`` atomically; the model file must already be on disk."""
    folder = state_dir(run_dir)
    if not (folder / state.model_file).exists():
        raise FileNotFoundError(f"Commit refers to {folder / state.model_file}, which does not exist; write the model first.")

    temporary = folder / (STATE_FILE + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(asdict(state), handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / STATE_FILE)
    logger.debug("Committed round %d (version %d) in %s", state.server_round, state.version, folder)


def load(run_dir: Path) -> RunState | None:
    """Return the last committed state of a run, or None if it never committed a round."""
    path = Path(run_dir) / STATE_DIR / STATE_FILE
    if not path.exists():
        return None
    return RunState(**json.loads(path.read_text(encoding="utf-8")))


def prune_models(run_dir: Path, keep: str) -> None:
    """Delete committed model files other than ``keep`` (versions live in the version store)."""
    for path in state_dir(run_dir).glob("global_*"):
        if path.name != keep:
            path.unlink(missing_ok=True)

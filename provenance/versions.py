"""Versioned global models: files in a checkpoint folder, indexed in a database.

Every promoted global model becomes a version with its parent, round, hash,
metrics and timestamp. Plaintext versions are ``torch.save`` state dicts
(``.pt``); encrypted versions are CKKS batches (``.ckks``, see
``server.model_store``) and their hash is the batch digest the audit log
records. The index is a SQLAlchemy table, so it lives in SQLite by default
and in any database SQLAlchemy reaches (PostgreSQL included).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Integer, String, UniqueConstraint, create_engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

logger = logging.getLogger(__name__)


class _Base(DeclarativeBase):
    pass


class ModelVersionRow(_Base):
    """One global model version of one run."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("run_id", "version", name="uq_run_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    server_round: Mapped[int] = mapped_column(Integer)
    model_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class ModelVersion:
    """A version as callers see it (detached from the database session)."""

    run_id: str
    version: int
    parent: int | None
    server_round: int
    model_hash: str
    path: str
    encrypted: bool
    metrics: dict[str, Any]
    created_at: datetime


def _to_version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(
        run_id=row.run_id,
        version=row.version,
        parent=row.parent,
        server_round=row.server_round,
        model_hash=row.model_hash,
        path=row.path,
        encrypted=row.encrypted,
        metrics=dict(row.metrics or {}),
        # SQLite returns the stored UTC time without its zone.
        created_at=row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc),
    )


def _safe_url(url: str) -> str:
    """Return ``url`` with any password replaced, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported as it is, minus nothing secret
        return "<unparsable database URL>"


class VersionIndex:
    """The ``model_versions`` table in the database at ``url``.

    Raises
    ------
    RuntimeError
        If the database cannot be opened; the message names the URL (without
        its password) and the fix.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._engine = create_engine(url, future=True)
            _Base.metadata.create_all(self._engine)
        except SQLAlchemyError as error:
            raise RuntimeError(
                f"Cannot open the model version database {_safe_url(url)}: {error.__class__.__name__}. "
                "Check the URL (e.g. sqlite:////abs/path.sqlite or postgresql+psycopg://user@host/db) and that the server runs."
            ) from error

    def add(self, version: ModelVersion) -> None:
        """Insert one version."""
        with Session(self._engine) as session, session.begin():
            session.add(ModelVersionRow(**version.__dict__))

    def set_metrics(self, run_id: str, version: int, metrics: dict[str, Any]) -> None:
        """Replace the metrics of a stored version (evaluation arrives after aggregation)."""
        with Session(self._engine) as session, session.begin():
            row = session.scalars(select(ModelVersionRow).where(ModelVersionRow.run_id == run_id, ModelVersionRow.version == version)).one_or_none()
            if row is not None:
                # JSON columns reject NaN; an undefined metric is stored as null.
                row.metrics = {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in metrics.items()}

    def discard_after(self, run_id: str, version: int) -> int:
        """Delete versions of ``run_id`` newer than ``version`` (made by a round that never committed); return how many."""
        with Session(self._engine) as session, session.begin():
            rows = session.scalars(select(ModelVersionRow).where(ModelVersionRow.run_id == run_id, ModelVersionRow.version > version)).all()
            for row in rows:
                session.delete(row)
        return len(rows)

    def list(self, run_id: str | None = None) -> list[ModelVersion]:
        """Return versions ordered by run and version, optionally for one run."""
        query = select(ModelVersionRow).order_by(ModelVersionRow.run_id, ModelVersionRow.version)
        if run_id is not None:
            query = query.where(ModelVersionRow.run_id == run_id)
        with Session(self._engine) as session:
            return [_to_version(row) for row in session.scalars(query)]

    def get(self, version: int, run_id: str | None = None) -> ModelVersion:
        """Return one version; with several runs in the database, ``run_id`` picks the run.

        Raises
        ------
        KeyError
            If no such version exists, or it is ambiguous across runs.
        """
        matches = [v for v in self.list(run_id) if v.version == version]
        if not matches:
            raise KeyError(f"No model version {version}" + (f" in run {run_id}" if run_id else "") + "; see `fedseal models list`.")
        if len(matches) > 1:
            runs = ", ".join(v.run_id for v in matches)
            raise KeyError(f"Version {version} exists in several runs ({runs}); pass --run.")
        return matches[0]

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()


def new_version(run_id: str, version: int, parent: int | None, server_round: int, model_hash: str, path: Path, encrypted: bool) -> ModelVersion:
    """Build a ``ModelVersion`` stamped with the current UTC time."""
    return ModelVersion(
        run_id=run_id,
        version=version,
        parent=parent,
        server_round=server_round,
        model_hash=model_hash,
        path=str(path),
        encrypted=encrypted,
        metrics={},
        created_at=datetime.now(timezone.utc),
    )

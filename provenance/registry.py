"""The node registry: which node may sign updates with which key.

One table, ``fedseal_nodes``, in any database that SQLAlchemy 2.x reaches:
SQLite in a file by default, PostgreSQL with ``postgresql+psycopg://...``.
Per node it stores the node id (the partition id that replies carry), the raw
Ed25519 public key in hex and an organisation label. It also stores a status
(``active``, ``quarantined``, ``revoked``), creation and update times (UTC),
and how many of the node's updates passed or failed the server's signature
check.

Only ``active`` nodes may contribute. The table is created when missing;
there are no migrations yet.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import CheckConstraint, DateTime, Engine, Integer, String, bindparam, create_engine, select, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

logger = logging.getLogger(__name__)

ACTIVE = "active"
QUARANTINED = "quarantined"
REVOKED = "revoked"
STATUSES = (ACTIVE, QUARANTINED, REVOKED)

DEFAULT_FILENAME = "registry.sqlite"
# Organisation label of the he_robust trust validator's key: only such a key may sign a trust reference.
VALIDATOR_ORGANISATION = "validator"
# Seconds to wait for a database server before reporting it unreachable.
CONNECT_TIMEOUT_S = 10

_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class RegistryError(RuntimeError):
    """The registry cannot be opened or an operation on it failed."""


class UnknownNodeError(RegistryError, LookupError):
    """A node id is not in the registry."""


class NodeExistsError(RegistryError):
    """A node id is already registered with another key."""


class Base(DeclarativeBase):
    """Declarative base of the registry tables."""


class NodeRow(Base):
    """One registered node (table ``fedseal_nodes``)."""

    __tablename__ = "fedseal_nodes"
    __table_args__ = (CheckConstraint(f"status IN ({', '.join(repr(s) for s in STATUSES)})", name="fedseal_nodes_status"),)

    node_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    public_key: Mapped[str] = mapped_column(String(64))
    organisation: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=ACTIVE)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class NodeInfo:
    """A registry row, detached from the database session.

    ``accepted`` and ``rejected`` count the node's updates that passed or
    failed the server's signature check.
    """

    node_id: int
    public_key: str
    organisation: str
    status: str
    created_at: datetime
    updated_at: datetime
    accepted: int
    rejected: int

    @classmethod
    def from_row(cls, row: NodeRow) -> NodeInfo:
        """Copy ``row``, marking naive times as UTC (SQLite drops the zone)."""
        return cls(
            node_id=row.node_id,
            public_key=row.public_key,
            organisation=row.organisation,
            status=row.status,
            created_at=_as_utc(row.created_at),
            updated_at=_as_utc(row.updated_at),
            accepted=row.accepted,
            rejected=row.rejected,
        )


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _now() -> datetime:
    return datetime.now(timezone.utc)


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of an SQLite file at ``path`` (made absolute)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def sqlite_path(url: str) -> Path | None:
    """Return the file of an ``sqlite:///`` URL, or None for in-memory SQLite and other databases."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(url[len(prefix) :])


def redact(url: str | URL) -> str:
    """Return ``url`` with any password replaced by ``***``, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        # An unparsable URL may still contain a password after "//user:".
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", str(url))


class NodeRegistry:
    """The node registry in the database at ``url``; creates its table when missing.

    Parameters
    ----------
    url : str
        A SQLAlchemy URL, e.g. ``sqlite:////srv/fedseal/registry.sqlite`` or
        ``postgresql+psycopg://user:password@host:5432/fedseal``.

    Raises
    ------
    RegistryError
        If the URL is invalid, its driver is not installed, or the database
        cannot be reached. The message shows the URL without its password.
    """

    def __init__(self, url: str | URL) -> None:
        self.url = redact(url)
        self.engine = _connect(url, self.url)

    def __repr__(self) -> str:
        return f"NodeRegistry({self.url!r})"

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def register(self, node_id: int, public_key: str, organisation: str, replace: bool = False) -> NodeInfo:
        """Add node ``node_id`` with its raw public key in hex and organisation label.

        Registering the same key again updates the label. With ``replace``, a
        new key replaces the old one (key rotation) and the status is kept, so
        re-keying never reactivates a revoked node.

        Raises
        ------
        ValueError
            If ``public_key`` is not 64 lowercase hex characters or ``node_id`` is negative.
        NodeExistsError
            If the node is registered with another key and ``replace`` is False.
        """
        if not _HEX_KEY.fullmatch(public_key):
            raise ValueError(f"public_key must be the raw Ed25519 key as 64 lowercase hex characters, got {public_key[:80]!r}.")
        if int(node_id) < 0:
            raise ValueError(f"node_id must be >= 0 (it is the node's partition id), got {node_id}.")

        with self._transaction() as session:
            row = session.get(NodeRow, int(node_id))
            now = _now()
            if row is None:
                row = NodeRow(node_id=int(node_id), public_key=public_key, organisation=organisation, status=ACTIVE, created_at=now, updated_at=now, accepted=0, rejected=0)
                session.add(row)
            elif row.public_key != public_key and not replace:
                raise NodeExistsError(f"Node {node_id} is already registered with another key in {self.url}; pass --overwrite to rotate its key.")
            else:
                row.public_key = public_key
                row.organisation = organisation
                row.updated_at = now
            session.flush()
            info = NodeInfo.from_row(row)
        logger.info("Registered node %d (%s) in %s", info.node_id, info.organisation, self.url)
        return info

    def get(self, node_id: int) -> NodeInfo | None:
        """Return node ``node_id``, or None when it is not registered."""
        with self._transaction() as session:
            row = session.get(NodeRow, int(node_id))
            return NodeInfo.from_row(row) if row is not None else None

    def list_nodes(self) -> list[NodeInfo]:
        """Return every registered node, ordered by node id."""
        with self._transaction() as session:
            rows = session.scalars(select(NodeRow).order_by(NodeRow.node_id)).all()
            return [NodeInfo.from_row(row) for row in rows]

    def set_status(self, node_id: int, status: str) -> NodeInfo:
        """Set node ``node_id``'s status to ``active``, ``quarantined`` or ``revoked``.

        Raises
        ------
        ValueError
            If ``status`` is not one of those.
        UnknownNodeError
            If the node is not registered.
        """
        if status not in STATUSES:
            raise ValueError(f"Unknown node status {status!r}; use one of {', '.join(STATUSES)}.")

        with self._transaction() as session:
            row = session.get(NodeRow, int(node_id))
            if row is None:
                raise UnknownNodeError(f"Node {node_id} is not registered in {self.url}; `fedseal nodes list --db URL` shows the registered ids.")
            unchanged = row.status == status
            if not unchanged:
                # The updated time records the last real change, so a repeated command leaves it alone.
                row.status = status
                row.updated_at = _now()
                session.flush()
            info = NodeInfo.from_row(row)
        if unchanged:
            logger.info("Node %d is already %s in %s", info.node_id, status, self.url)
        else:
            logger.info("Node %d is now %s in %s", info.node_id, status, self.url)
        return info

    def revoke(self, node_id: int) -> NodeInfo:
        """Mark node ``node_id`` revoked, so the server rejects its updates from the next round on."""
        return self.set_status(node_id, REVOKED)

    def record_contributions(self, accepted: Iterable[int] = (), rejected: Iterable[int] = ()) -> None:
        """Add one to the accepted or rejected count of each listed node, in one transaction.

        A node id may appear several times. Ids that are not registered are skipped.
        """
        table = NodeRow.__table__
        with self._transaction() as session:
            for column, node_ids in ((table.c.accepted, accepted), (table.c.rejected, rejected)):
                counts: dict[int, int] = {}
                for node_id in node_ids:
                    counts[int(node_id)] = counts.get(int(node_id), 0) + 1
                if not counts:
                    continue
                # One executemany of "column = column + n": correct even when
                # several servers write to one registry at the same time.
                statement = update(table).where(table.c.node_id == bindparam("row_id")).values({column: column + bindparam("increment")})
                session.execute(statement, [{"row_id": node_id, "increment": count} for node_id, count in counts.items()])

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """Yield a session inside one transaction; report database failures as RegistryError."""
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                yield session
        except SQLAlchemyError as error:
            raise RegistryError(f"Node registry {self.url} failed: {_first_line(error)}. Check that the database is reachable.") from error


def _first_line(error: BaseException) -> str:
    cause = getattr(error, "orig", None) or error
    return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__


def _connect(url: str | URL, redacted_url: str) -> Engine:
    """Create the engine, connect once to check the database is reachable, and create the table."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise RegistryError(
            f"Invalid registry URL {redacted_url!r}: {error}. Use a SQLAlchemy URL such as "
            "sqlite:////path/registry.sqlite or postgresql+psycopg://user:password@host:5432/db."
        ) from error

    connect_args: dict[str, object] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    try:
        engine = create_engine(parsed, connect_args=connect_args)
    except (NoSuchModuleError, ModuleNotFoundError) as error:
        raise RegistryError(
            f"No database driver for registry URL {redacted_url}: {error}. Install the driver "
            "(PostgreSQL: pip install 'psycopg[binary]') or fix the URL's dialect."
        ) from error

    try:
        Base.metadata.create_all(engine)
    except SQLAlchemyError as error:
        engine.dispose()
        raise RegistryError(
            f"Cannot open the node registry at {redacted_url}: {_first_line(error)}. Check that the database server "
            "is running and that the URL's host, port, user, password and database are right."
        ) from error
    return engine

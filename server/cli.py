"""``fedseal``: operator utilities around training runs.

    fedseal data check [--root DIR] [--download]
    fedseal summary RUN_DIR
    fedseal report DIR --out OUTDIR
    fedseal keys init --out DIR [--preset compact_wide] [--overwrite] [--scoring] [--nodes N [--validator] [--org LABEL ...] [--db URL]]
                      [--tls [--ca-cert FILE --ca-key FILE] [--san HOST ...]]
    fedseal nodes list --db URL
    fedseal nodes revoke ID --db URL
    fedseal audit verify PATH
    fedseal models list --db URL_OR_RUN_DIR [--run RUN_ID]
    fedseal models export VERSION --db URL_OR_RUN_DIR --out FILE [--run RUN_ID]
    fedseal models decrypt RUN_DIR --secret-dir DIR --out FILE
    fedseal deploy local --nodes N --state-dir DIR [--insecure] [--timeout S] -- OVERRIDES
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from crypto.ckks import params as ckks_presets

logger = logging.getLogger(__name__)


# Dataset keys of which one is enough: the fraud scenario reads the full file
# or, when it is absent, the 50k subsample.
ALTERNATIVE_FILES = (("fraud/full", "fraud/sub50k"),)


def _data_check(args: argparse.Namespace) -> int:
    """Verify every registered dataset file under the data root; exit 1 if a scenario lacks a usable file."""
    from scenarios.datasets import FILES, ChecksumError, DatasetError, ensure_file, resolve_data_root

    root = resolve_data_root(args.root)
    print(f"data root: {root}")
    missing, invalid = set(), set()
    for key in sorted(FILES):
        try:
            path = ensure_file(key, root, allow_download=args.download)
            print(f"  ok       {key:32s} {path}")
        except DatasetError as error:
            first_line = str(error).splitlines()[0]
            (invalid if isinstance(error, ChecksumError) else missing).add(key)
            status = "invalid" if isinstance(error, ChecksumError) else "missing"
            print(f"  {status:8s} {key:32s} {first_line}")

    # A missing file is fine when another file of its group is usable; a corrupt one never is.
    for group in ALTERNATIVE_FILES:
        if any(key not in missing and key not in invalid for key in group):
            for key in missing.intersection(group):
                print(f"  {key} is not needed: {' or '.join(group)} is enough, and one of them is usable.")
            missing -= set(group)

    failed = len(missing) + len(invalid)
    if failed:
        print(f"{failed} file(s) not usable; set FEDSEAL_DATA_DIR or --root to the datasets folder, or pass --download.")
    return 1 if failed else 0


def _summary(args: argparse.Namespace) -> int:
    """Print the final table of a finished run directory."""
    from server.summary import print_table

    path = Path(args.run_dir) / "summary.json"
    if not path.exists():
        print(f"error: {path} not found; pass a run directory written by fedseal-train.", file=sys.stderr)
        return 2
    print_table(json.loads(path.read_text(encoding="utf-8")))
    return 0


def _keys_init_problem(args: argparse.Namespace) -> str | None:
    """Return why the options of ``fedseal keys init`` cannot work, before any key is written, or None."""
    from deploy.keys_cli import check_tls_arguments

    if args.nodes < 0:
        return f"--nodes {args.nodes} is negative; pass the number of training nodes, e.g. --nodes 3, or leave it out."
    if args.validator and not args.nodes:
        return "--validator needs --nodes N; the validator's signing key is node N, after the training nodes."
    if args.org and args.nodes and len(args.org) not in (1, args.nodes):
        return f"--org was given {len(args.org)} times for {args.nodes} nodes; give it once for all nodes or once per node."
    return check_tls_arguments(args)


def _read_fingerprint(out: Path) -> str:
    path = out / "fingerprint.txt"
    return path.read_text(encoding="utf-8").strip() if path.exists() else "(unknown: no fingerprint.txt)"


def _keys_init(args: argparse.Namespace) -> int:
    """Create the CKKS material of a federation, then signing keys and TLS material if requested."""
    from crypto.ckks import SECRET_CONTEXT_FILENAME
    from crypto.ckks.scoring import SCORING_SECRET_CONTEXT_FILENAME
    from server.keys import NODE_DIR, SERVER_DIR, init_ckks_keys, init_scoring_keys

    problem = _keys_init_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    # --scoring, --validator or --nodes on a folder that already has the aggregation key adds what they name and keeps the rest.
    keep_ckks = (args.scoring or args.validator or args.nodes) and not args.overwrite and (out / NODE_DIR / SECRET_CONTEXT_FILENAME).exists()
    keep_scoring = args.validator and not args.overwrite and (out / NODE_DIR / SCORING_SECRET_CONTEXT_FILENAME).exists()
    try:
        fingerprint = _read_fingerprint(out) if keep_ckks else init_ckks_keys(out, args.preset, overwrite=args.overwrite)
        wants_scoring = args.scoring and not keep_scoring
        scoring_fingerprint = init_scoring_keys(out, args.scoring_preset, overwrite=args.overwrite) if wants_scoring else None
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"CKKS {'keys kept' if keep_ckks else f'preset {args.preset}'}, fingerprint {fingerprint}")
    if scoring_fingerprint is not None:
        print(f"Scoring preset {args.scoring_preset} (strategy=he_robust), fingerprint {scoring_fingerprint}")
    print(f"  server (public context only): {out / SERVER_DIR}")
    print(f"  nodes (secret context, mode 0600; install on every site, never on the server): {out / NODE_DIR}")
    code = _signing_keys_init(args) if args.nodes else 0
    if code == 0 and (args.tls or args.ca_cert or args.ca_key):
        from deploy.keys_cli import tls_keys_init

        code = tls_keys_init(args)
    return code


def _signing_keys_init(args: argparse.Namespace) -> int:
    """Create the nodes' Ed25519 signing keys and register them."""
    from crypto.signing import SIGNING_DIR
    from provenance.registry import RegistryError
    from server.keys import init_signing_keys

    out = Path(args.out)
    try:
        # Without --overwrite, nodes that have a key keep it and only the missing keys are made.
        nodes = init_signing_keys(out, args.nodes, args.db, args.org, overwrite=args.overwrite, validator=args.validator, add_missing=True)
    except (FileExistsError, ValueError, RegistryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Ed25519 signing keys for {len(nodes)} node{'' if len(nodes) == 1 else 's'} in {Path(args.out) / SIGNING_DIR} (install node-<id>/signing.key on that site only)")
    if args.validator and any(node.node_id == args.nodes for node in nodes):
        print(f"  node {args.nodes} is the he_robust trust validator: install its key where the validator SuperNode runs (partition-id={args.nodes})")
    _print_nodes(nodes)
    return 0


def _open_registry(db: str):
    """Return the existing registry at ``db``, or None after printing why it cannot be opened.

    ``db`` is a SQLAlchemy URL, a key folder that contains ``registry.sqlite``,
    or the path of an SQLite file. An SQLite file must exist, so that a
    mistyped path reports an error instead of creating an empty registry.
    """
    from provenance.registry import DEFAULT_FILENAME, NodeRegistry, RegistryError, sqlite_path, sqlite_url

    if "://" in db:
        url, path = db, sqlite_path(db)
    else:
        path = Path(db) / DEFAULT_FILENAME if Path(db).is_dir() else Path(db)
        url = sqlite_url(path)
    if path is not None and not path.is_file():
        print(f"error: node registry {path} not found; pass the folder or URL that `fedseal keys init --out DIR --nodes N` wrote (DIR/{DEFAULT_FILENAME}).", file=sys.stderr)
        return None
    try:
        return NodeRegistry(url)
    except RegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _print_nodes(nodes: list) -> None:
    print(f"{'id':>5}  {'status':<11}  {'organisation':<20}  {'accepted':>8}  {'rejected':>8}  {'created (UTC)':<19}  {'updated (UTC)':<19}  public key")
    for node in nodes:
        created = node.created_at.strftime("%Y-%m-%d %H:%M:%S")
        updated = node.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{node.node_id:>5}  {node.status:<11}  {node.organisation:<20}  {node.accepted:>8}  {node.rejected:>8}  {created:<19}  {updated:<19}  {node.public_key}")


def _nodes_list(args: argparse.Namespace) -> int:
    """Print the node registry as a table."""
    registry = _open_registry(args.db)
    if registry is None:
        return 2
    nodes = registry.list_nodes()
    registry.close()
    if not nodes:
        print(f"No nodes registered in {registry.url}; add them with `fedseal keys init --out DIR --nodes N --db URL`.")
        return 0
    _print_nodes(nodes)
    return 0


def _nodes_revoke(args: argparse.Namespace) -> int:
    """Revoke a node so the server rejects its updates; exit 1 if the id is unknown."""
    from provenance.registry import REVOKED

    args.status = REVOKED
    return _nodes_set_status(args)


def _nodes_set_status(args: argparse.Namespace) -> int:
    """Set a node's status, e.g. to reinstate a revoked or quarantined node; exit 1 if the id is unknown."""
    from provenance.registry import UnknownNodeError

    registry = _open_registry(args.db)
    if registry is None:
        return 2
    try:
        node = registry.set_status(args.node_id, args.status)
    except UnknownNodeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        registry.close()
    effect = "the server accepts its signed updates" if args.status == "active" else "the server rejects its updates"
    print(f"Node {node.node_id} ({node.organisation}) is {node.status}; {effect} from the next round on.")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    """Re-check an audit log's hash chain, then its update signatures; exit 1 and name the first bad line."""
    from provenance.audit import verify_chain
    from strategies.signatures import verify_audit_signatures

    path = Path(args.path)
    if path.is_dir():
        path = path / "audit.jsonl"
    if not path.exists():
        print(f"error: {path} not found; pass an audit.jsonl file or its run directory.", file=sys.stderr)
        return 2
    result = verify_chain(path)
    if not result.ok:
        print(f"{path}: BROKEN at line {result.bad_line}: {result.reason}")
        return 1

    signatures = verify_audit_signatures(path)
    if not signatures.ok:
        print(f"{path}: BAD SIGNATURE at line {signatures.bad_line}: {signatures.reason}")
        return 1
    print(f"{path}: OK, {result.entries} entries, {signatures.checked} update signatures, last hash {result.last_hash}")
    return 0


def _models_decrypt(args: argparse.Namespace) -> int:
    """Decrypt a run's final encrypted model with a node's secret context (run this on a site).

    ``strategy=he_fedavg`` runs store an aggregation batch and ``strategy=he_robust``
    runs a scoring drift; the file's format picks the key, so the options are the same.
    """
    import torch

    from clients.encrypted import flatten, unflatten
    from crypto.ckks.scoring.aggregate import is_encrypted_drift
    from server.federation import ENCRYPTED_CHECKPOINT_NAME, INITIAL_MODEL_NAME
    from server.model_store import read_batch

    run_dir = Path(args.run_dir)
    encrypted = run_dir / ENCRYPTED_CHECKPOINT_NAME
    if not encrypted.exists():
        plain = " (it holds model_final.pt: the run was not encrypted, so load that file instead)" if (run_dir / "model_final.pt").exists() else ""
        print(f"error: {encrypted} not found{plain}; pass the folder of a run with strategy=he_fedavg or strategy=he_robust.", file=sys.stderr)
        return 2
    initial = torch.load(run_dir / INITIAL_MODEL_NAME)
    base = flatten(initial)
    drift_batch = read_batch(encrypted)
    if len(drift_batch) == 1 and is_encrypted_drift(drift_batch[0]):
        drift, code = _decrypt_scoring_drift(Path(args.secret_dir), drift_batch[0], base.size, encrypted)
    else:
        drift, code = _decrypt_aggregation_batch(Path(args.secret_dir), drift_batch, base.size, encrypted)
    if drift is None:
        return code

    state = unflatten(base + drift, initial)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"Decrypted model written to {args.out}")
    return 0


def _decrypt_aggregation_batch(secret_dir: Path, batch: list[bytes], length: int, source: Path):
    """Return (drift, 0) of a he_fedavg batch, or (None, exit code) after printing why it failed."""
    from crypto import ckks

    try:
        secret = ckks.read_secret_context(secret_dir)
        return ckks.decrypt_sum(secret, batch, length), 0
    except ckks.ContextFileError:
        print(f"error: no secret context ({ckks.SECRET_CONTEXT_FILENAME}) in {secret_dir}; pass --secret-dir the node/ folder written by `fedseal keys init`, or RUN_DIR/keys/node for a simulation's own keys.", file=sys.stderr)
        return None, 2
    except ckks.FingerprintMismatchError:
        model_key = ckks.read_header(batch).fingerprint
        print(
            f"error: the secret context in {secret_dir} (fingerprint {secret.fingerprint[:16]}) does not match the key the model in {source} "
            f"was encrypted under (fingerprint {model_key[:16]}); pass the node/ folder of this run's keys.",
            file=sys.stderr,
        )
        return None, 2


def _decrypt_scoring_drift(secret_dir: Path, data: bytes, length: int, source: Path):
    """Return (drift, 0) of a he_robust scoring drift, or (None, exit code) after printing why it failed."""
    from crypto.ckks.errors import CkksError, ContextFileError, FingerprintMismatchError
    from crypto.ckks.scoring import (
        SCORING_SECRET_CONTEXT_FILENAME,
        read_scoring_secret_context,
    )
    from crypto.ckks.scoring.aggregate import EncryptedDrift, decrypt_drift, drift_fingerprint

    try:
        secret = read_scoring_secret_context(secret_dir)
    except ContextFileError:
        print(
            f"error: no scoring secret context ({SCORING_SECRET_CONTEXT_FILENAME}) in {secret_dir}; the run used strategy=he_robust, so pass --secret-dir "
            "the node/ folder written by `fedseal keys init --scoring`, or RUN_DIR/keys/node for a simulation's own keys.",
            file=sys.stderr,
        )
        return None, 2
    try:
        drift = EncryptedDrift.from_bytes(secret, data, length)
        return decrypt_drift(secret, drift), 0
    except FingerprintMismatchError:
        print(
            f"error: the scoring secret context in {secret_dir} (fingerprint {secret.fingerprint[:16]}) does not match the key the model in {source} "
            f"was encrypted under (fingerprint {drift_fingerprint(data)[:16]}); pass the node/ folder of this run's keys.",
            file=sys.stderr,
        )
        return None, 2
    except CkksError as error:
        # A corrupted file, another model size, or a drift beyond the preset's limit.
        print(f"error: cannot decrypt the scoring drift in {source}: {error}", file=sys.stderr)
        return None, 1


def _version_index(db: str):
    """Open the version index at a SQLAlchemy URL, or in a run folder's registry.sqlite."""
    from provenance.versions import VersionIndex

    if "://" not in db:
        path = Path(db) / "registry.sqlite" if Path(db).is_dir() else Path(db)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; pass a run directory or a SQLAlchemy URL with --db.")
        db = f"sqlite:///{path.resolve()}"
    return VersionIndex(db)


def _models_list(args: argparse.Namespace) -> int:
    """Print the model versions in the index, as a table or as one JSON object per line."""
    from rich.console import Console
    from rich.table import Table

    index = _open_version_index(args.db)
    if index is None:
        return 2
    versions = index.list(args.run)
    index.close()
    if args.format == "json":
        for v in versions:
            print(json.dumps(_version_record(v), sort_keys=True))
        return 0

    table = Table(title="model versions")
    for column in ("run", "version", "parent", "round", "hash", "encrypted", "metrics", "created"):
        table.add_column(column)
    for v in versions:
        metrics = ", ".join(f"{k}={val:.4f}" for k, val in sorted(v.metrics.items()) if isinstance(val, float) and k != "num-examples")
        table.add_row(v.run_id[:12], str(v.version), str(v.parent or "-"), str(v.server_round), v.model_hash[:16], "yes" if v.encrypted else "no", metrics, v.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    # Rich assumes 80 columns when stdout is not a terminal, which crops the hash and metrics columns.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
    return 0


def _version_record(version: Any) -> dict[str, Any]:
    """Return one version as a JSON-ready dict, with its hash and metrics in full."""
    return {
        "run_id": version.run_id,
        "version": version.version,
        "parent": version.parent,
        "round": version.server_round,
        "model_hash": version.model_hash,
        "encrypted": version.encrypted,
        "path": version.path,
        "metrics": version.metrics,
        "created": version.created_at.isoformat(),
    }


def _open_version_index(db: str):
    """Return the version index at ``db``, or None after printing why it cannot be opened."""
    try:
        return _version_index(db)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _models_export(args: argparse.Namespace) -> int:
    """Copy one version's model file to ``--out`` after checking its hash."""
    import pickle
    import shutil

    import torch

    from clients.encrypted import state_hash
    from server.model_store import read_batch
    from strategies.he_fedavg import batch_digest

    index = _open_version_index(args.db)
    if index is None:
        return 2
    try:
        version = index.get(args.version, args.run)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 1
    finally:
        index.close()

    source = Path(version.path)
    if not source.exists():
        print(f"error: version {version.version}'s file {source} not found; it was moved or deleted after the run.", file=sys.stderr)
        return 1
    try:
        actual = batch_digest(read_batch(source)) if version.encrypted else state_hash(torch.load(source))
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        print(f"error: {source} cannot be read as a model file ({error}); the file was changed or truncated.", file=sys.stderr)
        return 1
    if actual != version.model_hash:
        print(f"error: {source} does not match its recorded hash {version.model_hash}; the file was changed.", file=sys.stderr)
        return 1

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, args.out)
    print(f"Version {version.version} (round {version.server_round}, {'encrypted' if version.encrypted else 'plaintext'}) exported to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with all subcommands."""
    parser = argparse.ArgumentParser(prog="fedseal", description="fedseal operator utilities.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="dataset files")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="verify the SHA-256 of every dataset file")
    check.add_argument("--root", help="data root (default: $FEDSEAL_DATA_DIR, then ~/.cache/fedseal/datasets)")
    check.add_argument("--download", action="store_true", help="download missing files from their canonical URL")
    check.set_defaults(handler=_data_check)

    summary = commands.add_parser("summary", help="print the final table of a run directory")
    summary.add_argument("run_dir", help="a folder containing summary.json")
    summary.set_defaults(handler=_summary)

    keys = commands.add_parser("keys", help="key material")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_commands.add_parser("init", help="create CKKS contexts (server/ public, node/ secret) and, with --nodes, signing keys and the node registry")
    init.add_argument("--out", required=True, help="folder to write the keys to")
    init.add_argument("--preset", default=ckks_presets.DEFAULT_PRESET, choices=sorted(ckks_presets.PRESETS), help=f"CKKS parameter preset (default: {ckks_presets.DEFAULT_PRESET})")
    init.add_argument("--overwrite", action="store_true", help="replace existing keys (old encrypted models become unreadable)")
    init.add_argument("--scoring", action="store_true", help="also create the scoring key pair that strategy=he_robust uses, in the same server/ and node/ folders")
    init.add_argument("--scoring-preset", default="scoring_8192", choices=["scoring_8192"], help="scoring CKKS preset (default: scoring_8192)")
    init.add_argument("--nodes", type=int, default=0, help="also create an Ed25519 signing key pair for nodes 0..N-1 and register them")
    init.add_argument("--validator", action="store_true", help="with --nodes N, also create and register the signing key of the strategy=he_robust strategy.rule=trust validator as node N (organisation 'validator')")
    init.add_argument("--org", action="append", help="organisation label of the nodes: once for all, or once per node (default: site-<id>)")
    init.add_argument("--db", help="SQLAlchemy URL of the node registry (default: sqlite in OUT/registry.sqlite)")
    from deploy.keys_cli import add_tls_arguments

    add_tls_arguments(init)
    init.set_defaults(handler=_keys_init)

    nodes = commands.add_parser("nodes", help="the node registry")
    nodes_commands = nodes.add_subparsers(dest="nodes_command", required=True)
    nodes_list = nodes_commands.add_parser("list", help="print the registered nodes")
    nodes_list.add_argument("--db", required=True, help="SQLAlchemy URL of the node registry (e.g. sqlite:////path/registry.sqlite), or the key folder that contains registry.sqlite")
    nodes_list.set_defaults(handler=_nodes_list)
    revoke = nodes_commands.add_parser("revoke", help="revoke a node: the server rejects its updates")
    revoke.add_argument("node_id", type=int, help="the node id (its partition id)")
    revoke.add_argument("--db", required=True, help="SQLAlchemy URL of the node registry, or the key folder that contains registry.sqlite")
    revoke.set_defaults(handler=_nodes_revoke)
    from provenance.registry import STATUSES

    set_status = nodes_commands.add_parser("set-status", help="set a node's status: active (reinstate), quarantined or revoked")
    set_status.add_argument("node_id", type=int, help="the node id (its partition id)")
    set_status.add_argument("status", choices=STATUSES, help="the new status")
    set_status.add_argument("--db", required=True, help="SQLAlchemy URL of the node registry, or the key folder that contains registry.sqlite")
    set_status.set_defaults(handler=_nodes_set_status)

    audit = commands.add_parser("audit", help="audit logs")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="re-check the hash chain and the update signatures of an audit log")
    verify.add_argument("path", help="audit.jsonl, or the run directory that contains it")
    verify.set_defaults(handler=_audit_verify)

    models = commands.add_parser("models", help="model versions")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    decrypt = models_commands.add_parser("decrypt", help="decrypt a run's final encrypted model, he_fedavg or he_robust (needs a node's secret context)")
    decrypt.add_argument("run_dir", help="run directory with model_initial.pt and model_final.ckks")
    decrypt.add_argument("--secret-dir", required=True, help="folder with the node secret context (node/ from `fedseal keys init`; he_robust runs need its --scoring key)")
    decrypt.add_argument("--out", required=True, help="where to write the decrypted state_dict (.pt)")
    decrypt.set_defaults(handler=_models_decrypt)

    listing = models_commands.add_parser("list", help="list global model versions")
    listing.add_argument("--db", required=True, help="SQLAlchemy URL of the version index, or a run directory")
    listing.add_argument("--run", help="only this run id")
    listing.add_argument("--format", choices=("table", "json"), default="table", help="a table, or one JSON object per version and line (default: table)")
    listing.set_defaults(handler=_models_list)

    export = models_commands.add_parser("export", help="copy one model version to a file (hash-checked)")
    export.add_argument("version", type=int, help="version number (see `fedseal models list`)")
    export.add_argument("--db", required=True, help="SQLAlchemy URL of the version index, or a run directory")
    export.add_argument("--run", help="run id, when the index contains several runs")
    export.add_argument("--out", required=True, help="destination file")
    export.set_defaults(handler=_models_export)

    from reporting.cli import add_parser as add_report_parser

    add_report_parser(commands)

    from deploy.cli import add_parser as add_deploy_parser

    add_deploy_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

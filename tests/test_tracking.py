"""Experiment tracking on constructed records: mode resolution, round folding, and a real offline W&B run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import make_reply
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf
from wandb_offline import read_finished_run

from server.run_log import RunLog
from strategies.recording import RecordingStrategy
from tracking import NullTracker, open_tracker
from tracking.rounds import RoundCollector
from tracking.settings import TrackingSettings, api_key_configured, resolve_mode
from tracking.wandb_tracker import WandbTracker, flatten_summary


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep W&B's caches in the test folder and make sure no API key is visible."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def _tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "W&B" in r.getMessage()]


# --- mode resolution -------------------------------------------------------


def test_auto_mode_offline_without_key(tmp_path: Path) -> None:
    environ = {"NETRC": str(tmp_path / "missing")}

    assert api_key_configured(environ) is False
    assert resolve_mode("auto", environ) == "offline"


def test_auto_mode_online_with_env_key(tmp_path: Path) -> None:
    environ = {"WANDB_API_KEY": "x" * 40, "NETRC": str(tmp_path / "missing")}

    assert resolve_mode("auto", environ) == "online"


def test_auto_mode_online_with_netrc_entry(tmp_path: Path) -> None:
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)

    assert resolve_mode("auto", {"NETRC": str(netrc_file)}) == "online"
    # An entry for another host is not a W&B key.
    assert resolve_mode("auto", {"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_explicit_modes_kept() -> None:
    assert resolve_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    assert resolve_mode("online", {}) == "online"


def test_invalid_mode_names_value() -> None:
    with pytest.raises(ValueError, match="'bogus'.*auto, online, offline, disabled"):
        resolve_mode("bogus", {})


# --- folding records into rounds -------------------------------------------


def _round_records() -> tuple[list[dict], list[dict]]:
    records = [
        {"phase": "server_evaluate", "round": 0, "scope": "global", "metrics": {"roc_auc": 0.31}, "seconds": 0.02},
        {"phase": "privacy", "round": 1, "event": "epsilon", "partition": 0, "epsilon": 1.5, "scope": "global"},
        {"phase": "privacy", "round": 1, "event": "epsilon", "partition": 1, "epsilon": 2.5, "scope": "global"},
        {"phase": "validation", "round": 1, "event": "reply_dropped", "node": 2, "reason": "update norm 55.0 exceeds 10 x median", "scope": "node"},
        {"phase": "trust", "round": 1, "event": "score", "node": 0, "trust": 0.9, "reputation": 0.95, "weight": 1.0, "scope": "node"},
        {"phase": "trust", "round": 1, "event": "quarantined", "node": 1, "reputation": 0.1, "until_round": 6, "scope": "node"},
        {"phase": "train", "round": 1, "scope": "global", "sampled": 3, "replied": 3, "failures": [], "metrics": {"train_loss": 0.4, "num-examples": 30.0, "train_seconds": 2.0}},
        {"phase": "train", "round": 1, "scope": "node", "node": 0, "metrics": {"num-examples": 10.0, "train_seconds": 1.5, "encrypt_seconds": 0.25}},
        {"phase": "train", "round": 1, "scope": "node", "node": 1, "metrics": {"num-examples": 10.0, "train_seconds": 2.5, "encrypt_seconds": 0.75}},
        {"phase": "train", "round": 1, "scope": "node", "node": 2, "metrics": {"num-examples": 10.0, "train_seconds": 2.0}},
        {"phase": "cost", "round": 1, "event": "train", "bytes_sent": 3000, "bytes_received": 2900, "wait_s": 3.0, "aggregate_s": 0.5, "scope": "global"},
        {"phase": "evaluate", "round": 1, "scope": "global", "sampled": 3, "replied": 2, "failures": ["node 9: lost"], "metrics": {"roc_auc": 0.8, "num-examples": 20.0}},
        {"phase": "evaluate", "round": 1, "scope": "node", "node": 0, "metrics": {"roc_auc": 0.85, "num-examples": 10.0}},
        {"phase": "cost", "round": 1, "event": "evaluate", "bytes_sent": 3000, "bytes_received": 100, "wait_s": 0.25, "aggregate_s": 0.125, "scope": "global"},
        {"phase": "server_evaluate", "round": 1, "scope": "global", "metrics": {"roc_auc": 0.83, "num-examples": 99.0}, "seconds": 0.125},
    ]
    audit = [
        {"event": "update_rejected", "check": "signature", "round": 1, "partition": 1, "reason": "signature does not verify"},
        {"event": "rollback", "round": 1, "metric": "roc_auc", "mean_delta": -0.05},
        {"event": "version", "round": 1, "version": 1},
    ]
    return records, audit


def test_collector_folds_a_round() -> None:
    records, audit = _round_records()
    collector = RoundCollector()
    for record in records:
        collector.add(record)
    for entry in audit:
        collector.add_audit(entry)

    round_0, round_1 = collector.pop_all()

    assert round_0.round == 0
    assert round_0.scalars["eval_pooled/roc_auc"] == 0.31
    s = round_1.scalars
    assert s["eval_pooled/roc_auc"] == 0.83
    assert "eval_pooled/num-examples" not in s
    assert s["eval_nodes/roc_auc"] == 0.8
    assert s["train/train_loss"] == 0.4
    assert s["bytes/sent"] == 6000
    assert s["bytes/received"] == 3000
    assert s["time/client_training_s"] == 2.5
    assert s["time/encryption_s"] == 0.75
    assert s["time/aggregation_s"] == 0.5
    assert s["time/evaluation_s"] == pytest.approx(0.25 + 0.125 + 0.125)
    assert s["updates/rejected"] == 2
    assert s["updates/accepted"] == 1
    assert s["trust/node_0"] == 0.9
    assert s["reputation/node_0"] == 0.95
    assert s["epsilon/node_1"] == 2.5
    assert s["privacy/max_epsilon"] == 2.5
    assert s["canary/rolled_back"] == 1.0
    assert s["canary/mean_delta"] == -0.05
    events = {(e["event"], e["node"]) for e in round_1.events}
    assert events == {("rejected_validation", 2), ("quarantined", 1), ("rejected_signature", 1), ("rollback", None), ("evaluate_reply_failed", None)}
    reasons = " ".join(e["reason"] for e in round_1.events)
    assert "update norm 55.0" in reasons
    assert "signature does not verify" in reasons
    assert round_1.nodes[1]["status"] == "rejected (signature)"


def test_collector_plaintext_encryption_zero() -> None:
    collector = RoundCollector()
    collector.add({"phase": "train", "round": 1, "scope": "node", "node": 0, "metrics": {"num-examples": 5.0, "train_seconds": 1.0}})

    (entry,) = collector.pop_all()

    assert entry.scalars["time/encryption_s"] == 0.0
    assert entry.scalars["time/client_training_s"] == 1.0


def test_collector_pops_only_earlier_rounds() -> None:
    collector = RoundCollector()
    for server_round in (0, 1, 2):
        collector.add({"phase": "server_evaluate", "round": server_round, "scope": "global", "metrics": {"roc_auc": 0.1 * server_round}})

    assert [entry.round for entry in collector.pop_before(2)] == [0, 1]
    assert [entry.round for entry in collector.pop_all()] == [2]
    assert collector.pop_all() == []


def test_node_rows_follow_columns() -> None:
    records, _ = _round_records()
    collector = RoundCollector()
    for record in records:
        collector.add(record)

    round_1 = collector.pop_all()[1]
    rows = round_1.node_rows(["roc_auc"])

    assert rows[0] == [1, 0, "accepted", 10.0, 1.5, 0.25, 0.9, 0.95, 1.5, 0.85]
    assert rows[2][2] == "rejected (validation)"


def test_flatten_summary_keys() -> None:
    flat = flatten_summary({"federated": {"global": {"roc_auc": 0.9}}, "rounds": 2})

    assert flat == {"federated/global/roc_auc": 0.9, "rounds": 2}


# --- the run log feeding a real offline W&B run ------------------------------


def _tracker(tmp_path: Path, **settings) -> WandbTracker:
    values = {"name": "wandb", "mode": "offline", "project": "fedseal-test", "init_timeout_s": 60.0, **settings}
    return WandbTracker(TrackingSettings(**values), tmp_path / "run", {"rounds": 2, "train": {"lr": 0.3}}, "unit-run")


def test_tracker_writes_offline_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_log = RunLog(run_dir / "metrics.jsonl", 1, "roc_auc")
    (run_dir / "audit.jsonl").write_text(json.dumps({"event": "update_rejected", "check": "signature", "round": 1, "partition": 0, "reason": "bad signature"}) + "\n")
    model = run_dir / "model_final.pt"
    model.write_bytes(b"weights")
    tracker = _tracker(tmp_path, group="unit-group")

    tracker.attach(run_log, ["roc_auc"])
    run_log.on_server_evaluate(0, {"roc_auc": 0.25})
    run_log.on_train(1, 2, {0: {"num-examples": 4.0, "train_seconds": 0.5}, 1: {"num-examples": 6.0, "train_seconds": 0.75}}, [], {"train_loss": 0.125})
    run_log.record_event("cost", 1, "train", bytes_sent=1000, bytes_received=800, wait_s=1.0, aggregate_s=0.5)
    run_log.on_server_evaluate(1, {"roc_auc": 0.875})
    tracker.finish({"federated": {"global": {"roc_auc": 0.875}}, "rounds": 1}, model)
    run_log.close()

    (offline_dir,) = sorted((run_dir / "wandb").glob("offline-run-*"))
    run = read_finished_run(offline_dir)
    assert run.group == "unit-group"
    assert run.name == "unit-run"
    assert run.config["train"] == {"lr": 0.3}
    assert run.history[0]["eval_pooled/roc_auc"] == 0.25
    assert run.history[1]["eval_pooled/roc_auc"] == 0.875
    assert run.history[1]["bytes/train_sent"] == 1000
    assert run.history[1]["time/client_training_s"] == 0.75
    assert run.history[1]["updates/rejected"] == 1
    assert run.history[1]["nodes/nrows"] == 2
    assert run.history[1]["events/nrows"] == 1
    assert run.summary["federated/global/roc_auc"] == 0.875
    assert ("model-" + run.run_id, "model", ["model_final.pt"]) in run.artifacts
    assert run.exit_code == 0


def test_tracker_unwritable_dir_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run_log = RunLog(tmp_path / "run" / "metrics.jsonl", 1, "roc_auc")
    tracker = _tracker(tmp_path, dir=str(blocker / "wandb"))

    with caplog.at_level(logging.WARNING):
        tracker.attach(run_log, ["roc_auc"])
        run_log.on_server_evaluate(0, {"roc_auc": 0.5})
        run_log.on_server_evaluate(1, {"roc_auc": 0.6})
        tracker.finish({"rounds": 1}, None)
    run_log.close()

    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1
    assert "wandb.init failed" in warnings[0].getMessage()
    assert tracker.active is False
    assert not (tmp_path / "run" / "wandb").exists()


def test_tracker_invalid_mode_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_log = RunLog(tmp_path / "run" / "metrics.jsonl", 1, "roc_auc")
    tracker = _tracker(tmp_path, mode="sometimes")

    with caplog.at_level(logging.WARNING):
        tracker.attach(run_log, ["roc_auc"])
        tracker.finish(None, None)
    run_log.close()

    warnings = _tracking_warnings(caplog)
    assert len(warnings) == 1
    assert "tracking.mode='sometimes'" in warnings[0].getMessage()


def test_open_tracker_none_and_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(open_tracker(OmegaConf.create({"tracking": {"name": "none"}}), tmp_path), NullTracker)

    with caplog.at_level(logging.WARNING):
        tracker = open_tracker(OmegaConf.create({"tracking": {"name": "mlflow"}}), tmp_path)

    assert isinstance(tracker, NullTracker)
    assert len(_tracking_warnings(caplog)) == 1
    assert "tracking.name='mlflow'" in caplog.text


def test_run_log_drops_failing_listener(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_log = RunLog(tmp_path / "metrics.jsonl", 1, "roc_auc")
    seen: list[dict] = []

    def broken(record: dict) -> None:
        raise RuntimeError("listener bug")

    run_log.add_listener(broken)
    run_log.add_listener(seen.append)
    with caplog.at_level(logging.WARNING):
        run_log.on_server_evaluate(0, {"roc_auc": 0.5})
        run_log.on_server_evaluate(1, {"roc_auc": 0.6})
    run_log.close()

    assert [record["round"] for record in seen] == [0, 1]
    assert sum("listener bug" in r.getMessage() for r in caplog.records) == 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


# --- round costs measured by the recording layer ------------------------------


class EventSink:
    """Collects run-log calls of the recording wrapper."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train(self, *args) -> None:
        pass

    def on_evaluate(self, *args) -> None:
        pass

    def record_event(self, phase, server_round, event, node=None, **fields) -> None:
        self.events.append((phase, server_round, event, fields))


def test_recording_reports_round_cost() -> None:
    sink = EventSink()
    strategy = RecordingStrategy(FedAvg(), sink)
    arrays = ArrayRecord([np.zeros(4, dtype=np.float32)])
    replies = [make_reply(10 + p, ArrayRecord([np.full(4, 1.0, dtype=np.float32)]), {"num-examples": 1.0}, p) for p in range(2)]

    strategy.aggregate_train(1, replies)

    ((phase, server_round, event, fields),) = sink.events
    assert (phase, server_round, event) == ("cost", 1, "train")
    assert fields["bytes_received"] == sum(reply.content.array_records["arrays"].count_bytes() + reply.content.metric_records["metrics"].count_bytes() + reply.content.config_records["node"].count_bytes() for reply in replies)
    assert fields["bytes_received"] > 2 * arrays.count_bytes() - 1
    assert fields["bytes_sent"] == 0
    assert fields["aggregate_s"] >= 0.0


def test_tracker_audit_waits_for_whole_lines(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    audit = tmp_path / "run" / "audit.jsonl"
    audit.parent.mkdir(parents=True)
    first = json.dumps({"event": "update_rejected", "check": "signature", "round": 1, "partition": 0, "reason": "first"})
    second = json.dumps({"event": "rollback", "round": 1, "metric": "roc_auc", "mean_delta": -0.25})
    audit.write_text(first + "\n" + second[:10])

    tracker._read_audit()
    audit.write_text(first + "\n" + second + "\n")
    tracker._read_audit()
    (entry,) = tracker._collector.pop_all()

    assert [event["event"] for event in entry.events] == ["rejected_signature", "rollback"]
    assert entry.scalars["canary/rolled_back"] == 1.0


def test_progress_line_round_zero_eta(tmp_path, caplog) -> None:
    from server.run_log import RunLog

    run_log = RunLog(tmp_path / "metrics.jsonl", 2, "roc_auc")
    with caplog.at_level(logging.INFO, logger="server.run_log"):
        run_log.on_server_evaluate(0, {"roc_auc": 0.5})
        run_log.on_server_evaluate(1, {"roc_auc": 0.75})
    run_log.close()

    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("round ")]
    assert lines[0].startswith("round 0/2 | nodes answered - | roc_auc 0.5000 (pooled test)")
    assert lines[0].endswith("| eta n/a")
    assert "roc_auc 0.7500" in lines[1]
    assert "nan" not in lines[1]

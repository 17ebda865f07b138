"""`fedseal data check`: one of the two fraud files is enough."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import main


def _link_datasets(source: Path, target: Path, skip: set[str]) -> None:
    for path in source.rglob("*"):
        if path.is_file() and path.name not in skip:
            link = target / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)


def test_subsample_alone_is_enough(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _link_datasets(data_root, tmp_path, skip={"creditcard.csv"})

    code = main(["data", "check", "--root", str(tmp_path)])

    output = capsys.readouterr().out
    assert code == 0
    assert "fraud/full is not needed: fraud/full or fraud/sub50k is enough" in output


def test_no_fraud_file_fails(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _link_datasets(data_root, tmp_path, skip={"creditcard.csv", "creditcard_ulb_sub50k.csv.gz"})

    code = main(["data", "check", "--root", str(tmp_path)])

    output = capsys.readouterr().out
    assert code == 1
    assert "2 file(s) not usable; set FEDSEAL_DATA_DIR or --root" in output

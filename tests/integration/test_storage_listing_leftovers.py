"""A local output lists a folder as S3 lists a prefix: only while an object is under it."""

from __future__ import annotations

import pytest

from tuneloop.storage import FileStorage

pytestmark = pytest.mark.integration


def test_a_folder_holding_only_a_killed_writers_temp_file_is_not_a_run(tmp_path) -> None:
    # A SIGKILL while run 2's claim was being written leaves only the temporary file.
    (tmp_path / "runs" / "1").mkdir(parents=True)
    (tmp_path / "runs" / "1" / "run.json").write_text("{}")
    (tmp_path / "runs" / "2").mkdir()
    (tmp_path / "runs" / "2" / ".tuneloop-tmp-run.json.x1y2").write_text("{")
    (tmp_path / "runs" / "3" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "4" / "checkpoints" / "step-8").mkdir(parents=True)
    (tmp_path / "runs" / "4" / "checkpoints" / "step-8" / "manifest.json").write_text("{}")
    storage = FileStorage()
    assert storage.list_dirs(f"file://{tmp_path}/runs/") == ["1", "4"]

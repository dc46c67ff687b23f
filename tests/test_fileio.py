"""sophia.fileio: whole files or none, with the permissions a plain write would give."""

import os
import stat

import pytest

from sophia.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_a_written_file_has_the_permissions_of_a_plain_write(tmp_path):
    before = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "# report\n")
        (tmp_path / "plain.md").write_text("# report\n")
    finally:
        os.umask(before)
    mode = stat.S_IMODE((tmp_path / "report.md").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.md").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"loss": 1.5})

    def half_then_fail(f):
        f.write(b'{"loss": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_text() == '{\n  "loss": 1.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_json_on_one_line_when_asked(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": [1, 2]}, indent=None)
    assert (tmp_path / "r.json").read_text() == '{"a": [1, 2]}\n'

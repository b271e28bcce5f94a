"""Files and folders that appear whole or not at all (cimfast.pipelines.atomic),
the one helper behind checkpoints' state files, tokenizer files, validation
caches and the demo images."""
import os

import pytest

from cimfast.pipelines.atomic import publish_folder, write_atomically, write_text_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_text_atomically(str(path), "old", fsync=True)

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(str(path), fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]


def test_mode_and_replacement(tmp_path):
    path = tmp_path / "t.bin"
    write_atomically(str(path), lambda tmp: open(tmp, "wb").write(b"x"), mode=0o644)
    write_atomically(str(path), lambda tmp: open(tmp, "wb").write(b"y"), mode=0o640)
    assert path.read_bytes() == b"y" and (path.stat().st_mode & 0o777) == 0o640


def test_the_first_published_folder_wins(tmp_path):
    root = str(tmp_path / "digits" / "train")

    def fill(tag):
        def write(tmp):
            with open(os.path.join(tmp, "who"), "w") as f:
                f.write(tag)
        return write

    assert publish_folder(root, fill("first")) == root
    publish_folder(root, fill("second"))  # another rank, later: its copy is dropped
    assert open(os.path.join(root, "who")).read() == "first"
    assert sorted(os.listdir(tmp_path / "digits")) == ["train"]
    with pytest.raises(RuntimeError):
        publish_folder(str(tmp_path / "x"), lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sorted(os.listdir(tmp_path)) == ["digits"]

"""The demo's output folder: only a folder the demo wrote (marker file) or an empty one is ever deleted."""
import pytest

from eval.demo import DEMO_MARKER, main, prepare_demo_dir


def _user_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    return d


def test_refuses_a_folder_the_demo_did_not_write(tmp_path):
    d = _user_folder(tmp_path)
    with pytest.raises(ValueError, match="--force"):
        prepare_demo_dir(d)
    assert (d / "thesis.tex").read_text() == "precious" and not (d / DEMO_MARKER).exists()


def test_main_refuses_with_one_line_exit_2(tmp_path, capsys):
    d = _user_folder(tmp_path)
    assert main(["--output_dir", str(d)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--force" in err[0] and str(d) in err[0]
    assert (d / "thesis.tex").is_file()


def test_working_directory_is_never_deleted(tmp_path, monkeypatch, capsys):
    d = _user_folder(tmp_path)
    (d / DEMO_MARKER).write_text("")  # even a marked working directory, even with --force
    monkeypatch.chdir(d)
    for argv in (["--output_dir", "."], ["--output_dir", ".", "--force"], ["--output_dir", ".."]):
        assert main(argv) == 2
    assert "never deletes" in capsys.readouterr().err
    assert (d / "thesis.tex").is_file()


def test_deletes_only_marked_or_empty_folders_or_with_force(tmp_path):
    # a folder the demo wrote: replaced by a fresh one, marked again
    d = prepare_demo_dir(tmp_path / "demo_output")
    assert (d / DEMO_MARKER).is_file()
    (d / "checkpoint.pth").write_text("old run")
    assert prepare_demo_dir(d) == d and not (d / "checkpoint.pth").exists() and (d / DEMO_MARKER).is_file()
    # an empty folder is fine
    e = tmp_path / "empty"
    e.mkdir()
    assert (prepare_demo_dir(e) / DEMO_MARKER).is_file()
    # --keep: nothing is deleted, and a folder the demo did not write is not marked as deletable
    u = _user_folder(tmp_path)
    prepare_demo_dir(u, keep=True)
    assert (u / "thesis.tex").is_file() and not (u / DEMO_MARKER).exists()
    # --force: the user said so
    prepare_demo_dir(u, force=True)
    assert not (u / "thesis.tex").exists() and (u / DEMO_MARKER).is_file()


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        prepare_demo_dir(f, force=True)
    assert f.read_text() == "x"

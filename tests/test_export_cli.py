"""`ladic export` keeps what exists (issue 39): an existing output is refused without --overwrite, the source is never
its own output, and a refused ONNX export leaves no folder behind. Each refusal is one error line, rc 2."""

import torch

from ladic import LaDiC, preset
from ladic.cli import main


def _one_error(capsys, text):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and text in err[0], err


def test_export_refuses_to_replace_without_overwrite(tmp_path, capsys):
    torch.manual_seed(0)
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out")]) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--fp16"]) == 2
    _one_error(capsys, "exists and is not empty; give --overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == written  # nothing changed
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "out"), "--fp16", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "notes.txt").exists()  # replaced, not mixed
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "m"), "--overwrite"]) == 2
    _one_error(capsys, "that is the folder being exported")
    (tmp_path / "afile.txt").write_text("x")
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "afile.txt")]) == 2
    _one_error(capsys, "a file, not a folder")
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "m"), str(tmp_path / "empty")]) == 0  # an empty folder is fine


def test_refused_onnx_export_leaves_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    LaDiC(preset("tiny")).save_pretrained(tmp_path / "five-step")  # the tiny preset samples with 5 steps
    assert main(["export", str(tmp_path / "five-step"), str(tmp_path / "onnx"), "--onnx"]) == 2
    _one_error(capsys, "the ONNX export covers one-step models")
    assert not (tmp_path / "onnx").exists()


def test_features_into_a_file_is_one_error(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    assert main(["features", str(tmp_path / "afile.txt")]) == 2
    _one_error(capsys, "a file, not a folder")
    assert (tmp_path / "afile.txt").read_text() == "x"


def test_onnx_folder_and_no_clamp_messages_name_what_was_given(tmp_path, capsys):
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "onnx_config.json").write_text("{}")
    assert main(["caption", "--examples", "--model", str(tmp_path / "onnx")]) == 2
    _one_error(capsys, "an ONNX export, not a model folder; caption with it through --runtime onnx")
    assert main(["caption", "--examples", "--runtime", "onnx", "--no-clamp"]) == 2
    _one_error(capsys, "drop --no-clamp")

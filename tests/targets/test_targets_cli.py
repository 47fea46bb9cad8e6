"""Tests of the `qcompile targets` command line (qcompiler/cli.py, qcompiler/__main__.py)."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from qcompiler.cli import build_parser, main
from qcompiler.targets import list_targets, load_target, schema_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_targets_lists_names_with_descriptions(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == len(list_targets())
    for name, line in zip(list_targets(), lines):
        assert line.startswith(name) and load_target(name).description in line
    assert main(["targets", "list"]) == 0 and capsys.readouterr().out == out


def test_targets_show_builtin(capsys):
    assert main(["targets", "show", "npu-int4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("npu-int4 1.0: ")
    conv = next(line for line in out.splitlines() if line.strip().startswith("conv "))
    assert conv.split()[1:3] == ["w8*,", "w4"]              # default marked among candidates
    dw = next(line for line in out.splitlines() if line.strip().startswith("depthwise_conv "))
    assert "w4" not in dw
    for fragment in ("formats:", "int4, symmetric, per_channel", "conv + add + relu",
                     "shared scale: cat, stack, add", "first layer: at least 8 bits",
                     "requant: fixed_point, 32-bit multiplier", "run in float on the host",
                     "weight_memory", "bops              = macs * w_bits * a_bits"):
        assert fragment in out


def test_targets_show_path(capsys, tmp_path):
    path = tmp_path / "dsp.toml"
    path.write_text((ROOT / "targets" / "dsp-fixed-point.toml").read_text())
    assert main(["targets", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"source: {path}" in out and "power-of-two scales" in out and "run in float on the host" in out


def test_targets_show_unknown_name_is_an_error_without_traceback(capsys):
    assert main(["targets", "show", "npu-int9"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unknown target 'npu-int9'") and "Traceback" not in captured.err


def test_targets_validate_good_and_bad_files(capsys, tmp_path):
    good = tmp_path / "good.toml"
    good.write_text((ROOT / "targets" / "npu-int8.toml").read_text())
    assert main(["targets", "validate", str(good)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"OK: {good}: npu-int8 1.0") and captured.err == ""

    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('\nconv = { weights = ["w8"]', '\nconv = { weights = ["w9"]'))
    assert main(["targets", "validate", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {bad}: ops.conv.weights[0]: undefined format 'w9'")
    assert "Traceback" not in captured.err

    assert main(["targets", "validate", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "OK:" in captured.out and "ops.conv.weights[0]" in captured.err


def test_targets_validate_relative_name_is_a_file_not_a_builtin(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["targets", "validate", "npu-int8"]) == 1      # no such file here
    assert "no such target spec file" in capsys.readouterr().err


def test_targets_schema_prints_json_and_markdown(capsys):
    assert main(["targets", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"name", "formats", "ops", "cost"} <= set(schema["properties"])
    assert main(["targets", "schema", "--markdown"]) == 0
    assert capsys.readouterr().out == schema_markdown()


def test_parser_has_subcommands_others_can_extend():
    parser = build_parser()
    args = parser.parse_args(["targets", "show", "fp8"])
    assert args.command == "targets" and args.target == "fp8" and callable(args.handler)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["nonsense"])
    assert info.value.code == 2


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "targets" in capsys.readouterr().err


def test_python_dash_m_qcompiler(tmp_path, capsys, monkeypatch):
    # Runs qcompiler/__main__.py as `python -m qcompiler` does, without paying a new interpreter.
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nversion = "1"\n')
    monkeypatch.setattr(sys, "argv", ["qcompiler", "targets", "validate", str(bad)])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("qcompiler", run_name="__main__", alter_sys=True)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "missing required key 'formats'" in err and "Traceback" not in err

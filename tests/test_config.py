"""YAML → typed dataclass, with command-line overrides that win."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from dit_mem.cli import main
from dit_mem.config import ConfigError, load_config, save_config, to_dict
from dit_mem.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    bf16: bool = True
    out: Path = Path("runs")
    mode: Literal["both", "cond"] = "both"
    precision: Literal["no", "bf16"] = "bf16"
    extra: dict[str, int] = field(default_factory=dict)
    resume: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"steps": 20, "optim": {"lr": 2e-5}, "mode": "cond"}))
    cfg = load_config(Cfg, p, ["optim.lr=3e-4", "bf16=false", "resume=latest", "name=1e-5"])
    assert cfg.steps == 20  # from YAML
    assert cfg.optim.lr == 3e-4  # the command line wins over YAML
    assert cfg.optim.betas == (0.9, 0.999)  # default kept
    assert cfg.bf16 is False and cfg.resume == "latest" and cfg.mode == "cond"
    assert cfg.name == "1e-5"  # a str field keeps the text verbatim
    assert isinstance(cfg.out, Path)


def test_literal_text_and_mappings_from_the_command_line():
    cfg = load_config(Cfg, None, ["precision=no", "extra={a: 1, b: 2}", "resume=null"])
    assert cfg.precision == "no"  # not YAML's boolean false
    assert cfg.extra == {"a": 1, "b": 2} and cfg.resume is None


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(Cfg, None, ["optim.betas=[0.8, 0.9]", "out=/x/y"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Cfg, tmp_path / "resolved.yaml")
    assert again == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"unknown config key optim\.lrr for Optim"),
        (["nope=1"], "unknown config key nope for Cfg"),
        (["steps=ten"], "steps: expected an integer"),
        (["mode=all"], r"mode: 'all' is not one of \['both', 'cond'\]"),
        (["steps"], "must look like key=value"),
        (["steps.x=1"], "is not a section"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, overrides)


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown config key optim\.momentum"):
        load_config(Cfg, p)


def test_cli_help_runs(capsys):
    assert main([]) == 0
    assert "dit-mem" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


@pytest.mark.parametrize(
    ("raised", "user"),
    [
        (ConfigError("train.steps must be ≥ 1, got 0"), True),
        (FileNotFoundError("no such folder: runs/x"), True),
        (ValueError("operands could not be broadcast together"), False),  # a library's, a bug
        (KeyError("latents"), False),
    ],
)
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, raised, user):
    """Bad input (``UserError``, a file problem): one line and exit 2. Anything else raised
    inside a command is a bug: it propagates with its traceback after a line asking for a
    report, never disguised as bad input."""
    import dit_mem.cli as cli

    build = cli.build_parser

    def with_a_command_that_raises():
        parser = build()
        sub = next(a for a in parser._actions if a.dest == "command")
        sub.add_parser("boom").set_defaults(func=lambda args: (_ for _ in ()).throw(raised))
        return parser

    monkeypatch.setattr(cli, "build_parser", with_a_command_that_raises)
    if user:
        assert main(["boom"]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and str(raised).strip("'") in err and "dit-mem boom: error" in err
        )
    else:
        with pytest.raises(type(raised)):
            main(["boom"])
        assert "internal error (a bug in dit-mem" in capsys.readouterr().err
    assert isinstance(ConfigError("x"), UserError) and isinstance(UserError("x"), ValueError)

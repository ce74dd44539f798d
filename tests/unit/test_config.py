"""acceltrain.config: YAML + flags through HfArgumentParser, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from acceltrain.config import ConfigError, exit_on_user_error, parse_config


@dataclass
class Demo:
    """A demo config."""

    max_steps: int = field(default=10, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    model_size: Literal["tiny", "124m"] = field(default="tiny", metadata={"help": "preset"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where results go"})
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={"help": "modules"})


def test_defaults_yaml_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("recipe: demo\nmax_steps: 50\nlr: 0.01\nmodel_size: 124m\ntargets: [a, b, c]\n")
    cfg = parse_config(Demo, ["--config", str(cfg_file), "--max_steps", "7", "--compile", "true"])
    assert (cfg.max_steps, cfg.lr, cfg.model_size, cfg.compile, cfg.targets) == (7, 0.01, "124m", True, ["a", "b", "c"])
    assert parse_config(Demo, []).max_steps == 10


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_stepz: 3\n", r"c\.yaml: unknown key 'max_stepz' \(did you mean max_steps\?\)"),
        ("max_steps: 3.5\n", r"c\.yaml: max_steps: expected int, got 3\.5"),
        ("max_steps: many\n", r"c\.yaml: max_steps: expected int, got 'many'"),
        ("model_size: 7b\n", r"c\.yaml: model_size: '7b' is not one of \['tiny', '124m'\]"),
        ("- a\n- b\n", r"c\.yaml: expected a mapping"),
        ("a: [unclosed\n", r"c\.yaml: not valid YAML \(line 2\)"),
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_config(Demo, ["--config", str(tmp_path / "c.yaml")])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        parse_config(Demo, ["--config", str(tmp_path / "nope.yaml")])


def test_unknown_flag_and_bad_choice_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, ["--max_stepz", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --max_stepz 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, ["--model_size", "7b"])
    assert e.value.code == 2


def test_help_lists_fields_with_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(Demo, ["--help"], prog="demo")
    out = capsys.readouterr().out
    assert "--max_steps MAX_STEPS" in out and "optimizer steps (default: 10)" in out and "--config" in out


def test_exit_on_user_error_prints_one_line_and_exits_2(tmp_path, capsys):
    @exit_on_user_error
    def main():
        parse_config(Demo, ["--config", str(tmp_path / "missing.yaml")])

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing.yaml" in err


# ---------------------------------------------------------------------------- one setting, two spellings
@pytest.mark.parametrize("alias, field_name, value", [("learning_rate", "lr", 0.025), ("max_grad_norm", "grad_clip", 0.5)])
def test_recipe_fields_take_the_one_call_spelling_too(tmp_path, alias, field_name, value):
    from acceltrain.recipe_kit import TrainingConfig

    canonical = parse_config(TrainingConfig, [f"--{field_name}", str(value)])
    assert getattr(canonical, field_name) == value != getattr(TrainingConfig(), field_name)
    assert parse_config(TrainingConfig, [f"--{alias}", str(value)]) == canonical
    assert parse_config(TrainingConfig, [f"--{alias}={value}"]) == canonical
    config = tmp_path / "c.yaml"
    config.write_text(f"{alias}: {value}\n")
    assert parse_config(TrainingConfig, ["--config", str(config)]) == canonical


def test_both_spellings_of_one_setting_are_an_error_naming_them(tmp_path):
    from acceltrain.recipe_kit import TrainingConfig

    with pytest.raises(ConfigError, match=r"^--lr and --learning_rate are one setting \(lr\); give one$"):
        parse_config(TrainingConfig, ["--lr", "0.1", "--learning_rate", "0.2"])
    with pytest.raises(ConfigError, match=r"^--max_grad_norm and --grad_clip are one setting \(grad_clip\)"):
        parse_config(TrainingConfig, ["--max_grad_norm=2", "--grad_clip", "1"])
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: learning_rate and lr are one setting \(lr\); give one"):
        parse_config(TrainingConfig, ["--config", str(config)])
    # A flag overriding the file's other spelling is the usual precedence, not a conflict.
    config.write_text("learning_rate: 0.2\n")
    assert parse_config(TrainingConfig, ["--config", str(config), "--lr", "0.3"]).lr == 0.3


def test_help_names_the_other_spellings(capsys):
    from acceltrain.recipe_kit import TrainingConfig

    with pytest.raises(SystemExit):
        parse_config(TrainingConfig, ["--help"])
    assert "Also accepted: --learning_rate for --lr, --max_grad_norm for --grad_clip." in capsys.readouterr().out


def test_one_call_config_takes_the_recipe_spelling_too():
    from acceltrain.one_call_config import make_config

    assert make_config({"max_steps": 1, "lr": 0.02, "grad_clip": 0.5}) == make_config(
        {"max_steps": 1, "learning_rate": 0.02, "max_grad_norm": 0.5})
    assert make_config(max_steps=1, lr=0.02).learning_rate == 0.02
    with pytest.raises(ValueError, match=r"^config: 'learning_rate' sets learning_rate, which 'lr' already sets; give one$"):
        make_config({"max_steps": 1, "lr": 0.02, "learning_rate": 0.03})
    with pytest.raises(ValueError, match=r"^config: 'max_grad_norm' sets max_grad_norm, which 'grad_clip' already sets; give one$"):
        make_config({"max_steps": 1, "grad_clip": 1.0, "max_grad_norm": 2.0})

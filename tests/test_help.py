"""Every command and script answers `--help` and names its important flags: a newcomer's first call."""

import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from fifa_hf.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]

FLAGS = {
    "demo": ["--num_pairs", "--k", "--full", "--output_dir"],
    "evaluate": [
        "--model_name_or_path", "--lora", "--baseline_model_name_or_path", "--baseline_lora", "--prompts",
        "--reward", "--num_images_per_prompt", "--output_dir",
    ],
    "filter": ["--k", "--method", "--alpha", "--gamma", "--reward_model", "--quality_scorer", "--push_to_hub", "--output_dir"],
    "select": ["--method", "--k", "--alpha", "--gamma", "--push_to_hub", "--output_dir"],
    "synthetic": ["--num_pairs", "--seed", "--output_dir"],
    "train": ["--model_name_or_path", "--dataset_name", "--beta", "--use_peft", "--push_to_hub", "--output_dir"],
}  # fmt: skip
TRAINER_FLAGS = ["--model_name_or_path", "--dataset_name", "--beta", "--use_peft", "--output_dir"]


def help_of(run, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        run()
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command_without_loading_models():
    code = (
        "import sys\nfrom fifa_hf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nprint([m for m in ('torch', 'diffusers', 'transformers', 'datasets') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")  # the command table imports no model stack
    for name, command in COMMANDS.items():
        assert name in out and command.summary.split()[0] in out


def test_no_command_prints_the_help_and_a_wrong_one_names_the_choices(capsys):
    main([])
    assert "fifa-hf <command> --help" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["trian"])
    assert exit.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command, capsys):
    out = help_of(lambda: main([command, "--help"]), capsys)
    assert out.startswith(f"usage: fifa-hf {command}")
    for flag in FLAGS[command]:
        assert flag in out


def test_dataset_script_answers_help(capsys):
    spec = importlib.util.spec_from_file_location("pickapic_fifa", ROOT / "dataset_scripts" / "pickapic_fifa.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = help_of(lambda: script.main(["--help"]), capsys)
    assert "--push_to_hub" in out and "--quality_model" in out


def test_example_training_script_answers_help(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    out = help_of(lambda: runpy.run_path(str(ROOT / "examples" / "train.py"), run_name="__main__"), capsys)
    for flag in TRAINER_FLAGS:
        assert flag in out


def test_world_model_pretraining_answers_help(capsys):
    from fifa_hf.world.world_model import main as pretrain

    out = help_of(lambda: pretrain(["--help"]), capsys)
    assert all(flag in out for flag in ("--output_dir", "--unet_steps", "--describe_renders", "--fresh_text_encoder"))
    assert "Rendered (prompt, image) pairs" in out and "EMA of the weights" in out  # every flag says what it sets


def test_the_miniatures_diagnostics_answer_help(capsys, monkeypatch):
    from fifa_hf.world.gradient_noise import main as gradient_noise

    out = help_of(lambda: gradient_noise(["--help"]), capsys)
    assert "--examples" in out and "Pair visits" in out and "--world_seed" in out
    monkeypatch.setattr(sys, "argv", ["probe.py", "--help"])
    probe = ROOT / "docs" / "miniature" / "probes" / "probe.py"
    out = help_of(lambda: runpy.run_path(str(probe), run_name="__main__"), capsys)
    assert "--accumulation" in out and "--repeat" in out and "--on_policy" in out and "--model" in out

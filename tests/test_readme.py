"""README's code runs as written: its Python blocks with local stand-ins for the Hub ids, and every
`fifa-hf` command in its shell blocks parses (so a renamed flag cannot leave the README behind)."""

import re
import shlex
from pathlib import Path

import pytest
from huggingface_hub import HfApi, RepoUrl

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


PYTHON_BLOCKS = code_blocks("python")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, tiny_sd_path, tiny_clip_path, tiny_llm_path):
    """Hub id -> a local model or dataset that loads through the same calls."""
    from fifa_hf.scoring.diversity import offline_minilm_path
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    root = tmp_path_factory.mktemp("readme")
    rows = make_synthetic_pickapic(16, seed=0, image_size=32, tie_fraction=0.1)
    rows.save_to_disk(root / "pickapic_v2")
    rows.to_parquet(root / "pickapic-fifa" / "data" / "train-00000-of-00001.parquet")  # a FiFA subset's layout
    return {
        "yuvalkirstain/pickapic_v2": root / "pickapic_v2",
        "<user>/pickapic-fifa": root / "pickapic-fifa",
        "yuvalkirstain/PickScore_v1": tiny_clip_path,
        "Qwen/Qwen2.5-1.5B-Instruct": tiny_llm_path,
        "sentence-transformers/all-MiniLM-L6-v2": offline_minilm_path(),
        "stable-diffusion-v1-5/stable-diffusion-v1-5": tiny_sd_path,
    }


@pytest.fixture
def hub_commits(monkeypatch):
    """The Hub's server, mocked: what `push_to_hub` would send. A bare repo name lands in the user's namespace."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'user/' + repo_id}")

    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "user"})
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(
        HfApi, "create_commit", lambda self, repo_id, operations, **kwargs: commits.append((repo_id, operations))
    )
    return commits


@pytest.mark.parametrize("number", range(1, len(PYTHON_BLOCKS) + 1))
def test_python_block_runs_as_written(number, stand_ins, hub_commits, tmp_path, monkeypatch):
    code = PYTHON_BLOCKS[number - 1]
    for hub_id, local in stand_ins.items():
        code = code.replace(f'"{hub_id}"', repr(str(local)))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(code, f"README.md python block {number}", "exec"), namespace)

    if "push_to_hub()" in code:
        ((repo_id, operations),) = hub_commits
        assert repo_id == "user/sd15-dpo"
        assert {"README.md", "pytorch_lora_weights.safetensors"} <= {op.path_in_repo for op in operations}
    if "add_signals(" in code:
        assert {"margin", "quality", "diversity"} <= set(namespace["pairs"].column_names)
    if "RewardEvaluationCallback(" in code:
        assert namespace["callback"].history[0][0] == 0


def fifa_hf_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.replace("<user>", "user"), comments=True)
                if words[:1] == ["fifa-hf"]:
                    commands.append(words[1:])
    return commands


@pytest.mark.parametrize("argv", fifa_hf_commands(), ids=lambda argv: " ".join(argv[:3]))
def test_fifa_hf_command_parses(argv, monkeypatch):
    from trl import TrlParser

    from fifa_hf.cli import COMMANDS

    monkeypatch.chdir(README.parent)  # `--config examples/...` paths are relative to the repository
    TrlParser(COMMANDS[argv[0]].argument_classes()).parse_args_and_config(argv[1:])

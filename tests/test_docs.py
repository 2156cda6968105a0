"""What a user runs (README, configs/, examples/) is exercised here, so none of it rots."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mipo_mlx.config import reference_markdown, resolve, validate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FAST = [
    "--generation.max_tokens",
    "8",
    "--generation.truncated",
    "keep",
    "--generation.temperature",
    "1.0",
    "--iters",
    "2",
    "--training.batch_size",
    "2",
    "--output.overwrite",
    "true",
]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_settings_table_is_generated_from_config():
    assert reference_markdown() in README


def test_readme_recipe_memory_table_is_computed_from_the_recipes():
    from mipo_mlx.memory import recipe_memory_markdown

    assert recipe_memory_markdown(ROOT / "configs") in README
    for recipe in ("gsm8k", "svamp", "arc-challenge", "arc-easy", "prism", "community-alignment"):
        assert f"`python -m mipo_mlx.train --config configs/{recipe}.yaml`" in README


def test_ci_runs_exactly_the_readme_test_command():
    after = README.split("Set up and run the tests:", 1)[1]
    test_command = bash_blocks(after)[0].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def own_prompt_recipes() -> list[str]:
    """Configs that train on a prompt file shipped with the project (the paper recipes read
    public datasets: tests/test_recipes.py runs them on fixture files in their formats)."""
    return sorted(
        p.name
        for p in (ROOT / "configs").glob("*.yaml")
        if yaml.safe_load(p.read_text())["data"].get("format", "prompts") == "prompts"
    )


@pytest.mark.parametrize("recipe", own_prompt_recipes())
def test_recipe_resolves_and_runs(recipe, toy_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name prompt files relative to the project root
    config = validate(resolve(str(ROOT / "configs" / recipe), {}))
    assert Path(config.data.prompts).is_file()
    cmd = [
        sys.executable,
        "-m",
        "mipo_mlx.train",
        "--config",
        f"configs/{recipe}",
        "--model",
        str(toy_model_dir),
        "--output",
        str(tmp_path / "out"),
        *FAST,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "adapters.safetensors").is_file()


def test_python_api_example_runs(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "python_api.py"),
        "--toy",
        "--steps",
        "2",
        "--output",
        str(tmp_path / "api"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pairs; after 2 steps" in done.stdout
    assert (tmp_path / "api" / "adapter_config.json").is_file()


def test_embedded_experiment_runs_small(tmp_path):
    """The experiment end to end on a few prompts: choices on valid, arms on held-out, tables."""
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "embedded_experiment.py"),
        "--output",
        str(tmp_path / "exp"),
        "--rates",
        "1e-4,3e-4",
        "--seeds",
        "0,1",
        "--rounds",
        "2",
        "--iters",
        "1",
        "--train-limit",
        "6",
        "--eval-limit",
        "4",
        "--set",
        "generation.max_tokens=12",
        "--set",
        "evaluation.max_tokens=12",
        "--set",
        "generation.truncated=keep",
        "--set",
        "training.batch_size=2",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "exp" / "results.json").read_text())
    for family in ("personalization", "math"):
        for method in ("mipo", "sft"):
            assert report["chosen_on_valid"][family][method]["lr"] in (1e-4, 3e-4)
    arms = report["heldout"]["personalization"]
    assert set(arms) == {
        "base",
        "mipo no_context",
        "mipo no_context, round 2",
        "mipo random_context",
        "mipo random",
        "sft",
    }
    assert all(len(rows) == 2 for rows in arms.values())
    assert set(report["heldout"]["math"]) == {"base", "mipo random", "mipo incomplete", "sft"}
    assert "| mipo no_context, round 2 |" in done.stdout and "| mipo incomplete |" in done.stdout
    # The runs were on each family's own rows, and held-out only for the final arms.
    assert not list((tmp_path / "exp" / "select").glob("*seed*"))


def test_readme_two_commands_are_the_ones_ci_runs():
    """The README's setup is the one CI uses: the test command is .ci/run's last line as is,
    and the main job's command sets up the same way (the plot extra instead of dev)."""
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    main_job, tests = [block.strip() for block in bash_blocks(section)[:2]]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == tests
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu,{}]" && '
    assert tests == setup.format("dev") + "pytest -q"
    assert main_job == setup.format("plot") + "python -m mipo_mlx.train"

"""What a user runs (README, configs/, examples/) is exercised here, so none of it rots."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mipo_mlx.core.config import reference_markdown
from mipo_mlx.core.settings import resolve, validate

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


@pytest.mark.parametrize("module", ["mipo_mlx.core.config", "mipo_mlx.engine.memory"])
@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # runpy of an imported module
def test_the_modules_the_readme_runs_print_its_tables(module, capsys):
    """`python -m mipo_mlx.core.config` and `python -m mipo_mlx.engine.memory`, as the README
    says to run them, print the tables it holds (from wherever the modules live)."""
    import runpy

    assert f"`python -m {module}`" in README
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    printed = capsys.readouterr().out
    assert printed.strip() and printed.strip() in README


def test_readme_recipe_memory_table_is_computed_from_the_recipes():
    from mipo_mlx.engine.memory import RECIPES, recipe_memory_markdown

    assert recipe_memory_markdown(ROOT / "configs") in README
    for recipe in RECIPES:
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


@pytest.mark.parametrize("how", [[], ["--stages"]], ids=["pipeline", "stages"])
def test_python_api_example_runs(tmp_path, how):
    """The example runs the job whole, and stage by stage over one Run."""
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "python_api.py"),
        "--toy",
        "--steps",
        "2",
        "--output",
        str(tmp_path / "api"),
        *how,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pairs; after 2 steps" in done.stdout
    assert (tmp_path / "api" / "adapter_config.json").is_file()


@pytest.mark.integration  # the experiment, end to end in processes of its own
def test_embedded_experiment_runs_small(tmp_path):
    """The experiment end to end on a few prompts: the levers and the choices on valid, every
    arm on held-out with the guard where the design says, the fresh draw, and the tables."""
    trial = {
        "data.limit": 6,
        "evaluation.limit": 4,
        "guard.limit": 4,
        "evaluation.max_tokens": 12,
        "training.batch_size": 2,
        "training.iters": 1,
    }
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "embedded_experiment.py"),
        "--output",
        str(tmp_path / "exp"),
        "--seeds",
        "0,1",
        "--rounds",
        "2",
        *[arg for k, v in trial.items() for arg in ("--set", f"{k}={v}")],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "exp" / "results-all.json").read_text())
    chosen = report["chosen_on_valid"]
    assert chosen["personalization"]["recipe"]["training.rounds"] == 2
    assert chosen["problems"]["lr"] in (3e-4, 2e-3)
    assert set(chosen["label_free_tracking"]) == {"personalization", "problems"}
    assert len(chosen["valid"]) == 9  # 7 personalization settings, 2 problems rates
    arms = report["personalization"]
    assert set(arms) == {
        "base",
        "sft",
        "today's recipe, 1 round(s)",
        "today's recipe, 2 round(s)",
        "new recipe with the guard",
        "recipe, round 1 (no guard)",
        "recipe, round 2 (no guard)",
        "best of 4 at inference",
    }
    assert all(len(rows) == 2 for rows in arms.values())
    problems = {a for a in report["problems"] if "(no guard)" not in a}
    assert problems == {
        "base",
        "sft",
        "mipo random with the guard",
        "mipo incomplete with the guard",
        "majority vote with the guard",
    }
    assert len(report["fresh draw"]["new recipe with the guard"]) == 1
    assert (
        "| new recipe with the guard |" in done.stdout
        and "| majority vote with the guard |" in done.stdout
    )
    # The choices were made on valid alone: no run of step 1 saw the held-out prompts.
    for config in (tmp_path / "exp" / "select").glob("*/config.yaml"):
        assert "valid.jsonl" in yaml.safe_load(config.read_text())["evaluation"]["prompts"]


def test_readme_two_commands_are_the_ones_ci_runs():
    """The README's setup is the one CI uses: the test command is .ci/run's last line as is,
    and the main job's command sets up the same way (the plot extra instead of dev)."""
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    main_job, tests = [block.strip() for block in bash_blocks(section)[:2]]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == tests
    # ... inside the fresh-machine simulation, so a library left on the CI machine hides nothing
    assert any('exec python3 benchmarks/fresh_machine.py bash "$0"' in line for line in ci)
    setup = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu,{}]" && '
    assert tests == setup.format("dev") + "pytest -q"
    assert main_job == setup.format("plot") + "python -m mipo_mlx.train"

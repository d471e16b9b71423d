"""The README's Python example runs as written, and the engine's public names are what they say."""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_SECTION = "## The engine from Python"


def readme_python_example() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index(EXAMPLE_SECTION):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_public_names_are_not_shadowed_by_submodules():
    import ice_ops

    for name in ice_ops.__all__:
        if name.startswith("__"):
            continue
        assert importlib.util.find_spec(f"ice_ops.{name}") is None, f"ice_ops.{name} is also a submodule"


def test_public_functions_stay_functions_after_every_submodule_is_imported():
    import ice_ops

    for module in ("localization", "composition", "learn", "concepts", "bundle", "retrieve"):
        importlib.import_module(f"ice_ops.{module}")
    from ice_ops import compose, generate, learn_intrinsic_tokens, learn_object_tokens, localize

    for function in (localize, learn_object_tokens, learn_intrinsic_tokens, compose, generate):
        assert callable(function) and not isinstance(function, type(ice_ops)), function


def test_readme_python_example_runs_as_written(tmp_path):
    from ice_ops.toyworld import embedded_weights_present

    if not embedded_weights_present():
        pytest.skip("the Toy World weights are not installed")
    result = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "found: [" in result.stdout and "found: []" not in result.stdout
    assert (tmp_path / "toy_concepts.safetensors").is_file()


def readme_commands() -> list[list[str]]:
    """The arguments of every ``python -m ice_ops`` and ``torchrun ... -m ice_ops`` line of the README."""
    import re
    import shlex

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    commands = []
    for line in lines:
        match = re.match(r"^(?:python|torchrun .*?) -m ice_ops (.*)$", line.split("  #")[0].strip())
        if match:
            commands.append(shlex.split(match.group(1)))
    return commands


def test_every_command_line_in_the_readme_parses():
    from ice_ops.__main__ import build_parser

    commands = readme_commands()
    assert {"demo", "localize", "learn", "compose", "export", "batch", "benchmark"} <= {
        next(word for word in arguments if not word.startswith("-")) for arguments in commands}
    for arguments in commands:
        build_parser().parse_args(arguments)  # argparse exits on a misspelt option or a missing argument

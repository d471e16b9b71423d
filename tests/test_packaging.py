"""Packaging promises: CI runs the README's commands, the pack imports without ComfyUI, no torch pin."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return handle.read()


def _development_commands():
    readme = _read("README.md")
    section = readme.split("## Development", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_development_commands_verbatim():
    commands = _development_commands()
    assert len(commands) == 2
    ci_lines = [line.strip() for line in _read(".ci/run").splitlines()]
    for command in commands:
        assert command in ci_lines


def test_runtime_requirements_do_not_pin_torch():
    for name in ("requirements.txt", "pyproject.toml"):
        text = _read(name)
        assert not re.search(r'^\s*"?torch[=<>~ ]', text, re.M), name
    requirements = {line.split(">")[0].split("=")[0].strip() for line in _read("requirements.txt").splitlines()
                    if line.strip() and not line.startswith("#")}
    for package in ("diffusers", "transformers", "open_clip_torch", "numpy", "safetensors", "pillow"):
        assert package in requirements


def test_importing_the_engine_and_the_pack_loads_no_comfyui():
    code = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import ice_ops, ice_ops.localization, ice_ops.learn, ice_ops.composition, ice_ops.concepts, ice_ops.retrieve\n"
        f"spec = importlib.util.spec_from_file_location('ice_pack', {os.path.join(ROOT, '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert hasattr(module, 'comfy_entrypoint')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server')"
        " or m.startswith('comfy')]\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_registry_metadata_is_complete_and_points_at_files_in_the_repository():
    import tomllib

    project = tomllib.loads(_read("pyproject.toml"))
    name, comfy = project["project"]["name"], project["tool"]["comfy"]
    assert "comfyui" not in name.lower()  # the registry's specification advises against it in the node id
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name) and len(name) < 100
    icon = comfy["Icon"]
    repository = project["project"]["urls"]["Repository"]
    raw_prefix = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(raw_prefix) and os.path.isfile(os.path.join(ROOT, icon[len(raw_prefix):]))
    minimum = re.search(r"ComfyUI (\d+\.\d+\.\d+) or newer is needed", _read("README.md")).group(1)
    assert comfy["requires-comfyui"] == f">={minimum}"


def test_the_readme_names_the_oldest_versions_that_ci_tests():
    import tomllib

    dependencies = tomllib.loads(_read("pyproject.toml"))["project"]["dependencies"]
    floors = dict(entry.split(">=") for entry in dependencies if ">=" in entry)
    tested = _read("README.md").split("Tested versions:", 1)[1].split("\n\n", 1)[0]
    for library in ("transformers", "diffusers", "open_clip_torch"):
        assert f"{library} {floors[library]}" in " ".join(tested.split()), library
    assert "python .ci/oldest_versions.py" in _read(".ci/run")


def test_what_ships_never_imports_the_build_tools():
    """ice_ops and nodes run for users; devtools (random models, the Toy World trainer) only builds and tests."""
    import tomllib

    for package in ("ice_ops", "nodes"):
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in (n for n in names if n.endswith(".py")):
                source = _read(os.path.relpath(os.path.join(folder, name), ROOT))
                assert not re.search(r"^\s*(from|import)\s+devtools\b", source, re.M), os.path.join(folder, name)
    packages = tomllib.loads(_read("pyproject.toml"))["tool"]["setuptools"]["packages"]
    assert not any(p.startswith("devtools") for p in packages)

"""Environments: the lock covers pyproject.toml, the conda envs pin the lock's versions, and
every rule's script imports inside a virtualenv holding exactly its env's pip packages.

Conda's channels cannot be reached here, and our envs are pip lists inside conda: a virtualenv
with the same pip list (installed with ``--no-deps``, so nothing outside the list comes in) is
what the rule's script would see under ``--use-conda``, Python itself aside.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements/lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements/lock.txt: {line} is not pinned"
            pins[canonicalize_name(name)] = pinned
    return pins


def _env_pins(env_file: Path) -> list[str]:
    env = yaml.safe_load(env_file.read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def _rules() -> list[tuple[str, str, Path]]:
    """(rule name, env file name, script path) of every rule that runs a script."""
    rules = []
    for smk in sorted((REPO / "pipeline/rules").glob("*.smk")):
        for block in re.split(r"\nrule ", smk.read_text())[1:]:
            name = block.split(":", 1)[0].strip()
            script = re.search(r'script:\s*\n\s*"([^"]+)"', block)
            if script:
                env = re.search(r'conda:\s*\n\s*"([^"]+)"', block)
                assert env, f"{smk.name}: rule {name} runs a script but has no conda env"
                env_path = (smk.parent / env.group(1)).resolve()
                assert env_path.is_file(), f"{smk.name}: rule {name}: {env_path} missing"
                rules.append((name, env_path.name, (smk.parent / script.group(1)).resolve()))
    return rules


def test_lock_pins_every_dependency_within_pyproject_ranges():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = _lock()
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for text in requirements:
        req = Requirement(text)
        pinned = lock.get(canonicalize_name(req.name))
        assert pinned, f"{req.name} is in pyproject.toml but not in requirements/lock.txt"
        assert req.specifier.contains(pinned, prereleases=True), (
            f"lock pins {req.name}=={pinned}, outside pyproject's {req.specifier}"
        )


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_conda_env_pins_the_lock(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert set(env) == {"name", "channels", "dependencies"}
    assert "conda-forge" in env["channels"]
    lock = _lock()
    for requirement in _env_pins(env_file):
        name, _, pinned = requirement.partition("==")
        assert pinned, f"{env_file.name}: {requirement} is not pinned"
        assert lock.get(canonicalize_name(name)) == pinned, (
            f"{env_file.name}: {name}=={pinned} but requirements/lock.txt has "
            f"{lock.get(canonicalize_name(name))}: run `bash requirements/lock.sh`"
        )
    # what the env is made from (envs/<name>.in) is all in it
    wanted = env_file.with_suffix(".in").read_text().splitlines()
    names = {canonicalize_name(r.partition("==")[0]) for r in _env_pins(env_file)}
    for line in wanted:
        line = line.split("#", 1)[0].strip()
        if line:
            assert canonicalize_name(Requirement(line).name) in names, (env_file.name, line)


def test_every_rule_script_has_an_env():
    assert {env for _, env, _ in _rules()} <= {p.name for p in ENV_FILES}
    assert len(_rules()) >= 7


def _imports(script: Path) -> list[str]:
    """Every import statement of a script, as source lines (nested ones too)."""
    lines = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            lines += [f"import {alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = ", ".join(alias.name for alias in node.names)
            lines.append(f"from {node.module} import {names}")
    return lines


def _venv_for(env_file: Path, root: Path) -> Path:
    """A virtualenv with exactly the env's pip list (cached by its content)."""
    pins = _env_pins(env_file)
    digest = hashlib.sha256("\n".join([sys.version, *pins]).encode()).hexdigest()[:12]
    venv = root / f"{env_file.stem}-{digest}"
    python = venv / "bin" / "python"
    if (venv / "ok").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    requirements = venv / "requirements.txt"
    requirements.write_text("\n".join(pins) + "\n")
    # --no-compile: byte-compiling every module of torch was half the install time; the imports
    # below compile what they load
    res = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile"]
        + ["-r", str(requirements)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"{env_file.name}: pip install failed:\n{res.stderr[-3000:]}"
    # --no-deps installed the list alone: pip check proves the list is closed
    res = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    assert res.returncode == 0, f"{env_file.name} is not self-contained:\n{res.stdout}"
    (venv / "ok").touch()
    return python


@pytest.fixture(scope="session")
def venv_root(tmp_path_factory):
    cache = os.environ.get("NIDL_DINO_ENV_CACHE")
    return Path(cache) if cache else tmp_path_factory.mktemp("envs")


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.stem)
def test_rule_scripts_import_in_their_own_env(env_file, venv_root):
    rules = [(name, script) for name, env, script in _rules() if env == env_file.name]
    if not rules:
        pytest.skip(f"no rule uses {env_file.name}")
    python = _venv_for(env_file, venv_root)
    for rule, script in rules:
        code = "\n".join(
            [f"import sys; sys.path.insert(0, {str(REPO)!r})", *_imports(script), "print('ok')"]
        )
        # -I: isolated from this test's environment (PYTHONPATH, user site, working directory)
        res = subprocess.run(
            [str(python), "-I", "-c", code], capture_output=True, text=True, cwd=venv_root
        )
        assert res.returncode == 0 and res.stdout.strip() == "ok", (
            f"rule {rule} ({script.name}) cannot import in {env_file.name}:\n" + res.stderr[-2000:]
        )

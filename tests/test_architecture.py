"""The shape the code keeps, so that it stays a reference others can read: short functions and
classes, few parameters, the error layers and import rules of docs/architecture.md, no
import-time side effects, and a guide whose every named file exists."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

LIBRARY = pathlib.Path(REPO) / "jaxdiff"
MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_PUBLIC_PARAMETERS = 80, 130, 10


def library_modules():
  return sorted(LIBRARY.rglob("*.py"))


def parsed(path):
  return ast.parse(path.read_text(), filename=str(path))


def parameter_count(function: ast.FunctionDef) -> int:
  arguments = function.args
  names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
  names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
  return len([name for name in names if name not in ("self", "cls")])


def test_functions_and_classes_are_short_and_public_functions_take_few_parameters():
  too_long, too_many = [], []
  for path in library_modules():
    for node in ast.walk(parsed(path)):
      where = f"{path.relative_to(REPO)}:{node.lineno if hasattr(node, 'lineno') else 0}"
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
          too_long.append(f"{where} {node.name}")
        if not node.name.startswith("_") and parameter_count(node) > MAX_PUBLIC_PARAMETERS:
          too_many.append(f"{where} {node.name}")
      elif isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
        too_long.append(f"{where} {node.name}")
  assert not too_long, f"over {MAX_FUNCTION_LINES} (functions) or {MAX_CLASS_LINES} (classes) lines"
  assert not too_many, f"public functions with more than {MAX_PUBLIC_PARAMETERS} parameters"


def imported_modules(path) -> set[str]:
  names = set()
  for node in ast.walk(parsed(path)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_only_jobs_import_checkpoint_and_only_jobs_and_config_check_raise_usage_errors():
  importers, raisers = [], []
  for path in library_modules():
    relative = path.relative_to(REPO).as_posix()
    in_jobs = relative.startswith("jaxdiff/jobs/")
    if "jaxdiff.checkpoint" in imported_modules(path) and not in_jobs:
      importers.append(relative)
    raises_usage = any(isinstance(node, ast.Raise) and node.exc is not None
                       and "UsageError" in ast.unparse(node.exc).split("(")[0]
                       for node in ast.walk(parsed(path)))
    is_program = path.name == "__main__.py"  # `python -m jaxdiff.X`: a program, like train.py
    if raises_usage and not (in_jobs or is_program or relative == "jaxdiff/config_check.py"):
      raisers.append(relative)
  assert importers == []
  assert raisers == []


SIDE_EFFECTS = """
import importlib, json, os, pkgutil, sys
import absl.flags, fsspec, matplotlib
before = (dict(os.environ), json.dumps(fsspec.config.conf, sort_keys=True, default=str),
          matplotlib.get_backend(), absl.flags.FLAGS.is_parsed())
import jaxdiff
for module in pkgutil.walk_packages(jaxdiff.__path__, "jaxdiff."):
  importlib.import_module(module.name)
after = (dict(os.environ), json.dumps(fsspec.config.conf, sort_keys=True, default=str),
         matplotlib.get_backend(), absl.flags.FLAGS.is_parsed())
changed = [name for name, b, a in zip(("environment", "fsspec config", "matplotlib backend",
                                       "absl flags parsed"), before, after) if b != a]
print(json.dumps(changed))
"""


@pytest.mark.slow
def test_importing_every_module_changes_nothing_outside_it():
  environment = dict(os.environ, STORAGE_EMULATOR_HOST="http://127.0.0.1:9")
  result = subprocess.run([sys.executable, "-c", SIDE_EFFECTS], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == []


def test_every_file_the_architecture_guide_names_exists():
  guide = (pathlib.Path(REPO) / "docs" / "architecture.md").read_text()
  named = set(re.findall(r"`((?:jaxdiff|configs|tests|benchmarks|docs)/[\w/.*-]+|[\w-]+\.py)`",
                         guide))
  missing = []
  for name in sorted(named):
    candidates = [name, f"jaxdiff/{name}", f"jaxdiff/*/{name}"]
    if not any(list(pathlib.Path(REPO).glob(candidate)) for candidate in candidates):
      missing.append(name)
  assert len(named) > 20 and missing == []


def test_the_architecture_guide_lists_every_library_module():
  guide = (pathlib.Path(REPO) / "docs" / "architecture.md").read_text()
  unlisted = [path.relative_to(LIBRARY).as_posix() for path in library_modules()
              if path.name != "__init__.py" and path.name not in guide]
  assert unlisted == []

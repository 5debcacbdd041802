"""Imports point one way: a module never imports a layer above its own (README, code layout).

Every ``import`` of every module under ``ascan_jax/`` is read, including those inside functions,
so a lazy import cannot hide an upward dependency.
"""
import ast
import os

import pytest

from tests import helpers

# Bottom to top; a module may import its own layer and the ones below.
LAYERS = (
    ("ascan_jax.config_defaults", "ascan_jax.config_validation", "ascan_jax.fileio",
     "ascan_jax.compute", "ascan_jax.parallel", "ascan_jax.perf", "ascan_jax.viz"),
    ("ascan_jax.models", "ascan_jax.data", "ascan_jax.diffusion"),
    ("ascan_jax.train",),
    ("ascan_jax.eval",),
    ("ascan_jax.tasks",),
    ("ascan_jax.modes", "ascan_jax.tools"),
)
# Not upward, but excluded all the same: evaluators take callables and never build a state.
FORBIDDEN = (("ascan_jax.eval", "ascan_jax.train"),)


def _within(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
  for i, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  return None


def imports_of(path: str) -> list[tuple[int, str]]:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.append((node.lineno, node.module))
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return out


def package_modules():
  root = os.path.join(helpers.REPO, "ascan_jax")
  for directory, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, helpers.REPO)[:-3].replace(os.sep, ".")
        yield path, rel.removesuffix(".__init__")


def upward_imports(modules) -> list[str]:
  problems = []
  for path, module in modules:
    own = layer_of(module)
    if own is None:
      continue
    for line, imported in imports_of(path):
      target = layer_of(imported)
      if target is not None and target > own:
        problems.append(f"{module} (layer {own}) imports {imported} (layer {target}) at line "
                        f"{line}")
      for low, high in FORBIDDEN:
        if _within(module, low) and _within(imported, high):
          problems.append(f"{module} imports {imported} at line {line} ({low} must not import "
                          f"{high})")
  return problems


def test_every_module_has_a_layer():
  unplaced = [m for _, m in package_modules() if m != "ascan_jax" and layer_of(m) is None]
  assert not unplaced, f"modules outside every layer: {unplaced}"


def test_no_module_imports_a_higher_layer():
  problems = upward_imports(package_modules())
  assert not problems, "\n".join(problems)


def test_the_check_catches_an_upward_import(tmp_path):
  bad = tmp_path / "evaluator.py"
  bad.write_text("import numpy\ndef f():\n  from ascan_jax.tasks import base\n")
  assert upward_imports([(str(bad), "ascan_jax.eval.evaluator")])
  bad.write_text("from ascan_jax.train import builder\n")
  assert upward_imports([(str(bad), "ascan_jax.eval.evaluator")])
  ok = tmp_path / "ok.py"
  ok.write_text("from ascan_jax.models import blocks\n")
  assert not upward_imports([(str(ok), "ascan_jax.eval.ok")])


@pytest.mark.parametrize("module", ["ascan_jax.eval.evaluator", "ascan_jax.models.ascan"])
def test_layers_are_what_the_readme_says(module):
  assert layer_of(module) is not None

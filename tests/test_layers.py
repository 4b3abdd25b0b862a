"""The packages depend one way: kernels <- engine <- export, train, bench. Read from the import statements of every
module (those inside functions too), so an import added anywhere that points back up fails here."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("kernels", "engine", "export", "train", "bench")
MAY_NOT_IMPORT = {"kernels": {"engine", "export", "train", "bench"}, "engine": {"export", "train", "bench"}}


def imported_packages(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PACKAGES)


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_lower_layers_import_nothing_above_them(package):
    bad = []
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                wrong = imported_packages(path) & MAY_NOT_IMPORT[package]
                bad += [f"{os.path.relpath(path, ROOT)} imports {', '.join(sorted(wrong))}"] if wrong else []
    assert not bad, bad

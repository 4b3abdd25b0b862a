"""bench/gpu-tests.txt: the test files the GPU check's gpu-tests part runs, in order, and what it keeps out and why.

`python -m bench.gpu_tests args` prints the part's pytest arguments, one a line (`--deselect NODE` for each
deselected node, then the files); `python -m bench.gpu_tests reasons` prints one line per deselected node with
its reason. bench/gpu_session.sh reads the list only through here, and so do its tests.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu-tests.txt")


@dataclass(frozen=True)
class GpuTests:
    files: tuple[str, ...]                   # run in this order
    deselected: tuple[tuple[str, str], ...]  # (node-id prefix or file, reason)

    def pytest_args(self) -> list[str]:
        within = [node for node, _ in self.deselected if node.split("::")[0] in self.files]
        return [arg for node in within for arg in ("--deselect", node)] + list(self.files)

    def keeps(self, nodeid: str) -> bool:
        """Whether the part runs this gpu test (pytest's --deselect is a prefix match)."""
        return nodeid.split("::")[0] in self.files and not any(nodeid.startswith(n) for n, _ in self.deselected)


def read(path: str = LIST) -> GpuTests:
    files, deselected = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            words = line.split(maxsplit=2)
            if not words or words[0].startswith("#"):
                continue
            if words[0] == "deselect" and len(words) == 3:
                deselected.append((words[1], words[2].strip()))
            elif len(words) == 1 and words[0].endswith(".py"):
                files.append(words[0])
            else:
                raise ValueError(f"{path}:{n}: want a test file alone or `deselect NODE REASON`, got {line.strip()!r}")
    return GpuTests(tuple(files), tuple(deselected))


def main(argv: list[str]) -> int:
    tests = read()
    if argv == ["args"]:
        print("\n".join(tests.pytest_args()))
    elif argv == ["reasons"]:
        print("\n".join(f"gpu-tests: deselected {node}: {why}" for node, why in tests.deselected))
    else:
        print("usage: python -m bench.gpu_tests args|reasons", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The project's import structure, read from the code (ast, nothing imported): layers only point down, and the import
cycles are exactly the ones listed here, which issue 27's redesign removes. An import inside a function counts (a
cycle held together by deferred imports is still a cycle), except in a package's `__init__`, whose lazy attribute
loader defers the heavy pipeline on purpose (`python -m engine --help` stays light). engine/registry.py's table names
classes by string and imports them on first use (a plugin table, as diffusers' auto-pipeline mappings): it is not an
import edge, which is what lets `Pipeline.from_pretrained` return the SDXL or TensorRT class without a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "kernels", "export", "train", "bench")
# what may import what (STYLE.md): kernels/ knows no model; engine/ imports nothing from export/, train/ or bench/
MAY_NOT_IMPORT = {"kernels": {"engine", "export", "train", "bench"}, "engine": {"export", "train", "bench"}}
# the cycles left (main at 831ec83 had four; issue 27's redesign broke them all): none may join
KNOWN_CYCLES: list[set[str]] = []


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules `name` imports (a name imported from a package counts as its submodule when it is one)."""
    def resolve(dotted):
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    tree = ast.parse(path.read_text())
    deferred = set()
    if path.name == "__init__.py":
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                deferred.update(id(n) for n in ast.walk(fn))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in deferred:
            continue
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            full = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.update(resolve(f"{full}.{a.name}" if f"{full}.{a.name}" in known else full) for a in node.names)
    return found - {None, name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_cycles_are_the_known_ones():
    found = cycles(graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not new, f"import cycles that are not in KNOWN_CYCLES (break them; never add them): {new}"
    assert not gone, f"these known cycles changed or are gone: take them out of KNOWN_CYCLES: {gone}"


def test_layers_point_down():
    wrong = sorted(f"{name} imports {dep}" for name, deps in graph().items() for dep in deps
                   if dep.split(".")[0] in MAY_NOT_IMPORT.get(name.split(".")[0], set()))
    assert not wrong, wrong


def test_the_checker_sees_a_cycle_held_by_a_deferred_import(tmp_path):
    """The reader itself: a cycle whose one side imports inside a function is found, a package's lazy loader is not."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    (tmp_path / "__init__.py").write_text("def __getattr__(n):\n    from .a import z\n")
    known = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py", "p": tmp_path / "__init__.py"}
    g = {name: imports(name, path, known) for name, path in known.items()}
    assert g == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p": set()}
    assert cycles(g) == [{"p.a", "p.b"}]


# STYLE.md: no file over ~400 lines, no function over ~80. Issue 27 split the last exceptions; none may join
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
KNOWN_LONG_FILES: dict = {}
KNOWN_LONG_FUNCTIONS: dict = {}


def sizes() -> tuple[dict, dict]:
    files, functions = {}, {}
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        files[rel] = text.count("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[f"{rel}:{node.name}"] = max(functions.get(f"{rel}:{node.name}", 0),
                                                      node.end_lineno - node.lineno + 1)
    return files, functions


def test_files_and_functions_stay_small():
    files, functions = sizes()
    for found, known, limit, what in ((files, KNOWN_LONG_FILES, MAX_FILE_LINES, "lines"),
                                      (functions, KNOWN_LONG_FUNCTIONS, MAX_FUNCTION_LINES, "lines of function")):
        long = {k: n for k, n in found.items() if n > limit}
        new = {k: n for k, n in long.items() if k not in known}
        grew = {k: (known[k], n) for k, n in long.items() if k in known and n > known[k]}
        gone = sorted(k for k in known if found.get(k, 0) <= limit)
        assert not new, f"over {limit} {what} (split them): {new}"
        assert not grew, f"known long ones grew (was, now): {grew}"
        assert not gone, f"these are no longer over {limit} {what}: take them out of the known list: {gone}"

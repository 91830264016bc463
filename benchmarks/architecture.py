"""Architecture metrics of a source tree (issue 21): import cycles, modality string switches, README size, module sizes,
and the files a `compress run` passes through.

    python benchmarks/architecture.py [--root DIR] [--trace RECIPE] [--run RECIPE ...] [--json OUT [--merge]]

Static metrics need nothing but the standard library and read the tree at --root (default: this checkout); --trace and
--run import the project from --root (a finder for --root's package mapping is put first on sys.meta_path, so an
editable install of another checkout cannot win) and run `compress run RECIPE --output TMP` in this process.

Rules (what is counted)

* Modules: every .py file under the folders that pyproject.toml's [tool.setuptools.package-dir] maps into `compressor`
  (`compressor.passes` = passes/, `compressor.models` = models/, `compressor.runtime` = runtime/, the rest of
  `compressor.*` = compressor/), found by walking the folders, so a new sub-package counts before pyproject lists it.
  A package is its `__init__`, named by the package (`compressor.export`).
* Import edges, between project modules only, from every `import` / `from ... import` statement anywhere in a file
  (module level and inside functions, try blocks included), relative imports resolved, except those under
  `if TYPE_CHECKING:` (Python never runs them), plus `importlib.import_module("literal")` / `__import__("literal")`.
  What Python executes decides the edges of a statement in module M importing target T:
    - `import a.b.c` and `from a.b.c import name` (name not a submodule) give M -> a.b.c;
    - `from a.b import c` where a/b/c is a submodule gives M -> a.b.c (not M -> a.b: the name comes from the submodule);
    - `from a.b import *` gives M -> a.b;
    - the packages above T (a, a.b) are executed first, so M -> a and M -> a.b are added too, EXCEPT for packages that
      contain M itself: those are already in sys.modules (initialised or initialising) whenever M runs, so a submodule
      importing a sibling is not a cycle with its package's `__init__`.
  Hence a package `__init__` that imports its own submodules is a cycle only when a submodule reads a name that the
  `__init__` defines or re-exports (`from compressor.x import y`, y not a submodule, inside compressor/x/...), which is
  exactly the case where the order of execution matters. `compressor/__init__`'s lazy `__getattr__` (a variable passed
  to import_module) is not an edge.
* Cycles: strongly connected components of that graph with more than one module (a module importing itself is not
  an edge), each with the edges inside it (file:line, whether inside a function). `cycles_module_level` repeats the
  count with only module-level imports (the ones that can fail at import time).
* Modality comparisons: `Compare` nodes (==, !=, in, not in, is, ...) whose left side or a comparator is one of the
  string constants "text", "image", "causal_lm", "audio", or a tuple / list / set literal holding one; one per node.
  `match` cases on those constants are counted too (`case "text":`), so a rewrite into match/case cannot hide a switch.
  Not seen: a dict keyed by those strings, or a comparison with a named constant (`== TEXT`). Counted outside
  compressor.models (models/) and compressor.targets (the target classes), with the excluded count beside it.
* Size: README.md bytes; lines (as `wc -l`) of every module, the ten largest, the total.
* Trace: the files of compressor/, passes/, models/, runtime/ whose Python functions are entered (sys.settrace 'call'
  events; a generator resuming is not a new entry and is counted apart; code running while a project module is being
  imported is not part of the sequence, the files imported during the run are listed apart). Consecutive events in
  the same file collapse into one; `returns_to_a_left_file` counts the changes A -> B (B != A) where B was entered
  before. Every forward pass repeats the model's per-layer calls (models/bert.py <-> program/encoder.py ...), so that
  count is mostly loop iterations; `first_calls` repeats it over the first call of each function only (a loop counted
  once: the path through the code), with that sequence of files. Per-function call counts are listed (a function of
  the orchestration run two or three times shows there). The published manifest's `validation` block is recorded.
"""

from __future__ import annotations

import argparse
import ast
import dis
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PACKAGE = "compressor"
MODALITIES = frozenset({"text", "image", "causal_lm", "audio"})
MODALITY_EXCLUDED = ("compressor.models", "compressor.targets")
DEFAULT_MAPPING = {"compressor": "compressor", "compressor.passes": "passes", "compressor.models": "models",
                   "compressor.runtime": "runtime"}
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------------
# Modules of the tree


def package_mapping(root: Path) -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's package-dir (the default layout when it cannot be read)."""
    mapping = dict(DEFAULT_MAPPING)
    pyproject = root / "pyproject.toml"
    if tomllib is not None and pyproject.is_file():
        with open(pyproject, "rb") as f:
            data = tomllib.load(f)
        dirs = data.get("tool", {}).get("setuptools", {}).get("package-dir", {})
        found = {k: v for k, v in dirs.items() if k == PACKAGE or k.startswith(PACKAGE + ".")}
        if found:
            mapping = found
    return {name: (root / folder).resolve() for name, folder in mapping.items()}


def _module_name(package: str, rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts]) if parts else package


def discover_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file under the mapped folders (the most specific mapping names a file)."""
    mapping = package_mapping(root)
    owner: dict[Path, tuple[int, str]] = {}  # file -> (depth of the mapping that names it, module name)
    for package, folder in mapping.items():
        if not folder.is_dir():
            continue
        depth = package.count(".")
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                                 and not d.endswith(".egg-info"))
            for fn in filenames:
                if not fn.endswith(".py"):
                    continue
                path = Path(dirpath, fn).resolve()
                name = _module_name(package, path.relative_to(folder))
                if path not in owner or owner[path][0] < depth:
                    owner[path] = (depth, name)
    return {name: path for path, (_, name) in sorted(owner.items(), key=lambda kv: kv[1][1])}


def _rel(root: Path, path: Path) -> str:
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# Import graph


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.Module):
    """(node, inside_function) for every import Python would execute, TYPE_CHECKING blocks left out."""
    out = []

    def visit(node, in_function):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, in_function))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return out


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str | None:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        if level - 1 > len(base):
            return None
        base = base[: len(base) - (level - 1)]
    name = ".".join(base)
    if target:
        name = f"{name}.{target}" if name else target
    return name or None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path, modules: dict[str, Path] | None = None) -> dict:
    """Edges between project modules: {importer: {imported: [(line, inside_function), ...]}}."""
    modules = modules if modules is not None else discover_modules(root)
    known = set(modules)
    edges: dict[str, dict[str, list]] = {m: {} for m in modules}

    def add(src, dst, line, in_function):
        sites = edges[src].setdefault(dst, [])
        if (line, in_function) not in sites:
            sites.append((line, in_function))

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as e:
            raise SystemExit(f"cannot parse {path}: {e}")
        own_packages = set(_ancestors(name)) | ({name} if is_package else set())
        for node, in_function in _import_statements(tree):
            targets = []  # (module the statement executes, whether it reads names from it)
            if isinstance(node, ast.Import):
                targets = [(alias.name, False) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(name, is_package, node.level, node.module) if node.level
                        else node.module)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append((sub, False) if alias.name != "*" and sub in known else (base, True))
            else:  # import_module("x") / __import__("x")
                targets = [(node.args[0].value, False)]
            for target, reads in targets:
                while target not in known and "." in target:  # a dotted name that is not a file: its deepest module
                    target = target.rsplit(".", 1)[0]
                if target not in known or target == name:
                    continue
                for pkg in _ancestors(target):
                    if pkg not in own_packages:
                        add(name, pkg, node.lineno, in_function)
                # a package containing this module is in sys.modules already: an edge only when names are read from it
                if target not in own_packages or reads:
                    add(name, target, node.lineno, in_function)
    return edges


def strongly_connected(edges: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a stable order, each sorted."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                comps.append(sorted(comp))
    return sorted(comps)


def find_cycles(edges: dict[str, dict], modules: dict[str, Path] | None = None, root: Path | None = None,
                module_level_only: bool = False) -> list[dict]:
    if module_level_only:
        edges = {s: {d: [x for x in sites if not x[1]] for d, sites in ds.items()} for s, ds in edges.items()}
        edges = {s: {d: sites for d, sites in ds.items() if sites} for s, ds in edges.items()}
    cycles = []
    for comp in strongly_connected(edges):
        if len(comp) < 2 and comp[0] not in edges.get(comp[0], {}):
            continue
        members = set(comp)
        inner = []
        for src in comp:
            for dst, sites in sorted(edges[src].items()):
                if dst in members:
                    where = _rel(root, modules[src]) if modules and root else src
                    inner.append({"from": src, "to": dst,
                                  "at": [f"{where}:{line}" + (" (in a function)" if fn else "") for line, fn in sites]})
        cycles.append({"modules": comp, "edges": inner})
    return cycles


# ---------------------------------------------------------------------------------------------------------------------
# Modality comparisons


def _is_modality(node: ast.AST, strings=MODALITIES) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in strings
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value in strings
                   for e in node.elts)
    return False


def _match_is_modality(pattern, strings=MODALITIES) -> bool:
    if isinstance(pattern, ast.MatchValue):
        return _is_modality(pattern.value, strings)
    if isinstance(pattern, ast.MatchOr):
        return any(_match_is_modality(p, strings) for p in pattern.patterns)
    if isinstance(pattern, ast.MatchAs) and pattern.pattern is not None:
        return _match_is_modality(pattern.pattern, strings)
    return False


def modality_comparisons_in_source(source: str, filename: str = "<string>", strings=MODALITIES) -> list[int]:
    """Line numbers of the modality comparisons in one file's source (one entry per Compare node / match case)."""
    lines = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Compare):
            if _is_modality(node.left, strings) or any(_is_modality(c, strings) for c in node.comparators):
                lines.append(node.lineno)
        elif hasattr(ast, "match_case") and isinstance(node, ast.match_case):
            if _match_is_modality(node.pattern, strings):
                lines.append(node.pattern.lineno)
    return sorted(lines)


def modality_comparisons(root: Path, modules: dict[str, Path] | None = None,
                         excluded: tuple[str, ...] = MODALITY_EXCLUDED) -> dict:
    modules = modules if modules is not None else discover_modules(root)
    per_file, per_file_excluded, with_speech = {}, {}, 0
    for name, path in modules.items():
        source = path.read_text(encoding="utf-8")
        found = modality_comparisons_in_source(source, str(path))
        if not any(name == p or name.startswith(p + ".") for p in excluded):
            with_speech += len(modality_comparisons_in_source(source, str(path), MODALITIES | {"speech"}))
        if not found:
            continue
        out = per_file_excluded if any(name == p or name.startswith(p + ".") for p in excluded) else per_file
        out[_rel(root, path)] = {"count": len(found), "lines": found}
    order = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1]["count"], kv[0])))  # noqa: E731
    return {"count": sum(v["count"] for v in per_file.values()), "files": len(per_file),
            "excluded_prefixes": list(excluded),
            "count_excluded": sum(v["count"] for v in per_file_excluded.values()),
            "count_with_speech_kind": with_speech,  # also "speech", the artifact kind the runtime names audio by
            "per_file": order(per_file), "per_file_excluded": order(per_file_excluded)}


# ---------------------------------------------------------------------------------------------------------------------
# Sizes


def sizes(root: Path, modules: dict[str, Path] | None = None, top: int = 10) -> dict:
    modules = modules if modules is not None else discover_modules(root)
    lines = {}
    for path in modules.values():
        with open(path, "rb") as f:
            lines[_rel(root, path)] = f.read().count(b"\n")
    readme = root / "README.md"
    largest = sorted(lines.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"readme_bytes": readme.stat().st_size if readme.is_file() else None,
            "modules": len(lines), "total_lines": sum(lines.values()),
            "largest_modules": [{"file": f, "lines": n} for f, n in largest]}


def static_metrics(root: Path) -> dict:
    root = Path(root).resolve()
    modules = discover_modules(root)
    edges = import_graph(root, modules)
    cycles = find_cycles(edges, modules, root)
    return {"root": str(root), "commit": _commit(root),
            "import_graph": {"modules": len(modules), "edges": sum(len(d) for d in edges.values()),
                             "cycles": len(cycles),
                             "modules_in_cycles": sum(len(c["modules"]) for c in cycles),
                             "cycles_module_level": len(find_cycles(edges, module_level_only=True)),
                             "cycle_list": cycles},
            "modality_comparisons": modality_comparisons(root, modules),
            "size": sizes(root, modules)}


def _commit(root: Path) -> str | None:
    head = None
    try:
        import subprocess

        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        head = done.stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if head and dirty:
            head += "+dirty"
    except OSError:
        pass
    return head


# ---------------------------------------------------------------------------------------------------------------------
# Running `compress run` from --root


class _RootFinder(importlib.abc.MetaPathFinder):
    """Resolves `compressor` and its mapped sub-packages to --root, ahead of any editable install's finder."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.mapping:
            folder = self.mapping[fullname]
            init = folder / "__init__.py"
            if init.is_file():
                return importlib.util.spec_from_file_location(fullname, init,
                                                              submodule_search_locations=[str(folder)])
        return None


def use_root(root: Path) -> None:
    root = Path(root).resolve()
    if any(m == PACKAGE or m.startswith(PACKAGE + ".") for m in sys.modules):
        raise SystemExit("compressor is already imported; cannot switch it to --root")
    sys.meta_path.insert(0, _RootFinder(package_mapping(root)))
    import compressor  # noqa: F401

    where = Path(sys.modules[PACKAGE].__file__).resolve()
    if root not in where.parents:
        raise SystemExit(f"compressor imports from {where}, not from {root}")


class FileTracer:
    """sys.settrace 'call' events of project files, as a sequence of file changes."""

    CO_GEN = 0x20 | 0x80 | 0x200  # generator, coroutine, async generator
    CO_FUNCTION = 0x1  # CO_OPTIMIZED: functions, lambdas, comprehensions (not module or class bodies)

    def __init__(self, folders: list[Path], root: Path):
        self.prefixes = tuple(str(f) + os.sep for f in folders)
        self.root = root
        self.code_file: dict = {}  # code object -> file (None for non-project code)
        self.first_resume: dict = {}
        self.sequence: list[str] = []  # file changes
        self.first_sequence: list[str] = []  # file changes among first calls of each function (loops counted once)
        self.entries = Counter()  # file -> function entries
        self.function_calls = Counter()  # (file, qualname) -> calls
        self.resumes = Counter()
        self.imported = []  # project files whose module body ran during the trace
        self.importing = 0

    def _file(self, code):
        filename = code.co_filename
        if filename.startswith(self.prefixes):
            f = _rel(self.root, Path(filename))
        else:
            real = os.path.realpath(filename)
            f = _rel(self.root, Path(real)) if real.startswith(self.prefixes) else None
        self.code_file[code] = f
        return f

    def _is_resume(self, code, frame) -> bool:
        first = self.first_resume.get(code)
        if first is None:
            first = next((i.offset for i in dis.get_instructions(code) if i.opname == "RESUME"), -1)
            self.first_resume[code] = first
        return first >= 0 and frame.f_lasti > first

    def _module_done(self, frame, event, arg):
        if event == "return":
            self.importing -= 1
        return self._module_done

    def __call__(self, frame, event, arg):
        if event != "call":
            return None
        code = frame.f_code
        f = self.code_file.get(code, 0)
        if f == 0:
            f = self._file(code)
        if f is None:
            return None
        if not code.co_flags & self.CO_FUNCTION:
            if code.co_name == "<module>":
                self.importing += 1
                self.imported.append(f)
                frame.f_trace_lines = False
                return self._module_done
            return None
        if self.importing:
            return None
        if code.co_flags & self.CO_GEN and self._is_resume(code, frame):
            self.resumes[f] += 1
            return None
        self.entries[f] += 1
        key = (f, getattr(code, "co_qualname", code.co_name))
        calls = self.function_calls[key]
        self.function_calls[key] = calls + 1
        if not self.sequence or self.sequence[-1] != f:
            self.sequence.append(f)
        if not calls and (not self.first_sequence or self.first_sequence[-1] != f):
            self.first_sequence.append(f)
        return None

    def report(self) -> dict:
        first = summarise_sequence(self.first_sequence)
        first.pop("files")
        return summarise_sequence(self.sequence) | {
            "first_calls": first | {"sequence": self.first_sequence},
            "function_entries": sum(self.entries.values()),
            "entries_per_file": dict(self.entries.most_common()),
            "generator_resumes": sum(self.resumes.values()),
            "files_imported_during_run": sorted(set(self.imported)),
            "function_calls": {f"{f}:{q}": n for (f, q), n in sorted(self.function_calls.items(),
                                                                   key=lambda kv: (-kv[1], kv[0]))}}


def summarise_sequence(sequence: list[str]) -> dict:
    """Distinct files and returns to a file already left, from a sequence of file changes."""
    seen, returns, reentries = set(), 0, Counter()
    prev = None
    for f in sequence:
        if f != prev:
            if f in seen:
                returns += 1
                reentries[f] += 1
            seen.add(f)
        prev = f
    return {"files_entered": len(seen), "file_changes": max(len(sequence) - 1, 0),
            "returns_to_a_left_file": returns, "reentries_per_file": dict(reentries.most_common()),
            "files": sorted(seen)}


def run_recipe_cli(root: Path, recipe: str, trace: bool) -> dict:
    """`compress run RECIPE --output TMP` in this process; the published manifest's validation (and the trace)."""
    from compressor.cli.app import main  # imported before tracing: the CLI's own import is not the run

    recipe_path = str(Path(recipe).resolve()) if Path(recipe).exists() else recipe
    tmp = Path(tempfile.mkdtemp(prefix="architecture-"))
    out = tmp / "artifact"
    tracer = FileTracer(list(package_mapping(root).values()), root) if trace else None
    start = time.perf_counter()
    if tracer:
        import threading

        threading.settrace(tracer)
        sys.settrace(tracer)
    try:
        code = main(["run", recipe_path, "--output", str(out)])
    finally:
        if tracer:
            sys.settrace(None)
            threading.settrace(None)
    seconds = time.perf_counter() - start
    result = {"recipe": recipe, "exit_code": code, "seconds": round(seconds, 1)}
    manifest = out / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        result["validation"] = data.get("validation")
    shutil.rmtree(tmp, ignore_errors=True)
    if tracer:
        result["trace"] = tracer.report()
    return result


# ---------------------------------------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    g, m, s = result["import_graph"], result["modality_comparisons"], result["size"]
    print(f"root {result['root']} ({result.get('commit')})")
    print(f"import cycles            {g['cycles']} ({g['modules_in_cycles']} modules; "
          f"{g['cycles_module_level']} with module-level imports only)  [{g['modules']} modules, {g['edges']} edges]")
    for c in g["cycle_list"]:
        print("  - " + " <-> ".join(c["modules"]))
    print(f"modality comparisons     {m['count']} in {m['files']} files (excluded {', '.join(m['excluded_prefixes'])}: "
          f"{m['count_excluded']})")
    for f, v in list(m["per_file"].items())[:10]:
        print(f"  {v['count']:4d}  {f}")
    print(f"README.md                {s['readme_bytes']} bytes")
    print(f"lines                    {s['total_lines']} in {s['modules']} modules; largest:")
    for e in s["largest_modules"]:
        print(f"  {e['lines']:5d}  {e['file']}")
    for key in ("trace",):
        if key in result:
            t = result[key]
            print(f"trace {t['recipe']}: exit {t['exit_code']}, {t['seconds']} s, files entered "
                  f"{t['trace']['files_entered']}, returns to a left file {t['trace']['returns_to_a_left_file']} "
                  f"({t['trace']['first_calls']['returns_to_a_left_file']} among first calls of each function)")
            print(f"  validation {json.dumps(t.get('validation'))[:300]}")
    for recipe, r in result.get("examples", {}).items():
        validation = json.dumps(r.get("validation"))[:300]
        print(f"run {recipe}: exit {r['exit_code']}, {r['seconds']} s, validation {validation}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO), help="source tree to measure (default: this checkout)")
    p.add_argument("--trace", metavar="RECIPE", help="trace `compress run RECIPE` (imports the project from --root)")
    p.add_argument("--run", metavar="RECIPE", action="append", default=[],
                   help="run RECIPE untraced and record its validation under 'examples' (repeatable)")
    p.add_argument("--json", metavar="OUT", help="write everything as JSON")
    p.add_argument("--merge", action="store_true", help="keep what OUT already holds (its trace and examples)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    result = static_metrics(root)
    if args.json and args.merge and Path(args.json).is_file():
        old = json.loads(Path(args.json).read_text())
        for key in ("trace", "examples"):
            if key in old:
                result[key] = old[key]
    if args.trace or args.run:
        use_root(root)
        result["python"] = sys.version.split()[0]
    if args.trace:
        result["trace"] = run_recipe_cli(root, args.trace, trace=True)
    for recipe in args.run:
        result.setdefault("examples", {})[recipe] = run_recipe_cli(root, recipe, trace=False)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

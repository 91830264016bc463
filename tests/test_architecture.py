"""benchmarks/architecture.py (issue 21's measurements): its detectors on synthetic trees, the real tree's targets."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("architecture_metrics", REPO / "benchmarks" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


arch = _load()


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _cycles(root: Path) -> list[list[str]]:
    modules = arch.discover_modules(root)
    return [c["modules"] for c in arch.find_cycles(arch.import_graph(root, modules), modules, root)]


def test_module_names_follow_the_package_mapping(tmp_path):
    _write(tmp_path, {
        "pyproject.toml": ('[tool.setuptools.package-dir]\n"compressor" = "compressor"\n'
                           '"compressor.passes" = "passes"\n'),
        "compressor/__init__.py": "", "compressor/export/__init__.py": "", "compressor/export/bench.py": "",
        "passes/__init__.py": "", "passes/pruning/__init__.py": "", "passes/pruning/latency.py": "",
    })
    assert set(arch.discover_modules(tmp_path)) == {
        "compressor", "compressor.export", "compressor.export.bench",
        "compressor.passes", "compressor.passes.pruning", "compressor.passes.pruning.latency"}


def test_a_function_local_import_closes_a_cycle(tmp_path):
    _write(tmp_path, {
        "compressor/__init__.py": "",
        "compressor/export/__init__.py": "",
        "compressor/export/bench.py": "from compressor.export.baseline_bench import measure\n",
        "compressor/export/baseline_bench.py": """
            def measure():
                from . import bench  # function-local, relative: still an edge
                return bench
        """,
        "compressor/export/report.py": "from compressor.export import bench\n",  # into the cycle, not part of it
    })
    assert _cycles(tmp_path) == [["compressor.export.baseline_bench", "compressor.export.bench"]]
    modules = arch.discover_modules(tmp_path)
    only_top = arch.find_cycles(arch.import_graph(tmp_path, modules), module_level_only=True)
    assert only_top == []


def test_a_cycle_through_packages_and_import_module(tmp_path):
    _write(tmp_path, {
        "compressor/__init__.py": "",
        "compressor/sources/__init__.py": "from compressor.sources.gguf import read\n",  # executed before any sibling
        "compressor/sources/gguf.py": "def read(): pass\n",
        "passes/__init__.py": "",
        "passes/width.py": "import compressor.sources.gguf\n",  # runs compressor/sources/__init__ first
        "compressor/sources/data.py": """
            import importlib
            def f():
                return importlib.import_module("compressor.passes.width")
        """,
    })
    # passes.width -> compressor.sources (its __init__ runs first) -> compressor.sources.gguf; no way back: no cycle
    assert _cycles(tmp_path) == []
    (tmp_path / "compressor/sources/gguf.py").write_text("def read():\n    from compressor.sources import data\n")
    assert _cycles(tmp_path) == [["compressor.passes.width", "compressor.sources", "compressor.sources.data",
                                  "compressor.sources.gguf"]]


def test_package_init_and_its_submodules(tmp_path):
    files = {
        "compressor/__init__.py": "",
        "compressor/models/__init__.py": "from .base import Adapter\nfrom .llama import Llama\nDEFAULT = 1\n",
        "compressor/models/base.py": "class Adapter: pass\n",
        "compressor/models/llama.py": "from .base import Adapter\nimport compressor.models.base\n"
                                      "class Llama(Adapter): pass\n",
        "compressor/program/__init__.py": "",
        "compressor/program/decoder.py": "from typing import TYPE_CHECKING\n"
                                         "if TYPE_CHECKING:\n    from compressor.models import Llama\n",
    }
    _write(tmp_path, files)
    assert _cycles(tmp_path) == []  # an __init__ importing its submodules, siblings importing each other: no cycle
    # a submodule reading a name the __init__ defines is one (the __init__ has to have run that far)
    (tmp_path / "compressor/models/llama.py").write_text("from compressor.models import DEFAULT\nclass Llama: pass\n")
    assert _cycles(tmp_path) == [["compressor.models", "compressor.models.llama"]]
    (tmp_path / "compressor/models/llama.py").write_text("from . import DEFAULT\nclass Llama: pass\n")
    assert _cycles(tmp_path) == [["compressor.models", "compressor.models.llama"]]
    # and so is a module outside the package that the package reaches back to
    _write(tmp_path, {
        "compressor/models/llama.py": "class Llama:\n    def f(self):\n"
                                      "        from compressor.program import decoder\n",
        "compressor/program/decoder.py": "from compressor.models import Adapter\n",
    })
    assert _cycles(tmp_path) == [["compressor.models", "compressor.models.llama", "compressor.program.decoder"]]


def test_modality_comparisons_in_a_file():
    source = textwrap.dedent('''
        MODALITY = "text"                      # an assignment, not a comparison
        def f(adapter, kind, m):
            if adapter.modality == "text":     # 1
                pass
            if kind in ("image", "video"):     # 2 (a tuple holding one)
                pass
            if "audio" != m and m != "causal_lm":  # 3, 4 (two Compare nodes)
                pass
            if m == "texts" or m in {"speech"}:    # none of the four
                pass
            x = {"text": 1}[m]                 # a dict: not seen
            match m:
                case "causal_lm" | "other":    # 5 (match case)
                    pass
                case "other":
                    pass
            return [y for y in m if y not in ["image"]]  # 6
    ''')
    assert arch.modality_comparisons_in_source(source) == [4, 6, 8, 8, 14, 18]
    assert len(arch.modality_comparisons_in_source(source, strings=arch.MODALITIES | {"speech"})) == 7


def test_modality_comparisons_exclude_models_and_targets(tmp_path):
    _write(tmp_path, {
        "pyproject.toml": ('[tool.setuptools.package-dir]\n"compressor" = "compressor"\n'
                           '"compressor.models" = "models"\n'),
        "compressor/__init__.py": "",
        "compressor/build.py": "def f(m):\n    return m == 'text' or m in ['image']\n",
        "compressor/targets/__init__.py": "def f(m):\n    return m == 'audio'\n",
        "models/__init__.py": "",
        "models/base.py": "def f(m):\n    return m == 'causal_lm'\n",
    })
    counted = arch.modality_comparisons(tmp_path)
    assert counted["count"] == 2 and counted["files"] == 1
    assert counted["per_file"] == {"compressor/build.py": {"count": 2, "lines": [2, 2]}}
    assert counted["count_excluded"] == 2
    assert set(counted["per_file_excluded"]) == {"compressor/targets/__init__.py", "models/base.py"}


def test_sizes(tmp_path):
    _write(tmp_path, {"README.md": "x" * 1234, "compressor/__init__.py": "a\nb\n", "compressor/big.py": "1\n" * 50})
    s = arch.sizes(tmp_path)
    assert s["readme_bytes"] == 1234 and s["total_lines"] == 52
    assert s["largest_modules"][0] == {"file": "compressor/big.py", "lines": 50}


def test_returns_to_a_left_file():
    s = arch.summarise_sequence(["a", "b", "a", "c", "b", "b", "d"])
    assert s["files_entered"] == 4 and s["returns_to_a_left_file"] == 2
    assert s["reentries_per_file"] == {"a": 1, "b": 1}


def test_the_tracer_follows_function_entries(tmp_path):
    _write(tmp_path, {
        "tracedpkg/__init__.py": "",
        "tracedpkg/one.py": """
            from tracedpkg import two
            def run():
                two.helper()
                for _ in two.numbers():   # a generator: entered once, resumed three times
                    pass
                local()
                two.helper()
            def local():
                import tracedpkg.three    # its module body runs during the trace: not part of the sequence
                return tracedpkg.three.f()
        """,
        "tracedpkg/two.py": "def helper():\n    return 1\ndef numbers():\n    yield 1\n    yield 2\n",
        "tracedpkg/three.py": "from tracedpkg import two\nX = two.helper()\ndef f():\n    return 3\n",
    })
    sys.path.insert(0, str(tmp_path))
    try:
        from tracedpkg import one

        tracer = arch.FileTracer([tmp_path / "tracedpkg"], tmp_path)
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            one.run()
        finally:
            sys.settrace(previous)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "tracedpkg" or m.startswith("tracedpkg.")]:
            del sys.modules[name]
    # entries only: back in one.py after three.f() returns is not an entry, so the last change is three -> two
    assert tracer.sequence == ["tracedpkg/one.py", "tracedpkg/two.py", "tracedpkg/one.py", "tracedpkg/three.py",
                               "tracedpkg/two.py"]
    report = tracer.report()
    assert report["files_entered"] == 3 and report["returns_to_a_left_file"] == 2
    assert report["generator_resumes"] == 2
    assert report["first_calls"]["sequence"] == ["tracedpkg/one.py", "tracedpkg/two.py", "tracedpkg/one.py",
                                                 "tracedpkg/three.py"]  # the second helper() is not a first call
    assert report["first_calls"]["returns_to_a_left_file"] == 1
    assert report["files_imported_during_run"] == ["tracedpkg/three.py"]


def test_the_real_tree_is_measured():
    result = arch.static_metrics(REPO)
    modules = arch.discover_modules(REPO)
    assert {"compressor", "compressor.passes", "compressor.models", "compressor.runtime"} <= set(modules)
    assert result["size"]["total_lines"] > 0 and result["import_graph"]["edges"] > 0


def test_the_real_tree_meets_issue_21_targets():
    """No import cycles; stages ask the target, not the modality string; the README stays a front door."""
    result = arch.static_metrics(REPO)
    cycles = [" <-> ".join(c["modules"]) for c in result["import_graph"]["cycle_list"]]
    assert cycles == []
    assert result["modality_comparisons"]["count"] <= 5, result["modality_comparisons"]["per_file"]
    assert result["size"]["readme_bytes"] <= 20_000

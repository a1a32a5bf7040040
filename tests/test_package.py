"""The package as a newcomer meets it: the error family, and importing an unbuilt checkout."""
import importlib
import importlib.machinery
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import geotarget as gt
from geotarget import errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(gt.__file__).resolve().parent


def _error_family():
    return {name: obj for name, obj in vars(errors).items()
            if inspect.isclass(obj) and issubclass(obj, errors.GeotargetError)}


def _design_errors_section():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    match = re.search(r"^## Errors\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "docs/design.md has no '## Errors' section"
    return match.group(1)


def test_error_family_is_not_empty():
    assert {"GeotargetError", "InvalidInputError", "CorruptFileError"} <= set(_error_family())


@pytest.mark.parametrize("name", sorted(_error_family()))
def test_error_is_exported_and_documented(name):
    cls = _error_family()[name]
    assert getattr(gt, name, None) is cls, f"geotarget.{name} is not exported"
    assert name in gt.__all__
    assert (cls.__dict__.get("__doc__") or "").strip(), f"{name} has no docstring of its own"
    assert f"`{name}`" in _design_errors_section(), f"{name} is not listed in docs/design.md, Errors"


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_geotarget_error_lives_in_errors_module():
    """An error class defined elsewhere would escape the export and documentation checks above."""
    for info in pkgutil.iter_modules(gt.__path__):
        try:
            importlib.import_module(f"geotarget.{info.name}")
        except ImportError:
            if info.name not in ("cluster", "metrics"):  # optional dependencies: Ray, prometheus-client
                raise
    strays = [f"{c.__module__}.{c.__qualname__}" for c in _subclasses(errors.GeotargetError)
              if c.__module__ != "geotarget.errors" and c.__module__.startswith("geotarget")]
    assert strays == []


def _source_copy(tmp_path):
    """The package's sources, without any compiled module, in a fresh directory."""
    dst = tmp_path / "checkout"
    shutil.copytree(PACKAGE, dst / "geotarget",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.cpp"))
    shutil.copy(ROOT / "setup.py", dst / "setup.py")
    return dst


def _import_in(cwd):
    return subprocess.run([sys.executable, "-c", "import geotarget"], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})


def test_unbuilt_checkout_says_what_happened_and_what_to_do(tmp_path):
    checkout = _source_copy(tmp_path)
    proc = _import_in(checkout)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()
    message = proc.stderr[proc.stderr.index("ImportError:"):]
    assert "circular import" not in proc.stderr, last[-1]
    assert "compiled kernels are missing" in message
    assert "_kernels" in message and "_store_kernels" in message
    assert str(checkout) in message
    assert "build_ext --inplace" in message and "pip install ." in message


def test_unloadable_kernel_names_the_module_and_the_cause(tmp_path):
    """A compiled file that exists but cannot load (another Python, a damaged build)."""
    checkout = _source_copy(tmp_path)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in ("_kernels", "_array_kernels", "_refresh_kernels", "_store_kernels"):
        (checkout / "geotarget" / (name + suffix)).write_bytes(b"not an ELF file")
    proc = _import_in(checkout)
    assert proc.returncode != 0
    message = proc.stderr[proc.stderr.index("ImportError:"):]
    assert "circular import" not in message
    assert "geotarget._kernels exists" in message and "cannot be loaded" in message
    assert "build_ext --inplace" in message


def test_ci_runs_the_readme_commands():
    """The README's test command is what CI runs, so the README cannot promise an untested path."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert commands[1] in ci
    install = commands[0].split("&&")[0].strip()
    assert install in ci


def _imports(path):
    """The geotarget modules ``path`` imports (absolute names), lazy imports included."""
    import ast
    import pathlib

    pkg = pathlib.Path(gt.__file__).parent
    package = ["geotarget", *path.relative_to(pkg).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if node.module is None or mod.split(".")[-1] in ("", "geotarget"):
                out |= {f"{mod}.{a.name}" for a in node.names}
            else:
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("geotarget")}


def test_only_the_spatial_layer_calls_compiled_code_and_layers_point_down():
    """Compiled code is reached through the store, the index and the audience (geotarget/spatial),
    and the layers import downwards only: spatial knows nothing of alerts or the command line,
    alerts nothing of the command line."""
    import pathlib

    pkg = pathlib.Path(gt.__file__).parent
    callers, upward = set(), []
    for path in pkg.rglob("*.py"):
        mods = _imports(path)
        layer = path.relative_to(pkg).parts[0] if len(path.relative_to(pkg).parts) > 1 else ""
        if any(m.rsplit(".", 1)[-1].endswith("_kernels") for m in mods):
            callers.add(path.relative_to(pkg).as_posix())
        above = {"spatial": ("geotarget.alerts", "geotarget.cli"), "alerts": ("geotarget.cli",),
                 "": ("geotarget.spatial", "geotarget.alerts", "geotarget.cli")}.get(layer, ())
        if layer == "" and path.name in ("__init__.py", "__main__.py"):
            above = ()
        upward += [f"{path.relative_to(pkg)} imports {m}" for m in mods if m.startswith(above)] if above else []
    assert {c.split("/")[0] for c in callers} == {"spatial"}, callers
    assert {"spatial/index.py", "spatial/audience.py", "spatial/store.py"} <= callers
    assert upward == []


def test_both_indexes_answer_the_engines_index_interface():
    """The engine takes any geotarget.alerts.model.Index; SpatialIndex and ShardedIndex both are one, alike."""
    import inspect

    import numpy as np

    from geotarget.spatial.cluster import ShardedIndex
    from geotarget.alerts.model import Index

    methods = [n for n, v in vars(Index).items() if callable(v) and not n.startswith("_")]
    assert sorted(methods) == ["changed_within", "count", "within", "within_polygon"]
    for cls in (gt.SpatialIndex, ShardedIndex):
        for name in methods:
            want = list(inspect.signature(getattr(Index, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)
    store = gt.DeviceStore.from_arrays(np.arange(1, 11, dtype=np.uint64), np.zeros(10), np.zeros(10))
    assert isinstance(gt.SpatialIndex.build(store), Index)
    assert not isinstance(store, Index)


def test_no_module_imports_private_names_from_the_store():
    """File helpers and batch checks live in their own modules (geotarget/_fs.py,
    _store_checks.py, _store_files.py): nothing reaches into store.py's private names."""
    import ast
    offenders = []
    files = [p for d in ("geotarget", "benchmarks", "examples", "tests") for p in (ROOT / d).rglob("*.py")]
    assert any(p.name == "index.py" for p in files) and any(p.name == "cluster.py" for p in files)
    for path in files:
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "store":
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
        offenders += [f"{path.name}: {m}" for m in re.findall(r"\b(?:gt|geotarget)\.store\._\w+", text)]
    assert offenders == []


def test_every_module_imports():
    """Every module of every layer loads (a lazy import's target included: each is imported here)."""
    import importlib
    import pathlib

    pkg = pathlib.Path(gt.__file__).parent
    names = sorted({".".join(["geotarget", *p.relative_to(pkg).with_suffix("").parts][:-1 if p.stem == "__init__"
                                                                                     else None])
                    for p in pkg.rglob("*.py") if p.name != "__main__.py"})
    optional = {"geotarget.alerts.metrics": "prometheus_client", "geotarget.spatial.cluster": "ray"}
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if name in optional and optional[name] in str(exc):
                continue
            raise
    for path in pkg.rglob("*.py"):
        for mod in _imports(path):
            if mod.split(".")[-1] in ("spatial", "alerts", "cli") or mod in names:
                continue
            head, _, attr = mod.rpartition(".")
            if head in names and hasattr(importlib.import_module(head), attr):   # from a package import a module
                continue
            raise AssertionError(f"{path.relative_to(pkg)} imports {mod}, which does not exist")


def test_the_modules_old_names_are_the_same_modules():
    """Code written before the layers (``import geotarget.store``, ``from geotarget import log``,
    ``gt.signing``) gets the very modules that now live in a layer."""
    import importlib

    from geotarget import _moved

    for old, home in _moved.MOVED.items():
        if old in ("cluster", "metrics"):      # optional extras (ray, prometheus-client)
            continue
        assert importlib.import_module(f"geotarget.{old}") is importlib.import_module(home), old
        assert getattr(gt, old) is importlib.import_module(home)
    from geotarget import log
    assert log.RecipientLog is gt.RecipientLog
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gt.nothing
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("geotarget.nothing")


def test_on_disk_format_names_are_not_module_paths():
    """Files written before the modules moved into layers must still open: the names inside the
    files (format markers, MAC domains) are the formats' own, whatever module writes them."""
    import hashlib
    import hmac

    import ast
    import pathlib

    from geotarget.alerts import log
    from geotarget.spatial import _store_files, index

    assert index._INDEX_FORMAT == "geotarget.index"
    assert _store_files.MANIFEST_FORMAT == "geotarget.store" and _store_files.META_KEY == b"geotarget.store"
    cluster = pathlib.Path(gt.__file__).parent / "spatial" / "cluster.py"     # (Ray is an optional extra)
    formats = [n.value.value for n in ast.walk(ast.parse(cluster.read_text(encoding="utf-8")))
               if isinstance(n, ast.Assign) and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["FORMAT"]]
    assert formats == ["geotarget.sharded"]
    key = bytes(range(32))
    assert log._key_id(key) == hmac.new(key, b"geotarget.log-key-id", hashlib.sha256).hexdigest()[:16]

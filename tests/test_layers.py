"""The library's layers: no module imports a module of a higher layer (README.md, "Layout")."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "RWKV-v7" / "rwkvlm"

# lowest first; a layer may import its own and any lower layer's modules
LAYERS = [
    {"errors", "atomic", "recipe"},
    {"data", "ops"},
    {"model"},
    {"rundir"},
    {"train", "infer"},
    {"hf"},
]


def _layer_of(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"rwkvlm.{top} is in no layer: add it to LAYERS (and to README.md's Layout)")


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rwkvlm."):
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rwkvlm."):
                    yield node.lineno, a.name


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = _layer_of(rel.parts[0].removesuffix(".py")) if rel.parts[0] != "__init__.py" else len(LAYERS)
        for line, module in _imports(path):
            top = module.split(".")[1]
            if top == "train" and rel.parts[0] == "infer" or top == "infer" and rel.parts[0] == "train":
                bad.append(f"{rel}:{line} imports {module} (train and infer are siblings)")
            elif _layer_of(top) > own:
                bad.append(f"{rel}:{line} imports {module}")
    assert bad == []


def test_every_package_is_in_a_layer():
    for p in SRC.iterdir():
        if p.name.startswith(("_", ".")) or p.suffix not in ("", ".py") or not (p.is_dir() or p.suffix == ".py"):
            continue
        if p.is_dir() and not (p / "__init__.py").exists():
            continue
        _layer_of(p.name.removesuffix(".py"))

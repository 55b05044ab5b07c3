#!/usr/bin/env python3
"""The layers of `bundler`, checked (make lint; tests/unit/test_layers.py):

  contract  bundler/contract/: standard library only, nothing else of ours (bootstrap.py and
            NAME.unpack.py embed it verbatim)
  core      the planner, model and hardware facts, versions, errors, manifest: import contract
  box       bundler/box/ and what keeps running on the box (supervise, guard, egress, the engines'
  runtime   launch sides, tabby_run, vllm_auth): import core and contract, never the bundle side
  bundle    the online side: cli, bundle, spec, lock, sources/, signing, cache, toolchains, boxlock,
            each engine's build.py

and, one place per fact, no engine's name (as its package defines it) appears as a string outside
bundler/engines/: code elsewhere asks an engine's capabilities (engines/base.py), never its name.

Every import counts, also one inside a function (149 of them sit there: deferring an import hides
it from the interpreter, not from this check). Exit 1 naming each import that breaks a rule and
the chain that reaches it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "bundler"
# every engine package is box side (its launch, its planner), but for its build modules: bundle side
BOX_ROOTS = ("bundler.box", "bundler.supervise", "bundler.guard", "bundler.egress", "bundler.cluster_node",
             "bundler.engines")
BUNDLE_SIDE = ("bundler.bundle", "bundler.cli", "bundler.spec", "bundler.lock", "bundler.sources", "bundler.signing",
               "bundler.cache", "bundler.toolchains", "bundler.boxlock", "bundler.sbom")
BUILD_MODULES = ("build", "ext_build")  # engines/NAME/build.py and what it uses: the bundle side of an engine


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in (root / PKG).rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(name: str, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(module of ours, line) for every import in module `name`, at any depth."""
    p = mods[name]
    pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for n in ast.walk(ast.parse(p.read_text(), str(p))):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            for c in [mod, *(f"{mod}.{a.name}" for a in n.names)]:
                if c in mods:
                    found.append((c, n.lineno))
        elif isinstance(n, ast.Import):
            found += [(a.name, n.lineno) for a in n.names if a.name in mods]
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _bundle_side(name: str) -> bool:
    return _under(name, BUNDLE_SIDE) or (name.startswith("bundler.engines.")
                                         and name.rsplit(".", 1)[1] in BUILD_MODULES)


def problems(root: Path = ROOT) -> list[str]:
    mods = modules(root)
    out = []
    for name in sorted(mods):
        if _under(name, ("bundler.contract",)):
            for dep, line in imports(name, mods):
                if not _under(dep, ("bundler.contract",)):
                    out.append(f"{mods[name].relative_to(root)}:{line}: the contract imports {dep} (standard library "
                               "and bundler.contract only: bootstrap.py embeds it)")
    # everything the box side reaches, with the first chain that reaches it
    via: dict[str, tuple[str, int]] = {}
    todo = [m for m in mods if _under(m, BOX_ROOTS) and not _bundle_side(m)]
    seen = set(todo)
    while todo:
        m = todo.pop()
        for dep, line in imports(m, mods):
            if dep not in seen:
                seen.add(dep)
                via[dep] = (m, line)
                if not _bundle_side(dep):  # the crossing is what is named, not what lies beyond it
                    todo.append(dep)
    for dep in sorted(seen):
        if _bundle_side(dep):
            chain, cur = [], dep
            while cur in via:
                parent, line = via[cur]
                chain.append(f"{mods[parent].relative_to(root)}:{line}")
                cur = parent
            out.append(f"{chain[0]}: the box side imports {dep}, a bundle-side module (via "
                       f"{' <- '.join(chain)}); move what the box needs into core or contract")
    return out


def engine_names(root: Path = ROOT) -> set[str]:
    """Each engine's name as its package spells it: NAME = "...", or the first argument of Engine(...)/Gen(...)."""
    names = set()
    for p in (root / PKG / "engines").glob("*/__init__.py"):
        for n in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NAME" for t in n.targets):
                if isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
                    names.add(n.value.value)
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("Engine", "Gen")
                  and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)):
                names.add(n.args[0].value)
    return names


def engine_name_uses(root: Path = ROOT) -> list[str]:
    """Every string equal to an engine's name in the code outside bundler/engines/."""
    names = engine_names(root)
    out = []
    for name, p in sorted(modules(root).items()):
        if _under(name, ("bundler.engines",)):
            continue
        for n in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names:
                out.append(f"{p.relative_to(root)}:{n.lineno}: the engine name {n.value!r} outside bundler/engines/: "
                           "ask the engine (bundler/engines/base.py) for what it can do instead")
    return out


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    found = problems(root) + engine_name_uses(root)
    for p in found:
        print(p, file=sys.stderr)
    if found:
        print(f"layers: {len(found)} place(s) break the rules in tools/check_layers.py", file=sys.stderr)
        return 1
    print("layers: contract <- core <- box/runtime, apart from the bundle side; no engine named outside "
          "bundler/engines/: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

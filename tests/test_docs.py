"""The documents say what the code does. Every command in the README, METHOD.md, docs/,
report/*.md and the notebooks names a script or module that exists, with flags (and values)
its own parser accepts; every repository path they name exists; every function of the README's
equation map exists and is reached from the script the map names."""
import ast
import importlib
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

import plumbing

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted({ROOT / "README.md", ROOT / "METHOD.md", *ROOT.glob("docs/*.md"), *ROOT.glob("report/*.md"),
               *ROOT.glob("report/*/*.md"), *ROOT.glob("notebooks/*.ipynb")})
OUTSIDE = ("runs/", "models/", "my_domain", "../", "/", "http", "scd-assignment", "$", "whisper/")  # outputs, elsewhere


def text_of(path):
    """A document's text; a notebook's cells, markdown and code."""
    if path.suffix == ".ipynb":
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
    return path.read_text(encoding="utf-8")


def commands(text):
    """Every `python X.py ...` or `python -m pkg.mod ...` in a text, a line continued by a
    backslash joined, cut at a closing backtick, a table cell, a comment or a closing bracket."""
    parts = re.split(r"^\s*```.*$", text, flags=re.M)  # outside, fenced, outside, ...
    text = "\n".join(p if i % 2 else re.sub(r"`[^`]+`", lambda m: m.group(0).replace("\n", " "), p)  # inline code
                     for i, p in enumerate(parts))                                                # across a line break
    text = re.sub(r"\\\n\s*", " ", text)
    for m in re.finditer(r"\bpython3? +(-m +[\w.]+|[\w./-]+\.py)([^\n`|#)\"]*)", text):
        target = m.group(1)
        if target.startswith("-m"):
            name = target.split()[-1]
            if name.split(".")[0] in ("pytest", "pip", "jupyter", "torch"):
                continue
            yield name.replace(".", "/") + ".py", m.group(2)
        else:
            yield target, m.group(2)


def parse(script, args):
    """The script's own parser on these arguments: None if it accepts them, else its message."""
    source = (ROOT / script).read_text()
    if script == "reproduce.py":  # the root file only starts lab/reproduce.py
        script, source = "lab/reproduce.py", (ROOT / "lab/reproduce.py").read_text()
    found = re.search(r"parse_config\((\w+)", source)
    module = importlib.import_module(script[:-3].replace("/", "."))
    argv = [a for a in shlex.split(args) if a not in ("&&",)]
    if found:
        cls = getattr(module, found.group(1))
        old = sys.argv
        sys.argv = [script] + argv
        try:
            plumbing.parse_config(cls, "")
        except SystemExit:
            return f"{script}: its parser refuses {' '.join(argv)!r}"
        finally:
            sys.argv = old
        return None
    flags = set(re.findall(r'add_argument\("(--[\w-]+)"', source))
    bad = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
    return f"{script}: no flag {', '.join(bad)}" if bad else None


def test_every_command_names_a_script_that_exists_with_flags_it_accepts(capsys):
    problems, seen = [], 0
    for doc in DOCS:
        for script, args in commands(text_of(doc)):
            seen += 1
            if not (ROOT / script).is_file():
                problems.append(f"{doc.relative_to(ROOT)}: `python {script}`: no such file")
                continue
            if any(p in args for p in ("...", "<", "N ", "NAME")) or "--help" in args:
                continue  # a pattern, not a command
            why = parse(script, args.strip())
            if why:
                problems.append(f"{doc.relative_to(ROOT)}: {why}")
    capsys.readouterr()
    assert seen > 40, f"only {seen} commands found: the scan is broken"
    assert not problems, "\n".join(problems)


def paths(text):
    """Repository paths a text names: in backticks or as a link target, with a folder in them."""
    for m in re.finditer(r"`([\w./-]+)`|\]\(([\w./-]+)\)", text):
        p = (m.group(1) or m.group(2)).rstrip(".")
        if "/" in p and not p.startswith(OUTSIDE) and "." in p.split("/")[-1] + "." and not re.match(r"^\d", p):
            yield p


def test_every_repository_path_in_the_documents_exists():
    problems = []
    for doc in DOCS:
        for p in paths(text_of(doc)):
            if not ((ROOT / p).exists() or (doc.parent / p).exists() or (ROOT / p.split(":")[0]).exists()):
                problems.append(f"{doc.relative_to(ROOT)}: {p}")
    assert not problems, "paths named but missing:\n" + "\n".join(problems)


def calls(module_name):
    """{function name: the names it calls} for every function of a module (methods by their own name)."""
    tree = ast.parse((ROOT / (module_name.replace(".", "/") + ".py")).read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node)
                              if isinstance(n, (ast.Attribute, ast.Name))} - {node.name}
    return out


REFERENCE = ("scd", "data", "model", "scale", "plumbing", "distill", "train_teacher")


def reached(start):
    """Every function name reached from module.function `start`, through the reference's functions."""
    graph = {}
    for m in REFERENCE:
        for f, names in calls(m).items():
            graph.setdefault(f, set()).update(names)
    todo, seen = [start.split(".")[-1]], set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += [g for g in graph.get(f, ()) if g in graph]
    return seen


def test_every_function_of_the_equation_map_exists_and_the_scripts_reach_it():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Equation to code")[1].split("\n\n")[1]
    rows = [r for r in table.splitlines() if r.startswith("| §")]
    assert len(rows) >= 10
    run = reached("distill.main") | reached("train_teacher.train")
    problems = []
    for row in rows:
        code = row.split("|")[2]
        for mod, name in re.findall(r"`((?:lab\.)?\w+)\.(\w+)`", code):
            if mod.split(".")[0] not in REFERENCE + ("lab",):
                continue
            if mod == "lab" and importlib.util.find_spec(f"lab.{name}") is not None:
                continue  # a lab module named whole
            if not hasattr(importlib.import_module(mod), name):
                problems.append(f"{mod}.{name}: no such function")
            elif mod in REFERENCE and name not in run:
                problems.append(f"{mod}.{name}: neither distill.main nor train_teacher.train reaches it")
        for caller in re.findall(r"called by `(\w+\.\w+)`", code):
            named = re.findall(r"`scd\.(\w+)`", code.split("called by")[0])
            problems += [f"scd.{f}: not reached from {caller}" for f in named if f not in reached(caller)]
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """A report naming `python parity.py` (as report/parity.md once did), a flag no parser has, a
    module path written as a file (as the README once wrote `lab/domains.corpus`), a function
    the scripts never reach."""
    (script, _), = commands("# Sparse parity: `python parity.py` (parity:20:2, 3 seeds)\n")
    assert script == "parity.py" and not (ROOT / script).is_file()
    assert parse(*next(commands("python distill.py --methd scd"))) is not None
    assert parse(*next(commands("python distill.py --method kd --stages 0"))) is not None  # below its lowest value
    assert parse(*next(commands("python distill.py --method scd --aw true"))) is None
    assert list(paths("the corpus (`lab/domains.corpus`)")) == ["lab/domains.corpus"] and not (ROOT / "lab/domains.corpus").exists()
    assert "probe_pieces" in reached("distill.choose") and "scd_checkpoint" in reached("distill.main")
    assert "fixed_checkpoint" not in reached("scd.scd_checkpoint") and "plan_phases" not in reached("scd.distill_loss")

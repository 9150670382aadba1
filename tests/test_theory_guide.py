"""docs/theory.md names real code and real tests: every `hvae_diffusion.…` path imports, every
`tests/….py::test_…` is a test function of that file, every figure it points to is committed, and every numbered
section names at least one implementation and one test."""

import ast
import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "theory.md")
CODE_REFERENCE = re.compile(r"`(hvae_diffusion(?:\.\w+)*)`")
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FIGURE_REFERENCE = re.compile(r"`(docs/figures/[\w*.-]+\.png)`")


def guide_text():
    with open(GUIDE, encoding="utf-8") as handle:
        return handle.read()


def resolve(dotted: str):
    """The object at ``dotted``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def named_test_functions(path: str) -> set[str]:
    """Names of the test functions in a test file (module level, or methods of ``Test…`` classes)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
    return {name for name in names if name.startswith("test")}


def test_every_code_path_exists():
    references = sorted(set(CODE_REFERENCE.findall(guide_text())))
    assert len(references) > 40
    missing = []
    for dotted in references:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            missing.append(f"{dotted}: {error}")
    assert not missing, "docs/theory.md names code that does not exist:\n" + "\n".join(missing)


def test_every_named_test_exists():
    references = sorted(set(TEST_REFERENCE.findall(guide_text())))
    assert len(references) > 30
    missing = []
    for path, name in references:
        if not os.path.isfile(os.path.join(ROOT, path)):
            missing.append(f"{path} (no such file)")
        elif name not in named_test_functions(path):
            missing.append(f"{path}::{name}")
    assert not missing, "docs/theory.md names tests that do not exist:\n" + "\n".join(missing)


def test_every_named_figure_is_committed():
    references = sorted(set(FIGURE_REFERENCE.findall(guide_text())))
    assert references
    missing = [pattern for pattern in references if not glob.glob(os.path.join(ROOT, pattern))]
    assert not missing, f"docs/theory.md points to figures that are not in docs/figures: {missing}"


def sections():
    """(title, body) of each numbered section ``## N. …`` of the guide."""
    parts = re.split(r"^## ", guide_text(), flags=re.MULTILINE)[1:]
    return [(part.splitlines()[0], part) for part in parts if re.match(r"\d+\.", part)]


def test_the_guide_covers_every_equation_of_the_derivation():
    titles = " ".join(title for title, _ in sections()).lower()
    for topic in (
        "forward step",
        "q(x_t | x_0)",
        "posterior",
        "elbo",
        "objectives",
        "tweedie",
        "classifier guidance",
        "classifier-free guidance",
    ):
        assert topic in titles, f"no section on {topic!r} in docs/theory.md"


SECTIONS = sections()


@pytest.mark.parametrize("title, body", SECTIONS, ids=[title.split(":")[0][:40] for title, _ in SECTIONS])
def test_each_section_has_words_math_code_and_a_test(title, body):
    assert "**In words.**" in body and "**Math.**" in body, title
    assert body.index("**In words.**") < body.index("**Math.**"), f"{title}: plain language comes first"
    assert CODE_REFERENCE.search(body), f"{title}: names no implementation"
    assert TEST_REFERENCE.search(body), f"{title}: names no test"


def test_resolve_rejects_missing_names():
    """The checker itself can fail."""
    with pytest.raises(AttributeError):
        resolve("hvae_diffusion.forward_process.no_such_function")
    with pytest.raises(ModuleNotFoundError):
        resolve("hvae_diffusion_missing.module")
    assert "test_every_code_path_exists" in named_test_functions("tests/test_theory_guide.py")

"""The README and docs/ cannot rot: every ```python block runs, and every
relative link (file and #anchor) resolves.

A block that needs what the suite does not have (a TPU, a GPU, a network, a
large dataset, another backend) is preceded by the line
`<!-- docs-test: skip (reason) -->` and reported as skipped with that reason.
The blocks of one page run in order in one namespace, as a reader would run
them, with the working directory in a temporary folder.
"""

import contextlib
import glob
import io
import os
import re

import pytest

from conftest import BACKEND

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "tpu_scripts", "README.md")]
    + glob.glob(os.path.join(ROOT, "results", "*", "README.md"))
    + glob.glob(os.path.join(ROOT, "docs", "*.md"))
)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative(page):
    return os.path.relpath(page, ROOT)


def code_blocks(page):
    """`(line, language, code, skip_reason)` of each fenced block."""
    lines = open(page, encoding="utf-8").read().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            language, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            previous = lines[start - 2] if start >= 2 else ""
            reason = SKIP.search(previous)
            blocks.append((start, language, "\n".join(body),
                           reason.group(1) if reason else None))
        i += 1
    return blocks


def python_pages():
    return [page for page in PAGES
            if any(lang == "python" for _, lang, _, _ in code_blocks(page))]


@pytest.mark.skipif(BACKEND != "tensorflow",
                    reason="the blocks use tf.distribute and TensorBoard")
@pytest.mark.parametrize("page", python_pages(), ids=relative)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    import keras

    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()
    namespace = {"__name__": "__docs__"}
    skipped = []
    for line, language, code, reason in code_blocks(page):
        if language != "python":
            continue
        if reason:
            skipped.append(f"line {line}: {reason}")
            continue
        output = io.StringIO()
        try:
            with contextlib.redirect_stdout(output):
                exec(compile(code, f"{relative(page)}:{line}", "exec"),
                     namespace)
        except Exception as error:
            raise AssertionError(
                f"{relative(page)}, the python block at line {line} failed: "
                f"{type(error).__name__}: {error}"
            ) from error
    if skipped:
        print(f"{relative(page)}: skipped " + "; ".join(skipped))


def test_skip_markers_name_a_reason_and_precede_a_block():
    for page in PAGES:
        text = open(page, encoding="utf-8").read().split("\n")
        for number, line in enumerate(text):
            if "docs-test" not in line:
                continue
            assert SKIP.search(line), f"{relative(page)}:{number + 1}: {line}"
            assert number + 1 < len(text) and text[number + 1].startswith(
                "```python"), f"{relative(page)}:{number + 1}: no block follows"


def slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    found, fence = set(), False
    for line in open(page, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def links(page):
    text = open(page, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # not inside code
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=relative)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) \
            if path else page
        if not os.path.exists(resolved):
            broken.append(f"{target} (no file {os.path.relpath(resolved, ROOT)})")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{relative(page)}: " + ", ".join(broken)


def test_link_checker_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad](#nowhere)\n")
    with pytest.raises(AssertionError, match=r"missing\.md.*#nowhere"):
        test_relative_links_resolve(str(page))


def test_readme_is_a_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250

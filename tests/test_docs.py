"""The documentation: the site builds in strict mode, every code snippet of the README and the docs runs,
and both checks fail when a link, an anchor, an API reference or a snippet breaks.

How snippets run (also written in docs/contributing.md, "Documentation"):
- ``python`` blocks are executed, the blocks of a page in order in one namespace;
- ``bash`` blocks run line by line with bash in a temporary folder linking the repository's configs/,
  examples/, benchmarks/, src/, Makefile and pyproject.toml, long commands cut (:func:`cut`);
- ``text`` and ``yaml`` blocks are not code; every other fence needs a language;
- a block preceded by ``<!-- not-run: REASON -->`` is not run: REASON says why (:data:`NOT_RUN`), and the
  paragraph before it says so in words.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("docs/compare/",)  # the comparison report, written by `drpo compare` (its fences are plain text)
LANGUAGES = {"python", "bash", "text", "yaml"}
# why a block may not run here -> the word the paragraph before it must contain
NOT_RUN = {"needs a GPU": "GPU", "needs a cluster": "cluster", "installs packages": "install",
           "needs your own": "your own", "takes minutes": "minutes"}
LINKED = ("configs", "examples", "benchmarks", "src", "Makefile", "pyproject.toml", ".venv-vllm")
VLLM_BIN = ".venv-vllm/bin/"


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


def rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    not_run: Optional[str]  # the reason, when marked
    before: str             # the paragraph before the block (or before its marker)


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, with their not-run marker and the paragraph before."""
    out = []
    for m in FENCE.finditer(text):
        head = text[:m.start()].rstrip("\n").split("\n")
        marker = re.fullmatch(r"<!--\s*not-run:\s*(.*?)\s*-->", head[-1].strip()) if head else None
        if marker:
            head = head[:-1]
        para = "\n".join(head).rstrip().split("\n\n")[-1]
        out.append(Block(page, text[:m.start()].count("\n") + 1, m.group(1).strip().split(" ")[0],
                         m.group(2), marker.group(1) if marker else None, para))
    return out


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for p in pages(root) for b in blocks(p.read_text(encoding="utf-8"), rel(p, root))]


# ------------------------------------------------------------------ the snippets' form (fast)

def test_every_fence_has_a_language_and_every_not_run_says_why():
    found = all_blocks()
    assert sum(b.lang == "python" for b in found) >= 5 and sum(b.lang == "bash" for b in found) >= 10
    for b in found:
        where = f"{b.page}:{b.line}"
        if b.page.startswith(GENERATED):
            continue
        assert b.lang in LANGUAGES, f"{where}: a fence needs a language among {sorted(LANGUAGES)}, got {b.lang!r}"
        if b.not_run is not None:
            reason = next((r for r in NOT_RUN if b.not_run.startswith(r)), None)
            assert reason, f"{where}: not-run reason {b.not_run!r} must start with one of {list(NOT_RUN)}"
            assert NOT_RUN[reason].lower() in b.before.lower(), \
                f"{where}: the paragraph before a block marked {b.not_run!r} must say so ({NOT_RUN[reason]!r})"


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"[`*]", "", heading), "-")


def test_readme_links_resolve():
    """The README is not part of the site: its relative links (files, and anchors of the docs' pages) are
    checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {link}: {path} does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README.md links to {link}: no such heading in {path}"


# ------------------------------------------------------------------ python snippets (fast: no process)

def run_python(page_blocks: list[Block]) -> None:
    """Execute a page's python blocks in order, in one namespace; objectives they register are removed after."""
    from drpo.objectives import registry

    saved = set(registry.OBJECTIVES)
    scope: dict = {"__name__": "__docs__"}
    try:
        for b in page_blocks:
            exec(compile(b.code, f"{b.page}:{b.line}", "exec"), scope)
    finally:
        for name in set(registry.OBJECTIVES) - saved:
            registry.OBJECTIVES.pop(name)
        scope.clear()  # its functions refer back to it: free the snippets' tensors now, not at some later gc


# pages whose python snippets start a process (drpo.verify's worker): slow, like every test that does
PY_SLOW = {"docs/training.md"}
PY_PAGES = [pytest.param(p, marks=pytest.mark.slow) if p in PY_SLOW else p
            for p in sorted({b.page for b in all_blocks() if b.lang == "python" and b.not_run is None})]


@pytest.mark.parametrize("page", PY_PAGES)
def test_python_snippets_run(page):
    run_python([b for b in all_blocks() if b.page == page and b.lang == "python" and b.not_run is None])


# ------------------------------------------------------------------ shell snippets (slow: they run drpo)

def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped; a heredoc stays with its command."""
    lines, out, heredoc = code.replace("\\\n", " ").splitlines(), [], None
    for line in lines:
        if heredoc is not None:
            out[-1] += "\n" + line
            if line.strip() == heredoc:
                heredoc = None
            continue
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line)
        m = re.search(r"<<-?\s*'?(\w+)'?", line)
        if m:
            heredoc = m.group(1)
    return out


def cut(cmd: str) -> str:
    """The command as the test runs it: long runs cut to a check of the same path (see the module docstring)."""
    if "\n" in cmd:  # a heredoc writes a file: as written
        return cmd
    code = cmd.split("  #")[0].split(" # ")[0].strip()
    words = shlex.split(code)
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_]+=.*", words[i]):
        i += 1  # VAR=value prefixes
    prog = words[i].removeprefix(VLLM_BIN) if i < len(words) else ""
    sub = words[i + 1] if i + 1 < len(words) else ""
    if prog == "make":
        return code.replace("make ", "make -n ", 1)
    if prog == "drpo" and sub == "train":
        return code + " train.steps=1 eval.every=0 progress=false tensorboard=false"
    if prog == "drpo" and sub == "eval":
        return code + " --limit 2 --k 1"
    if prog == "drpo" and sub == "compare":
        return code + " --estimate 1"
    if prog == "python" and sub.endswith(".py") and "argparse" in (ROOT / sub).read_text(encoding="utf-8"):
        return code + " --help"  # a script without argparse (benchmarks/step_profile.py) runs as written
    return code


def workdir(tmp: Path, root: Path = ROOT) -> Path:
    for name in LINKED:
        if (root / name).exists():
            (tmp / name).symlink_to(root / name)
    return tmp


def run_shell(page_blocks: list[Block], tmp: Path, root: Path = ROOT) -> list[str]:
    """Run the blocks' commands (cut) in ``tmp``; fail on the first that exits non-zero. Returns the commands
    skipped because .venv-vllm is not there."""
    env = {**os.environ, "PYTHONPATH": str(root / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    skipped = []
    for b in page_blocks:
        for cmd in commands(b.code):
            if VLLM_BIN in cmd and not (root / VLLM_BIN).exists():
                skipped.append(cmd)
                continue
            ran = cut(cmd)
            res = subprocess.run(["bash", "-c", ran], cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=900, stdin=subprocess.DEVNULL)
            assert res.returncode == 0, (f"{b.page}:{b.line}: `{cmd}` (run as `{ran}`) exited {res.returncode}:\n"
                                         f"{(res.stdout + res.stderr)[-3000:]}")
    return skipped


SH_PAGES = sorted({b.page for b in all_blocks() if b.lang == "bash" and b.not_run is None})


@pytest.mark.slow
@pytest.mark.parametrize("page", SH_PAGES)
def test_shell_snippets_run(page, tmp_path):
    skipped = run_shell([b for b in all_blocks() if b.page == page and b.lang == "bash" and b.not_run is None],
                        workdir(tmp_path))
    if skipped:
        pytest.skip(f"{len(skipped)} command(s) need .venv-vllm (make setup-vllm): {skipped}")


def test_cut_commands():
    assert cut("drpo train rollout.staleness=2   # a comment") == \
        "drpo train rollout.staleness=2 train.steps=1 eval.every=0 progress=false tensorboard=false"
    assert cut(".venv-vllm/bin/drpo train rollout.engine=vllm").startswith(".venv-vllm/bin/drpo train rollout.engine=vllm train.steps=1")
    assert cut("make compare") == "make -n compare"
    assert cut("drpo compare --quick --out runs/q") == "drpo compare --quick --out runs/q --estimate 1"
    assert cut("python benchmarks/e2e_vs_trl.py --threads 2") == "python benchmarks/e2e_vs_trl.py --threads 2 --help"
    assert cut("DRY_RUN=1 bash examples/verl/run.sh") == "DRY_RUN=1 bash examples/verl/run.sh"
    assert commands("cat > f <<'EOF'\na: 1\nEOF\ndrpo x \\\n  --y\n# note\n") == ["cat > f <<'EOF'\na: 1\nEOF", "drpo x    --y"]


# ------------------------------------------------------------------ the site (slow: mkdocs runs in a process)

def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # not --quiet: it hides the warnings from the counter that makes --strict fail (mkdocs 1.6)
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    res = build(ROOT, tmp_path / "site")
    assert res.returncode == 0 and "WARNING" not in res.stderr, res.stdout + res.stderr
    api = (tmp_path / "site" / "api" / "drpo" / "index.html").read_text(encoding="utf-8")
    assert "global_token_count" in api and "rollout_correction" in api  # generated from policy_loss's signature
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "e2e_vs_trl.py" in bench  # benchmarks/README.md included, not copied


def copy_docs(dst: Path) -> Path:
    """The files the build reads, in a folder of their own (to break them there)."""
    shutil.copy(ROOT / "mkdocs.yml", dst / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", dst / "README.md")
    shutil.copytree(ROOT / "docs", dst / "docs")
    shutil.copytree(ROOT / "src", dst / "src", ignore=shutil.ignore_patterns("data", "__pycache__"))
    (dst / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "README.md", dst / "benchmarks" / "README.md")
    return dst


BREAKS = {
    "link": ("docs/performance.md", "(reliability.md#reproducible-numbers)", "(no-such-page.md)", "no-such-page.md"),
    "anchor": ("docs/performance.md", "(reliability.md#reproducible-numbers)", "(reliability.md#no-such-anchor)",
               "no-such-anchor"),
    "api reference": ("docs/api/drpo.md", "::: drpo.verify", "::: drpo.no_such_function", "no_such_function"),
    "included file": ("docs/benchmarks.md", '"benchmarks/README.md"', '"benchmarks/NO_SUCH.md"', "NO_SUCH.md"),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(BREAKS))
def test_strict_build_fails_on_a_break(what, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    copy_docs(root)
    page, old, new, named = BREAKS[what]
    text = (root / page).read_text(encoding="utf-8")
    assert old in text, f"{page} no longer holds {old!r}: choose another thing to break"
    (root / page).write_text(text.replace(old, new, 1), encoding="utf-8")
    res = build(root, tmp_path / "site")
    assert res.returncode != 0, f"breaking a {what} in {page} did not fail the strict build"
    assert named in res.stdout + res.stderr


def test_snippet_check_fails_on_a_broken_snippet(tmp_path):
    """A python snippet that no longer runs fails its test (here: a renamed argument of drpo.policy_loss)."""
    page = ROOT / "docs" / "getting-started.md"
    text = page.read_text(encoding="utf-8")
    assert "delta=12.5)" in text
    broken = [b for b in blocks(text.replace("delta=12.5)", "delta_renamed=12.5)", 1), "getting-started.md")
              if b.lang == "python"]
    run_python([b for b in blocks(text, "getting-started.md") if b.lang == "python"])  # as written: runs
    with pytest.raises(ValueError, match="delta_renamed"):
        run_python(broken)


@pytest.mark.slow
def test_shell_check_fails_on_a_broken_command(tmp_path):
    """A documented command that no longer runs fails its test (here: a configuration key that does not exist)."""
    broken = Block("x.md", 1, "bash", "drpo train train.no_such_key=1\n", None, "")
    with pytest.raises(AssertionError, match="no_such_key"):
        run_shell([broken], workdir(tmp_path))

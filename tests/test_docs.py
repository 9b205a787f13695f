"""The README and docs/ render true: rendered with markdown-it-py's CommonMark parser and its GFM
table rule (as GitHub renders them), the demo table is a table whose every cell is the value
computed from media/demo_results.json, every relative link and image exists, every #anchor is a
heading's GitHub slug in its target file, and every flag a doc names for a script is one of that
script's flags, with the default the doc states."""
import glob
import importlib
import os
import re
import shlex
import unicodedata

import pytest
from markdown_it import MarkdownIt

from aemc import prose, reports
from conftest import ROOT

MD = MarkdownIt("commonmark").enable("table")
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "media", "demo_results.json")
DOCS = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), os.path.join(ROOT, "BENCHMARKS.md")]
SCRIPTS = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "*.py"))
                 if "__main__" in open(f, encoding="utf-8").read())


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def tables(text):
    """Every table GitHub would render: (header cells, body rows), cells as their Markdown source."""
    out, current, row = [], None, None
    for token in MD.parse(text):
        if token.type == "table_open":
            current = ([], [])
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and row is not None:
            row.append(token.content)
        elif token.type == "tr_close":
            (current[0].extend(row) if not current[0] else current[1].append(row))
            row = None
        elif token.type == "table_close":
            out.append(current)
    return out


def plain(inline):
    """A heading's text as GitHub takes it for the slug: text and code, no markup."""
    return "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))


def slug(text, seen):
    """GitHub's heading anchor: lower case, punctuation other than '-' and '_' removed, spaces to
    '-', and '-1', '-2', ... for repeats."""
    base = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LNM").replace(" ", "-")
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}-{count}"


def anchors(path):
    tokens, seen = MD.parse(read(path)), {}
    return {slug(plain(tokens[i + 1]), seen) for i, t in enumerate(tokens) if t.type == "heading_open"}


def links(text):
    """Every link target and image source in rendered Markdown (HTML blocks aside)."""
    out = []
    for token in MD.parse(text):
        for child in token.children or ():
            if child.type == "link_open":
                out.append(child.attrGet("href"))
            elif child.type == "image":
                out.append(child.attrGet("src"))
    return out


def test_the_demo_table_renders_as_a_table_of_the_results_files_numbers():
    report = reports.read_walks(RESULTS)
    demo = [t for t in tables(read(README)) if tuple(t[0]) == prose.DEMO_HEADER]
    assert len(demo) == 1, "the README's demo table does not render as one table with the expected header"
    assert demo[0][1] == prose.demo_cells(report)
    gifs = [t for t in tables(read(README)) if t[0] == ["trained Bezier curve", "straight segment"]]
    assert len(gifs) == 1 and len(gifs[0][1]) == 1, "the GIF table does not render as a one-row table"


def test_the_generated_demo_block_is_exactly_what_the_results_file_gives():
    """The sentence's numbers included: the block between the markers is regenerated and compared."""
    report = reports.read_walks(RESULTS)
    text = read(README)
    assert prose.demo_section(report) in text, "run `make media` (never edit the demo block by hand)"
    numbers = prose.demo_numbers(report)
    sentence = prose.demo_sentence(report)
    assert all(value in sentence for value in numbers.values())


def test_every_study_block_is_what_its_committed_results_give():
    """docs/results.md's tables over seed pairs are regenerated from the committed results.csv
    files; and every interval the README quotes is one of those tables' cells (nothing by hand)."""
    text = read(os.path.join(ROOT, "docs", "results.md"))
    blocks = prose.study_blocks(text)
    assert len(blocks) >= 2, "docs/results.md has fewer than two generated study blocks"
    cells = set()
    for csv_path, block in blocks:
        assert block == prose.study_section(csv_path), f"regenerate {csv_path}'s block with prose.publish_study"
        cells |= set(re.findall(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", block))
    quoted = re.findall(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", read(README))
    assert quoted and set(quoted) <= cells, sorted(set(quoted) - cells)


def test_the_sentence_numbers_follow_the_walks():
    """demo_numbers from the walks' arrays by the formulas, on a made-up report."""
    from aemc.paths import PathKey
    ends = {"barrier_mean_ends": 0.0}
    walk = lambda loss, barrier: {"ts": [0, 0.5, 1], "test_loss": loss, "test_lpips": [0.1, 0.2, 0.1],
                                  "barriers": {"test_loss": {**ends, "barrier_mean_ends": barrier,
                                                             "barrier_line": barrier}}}
    report = reports.WalkReport({PathKey("segment"): walk([0.1, 0.5, 0.3], 0.3),
                                 PathKey("curve", "Bezier", 3): walk([0.1, 0.22, 0.3], 0.02)}, 1.25, "mae", {})
    assert prose.demo_numbers(report) == {"segment_peak_over_ends": "2.5", "segment_barrier": "0.300",
                                          "curve_barrier": "0.020", "barrier_ratio": "15", "length_ratio": "1.250"}
    assert prose.demo_cells(report)[0] == ["straight segment", "0.100", "0.300", "0.500 (t = 0.5)", "0.300",
                                           "0.300", "0.200"]


def test_a_stray_row_or_a_changed_number_breaks_the_demo_table_check():
    """The checks above, on a README broken the ways it once was."""
    report = reports.read_walks(RESULTS)
    text = read(README)
    header = "| " + " | ".join(prose.DEMO_HEADER) + " |"
    stray = text.replace(header, header + "\n| trained Bezier curve | straight segment | 0.1 |")  # above the delimiter
    assert not [t for t in tables(stray) if tuple(t[0]) == prose.DEMO_HEADER]
    cell = prose.demo_cells(report)[0][1]
    changed = text.replace(f"| straight segment | {cell} |", "| straight segment | 0.999 |")
    assert [t for t in tables(changed) if tuple(t[0]) == prose.DEMO_HEADER][0][1] != prose.demo_cells(report)


def test_slugs_are_githubs():
    seen = {}
    assert slug("Barriers against width (`--preset width`)", seen) == "barriers-against-width---preset-width"
    assert slug("A study on a cluster: `study.py --executor slurm`", seen) == "a-study-on-a-cluster-studypy---executor-slurm"
    assert slug("Logging to Weights & Biases", seen) == "logging-to-weights--biases"
    assert slug("Logging to Weights & Biases", seen) == "logging-to-weights--biases-1"


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_relative_link_and_anchor_leads_somewhere(doc):
    folder = os.path.dirname(doc)
    for target in links(read(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(folder, path)) if path else doc
        assert os.path.exists(path), f"{os.path.basename(doc)}: {target} does not exist"
        if anchor and path.endswith(".md"):
            assert anchor in anchors(path), f"{os.path.basename(doc)}: {target}: no such heading"


def test_a_broken_anchor_is_caught():
    assert "not-a-heading" not in anchors(README)
    assert "a-tour-one-command-per-capability" in anchors(README)


def parser(script):
    return importlib.import_module(script[:-3]).get_args_parser()


def options(script):
    return {s: a for a in parser(script)._actions for s in a.option_strings}


def commands(text):
    """The `python X.py ...` commands of a Markdown text's code blocks (continuations joined,
    comments dropped)."""
    out = []
    for token in MD.parse(text):
        if token.type == "fence" and token.info.strip() in ("bash", "sh", ""):
            for line in re.sub(r"\\\n", " ", token.content).splitlines():
                if not line.startswith(("python ", "torchrun ")):
                    continue  # a layout, a shell line
                words = shlex.split(line, comments=True)
                scripts = [i for i, w in enumerate(words) if w in SCRIPTS]
                if scripts:
                    out.append(words[scripts[0]:])
    return out


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_example_command_parses_with_its_scripts_parser(doc):
    for script, *argv in commands(read(doc)):
        try:
            parser(script).parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{os.path.basename(doc)}: `{script} {' '.join(argv)}` is refused by its parser ({e.code})")


def usage_sections():
    """docs/usage.md's sections, each with the scripts its heading names and its text."""
    text = read(os.path.join(ROOT, "docs", "usage.md"))
    for part in re.split(r"\n(?=## )", text)[1:]:
        heading = part.splitlines()[0]
        scripts = [s for s in SCRIPTS if s in heading]
        if scripts:
            yield heading, scripts, part


OTHER_TOOLS = {"--no-deps", "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint",
               "--standalone", "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
               "--time"}  # pip's, torchrun's and sbatch's flags


@pytest.mark.parametrize("heading,scripts,part", list(usage_sections()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_usage_names_is_a_flag_of_its_script(heading, scripts, part):
    """A flag in a section's tables is a flag of the section's script; any other flag it names is
    a flag of one of the scripts (or of pip, torchrun, sbatch)."""
    own = set().union(*(options(s) for s in scripts))
    tabled = {f for _, rows in tables(part) for row in rows for f in re.findall(r"`(--[a-z][a-z0-9_-]*)", row[0])}
    assert not tabled - own, f"{heading}: {sorted(tabled - own)} are not flags of {', '.join(scripts)}"
    every = set().union(*(options(s) for s in SCRIPTS)) | OTHER_TOOLS
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", part))
    assert not named - every, f"{heading}: {sorted(named - every)} are no script's flags"


def stated_defaults(part):
    """(flag, stated default) from the rows `| \\`--a\\`, \\`--b\\` | meaning (A, B) |`."""
    for header, rows in tables(part):
        for row in rows:
            flags = re.findall(r"`(--[a-z0-9_-]+)`", row[0])
            match = re.search(r"\(([^()]*)\)$", row[-1].strip())
            if not flags or not match or not re.fullmatch(r"`--[a-z0-9_-]+`(, `--[a-z0-9_-]+`)*", row[0].strip()):
                continue
            values = [v.strip().strip("`") for v in match.group(1).split(",")]
            if len(values) == len(flags) and not any(" " in v or not v for v in values):  # values, not words
                yield from zip(flags, values)


def same_default(stated, default):
    if isinstance(default, bool):
        return stated in ({"on", "yes"} if default else {"off", "no"})
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(stated) == float(default)
        except ValueError:
            return False
    return stated.strip("'\"") == str(default)


@pytest.mark.parametrize("heading,scripts,part", list(usage_sections()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_default_usage_states_is_the_default(heading, scripts, part):
    actions = options(scripts[0])
    for flag, stated in stated_defaults(part):
        default = actions[flag].default
        if default is None:
            continue  # taken from the checkpoint or the data: the doc says which
        assert same_default(stated, default), f"{heading}: {flag} is documented as ({stated}), its default is {default!r}"


def test_the_readme_fits_on_a_page():
    assert len(read(README).encode()) <= 12_500


def test_every_library_module_is_listed_where_the_layout_is_described():
    """aemc/__init__.py's docstring and docs/architecture.md's table name every module of the package."""
    import aemc
    modules = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "aemc", "*.py"))} - {"__init__"}
    modules.add("data")
    listed = set(re.findall(r"^    (\w+)\s", aemc.__doc__, flags=re.M))
    assert modules <= listed, sorted(modules - listed)
    table = read(os.path.join(ROOT, "docs", "architecture.md"))
    missing = {m for m in modules if f"`aemc/{m}.py`" not in table and f"`{m}.py`" not in table
               and f"`aemc/{m}/`" not in table}
    assert not missing, sorted(missing)

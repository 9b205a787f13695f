"""The README's tour as data: its commands, each script's parser, and the toy version of each
command that tests/test_tour.py runs (the same scripts and flags, only sizes made small)."""
import importlib
import os
import re
import shlex

from conftest import ROOT

README = os.path.join(ROOT, "README.md")

# Size flags: the only ones the toy tour changes. A value is replaced by the toy's; a flag the
# README's command leaves out is added where the script would otherwise run at full size.
EPOCHS = {"100": "6", "20": "2", "8": "4"}  # --epochs E -> e, and checkpoint-E.pt -> checkpoint-e.pt
REPLACED = {"--num_points": "3", "--grid_points": "3", "--num_members": "2", "--steps": "2"}
ADDED = {  # (script, a flag the command has, or None) -> size flags added
    ("train.py", None): ["--in_filters", "4", "--latent_dim", "8"],
    ("eval_curve.py", None): ["--num_points", "3"],
    ("spawn.py", None): ["--num_points", "3"],
    ("fge.py", None): ["--cycle", "2"],
    # a study's grid is a size too: one loss, two inits (small), one width (width)
    ("study.py", None): ["--epochs", "1", "--curve_epochs", "1", "--num_points", "3", "--max_images", "48",
                         "--batch_size", "16", "--in_filters", "4", "--latent_dim", "8", "--losses", "mae",
                         "--inits", "normal,kaiming_normal"],
    ("study.py", "width"): ["--widths", "4"],
    # learned matching scores its projections on training batches apart from BatchNorm's: the toy
    # CelebA's 38 training faces must make more than one batch
    ("align.py", "ste"): ["--batch_size", "16"],
    ("bench.py", None): ["--quick"],
}
SIZE_FLAGS = {"--epochs", "--curve_epochs", "--num_points", "--grid_points", "--num_members", "--max_images",
              "--batch_size", "--in_filters", "--latent_dim", "--widths", "--cycle", "--losses", "--inits", "--steps"}
SIZE_SWITCHES = {"--quick"}


def tour_blocks(text=None):
    """The commands of the README's tour section, one list of words each, per ```bash block."""
    text = open(README, encoding="utf-8").read() if text is None else text
    section = text.split("## A tour", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        joined = re.sub(r"\\\n", " ", block)
        blocks.append([shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()])
    return blocks


def script_of(words):
    """(script file, its arguments) of a command: `python X.py ...` or `torchrun [opts] X.py ...`."""
    i = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[i], words[i + 1:]


def parser_of(script):
    return importlib.import_module(script[:-len(".py")]).get_args_parser()


def toy(words):
    """The toy version of a tour command: size flags made small, nothing else changed."""
    script, argv = script_of(words)
    out, i = [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--epochs":
            out += [word, EPOCHS[argv[i + 1]]]
            i += 2
            continue
        if word in REPLACED:
            out += [word, REPLACED[word]]
            i += 2
            continue
        out.append(re.sub(r"checkpoint-(\d+)\.pt", lambda m: f"checkpoint-{EPOCHS.get(m.group(1), m.group(1))}.pt",
                          word))
        i += 1
    for (name, having), extra in ADDED.items():
        if name == script and (having is None or having in argv):
            flags = [w for w in extra if w.startswith("--")]
            if not any(f in argv for f in flags):
                out += extra
    return [*words[:words.index(script)], script, *out]


def without_sizes(words):
    """A command with its size flags removed and checkpoint epochs named as in the README."""
    inverse = {v: k for k, v in EPOCHS.items()}
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
            continue
        if word in SIZE_FLAGS:
            skip = True
            continue
        if word in SIZE_SWITCHES:
            continue
        out.append(word)
    return out, inverse


def same_but_sizes(readme_words, toy_words):
    """Whether two commands differ in size flags and the checkpoints' epochs (toy ones) only."""
    a, _ = without_sizes(readme_words)
    b, inverse = without_sizes(toy_words)
    b = [re.sub(r"checkpoint-(\d+)\.pt", lambda m: f"checkpoint-{inverse.get(m.group(1), m.group(1))}.pt", w)
         for w in b]
    return a == b

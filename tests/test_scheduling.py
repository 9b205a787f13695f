"""Running a study's stages through submitit (aemc.scheduling): dependencies from the files stages
read, several at once on this machine, a failure stopping only its dependants, a killed stage run
again, and SLURM job scripts (submitted to a fake sbatch that records them)."""
import os
import pickle
import stat
import sys

import pytest

from aemc import scheduling, studies
from aemc.errors import UserError
from aemc.studies import Stage, StudySettings, StudyState

# stand-ins for the project's scripts: write the output file named by --out after a moment, or fail
OK = """import os, sys, time
out = sys.argv[sys.argv.index("--out") + 1]
for path in sys.argv[sys.argv.index("--out") + 2:]:
    assert os.path.exists(path), path  # what it reads is there before it runs
with open(out + ".started", "a") as f:
    f.write("x")
time.sleep(1.0)
open(out, "w").write("done")
"""
FAIL = "import sys; sys.exit(3)"
DIES_ONCE = """import os, signal, sys
out = sys.argv[sys.argv.index("--out") + 1]
if not os.path.exists(out + ".tried"):
    open(out + ".tried", "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
open(out, "w").write("done")
"""


def scripts(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    for name, text in (("ok.py", OK), ("fail.py", FAIL), ("dies_once.py", DIES_ONCE)):
        (root / name).write_text(text)
    return str(root)


def stage(name, script, out, inputs=(), training=False):
    return Stage(name, [script, "--out", str(out), *map(str, inputs)], str(out), [str(p) for p in inputs],
                 resume=str(out) + ".last" if training else None)


def test_a_stage_waits_for_the_stages_that_write_what_it_reads(tmp_path):
    settings = StudySettings(losses=("mae",), inits=("normal", "kaiming_normal"), plane=True)
    deps = scheduling.dependencies(studies.plan(str(tmp_path), settings))
    a, b = "endpoint mae normal", "endpoint mae kaiming_normal"
    assert deps[a] == [] and deps[b] == []
    assert deps["curve mae normal/kaiming_normal"] == [a, b]
    for later in ("check_ends", "eval_curve", "plane"):
        assert deps[f"{later} mae normal/kaiming_normal"] == ["curve mae normal/kaiming_normal"]
    # a spawn reads the parent run's checkpoint of epoch K, not the run's last: still the parent's stage
    deps = scheduling.dependencies(studies.plan(str(tmp_path), StudySettings(kind="instability", epochs=4,
                                                                              spawn_epochs=(0, 2), pairs=2)))
    for pair in (1, 2):  # each parent's copies wait for that parent alone
        assert deps[f"spawn at epoch 0 from parent {pair}"] == deps[f"spawn at epoch 2 from parent {pair}"] == \
            [f"parent run {pair}"]


def test_stages_run_side_by_side_in_dependency_order_and_a_failure_stops_only_its_dependants(tmp_path):
    root, work = scripts(tmp_path), tmp_path / "study"
    work.mkdir()
    a, b = work / "a.out", work / "b.out"
    plan = [stage("a", "ok.py", a, training=True), stage("b", "ok.py", b, training=True),
            stage("ab", "ok.py", work / "ab.out", [a, b]), stage("bad", "fail.py", work / "bad.out"),
            stage("after bad", "ok.py", work / "after.out", [work / "bad.out"]),
            stage("last", "ok.py", work / "last.out", [work / "ab.out"])]
    state = StudyState(str(work))
    failed = scheduling.run_local(plan, {s.name: "todo" for s in plan}, state, root, max_parallel=2, log=lambda name, m: None)
    assert failed == {"bad": "exit 3", "after bad": "not run: it needs 'bad', which failed"}
    for name in ("a", "b", "ab", "last"):
        assert os.path.exists(work / f"{name}.out") and state.stages[name]["output_sha256"]
    assert not os.path.exists(work / "after.out")
    # a and b ran at once (both had started before either ended)
    assert os.path.getmtime(work / "a.out.started") < os.path.getmtime(work / "b.out") and \
        os.path.getmtime(work / "b.out.started") < os.path.getmtime(work / "a.out")
    with pytest.raises(UserError, match="'bad' \\(exit 3\\) failed; not run because of it: after bad"):
        scheduling.report_failures(failed)


def test_a_killed_stage_runs_again_at_the_next_invocation(tmp_path):
    root, work = scripts(tmp_path), tmp_path / "study"
    work.mkdir()
    plan = [stage("dies", "dies_once.py", work / "d.out")]
    state = StudyState(str(work))
    failed = scheduling.run_local(plan, {"dies": "todo"}, state, root, max_parallel=2, log=lambda name, m: None)
    assert list(failed) == ["dies"]
    state = StudyState(str(work))  # the next invocation reads what the killed one left
    assert state.check(plan[0]) == "todo"
    assert scheduling.run_local(plan, {"dies": "todo"}, state, root, max_parallel=2, log=lambda name, m: None) == {}
    assert state.check(plan[0]) == "done"


def test_slurm_jobs_carry_their_dependencies_resources_and_commands(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"  # records each script it is given and answers as sbatch does
    sbatch.write_text(f"""#!{sys.executable}
import os, sys
log = {str(tmp_path / 'submitted')!r}
n = len(os.listdir(log)) + 101 if os.path.isdir(log) else 101
os.makedirs(log, exist_ok=True)
open(os.path.join(log, str(n)), "w").write(open(sys.argv[-1]).read())
print(f"Submitted batch job {{n}}")
""")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it to know it is on a cluster
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "study"
    work.mkdir()
    settings = StudySettings(losses=("mae",), inits=("normal", "kaiming_normal"), epochs=2, curve_epochs=2)
    plan = studies.plan(str(work), settings)
    state = StudyState(str(work))
    todo = {s.name: "todo" for s in plan if s.name != "endpoint mae normal"}  # that one is done already
    jobs = scheduling.submit_slurm(plan, todo, state, "/project", dict(
        partition="gpu", gpus_per_node=2, time=90), log=lambda name, m: None)
    ids = {name: job.job_id for name, job in jobs.items()}
    assert list(ids) == [s.name for s in plan if s.name in todo]
    scripts_by_id = {name: (tmp_path / "submitted" / ids[name]).read_text() for name in ids}
    for name, text in scripts_by_id.items():
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --gpus-per-node=2" in text
        assert "#SBATCH --time=90" in text
    curve = "curve mae normal/kaiming_normal"
    assert f"#SBATCH --dependency=afterok:{ids['endpoint mae kaiming_normal']}" in scripts_by_id[curve]
    assert "--dependency" not in scripts_by_id["endpoint mae kaiming_normal"]
    for later in ("check_ends", "eval_curve"):
        assert f"#SBATCH --dependency=afterok:{ids[curve]}" in scripts_by_id[f"{later} mae normal/kaiming_normal"]
    # each job runs its stage's command line (from the pickle submitit runs), under torchrun where it can
    for s in plan:
        if s.name in ids:
            with open(work / "logs" / "slurm" / f"{ids[s.name]}_submitted.pkl", "rb") as f:
                submission = pickle.load(f)
            assert submission.function is scheduling.run_stage
            assert submission.args == (s.argv, "/project", 2)
            assert state.stages[s.name]["job"] == ids[s.name]


def test_logging_flags_join_the_commands_that_log_but_not_the_recorded_stage(tmp_path):
    settings = StudySettings(losses=("mae",), inits=("normal", "kaiming_normal"))
    plan = {s.name: s for s in studies.plan(str(tmp_path), settings)}
    flags = ["--wandb", "--wandb_project", "p", "--wandb_group", "study"]
    train, check = plan["curve mae normal/kaiming_normal"], plan["check_ends mae normal/kaiming_normal"]
    assert scheduling.stage_argv(train, "resume", flags) == [*train.argv, "--resume", train.resume, *flags]
    assert scheduling.stage_argv(check, "todo", flags) == check.argv  # check_ends logs nothing
    assert "--wandb" not in train.argv  # what study.json records: logging never makes a result stale

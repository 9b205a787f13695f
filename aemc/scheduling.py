"""Running a study's stages (aemc.studies) with submitit: on this machine, several at once, or as
SLURM jobs whose dependencies are the stages they read.

A stage depends on the training stages that write the files it reads (its inputs lie in their
run folders: a curve reads its endpoints' checkpoints, a spawn reads the parent run's checkpoint
of epoch K), and on the stage whose output is one of its inputs. Whatever runs a stage, the
controller (study.py) records it in the study's state as it always has: started before it runs,
finished (with its output's and inputs' SHA-256) when it ended well; a failed stage stops the
stages that depend on it, and the others go on.
"""
import os
import signal
import subprocess
import sys
import time

from aemc.errors import Interrupted, UserError, warn
from aemc.files import remove_stale_temporaries

# the scripts that run under torchrun when a SLURM stage has several GPUs
TORCHRUN_SCRIPTS = ("train.py", "eval_curve.py", "plane.py", "ensemble.py")
# the scripts that log to W&B (a study's --wandb flags are added to their command lines when they run:
# logging is not a setting of the result, so it is not part of the stage's recorded command)
TRACKED_SCRIPTS = ("train.py", "eval_curve.py", "plane.py", "fge.py")


def dependencies(stages):
    """{stage name: [names of the stages it waits for]} (every one earlier in `stages`)."""
    deps = {}
    for i, stage in enumerate(stages):
        needs = []
        for earlier in stages[:i]:
            folder = os.path.dirname(earlier.output)  # a training stage writes all its run folder holds
            if any(path == earlier.output or (earlier.resume is not None and os.path.dirname(path) == folder)
                   for path in stage.inputs):
                needs.append(earlier.name)
        deps[stage.name] = needs
    return deps


def run_stage(argv, root, gpus=1, log_path=None):
    """Run one stage's command line (a script of the project and its flags) from the project's
    folder `root`; under torchrun with `gpus` processes when there are several and the script
    supports it; its output appended to `log_path` when given (stages running side by side).
    Returns the exit status (the job's result under submitit)."""
    script = os.path.join(root, argv[0])
    if gpus > 1 and argv[0] in TORCHRUN_SCRIPTS:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                   script, *argv[1:]]
    else:
        command = [sys.executable, script, *argv[1:]]
    if log_path is None:
        return _run(command)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as f:
        return _run(command, stdout=f, stderr=subprocess.STDOUT)


def _run(command, grace=10.0, patience=60.0, **kwargs):
    """Run `command`; its exit status. On Ctrl-C the stage is not killed mid-write (subprocess.run
    kills it a quarter of a second after Ctrl-C, which left a checkpoint's temporary behind): a
    terminal's Ctrl-C has reached it too, and a stage handles it (a training saves a resumable
    checkpoint, an evaluation keeps its points). It gets `grace` seconds for that, then a SIGINT of
    its own (the study alone was interrupted, e.g. by kill -INT), then `patience` seconds more before
    it is killed; a second Ctrl-C kills it at once. Then KeyboardInterrupt goes on up."""
    proc = subprocess.Popen(command, **kwargs)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=patience)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise


def stage_argv(stage, status, tracking=()):
    """The command line a stage runs: its own, --resume when it continues, the logging flags."""
    return (stage.argv + (["--resume", stage.resume] if status == "resume" else [])
            + (list(tracking) if stage.argv[0] in TRACKED_SCRIPTS else []))


def run_local(stages, todo, state, root, max_parallel=1, poll=0.2, log=None, tracking=()):
    """Run the stages of `todo` ({name: 'todo' | 'resume'}) on this machine, up to `max_parallel`
    at once, each when the stages it depends on have finished (those not in `todo` are done).
    With one at a time the stage's output goes to this terminal; with several, to
    <study>/logs/<stage>.log. Returns {name: why} of the stages that failed or could not run."""
    import submitit
    log = log or _print
    by_name = {s.name: s for s in stages}
    deps = dependencies(stages)
    waiting = [s.name for s in stages if s.name in todo]
    running, failed = {}, {}
    executor = None
    if max_parallel > 1:
        executor = submitit.LocalExecutor(folder=os.path.join(state.root, "logs", "submitit"))
        executor.update_parameters(timeout_min=60 * 24 * 365)
    try:
        while waiting or running:
            for name in list(waiting):
                blocked = [d for d in deps[name] if d in failed]
                if blocked:
                    waiting.remove(name)
                    failed[name] = f"not run: it needs '{blocked[0]}', which failed"
                    continue
                if len(running) >= max_parallel or any(d in waiting or d in running for d in deps[name]):
                    continue
                waiting.remove(name)
                stage, argv = by_name[name], stage_argv(by_name[name], todo[name], tracking)
                log(name, f"{'resuming' if todo[name] == 'resume' else 'running'} python {' '.join(argv)}")
                state.started(stage)
                if executor is None:  # in this process's terminal, as the study always ran
                    try:
                        code = run_stage(argv, root)
                    except KeyboardInterrupt:  # the stage has ended (run_stage waited for it)
                        clean_stage(stage)
                        raise
                    _ended(name, code, stage, state, failed, log)
                else:
                    running[name] = executor.submit(run_stage, argv, root, 1,
                                                    os.path.join(state.root, "logs", f"{_file_name(name)}.log"))
            for name, job in list(running.items()):
                if job.done():
                    del running[name]
                    try:
                        code = job.result()
                    except Exception as e:  # the job itself died (killed, out of memory)
                        code = f"job died: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                    _ended(name, code, by_name[name], state, failed, log)
            if running:
                time.sleep(poll)
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel(check=False)
        for name, job in running.items():
            _wait_for(job)
            clean_stage(by_name[name])
        raise Interrupted("interrupted; rerun the same command to continue (finished stages are kept)")
    return failed


def _wait_for(job, timeout=30.0):
    """Wait (a while) for a cancelled local job to be gone."""
    ends = time.time() + timeout
    while not job.done() and time.time() < ends:
        time.sleep(0.1)


def clean_stage(stage):
    """Remove the temporaries of atomic writes that an ended stage left in its folder (a stage
    killed while it wrote a checkpoint); a live process's are kept."""
    folder = os.path.dirname(stage.output)
    removed = remove_stale_temporaries(folder)
    if removed:
        warn(f"{stage.name}: removed {len(removed)} unfinished temporary file(s) from {folder}")


def _print(name, message):
    print(f"{name}: {message}", flush=True)


def _ended(name, code, stage, state, failed, log):
    clean_stage(stage)
    if code == 0:
        state.finished(stage)
        log(name, "done")
    elif code == 130:
        raise Interrupted(f"interrupted in stage '{name}'; rerun the same command to continue")
    else:
        failed[name] = f"exit {code}" if isinstance(code, int) else code
        log(name, f"FAILED ({failed[name]})")


def _file_name(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def submit_slurm(stages, todo, state, root, options, log=None, tracking=()):
    """Submit the stages of `todo` as SLURM jobs through submitit, each with --dependency=afterok
    on the jobs of the stages it depends on that are not done yet. `options`: submitit's SLURM
    parameters (partition, gpus_per_node, time in minutes, ...). Records each job's id in
    the study's state and returns {name: job}."""
    import submitit
    log = log or _print
    deps = dependencies(stages)
    try:
        executor = submitit.SlurmExecutor(folder=os.path.join(state.root, "logs", "slurm"))
    except RuntimeError as e:  # no srun on this machine
        raise UserError(f"--executor slurm: {e} (run study.py on a node that can submit jobs)")
    gpus = options.get("gpus_per_node") or 1
    jobs = {}
    for stage in stages:
        if stage.name not in todo:
            continue
        earlier = state.stages.get(stage.name, {}).get("job")
        if earlier is not None:  # submitted by an earlier invocation (--no_wait): still queued or running?
            job = submitit.SlurmJob(folder=executor.folder, job_id=earlier)
            if job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
                jobs[stage.name] = job
                log(stage.name, f"job {earlier} is still {job.state.lower()}: waiting for it")
                continue
        after = [jobs[d].job_id for d in deps[stage.name] if d in jobs]
        extra = {}
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
            extra["kill-on-invalid-dep"] = "yes"
        executor.update_parameters(job_name=f"study-{_file_name(stage.name)}", additional_parameters=extra,
                                   **options)
        argv = stage_argv(stage, todo[stage.name], tracking)
        jobs[stage.name] = executor.submit(run_stage, argv, root, gpus)
        state.submitted(stage, jobs[stage.name].job_id)
        waits = f" (after {', '.join(after)})" if after else ""
        log(stage.name, f"submitted as job {jobs[stage.name].job_id}{waits}")
    return jobs


def wait_slurm(jobs, stages, state, poll=30, log=None):
    """Wait for submitted jobs, recording each stage as it finishes; {name: why} of the failed."""
    log = log or _print
    by_name = {s.name: s for s in stages}
    failed = {}
    pending = dict(jobs)
    while pending:
        for name, job in list(pending.items()):
            if not job.done():
                continue
            del pending[name]
            try:
                code = job.result()
            except Exception as e:
                code = f"job {job.job_id} ended without a result ({job.state})"
                warn(f"{name}: {e}")
            _ended(name, code, by_name[name], state, failed, log)
        if pending:
            time.sleep(poll)
    return failed


def report_failures(failed):
    """One error naming the failed stages and those they stopped."""
    if failed:
        causes = [f"'{n}' ({why})" for n, why in failed.items() if not why.startswith("not run")]
        stopped = [n for n, why in failed.items() if why.startswith("not run")]
        raise UserError(f"stage {', '.join(causes)} failed" + (f"; not run because of it: {', '.join(stopped)}"
                                                              if stopped else "") +
                        "; finished stages are kept: fix the cause and rerun the same command")

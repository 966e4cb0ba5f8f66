"""Sessions: tests (3.11-3.13), slow, lint, typecheck, bench, soak, fuzz.

``python3 -m nox`` runs tests on every listed Python the machine has, the tests
marked slow once (on the oldest Python), then lint and typecheck: every test runs
in every CI run. A Python that is not installed is skipped, not failed, even with
CI=true (nox's own default there is to fail).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

PYTHONS = ["3.11", "3.12", "3.13"]
CONSTRAINTS = ("-c", "constraints.txt")

nox.options.sessions = ["tests", "slow", "lint", "typecheck"]
nox.options.error_on_missing_interpreters = False
nox.options.reuse_existing_virtualenvs = True


def _expose_pyenv_interpreters() -> None:
    # pyenv's shims answer for every version but fail for those not selected;
    # put the real interpreters first on PATH so nox finds 3.12 and 3.13 too.
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    bins = []
    for version in PYTHONS:
        found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin")))
        bins.extend(found[-1:])
    if bins:
        os.environ["PATH"] = os.pathsep.join([*bins, os.environ.get("PATH", "")])


_expose_pyenv_interpreters()


def _install_debian(session: nox.Session, package: str, command: str, why: str) -> None:
    """Best effort: a Debian package some tests need (they are skipped, with the reason,
    without it). Only as root with apt-get; said in the log either way."""
    if shutil.which(command) or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    session.log(f"installing Debian's {package} (apt-get, as root) for {why}; "
                "those tests are skipped without it")
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", package], timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if not shutil.which(command):
            subprocess.run(["apt-get", "update", "-q"], timeout=300, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", package], timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        session.log(f"could not install {package} ({exc}); those tests will be skipped")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Every test but those marked slow: logic in virtual time, on each Python."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session(python=PYTHONS[0])
def slow(session: nox.Session) -> None:
    """The tests marked slow, once per run: processes, a redis-server, a browser, a real
    engine, real-time waits on real sockets, long property runs (docs/testing.md)."""
    _install_debian(session, "chromium", "chromium", "the status-page browser test")
    _install_debian(session, "redis-server", "redis-server", "the scale-out tests")
    # The [engine] extra is llama.cpp's server (a prebuilt wheel) for provider-agent's
    # real-engine tests (tests/test_agent_engine.py).
    session.install(*CONSTRAINTS, "-e", ".[test,engine]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "coordinator", "provider_sim", "provider_link", "provider_agent",
                "tests", "benchmarks", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    # trio-typing must stay out: its stubs shadow trio's own inline types and
    # its plugin crashes current mypy (docs/operations.md).
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks (not part of CI's pass/fail): ratios measured in one run.

    On two or more CPUs the servers run on CPU 0 and their load on the others
    (BENCH_SERVER_CPUS; set it empty to share every CPU)."""
    session.install(*CONSTRAINTS, "-e", ".[test,engine]")
    if "BENCH_SERVER_CPUS" not in os.environ and len(os.sched_getaffinity(0)) >= 2:
        session.env["BENCH_SERVER_CPUS"] = "0"
    session.run("python", "-m", "benchmarks.bench_toolschema")
    session.run("python", "-m", "benchmarks.bench_stack")
    session.run("python", "-m", "benchmarks.bench_exhaustion")
    session.run("python", "-m", "benchmarks.bench_drain")
    session.run("python", "-m", "benchmarks.bench_zombie")
    session.run("python", "-m", "benchmarks.bench_scale")
    session.run("python", "-m", "benchmarks.bench_agent")  # a real engine, direct vs through
    if shutil.which("redis-server"):
        session.run("python", "-m", "benchmarks.bench_cluster")
    else:
        session.log("no redis-server: bench_cluster skipped (apt-get install redis-server)")
    # This tree against the commit before the security, engine and scale work.
    session.run("python", "-m", "benchmarks.bench_before_after", "--base", "0252e9c")


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """The whole-system simulation with 10,000 fault schedules (about 4 minutes here)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("pytest", "tests/test_simulation.py", "-q", "-p", "no:cacheprovider",
                env={"SIMULATION_EXAMPLES": session.posargs[0] if session.posargs else "10000"})


# The campaign's targets in groups of about equal CPU time (the raw-bytes target
# mostly waits on real sockets, so the peer-link target, the cheapest per example,
# shares its group), run side by side when the machine has the CPUs.
FUZZ_GROUPS = {
    "raw-peer": "test_hostile_http_bytes or test_hostile_peer_frames",
    "bodies-1": "test_hostile_bodies and (chat or completions)",
    "bodies-2": "test_hostile_bodies and (responses or messages)",
    "heads-admission": "test_hostile_heads or test_hostile_frames_before_admission",
    "in-flight": "test_hostile_frames_after_admission",
    "http2": "test_hostile_http2_flow_control",
}


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """The hostile-input fuzz campaign (tests/test_fuzz.py), 100,000 examples per target.

    ``nox -s fuzz -- 5000`` runs another count (further arguments go to pytest).
    Prints each target's examples, statuses and wall time, Hypothesis' statistics
    and durations; a failure prints its shrunk example. ``FUZZ_SURVEY=1`` keeps
    going after violations and lists one example per distinct origin at the end.
    On two or more CPUs the target groups run as parallel processes, each writing
    ``bench-results/fuzz-<group>.log``, printed when it ends.
    """
    session.install(*CONSTRAINTS, "-e", ".[test]")
    examples = session.posargs[0] if session.posargs else "100000"
    argv = ["pytest", "tests/test_fuzz.py", "-q", "-s", "-p", "no:cacheprovider",
            "--hypothesis-show-statistics", "--durations=0", *session.posargs[1:]]
    if len(os.sched_getaffinity(0)) < 2:
        session.run(*argv, env={"FUZZ_EXAMPLES": examples})
        return
    os.makedirs("bench-results", exist_ok=True)
    env = {**os.environ, "PATH": os.pathsep.join([session.bin, os.environ.get("PATH", "")]),
           "FUZZ_EXAMPLES": examples}
    running = {}
    for group, selection in FUZZ_GROUPS.items():
        log = open(os.path.join("bench-results", f"fuzz-{group}.log"), "w")  # noqa: SIM115
        running[group] = (subprocess.Popen([*argv, "-k", selection], env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log)
    session.log(f"{len(running)} groups running: {', '.join(running)}")
    failed = []
    try:
        for group, (proc, log) in running.items():
            code = proc.wait()
            log.close()
            with open(log.name) as done:
                print(f"===== {group} (exit {code}) =====\n{done.read()}", flush=True)
            if code:
                failed.append(group)
    finally:  # interrupted: no group outlives the session, each says how far it got
        for group, (proc, log) in running.items():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
                log.close()
                with open(log.name) as stopped:
                    print(f"===== {group} (stopped) =====\n{stopped.read()}", flush=True)
    if failed:
        session.error(f"fuzz groups failed: {', '.join(failed)}")

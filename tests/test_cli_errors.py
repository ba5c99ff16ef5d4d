"""Errors every command reports the same way: Click's usage errors and failed writes to stdout
as one ``convcrf: error: ...`` line on stderr with the documented exit status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_runner

from convcrf_cli import entry, meanfield
from convcrf_cli.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["refine", "a.png", "b.npy"], "Missing option '-o' / '--output'"),
        (["refine", "a.png", "b.npy", "-o", "c.png", "--alpha", "2"], "'--alpha': 2.0"),
        (["refine", "a.png", "b.npy", "-o", "c.png", "-k", "x"], "'-k'"),
        (["refine", "--bogus"], "--bogus"),  # click 8.1: 'No such option: --bogus'
        (["synth", "d", "--size", "48"], "HEIGHTxWIDTH"),
        (["batch", "i", "u", "-o", "o", "--jobs", "0"], "'--jobs'"),
        (["bogus"], "No such command 'bogus'"),
        (
            ["refine", "a.png", "b.npy", "-o", "c.png", "-k", "8"],
            "--filter-size must be a positive",
        ),
        (["refine", "a.png", "b.npy", "-o", "c.png", "--weight", "1e39"], "--weight must be a"),
        (["params", "--preset", "original", "--params", "p.json"], "give --preset or --params"),
        (["fit", "i", "u", "l", "-o", "p.json", "--val-fraction", "1"], "--val-fraction must lie"),
        (["fit", "i", "u", "l", "-o", "p.json", "--learn", "x"], "unknown learnable group(s) x"),
        (["refine", "a.png", "-", "-o", "c.png", "--params", "-"], "UNARY and --params cannot"),
        (["batch", "--manifest", "-", "-o", "o", "--params", "-"], "--manifest and --params"),
    ],
)
def test_usage_errors_are_one_line(tmp_path, args, message):
    os.chdir(tmp_path)
    result = cli_runner().invoke(main, args, prog_name="convcrf")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    command = "convcrf" if args[0] == "bogus" else f"convcrf {args[0]}"
    assert lines[0].startswith("convcrf: error: ") and message in lines[0]
    assert lines[0].endswith(f"(see '{command} --help')")
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_help_and_version_still_work():
    help_text = cli_runner().invoke(main, ["refine", "--help"], prog_name="convcrf").stdout
    assert help_text.startswith("Usage: convcrf refine")
    assert cli_runner().invoke(main, ["--version"]).exit_code == 0
    bare = cli_runner().invoke(main, [])
    assert bare.exit_code in (0, 2) and "Commands:" in bare.output


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    ("command", "what"), [("params", "the parameters"), ("info", "the report")]
)
def test_a_full_stdout_is_one_line_and_status_1(command, what):
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "convcrf_cli", command],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=120,
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"convcrf: error: stdout: cannot write {what}: No space left on device"
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    ("args", "what"),
    [(["--help"], "the help"), (["refine", "--help"], "the help"), (["--version"], "the version")],
)
def test_help_or_version_to_a_full_stdout_is_one_line_and_status_1(args, what):
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, "-m", "convcrf_cli", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=120,
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
    assert done.stderr.decode().splitlines() == [
        f"convcrf: error: stdout: cannot write {what}: No space left on device"
    ]
    assert done.returncode == 1


def test_the_first_interrupt_raises_and_later_ones_are_ignored():
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, entry.interrupt_once)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)  # ignored: nothing is raised while stopping
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_while_starting_ends_the_process_at_once_raising_nothing(monkeypatch, capfd):
    # From the handler itself: an exception raised in the code it interrupted could reach
    # torch's C++ initialisation (std::terminate) or Click (reported as 'aborted').
    exits = []

    class Exited(BaseException):
        pass

    def record_exit(status):
        exits.append(status)
        raise Exited

    monkeypatch.setattr(entry.os, "_exit", record_exit)
    previous = signal.signal(signal.SIGINT, entry.interrupt_while_starting)
    try:
        with pytest.raises(Exited):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (exits, capfd.readouterr().err) == ([130], "convcrf: error: interrupted\n")


def test_a_command_that_starts_takes_over_the_interrupt_of_the_entry_point_only():
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, entry.interrupt_while_starting)
        entry.command_started()
        assert signal.getsignal(signal.SIGINT) == entry.interrupt_once
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as under Click's test runner
        entry.command_started()
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


_INTERRUPT_WHILE_STARTING = """
import os, signal, sys

def ctrl_c_twice():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)

class CtrlCWhereNoExceptionPasses:
    # a __del__ swallows an exception as torch's C++ initialisation cannot take one
    def __del__(self):
        ctrl_c_twice()

class WhileImportingTheCommands:
    def find_spec(self, name, path=None, target=None):
        if name == "convcrf_cli.cli":
            sys.meta_path.remove(self)
            CtrlCWhereNoExceptionPasses()
        return None

if sys.argv[1] == "importing":
    sys.meta_path.insert(0, WhileImportingTheCommands())
else:  # "parsing": while Click parses the command line
    import convcrf_cli.cli
    parse_args = convcrf_cli.cli.main.parse_args
    def interrupted_parse_args(ctx, args):
        ctrl_c_twice()
        return parse_args(ctx, args)
    convcrf_cli.cli.main.parse_args = interrupted_parse_args
sys.argv = ["convcrf", "batch", "--from-list", "-", "unaries", "-o", "o"]
from convcrf_cli.entry import main
main()
"""


@pytest.mark.parametrize("phase", ["importing", "parsing"])
def test_an_interrupt_at_each_phase_of_the_start_is_one_line_and_status_130(tmp_path, phase):
    # importing: was the Ctrl-C lost (an 'Exception ignored' note, then the command ran);
    # parsing: was a blank line and 'convcrf: error: aborted' with exit status 1.
    (tmp_path / "unaries").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_WHILE_STARTING, phase],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr, done.stdout) == (130, "convcrf: error: interrupted\n", "")


def _wait_until_torch_loads(process: subprocess.Popen) -> None:
    """Wait until torch's libraries are mapped into ``process``: it has installed its SIGINT
    handler (a Ctrl-C before, while Python itself starts, is Python's own)."""
    deadline = time.monotonic() + 120
    while "/torch/lib/" not in Path(f"/proc/{process.pid}/maps").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("delay", [0, 0.3, 1.5])
def test_an_interrupt_while_starting_up_is_one_line_and_status_130(tmp_path, delay):
    # SIGINT arrives while torch and the commands are being imported (about a second here;
    # torch's C++ initialisation aborted the process, status -6, when it raised there) or, on
    # a faster machine, while the batch waits for its list on stdin: the same either way, and
    # a second SIGINT changes nothing.
    (tmp_path / "unaries").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "convcrf_cli", "batch", "--from-list", "-", "unaries", "-o", "o"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_until_torch_loads(process)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr, stdout) == (130, "convcrf: error: interrupted\n", "")


_START_WITH_LITTLE_MEMORY = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (300 << 20, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.argv = ["convcrf", "params"]
from convcrf_cli.entry import main
main()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as on Linux")
def test_torch_that_cannot_load_is_one_line_and_status_1():
    done = subprocess.run(
        [sys.executable, "-c", _START_WITH_LITTLE_MEMORY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("convcrf: error: cannot start: loading torch and NumPy failed (")
    assert done.stderr.endswith("; is the process's memory limited (ulimit -v)?\n")


def test_the_package_warnings_are_one_line_and_others_shown_as_python_shows_them(capsys):
    shown = []
    fallback = RuntimeWarning(
        "module X does not compile; the mean field runs as PyTorch operations"
    )
    entry.show_warning(shown.append, fallback, RuntimeWarning, meanfield.__file__, 12)
    assert capsys.readouterr().err == f"convcrf: warning: {fallback}\n" and shown == []
    elsewhere = str(Path(meanfield.__file__).parent.with_name("convcrf_cli_extra") / "m.py")
    for filename in ("/site-packages/torch/nn/modules/module.py", elsewhere):
        entry.show_warning(lambda *args: shown.append(args), fallback, RuntimeWarning, filename, 3)
        assert shown.pop() == (fallback, RuntimeWarning, filename, 3, None, None)
    assert capsys.readouterr().err == ""


_WARN_AS_THE_COMMAND = """
import sys, warnings
import convcrf_cli.cli, convcrf_cli.meanfield
def command(prog_name):
    warnings.warn_explicit("fell back", RuntimeWarning, convcrf_cli.meanfield.__file__, 1)
    warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/mod.py", 7)
convcrf_cli.cli.main = command
from convcrf_cli.entry import main
main()
"""


def test_the_command_shows_the_package_warnings_as_one_line():
    done = subprocess.run(
        [sys.executable, "-c", _WARN_AS_THE_COMMAND], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "convcrf: warning: fell back",
        "/elsewhere/mod.py:7: UserWarning: from elsewhere",
    ]

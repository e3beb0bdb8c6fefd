"""`personaspace --help`: its command list was one run-on paragraph."""

import subprocess
import sys


def test_help_lists_one_command_per_line():
    shown = subprocess.run([sys.executable, "-m", "personaspace.cli", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    lines = [line for line in shown.stdout.splitlines() if line.startswith("personaspace ")]
    commands = {line.split()[1] for line in lines}
    assert {"params", "check-params", "compare", "regress", "analyze", "recover-lock", "ui"} <= commands, lines
    assert all(line.count("personaspace ") == 1 for line in lines)  # one command a line

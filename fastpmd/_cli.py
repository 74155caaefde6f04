"""What every `fastpmd` subcommand shares: a one-line argparse error and the check of an output directory."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, `PROG: error: MESSAGE (see --help)`, exit status 2
    (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_out_dir(name: str, path: str | Path) -> None:
    """`path` is a directory this process can write in, or can be created as one: ValueError naming `name`
    otherwise. Creates nothing: it makes (and removes at once) a directory in the nearest existing ancestor,
    which also catches what os.access cannot see (root on a read-only mount, /proc)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name}: {path} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}: cannot create {path}: {probe} is a file")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".fastpmd-probe-").cleanup()
    except OSError as e:
        raise ValueError(f"{name}: cannot write in {probe} ({e.strerror or e})") from None

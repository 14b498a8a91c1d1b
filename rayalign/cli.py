"""The command line every job shares: `--config FILE` plus `--set key.path=value` overrides.

`parse_job_config` also checks every input path and data file of the config
(`rayalign.preflight`), so a job fails on bad input in about a second, before it imports
torch, transformers or Ray and before any cluster starts; `exit_on_input_error` does the same
for the checks a job runs later but still before Ray starts (a changed run directory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from pydantic import BaseModel

from .config import ConfigError, load_config
from .data import DataError
from .preflight import check_inputs
from .rundir import ResumeMismatchError

Cfg = TypeVar("Cfg", bound=BaseModel)

INPUT_ERRORS = (ConfigError, DataError, ResumeMismatchError)


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Print an input error (config, data row, changed run directory) as one `error:` line
    block and exit with status 2, instead of a traceback."""
    try:
        yield
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_job_config(cls: type[Cfg], description: str, argv: list[str] | None = None,
                     default_config: str | None = None) -> Cfg:
    """Parse `--config` / `--set`, validate the config and check its inputs; exit 2 with the
    reason if anything is invalid."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config,
                        help="YAML config file" + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.beta=0.05 (repeatable)")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        cfg = load_config(cls, args.config, args.overrides)
        check_inputs(cfg)
    return cfg

"""The command line every job shares: `--config FILE` plus `--set key.path=value` overrides."""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

from pydantic import BaseModel

from .config import ConfigError, load_config

Cfg = TypeVar("Cfg", bound=BaseModel)


def parse_job_config(cls: type[Cfg], description: str, argv: list[str] | None = None,
                     default_config: str | None = None) -> Cfg:
    """Parse `--config` / `--set` and return the validated config; exit 2 with the reason if invalid."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config,
                        help="YAML config file" + (f" (default: {default_config})" if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.beta=0.05 (repeatable)")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

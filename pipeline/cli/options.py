"""Options shared by every command that reads a config."""

from __future__ import annotations

import argparse


def add_config_options(parser: argparse.ArgumentParser, set_example: str, ray_help: str) -> None:
    """The options every command that reads a config takes: ``--set`` overrides and the Ray address."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value, e.g. {set_example}")
    parser.add_argument("--ray-address", help=f"{ray_help} (default: ray.address, RAY_ADDRESS, or local)")

"""The `clusterft` command: one module per command group (`train`, `jobs`, `registry`, `serve`),
`main.py` for the parser and the small commands, `helpers.py` for what they share. The only package
that imports argparse; the domain packages below it take plain arguments."""

from clusterft.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

"""`python -m sftkit ...`: the same as the `sftkit` console command."""

from sftkit.cli import sftkit

raise SystemExit(sftkit())

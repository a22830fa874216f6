"""sftkit: supervised fine-tuning of causal LMs from one YAML file (see README.md)."""

from sftkit.compat import quiet_known_noise
from sftkit.errors import say_warnings

quiet_known_noise()
say_warnings()

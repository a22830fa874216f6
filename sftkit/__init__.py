"""sftkit: supervised fine-tuning of causal LMs from one YAML file (see README.md)."""

from sftkit.compat import quiet_known_noise

quiet_known_noise()

"""lightwatch's Hydra configs: the ``monitor`` policies and their component groups.

Read by Hydra as ``pkg://lightwatch.conf`` (this file makes the directory a package, which ``pkg://``
requires). The YAML files extend typed schemas from the ConfigStore group ``lightwatch_schema``
(:mod:`lightwatch.hydra`), registered by lightwatch's search-path plugin before Hydra composes.
"""

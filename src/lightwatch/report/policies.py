"""The Hydra policies lightwatch ships (``lightwatch/conf/monitor``), listed and resolved.

``lightwatch policies`` lists the policies (``monitor=<name>``) with the first line of their description
and the component variants (``monitor/<component>=<variant>``); ``lightwatch policies show NAME`` prints
the composed, resolved ``monitor`` node of a policy, exactly what ``monitor=NAME`` gives an app, so a
user can see what it watches without reading YAML inside site-packages.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["PolicyError", "conf_dir", "list_policies", "show_policy"]


class PolicyError(ValueError):
    """An unknown policy or component variant, or overrides Hydra rejects."""


def conf_dir() -> str:
    """The directory of the shipped ``monitor`` configs."""
    import lightwatch.conf

    return os.path.join(os.path.dirname(os.path.abspath(lightwatch.conf.__file__)), "monitor")


def _description(path: str) -> str:
    lines: List[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    # "Policy `default`: watch and warn, ..." -> the sentence after the name
    text = text.split(":", 1)[1].strip() if text.lower().startswith("policy `") and ":" in text else text
    first = text.split(". ")[0]
    return first if first.endswith(".") else first + "."


def list_policies() -> Dict[str, Any]:
    """``{"policies": [{"name", "description"}], "components": {group: [{"name", "description"}]}}``.

    Example:
        >>> names = [p["name"] for p in list_policies()["policies"]]
        >>> {"default", "strict", "debug", "off"} <= set(names)
        True
    """
    root = conf_dir()
    policies = [{"name": f[:-5], "description": _description(os.path.join(root, f))}
                for f in sorted(os.listdir(root)) if f.endswith(".yaml")]
    components: Dict[str, List[Dict[str, str]]] = {}
    for group in sorted(os.listdir(root)):
        path = os.path.join(root, group)
        if os.path.isdir(path) and not group.startswith(("_", ".")):
            components[group] = [{"name": f[:-5], "description": _description(os.path.join(path, f))}
                                 for f in sorted(os.listdir(path)) if f.endswith(".yaml")]
    return {"policies": policies, "components": components}


def show_policy(name: str, overrides: Optional[Sequence[str]] = None, resolve: bool = True) -> str:
    """The composed ``monitor`` node of policy ``name`` as YAML (``overrides`` as on a Hydra command line).

    A component variant (``grad_stats/full``) is shown as its file: it is composed only inside a policy.

    Raises:
        PolicyError: ``name`` is not a shipped policy or variant, or Hydra rejects the overrides.

    Example:
        >>> "every_n_steps: 10" in show_policy("strict")
        True
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from lightwatch.hydra import register_schemas

    known = list_policies()
    policies = [p["name"] for p in known["policies"]]
    variants = [f"{g}/{v['name']}" for g, vs in known["components"].items() for v in vs]
    if name in variants:
        with open(os.path.join(conf_dir(), name + ".yaml"), encoding="utf-8") as fh:
            return f"# monitor/{name} (a component variant; `${{..x}}` values come from the policy)\n" + fh.read()
    if name not in policies:
        raise PolicyError(f"unknown policy {name!r}: the shipped policies are {', '.join(policies)}; component "
                          f"variants: {', '.join(variants)}. List them with `lightwatch policies`.")
    register_schemas()
    hydra_was_up = GlobalHydra.instance().is_initialized()
    if hydra_was_up:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module("lightwatch.conf", version_base="1.3"):
            cfg = compose(config_name=f"monitor/{name}",
                          overrides=[o if o.startswith(("monitor", "~monitor", "+monitor")) else f"monitor.{o}"
                                     for o in overrides or []])
    except Exception as err:  # Hydra's own message names the key; keep it, say where it came from
        raise PolicyError(f"policy {name!r} with overrides {list(overrides or [])}: {err}") from None
    text = OmegaConf.to_yaml(cfg.monitor, resolve=resolve)
    return f"# monitor={name}, resolved (what `monitor={name}` gives an app)\n{text}"

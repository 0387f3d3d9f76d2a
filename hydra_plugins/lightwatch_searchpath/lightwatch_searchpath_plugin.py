"""Adds lightwatch's shipped configs (``pkg://lightwatch.conf``) to the search path of every Hydra app.

With lightwatch installed, any Hydra app can select ``monitor=default|strict|debug|off`` without copying
files. Hydra imports every module under ``hydra_plugins`` when an app starts, so this module imports only
Hydra at import time.
"""
import warnings

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

LIGHTWATCH_CONF = "pkg://lightwatch.conf"


class LightwatchSearchPathPlugin(SearchPathPlugin):
    """Registers lightwatch's schemas and appends ``pkg://lightwatch.conf`` to the search path.

    The path is appended, after the app's own configs, so an app's option of the same name wins.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # The schemas must be in the ConfigStore before Hydra builds its config repository: Hydra takes a
        # copy of the store when it starts composing, so a registration made later (e.g. when Hydra first
        # imports lightwatch.conf) is not seen until the next composition. This is the one hook that runs
        # early enough, for hydra.main apps and the Compose API alike.
        try:
            from lightwatch.hydra import register_schemas

            register_schemas()
        except Exception as err:  # a broken lightwatch install must not break every other Hydra app
            warnings.warn(f"lightwatch's Hydra configs are unavailable: importing lightwatch.hydra failed: {err!r}",
                          stacklevel=2)
            return
        search_path.append(provider="lightwatch", path=LIGHTWATCH_CONF)

"""The built-in methods, one package each. Importing this package registers them all.

Each package holds everything of its method: ``strategy.py`` (the server side, registered with
``@register_strategy``), ``client.py`` (its ``query.<action>`` handlers, if any), its numerical
core, ``config.py`` (its run-config section, if any) and a README (paper, what is faithful,
what we decided). No method imports another method; shared code is in
:mod:`flux_app.engine` and :mod:`flux_app.common`.
"""

from flux_app.methods import cfl, fedavg, feddag, fesem, flux, ifca, local, oracle, pacfl

__all__ = ["cfl", "feddag", "fedavg", "fesem", "flux", "ifca", "local", "oracle", "pacfl"]

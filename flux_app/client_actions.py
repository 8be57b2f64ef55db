"""Every ``query.<action>`` the ClientApp serves, by action name (one line per action).

``client_app.py`` registers each entry with ``@app.query(action)``; a new method that needs
its own client computation writes a handler ``(content, runtime) -> RecordDict`` and adds it here.
"""

from __future__ import annotations

from flux_app.client import Handler, handle_info, handle_scores
from flux_app.feddag_query import handle_feddag
from flux_app.flux_query import handle_descriptor
from flux_app.subspace_query import handle_subspaces

QUERY_ACTIONS: dict[str, Handler] = {
    "info": handle_info,
    "scores": handle_scores,
    "descriptor": handle_descriptor,
    "feddag": handle_feddag,
    "subspaces": handle_subspaces,
}

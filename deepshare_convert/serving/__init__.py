"""Private inference as a service: ``deepshare serve`` (party 0) answers many ``deepshare query`` clients.

One module per role, as :mod:`..mpc.dealer` is the dealer's room:

* :mod:`.artifacts` -- what each side may read of a converted directory (the client: ``plan.json``
  only, never the weights);
* :mod:`.inputs` -- the client's files (JPEG/PNG, folders, ``.npy``) -> the model's input tensor,
  with the same preprocessing as evaluation;
* :mod:`.control` -- the authenticated control line of a session (ready / error / done);
* :mod:`.server` -- the server: a supervisor and a bounded pool of session workers;
* :mod:`.client` -- :func:`query`, the client's side of one session.
"""

from __future__ import annotations

from .artifacts import ClientModel, architecture_only
from .client import Answer, QueryResult, query
from .inputs import Inputs, read_inputs
from .server import ServeConfig, Server

__all__ = ["Answer", "ClientModel", "Inputs", "QueryResult", "ServeConfig", "Server", "architecture_only", "query",
           "read_inputs"]

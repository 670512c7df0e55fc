"""The Flower transport of split learning (flwr >= 1.21, Message API). Only this package imports flwr.

- `records`: privdiff messages <-> Flower RecordDicts, and the server-side `Received` view;
- `server_app` / `client_app`: the ServerApp and ClientApp (thin, Flower's three-file shape, with
  privdiff's roles in the place of `task.py`);
- `deploy`: command lines for a SuperLink and SuperNodes, and a loopback deployment for tests and
  `privdiff split simulate --transport flower`.
"""

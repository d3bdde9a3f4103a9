"""An agent service over HTTP: each run relayed as one streaming request (``agent.upstream_url``)."""

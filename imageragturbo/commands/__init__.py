"""The application layer: every ``imageragturbo`` command and the asset builders they share.

One module per command group, each with ``add_parsers(sub, bench)``: ``main`` (the entry
point, ``data``, ``eval``, ``bench quality`` and ``bench sensitivity``), ``index``, ``train``,
``export``, ``generate``, ``serve`` (``serve``, ``demo``, ``bench serve``, ``bench soak``);
``assets`` makes the export and index a server needs; ``flags`` turns config dataclasses into
command-line flags. Commands resolve paths and defaults and hand them to the libraries; no
library imports this package (tests/test_layers.py). At module level the command modules
import only the standard library and light project modules, so ``imageragturbo --help`` is
fast and needs no torch; heavy imports stay inside the handlers.
"""
